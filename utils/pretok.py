# Pre-tokenised datasets for VAR training (arXiv 2404.02905): the tokenizer's multi-scale ids stored once, on disk.
"""The on-disk format written by pretokenize.py and the dataset train.py reads with `--pretok DIR`.

A token set trades the official augmentation (a new random crop every epoch) for speed: every image is tokenised
once, at one fixed crop (flip first when asked, resize the shorter edge to round(mid_reso * reso) with LANCZOS,
centre crop), optionally with its horizontally flipped variant. It is never the default.

Layout of DIR (everything but meta.json is written before it; meta.json is written last, atomically, so its
presence means the set is complete):

    meta.json            format, patch_nums, vocab_size, final_reso, mid_reso, variants, classes, splits (size,
                         variants, skipped files), the tokenizer's fingerprint and config, the encode precision
    {split}_tokens.npy   (N, n_variants, L) uint16 (int32 when vocab_size > 65536); variant 0 = as is, 1 = flipped
                         (train only: validation reads variant 0, so val stores that one alone)
    {split}_labels.npy   (N,) int64 class ids
    {split}_files.txt    the N source files, relative to the split folder (provenance); from parquet shards, the
                         path stored with each image, else SHARD#ROW

`PretokenizedDataset[i]` / `[(i, seed)]` returns (gt_BL row as int64 (L,), class id), drawing the flip variant
exactly like `utils.data.TrainTransform` draws its flip (one uniform from the per-sample generator).
"""
import hashlib
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from utils.ckpt import atomic_write

FORMAT = 'var-pretok-v1'
META_NAME = 'meta.json'
VARIANTS = ('orig', 'hflip')


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def split_paths(root: str, split: str) -> Dict[str, str]:
    return {k: os.path.join(root, f'{split}_{k}.{ext}')
            for k, ext in (('tokens', 'npy'), ('labels', 'npy'), ('files', 'txt'))}


