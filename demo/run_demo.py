"""The offline end-to-end demo: real Fashion-MNIST -> VQVAE tokenizer -> VAR -> class-conditional samples, in numbers.

    python -m demo.run_demo                  # CPU preset: about 11 minutes on 2 cores, no network needed
    python -m demo.run_demo --preset gpu     # larger models, longer training (one GPU)

Steps: (1) Fashion-MNIST from the Debian package (installed with apt-get when missing) or torchvision's download,
written as an RGB 32x32 ImageFolder; (2) a small CNN trained on the real training set, the yardstick for class accuracy
and a Fréchet distance; (3) the tokenizer with train_vae.py; (4) VAR with train.py, the ImageNet code path; (5) a grid
of every class with several seeds (sample.py), and the quality numbers of generated samples next to those of real
validation images and of the tokenizer's reconstructions, in metrics.json. A second run reuses what is there: each
trainer resumes from its checkpoint (and does nothing once finished).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any, Dict, List

import numpy as np
import torch

from demo import classifier as clf
from demo import fashion_mnist as fm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PN = '1_2_3_4_6_8'  # 8x8 latents: a x4 tokenizer on 32x32 images
PRESETS: Dict[str, Dict[str, Any]] = {
    # 2 CPU cores, about 11 minutes: 10,000 training images (1,000 per class), one tokenizer epoch and 3 VAR epochs,
    # both in small batches (on this budget many small steps beat fewer large ones: +14 points of sample accuracy)
    'cpu': dict(
        data=dict(train_per_class=1000, val_per_class=100),
        classifier=dict(epochs=2),
        vae=dict(vae_ch=32, vae_ch_mult='1_1_2', vocab=512, cvae=16, pn=PN, bs=8, ep=1, tblr=3.2e-2, wpe=0.05,
                 l1=1.0, l2=1.0, lp=0.0, dw=0.1, disc_start=0.6, disc_ch=32, disc_layers=2, vq_reinit=80,
                 vq_reinit_until=0.6, fp16=0, workers=0),
        var=dict(depth=4, width=128, pn=PN, patch_size=4, bs=16, ep=3, tblr=1.6e-2, alng=1e-3, wpe=0.1, wp=0.2,
                 fp16=0, workers=0),
        sample=dict(cfg=3.0, top_k=10, top_p=0.9, per_class=50, grid_seeds=6, bs=100),
    ),
    # one GPU: the whole data set, a wider x4 tokenizer with LPIPS-free GAN training, a 12-block VAR, bf16
    'gpu': dict(
        data=dict(train_per_class=None, val_per_class=None),
        classifier=dict(epochs=4),
        vae=dict(vae_ch=64, vae_ch_mult='1_2_4', vocab=1024, cvae=16, pn=PN, bs=64, ep=20, tblr=4e-3, wpe=0.05,
                 l1=1.0, l2=1.0, lp=0.0, dw=0.1, disc_start=10, disc_ch=64, disc_layers=2, vq_reinit=200,
                 vq_reinit_until=0.5, fp16=2, workers=4),
        var=dict(depth=12, width=384, pn=PN, patch_size=4, bs=128, ep=30, tblr=2e-3, alng=1e-3, wpe=0.1, wp=1,
                 fp16=2, workers=4),
        sample=dict(cfg=3.0, top_k=10, top_p=0.9, per_class=100, grid_seeds=8, bs=250),
    ),
}


def log(msg: str) -> None:
    print(msg, flush=True)


@contextmanager
def phase(name: str, timings: Dict[str, float]):
    log(f'\n===== {name} =====')
    t0 = time.time()
    yield
    timings[name] = round(time.time() - t0, 1)
    log(f'===== {name}: {timings[name]:.0f}s =====')


def flags(d: Dict[str, Any]) -> List[str]:
    return [f'--{k}={v}' for k, v in d.items()]


def run_script(script: str, argv: List[str]) -> None:
    """Run one of the repository's scripts in its own process (as a user would), streaming its output."""
    cmd = [sys.executable, os.path.join(ROOT, script), *argv]
    log('$ ' + ' '.join(cmd))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), PYTHONUNBUFFERED='1')
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f'{script} failed with exit code {done.returncode}; fix the error above and re-run the demo '
                         f'(finished steps are reused)')


def first_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(len(fm.CLASSES))]))


