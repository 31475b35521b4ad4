# Samplers of the VAR training recipe (arXiv 2404.02905): an infinite distributed batch sampler and the eval split.
"""Distributed samplers.

`DistInfiniteBatchSampler` follows the official semantics (per-epoch permutation seeded by the epoch, fill_last,
contiguous rank split) and, unlike the official one, really starts at `start_it` inside `start_ep`, so a run resumed
mid-epoch sees exactly the batches it would have seen. With `aug_seed` set, every index comes paired with a
per-sample seed for the data augmentation, derived from (aug_seed, epoch, global position); augmentation is then
reproducible whatever the number of ranks or loader workers, and across a resume.
"""
from typing import Iterator, List, Optional, Tuple, Union

import torch
from torch.utils.data import Sampler

Batch = List[Union[int, Tuple[int, int]]]


def _contiguous_bounds(n: int, world_size: int) -> List[int]:
    # Rank r owns [b[r], b[r+1]) with b = linspace(0, n, world_size + 1) truncated to ints.
    return torch.linspace(0, n, world_size + 1, dtype=torch.float64).long().tolist()


def sample_seed(aug_seed: int, epoch: int, position: int) -> int:
    """A 62-bit seed for the sample at `position` of the global order of `epoch` (splitmix-style mixing)."""
    x = (aug_seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + position * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) % (1 << 64)
    return x >> 2


class DistInfiniteBatchSampler(Sampler[Batch]):
    """Yields this rank's batches forever, epoch after epoch; `len()` is the number of iterations per epoch.

    Args:
        world_size, rank: the process layout.
        dataset_len: number of samples N.
        glb_batch_size: batch over all ranks; must be a multiple of world_size.
        same_seed_for_all_ranks: added to the epoch to seed the permutation (identical on all ranks).
        repeated_aug: >1 repeats each of the first ceil(N/r) samples r times (unused by the recipe).
        fill_last: pad the epoch to iters_per_ep*glb_batch_size with the first indices of its permutation.
        shuffle: permute every epoch (else natural order).
        start_ep, start_it: where to start (the first batch is batch `start_it` of epoch `start_ep`).
        aug_seed: if not None, yield (index, per-sample seed) pairs instead of plain indices.
    """

    def __init__(self, world_size: int, rank: int, dataset_len: int, glb_batch_size: int,
                 same_seed_for_all_ranks: int = 0, repeated_aug: int = 0, fill_last: bool = False,
                 shuffle: bool = True, start_ep: int = 0, start_it: int = 0, aug_seed: Optional[int] = None):
        if glb_batch_size % world_size != 0:
            raise ValueError(f'glb_batch_size={glb_batch_size} is not a multiple of world_size={world_size}')
        if dataset_len <= 0:
            raise ValueError('the dataset is empty')
        self.world_size, self.rank = world_size, rank
        self.dataset_len = dataset_len
        self.glb_batch_size = glb_batch_size
        self.batch_size = glb_batch_size // world_size
        self.iters_per_ep = (dataset_len + glb_batch_size - 1) // glb_batch_size
        self.same_seed_for_all_ranks = same_seed_for_all_ranks
        self.repeated_aug = repeated_aug
        self.fill_last = fill_last
        self.shuffle = shuffle
        if not 0 <= start_it < self.iters_per_ep:
            raise ValueError(f'start_it={start_it} is outside [0, {self.iters_per_ep})')
        self.start_ep, self.start_it = start_ep, start_it
        self.aug_seed = aug_seed

    def __len__(self) -> int:
        return self.iters_per_ep

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The global order of `epoch` (identical on every rank), after repeated_aug and fill_last."""
        n, target = self.dataset_len, self.iters_per_ep * self.glb_batch_size
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(epoch + self.same_seed_for_all_ranks)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.repeated_aug > 1:
            order = order[:(n + self.repeated_aug - 1) // self.repeated_aug]
            order = order.repeat_interleave(self.repeated_aug)[:target]
        if self.fill_last:
            # Pad with the first indices of the permutation (repeated if the batch exceeds twice the dataset).
            while order.numel() < target:
                order = torch.cat((order, order[:target - order.numel()]))
        return order

    def rank_slice(self, epoch: int) -> Tuple[int, torch.Tensor]:
        """(global position of this rank's first index, this rank's contiguous slice of the epoch order)."""
        order = self.epoch_order(epoch)
        bounds = _contiguous_bounds(order.numel(), self.world_size)
        return bounds[self.rank], order[bounds[self.rank]:bounds[self.rank + 1]]

    def __iter__(self) -> Iterator[Batch]:
        epoch, first_it = self.start_ep, self.start_it
        while True:
            offset, idx = self.rank_slice(epoch)
            idx = idx.tolist()
            for it in range(first_it, self.iters_per_ep):
                lo, hi = it * self.batch_size, (it + 1) * self.batch_size
                if lo >= len(idx):
                    break
                if self.aug_seed is None:
                    yield idx[lo:hi]
                else:
                    yield [(i, sample_seed(self.aug_seed, epoch, offset + p)) for p, i in enumerate(idx[lo:hi], lo)]
            epoch, first_it = epoch + 1, 0


class EvalDistributedSampler(Sampler[int]):
    """No shuffling, no padding: rank r evaluates the contiguous indices [b[r], b[r+1]) of b = linspace(0, N, ws+1)."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        lo, hi = _contiguous_bounds(len(dataset), num_replicas)[rank:rank + 2]
        self.indices = list(range(lo, hi))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
