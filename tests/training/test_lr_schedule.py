"""lr / wd schedules against the official values (lr_schedule.pt), parameter groups, progressive stages."""
import math

import pytest
import torch

import support
from support import assert_equal_up_to_rounding

from utils.lr_control import build_param_groups, lr_ratio, lr_wd_annealing, progressive_si, wd_value

SHARED = support.SHARED
GOLDEN = SHARED / 'golden' / 'lr_schedule.pt'


def two_group_optimizer(wd_scs):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in wd_scs]
    return torch.optim.AdamW([{'params': [p], 'wd_sc': sc} for p, sc in zip(params, wd_scs)], lr=1.0)


@pytest.fixture(scope='module')
def golden():
    if not GOLDEN.exists():
        pytest.skip(f'{GOLDEN} is absent (the ground truth lives in ../shared beside the checkout)')
    return torch.load(GOLDEN, weights_only=False)


def test_schedules_match_the_official_values_exactly(golden):
    a = golden['args']
    opt = two_group_optimizer([g['wd_sc'] for g in a['param_groups']])
    assert set(golden['schedules']) >= {'cos', 'lin', 'lin0', 'lin00', 'exp'}
    for sche, ref in golden['schedules'].items():
        got = [lr_wd_annealing(sche, opt, a['peak_lr'], a['wd'], a['wd_end'], it, a['wp_it'], a['max_it'],
                               a['wp0'], a['wpe']) for it in range(a['max_it'])]
        assert [tuple(g) for g in got] == [tuple(r) for r in ref], sche


def test_schedule_shape_without_golden():
    # warm-up from wp0 to 1, then lin0 holds 1 until 5 % of the rest, and ends at wpe
    assert lr_ratio('lin0', 0, 10, 100, wp0=0.005, wpe=0.1) == 0.005
    assert lr_ratio('lin0', 10, 10, 100, wp0=0.005, wpe=0.1) == 1
    # the schedules' float64 formulas (a cosine among them) vs their end values: a few roundings apart
    assert_equal_up_to_rounding(lr_ratio('lin0', 99, 10, 100, wp0=0.005, wpe=0.1), 0.1, reduction=1, depth=6)
    assert_equal_up_to_rounding(lr_ratio('lin0.8', 99, 10, 100, wpe=0.1), 0.1, reduction=1, depth=6)
    assert_equal_up_to_rounding(wd_value(0.05, 0.08, 0, 100), 0.05, reduction=1, depth=6)
    assert_equal_up_to_rounding(wd_value(0.05, 0.08, 99, 100), 0.08, reduction=1, depth=6)
    with pytest.raises(NotImplementedError):
        lr_ratio('step', 50, 10, 100)


def test_groups_lr_and_wd_are_set_and_reported():
    opt = two_group_optimizer([0.0, 1.0])
    mn, mx, wmn, wmx = lr_wd_annealing('cos', opt, 1e-3, 0.05, 0.05, 50, 10, 100, 0.005, 0.01)
    assert opt.param_groups[0]['weight_decay'] == 0 and mn == mx == opt.param_groups[0]['lr'] and wmn == wmx
    assert_equal_up_to_rounding(opt.param_groups[1]['weight_decay'], 0.05, reduction=1, depth=6)  # float64 cosine
    assert_equal_up_to_rounding(wmx, 0.05, reduction=1, depth=6)
    assert lr_wd_annealing('cos', two_group_optimizer([0.0]), 1e-3, 0.05, 0.05, 50, 10, 100)[2:] == (-1, 0)
    assert lr_wd_annealing('cos', two_group_optimizer([0.0, 1.0]), 1e-3, 0.0, 0.0, 50, 10, 100)[2:] == (-1, 0)


def test_parameter_groups_of_var(tiny_models):
    _, var = tiny_models
    groups = build_param_groups(var.named_parameters())
    assert [g['name'] for g in groups] == ['ND', 'D'] and [g['wd_sc'] for g in groups] == [0.0, 1.0]
    nd, d = (set(g['param_names']) for g in groups)
    for name in ('pos_start', 'pos_1LC', 'lvl_embed.weight', 'blocks.0.attn.scale_mul_1H11', 'head.bias',
                 'blocks.0.attn.q_bias', 'blocks.1.ffn.fc1.bias'):
        assert name in nd, name
    for name in ('class_emb.weight', 'word_embed.weight', 'head.weight', 'blocks.0.ada_lin.1.weight',
                 'blocks.0.attn.mat_qkv.weight', 'head_nm.ada_lin.1.weight'):
        assert name in d, name
    assert len(nd) + len(d) == len(list(var.parameters()))


def test_frozen_parameter_is_an_error():
    m = torch.nn.Linear(2, 2)
    m.bias.requires_grad_(False)
    with pytest.raises(AssertionError, match='bias'):
        build_param_groups(m.named_parameters())


def test_progressive_stage():
    S, wp_it, max_it, pg, pg0 = 10, 10, 1000, 0.8, 4
    assert progressive_si(500, wp_it, max_it, 0.0, pg0, S) == -1
    assert progressive_si(0, wp_it, max_it, pg, pg0, S) == pg0 == progressive_si(wp_it, wp_it, max_it, pg, pg0, S)
    assert progressive_si(800, wp_it, max_it, pg, pg0, S) == S - 1
    g_it = 405  # (405-10)/(800-10) = 0.5 -> 4 + round(0.5*5) = 4 + 2 (ties to even)
    assert progressive_si(g_it, wp_it, max_it, pg, pg0, S) == 6
    stages = [progressive_si(i, wp_it, max_it, pg, pg0, S) for i in range(max_it)]
    assert stages == sorted(stages) and set(stages) == set(range(pg0, S))
    assert not math.isnan(lr_ratio('lin0.8', 500, wp_it, max_it, wpe=0.01))
