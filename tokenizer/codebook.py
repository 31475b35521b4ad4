# Codebook upkeep for the multi-scale quantiser of VAR's tokenizer (arXiv 2404.02905, section 3.2): which Phi
# convolutions the scales use, which codes are dead, and fresh vectors to revive them with.
"""Codebook upkeep: the Phi convolutions a scale schedule uses, the dead-code mask, replacement code vectors.

Shape legend: S scales, V codebook size, N latent vectors, C their width (Cvae).
"""
from typing import List, Sequence

import torch

from models.quant import _nearest_tick, _phi_ticks


def phi_indices_used(patch_nums: Sequence[int], num_phis: int) -> List[int]:
    """Which of a partially shared quantiser's `num_phis` Phi convolutions the scales select (see models/quant.py)."""
    SN = len(patch_nums)
    ticks = _phi_ticks(num_phis)
    return sorted({_nearest_tick(ticks, si / (SN - 1) if SN > 1 else 1.0) for si in range(SN)})


@torch.no_grad()
def dead_code_mask(ema_vocab_hit_SV: torch.Tensor, threshold: float) -> torch.Tensor:
    """Codes whose EMA hit count, summed over all scales, is below `threshold` -> bool (V,)."""
    return ema_vocab_hit_SV.sum(0) < threshold


@torch.no_grad()
def replacement_codes(f_NC: torch.Tensor, n: int, generator: torch.Generator, noise: float = 0.01) -> torch.Tensor:
    """`n` new code vectors: latent vectors drawn from `f_NC` (with replacement when n > N) plus a little noise."""
    N = f_NC.shape[0]
    pick = torch.randint(0, N, (n,), generator=generator, device=generator.device).to(f_NC.device)
    chosen = f_NC[pick]
    jitter = torch.randn(chosen.shape, generator=generator, device=generator.device).to(f_NC.device)
    return chosen + noise * chosen.std() * jitter


__all__ = ['phi_indices_used', 'dead_code_mask', 'replacement_codes']
