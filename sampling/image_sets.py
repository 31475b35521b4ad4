"""Image sets on disk, read and written in batches: a folder of PNGs, or one `.npz` in the OpenAI evaluator's format.

The evaluator's format is an `.npz` whose entry `arr_0` is a uint8 array of shape (N, H, W, 3) (NHWC). A 50,000-image
set at 256px is about 9.8 GB, so both directions stream: the reader decodes `arr_0.npy` from the zip member batch by
batch, and the writer appends batches to it. `np.load(path)['arr_0']` reads what the writer writes.

Everything here is uint8 NHWC numpy (the legend: N images, H, W pixels, 3 RGB channels).
"""
import glob
import io
import os
import zipfile
from typing import Iterable, Iterator, List, Tuple

import numpy as np
from PIL import Image

from models.atomic_files import atomic_path

NPZ_KEY = 'arr_0'
EVAL_ORDER_SEED = 0
# What error messages say an image .npz should be.
EXPECTED_NPZ = (f'Expected an .npz whose "{NPZ_KEY}" holds uint8 images (N, H, W, 3), as sample.py writes them and '
                'as OpenAI\'s reference batches (e.g. VIRTUAL_imagenet256_labeled.npz) hold them')
# A fixed timestamp for the zip member, so that the same images always give the same bytes (np.savez stamps "now").
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


class ImageSetError(ValueError):
    """An image set that is missing, unreadable or not uint8 (N, H, W, 3)."""


