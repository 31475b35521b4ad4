"""Every key, shape and parameter count of the official checkpoints, built on the meta device."""
import json

import pytest

from support import shared_path
from models import PRESETS, build_vae_var


@pytest.fixture(scope='module')
def manifest():
    return json.loads(shared_path('golden', 'official_state_dict_keys.json').read_text())


def _shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize('name', ['d16', 'd20', 'd24', 'd30', 'd36'])
def test_var_keys_and_shapes(manifest, name):
    ref = manifest[f'var_{name}']
    cfg = ref['config']
    _, var = build_vae_var(device='meta', **PRESETS[name])
    assert tuple(cfg['patch_nums']) == var.patch_nums and cfg['shared_aln'] == PRESETS[name]['shared_aln']
    got = _shapes(var)
    assert set(got) == set(ref['state_dict']), (sorted(set(got) ^ set(ref['state_dict']))[:10])
    assert got == ref['state_dict']
    assert sum(p.numel() for p in var.parameters()) == ref['num_params']
    assert all(v.device.type == 'meta' for v in var.state_dict().values())


def test_vae_keys_and_shapes(manifest):
    ref = manifest['vae_ch160v4096z32']
    vae, _ = build_vae_var(device='meta', depth=16)
    assert _shapes(vae) == ref['state_dict']
    assert sum(p.numel() for p in vae.parameters()) == ref['num_params']
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


def test_meta_build_allocates_nothing():
    vae, var = build_vae_var(device='meta', **PRESETS['d36'])
    assert all(t.is_meta for t in list(var.parameters()) + list(var.buffers()) + list(vae.parameters()))
