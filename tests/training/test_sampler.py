"""DistInfiniteBatchSampler / EvalDistributedSampler semantics (spec section 7), including a mid-epoch resume."""
import collections
import itertools

import pytest
import torch

from utils.data_sampler import DistInfiniteBatchSampler, EvalDistributedSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def epoch_batches(N, glb, ws, epoch=0, **kw):
    """The batches of every rank for one epoch (the sampler starting at that epoch)."""
    out = []
    for r in range(ws):
        s = DistInfiniteBatchSampler(ws, r, N, glb, start_ep=epoch, **kw)
        out.append(take(s, len(s)))
    return out


@pytest.mark.parametrize('N,glb,ws', [(96, 16, 4), (103, 16, 4), (7, 4, 2), (50, 12, 3)])
def test_every_sample_once_per_epoch_across_ranks(N, glb, ws):
    per_rank = epoch_batches(N, glb, ws, fill_last=True)
    seen = collections.Counter(i for batches in per_rank for b in batches for i in b)
    iters = -(-N // glb)
    assert all(len(batches) == iters for batches in per_rank)
    assert all(len(b) == glb // ws for batches in per_rank for b in batches)
    assert set(seen) == set(range(N))
    # fill_last pads with the first indices of the epoch's permutation: exactly those are seen twice
    order = DistInfiniteBatchSampler(ws, 0, N, glb, fill_last=True).epoch_order(0)
    padded = set(order[:iters * glb - N].tolist())
    assert {i for i, c in seen.items() if c == 2} == padded and max(seen.values()) <= 2


def test_rank_split_is_contiguous_and_identical_order_on_all_ranks():
    N, glb, ws = 64, 16, 4
    order = DistInfiniteBatchSampler(ws, 0, N, glb, fill_last=True).epoch_order(3)
    for r in range(ws):
        s = DistInfiniteBatchSampler(ws, r, N, glb, fill_last=True, start_ep=3)
        flat = [i for b in take(s, len(s)) for i in b]
        assert flat == order[r * 16:(r + 1) * 16].tolist()  # rank r: one contiguous slice of the epoch order


def test_epochs_are_seeded_by_epoch_number():
    s = DistInfiniteBatchSampler(1, 0, 20, 4)
    g = torch.Generator()
    g.manual_seed(5)
    assert s.epoch_order(5).tolist() == torch.randperm(20, generator=g).tolist()
    assert s.epoch_order(0).tolist() != s.epoch_order(1).tolist()
    seeded = DistInfiniteBatchSampler(1, 0, 20, 4, same_seed_for_all_ranks=3)
    assert seeded.epoch_order(2).tolist() == s.epoch_order(5).tolist()
    assert DistInfiniteBatchSampler(1, 0, 20, 4, shuffle=False).epoch_order(7).tolist() == list(range(20))


@pytest.mark.parametrize('aug_seed', [None, 7])
def test_resume_mid_epoch_yields_the_same_remaining_batches(aug_seed):
    N, glb, ws = 50, 12, 2
    for r in range(ws):
        full = DistInfiniteBatchSampler(ws, r, N, glb, fill_last=True, aug_seed=aug_seed)
        iters = len(full)
        stream = take(full, 4 * iters)
        for start_ep, start_it in [(0, 1), (1, 3), (2, 0), (2, iters - 1)]:
            resumed = DistInfiniteBatchSampler(ws, r, N, glb, fill_last=True, aug_seed=aug_seed,
                                               start_ep=start_ep, start_it=start_it)
            k = start_ep * iters + start_it
            assert take(resumed, len(stream) - k) == stream[k:], (start_ep, start_it)


def test_start_it_out_of_range_is_an_error():
    with pytest.raises(ValueError, match='start_it'):
        DistInfiniteBatchSampler(1, 0, 10, 5, start_it=2)
    with pytest.raises(ValueError, match='multiple'):
        DistInfiniteBatchSampler(3, 0, 10, 8)


def test_augmentation_seeds_do_not_depend_on_the_number_of_ranks():
    N, glb = 40, 8
    pairs = {}
    for ws in (1, 2, 4):
        got = []
        for r in range(ws):
            s = DistInfiniteBatchSampler(ws, r, N, glb, fill_last=True, aug_seed=11, start_ep=1)
            got += [p for b in take(s, len(s)) for p in b]
        pairs[ws] = sorted(got)
    assert pairs[1] == pairs[2] == pairs[4]
    seeds = [sd for _, sd in pairs[1]]
    assert len(set(seeds)) == len(seeds)


@pytest.mark.parametrize('fill_last', [False, True])
def test_repeated_aug_repeats_each_of_the_first_samples_consecutively(fill_last):
    N, glb, r = 10, 4, 3
    s = DistInfiniteBatchSampler(1, 0, N, glb, repeated_aug=r, fill_last=fill_last)
    order = s.epoch_order(2).tolist()
    perm = DistInfiniteBatchSampler(1, 0, N, glb).epoch_order(2).tolist()
    first = perm[:-(-N // r)]  # the first ceil(N/r) indices of the permutation, each repeated r times in a row
    assert len(order) == len(s) * glb == 12
    assert order == [i for i in first for _ in range(r)]
    assert all(order[k] == order[k + 1] == order[k + 2] for k in range(0, 12, 3))
    flat = [i for b in take(DistInfiniteBatchSampler(1, 0, N, glb, repeated_aug=r, fill_last=fill_last,
                                                     start_ep=2), len(s)) for i in b]
    assert flat == order


def test_eval_sampler_covers_each_index_once():
    ds = list(range(23))
    parts = [list(EvalDistributedSampler(ds, 4, r)) for r in range(4)]
    assert sum(parts, []) == ds  # contiguous, in order, no padding
    assert [len(p) for p in parts] == [len(EvalDistributedSampler(ds, 4, r)) for r in range(4)]
    assert list(EvalDistributedSampler([0, 1], 4, 0)) == []  # more ranks than samples: some ranks get nothing
