# ImageFolder datasets and transforms of the VAR training recipe (arXiv 2404.02905).
"""Datasets for train.py.

`build_dataset(data_path, final_reso, hflip, mid_reso)` reads `data_path/train` and `data_path/val` (one sub-folder
per class; class ids from the sorted folder names, the number of classes from the folders). An image that cannot be
read is skipped: a warning names the file, a counter shared with the loader workers counts it, and the next readable
sample takes its place. A missing folder, a class without images or train/val class mismatches raise a clear error.

Augmentation (official): [hflip] -> Resize(shorter edge -> round(mid_reso*reso), LANCZOS) -> RandomCrop(reso) ->
[0,1] -> [-1,1]. The random draws use an explicit generator when the sampler provides a per-sample seed.
"""
import multiprocessing
import os
import warnings
from typing import Callable, List, Optional, Tuple

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


class SafeImageFolder(DatasetFolder):
    """A DatasetFolder of RGB images that survives unreadable files.

    `dataset[i]` or `dataset[(i, seed)]` returns (image_3HW in [-1, 1], class id); with a seed, the random
    augmentation draws from a generator seeded with it. An unreadable file is reported once per process with a
    warning, each failed read is counted in `num_skipped` (shared with loader workers), and the next readable sample
    takes its place.
    """

    def __init__(self, root: str, transform: Callable, classes: Optional[List[str]] = None):
        self._classes = classes
        super().__init__(root, loader=pil_rgb_loader, extensions=IMG_EXTENSIONS, transform=transform,
                         allow_empty=True)  # empty classes are reported by build_dataset with their path
        self._num_skipped = multiprocessing.Value('l', 0)
        self.skipped_files: List[str] = []  # those seen by this process

    def find_classes(self, directory: str) -> Tuple[List[str], dict]:
        classes = self._classes or sorted(e.name for e in os.scandir(directory) if e.is_dir())
        return classes, {c: i for i, c in enumerate(classes)}

    @property
    def num_skipped(self) -> int:
        return self._num_skipped.value

    def __getitem__(self, key) -> Tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        for attempt in range(min(len(self.samples), 100)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self.loader(path)
            except Exception as e:  # PIL raises many types for truncated or non-image files
                self._record_skip(path, e)
                continue
            generator = None
            if seed is not None:
                generator = torch.Generator()
                generator.manual_seed(seed)
            return self.transform(img, generator), target
        raise RuntimeError(f'could not read any image near index {index} of {self.root} (see the warnings above)')

    def _record_skip(self, path: str, err: Exception) -> None:
        with self._num_skipped.get_lock():
            self._num_skipped.value += 1
        if path not in self.skipped_files:
            self.skipped_files.append(path)
            warnings.warn(f'skipping unreadable image {path}: {type(err).__name__}: {err}', stacklevel=2)


def _class_folders(root: str, split: str) -> List[str]:
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'missing folder {folder}: --data_path must contain train/ and val/, '
                                f'each with one sub-folder per class')
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
                  ) -> Tuple[int, SafeImageFolder, SafeImageFolder]:
    """Returns (num_classes, train_set, val_set); the classes come from the train/ sub-folders."""
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f'--data_path {data_path} does not exist (expected a folder with train/ and val/)')
    train_classes = _class_folders(data_path, 'train')
    val_classes = _class_folders(data_path, 'val')
    if val_classes != train_classes:
        extra = sorted(set(val_classes) - set(train_classes))
        missing = sorted(set(train_classes) - set(val_classes))
        raise ValueError(f'{os.path.join(data_path, "val")} has different classes than train/: '
                         f'not in train {extra[:5]}, missing in val {missing[:5]}')
    mid = round(mid_reso * final_reso)
    train_set = SafeImageFolder(os.path.join(data_path, 'train'), TrainTransform(final_reso, mid, hflip), train_classes)
    val_set = SafeImageFolder(os.path.join(data_path, 'val'), ValTransform(final_reso, mid), train_classes)
    _check_no_empty_class(train_set)
    _check_no_empty_class(val_set)
    return len(train_classes), train_set, val_set
