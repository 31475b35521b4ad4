"""Fixtures shared by the whole suite (helpers that are not fixtures live in support.py)."""
import pytest
import torch

from support import TINY


@pytest.fixture
def tiny_models():
    """A tiny (vae, var) pair in eval mode with a deterministic init and no condition drop."""
    from models import build_vae_var
    torch.manual_seed(0)
    vae, var = build_vae_var(device='cpu', **TINY)
    # the default gamma init (1e-5) makes blocks near-identity; a larger one gives the tests a real signal
    var.init_weights(init_adaln=0.5, init_adaln_gamma=0.5, init_head=1.0, init_std=-1)
    var.cond_drop_rate = 0.0
    return vae.eval(), var.eval()
