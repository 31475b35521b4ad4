"""Command-line parsing and the derived values of the official recipes (spec section 9)."""
import copy

import pytest

from support import assert_equal_up_to_rounding
from utils.arg_util import PN_PRESETS, derive, parse_args, str2bool

RECIPES = {
    'd16': '--depth=16 --bs=768 --ep=200 --fp16=1 --alng=1e-3 --wpe=0.1',
    'd20': '--depth=20 --bs=768 --ep=250 --fp16=1 --alng=1e-3 --wpe=0.1',
    'd24': '--depth=24 --bs=768 --ep=350 --tblr=8e-5 --fp16=1 --alng=1e-4 --wpe=0.01',
    'd30': '--depth=30 --bs=1024 --ep=350 --tblr=8e-5 --fp16=1 --alng=1e-5 --wpe=0.01 --twde=0.08',
    'd36-s': '--depth=36 --saln=1 --pn=512 --bs=768 --ep=350 --tblr=8e-5 --fp16=1 --alng=5e-6 --wpe=0.01 --twde=0.08',
}


def test_official_defaults():
    a = parse_args([])
    assert (a.depth, a.bs, a.ep, a.fp16, a.tblr, a.twd, a.twde, a.tclip, a.ls, a.ac) == (16, 768, 250, 0, 1e-4, 0.05,
                                                                                          0.0, 2.0, 0.0, 1)
    assert (a.wp, a.wp0, a.wpe, a.sche, a.opt, a.afuse, a.saln, a.anorm, a.fuse) == (0.0, 0.005, 0.01, 'lin0', 'adamw',
                                                                                     True, False, True, True)
    assert (a.ini, a.hd, a.aln, a.alng, a.pn, a.patch_size, a.mid_reso, a.hflip, a.workers) == (
        -1.0, 0.02, 0.5, 1e-5, '1_2_3_4_5_6_8_10_13_16', 16, 1.125, False, 0)
    assert (a.pg, a.pg0, a.pgwp, a.tf32, a.seed) == (0.0, 4, 0.0, True, None)
    assert (a.vfast, a.tfast, a.exp_name) == (0, 0, 'text')
    assert (a.val_every_ep, a.ckpt_every_iters, a.local_out_dir_path) == (10, 0, None)


def test_d16_recipe_derived_values():
    a = parse_args(RECIPES['d16'].split())
    d = derive(a, world_size=8)
    assert (d.batch_size, d.glb_batch_size) == (96, 768)
    assert_equal_up_to_rounding(d.tlr, 3e-4, reduction=1, depth=3)  # float64: tblr * global batch / 256
    assert d.wp == 4.0 and d.sche == 'lin0' and d.twde == 0.05
    assert a.fp16 == 1 and a.alng == 1e-3 and a.wpe == 0.1
    assert d.patch_nums == PN_PRESETS['256'] and d.data_load_reso == 256 and d.resos[0] == 16
    assert d.tb_dir_name == 'tb-VARd16__pn1_2_3_4_5_6_8_10_13_16__b768ep200adamlr0.0001wd0.05'


def test_d30_recipe_derived_values():
    d = derive(parse_args(RECIPES['d30'].split()), world_size=8)
    assert_equal_up_to_rounding(d.tlr, 3.2e-4, reduction=1, depth=3)
    assert d.twde == 0.08 and d.wp == 7.0 and (d.batch_size, d.glb_batch_size) == (128, 1024)


def test_d36s_recipe_uses_the_512_preset():
    a = parse_args(RECIPES['d36-s'].split())
    d = derive(a, world_size=8)
    assert a.saln is True
    assert d.patch_nums == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    assert d.data_load_reso == 512
    assert_equal_up_to_rounding(d.tlr, 2.4e-4, reduction=1, depth=3)


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_every_recipe_parses_without_warnings(name, recwarn):
    derive(parse_args(RECIPES[name].split()), world_size=8)
    assert not [w for w in recwarn if 'unknown' in str(w.message)]


def test_space_and_equals_forms_and_aliases_agree():
    a = parse_args(['--depth', '20', '--fp16', '2', '--pn', '512', '--saln', 'true'])
    b = parse_args(['--depth=20', '--precision=2', '--patch_nums=512', '--shared_aln=1'])
    assert vars(a) == vars(b)
    assert parse_args(['--epochs=3', '--global_batch_size=64', '--base_lr=2e-4']).ep == 3


@pytest.mark.parametrize('text,value', [('1', True), ('0', False), ('true', True), ('False', False), ('yes', True)])
def test_booleans(text, value):
    assert str2bool(text) is value
    assert parse_args([f'--hflip={text}']).hflip is value
    assert parse_args(['--hflip', text]).hflip is value


def test_bare_boolean_flag_and_bad_boolean():
    assert parse_args(['--hflip']).hflip is True
    with pytest.raises(SystemExit):
        parse_args(['--saln=maybe'])


def test_unknown_flags_are_tolerated_with_a_warning():
    with pytest.warns(UserWarning, match='unknown'):
        a = parse_args(['--depth=12', '--not_a_flag=3'])
    assert a.depth == 12 and a.unknown_args == ['--not_a_flag=3']  # train.py also writes them to its log


@pytest.mark.parametrize('flag', ['--val_every_ep=0', '--tb_every_iters=0', '--val_every_ep=-2'])
def test_intervals_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit):
        parse_args([flag])
    assert 'must be >= 1' in capsys.readouterr().err


def test_derive_is_pure_and_official_rules():
    a = parse_args(['--bs=768', '--ac=2', '--pg=0.8', '--workers=100', '--tlr=1', '--pn=1-2-3', '--twde=0'])
    before = copy.deepcopy(vars(a))
    d = derive(a, world_size=8)
    assert vars(a) == before  # args hold inputs only
    assert d.batch_size == 48 and d.glb_batch_size == 384
    assert_equal_up_to_rounding(d.tlr, 2 * 1e-4 * 384 / 256, reduction=1, depth=3)  # the user's --tlr is overwritten
    assert d.sche == 'lin0.8'
    assert_equal_up_to_rounding(d.pgwp, 250 / 300, reduction=1, depth=3)
    assert d.workers == 48 and d.patch_nums == (1, 2, 3) and d.twde == 0.05
    assert derive(parse_args(['--workers=-3']), 1).workers == 0
    assert derive(parse_args(['--bs=100']), 3).batch_size == 33  # round(bs/ac/ws), no rounding to a multiple of 8


def test_tb_dir_name_is_sanitised():
    d = derive(parse_args(['--pn=1_2 3', '--opt=adam']), 1)
    assert ' ' not in d.tb_dir_name and d.tb_dir_name.startswith('tb-VARd16__pn1_2_3__b768ep250adamlr')
