# Implements zero-shot editing with VAR (arXiv 2404.02905, section 5): in-painting, out-painting, class-conditional
# editing of one image, as a command line over `sampling/editing.py`.
"""Edit an image with a pretrained VAR, without any fine-tuning.

    # regenerate a box (relative y0,x0,y1,x1 of the centre-cropped square), unconditionally, 4 variations
    python edit.py --image photo.jpg --mode inpaint --box 0.1,0.1,0.8,0.8 -n 4 --out_dir edits
    # keep the region painted white in mask.png and regenerate everything around it
    python edit.py --image photo.jpg --mode outpaint --mask mask.png --out_dir edits
    # regenerate the box as ImageNet class 291 (lion)
    python edit.py --image cat.jpg --mode class-edit --class_label 291 --box 0.1,0.1,0.9,0.9 --out_dir edits

Writes OUT_DIR/PREFIX_0.png ... PREFIX_{n-1}.png and OUT_DIR/PREFIX_strip.png (input | mask | edits; the mask panel
is white where VAR generates), with PREFIX = IMAGE-STEM_MODE unless --prefix is given.
Models: `--depth 36` (default; 512 px, the paper's choice for editing) or 16/20/24/30 (256 px) downloads the released
weights from the Hub; `--vae_ckpt/--var_ckpt` use local copies; `--ckpt` loads a checkpoint of this project's
train.py, a model folder (`hub.py save`) or a Hub repo id of one. The image is resized (shorter side) and
centre-cropped to the model's resolution.
"""
import argparse
import os
import sys
from typing import List, Optional

from sampling import editing
from sampling.cli import run_script
from sampling.model_flags import add_model_flags, check_model_flags, load_models_from_args, model_device
from sampling.settings import SamplingSettings
from utils.runtime import ConfigError


def parse_box(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.replace(' ', '').split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected four numbers y0,x0,y1,x1, got {text!r}') from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f'expected four numbers y0,x0,y1,x1, got {text!r}')
    return values


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--image', required=True, help='input image file (any format PIL reads)')
    p.add_argument('--mode', choices=editing.MODES, default='inpaint',
                   help='inpaint: regenerate the region; outpaint: keep it, regenerate around it; '
                        'class-edit: regenerate it conditioned on --class_label (default: %(default)s)')
    region = p.add_mutually_exclusive_group()
    region.add_argument('--box', type=parse_box, default=None,
                        help='y0,x0,y1,x1 in [0,1] of the centre-cropped square (default: 0.1,0.1,0.8,0.8)')
    region.add_argument('--mask', default=None, help='mask image, white = the region; the size of the input image '
                                                     'or of the model resolution')
    p.add_argument('--mask_threshold', type=float, default=editing.DEFAULT_MASK_THRESHOLD,
                   help='a token is in a --mask region when this fraction of its pixels are (default: %(default)s)')
    p.add_argument('--class_label', type=int, default=None,
                   help='class to condition on (required for class-edit; default: unconditional)')
    p.add_argument('--out_dir', default='edits', help='folder for the PNGs, created if needed (default: %(default)s)')
    p.add_argument('--prefix', default=None, help='file name prefix (default: IMAGE-STEM_MODE)')
    add_model_flags(p, default_depth=36)
    g = p.add_argument_group('sampling (defaults: the official editing notebook)')
    g.add_argument('-n', '--num_samples', type=int, default=1, help='number of variations (default: %(default)s)')
    g.add_argument('--seed', type=int, default=editing.EDIT_SETTINGS.seed,
                   help='variation i uses seed + i (default: %(default)s)')
    g.add_argument('--cfg', type=float, default=editing.EDIT_SETTINGS.cfg,
                   help='classifier-free guidance, >= 0; no effect without a class (default: %(default)s)')
    g.add_argument('--top_k', type=int, default=editing.EDIT_SETTINGS.top_k,
                   help='keep the k most likely tokens, 0 = all (default: %(default)s)')
    g.add_argument('--top_p', type=float, default=editing.EDIT_SETTINGS.top_p,
                   help='nucleus sampling mass in [0, 1], 0 = off (default: %(default)s)')
    g.add_argument('--more_smooth', type=int, choices=(0, 1), default=int(editing.EDIT_SETTINGS.more_smooth),
                   help='Gumbel soft codes (1, as the notebook) or sampled ids (0) (default: %(default)s)')
    return p


def edit_settings(args: argparse.Namespace) -> SamplingSettings:
    """How the edits are drawn, from the flags; a value out of range is a ConfigError."""
    try:
        return SamplingSettings(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=bool(args.more_smooth),
                                seed=args.seed, fp16=args.fp16)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_args(args: argparse.Namespace) -> None:
    """Checks that need no model; they fail before any download. Raises ConfigError."""
    check_model_flags(args)
    for flag in ('image', 'mask'):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f'--{flag} {path}: no such file')
    if args.mode == 'class-edit' and args.class_label is None:
        raise ConfigError('--mode class-edit needs --class_label (the target class)')
    if args.num_samples < 1:
        raise ConfigError(f'--num_samples must be at least 1, got {args.num_samples}')
    if not 0 < args.mask_threshold <= 1:
        raise ConfigError(f'--mask_threshold must lie in (0, 1], got {args.mask_threshold:g}')
    edit_settings(args)  # fails before any download
    try:
        editing.read_image(args.image, what='--image')
        if args.mask is not None:
            editing.read_image(args.mask, what='--mask', mode='L')
        if args.box is not None:
            editing.box_region((1,), args.box)  # validates the numbers only
    except ValueError as e:
        raise ConfigError(str(e)) from e


def run_edit(args: argparse.Namespace) -> List[str]:
    """Run one edit; returns the written paths (the variations, then the strip). Raises ConfigError."""
    check_args(args)
    device = model_device(args)
    vae, var = load_models_from_args(args, device)
    try:
        result = editing.zero_shot_edit(
            vae, var, args.image, mode=args.mode, box=args.box or editing.DEFAULT_BOX, mask=args.mask,
            class_label=args.class_label, mask_threshold=args.mask_threshold, num_samples=args.num_samples,
            settings=edit_settings(args))
    except ValueError as e:  # the library's messages name the argument (mask, box, class_label, region)
        raise ConfigError(str(e)) from e

    os.makedirs(args.out_dir, exist_ok=True)
    prefix = args.prefix or f'{os.path.splitext(os.path.basename(args.image))[0]}_{args.mode}'
    images = [editing.to_pil(img_3HW) for img_3HW in result.images_n3HW] + [result.strip()]
    paths = [os.path.join(args.out_dir, f'{prefix}_{i}.png') for i in range(len(images) - 1)]
    paths.append(os.path.join(args.out_dir, f'{prefix}_strip.png'))
    for img, path in zip(images, paths):
        if os.path.exists(path):
            print(f'replacing {path}')
        img.save(path)
    kept = int(result.keep_mask_hw.gt(0.5).sum())
    pn = var.patch_nums[-1]
    label = 'unconditional' if result.label == var.num_classes else f'class {result.label}'
    print(f'{args.mode} ({label}) at {vae.image_size} px: kept {kept} of {pn * pn} tokens of the last scale; '
          f'wrote {len(paths) - 1} variation(s) and the strip:')
    for path in paths:
        print(f'  {path}')
    return paths


def _run(args: argparse.Namespace) -> int:
    run_edit(args)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    return run_script(get_parser(), _run, argv)


if __name__ == '__main__':
    sys.exit(main())
