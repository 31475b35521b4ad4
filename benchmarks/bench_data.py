"""Input-pipeline throughput on the CPU: the official image path against a pre-tokenised dataset, same loader.

images = JPEG decode + [hflip] + LANCZOS resize of the shorter edge to 288 + random 256 crop (utils.data, as official)
tokens = a memory-mapped token set (utils.pretok, the format pretokenize.py writes): one row of 680 ids per sample

The images are real photos (scikit-image's sample pictures) re-encoded as ImageNet-sized JPEGs (longer edge 500,
quality 90). The figure tells how many loader worker cores one GPU needs to keep its training step fed; the GPU
side of the same comparison (the tokenizer encode, included or not) is benchmarks/bench_train.py.

    python -m benchmarks.bench_data --n 512 --workers 0,2
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.common import machine, print_table, write_json
from models.presets import PATCH_NUMS
from utils import pretok
from utils.data import SafeImageFolder, TrainTransform
from utils.data_sampler import DistInfiniteBatchSampler

PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'hubble_deep_field', 'retina', 'immunohistochemistry')


def write_photo_folder(root: str, n: int) -> None:
    """n JPEGs in 2 classes, each a different random crop / rescale of a real photo (longer edge 500 px)."""
    import skimage.data
    rng = np.random.default_rng(0)
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    for i in range(n):
        arr = photos[i % len(photos)]
        h, w = arr.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        img = Image.fromarray(arr[y:y + ch, x:x + cw]).convert('RGB')
        scale = 500 / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        d = os.path.join(root, f'c{i % 2}')
        os.makedirs(d, exist_ok=True)
        img.save(os.path.join(d, f'{i:05d}.jpg'), quality=90)


def write_token_set(root: str, n: int, hflip: bool) -> None:
    L = sum(p * p for p in PATCH_NUMS['256'])
    n_var = 2 if hflip else 1
    rng = np.random.default_rng(0)
    paths = pretok.split_paths(root, 'train')
    np.save(paths['tokens'], rng.integers(0, 4096, (n, n_var, L)).astype(np.uint16))
    np.save(paths['labels'], (np.arange(n) % 2).astype(np.int64))
    open(paths['files'], 'w').close()
    pretok.write_meta(root, {'format': pretok.FORMAT, 'patch_nums': list(PATCH_NUMS['256']), 'vocab_size': 4096,
                             'final_reso': 256, 'mid_reso': 1.125, 'variants': list(pretok.VARIANTS[:n_var]),
                             'classes': ['c0', 'c1'], 'vae_fingerprint': 'synthetic',
                             'splits': {'train': {'n': n, 'n_variants': n_var}}})


def images_per_second(dataset, workers: int, batch: int, epochs: int) -> float:
    sampler = DistInfiniteBatchSampler(1, 0, len(dataset), batch, fill_last=True, shuffle=True, aug_seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
    it = iter(loader)
    next(it)  # workers started, first batch out
    n_batches = epochs * len(sampler) - 1
    t0 = time.perf_counter()
    for _ in range(n_batches):
        next(it)
    return n_batches * batch / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n', type=int, default=512, help='images in the folder (and rows in the token set)')
    p.add_argument('--workers', default='0,2', help='loader worker processes to try')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--epochs', type=int, default=2)
    p.add_argument('--hflip', type=int, default=1)
    p.add_argument('--json', default='bench_data.json')
    args = p.parse_args(argv)
    rows = []
    # one core per loader process, as a training node gives its workers; restored after, since main may run inside
    # another program (the test suite)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            img_root, tok_root = os.path.join(tmp, 'img'), os.path.join(tmp, 'tok')
            os.makedirs(tok_root)
            write_photo_folder(img_root, args.n)
            write_token_set(tok_root, args.n, bool(args.hflip))
            sets = {'images': SafeImageFolder(img_root, TrainTransform(256, 288, bool(args.hflip))),
                    'tokens': pretok.PretokenizedDataset(tok_root, 'train', hflip=bool(args.hflip))}
            for workers in [int(w) for w in args.workers.split(',')]:
                speeds = {name: images_per_second(ds, workers, args.batch, args.epochs) for name, ds in sets.items()}
                rows.append({'workers': workers, 'images img/s': speeds['images'], 'tokens img/s': speeds['tokens'],
                             'ratio': speeds['tokens'] / speeds['images']})
    finally:
        torch.set_num_threads(threads)
    print(f'CPU: {os.cpu_count()} cores ({machine()["host"]})')
    print_table(f'Input pipeline, 256 px, batch {args.batch}, hflip {args.hflip}, {args.n} real-photo JPEGs', rows,
                ['workers', 'images img/s', 'tokens img/s', 'ratio'])
    write_json(args.json, {'benchmark': 'data', 'cpu_count': os.cpu_count(), 'n': args.n, 'batch': args.batch,
                           'rows': rows})


if __name__ == '__main__':
    main()
