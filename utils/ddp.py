"""The model wrappers of a run: DDP and torch.compile around the plain module, the way back to it, and the bucket
warm-up that makes a resumed multi-process run add gradients in the uninterrupted run's order."""
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP and/or torch.compile wrappers."""
    module = module.module if isinstance(module, DDP) else module
    return getattr(module, '_orig_mod', module)


def ddp_of(module: Optional[nn.Module]) -> Optional[DDP]:
    """The DDP wrapper of a training module (under torch.compile, the compiled module's inner one), or None."""
    module = getattr(module, '_orig_mod', module)
    return module if isinstance(module, DDP) else None


def settle_ddp_buckets(throwaway_backward: Callable[[], None], optimizers: Iterable[torch.optim.Optimizer],
                       device: torch.device) -> None:
    """Run one throwaway synced backward of zero-weighted outputs through the DDP modules of a run that resumes.

    DDP reduces its first synced backward in buckets laid out in parameter order and rebuilds them, in the order the
    gradients became ready, for every later one. With three or more ranks the two layouts add the
    ranks' gradients in different orders, so a resumed run's first step would differ in round-off from the
    uninterrupted run's step (which used the rebuilt layout). `throwaway_backward` (the trainer's own: the forward of
    a real step on a zero batch, its outputs times 0, backward) lets DDP rebuild first. The RNG states are forked
    around it and the gradients dropped; the caller restores any buffer the forward changed.
    """
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        throwaway_backward()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
