"""Process-level run set-up shared by the trainers: seeds, TF32, the device of this rank, per-rank generators."""
import random
from typing import Optional

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


def set_tf32(enabled: bool) -> None:
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
