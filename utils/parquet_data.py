# Parquet image shards (the Hugging Face Hub's layout of ImageNet) as a map-style dataset for VAR training.
"""Image sets stored as parquet shards, read in place (utils.data.build_dataset picks them when they are there).

Accepted layouts of `--data_path` (shards sorted by file name; rows in shard order, so a set written in the sorted
order of class folders gives the same index -> image mapping as the folders):
    data/train-*.parquet and data/validation-*.parquet      as `ILSVRC/imagenet-1k` ships them on the Hub
    train/*.parquet and val/*.parquet
Each shard has an `image` column (a struct of `bytes` and `path`, as the Hub's Image feature, or plain binary) and an
integer `label` column. Class names come from the shards' features metadata (the schema key b'huggingface': JSON with
info.features.label.names) when there, else they are str(id).

At build time only every shard's footer is read (schema, row groups, the labels' min/max statistics; the `label` column
itself only where a footer lacks statistics): a missing, empty, truncated or malformed shard, or a label out of range,
is named in a FileNotFoundError or ValueError before training starts. Images are read on demand: `dataset[i]` reads the
image bytes and labels of one row group only and decodes one image; each process keeps its last CACHE_GROUPS row groups
and opens files lazily (a pyarrow handle is never pickled into a loader worker, and a forked worker opens its own).
Memory per process is therefore about CACHE_GROUPS row groups whatever the shard size (the `datasets` library writes
image sets in row groups of at most 100 rows: ~11 MB of ImageNet JPEGs). The price of random access: a shuffled order
reads a whole row group for almost every image (docs/data.md, benchmarks/timings/bench_data.py).
"""
from __future__ import annotations

import glob
import json
import os
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from utils.data import SkipUnreadable, pil_rgb_from_bytes

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq
# pyarrow itself is imported where shards are read: a run on class folders never loads it, so its allocator and
# threads are not in the processes that fork the loader workers

# (train pattern, validation pattern) of each accepted layout, relative to --data_path
PARQUET_LAYOUTS = (('data/train-*.parquet', 'data/validation-*.parquet'), ('train/*.parquet', 'val/*.parquet'))
LAYOUTS_HELP = ('train/ and val/ with one sub-folder of images per class, or parquet shards (data/train-*.parquet and '
                'data/validation-*.parquet as on the Hugging Face Hub, or train/*.parquet and val/*.parquet)')
HUB_SHARD_NAME = re.compile(r'^(?P<split>.+)-(?P<k>\d+)-of-(?P<n>\d+)\.parquet$')  # train-00007-of-00294.parquet
CACHE_GROUPS = 4  # row groups kept per process: the bound on its memory
MAX_OPEN_FILES = 64  # shard handles kept open per process (the least recently used is closed beyond)
COLUMNS_HELP = ("an 'image' column (a struct of bytes and path, or binary) and an integer 'label' column, as the "
                "Hub's image sets have")


class Shard(NamedTuple):
    """One validated shard: its path, the rows of each row group, the column holding the image bytes and whether
    the image struct has a `path` field."""
    path: str
    group_rows: Tuple[int, ...]
    bytes_column: str
    has_path: bool


def find_parquet_shards(data_path: str) -> Optional[Dict[str, List[str]]]:
    """{'train': shards, 'val': shards} (sorted by name) when `data_path` holds a parquet layout, None when it holds
    none; a layout with one split only raises FileNotFoundError."""
    for train_glob, val_glob in PARQUET_LAYOUTS:
        train = sorted(glob.glob(os.path.join(data_path, train_glob)))
        val = sorted(glob.glob(os.path.join(data_path, val_glob)))
        if train or val:
            if not train or not val:
                have, want = (train_glob, val_glob) if train else (val_glob, train_glob)
                raise FileNotFoundError(f'{data_path} has {have} shards but no {want}: both splits are needed')
            for paths in (train, val):
                _check_no_missing_shard(paths)
            return {'train': train, 'val': val}
    return None


