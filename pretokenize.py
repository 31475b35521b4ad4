# Tokenises an image set once with VAR's multi-scale VQVAE (arXiv 2404.02905) for `train.py --pretok`.
"""Write a pre-tokenised dataset (format: utils/pretok.py), in one process or under torchrun.

    python pretokenize.py --data_path=/path/to/imagenet --out=/path/to/imagenet_tokens --hflip=1
    torchrun --nproc_per_node=8 pretokenize.py --data_path=... --out=... --hflip=1 [--vae_ckpt=...] [--pn=256]
    python train.py --depth=16 --bs=768 --ep=200 --fp16=1 --alng=1e-3 --wpe=0.1 --pretok=/path/to/imagenet_tokens

Each image is encoded once, in float32 outside autocast like train.py's on-the-fly encode (with TF32 allowed on GPUs
unless --tf32=0, as train.py's default), at a fixed crop: flip first (variant 1, training split only), resize the
shorter edge to round(mid_reso * reso) with LANCZOS, centre crop. On the CPU the ids equal train.py's for the same
crop (tested); on a GPU the convolution algorithms chosen for another batch size may differ in the last bits, which
can flip an id at a near-tie. Training then skips the tokenizer
encoder and image decoding, but sees the same crop of an image every epoch (the official recipe draws a new random
crop each time), which is why this is an option and never the default.

Work is split into chunks of --chunk images, dealt round-robin to the processes; every finished chunk is written
atomically under OUT/parts/, so re-running the same command after a crash or kill only encodes what is missing.
Unreadable images are skipped with a warning naming the file (or the shard and row) and listed in meta.json.
`--data_path` takes class folders or parquet shards, as train.py (docs/data.md).
"""
import argparse
import json
import os
import shutil
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF
from tqdm import tqdm

import dist
import models
from models.atomic_files import atomic_path
from models.loading import official_vae_path
from sampling.cli import run_script
from utils import pretok
from utils.arg_util import bool_flag, check_patch_size, parse_patch_nums, str2bool
from utils.ckpt import atomic_write
from utils.data import SkipUnreadable, ValTransform, build_dataset
from utils.runtime import resolve_device, set_tf32, user_errors

SPLITS = ('train', 'val')


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Tokenise an image set once for train.py --pretok.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument('--data_path', required=True,
                   help='folder with train/ and val/, one sub-folder per class, or parquet shards (docs/data.md)')
    p.add_argument('--out', required=True, help='output folder (the value of train.py --pretok)')
    p.add_argument('--vae_ckpt', default='',
                   help='local VQVAE checkpoint (as train.py --vae_ckpt); empty: vae_ch160v4096z32.pth in the working '
                        'directory, else from the Hub')
    p.add_argument('--pn', '--patch_nums', dest='pn', default='1_2_3_4_5_6_8_10_13_16',
                   help="scales: a preset '256', '512', '1024' or sides joined by '_' (as train.py --pn)")
    p.add_argument('--patch_size', type=int, default=16, help='image pixels per token side (as train.py)')
    p.add_argument('--mid_reso', type=float, default=1.125, help='resize the shorter edge to round(mid_reso*reso)')
    bool_flag(p, ['--hflip'], False, 'also store the horizontally flipped variant (for train.py --hflip=1)')
    p.add_argument('--bs', type=int, default=64, help='images per encoder batch and process')
    p.add_argument('--workers', type=int, default=4, help='image-decoding worker processes per process')
    p.add_argument('--chunk', type=int, default=1024, help='images per resumable chunk')
    p.add_argument('--tf32', type=str2bool, default=True,
                   help="allow TF32 in the encoder's float32 convolutions and matmuls (as train.py's default --tf32=1)")
    p.add_argument('--device', default='', help="'' picks cuda:LOCAL_RANK when available, else cpu")
    return p


class FixedCrop(Dataset):
    """(images (n_variants, 3, reso, reso) in [-1, 1], class id, readable) for the images of a set of
    utils.data.build_dataset (class folders or parquet shards): the official validation crop, of the flipped image
    too with `hflip` (flipped before the resize, as TrainTransform)."""

    def __init__(self, images: SkipUnreadable, final_reso: int, mid_px: int, hflip: bool):
        self.images, self.final_reso, self.hflip = images, final_reso, hflip
        self.crop = ValTransform(final_reso, mid_px)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        encoded, target = self.images.encoded_sample(index)
        n_var = 2 if self.hflip else 1
        try:
            img = self.images.decode(encoded)
        except Exception as e:  # PIL raises many types for truncated or non-image data
            warnings.warn(f'skipping unreadable image {self.images.image_name(index)}: {type(e).__name__}: {e}',
                          stacklevel=2)
            return torch.zeros(n_var, 3, self.final_reso, self.final_reso), target, False
        variants = [self.crop(img)] + ([self.crop(TF.hflip(img))] if self.hflip else [])
        return torch.stack(variants), target, True


