"""Export a sharded (FSDP) training checkpoint to one file, in one process and without a GPU:

    python -m utils.export_ckpt local_output/ar-ckpt-last.pth --out var_d30.pth --format official
    python -m utils.export_ckpt local_output --out model.pth     # this project's format (the default)

`official`: VAR's plain state dict with the official keys, as the released `var_dXX.pth` files (read by
`models.load_pretrained(var_path=...)` / `models.loading.load_var_weights`). `project`: the layout of this project's
training checkpoints without the optimizer state and position (`models.load_checkpoint_models`, `sample.py --ckpt`,
`edit.py --ckpt` read it; auto-resume does not: resume from the sharded checkpoint itself, with FSDP or DDP).
"""
import argparse
import os
import sys
from typing import Any, Dict, Optional, Sequence

from torch.distributed.checkpoint.api import CheckpointException

from utils.ckpt import LAST_NAME, atomic_save, load_checkpoint
from utils.ckpt_sharded import SHARDS_KEY, read_full_tensors, shards_folder

FORMATS = ('project', 'official')


def exported_state(ckpt: Dict[str, Any], ckpt_path: str, fmt: str) -> Dict[str, Any]:
    """The single-file state of a sharded checkpoint (`ckpt`, loaded from `ckpt_path`) in format `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}; one of {FORMATS}')
    if SHARDS_KEY not in ckpt:
        raise ValueError(f'{ckpt_path} is already a single-file checkpoint (no sharded weights to gather)')
    var_sd = read_full_tensors(shards_folder(ckpt, ckpt_path))
    if fmt == 'official':
        return var_sd
    trainer = {k: v for k, v in ckpt['trainer'].items() if k != 'var_opt'}
    keep = ('args', 'derived', 'best', 'model_config', 'vae_config', 'class_names')
    return {'trainer': {**trainer, 'var_wo_ddp': var_sd}, **{k: ckpt[k] for k in keep if k in ckpt},
            'exported_from': {'path': os.path.abspath(ckpt_path), 'epoch': ckpt['epoch'], 'iter': ckpt['iter']}}


def export(path: str, out: str, fmt: str = 'project') -> str:
    """Gather the sharded checkpoint `path` (its file, or the run's output folder) into `out`; returns `out`."""
    ckpt_path = os.path.join(path, LAST_NAME) if os.path.isdir(path) else path
    atomic_save(exported_state(load_checkpoint(ckpt_path), ckpt_path, fmt), out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('ckpt', help=f'a sharded checkpoint file ({LAST_NAME}, ...) or the run\'s output folder')
    p.add_argument('--out', required=True, help='the file to write')
    p.add_argument('--format', default='project', choices=FORMATS, help='project (default) or official')
    args = p.parse_args(argv)
    try:
        export(args.ckpt, args.out, args.format)
    except (ValueError, OSError, RuntimeError, CheckpointException) as e:  # DCP's error is a BaseException
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {args.out} ({args.format} format)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
