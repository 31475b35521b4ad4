# Image datasets and transforms of the VAR training recipe (arXiv 2404.02905).
"""Datasets for train.py, train_vae.py and pretokenize.py.

`build_dataset(data_path, final_reso, hflip, mid_reso)` reads one of two layouts, told apart by what is there:
- class folders: `data_path/train` and `data_path/val`, one sub-folder per class (class ids from the sorted folder
  names, the number of classes from the folders);
- parquet shards (utils/parquet_data.py): `data/train-*.parquet` and `data/validation-*.parquet` as the Hugging Face
  Hub ships ImageNet, or `train/*.parquet` and `val/*.parquet` (class ids from the `label` column).
Both are map-style (`dataset[i]`, `dataset[(i, seed)]`), so the sampler and its exact resume work alike. An image that
cannot be decoded is skipped: a warning names it, a counter shared with the loader workers counts it, and the next
readable sample takes its place. A bad layout raises FileNotFoundError or ValueError with what to fix.

Augmentation (official): [hflip] -> Resize(shorter edge -> round(mid_reso*reso), LANCZOS) -> RandomCrop(reso) ->
[0,1] -> [-1,1]. The random draws use an explicit generator when the sampler provides a per-sample seed.
"""
import io
import multiprocessing
import os
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, DatasetFolder
from torchvision.transforms import InterpolationMode, transforms
from torchvision.transforms import functional as TF


