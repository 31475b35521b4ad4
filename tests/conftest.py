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
    """`sampling_models` saved as a checkpoint of this project's train.py (what --ckpt and VAR_DEMO_CKPT take), for
    the sampling and the web demo's tests."""
    vae, var = sampling_models
    path = tmp_path_factory.mktemp('ckpt') / 'tiny.pth'
    torch.save({'trainer': {'var_wo_ddp': var.state_dict(), 'vae_local': vae.state_dict()},
                'model_config': dict(var.build_config), 'vae_config': vae.config}, path)
    return str(path)


def pytest_terminal_summary(terminalreporter):
    """The settings that fix float rounding on the CPU, at the end of every run (`make test-matrix` varies them)."""
    import os
    caps = ' '.join(f'{k}={os.environ[k]}' for k in ('ATEN_CPU_CAPABILITY', 'MKL_ENABLE_INSTRUCTIONS',
                                                    'ONEDNN_MAX_CPU_ISA') if k in os.environ)
    terminalreporter.write_line(f'torch {torch.__version__}; CPU kernels: {torch.backends.cpu.get_cpu_capability()}'
                                f'{f" ({caps})" if caps else ""}; intra-op threads: {torch.get_num_threads()}')
