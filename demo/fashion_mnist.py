"""Real Fashion-MNIST for the demo: find (or install) the files, read them, write an RGB 32x32 ImageFolder.

Sources, in order: the Debian package `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`, installed with
apt-get when it is missing and we are root), then torchvision's download (needs the network). The images are the
original 28x28 grey pictures, zero-padded by 2 pixels on each side to 32x32 (the background is black: no resampling)
and replicated to RGB. Class folders are named `<label>_<name>` so that their sorted order is the label order.
"""
import gzip
import json
import os
import shutil
import subprocess
from typing import Callable, Dict, Optional, Tuple

import numpy as np

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
DEBIAN_PACKAGE = 'dataset-fashion-mnist'
FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
         'val': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}
CLASSES = ('tshirt_top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'ankle_boot')
IMAGE_SIZE = 32
MANIFEST = 'fashion_mnist.json'


def class_folder(label: int) -> str:
    return f'{label}_{CLASSES[label]}'


def read_idx(path: str) -> np.ndarray:
    """An IDX file (optionally gzipped) -> uint8 array: (N, rows, cols) for images, (N,) for labels."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    magic = int.from_bytes(data[:4], 'big')
    if magic >> 8 != 0x08:  # the type byte: 0x08 = unsigned byte
        raise ValueError(f'{path} is not an IDX file of unsigned bytes (magic {magic:#x})')
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f'{path} is truncated: {arr.size} values for dimensions {dims}')
    return arr.reshape(dims)


def has_raw_files(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for pair in FILES.values() for f in pair)


def install_debian_package(log: Callable[[str], None] = print) -> bool:
    """apt-get install the dataset package (updating the package lists if the first try fails); True on success."""
    if shutil.which('apt-get') is None or not hasattr(os, 'geteuid') or os.geteuid() != 0:
        return False
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    for cmd in (['apt-get', 'install', '-y', '-q', DEBIAN_PACKAGE], ['apt-get', 'update', '-q'],
                ['apt-get', 'install', '-y', '-q', DEBIAN_PACKAGE]):
        log(f'[data] {" ".join(cmd)}')
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            log(f'[data] {cmd[0]} failed: {e}')
            return False
        if cmd[1] == 'install' and done.returncode == 0 and has_raw_files(DEBIAN_DIR):
            return True
    return False


def torchvision_download(cache_dir: str, log: Callable[[str], None] = print) -> Optional[str]:
    """torchvision's FashionMNIST download into cache_dir -> the folder with the four .gz files, or None."""
    try:
        from torchvision.datasets import FashionMNIST
        for train in (True, False):
            FashionMNIST(cache_dir, train=train, download=True)
    except Exception as e:  # offline, or a mirror down
        log(f'[data] torchvision download failed: {type(e).__name__}: {e}')
        return None
    raw = os.path.join(cache_dir, 'FashionMNIST', 'raw')
    return raw if has_raw_files(raw) else None


def locate_raw_files(cache_dir: str, install: bool = True, log: Callable[[str], None] = print) -> str:
    """The folder holding the four original .gz files: Debian's, after installing it if needed, else a download."""
    if has_raw_files(DEBIAN_DIR):
        return DEBIAN_DIR
    downloaded = os.path.join(cache_dir, 'FashionMNIST', 'raw')
    if has_raw_files(downloaded):
        return downloaded
    if install and install_debian_package(log):
        return DEBIAN_DIR
    raw = torchvision_download(cache_dir, log)
    if raw is None:
        raise FileNotFoundError(
            f'Fashion-MNIST is not on this machine ({DEBIAN_DIR} is missing) and could not be installed or '
            f'downloaded. Install it with `sudo apt-get install {DEBIAN_PACKAGE}` (Debian/Ubuntu), or copy the four '
            f'files {", ".join(f for pair in FILES.values() for f in pair)} into {downloaded}.')
    return raw


def load_split(raw_dir: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of 'train' (60,000) or 'val' (the 10,000 test images)."""
    img_file, lbl_file = FILES[split]
    images = read_idx(os.path.join(raw_dir, img_file))
    labels = read_idx(os.path.join(raw_dir, lbl_file)).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f'{raw_dir}: images {images.shape} and labels {labels.shape} do not match')
    return images, labels


def to_rgb32(images_NHW: np.ndarray) -> np.ndarray:
    """28x28 grey -> 32x32x3 uint8 by zero padding (the background is 0) and channel replication."""
    pad = (IMAGE_SIZE - images_NHW.shape[1]) // 2
    padded = np.pad(images_NHW, ((0, 0), (pad, pad), (pad, pad)))
    return np.repeat(padded[..., None], 3, axis=-1)


def select_per_class(labels: np.ndarray, per_class: Optional[int]) -> np.ndarray:
    """Indices of the first `per_class` images of every class, in file order (all when None)."""
    if per_class is None:
        return np.arange(labels.shape[0])
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))])
    return np.sort(keep)


def write_image_folder(out_dir: str, raw_dir: str, per_class: Dict[str, Optional[int]],
                       limit: Optional[int] = None, log: Callable[[str], None] = print) -> Dict[str, int]:
    """Write out_dir/{train,val}/<label>_<name>/<index>.png; reuses a finished folder with the same settings.

    Args:
        per_class: images per class for 'train' and 'val' (None: all of them).
        limit: only read the first `limit` images of each file (tests).
    Returns the number of images per split.
    """
    settings = {'source': os.path.abspath(raw_dir), 'per_class': per_class, 'limit': limit, 'size': IMAGE_SIZE}
    manifest = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(manifest):
        with open(manifest) as f:
            old = json.load(f)
        if old.get('settings', {}) | {'source': None} == settings | {'source': None}:
            return old['counts']
        log(f'[data] {out_dir} was written with other settings; rewriting it')
    from PIL import Image

    from models.atomic_files import atomic_write
    for split in FILES:
        if os.path.isdir(os.path.join(out_dir, split)):
            shutil.rmtree(os.path.join(out_dir, split))
    counts = {}
    for split in FILES:
        images, labels = load_split(raw_dir, split)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        keep = select_per_class(labels, per_class.get(split))
        rgb = to_rgb32(images[keep])
        for c in range(len(CLASSES)):
            os.makedirs(os.path.join(out_dir, split, class_folder(c)), exist_ok=True)
        for i, img in zip(keep, rgb):
            Image.fromarray(img, 'RGB').save(os.path.join(out_dir, split, class_folder(int(labels[i])), f'{i:05d}.png'),
                                             compress_level=1)
        counts[split] = int(len(keep))
        log(f'[data] wrote {len(keep)} {split} images to {os.path.join(out_dir, split)}')
    contents = {'settings': settings, 'counts': counts, 'classes': [class_folder(c) for c in range(10)]}
    atomic_write(manifest, lambda f: json.dump(contents, f), mode='w')
    return counts