class UnreadablePNG(ImageSetError):
    """One image file of a set cannot be decoded; `path` names it."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


def _check_shape_NHW3(shape: Tuple[int, ...], dtype: np.dtype, where: str) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
        raise ImageSetError(f'{where}: expected uint8 images of shape (N, H, W, 3), found dtype {dtype} and shape '
                            f'{tuple(shape)}')


def _open_npz_member(zf: zipfile.ZipFile, path: str):
    name = NPZ_KEY + '.npy'
    names = zf.namelist()
    if name in names:
        return zf.open(name)
    arrays = [n[:-4] for n in names if n.endswith('.npy')]
    if not arrays:  # another kind of zip, e.g. a torch.save file: its entries mean nothing to the user
        raise ImageSetError(f'{path} is not a .npz of images or of reference statistics: it is a zip archive without '
                            f'any .npy array (a torch.save file?). {EXPECTED_NPZ}')
    shown = arrays[:8] + (['...'] if len(arrays) > 8 else [])
    raise ImageSetError(f'{path}: no "{NPZ_KEY}" array (arrays: {shown}). {EXPECTED_NPZ}')


def _read_npy_header(f, path: str) -> Tuple[Tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ImageSetError(f'{path}: unsupported .npy format version {version}')
    except ValueError as e:
        if isinstance(e, ImageSetError):
            raise
        raise ImageSetError(f'{path}: "{NPZ_KEY}" is not a valid .npy array ({e})') from e
    if fortran_order:
        raise ImageSetError(f'{path}: "{NPZ_KEY}" is stored in Fortran order; expected C order')
    _check_shape_NHW3(shape, dtype, f'{path} ["{NPZ_KEY}"]')
    return shape, dtype


def _open_zip(path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ImageSetError(f'cannot read {path} as an .npz file: {e}') from e


def npz_image_shape(path: str) -> Tuple[int, int, int, int]:
    """(N, H, W, 3) of the `arr_0` in an `.npz`, read from the header only; raises ImageSetError if it is not images."""
    with _open_zip(path) as zf, _open_npz_member(zf, path) as f:
        shape, _ = _read_npy_header(f, path)
    return tuple(shape)


def iter_npz_images(path: str, batch_size: int) -> Iterator[np.ndarray]:
    """Yield `arr_0` of an `.npz` as uint8 (b, H, W, 3) batches, in order, without loading it whole."""
    with _open_zip(path) as zf, _open_npz_member(zf, path) as f:
        (N, H, W, _), _ = _read_npy_header(f, path)
        image_bytes = H * W * 3
        for start in range(0, N, batch_size):
            b = min(batch_size, N - start)
            buf = f.read(b * image_bytes)
            if len(buf) != b * image_bytes:
                raise ImageSetError(f'{path}: "{NPZ_KEY}" is truncated (image {start + len(buf) // image_bytes} '
                                    f'of {N})')
            yield np.frombuffer(bytearray(buf), dtype=np.uint8).reshape(b, H, W, 3)  # writable, for torch


def npz_tmp_path(path: str) -> str:
    """Where `write_npz_images` writes before its rename (one fixed name: a killed writer's leftover can be found)."""
    return path + '.tmp'


def write_npz_images(path: str, batches_NHW3: Iterable[np.ndarray], shape_NHW3: Tuple[int, int, int, int]) -> None:
    """Write batches as `arr_0` of an uncompressed `.npz`, atomically (a temporary file, then a rename).

    The batches must add up to `shape_NHW3`; the same images always give the same bytes.
    """
    _check_shape_NHW3(shape_NHW3, np.dtype(np.uint8), f'writing {path}')
    written = 0
    with atomic_path(path, fsync=False, tmp=npz_tmp_path(path)) as tmp:
        with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            member = zipfile.ZipInfo(NPZ_KEY + '.npy', date_time=_ZIP_DATE_TIME)
            with zf.open(member, 'w', force_zip64=True) as f:
                header = {'descr': np.lib.format.dtype_to_descr(np.dtype(np.uint8)), 'fortran_order': False,
                          'shape': tuple(shape_NHW3)}
                np.lib.format.write_array_header_1_0(f, header)
                for batch in batches_NHW3:
                    if batch.dtype != np.uint8 or batch.shape[1:] != tuple(shape_NHW3[1:]):
                        raise ImageSetError(f'writing {path}: a batch of dtype {batch.dtype} and shape {batch.shape} '
                                            f'does not fit {tuple(shape_NHW3)}')
                    f.write(np.ascontiguousarray(batch).tobytes())
                    written += batch.shape[0]
        if written != shape_NHW3[0]:
            raise ImageSetError(f'writing {path}: got {written} images, expected {shape_NHW3[0]}')


def evaluation_order(files: Iterable[str]) -> List[str]:
    """The files sorted by name, then shuffled by a fixed permutation (seed EVAL_ORDER_SEED).

    The Inception Score is averaged over consecutive splits of 5,000 images. The official export globs its PNG folder
    unsorted, so its splits mix the classes; sample.py's names sort by class, and sorted splits would hold 100 classes
    each, which caps the score far below the published values. The same files always come in the same order.
    """
    files = sorted(set(files))
    perm = np.random.default_rng(EVAL_ORDER_SEED).permutation(len(files))
    return [files[i] for i in perm]


def list_png_files(folder: str) -> List[str]:
    """The `.png` files of a folder, in `evaluation_order`."""
    if not os.path.isdir(folder):
        raise ImageSetError(f'{folder} is not a folder')
    files = glob.glob(os.path.join(folder, '*.png')) + glob.glob(os.path.join(folder, '*.PNG'))
    return evaluation_order(files)


def read_png(path: str) -> np.ndarray:
    """One image as uint8 (H, W, 3); grey or RGBA PNGs are converted to RGB."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert('RGB'), dtype=np.uint8)
    except OSError as e:
        raise UnreadablePNG(path, f'cannot read image {path}: {e}') from e


def save_png(img_HW3: np.ndarray, path: str) -> None:
    """Save a uint8 (H, W, 3) image as PNG atomically, so that a killed run never leaves a half-written file."""
    save_image(img_HW3, path, 'PNG')


def save_image(img_HW3: np.ndarray, path: str, fmt: str) -> None:
    """Save a uint8 (H, W, 3) image atomically in the PIL format `fmt` (see `image_format`)."""
    with atomic_path(path, fsync=False) as tmp:  # a hidden *.tmp-* name: no reader ever globs a half-written image
        Image.fromarray(img_HW3).save(tmp, format=fmt)


def image_format(path: str) -> str:
    """The PIL format that the extension of `path` names ('PNG' for a name without one); ValueError when PIL cannot
    write an RGB image in it."""
    ext = os.path.splitext(path)[1].lower()
    if not ext:
        return 'PNG'
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(f'{ext} is not an image extension that PIL knows; use .png (or e.g. .jpg, .webp)')
    try:  # the real test: some formats are read-only, or take no RGB images
        Image.new('RGB', (1, 1)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f'PIL cannot write RGB images as {fmt} ({ext}); use .png (or e.g. .jpg, .webp)') from e
    return fmt


def is_image_path(path: str) -> bool:
    """Whether the extension of `path` is one of PIL's image extensions (.png, .jpg, ...)."""
    return os.path.splitext(path)[1].lower() in Image.registered_extensions()


def iter_png_images(files: List[str], batch_size: int) -> Iterator[np.ndarray]:
    """Yield the given PNGs as uint8 (b, H, W, 3) batches; all must have the size of the first."""
    shape = None
    for start in range(0, len(files), batch_size):
        batch = [read_png(p) for p in files[start:start + batch_size]]
        for p, img in zip(files[start:start + batch_size], batch):
            shape = shape or img.shape
            if img.shape != shape:
                raise ImageSetError(f'{p} has size {img.shape[:2]}, but {files[0]} has {shape[:2]}')
        yield np.stack(batch)


def open_image_set(path: str, batch_size: int) -> Tuple[Tuple[int, int, int, int], Iterator[np.ndarray]]:
    """An `.npz` or a PNG folder → ((N, H, W, 3), iterator of uint8 batches)."""
    if os.path.isdir(path):
        files = list_png_files(path)
        if not files:
            raise ImageSetError(f'{path} holds no .png files')
        H, W, _ = read_png(files[0]).shape
        return (len(files), H, W, 3), iter_png_images(files, batch_size)
    if not os.path.isfile(path):
        raise ImageSetError(f'{path} does not exist')
    return npz_image_shape(path), iter_npz_images(path, batch_size)