def _check_no_missing_shard(paths: Sequence[str]) -> None:
    """Hub-style names (NAME-00007-of-00294.parquet) say how many shards a split has: name the first one absent."""
    parsed = [HUB_SHARD_NAME.match(os.path.basename(p)) for p in paths]
    if not all(parsed):
        return
    counts = {(m['split'], int(m['n']), len(m['n'])) for m in parsed}
    if len(counts) != 1:
        return  # names of several series: nothing to infer
    (split, n, width), = counts
    present = {int(m['k']) for m in parsed}
    missing = [k for k in range(n) if k not in present]
    if missing:
        name = f'{split}-{missing[0]:0{width}d}-of-{n:0{width}d}.parquet'
        raise FileNotFoundError(f'shard {os.path.join(os.path.dirname(paths[0]), name)} is missing ({len(missing)} of '
                                f'the {n} {split} shards that the names announce): download it again')


def _class_names(schema: pa.Schema) -> Optional[List[str]]:
    """The label names of the Hub's features metadata (info.features.label.names), or None."""
    raw = (schema.metadata or {}).get(b'huggingface')
    try:
        names = json.loads(raw)['info']['features']['label']['names']
    except (TypeError, ValueError, KeyError):
        return None
    return [str(n) for n in names] if isinstance(names, list) else None


def _bytes_column(path: str, schema: pa.Schema) -> Tuple[str, bool]:
    """('image.bytes', has path) for the Hub's Image struct, ('image', False) for plain binary; else a ValueError."""
    import pyarrow as pa
    missing = [c for c in ('image', 'label') if c not in schema.names]
    if missing:
        raise ValueError(f"shard {path} has no {' and no '.join(repr(c) for c in missing)} column (columns: "
                         f"{', '.join(schema.names) or 'none'}): expected {COLUMNS_HELP}")
    image, label = schema.field('image').type, schema.field('label').type
    if not pa.types.is_integer(label):
        raise ValueError(f"shard {path}: its 'label' column is {label}, not integers: expected {COLUMNS_HELP}")
    if pa.types.is_struct(image) and image.get_field_index('bytes') >= 0:
        kind = image.field('bytes').type
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return 'image.bytes', image.get_field_index('path') >= 0
    elif pa.types.is_binary(image) or pa.types.is_large_binary(image):
        return 'image', False
    raise ValueError(f"shard {path}: its 'image' column is {image}: expected {COLUMNS_HELP}")


class LabelRange(NamedTuple):
    """The smallest and largest label of a shard (from its footer's statistics when they are there)."""
    low: int
    high: int


def _label_range(f: pq.ParquetFile, path: str) -> LabelRange:
    """The labels' range from the footer's per-row-group statistics (no data read); the `label` column itself only
    when a row group lacks them. A null label is refused: an unlabelled split cannot be trained on."""
    import pyarrow as pa
    meta = f.metadata
    leaf = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == 'label')
    stats = [meta.row_group(g).column(leaf).statistics for g in range(meta.num_row_groups)]
    if all(st is not None and st.has_min_max and st.has_null_count for st in stats):
        nulls, low, high = sum(st.null_count for st in stats), min(st.min for st in stats), max(st.max for st in stats)
    else:
        try:
            labels = f.read(columns=['label']).column(0)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"shard {path}: its 'label' column cannot be read ({e}): the file is corrupt, download "
                             f"it again") from None
        nulls = labels.null_count
        labels_N = labels.drop_null().to_numpy()
        low, high = (int(labels_N.min()), int(labels_N.max())) if len(labels_N) else (0, 0)
    if nulls:
        raise ValueError(f"shard {path}: {nulls} row(s) without a label (an unlabelled split such as the Hub's test "
                         f"split cannot be trained on)")
    return LabelRange(int(low), int(high))


