"""Process-level run set-up shared by the trainers and the scripts: seeds, TF32, the device of this rank, the
autocast dtype of the `--fp16` flag, per-rank generators, and the graceful stop on SIGINT / SIGTERM.

This is the one source of these facts: every script and trainer asks here (see docs/architecture.md)."""
import contextlib
import random
import signal
import sys
import threading
import time
from typing import Callable, Dict, Iterator, Optional

import numpy as np
import torch

import dist


def seed_everything(seed: Optional[int], rank: int, world_size: int, benchmark: bool) -> None:
    """Seed python, numpy and torch with seed*world_size + rank (nothing without a seed); cudnn as officially."""
    torch.backends.cudnn.enabled = True
    torch.backends.cudnn.benchmark = benchmark
    if seed is None:
        torch.backends.cudnn.deterministic = False
        return
    torch.backends.cudnn.deterministic = True
    s = seed * world_size + rank
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    torch.cuda.manual_seed_all(s)


# The `--fp16` flag of every script and trainer (official): 0 float32, 1 float16 autocast, 2 bfloat16 autocast.
FP16_DTYPES: Dict[int, Optional[torch.dtype]] = {0: None, 1: torch.float16, 2: torch.bfloat16}


def autocast_dtype(fp16: int) -> Optional[torch.dtype]:
    """The autocast dtype of `--fp16` (None: float32, no autocast)."""
    return FP16_DTYPES[fp16]


def autocast_context(fp16: int, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for inference under `--fp16` on a CUDA device; the CPU stays in float32 (as the scripts always did)."""
    dtype = autocast_dtype(fp16)
    if dtype is None or device.type != 'cuda':
        return contextlib.nullcontext()
    return torch.autocast('cuda', dtype=dtype)


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and convolutions on or off (a process-wide switch: scripts call it, imports never do)."""
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.set_float32_matmul_precision('high' if enabled else 'highest')


def resolve_device(name: str) -> torch.device:
    """'' -> this rank's CUDA device or the CPU; 'cuda' without an index -> this rank's CUDA device."""
    device = torch.device(name) if name else dist.get_device()
    if device.type == 'cuda' and device.index is None:
        device = dist.get_device()
    return device


def rank_generator(seed: Optional[int], rank: int, world_size: int) -> Optional[torch.Generator]:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed * world_size + rank)
    return g


@torch.no_grad()
def check_ranks_agree(module: torch.nn.Module) -> None:
    """Raise RuntimeError when the ranks hold different weights of `module`.

    DDP keeps the replicas bit-identical (same start, same averaged gradients, same optimizer step), so a difference
    means that gradient synchronisation was lost. A collective: every rank calls it, and every rank raises together.
    Nothing is checked in a single process.
    """
    if dist.get_world_size() == 1:
        return
    sums = torch.zeros(2, dtype=torch.float64)
    for p in module.parameters():
        p64 = p.detach().double()
        sums += torch.stack([p64.sum(), p64.square().sum()]).cpu()
    per_rank = dist.allgather_object(sums.tolist())
    if any(s != per_rank[0] for s in per_rank):
        raise RuntimeError(f'the ranks hold different weights (sum, sum of squares per rank: {per_rank}): gradient '
                           f'synchronisation was lost; the last checkpoint on disk is untouched')


class GracefulStop:
    """SIGINT / SIGTERM ask the run to checkpoint and stop at the next safe iteration instead of dying mid-epoch.

    The first signal only sets a flag; a second SIGINT at least a second later interrupts at once, as usual (one
    sooner is the same Ctrl-C again: a terminal signals torchrun and its workers, and torchrun forwards it to the
    workers a moment later). `requested()` is asked at the end of accumulation cycles; under torch.distributed it
    takes the flag's maximum over the ranks, so every rank stops at the same iteration even though the signals arrive
    at different moments. A cluster's SIGTERM before preemption is handled the same way.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_S = 1.0  # a second SIGINT sooner than this is the same request

    def __init__(self, device: torch.device):
        self.device = device
        self.flag = False
        self.first_at = 0.0
        self.previous = {}
        self.after_epoch = False  # stop after the epoch-end checkpoint
        self._flag_1 = None  # the all-reduced flag, allocated once

    def __enter__(self) -> 'GracefulStop':
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.flag:
            if signum == signal.SIGINT and time.monotonic() - self.first_at >= self.REPEAT_S:
                raise KeyboardInterrupt  # asked twice: stop now
            return
        self.flag, self.first_at = True, time.monotonic()
        print(f'[rank {dist.get_rank()}] {signal.Signals(signum).name}: saving a checkpoint at the next iteration '
              f'boundary, then stopping (press Ctrl-C again to stop at once, without saving)', file=sys.stderr,
              flush=True)

    def requested(self) -> bool:
        """Whether any rank was signalled (a collective under torch.distributed: call it on every rank)."""
        if not dist.is_initialized():
            return self.flag
        if self._flag_1 is None:
            self._flag_1 = torch.zeros(1, device=self.device)
        self._flag_1.fill_(1.0 if self.flag else 0.0)
        return dist.allreduce(self._flag_1, op='max').item() > 0

    def at_cycle_end(self, ep: int, it: int, iters: int, save: Callable[[int, int], None]) -> None:
        """Call on every rank after iteration `it` of epoch `ep` that ended an accumulation cycle. On a request:
        mid-epoch, `save(ep, it + 1)` and raise StopTraining; at the epoch's last iteration, stop after the epoch-end
        checkpoint (see `at_epoch_end`)."""
        if not self.requested():
            return
        if it + 1 < iters:
            save(ep, it + 1)
            raise StopTraining(f'stopped on request at epoch {ep}, iteration {it + 1}: checkpoint written; re-run the '
                               f'same command to resume')
        self.after_epoch = True

    def at_epoch_end(self, ep: int, ep_total: int) -> None:
        """Call after the checkpoint of epoch `ep`: raise StopTraining if a stop came at that epoch's last iteration."""
        if self.after_epoch and ep + 1 < ep_total:
            raise StopTraining(f'stopped on request after epoch {ep}: checkpoint written; re-run the same command to '
                               f'resume')


class ConfigError(Exception):
    """The run's set-up is wrong (a path, a flag, a checkpoint of another run): `main` prints the message alone, with
    no traceback, and exits with code 2."""


@contextlib.contextmanager
def user_errors(*types: type) -> Iterator[None]:
    """Errors of these types raised inside come from the user's set-up: re-raised as ConfigError."""
    try:
        yield
    except types as e:
        raise ConfigError(str(e)) from e


class StopTraining(Exception):
    """Raised after the checkpoint of a requested stop was written; `main` turns it into exit code 130."""
