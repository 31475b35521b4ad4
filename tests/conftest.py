"""Shared test fixtures: the `../shared` ground truth (skipped with a reason when absent) and tiny models."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY = dict(patch_nums=(1, 2, 3, 4), V=64, Cvae=8, ch=32, share_quant_resi=4, depth=2, num_classes=10)


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip: CI has it beside the checkout, a user's clone usually does not."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f'{p} is absent (the ground truth lives in ../shared beside the checkout)')
    return p


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


def requires_cuda():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
