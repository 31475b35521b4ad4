# Implements the sampling protocol of VAR (arXiv 2404.02905), section 5: class-conditional samples with CFG, top-k and
# top-p, and the 50,000-image ImageNet export (50 per class, PNG + OpenAI .npz) behind its FID/IS numbers.
"""Sample images from VAR: a grid image, or the distributed FID export.

Grid (one image per listed class; repeat a class for more):
    python sample.py --depth 16 --classes 980,980,437,437,22,22,562,562 --cfg 4 --top_k 900 --top_p 0.95 --seed 0 \
        --out grid.png
FID export (official settings by default: cfg 1.5, top-k 900, top-p 0.96, more_smooth off, 50 images per class):
    torchrun --nproc_per_node=8 sample.py --mode fid --depth 16 --out samples/d16   # -> samples/d16/*.png + d16.npz

Models: `--depth D` downloads the released `var_dD.pth` and the VAE from the Hub (FoundationVision/var);
`--vae_ckpt/--var_ckpt` use local copies of those files; `--ckpt` loads a checkpoint written by this project's train.py,
a model folder (`hub.py save`) or a Hub repo id of one.

Reproducibility: image k of class c is drawn with its own generator seeded from (seed, c, k) (`image_seed`), so the
output depends neither on the number of processes nor on which images share a batch, apart from floating-point
round-off between batch sizes or devices. The FID export hands out fixed chunks of `--bs` images, so the same `--bs`
on the same kind of device gives byte-identical files for any number of processes. It writes each PNG atomically,
skips the images already on disk, and keeps a `manifest.json` of its settings: a restart completes a killed run, and
a run with other settings refuses the folder.
"""
import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torchvision.utils import make_grid

import dist
import models
from sampling import fid_export
from sampling.cli import run_script
from sampling.draw import progress_bar, sample_items
from sampling.image_sets import image_format, is_image_path, save_image
from sampling.model_flags import add_model_flags, check_model_flags, load_models_from_args, model_device
from sampling.settings import FidExportJob, Rejection, SamplingSettings
from sampling.rejection import load_classifier
from utils.runtime import ConfigError


def check_classes(classes: Sequence[int], num_classes: int) -> None:
    bad = sorted({c for c in classes if not 0 <= c < num_classes})
    if bad:
        raise ConfigError(f'class labels {bad} are out of range: this model has classes 0..{num_classes - 1}')


# --------------------------------------------------------------------------------------------------------------- grid
def run_grid(args: argparse.Namespace, var: models.VAR, classifier: Optional[torch.nn.Module]) -> None:
    """One image per listed class (the k-th repeat of a class is its image k), tiled --nrow per row into --out, in the
    format its extension names (PNG without one)."""
    seen: Dict[int, int] = {}
    items = []
    for c in args.classes:
        items.append((c, seen.get(c, 0)))
        seen[c] = seen.get(c, 0) + 1
    batches, settings = [], sampling_settings(args)
    with progress_bar(len(items)) as bar:
        for s in range(0, len(items), args.bs):
            batches.append(sample_items(var, items[s:s + args.bs], settings, classifier, args.rej_candidates))
            bar.update(len(batches[-1]))
    imgs = np.concatenate(batches)
    grid_3HW = make_grid(torch.from_numpy(imgs).permute(0, 3, 1, 2), nrow=args.nrow, padding=2, pad_value=255)
    if os.path.exists(args.out):
        print(f'replacing {args.out}')
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_image(grid_3HW.permute(1, 2, 0).numpy(), args.out, image_format(args.out))
    print(f'wrote {args.out} ({len(items)} images)')


# ---------------------------------------------------------------------------------------------------------------- main
def parse_classes(text: str) -> List[int]:
    try:
        return [int(c) for c in text.split(',') if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'--classes takes comma-separated integers, got {text!r}')


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--mode', choices=('grid', 'fid'), default='grid',
                   help='grid: one image per --classes entry; fid: the per-class export (default: %(default)s)')
    p.add_argument('--out', required=True, help='grid: the image file (.png; .jpg, .webp ... save in that format); '
                                                'fid: the folder for the PNGs')
    add_model_flags(p, default_depth=16)
    g = p.add_argument_group('sampling (defaults: the official FID settings)')
    g.add_argument('--classes', type=parse_classes, default=None, help='e.g. 980,437,22,562 (fid default: all)')
    g.add_argument('--cfg', type=float, default=1.5, help='classifier-free guidance, >= 0 (default: %(default)s)')
    g.add_argument('--top_k', type=int, default=900,
                   help='keep the k most likely tokens, 0 = all (default: %(default)s)')
    g.add_argument('--top_p', type=float, default=0.96,
                   help='nucleus sampling mass in [0, 1], 0 = off (default: %(default)s)')
    g.add_argument('--more_smooth', type=int, choices=(0, 1), default=0,
                   help='Gumbel soft codes (demos only) (default: %(default)s)')
    g.add_argument('--seed', type=int, default=0, help="the base of every image's own seed (default: %(default)s)")
    g.add_argument('--per_class', type=int, default=50, help='fid: images per class (default: %(default)s)')
    g.add_argument('--bs', type=int, default=25, help='images per forward pass and process (default: %(default)s)')
    g.add_argument('--nrow', type=int, default=8, help='grid: images per row (default: %(default)s)')
    g.add_argument('--npz', default=None, help='fid: the .npz to write (default: OUT.npz beside the folder)')
    g.add_argument('--fast', type=int, choices=(0, 1, 2, 3), default=0,
                   help='CUDA: 1 = torch.compile + per-scale CUDA graphs + partial-sort top-p (docs/speed.md; the '
                        'first batch compiles); 2 = also the bf16 residual stream and decoder (models/lowp.py: within '
                        'bf16 tolerance of 0 and 1, not equal); 3 = 2 with the whole sampling loop as one CUDA graph '
                        '(default: %(default)s)')
    g = p.add_argument_group('classifier rejection sampling (off by default)')
    g.add_argument('--classifier_ckpt', default=None, help='torchvision ImageNet classifier state dict (.pth)')
    g.add_argument('--classifier_arch', default='resnet50',
                   help='torchvision model name of that state dict (default: %(default)s)')
    g.add_argument('--rej_candidates', type=int, default=4, help='images drawn per kept image (default: %(default)s)')
    return p


