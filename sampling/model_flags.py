"""The model-loading flags of every script that loads a VAR (sample.py, edit.py) and the loading itself.

One place for the flags (`add_model_flags`), their checks (`check_model_flags`), the device and its process-wide
switches (`model_device`), and the loading (`load_models`, `load_models_from_args`), so that every script offers
the same models the same way. Released models come from `models.PRESETS`.
"""
import argparse
import os
from typing import Dict, List, Optional, Tuple, Union

import torch

import models
from models import model_folder
from models.vqvae import OFFICIAL_CH_MULT, downsample_factor
from utils.runtime import ConfigError, resolve_device, set_tf32

# image pixels per token side of the released tokenizer: one halving per stage of its encoder after the first
RELEASED_PATCH_SIZE = downsample_factor(OFFICIAL_CH_MULT)


def released_depths_help() -> str:
    """'16, 20, 24, 30 (256 px) or 36 (512 px)': the released depths grouped by image size, from models.PRESETS."""
    by_size: Dict[int, List[int]] = {}
    for name in models.PRESETS:
        cfg = models.preset_config(name)
        by_size.setdefault(cfg['patch_nums'][-1] * RELEASED_PATCH_SIZE, []).append(cfg['depth'])
    groups = [f'{", ".join(map(str, sorted(depths)))} ({size} px)' for size, depths in sorted(by_size.items())]
    return ' or '.join(groups)


def add_model_flags(parser: argparse.ArgumentParser, default_depth: int) -> None:
    """The 'model' flag group: which weights (--depth, --vae_ckpt, --var_ckpt, --ckpt, --cache_dir,
    --local_files_only) and how they run (--device, --fp16, --tf32)."""
    g = parser.add_argument_group('model')
    g.add_argument('--depth', type=int, default=default_depth,
                   help=f'released model: {released_depths_help()} (default: %(default)s)')
    g.add_argument('--vae_ckpt', default=None, help='local vae_ch160v4096z32.pth (default: from the Hub)')
    g.add_argument('--var_ckpt', default=None, help='local var_d{depth}.pth (default: from the Hub)')
    g.add_argument('--ckpt', default=None,
                   help="instead of the official weights: a checkpoint of this project's train.py (add --vae_ckpt if "
                        'it holds no tokenizer), a model folder (hub.py save, models.model_folder.save_pretrained) or '
                        'a Hugging Face Hub repo id of such a folder (owner/name)')
    g.add_argument('--cache_dir', default=None, help='Hugging Face cache folder for the downloads')
    g.add_argument('--local_files_only', action='store_true', help='never touch the network')
    g.add_argument('--device', default=None,
                   help="e.g. cpu, cuda:1 (default: this process's CUDA device when there is one, else the CPU)")
    g.add_argument('--fp16', type=int, choices=(0, 1, 2), default=1,
                   help='CUDA autocast: 0 fp32, 1 fp16, 2 bf16 (default: %(default)s)')
    g.add_argument('--tf32', type=int, choices=(0, 1), default=1,
                   help='CUDA: allow TF32 matmuls and convolutions (default: %(default)s)')


def check_model_flags(args: argparse.Namespace) -> None:
    """Checks of the model flags that need no download; raises ConfigError."""
    if args.ckpt and args.var_ckpt:
        raise ConfigError('--ckpt is a whole train.py checkpoint; do not combine it with --var_ckpt')
    if not args.ckpt:
        try:
            models.preset_config(args.depth)
        except ValueError as e:
            raise ConfigError(f'--depth: {e}') from e
    if args.ckpt is not None and not os.path.exists(args.ckpt) and not model_folder.is_repo_id(args.ckpt):
        raise ConfigError(f'--ckpt {args.ckpt} does not exist (and is no Hub repo id, owner/name)')
    for flag in ('vae_ckpt', 'var_ckpt'):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f'--{flag} {path} does not exist')
    try:
        torch.device(args.device or 'cpu')
    except RuntimeError as e:
        raise ConfigError(f'--device {args.device!r}: {e}') from e


def model_device(args: argparse.Namespace) -> torch.device:
    """The device of --device (None: this process's CUDA device or the CPU), with TF32 set by --tf32 on CUDA (the
    CPU's float32 matmul precision stays untouched, as the scripts always did)."""
    device = resolve_device(args.device)
    if device.type == 'cuda':
        set_tf32(bool(args.tf32))
    return device


def load_models(ckpt: Optional[str] = None, depth: int = 36, vae_ckpt: Optional[str] = None,
                var_ckpt: Optional[str] = None, device: Union[str, torch.device] = 'cpu',
                cache_dir: Optional[str] = None, local_files_only: bool = False) -> Tuple[models.VQVAE, models.VAR]:
    """(vae, var) in eval mode: `ckpt` (a checkpoint of this project's train.py, with `vae_ckpt` if it holds no
    tokenizer; a model folder; or a Hub repo id of one), or the official model of `depth` from local files
    (`vae_ckpt`, `var_ckpt`) or the Hub."""
    if ckpt and (os.path.isdir(ckpt) or model_folder.is_repo_id(ckpt)):
        vae, var = model_folder.from_pretrained(ckpt, device=device, vae_path=vae_ckpt, cache_dir=cache_dir,
                                                local_files_only=local_files_only)
    elif ckpt:
        vae, var = models.load_checkpoint_models(ckpt, device=device, vae_path=vae_ckpt)
    else:
        vae, var = models.load_pretrained(depth, vae_path=vae_ckpt, var_path=var_ckpt, device=device,
                                          cache_dir=cache_dir, local_files_only=local_files_only)
    return vae.eval(), var.eval()


def load_models_from_args(args: argparse.Namespace, device: torch.device) -> Tuple[models.VQVAE, models.VAR]:
    """`load_models` with the model flags; a file that does not load, or no network, is a ConfigError naming it."""
    try:
        return load_models(ckpt=args.ckpt, depth=args.depth, vae_ckpt=args.vae_ckpt, var_ckpt=args.var_ckpt,
                           device=device, cache_dir=args.cache_dir, local_files_only=args.local_files_only)
    except Exception as e:  # a missing, truncated or foreign file, or no network: say which, not a pickle trace
        what = args.ckpt or ' and '.join(p for p in (args.vae_ckpt, args.var_ckpt) if p) or f'the d{args.depth} model'
        raise ConfigError(f'cannot load {what}: {type(e).__name__}: {e}') from e
