"""Training-step throughput per GPU and peak memory: the fast path against the reference path, same run.

reference = the official-equivalent step: dense additive block-causal mask through SDPA, eager (no compile),
            fused AdamW (official default), autocast + GradScaler for fp16, clipping at 2.0.
fast      = FlexAttention block mask, torch.compile of the transformer, fused AdamW; same numerics otherwise; the
            tokenizer encode compiled as train.py --vfast=3 does (--fast_encode 0: eager, as the reference; 2: a
            compiled bf16 copy of the encoder, as train.py --vbf16=1 --vfast=3, whose ids may differ near ties:
            bench_encode reports the share).
"with encode" includes the frozen VQVAE tokenisation (fp32, as official) of 256 px images; "without" reuses
precomputed tokens (what a pre-tokenised dataset gives). Each row also gives ms per image, the achieved TFLOP/s of the
model FLOPs (benchmarks.analytic.flops.training_flops: forward, backward and the encode) and their % of the dense bf16
peak.

    python -m benchmarks.timings.bench_train --depths 16,24 --dtypes bf16,fp16 --batch 64
"""
import argparse
import gc
import time

import torch
import torch.nn.functional as F

from benchmarks.timings.common import DTYPES, add_ratios, peak_gib, print_table, time_cuda, write_json
from benchmarks.analytic.flops import device_peak_tflops, training_flops
from models import PRESETS, build_vae_var
from models.basic_var import flex_block_mask
from models.lowp import EncoderCopy
from utils.runtime import set_tf32



def make_step(vae, var, model, opt, scaler, dtype, B, with_encode, encode=None):
    img = torch.rand(B, 3, 256, 256, device='cuda') * 2 - 1
    label = torch.randint(0, 1000, (B,), device='cuda')
    with torch.no_grad():
        idx_Bl = vae.img_to_idxBl(img)
        fixed = (torch.cat(idx_Bl, 1), vae.quantize.idxBl_to_var_input(idx_Bl))
    params = [p for p in var.parameters() if p.requires_grad]

    def step():
        if with_encode:
            with torch.no_grad():
                ms_idx = (encode or vae.img_to_idxBl)(img)
                gt_BL, x_BLCv = torch.cat(ms_idx, 1), vae.quantize.idxBl_to_var_input(ms_idx)
        else:
            gt_BL, x_BLCv = fixed
        with torch.autocast('cuda', dtype=dtype):
            logits = model(label, x_BLCv)
            loss = F.cross_entropy(logits.view(-1, var.V), gt_BL.view(-1), reduction='none').view(B, -1)
            loss = loss.mul(1 / var.L).sum(-1).mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_one(depth, dtype, B, repeats, fast_encode=1, peak_tflops=0.0):
    rows = []
    flops_per_img = None  # {with_encode: model FLOPs per image}, counted once per configuration
    for path in ('reference', 'fast'):
        torch.manual_seed(0)
        vae, var = build_vae_var(device='cuda', **PRESETS[f'd{depth}'], attn_impl='flex' if path == 'fast' else 'sdpa')
        if flops_per_img is None:
            flops_per_img = {enc: training_flops(vae, var, enc)['total'] for enc in (True, False)}
        var.train()
        opt = torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
        scaler = None
        if dtype == torch.float16:
            scaler = torch.amp.GradScaler('cuda', init_scale=2.0 ** 11, growth_interval=1000)
        model, encode = var, None
        if path == 'fast':
            flex_block_mask(var.patch_nums, var.L, var.lvl_1L.device)  # built eagerly, outside the compiled region
            model = torch.compile(var)
            if fast_encode == 1:  # as train.py --vfast: img_to_idxBl through torch.compile (float32, as official)
                encode = torch.compile(vae.img_to_idxBl)
            elif fast_encode == 2:  # as train.py --vbf16 --vfast: the bf16 encoder copy, compiled
                encode = torch.compile(EncoderCopy(vae, torch.bfloat16).img_to_idxBl)
        for with_encode in (True, False):
            row = dict(model=f'd{depth}', batch=B, dtype=str(dtype).split('.')[-1], path=path,
                       encode='with' if with_encode else 'without')
            try:
                step = make_step(vae, var, model, opt, scaler, dtype, B, with_encode, encode)
                t0 = time.time()
                step()
                first = time.time() - t0
                mem = peak_gib(step)
                sec = time_cuda(step, warmup=2, repeats=repeats)
                flops = flops_per_img[with_encode] * B
                row.update(img_per_s=B / sec, ms_per_img=1000 * sec / B, sec_per_step=sec, peak_gib=mem,
                           first_step_s=first, tflops=flops / sec / 1e12,
                           pct_peak=100 * flops / sec / 1e12 / peak_tflops if peak_tflops else None)
            except torch.cuda.OutOfMemoryError:
                row.update(note='out of memory')  # a row, not a crash: try a smaller --batch
                opt.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
            rows.append(row)
        del vae, var, model, opt
        torch._dynamo.reset()  # compiled code holds references to this model's parameters
        gc.collect()
        torch.cuda.empty_cache()
    for r in rows[2:]:
        add_ratios(r, next(x for x in rows[:2] if x['encode'] == r['encode']))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--depths', default='16')
    p.add_argument('--dtypes', default='bf16')
    p.add_argument('--batch', type=int, default=64, help='images per GPU')
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--fast_encode', type=int, choices=(0, 1, 2), default=1,
                   help='fast path: 1 compiles the tokenizer encode (train.py --vfast=3), 2 compiles a bf16 copy of '
                        'it (--vbf16=1 --vfast=3), 0 leaves it eager (default: %(default)s)')
    p.add_argument('--peak_tflops', type=float, default=0.0,
                   help="the device's dense bf16 peak for the %% column "
                        "(default: from benchmarks.analytic.flops by GPU name)")
    p.add_argument('--json', default='bench_train.json')
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit('bench_train needs a CUDA GPU')
    set_tf32(True)  # official tf32=True
    peak = args.peak_tflops or device_peak_tflops(torch.cuda.get_device_name())
    cols = ['model', 'batch', 'dtype', 'path', 'encode', 'img_per_s', 'ms_per_img', 'peak_gib', 'tflops', 'pct_peak',
            'speedup', 'mem_ratio', 'first_step_s', 'note']
    rows = []
    for d in args.depths.split(','):
        for t in args.dtypes.split(','):
            rows += bench_one(int(d), DTYPES[t], args.batch, args.repeats, args.fast_encode, peak)
            print_table('VAR training step per GPU (256 px)', rows[-4:], cols)
            write_json(args.json, {'benchmark': 'train', 'peak_tflops': peak, 'rows': rows})  # after every config
    print_table('VAR training step per GPU (256 px), all configurations', rows, cols)


if __name__ == '__main__':
    main()