def check_args(args: argparse.Namespace) -> None:
    """Checks that need no model; they fail before any download. Raises ConfigError."""
    check_model_flags(args)
    if args.classifier_ckpt is not None and not os.path.isfile(args.classifier_ckpt):
        raise ConfigError(f'--classifier_ckpt {args.classifier_ckpt} does not exist')
    if args.mode == 'grid' and not args.classes:
        raise ConfigError('grid mode needs --classes, e.g. --classes 980,437,22,562')
    if args.classes is not None and len(set(args.classes)) != len(args.classes) and args.mode == 'fid':
        raise ConfigError('--classes lists a class twice; in fid mode use --per_class for more images')
    if min(args.bs, args.per_class, args.nrow, args.rej_candidates) < 1:
        raise ConfigError('--bs, --per_class, --nrow and --rej_candidates must be positive')
    sampling_settings(args)
    check_out(args)


def sampling_settings(args: argparse.Namespace) -> SamplingSettings:
    """The sampling flags as one checked value (ConfigError naming the flag that is out of range)."""
    try:
        return SamplingSettings(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=bool(args.more_smooth),
                                seed=args.seed, fp16=args.fp16, fast=args.fast)
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith('--') else f'--{e}') from None


def fid_export_job(args: argparse.Namespace) -> FidExportJob:
    """The fid mode's flags as the export's job."""
    rejection = None if args.classifier_ckpt is None else \
        Rejection(arch=args.classifier_arch, ckpt=args.classifier_ckpt, candidates=args.rej_candidates)
    return FidExportJob(out=args.out, npz=args.npz or args.out.rstrip('/\\') + '.npz', per_class=args.per_class,
                        bs=args.bs, sampling=sampling_settings(args),
                        model=fid_export.model_identity(args.ckpt, args.vae_ckpt, args.var_ckpt, args.depth),
                        classes=None if args.classes is None else tuple(args.classes), rejection=rejection,
                        tf32=bool(args.tf32))


def check_out(args: argparse.Namespace) -> None:
    """grid: --out must end in an image extension PIL writes (or none: PNG); fid: it names a folder, not a file."""
    if args.mode == 'grid':
        try:
            image_format(args.out)
        except ValueError as e:
            raise ConfigError(f'--out {args.out}: {e}') from e
        return
    folder = args.out.rstrip('/\\')
    if (is_image_path(folder) or folder.lower().endswith('.npz')) and not os.path.isdir(folder):
        stem = os.path.splitext(folder)[0]
        raise ConfigError(f'--out {args.out}: in fid mode --out names the folder for the PNGs (OUT.npz goes '
                          f'beside it), not an image or .npz file; use e.g. --out {stem}')


def run(args: argparse.Namespace) -> int:
    check_args(args)
    # ranks meet at the end; --fast compiles on each rank first. NCCL cannot reduce CPU tensors: gloo on the CPU
    dist.initialize(device=args.device, timeout_minutes=180)
    try:
        device = model_device(args)
        _, var = load_models_from_args(args, device)
        if args.classes is not None:
            check_classes(args.classes, var.num_classes)
        classifier = None
        if args.classifier_ckpt is not None:
            try:
                classifier = load_classifier(args.classifier_arch, args.classifier_ckpt, device)
            except (ValueError, RuntimeError, OSError) as e:
                raise ConfigError(str(e)) from e
        if args.mode == 'grid':
            if dist.is_master():
                run_grid(args, var, classifier)
        else:
            fid_export.export(fid_export_job(args), var, classifier, device)
        return 0
    finally:
        dist.finalize()


def main(argv: Optional[List[str]] = None) -> int:
    return run_script(get_parser(), run, argv)


if __name__ == '__main__':
    sys.exit(main())
