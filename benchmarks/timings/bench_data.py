"""Input-pipeline throughput on the CPU: the official image path (class folders, or the same JPEGs in parquet shards)
against a pre-tokenised dataset, same loader.

images  = JPEG decode + [hflip] + LANCZOS resize of the shorter edge to 288 + random 256 crop (utils.data, as official)
parquet = the same JPEGs and transform, read from parquet shards laid out as the Hub ships ImageNet (100-row row
          groups); each process keeps one row group, so a shuffled order reads a row group for almost every image, as
          it would over ImageNet's 12,800 groups
tokens  = a memory-mapped token set (utils.pretok, the format pretokenize.py writes): one row of 680 ids per sample

--startup_shards N also times build_dataset (the start-up cost: every footer read and checked) on N train shards of
ImageNet's row counts (1,281,167 rows in all, 100-row groups, 14 validation shards), the images replaced by a few
bytes: `--startup_shards 294` is the Hub's ImageNet.

The images are real photos (scikit-image's sample pictures) re-encoded as ImageNet-sized JPEGs (longer edge 500,
quality 90). The figure tells how many loader worker cores one GPU needs to keep its training step fed; the GPU
side of the same comparison (the tokenizer encode, included or not) is benchmarks/timings/bench_train.py.

    python -m benchmarks.timings.bench_data --n 512 --workers 0,2 --startup_shards 294
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from benchmarks.timings.common import machine, print_table, write_json
from models.presets import PATCH_NUMS
from utils import pretok
from utils.data import SafeImageFolder, TrainTransform, build_dataset
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


def write_parquet_shards(img_root: str, out: str, n_shards: int = 4, group_rows: int = 100) -> None:
    """The JPEGs of `img_root` (in SafeImageFolder's order) as Hub-layout shards out/data/{train,validation}-*.parquet
    (validation: the first images again; the benchmark reads train only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    samples = SafeImageFolder(img_root, transform=None).samples
    os.makedirs(os.path.join(out, 'data'))
    image_type = pa.struct([('bytes', pa.binary()), ('path', pa.string())])
    for split, split_samples, shards in (('train', samples, n_shards), ('validation', samples[:8], 1)):
        bounds = np.linspace(0, len(split_samples), shards + 1).round().astype(int)
        for k in range(shards):
            part = split_samples[bounds[k]:bounds[k + 1]]
            images = [{'bytes': open(path, 'rb').read(), 'path': os.path.basename(path)} for path, _ in part]
            table = pa.table({'image': pa.array(images, image_type), 'label': pa.array([t for _, t in part])})
            pq.write_table(table, os.path.join(out, 'data', f'{split}-{k:05d}-of-{shards:05d}.parquet'),
                           row_group_size=group_rows)


def startup_seconds(root: str, n_shards: int, repeats: int = 3) -> float:
    """Best of `repeats` build_dataset calls on n_shards train shards (+14 validation shards) of ImageNet's row
    counts and 100-row groups, 1000 class names in each footer as the Hub's, each image a few bytes (start-up reads
    footers only, never image bytes)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.join(root, 'data'))
    features = {'image': {'_type': 'Image'}, 'label': {'names': [f'class {i}' for i in range(1000)],
                                                       '_type': 'ClassLabel'}}
    hub_meta = {b'huggingface': json.dumps({'info': {'features': features}}).encode()}
    rng = np.random.default_rng(0)
    for split, n, shards in (('train', 1_281_167, n_shards), ('validation', 50_000, 14)):
        bounds = np.linspace(0, n, shards + 1).round().astype(int)
        for k in range(shards):
            m = int(bounds[k + 1] - bounds[k])
            image = pa.StructArray.from_arrays([pa.array([b'\xff\xd8 not decoded'] * m),
                                                pa.array([f'{k}_{i}.JPEG' for i in range(m)])], ['bytes', 'path'])
            table = pa.table({'image': image, 'label': pa.array(rng.integers(0, 1000, m))}).replace_schema_metadata(
                hub_meta)
            pq.write_table(table, os.path.join(root, 'data', f'{split}-{k:05d}-of-{shards:05d}.parquet'),
                           row_group_size=100)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        build_dataset(root, 256)
        times.append(time.perf_counter() - t0)
    return min(times)


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
    p.add_argument('--startup_shards', type=int, default=0,
                   help='also time build_dataset on this many ImageNet-sized parquet shards (294: the Hub\'s)')
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
            pq_root = os.path.join(tmp, 'parquet')
            os.makedirs(tok_root)
            write_photo_folder(img_root, args.n)
            write_parquet_shards(img_root, pq_root)
            write_token_set(tok_root, args.n, bool(args.hflip))
            _, parquet_set, _ = build_dataset(pq_root, 256, bool(args.hflip))
            parquet_set.cache_groups = 1  # as over ImageNet's 12,800 groups: a shuffled order rarely finds its group
            sets = {'images': SafeImageFolder(img_root, TrainTransform(256, 288, bool(args.hflip))),
                    'parquet': parquet_set,
                    'tokens': pretok.PretokenizedDataset(tok_root, 'train', hflip=bool(args.hflip))}
            for workers in [int(w) for w in args.workers.split(',')]:
                speeds = {name: images_per_second(ds, workers, args.batch, args.epochs) for name, ds in sets.items()}
                rows.append({'workers': workers, 'images img/s': speeds['images'], 'parquet img/s': speeds['parquet'],
                             'tokens img/s': speeds['tokens'], 'ratio': speeds['tokens'] / speeds['images']})
            startup = None
            if args.startup_shards:
                startup = startup_seconds(os.path.join(tmp, 'startup'), args.startup_shards)
    finally:
        torch.set_num_threads(threads)
    print(f'CPU: {os.cpu_count()} cores ({machine()["host"]})')
    print_table(f'Input pipeline, 256 px, batch {args.batch}, hflip {args.hflip}, {args.n} real-photo JPEGs', rows,
                ['workers', 'images img/s', 'parquet img/s', 'tokens img/s', 'ratio'])
    if startup is not None:
        print(f'build_dataset on {args.startup_shards} + 14 parquet shards of ImageNet\'s row counts (footers only, '
              f'warm page cache): {startup:.2f} s')
    write_json(args.json, {'benchmark': 'data', 'cpu_count': os.cpu_count(), 'n': args.n, 'batch': args.batch,
                           'rows': rows, 'startup_shards': args.startup_shards, 'startup_s': startup})


if __name__ == '__main__':
    main()
