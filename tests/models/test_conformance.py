"""Parity with the official VAR numerics, through the shared conformance tool and its golden vectors."""
import importlib.util

import pytest

from support import shared_path

CHECKS = ['load_state_dict', 'img_to_idxBl', 'idxBl_to_var_input', 'idxBl_to_img', 'img_to_reconstructed_img',
          'vae_forward', 'var_forward_logits', 'greedy_sample_cfg1.5', 'greedy_sample_cfg4.0', 'zero_shot_inpaint',
          'seeded_sample']


@pytest.fixture(scope='module')
def conformance_results():
    tool = shared_path('tools', 'conformance.py')
    golden = shared_path('golden', 'tiny_pn4.pt')
    spec = importlib.util.spec_from_file_location('conformance_tool', tool)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _, results = mod.check_one(str(golden))
    return {check: (ok, msg) for check, ok, _, msg in results}


@pytest.mark.parametrize('check', CHECKS)
def test_official_parity(conformance_results, check):
    ok, msg = conformance_results[check]
    assert ok, f'{check}: {msg}'
