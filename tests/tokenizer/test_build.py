"""The builders of a tokenizer run (tokenizer/build.py): the trainable VQVAE and its --vae_init check, the optimiser's
groups, and the step results as floats."""
import pytest
import torch

from tokenizer.args import derive_vae, parse_vae_args
from tokenizer.build import build_vqvae, make_opt, step_scalars

TINY = ['--vae_ch=32', '--vae_ch_mult=1_1_2', '--vocab=64', '--cvae=8', '--pn=1_2_4', '--share_qresi=4', '--afuse=0']


def _vae(argv=()):
    args = parse_vae_args([*TINY, *argv])
    torch.manual_seed(0)
    return build_vqvae(args, derive_vae(args, world_size=1), torch.device('cpu')), args


def test_build_vqvae_freezes_the_phi_no_scale_selects():
    vae, _ = _vae()
    frozen = [k for k, phi in enumerate(vae.quantize.quant_resi.qresi_ls) if not phi.weight.requires_grad]
    assert len(frozen) == 1  # 3 scales select 3 of the 4 shared Phis
    assert vae.training and all(p.requires_grad for n, p in vae.named_parameters() if 'quant_resi' not in n)


def test_vae_init_of_another_architecture_names_the_flags_to_pass(tmp_path):
    vae, _ = _vae()
    torch.save({'vae_config': dict(vae.config), 'vae': vae.state_dict()}, tmp_path / 'vae.pth')
    loaded, _ = _vae([f'--vae_init={tmp_path / "vae.pth"}'])
    for (name, a), b in zip(vae.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match=r'--vocab=64 --cvae=8 --vae_ch=32 --vae_ch_mult=1_1_2 --share_qresi=4'):
        _vae([f'--vae_init={tmp_path / "vae.pth"}', '--vocab=128'])


def test_make_opt_exempts_the_codebook_from_weight_decay_and_skips_frozen_parameters():
    vae, args = _vae()
    opt = make_opt(vae, 1e-3, args, torch.device('cpu')).optimizer
    names = {g['name']: g['param_names'] for g in opt.param_groups}
    assert 'quantize.embedding.weight' in names['ND'] and 'encoder.conv_in.weight' in names['D']
    n_trainable = sum(1 for p in vae.parameters() if p.requires_grad)
    assert sum(len(v) for v in names.values()) == n_trainable < len(list(vae.parameters()))
    assert opt.defaults['betas'] == (0.5, 0.9)


def test_step_scalars_turns_one_element_tensors_into_floats():
    out = {'loss': torch.tensor(2.5), 'vq': torch.tensor([0.25]), 'usages': [1.0], 'grad_norm': 3.0,
           'd_grad_norm': None, 'rec_BCHW': torch.zeros(1, 3, 2, 2)}
    assert step_scalars(out) == {'loss': 2.5, 'vq': 0.25, 'grad_norm': 3.0}
