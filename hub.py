"""Whole-model folders and the Hugging Face Hub: convert, check, export back, push.

    # the official release (Hub or local files) -> a folder with config.json, safetensors and a model card
    python hub.py save hf/var-d16 --depth 16 [--vae_ckpt vae_ch160v4096z32.pth --var_ckpt var_d16.pth]
    # a checkpoint of this project's train.py (DDP or sharded --fsdp 1) -> a folder (class names, training command,
    # metrics in the card)
    python hub.py save hf/my-var --ckpt local_output/ar-ckpt-best.pth [--metrics metrics.json]
    # a folder or repo id -> the official .pth files and this project's checkpoint format (bit-identical tensors)
    python hub.py export hf/my-var pth/
    python hub.py check hf/my-var                     # every key and shape, no weights read
    python hub.py push hf/my-var you/var-d16 [--private]   # needs `huggingface-cli login` or HF_TOKEN

Folders load with `models.model_folder.from_pretrained(folder_or_repo_id)`, and wherever a script takes `--ckpt`
(`sample.py`, `edit.py`, `app.py`). Nothing here unpickles anything but plain tensors and values.
"""
import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

import models
from models import model_folder
from models.loading import models_from_checkpoint, read_checkpoint
from sampling.class_names import imagenet_class_names
from sampling.cli import run_script
from utils.ckpt_sharded import SHARDS_KEY
from utils.export_ckpt import exported_state
from utils.runtime import ConfigError

# sample.py's defaults: the official FID settings
DEFAULT_SAMPLING = dict(cfg=1.5, top_k=900, top_p=0.96, more_smooth=False)


def training_command(ckpt: Dict[str, Any]) -> Optional[str]:
    """The train.py command line of a checkpoint: the flags whose values differ from the defaults."""
    saved = ckpt.get('args')
    if not isinstance(saved, dict):
        return None
    from utils.arg_util import build_parser
    parser = build_parser()
    flags = []
    for action in parser._actions:
        if not action.option_strings or action.dest not in saved or action.dest == 'help':
            continue
        value = saved[action.dest]
        if value is None or value == action.default:
            continue
        if isinstance(value, bool):
            value = int(value)
        flags.append(f'{action.option_strings[0]}={value}')
    world = (ckpt.get('derived') or {}).get('world_size', 1)
    return f'torchrun --nproc_per_node={world} train.py ' + ' '.join(flags)


def flat_metrics(source: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    """{name: number or short string} from a (nested) metrics dict, e.g. evaluate.py's --out JSON."""
    out: Dict[str, Any] = {}
    for k, v in source.items():
        if isinstance(v, dict):
            out.update(flat_metrics(v, f'{prefix}{k} '))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f'{prefix}{k}'] = v
        elif isinstance(v, str) and len(v) < 60:
            out[f'{prefix}{k}'] = v
    return out


def save(args: argparse.Namespace) -> None:
    sampling = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=bool(args.more_smooth))
    metrics: Dict[str, Any] = {}
    command = None
    if args.ckpt:
        if not os.path.isfile(args.ckpt):
            raise ConfigError(f'--ckpt {args.ckpt} does not exist')
        ckpt = read_checkpoint(args.ckpt)
        if isinstance(ckpt, dict) and SHARDS_KEY in ckpt:  # a --fsdp 1 run: gather its shards (one process, no GPU)
            ckpt = exported_state(ckpt, args.ckpt, 'project')
        vae, var = models_from_checkpoint(ckpt, args.ckpt, vae_path=args.vae_ckpt)
        names = ckpt.get('class_names') if isinstance(ckpt, dict) else None
        command = training_command(ckpt) if isinstance(ckpt, dict) else None
        if isinstance(ckpt, dict) and isinstance(ckpt.get('best'), dict):
            metrics.update(flat_metrics(ckpt['best'], 'validation (train.py) '))
        source = f'this project\'s train.py checkpoint `{os.path.basename(args.ckpt)}`'
    else:
        vae, var = models.load_pretrained(args.depth, vae_path=args.vae_ckpt, var_path=args.var_ckpt,
                                          cache_dir=args.cache_dir, local_files_only=args.local_files_only)
        names = imagenet_class_names() if var.num_classes == 1000 else None
        source = (f'the official release (https://huggingface.co/{models.HUB_REPO_ID}: {models.VAE_FILENAME}, '
                  f'{models.var_filename(args.depth)}), converted bit for bit')
    if args.metrics:
        try:
            with open(args.metrics) as f:
                metrics.update(flat_metrics(json.load(f)))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f'--metrics {args.metrics}: {e}') from e
    cfg = model_folder.folder_config(vae, var, names, sampling)
    card = model_folder.model_card(cfg, source=source, training_command=command, metrics=metrics,
                                   repo_id=args.repo_id)
    model_folder.save_pretrained(vae, var, args.folder, class_names=names, sampling=sampling, card=card)
    print(f'wrote {args.folder}: ' + ', '.join(sorted(os.listdir(args.folder))))


