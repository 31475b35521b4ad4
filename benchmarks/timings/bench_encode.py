"""The tokenizer encode of the training step (`VQVAE.img_to_idxBl`, float32 as official): candidate fast paths.

The encode is the part of a training step that the transformer's fast path does not touch (bench_train's "with
encode" rows), so this measures what could speed it up, and what each candidate does to the token ids:
    eager            the official path (NCHW, eager; TF32 convolutions when --tf32=1, as official)
    channels_last    the encoder's weights and input in channels-last memory format
    compiled         torch.compile of the encoder and quant_conv (the quantiser stays eager)
    compiled_cl      both
    bf16, bf16_cl    a bf16 copy of the encoder and quant_conv (models.lowp.EncoderCopy, train.py --vbf16 1), NCHW or
                     channels-last; the latent goes back to float32 for the quantiser
    compiled_bf16    the bf16 copy through torch.compile
`ids_equal_%` is the share of token ids equal to the eager path's on the same images: any other kernel rounds
differently, so ids near a tie between two codes may flip. The images are real photos (scikit-image's samples);
the weights are random unless --vae_ckpt is given, and a trained tokenizer's ties may be rarer or commoner.

    python -m benchmarks.timings.bench_encode --batch 64       # the official 256 px tokenizer, on the GPU
    python -m benchmarks.timings.bench_encode --device cpu --reso 64 --batch 2 --ch 32 --repeats 1   # a smoke run
"""
import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.timings.common import peak_gib, print_table, write_json
from models import PATCH_NUMS, VQVAE, load_vae_checkpoint
from models.lowp import EncoderCopy
from utils.runtime import set_tf32

VARIANTS = ('eager', 'channels_last', 'compiled', 'compiled_cl', 'bf16', 'bf16_cl', 'compiled_bf16')


def photo_batch(B: int, reso: int, device: torch.device) -> torch.Tensor:
    """B real photos (scikit-image's samples, cycled with flips), resized to reso x reso, in [-1, 1]."""
    import skimage.data
    names = ('astronaut', 'coffee', 'chelsea', 'rocket', 'hubble_deep_field', 'retina', 'immunohistochemistry')
    imgs = []
    for i in range(B):
        arr = getattr(skimage.data, names[i % len(names)])()
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(127.5).sub(1)[None]
        x = F.interpolate(x, size=(reso, reso), mode='bilinear', antialias=True, align_corners=False)
        imgs.append(x.flip(-1) if (i // len(names)) % 2 else x)
    return torch.cat(imgs).clamp(-1, 1).to(device)


def timer(device: torch.device, fn, warmup: int, repeats: int) -> float:
    """Median seconds per call (CUDA-synchronised on the GPU)."""
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def encoder_fn(vae: VQVAE, variant: str):
    """A function images -> concatenated ids (B, L) for one candidate."""
    cl = variant in ('channels_last', 'compiled_cl', 'bf16_cl')
    fmt = torch.channels_last if cl else torch.contiguous_format
    if 'bf16' in variant:
        features = EncoderCopy(vae, torch.bfloat16, channels_last=cl)
    else:
        vae.encoder.to(memory_format=fmt)
        vae.quant_conv.to(memory_format=fmt)
        features = torch.nn.Sequential(vae.encoder, vae.quant_conv)
    if variant.startswith('compiled'):
        torch._dynamo.reset()
        features = torch.compile(features)

    def run(img: torch.Tensor) -> torch.Tensor:
        f = features(img.contiguous(memory_format=fmt)).contiguous()
        return torch.cat(vae.quantize.f_to_idxBl_or_fhat(f.float(), to_fhat=False), dim=1)
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--reso', type=int, default=256, help='image size (the last patch num is reso / 16)')
    p.add_argument('--ch', type=int, default=160, help='tokenizer width (160: the official one)')
    p.add_argument('--vae_ckpt', default='',
                   help='a tokenizer checkpoint (official vae_ch160v4096z32.pth) for real ties')
    p.add_argument('--variants', default=','.join(VARIANTS))
    p.add_argument('--tf32', type=int, default=1, help='TF32 matmuls and convolutions (official default)')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--json', default='bench_encode.json')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('no CUDA GPU here: pass --device cpu for a (slow) CPU run')
    variants = args.variants.split(',')
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f'unknown variants {unknown}; choose from {", ".join(VARIANTS)}')
    set_tf32(bool(args.tf32))

    patch_nums = PATCH_NUMS.get(str(args.reso)) or tuple(range(1, args.reso // 16 + 1))
    if args.vae_ckpt:
        vae = load_vae_checkpoint(args.vae_ckpt, device=device)
    else:
        torch.manual_seed(0)
        vae = VQVAE(vocab_size=4096, z_channels=32, ch=args.ch, v_patch_nums=patch_nums, test_mode=True).to(device)
    vae.eval()
    img = photo_batch(args.batch, args.reso, device)

    rows, ref_ids = [], None
    with torch.no_grad():
        for variant in ['eager'] + [v for v in variants if v != 'eager']:
            run = encoder_fn(vae, variant)
            t0 = time.perf_counter()
            ids = run(img)
            first = time.perf_counter() - t0
            sec = timer(device, lambda: run(img), warmup=1, repeats=args.repeats)
            row = dict(variant=variant, batch=args.batch, reso=args.reso, img_per_s=args.batch / sec,
                       ms_per_batch=sec * 1000, first_call_s=first)
            if device.type == 'cuda':
                row['peak_gib'] = peak_gib(lambda: run(img))
            if ref_ids is None:
                ref_ids, ref_sec = ids, sec
            row['ids_equal_%'] = (ids == ref_ids).double().mean().item() * 100
            row['speedup'] = ref_sec / sec
            rows.append(row)
    cols = ['variant', 'batch', 'reso', 'img_per_s', 'ms_per_batch', 'speedup', 'ids_equal_%', 'peak_gib',
            'first_call_s']
    print_table(f'Tokenizer encode (img_to_idxBl, float32, tf32={args.tf32}) on {device.type}', rows, cols)
    write_json(args.json, {'benchmark': 'encode', 'device': str(device), 'tf32': args.tf32,
                           'vae_ckpt': args.vae_ckpt or None, 'rows': rows})
    return rows


if __name__ == '__main__':
    main()
