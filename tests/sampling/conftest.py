"""Fixtures of the sampling tests: one tiny 64 px, 10-class model and its train.py-format checkpoint, built once."""
import pytest
import torch

from support import TINY


@pytest.fixture(scope='session')
def sampling_models():
    """A tiny (vae, var) pair in eval mode (64 px images, 10 classes, scales 1..4). Read-only: tests that change
    weights build their own."""
    from models import build_vae_var
    torch.manual_seed(0)
    vae, var = build_vae_var(device='cpu', **TINY)
    # the default gamma init (1e-5) makes the blocks near-identity; a larger one gives sampling a real signal
    var.init_weights(init_adaln=0.5, init_adaln_gamma=0.5, init_head=1.0, init_std=-1)
    return vae.eval(), var.eval()


@pytest.fixture(scope='session')
def tiny_ckpt(tmp_path_factory, sampling_models):
    """`sampling_models` saved as a checkpoint of this project's train.py (what --ckpt and VAR_DEMO_CKPT take)."""
    vae, var = sampling_models
    path = tmp_path_factory.mktemp('ckpt') / 'tiny.pth'
    torch.save({'trainer': {'var_wo_ddp': var.state_dict(), 'vae_local': vae.state_dict()},
                'model_config': dict(var.build_config), 'vae_config': vae.config}, path)
    return str(path)