def read_shard(path: str) -> Tuple[Shard, LabelRange, Optional[List[str]]]:
    """(Shard, label range, class names or None) of one shard, from its footer alone (its `label` column only when
    the footer has no statistics); a shard that cannot be used raises a ValueError naming it and what is wrong."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f'shard {path} is empty (0 bytes): download it again')
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f'shard {path} is not a readable parquet file ({size:,} bytes; {e}): it is truncated or '
                         f'corrupt, download it again') from None
    with f:
        schema = f.schema_arrow
        bytes_column, has_path = _bytes_column(path, schema)
        if f.metadata.num_rows == 0:
            raise ValueError(f'shard {path} holds no rows: remove it or download it again')
        labels = _label_range(f, path)
        groups = tuple(f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups))
    return Shard(path, groups, bytes_column, has_path), labels, _class_names(schema)


def _read_split(paths: Sequence[str]) -> Tuple[List[Shard], List[LabelRange], Optional[List[str]]]:
    """Every shard of a split checked; all shards must name the same classes."""
    shards, ranges, names = [], [], None
    for path in paths:
        shard, label_range, shard_names = read_shard(path)
        if shard_names is not None and names is not None and shard_names != names:
            raise ValueError(f'shard {path} names other classes than {shards[0].path} (its features metadata differ)')
        names = names if names is not None else shard_names
        shards.append(shard)
        ranges.append(label_range)
    return shards, ranges, names


def _check_labels(shards: Sequence[Shard], ranges: Sequence[LabelRange], num_classes: int) -> None:
    for shard, r in zip(shards, ranges):
        if r.low < 0 or r.high >= num_classes:
            unlabelled = " (-1 marks an unlabelled row, as in the Hub's test split)" if r.low == -1 else ''
            raise ValueError(f'shard {shard.path} has labels from {r.low} to {r.high}, outside 0..{num_classes - 1} '
                             f'({num_classes} classes){unlabelled}')


class ParquetImages(SkipUnreadable, Dataset):
    """The images of a split's shards, in shard order, with the reading rule of SkipUnreadable.

    `dataset[i]` / `dataset[(i, seed)]` -> (image_3HW in [-1, 1], class id), as SafeImageFolder. Picklable without
    open files: each process (a loader worker included) opens the shards it reads, lazily.
    """

    class_order = "the shards' label column"  # where class ids come from, for the logs

    def __init__(self, root: str, shards: Sequence[Shard], classes: List[str], transform: Callable,
                 cache_groups: int = CACHE_GROUPS):
        self.root, self.shards, self.classes, self.transform = root, list(shards), classes, transform
        self.cache_groups = cache_groups
        group_rows = [n for s in self.shards for n in s.group_rows]
        self.group_start = np.cumsum([0] + group_rows)  # (G + 1,) first row of each row group, then N
        self.group_shard = np.repeat(np.arange(len(self.shards)), [len(s.group_rows) for s in self.shards])
        self.group_in_shard = np.concatenate([np.arange(len(s.group_rows)) for s in self.shards])
        self.shard_start = np.cumsum([0] + [sum(s.group_rows) for s in self.shards])  # (S + 1,)
        self._init_skip_count()
        self._reset_handles()

    def _reset_handles(self) -> None:
        self._pid = os.getpid()
        self._files: 'OrderedDict[int, pq.ParquetFile]' = OrderedDict()
        self._groups: 'OrderedDict[int, Tuple[pa.Array, List[int]]]' = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_pid=None, _files=OrderedDict(), _groups=OrderedDict())  # handles stay in their process
        return state

    def __len__(self) -> int:
        return int(self.group_start[-1])

    def _file(self, s: int) -> pq.ParquetFile:
        import pyarrow.parquet as pq
        if s in self._files:
            self._files.move_to_end(s)
            return self._files[s]
        if len(self._files) >= MAX_OPEN_FILES:
            self._files.popitem(last=False)[1].close()
        f = self._files[s] = pq.ParquetFile(self.shards[s].path)
        return f

    def _row_group(self, g: int) -> Tuple[pa.Array, List[int]]:
        """(image bytes, labels) of global row group g, from this process's cache or its shard (the image column's
        `path` field is not read)."""
        if self._pid != os.getpid():  # a forked worker: the parent's handles and cache are not ours
            self._reset_handles()
        if g in self._groups:
            self._groups.move_to_end(g)
            return self._groups[g]
        s = int(self.group_shard[g])
        shard = self.shards[s]
        # one thread: a loader worker is given one core
        table = self._file(s).read_row_group(int(self.group_in_shard[g]), columns=[shard.bytes_column, 'label'],
                                             use_threads=False)
        images = table.column(0).combine_chunks()
        if shard.bytes_column != 'image':
            images = images.flatten()[0]  # struct<bytes> -> bytes, a null image giving a null value
        if len(self._groups) >= self.cache_groups:
            self._groups.popitem(last=False)
        self._groups[g] = images, table.column(1).to_pylist()
        return self._groups[g]

    def encoded_sample(self, index: int) -> Tuple[Optional[bytes], int]:
        g = int(np.searchsorted(self.group_start, index, side='right')) - 1
        images, labels = self._row_group(g)
        row = index - int(self.group_start[g])
        return images[row].as_py(), labels[row]

    def decode(self, data: Optional[bytes]) -> Image.Image:
        if data is None:
            raise ValueError('the row holds no image bytes')
        return pil_rgb_from_bytes(data)

    def _locate(self, index: int) -> Tuple[int, int]:
        s = int(np.searchsorted(self.shard_start, index, side='right')) - 1
        return s, index - int(self.shard_start[s])

    def image_name(self, index: int) -> str:
        s, row = self._locate(index)
        return f'{self.shards[s].path} row {row}'

    def relative_names(self, indices: Sequence[int]) -> List[str]:
        """The `path` each image has in its shard (its file name when the set was made), else 'SHARD#ROW'; reads the
        path field alone, never the image bytes."""
        import pyarrow.parquet as pq
        names: List[str] = []
        paths: Dict[int, List[Optional[str]]] = {}
        for index in indices:
            s, row = self._locate(int(index))
            shard = self.shards[s]
            if shard.has_path and s not in paths:
                with pq.ParquetFile(shard.path) as f:  # one shard at a time: indices come in shard order
                    paths = {s: f.read(columns=['image.path']).column(0).combine_chunks().flatten()[0].to_pylist()}
            stored = paths[s][row] if shard.has_path else None
            names.append(stored or f'{os.path.basename(shard.path)}#{row}')
        return names


def build_parquet_sets(shards: Dict[str, List[str]], train_tf: Callable, val_tf: Callable
                       ) -> Tuple[int, ParquetImages, ParquetImages]:
    """(num_classes, train_set, val_set) of the shards find_parquet_shards found; every shard is checked first.

    The classes are the train shards' label names (validation's must be the same), else str(id) for ids 0..max."""
    train_shards, train_ranges, names = _read_split(shards['train'])
    val_shards, val_ranges, val_names = _read_split(shards['val'])
    if names is not None and val_names is not None and val_names != names:
        raise ValueError(f'the validation shards name other classes than the train shards ({shards["val"][0]} vs '
                         f'{shards["train"][0]}): both splits must come from one data set')
    names = names if names is not None else val_names
    num_classes = len(names) if names is not None else max(max(r.high for r in train_ranges), 0) + 1
    classes = names if names is not None else [str(i) for i in range(num_classes)]
    _check_labels(train_shards, train_ranges, num_classes)
    _check_labels(val_shards, val_ranges, num_classes)
    root = {s: os.path.dirname(shards[s][0]) for s in shards}
    train_set = ParquetImages(root['train'], train_shards, classes, train_tf)
    val_set = ParquetImages(root['val'], val_shards, classes, val_tf)
    return num_classes, train_set, val_set