def run(args: argparse.Namespace) -> Optional[int]:
    try:
        if args.command == 'save':
            save(args)
        elif args.command == 'export':
            for path in model_folder.export_pth(args.source, args.out_dir, cache_dir=args.cache_dir,
                                                local_files_only=args.local_files_only):
                print(f'wrote {path}')
        elif args.command == 'check':
            folder = model_folder.resolve_folder(args.source, cache_dir=args.cache_dir,
                                                 local_files_only=args.local_files_only)
            cfg = model_folder.check_folder(folder)
            names = cfg.get('class_names') or []
            print(f'{folder}: VAR-d{cfg["depth"]}, width {cfg["embed_dim"]}, scales {cfg["patch_nums"]}, '
                  f'{cfg["num_classes"]} classes{" with names" if names else ""}; every key and shape matches')
        else:
            info = model_folder.push_to_hub(args.folder, args.repo_id, token=args.token, private=args.private,
                                            revision=args.revision, commit_message=args.message)
            print(f'pushed {args.folder} to https://huggingface.co/{args.repo_id} ({getattr(info, "oid", info)})')
    except (model_folder.FolderError, models.HubDownloadError, FileNotFoundError, ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from e
    return 0


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)

    s = sub.add_parser('save', help='official weights or a train.py checkpoint -> a model folder')
    s.add_argument('folder', help='the folder to write')
    s.add_argument('--ckpt', default=None, help="a checkpoint of this project's train.py")
    s.add_argument('--depth', type=int, default=16, help='without --ckpt: the released model (default: %(default)s)')
    s.add_argument('--vae_ckpt', default=None, help='local vae_ch160v4096z32.pth (default: from the Hub), or the '
                                                    'tokenizer of a --ckpt that holds none')
    s.add_argument('--var_ckpt', default=None, help='local var_d{depth}.pth (default: from the Hub)')
    s.add_argument('--metrics', default=None, help="a JSON of measured metrics for the card (e.g. evaluate.py's --out)")
    s.add_argument('--repo_id', default=None, help='the repo id the card shows in its examples')
    for name, value in DEFAULT_SAMPLING.items():
        s.add_argument(f'--{name}', type=int if isinstance(value, bool) else type(value),
                       default=int(value) if isinstance(value, bool) else value,
                       help='recommended sampling setting, in config.json and the card (default: %(default)s)')

    e = sub.add_parser('export', help='a folder or repo id -> official .pth files and a project checkpoint')
    e.add_argument('source', help='a model folder or a Hub repo id')
    e.add_argument('out_dir')

    c = sub.add_parser('check', help='check a folder or repo id: config, every key and shape')
    c.add_argument('source')

    u = sub.add_parser('push', help='upload a model folder to a Hub model repo (created if needed)')
    u.add_argument('folder')
    u.add_argument('repo_id', help='owner/name')
    u.add_argument('--private', action='store_true', help='create the repo private')
    u.add_argument('--revision', default=None, help='branch to commit to (default: main)')
    u.add_argument('--message', default=None, help='commit message')
    u.add_argument('--token', default=None, help='Hub token (default: the saved login or HF_TOKEN)')
    for q in (s, e, c):
        q.add_argument('--cache_dir', default=None, help='Hugging Face cache folder')
        q.add_argument('--local_files_only', action='store_true', help='never touch the network')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    return run_script(get_parser(), run, argv)


if __name__ == '__main__':
    sys.exit(main())
