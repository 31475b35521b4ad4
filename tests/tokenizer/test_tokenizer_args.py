"""The tokenizer's flags and derived values (tokenizer/args.py)."""
import pytest

from support import assert_equal_up_to_rounding
from tokenizer.args import derive_vae, parse_vae_args


def test_derived_values_of_the_official_recipe_on_8_processes():
    cfg = derive_vae(parse_vae_args(['--bs=256', '--ep=100', '--tblr=2e-4']), world_size=8)
    assert (cfg.batch_size, cfg.glb_batch_size, cfg.val_batch_size) == (32, 256, 48)
    # a global batch of 256: no scaling (float64 products and quotients)
    assert_equal_up_to_rounding(cfg.tlr, 2e-4, reduction=1, depth=3)
    assert_equal_up_to_rounding(cfg.dlr, 2e-4, reduction=1, depth=3)
    assert (cfg.wp, cfg.disc_start) == (2.0, 20.0)  # ep/50 and ep/5
    assert (cfg.patch_nums, cfg.ch_mult, cfg.downsample, cfg.image_size) == (
        (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), (1, 1, 2, 2, 4), 16, 256)


def test_derived_values_follow_accumulation_and_the_discriminator_lr():
    cfg = derive_vae(parse_vae_args(['--bs=64', '--ac=2', '--tblr=1e-4', '--dblr=4e-4', '--disc_start=3', '--wp=1',
                                     '--vae_ch_mult=1_2_4', '--pn=1_2_4', '--workers=99']), world_size=2)
    assert (cfg.batch_size, cfg.glb_batch_size, cfg.workers) == (16, 32, 16)
    assert_equal_up_to_rounding(cfg.tlr, 2 * 32 / 256 * 1e-4, reduction=1, depth=3)
    assert_equal_up_to_rounding(cfg.dlr, 2 * 32 / 256 * 4e-4, reduction=1, depth=3)
    assert (cfg.disc_start, cfg.wp, cfg.image_size) == (3.0, 1.0, 16)


@pytest.mark.parametrize('argv, match', [(['--bs=2', '--ac=2'], 'too small'), (['--vae_ch=48'], 'multiple of 32'),
                                         (['--vae_ch_mult='], 'at least one')])
def test_impossible_flags_are_refused(argv, match):
    with pytest.raises(ValueError, match=match):
        derive_vae(parse_vae_args(argv), world_size=2)


def test_lpips_flags_default_to_the_calibrated_distance():
    args = parse_vae_args([])
    assert (args.lpips_vgg, args.lpips_lin, args.lp) == ('auto', 'auto', 1.0)
    assert parse_vae_args(['--lpips_lin=none']).lpips_lin == 'none'