def normalize_01_into_pm1(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], computed as x + x - 1 like the official code."""
    return x.add(x).add_(-1)


def pil_rgb_loader(path: str) -> Image.Image:
    with open(path, 'rb') as f:
        img = Image.open(f)
        return img.convert('RGB')


def pil_rgb_from_bytes(data: bytes) -> Image.Image:
    """The image in `data` (an encoded file's bytes) as RGB: the same pixels as pil_rgb_loader on that file."""
    return Image.open(io.BytesIO(data)).convert('RGB')


class TrainTransform:
    """Random [flip] + resize + random crop; draws from `generator` when given, else from the global torch RNG."""

    def __init__(self, final_reso: int, mid_reso: int, hflip: bool):
        self.final_reso, self.hflip = final_reso, hflip
        self.resize = transforms.Resize(mid_reso, interpolation=InterpolationMode.LANCZOS)

    def __call__(self, img: Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.hflip and torch.rand(1, generator=generator).item() < 0.5:
            img = TF.hflip(img)
        img = self.resize(img)
        w, h = img.size
        top = int(torch.randint(0, h - self.final_reso + 1, size=(1,), generator=generator).item())
        left = int(torch.randint(0, w - self.final_reso + 1, size=(1,), generator=generator).item())
        img = TF.crop(img, top, left, self.final_reso, self.final_reso)
        return normalize_01_into_pm1(TF.to_tensor(img))


class ValTransform:
    def __init__(self, final_reso: int, mid_reso: int):
        self.tf = transforms.Compose([transforms.Resize(mid_reso, interpolation=InterpolationMode.LANCZOS),
                                      transforms.CenterCrop(final_reso), transforms.ToTensor()])

    def __call__(self, img: Image.Image, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return normalize_01_into_pm1(self.tf(img))


class SkipUnreadable:
    """The reading rule that every image set shares (class folders, parquet shards).

    `dataset[i]` or `dataset[(i, seed)]` returns (image_3HW in [-1, 1], class id); with a seed, the random
    augmentation draws from a generator seeded with it. An image that cannot be decoded is reported once per process
    with a warning, each failed read is counted in `num_skipped` (shared with loader workers), and the next readable
    sample takes its place.

    A subclass calls `_init_skip_count()` and provides `transform`, `root` (named in errors), `__len__` and:
        encoded_sample(i) -> (encoded image, class id)   a file path or the image's bytes; errors here are not skipped
        decode(encoded) -> PIL RGB image                 raises for an undecodable image (skipped and counted)
        image_name(i) -> str                             names the image in warnings and in pretokenize's meta.json
        relative_names(indices) -> list of str           provenance lines of pretokenize's {split}_files.txt
    """

    def _init_skip_count(self) -> None:
        self._num_skipped = multiprocessing.Value('l', 0)
        self.skipped_files: List[str] = []  # those seen by this process

    @property
    def num_skipped(self) -> int:
        return self._num_skipped.value

    def __getitem__(self, key) -> Tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        n = len(self)
        for attempt in range(min(n, 100)):
            i = (index + attempt) % n
            encoded, target = self.encoded_sample(i)
            try:
                img = self.decode(encoded)
            except Exception as e:  # PIL raises many types for truncated or non-image data
                self._record_skip(self.image_name(i), e)
                continue
            generator = None
            if seed is not None:
                generator = torch.Generator()
                generator.manual_seed(seed)
            return self.transform(img, generator), target
        raise RuntimeError(f'could not read any image near index {index} of {self.root} (see the warnings above)')

    def _record_skip(self, name: str, err: Exception) -> None:
        with self._num_skipped.get_lock():
            self._num_skipped.value += 1
        if name not in self.skipped_files:
            self.skipped_files.append(name)
            warnings.warn(f'skipping unreadable image {name}: {type(err).__name__}: {err}', stacklevel=2)


class SafeImageFolder(SkipUnreadable, DatasetFolder):
    """A DatasetFolder of RGB images that survives unreadable files (the rule of SkipUnreadable)."""

    class_order = 'sorted folder order'  # where class ids come from, for the logs

    def __init__(self, root: str, transform: Callable, classes: Optional[List[str]] = None):
        self._classes = classes
        super().__init__(root, loader=pil_rgb_loader, extensions=IMG_EXTENSIONS, transform=transform,
                         allow_empty=True)  # empty classes are reported by build_dataset with their path
        self._init_skip_count()

    def find_classes(self, directory: str) -> Tuple[List[str], dict]:
        classes = self._classes or sorted(e.name for e in os.scandir(directory) if e.is_dir())
        return classes, {c: i for i, c in enumerate(classes)}

    def encoded_sample(self, index: int) -> Tuple[str, int]:
        return self.samples[index]

    def decode(self, path: str) -> Image.Image:
        return self.loader(path)

    def image_name(self, index: int) -> str:
        return self.samples[index][0]

    def relative_names(self, indices: Sequence[int]) -> List[str]:
        return [os.path.relpath(self.samples[i][0], self.root) for i in indices]


def _class_folders(root: str, split: str) -> List[str]:
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'missing folder {folder}: --data_path must contain train/ and val/, '
                                f'each with one sub-folder per class (or parquet shards: see docs/data.md)')
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f'no class folders in {folder}: expected one sub-folder per class')
    return classes


def _check_no_empty_class(ds: SafeImageFolder) -> None:
    counts = torch.bincount(torch.tensor(ds.targets, dtype=torch.long), minlength=len(ds.classes))
    empty = [ds.classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
    if empty:
        raise FileNotFoundError(f'class folder {os.path.join(ds.root, empty[0])} contains no image '
                                f'({len(empty)} empty class folder(s); extensions: {", ".join(IMG_EXTENSIONS)})')


def build_dataset(data_path: str, final_reso: int, hflip: bool = False, mid_reso: float = 1.125
                  ) -> Tuple[int, SkipUnreadable, SkipUnreadable]:
    """Returns (num_classes, train_set, val_set) from class folders or parquet shards, whichever `data_path` holds.

    Both sets have `classes` (class id i is named classes[i]; train.py keeps the list in its checkpoint as
    `class_names`), `num_skipped` and `skipped_files`.
    """
    # imported here: utils.parquet_data builds on this module's SkipUnreadable
    from utils.parquet_data import LAYOUTS_HELP, build_parquet_sets, find_parquet_shards
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f'--data_path {data_path} does not exist: expected a folder with {LAYOUTS_HELP}')
    mid = round(mid_reso * final_reso)
    if mid < final_reso:
        raise ValueError(f'--mid_reso {mid_reso:g} resizes to {mid} px, less than the {final_reso} px crop: it must be '
                         f'at least 1 (official: 1.125)')
    train_tf, val_tf = TrainTransform(final_reso, mid, hflip), ValTransform(final_reso, mid)
    shards = find_parquet_shards(data_path)
    if shards is not None:
        return build_parquet_sets(shards, train_tf, val_tf)
    if not any(os.path.isdir(os.path.join(data_path, split)) for split in ('train', 'val')):
        raise FileNotFoundError(f'--data_path {data_path} holds neither accepted layout: expected {LAYOUTS_HELP}')
    train_classes = _class_folders(data_path, 'train')
    val_classes = _class_folders(data_path, 'val')
    if val_classes != train_classes:
        extra = sorted(set(val_classes) - set(train_classes))
        missing = sorted(set(train_classes) - set(val_classes))
        raise ValueError(f'{os.path.join(data_path, "val")} has different classes than train/: '
                         f'not in train {extra[:5]}, missing in val {missing[:5]}')
    train_set = SafeImageFolder(os.path.join(data_path, 'train'), train_tf, train_classes)
    val_set = SafeImageFolder(os.path.join(data_path, 'val'), val_tf, train_classes)
    _check_no_empty_class(train_set)
    _check_no_empty_class(val_set)
    return len(train_classes), train_set, val_set
