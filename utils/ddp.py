"""The model wrappers of a run: DDP and torch.compile around the plain module, and the way back to it."""
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP and/or torch.compile wrappers."""
    module = module.module if isinstance(module, DDP) else module
    return getattr(module, '_orig_mod', module)
