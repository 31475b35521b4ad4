"""Photo-like synthetic training data and a random-weight official tokenizer, for the GPU check scripts (no download).

Smooth random images (9x9 noise upsampled bicubically) as JPEGs in an ImageFolder with train/ and val/, and the state
dict of a VQVAE with the official architecture (vae_ch160v4096z32's shapes, random weights):

    python3 -m benchmarks.gpu_checks.synthetic_data --out /tmp/data --train 1024 --val 64 --size 300x280 \\
        --vae /tmp/vae.pth
"""
import argparse
import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image


def write_images(root: str, n_train: int, n_val: int, width: int, height: int, classes: int = 4,
                 quality: int = 90, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('val', n_val)):
        for c in range(classes):
            folder = os.path.join(root, split, f'class{c}')
            os.makedirs(folder, exist_ok=True)
            for i in range(n // classes):
                base = rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)
                Image.fromarray(base).resize((width, height), Image.BICUBIC).save(
                    os.path.join(folder, f'{i}.jpg'), quality=quality)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help='the ImageFolder root to write')
    p.add_argument('--train', type=int, default=1024, help='training images (all classes)')
    p.add_argument('--val', type=int, default=64, help='validation images (all classes)')
    p.add_argument('--size', default='300x280', help='WIDTHxHEIGHT of the images')
    p.add_argument('--quality', type=int, default=90, help='JPEG quality')
    p.add_argument('--vae', default=None, help='also write a random-weight official-architecture VQVAE here')
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split('x'))
    write_images(args.out, args.train, args.val, width, height, quality=args.quality)
    if args.vae:
        from models import VQVAE
        torch.save(VQVAE(vocab_size=4096, z_channels=32, ch=160).state_dict(), args.vae)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