# the tokenizer settings that change token ids besides the weights (dropout and beta only matter in training;
# default_qresi_counts is the number of Phi layers, which the state dict's keys already fix)
TOKEN_CONFIG_KEYS = ('vocab_size', 'z_channels', 'ch', 'ch_mult', 'using_znorm', 'quant_conv_ks', 'quant_resi',
                     'share_quant_resi')


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """sha256 over the tokenizer's id-relevant settings and its parameters and buffers (names, shapes, dtypes, bytes;
    the ema usage statistics excluded).

    Two tokenizers with the same fingerprint give the same tokens; train.py refuses a token set made by another one.
    """
    h = hashlib.sha256()
    config = {k: vae.config[k] for k in TOKEN_CONFIG_KEYS}
    h.update(json.dumps(config, sort_keys=True).encode())
    state_dict = vae.state_dict()
    for k in sorted(state_dict):
        if 'ema_vocab_hit' in k:  # usage statistics: change during training, never affect the ids
            continue
        t = state_dict[k].detach().cpu().contiguous()
        h.update(f'{k}:{tuple(t.shape)}:{t.dtype};'.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()


def read_meta(root: str) -> Dict[str, Any]:
    path = os.path.join(root, META_NAME)
    if not os.path.isfile(path):
        hint = ' (unfinished: re-run the same pretokenize.py command to complete it)' \
            if os.path.isdir(os.path.join(root, 'parts')) else ''
        raise FileNotFoundError(f'{path} not found: --pretok must be a folder written by pretokenize.py{hint}')
    with open(path) as f:
        meta = json.load(f)
    if meta.get('format') != FORMAT:
        raise ValueError(f'{path}: unknown format {meta.get("format")!r} (expected {FORMAT!r})')
    return meta


def write_meta(root: str, meta: Mapping[str, Any]) -> None:
    atomic_write(os.path.join(root, META_NAME), lambda f: json.dump(meta, f, indent=1), mode='w')


def check_compatible(meta: Mapping[str, Any], root: str, patch_nums: Sequence[int], vocab_size: int,
                     fingerprint: str, final_reso: Optional[int] = None) -> None:
    """Raise a ValueError naming every difference between a token set and the run that wants to read it."""
    problems = []
    if tuple(meta['patch_nums']) != tuple(patch_nums):
        problems.append(f'patch_nums {tuple(meta["patch_nums"])} in the set, {tuple(patch_nums)} in this run (--pn)')
    if int(meta['vocab_size']) != int(vocab_size):
        problems.append(f'vocab_size {meta["vocab_size"]} in the set, {vocab_size} for this tokenizer')
    if final_reso is not None and int(meta['final_reso']) != int(final_reso):
        problems.append(f'image size {meta["final_reso"]} in the set, {final_reso} in this run (--patch_size)')
    if meta['vae_fingerprint'] != fingerprint:
        problems.append(f'the set was made by another tokenizer (fingerprint {meta["vae_fingerprint"][:12]}..., '
                        f'this run\'s {fingerprint[:12]}...; it was made from {meta.get("vae_ckpt", "?")})')
    if problems:
        raise ValueError(f'the token set {root} does not fit this run: ' + '; '.join(problems)
                         + '. Re-run pretokenize.py with this tokenizer and these scales.')


class PretokenizedDataset(Dataset):
    """One split of a token set; the token array is memory-mapped lazily in each process (loader workers too).

    Args:
        root: the folder written by pretokenize.py.
        split: 'train' or 'val'.
        hflip: draw the flipped variant with probability 1/2 (needs a set written with --hflip=1).
    """

    def __init__(self, root: str, split: str, hflip: bool = False, meta: Optional[Mapping[str, Any]] = None):
        self.root, self.split, self.hflip = root, split, hflip
        self.meta = dict(meta) if meta is not None else read_meta(root)
        if split not in self.meta['splits']:
            raise ValueError(f'the token set {root} has no {split!r} split (it has {sorted(self.meta["splits"])})')
        self.paths = split_paths(root, split)
        self.n_variants = self.meta['splits'][split]['n_variants']
        if hflip and self.n_variants < 2:
            raise ValueError(f'--hflip needs flipped variants, but the token set {root} was written without them: '
                             f're-run pretokenize.py with --hflip=1, or train with --hflip=0')
        self.classes: List[str] = list(self.meta['classes'])
        self.targets: List[int] = np.load(self.paths['labels']).tolist()
        self._tokens: Optional[np.ndarray] = None
        n = self.meta['splits'][split]['n']
        if len(self.targets) != n:
            raise ValueError(f'{self.paths["labels"]} holds {len(self.targets)} labels, meta.json says {n}')
        shape = self.tokens.shape
        L = sum(p * p for p in self.meta['patch_nums'])
        if shape != (n, self.n_variants, L):
            raise ValueError(f'{self.paths["tokens"]} has shape {shape}, expected {(n, self.n_variants, L)}')

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.load(self.paths['tokens'], mmap_mode='r')
        return self._tokens

    def __getstate__(self):  # loader workers re-open the memory map
        state = dict(self.__dict__)
        state['_tokens'] = None
        return state

    @property
    def num_skipped(self) -> int:
        """Unreadable images are dropped when the set is written (listed in meta.json); none are skipped here."""
        return 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key) -> Tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        variant = 0
        if self.hflip:
            generator = None
            if seed is not None:
                generator = torch.Generator()
                generator.manual_seed(seed)
            variant = int(torch.rand(1, generator=generator).item() < 0.5)
        ids_L = torch.from_numpy(self.tokens[index, variant].astype(np.int64))
        return ids_L, self.targets[index]


def build_pretok_dataset(root: str, hflip: bool) -> Tuple[int, PretokenizedDataset, PretokenizedDataset, Dict]:
    """(num_classes, train_set, val_set, meta) of a token set; val always reads the unflipped variant."""
    meta = read_meta(root)
    train_set = PretokenizedDataset(root, 'train', hflip=hflip, meta=meta)
    val_set = PretokenizedDataset(root, 'val', hflip=False, meta=meta)
    return len(meta['classes']), train_set, val_set, meta