@torch.no_grad()
def reconstruct(vae_path: str, images_NHW3: np.ndarray, bs: int = 250) -> Dict[str, Any]:
    """The tokenizer's reconstructions of uint8 images and their PSNR/SSIM (the VAR tokenisation path)."""
    import models
    from tokenizer.trainer import reconstruction_metrics
    vae = models.load_vae_checkpoint(vae_path).eval()
    recs, psnr, ssim = [], [], []
    for s in range(0, len(images_NHW3), bs):
        x = torch.from_numpy(images_NHW3[s:s + bs]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        m = reconstruction_metrics(vae, x)
        psnr.append(m['psnr_B'])
        ssim.append(m['ssim_B'])
        recs.append(m['rec_B3HW'].add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return {'images': np.concatenate(recs), 'psnr': torch.cat(psnr).mean().item(),
            'ssim': torch.cat(ssim).mean().item()}


def generate(var_ckpt: str, per_class: int, seed: int, s: Dict[str, Any]):
    """`per_class` samples of every class (uint8 (N, 32, 32, 3), labels (N,)), with sample.py's per-image seeds."""
    import models
    from sampling.draw import image_seed, sample_uint8
    from sampling.settings import SamplingSettings
    _, var = models.load_checkpoint_models(var_ckpt)
    var.eval()
    settings = SamplingSettings(cfg=s['cfg'], top_k=s['top_k'], top_p=s['top_p'], fp16=0)  # sample.py's other defaults
    items = [(c, k) for c in range(var.num_classes) for k in range(per_class)]
    imgs = [sample_uint8(var, [c for c, _ in items[i:i + s['bs']]],
                         [image_seed(seed, c, k) for c, k in items[i:i + s['bs']]], settings)
            for i in range(0, len(items), s['bs'])]
    return np.concatenate(imgs), np.array([c for c, _ in items])


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--preset', choices=sorted(PRESETS), default='cpu')
    p.add_argument('--out', default=os.path.join(ROOT, 'demo_output'), help='everything goes here')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--no_install', action='store_true', help='never run apt-get for the data')
    args = p.parse_args(argv)
    P = PRESETS[args.preset]
    out = os.path.abspath(args.out)
    paths = {'data': os.path.join(out, 'fashion_mnist'), 'classifier': os.path.join(out, 'classifier.pt'),
             'tokenizer': os.path.join(out, 'tokenizer'), 'var': os.path.join(out, 'var'),
             'grid': os.path.join(out, 'samples_grid.png'), 'metrics': os.path.join(out, 'metrics.json'),
             'timings': os.path.join(out, 'timings.jsonl')}
    os.makedirs(out, exist_ok=True)
    timings: Dict[str, float] = {}
    t_all = time.time()
    log(f'[demo] preset {args.preset}, seed {args.seed}, output in {out}; torch {torch.__version__}, '
        f'{torch.get_num_threads()} CPU threads, cuda={torch.cuda.is_available()}')

    with phase('1. data: Fashion-MNIST -> ImageFolder', timings):
        raw = fm.locate_raw_files(os.path.join(out, 'cache'), install=not args.no_install, log=log)
        counts = fm.write_image_folder(paths['data'], raw, {'train': P['data']['train_per_class'],
                                                            'val': P['data']['val_per_class']}, log=log)
        log(f'[data] {raw} -> {paths["data"]}: {counts}')
        train_x, train_y = fm.load_split(raw, 'train')
        val_x, val_y = fm.load_split(raw, 'val')
        train_rgb, val_rgb = fm.to_rgb32(train_x), fm.to_rgb32(val_x)

    with phase('2. classifier on the real training set', timings):
        model, ref = clf.load_or_train(paths['classifier'], train_rgb[..., 0], train_y, P['classifier']['epochs'],
                                       args.seed, log=log)
        _, val_logits = clf.features_logits(model, val_rgb)
        full_val_acc = float((val_logits.argmax(1) == val_y).mean() * 100)
        log(f'[classifier] accuracy on all {len(val_y)} real validation images: {full_val_acc:.2f}%')

    # mid_reso=1: the images already have the training size (no resize, no random crop); checkpoints every 100
    # iterations so that an interrupted demo resumes close to where it stopped
    vae_flags = dict(data_path=paths['data'], out_dir=paths['tokenizer'], seed=args.seed, mid_reso=1.0,
                     tb_every_iters=50, ckpt_every_iters=100, **P['vae'])
    with phase('3. tokenizer (train_vae.py)', timings):
        run_script('train_vae.py', flags(vae_flags))
    vae_ckpt = os.path.join(paths['tokenizer'], 'vae-ckpt-last.pth')

    var_flags = dict(data_path=paths['data'], vae_ckpt=vae_ckpt, local_out_dir_path=paths['var'], seed=args.seed,
                     mid_reso=1.0, tb_every_iters=50, ckpt_every_iters=100, val_every_ep=P['var']['ep'], **P['var'])
    with phase('4. VAR (train.py)', timings):
        run_script('train.py', flags(var_flags))
    var_ckpt = os.path.join(paths['var'], 'ar-ckpt-last.pth')

    S = P['sample']
    with phase('5. samples: grid (sample.py) and evaluation set', timings):
        import sample
        classes = ','.join(str(c) for _ in range(S['grid_seeds']) for c in range(len(fm.CLASSES)))
        code = sample.main([
            '--ckpt', var_ckpt, '--classes', classes, '--nrow', str(len(fm.CLASSES)), '--cfg', str(S['cfg']),
            '--top_k', str(S['top_k']), '--top_p', str(S['top_p']), '--seed', str(args.seed), '--fp16', '0',
            '--bs', str(S['bs']), '--out', paths['grid']])
        if code != 0:
            raise SystemExit(f'sample.py failed with exit code {code}; fix the error above and re-run the demo')
        gen_imgs, gen_labels = generate(var_ckpt, S['per_class'], args.seed, S)

    with phase('6. metrics', timings):
        pick = first_per_class(val_y, S['per_class'])  # as many real images per class as generated ones
        real = clf.quality(model, val_rgb[pick], val_y[pick], ref)
        rec = reconstruct(vae_ckpt, val_rgb[pick])
        rec_q = clf.quality(model, rec['images'], val_y[pick], ref)
        gen_feats_logits = clf.features_logits(model, gen_imgs)
        gen = clf.quality(model, gen_imgs, gen_labels, ref, gen_feats_logits)
        gen_pred = gen_feats_logits[1].argmax(1)
        per_class_acc = [float((gen_pred[gen_labels == c] == c).mean() * 100) for c in range(len(fm.CLASSES))]
        vae_ck = torch.load(vae_ckpt, map_location='cpu', weights_only=True)
        metrics = {
            'preset': args.preset, 'seed': args.seed, 'device': 'cuda' if torch.cuda.is_available() else 'cpu',
            'cpu_threads': torch.get_num_threads(),
            'data': {'source': raw, **counts},
            'classifier': {'val_accuracy_all_10000': full_val_acc},
            'tokenizer': {'val_psnr_db': rec['psnr'], 'val_ssim': rec['ssim'], 'n': int(len(pick)),
                          'train_vae_val': vae_ck.get('metrics', {})},
            'real_val': real, 'tokenizer_reconstructions': rec_q, 'generated': gen,
            'generated_accuracy_per_class': dict(zip((fm.class_folder(c) for c in range(10)), per_class_acc)),
            'sampling': {k: S[k] for k in ('cfg', 'top_k', 'top_p', 'per_class')},
            'seconds': timings,
        }
        del vae_ck

    timings['total'] = round(time.time() - t_all, 1)
    with open(paths['metrics'], 'w') as f:
        json.dump(metrics, f, indent=1)
    with open(paths['timings'], 'a') as f:  # every run's times (metrics.json holds the latest run's)
        f.write(json.dumps({'finished': time.strftime('%Y-%m-%d %H:%M:%S'), 'preset': args.preset, **timings}) + '\n')
    log('\n===== results =====')
    log(f"tokenizer: reconstruction PSNR {rec['psnr']:.2f} dB, SSIM {rec['ssim']:.4f} on {len(pick)} real validation "
        f"images; codebook usage per scale (val, %): {vae_ck_usage(metrics)}")
    log(f"classifier (yardstick): {full_val_acc:.2f}% on all {len(val_y)} real validation images")
    log(f"{'':28s}{'class accuracy':>16s}{'Frechet distance':>18s}")
    for name, q in (('real validation images', real), ('tokenizer reconstructions', rec_q),
                    (f"generated (cfg {S['cfg']:g})", gen)):
        log(f"{name:28s}{q['accuracy']:15.2f}%{q['frechet']:18.3f}   (n={q['n']})")
    log(f"time per step (s): {json.dumps(timings)}")
    log('\nwritten:')
    log(f"  data (ImageFolder)      {paths['data']}")
    log(f"  classifier              {paths['classifier']}")
    log(f"  tokenizer checkpoint    {vae_ckpt}  (TensorBoard logs: {paths['tokenizer']}/tb-*)")
    log(f"  VAR checkpoint          {var_ckpt}  (TensorBoard logs: {paths['var']}/tb-*)")
    log(f"  sample grid             {paths['grid']}  (columns: classes 0-9, rows: seeds)")
    log(f"  metrics                 {paths['metrics']}  (times of every run: {paths['timings']})")
    log(f"  TensorBoard:            tensorboard --logdir {out}")
    return metrics


def vae_ck_usage(metrics: Dict[str, Any]) -> str:
    usage = metrics['tokenizer']['train_vae_val'].get('usage')
    return '/'.join(f'{u:.0f}' for u in usage) if usage else 'n/a'


if __name__ == '__main__':
    main()