def chunk_batches(chunks: Sequence[int], n: int, chunk: int, bs: int) -> List[List[int]]:
    """Batches of indices that never straddle two chunks, in chunk order."""
    batches = []
    for k in chunks:
        lo, hi = k * chunk, min(n, (k + 1) * chunk)
        batches += [list(range(i, min(hi, i + bs))) for i in range(lo, hi, bs)]
    return batches


def part_path(out: str, split: str, k: int) -> str:
    return os.path.join(out, 'parts', f'{split}_{k:06d}.npz')


@torch.no_grad()
def encode_split(args, vae, device, split: str, images: SkipUnreadable, settings: Dict, n_variants: int) -> None:
    """Encode the chunks of `split` that this rank owns and that are not on disk yet."""
    n, chunk = len(images), args.chunk
    rank, world = dist.get_rank(), dist.get_world_size()
    n_chunks = (n + chunk - 1) // chunk
    mine = [k for k in range(n_chunks) if k % world == rank]
    todo = [k for k in mine if not os.path.isfile(part_path(args.out, split, k))]
    done_all = dist.allgather_object(len(mine) - len(todo))
    if dist.is_master():
        print(f'[pretokenize] {split}: {n} images in {n_chunks} chunks; {sum(done_all)} already on disk', flush=True)
    if not todo:
        return
    V = vae.vocab_size
    dtype = pretok.token_dtype(V)
    data = FixedCrop(images, settings['final_reso'], settings['mid_px'], hflip=n_variants == 2)
    batches = chunk_batches(todo, n, chunk, args.bs)
    loader = DataLoader(data, batch_sampler=batches, num_workers=args.workers,
                        pin_memory=device.type == 'cuda', persistent_workers=False)
    n_mine = sum(len(b) for b in batches)
    bar = tqdm(total=n_mine * (world if rank == 0 else 1), unit='img', desc=f'tokenising {split}',
               disable=not dist.is_master(), dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    pending: Dict[str, list] = {'tokens': [], 'labels': [], 'index': [], 'skipped': []}
    for idx, (img_BV3HW, label_B, ok_B) in zip(batches, loader):  # the loader keeps the batch-sampler order
        k = idx[0] // chunk
        B, n_var = img_BV3HW.shape[:2]
        img = img_BV3HW.to(device, non_blocking=True).flatten(0, 1)
        ids_BVL = torch.cat(vae.img_to_idxBl(img), dim=1).view(B, n_var, -1).cpu().numpy().astype(dtype)
        ok = ok_B.numpy().astype(bool)
        pending['tokens'].append(ids_BVL[ok])
        pending['labels'].append(label_B.numpy()[ok].astype(np.int64))
        pending['index'].append(np.asarray(idx, dtype=np.int64)[ok])
        pending['skipped'] += [images.image_name(i) for i, good in zip(idx, ok) if not good]
        bar.update(B * (world if rank == 0 else 1))
        if idx[-1] + 1 == min(n, (k + 1) * chunk):  # the chunk is complete: write it
            arrays = dict(tokens=np.concatenate(pending['tokens']), labels=np.concatenate(pending['labels']),
                          index=np.concatenate(pending['index']), skipped=np.asarray(pending['skipped'], dtype=str))
            atomic_write(part_path(args.out, split, k), lambda f: np.savez(f, **arrays))
            pending = {key: [] for key in pending}
    bar.close()


def merge_split(out: str, split: str, images: SkipUnreadable, chunk: int, n_variants: int, L: int,
                dtype: np.dtype) -> Dict:
    """Copy the parts of a split, in order, into the final arrays (through a memory map: the whole token array of
    ImageNet is never in memory at once); returns the split's meta entry."""
    n_chunks = (len(images) + chunk - 1) // chunk
    parts = [part_path(out, split, k) for k in range(n_chunks)]
    missing = [p for p in parts if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f'{len(missing)} chunk(s) of {split} are missing, e.g. {missing[0]}: re-run the '
                                f'command (with several nodes, --out must be one folder that every node can write)')
    labels, index, skipped = [], [], []
    for p in parts:
        with np.load(p) as z:
            labels.append(z['labels'])
            index.append(z['index'])
            skipped += z['skipped'].tolist()
    labels_N, index_N = np.concatenate(labels), np.concatenate(index)
    paths = pretok.split_paths(out, split)
    with atomic_path(paths['tokens']) as tmp:
        tokens_NVL = np.lib.format.open_memmap(tmp, mode='w+', dtype=dtype, shape=(len(index_N), n_variants, L))
        row = 0
        for p in parts:
            with np.load(p) as z:
                t = z['tokens']
                tokens_NVL[row:row + len(t)] = t
                row += len(t)
        tokens_NVL.flush()
        del tokens_NVL
    atomic_write(paths['labels'], lambda f: np.save(f, labels_N))
    rel = images.relative_names(index_N.tolist())
    atomic_write(paths['files'], lambda f: f.write(''.join(r + '\n' for r in rel)), mode='w')
    return {'n': int(len(index_N)), 'n_variants': n_variants, 'skipped': skipped}


def check_parts_settings(parts: str, settings: Dict) -> str:
    """'' when parts/settings.json exists and equals `settings`, else what is wrong (every rank asks)."""
    cfg_path = os.path.join(parts, 'settings.json')
    if not os.path.isfile(cfg_path):
        return (f'{cfg_path} is not visible to this process: with several nodes, --out must be one folder that '
                f'every node can read and write')
    with open(cfg_path) as f:
        old = json.load(f)
    if old != settings:
        diff = sorted(k for k in set(settings) | set(old) if old.get(k) != settings.get(k))
        return (f'{parts} holds an unfinished token set made with other settings ({", ".join(diff)}): re-run with '
                f'the same flags, or remove {parts}')
    return ''


def run(args) -> int:
    patch_nums = parse_patch_nums(args.pn)
    final_reso = patch_nums[-1] * args.patch_size
    device = resolve_device(args.device)
    set_tf32(args.tf32)
    if min(args.bs, args.chunk) < 1:
        raise ValueError('--bs and --chunk must be positive')

    vae_path = official_vae_path(args.vae_ckpt)
    vae = models.load_vae_checkpoint(vae_path, device=device, patch_nums=patch_nums)
    check_patch_size(args.patch_size, vae.downsample, vae_path)
    _, train_set, val_set = build_dataset(args.data_path, final_reso, False, args.mid_reso)
    sets = {'train': train_set, 'val': val_set}
    n_variants = {'train': 2 if args.hflip else 1, 'val': 1}  # validation reads the unflipped crop only

    settings = {'format': pretok.FORMAT, 'patch_nums': list(patch_nums), 'vocab_size': vae.vocab_size,
                'final_reso': final_reso, 'mid_reso': args.mid_reso, 'mid_px': round(args.mid_reso * final_reso),
                'variants': list(pretok.VARIANTS[:n_variants['train']]), 'classes': list(train_set.classes),
                'vae_fingerprint': pretok.vae_fingerprint(vae), 'encode': {'dtype': 'float32', 'tf32': args.tf32,
                                                                           'device': device.type},
                'chunk': args.chunk, 'sizes': {s: len(sets[s]) for s in SPLITS}}
    parts = os.path.join(args.out, 'parts')
    if os.path.isfile(os.path.join(args.out, pretok.META_NAME)):
        meta = pretok.read_meta(args.out)
        differ = sorted(k for k, v in settings.items() if k not in ('chunk', 'sizes', 'encode') and meta.get(k) != v)
        if differ:
            raise FileExistsError(f'{args.out} already holds a token set made with other settings '
                                  f'({", ".join(differ)}): pick another --out, or remove it')
        if dist.is_master():
            shutil.rmtree(parts, ignore_errors=True)  # left behind by a kill between meta.json and the clean-up
            print(f'[pretokenize] {args.out} is complete already; nothing to do', flush=True)
        return 0
    os.makedirs(parts, exist_ok=True)
    cfg_path = os.path.join(parts, 'settings.json')
    if dist.is_master() and not os.path.isfile(cfg_path):
        atomic_write(cfg_path, lambda f: json.dump(settings, f, indent=1), mode='w')
    dist.barrier()
    problems = [p for p in dist.allgather_object(check_parts_settings(parts, settings)) if p]
    if problems:  # raised by every rank together: none is left waiting in a collective
        raise FileExistsError(problems[0])

    t0 = time.time()
    for split in SPLITS:
        encode_split(args, vae, device, split, sets[split], settings, n_variants[split])
    dist.barrier()
    if dist.is_master():  # the other ranks are done: they exit without waiting for the merge
        L = sum(p * p for p in patch_nums)
        meta = {k: v for k, v in settings.items() if k not in ('sizes',)}
        meta['splits'] = {s: merge_split(args.out, s, sets[s], args.chunk, n_variants[s], L,
                                         pretok.token_dtype(vae.vocab_size)) for s in SPLITS}
        meta['vae_ckpt'] = os.path.abspath(vae_path)
        meta['vae_config'] = vae.config
        meta['data_path'] = os.path.abspath(args.data_path)
        pretok.write_meta(args.out, meta)
        shutil.rmtree(parts)
        for s in SPLITS:
            sk = meta['splits'][s]['skipped']
            print(f'[pretokenize] {s}: {meta["splits"][s]["n"]} images written'
                  + (f', {len(sk)} unreadable skipped (listed in meta.json)' if sk else ''), flush=True)
        print(f'[pretokenize] done in {time.time() - t0:.1f}s: {args.out}', flush=True)
    return 0


def _run_distributed(args: argparse.Namespace) -> int:
    dist.initialize(device=args.device)  # gloo for a CPU run (NCCL cannot reduce CPU tensors)
    try:
        # a wrong path or flag, a set of other settings, no network without --vae_ckpt: a message, exit code 2
        with user_errors(FileNotFoundError, FileExistsError, ValueError, models.HubDownloadError):
            return run(args)
    finally:
        dist.finalize()


def main(argv: Optional[List[str]] = None) -> int:
    return run_script(get_parser(), _run_distributed, argv)


if __name__ == '__main__':
    sys.exit(main())
