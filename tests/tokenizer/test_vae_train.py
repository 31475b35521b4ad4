"""The tokenizer trainer (train_vae.py, tokenizer/): losses, a few real steps on
CPU, exact kill-and-resume (3 torchrun processes, the GAN and bf16), fine-tuning from an official-format
file, and the checkpoint round trip into train.py (--vae_ckpt with no architecture flags)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from support import assert_equal_up_to_rounding
from train_support import (ROOT, assert_same_final_checkpoint, cpu_env, free_port, kill_after_step, make_image_folder,
                            train_args)

# A x4 tokenizer on 16x16 images: 3 scales (1, 2, 4), the 4th Phi unused (checks the DDP freezing of unused Phis).
TINY_VAE_FLAGS = dict(vae_ch=32, vae_ch_mult='1_1_2', vocab=64, cvae=8, pn='1_2_4', mid_reso=1.0, lp=0, dw=0.5,
                      disc_ch=16, disc_layers=2, disc_start=0.25, vq_reinit=2, seed=1, tf32=0, afuse=0, workers=0,
                      tblr=1e-3)


def vae_argv(data: Path, out: Path, **extra) -> list:
    f = dict(TINY_VAE_FLAGS, data_path=data, out_dir=out, bs=4, ep=2)
    f.update(extra)
    return [f'--{k}={v}' for k, v in f.items()]


def vae_cmd(argv, nproc: int = 1) -> list:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={free_port()}']
    return cmd + [str(ROOT / 'train_vae.py'), *argv]


def run_vae(argv, nproc: int = 1, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(vae_cmd(argv, nproc), cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                          timeout=timeout)


def read_losses(out: Path) -> dict:
    losses = {}
    for line in (out / 'steps.jsonl').read_text().splitlines():
        rec = json.loads(line)
        losses[rec['g_it']] = rec['loss']  # a resumed run rewrites the steps after its checkpoint: last one wins
    return losses


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('vae') / 'data', n_classes=3, n_train=8, n_val=2)


# ------------------------------------------------------------------------------------------------------ loss units
def test_discriminator_losses_and_adaptive_weight():
    from tokenizer.discriminator import PatchDiscriminator, adaptive_gan_weight, d_loss_fn, g_loss_fn
    disc = PatchDiscriminator(3, ch=16, n_layers=2)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)
    real, fake = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)
    assert d_loss_fn('hinge', real, fake).item() == 0.0  # both beyond the margin
    assert d_loss_fn('hinge', fake, real).item() == 3.0  # means of 3.0: exact in float32
    softplus = torch.nn.functional.softplus
    # means of 9 equal values vs the value: equal up to rounding
    assert_equal_up_to_rounding(d_loss_fn('vanilla', real, fake), softplus(torch.tensor(-2.)), reduction=9, depth=2)
    assert g_loss_fn(fake).item() == 2.0
    w = torch.nn.Parameter(torch.ones(4))
    a, b = torch.tensor([3.0, 0, 4, 0]), torch.tensor([0, 1.0, 0, 0])
    weight = adaptive_gan_weight((w * a).sum(), (w * b).sum(), w)
    assert_equal_up_to_rounding(weight, 5.0 / (1.0 + 1e-4), reduction=4, depth=3, dtype=torch.float32)  # norms, /
    assert adaptive_gan_weight((w * a).sum(), (w * 0).sum(), w, max_weight=7.0).item() == 7.0  # clamped


def test_adaptive_weight_is_zero_when_a_gradient_is_not_finite():
    """An inf or NaN gradient norm at the last layer (e.g. an fp16 overflow) gives weight 0, not the clamp's maximum or
    NaN: the step then ignores the GAN term."""
    from tokenizer.discriminator import adaptive_gan_weight
    w = torch.nn.Parameter(torch.ones(4))
    finite = torch.tensor([3.0, 0, 4, 0])
    inf, nan = torch.tensor([1.0, float('inf'), 0, 0]), torch.tensor([float('nan'), 1.0, 0, 0])
    for a, b in ((inf, finite), (nan, finite), (finite, nan), (inf, inf)):  # (reconstruction, GAN) gradients
        weight = adaptive_gan_weight((w * a).sum(), (w * b).sum(), w, max_weight=7.0)
        assert weight.item() == 0.0, (a, b)
    assert adaptive_gan_weight((w * finite).sum(), (w * inf).sum(), w).item() == 0.0  # 5 / inf


def test_adaptive_weight_survives_fp16_with_the_loss_scale():
    """A small reconstruction gradient underflows in fp16: with the GradScaler's scale the weight matches fp32."""
    from tokenizer.discriminator import adaptive_gan_weight
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    x = torch.randn(32, 4, 256, 256)  # d nll / d rec ~ 2 * 0.01 / (32 * 3 * 256 * 256) = 3e-9: below fp16's range
    target = torch.randn(32, 3, 256, 256)

    def weight(dtype, scale):
        with torch.autocast('cpu', dtype=dtype, enabled=dtype is not None):
            rec = conv(x)
            nll = (rec.float() - (rec.detach().float() + 0.01 * target)).square().mean()
            g_loss = -rec.float().mean()
        return adaptive_gan_weight(nll, g_loss, conv.weight, loss_scale=scale).item()

    ref = weight(None, 1.0)
    assert ref > 0 and weight(torch.float16, 1.0) == 0.0  # the underflow the scale is for
    assert weight(torch.float16, 2.0 ** 16) == pytest.approx(ref, rel=0.05)  # fp16 vs float32: a known approximation


def test_lpips_loads_torchvision_vgg16_and_measures_distances():
    import torchvision
    from tokenizer.lpips import LPIPS
    torch.manual_seed(0)
    lp = LPIPS()
    lp.load_vgg16(torchvision.models.vgg16(weights=None).state_dict())  # the key layout of the real weights
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lp(x, x).abs().max().item() < 1e-6
    d_small, d_big = lp(x, x + 0.05 * torch.randn_like(x)), lp(x, torch.rand_like(x) * 2 - 1)
    assert (d_small > 0).all() and (d_big > d_small).all()
    # without learned weights: the paper's baseline, the per-position cosine distance summed over the taps
    cos = torch.nn.functional.cosine_similarity
    baseline = sum((2 - 2 * cos(fa, fb, dim=1)).mean((1, 2)) for fa, fb in zip(lp.taps(x), lp.taps(-x)))
    # the same features; sum_c (a/|a| - b/|b|)^2 vs 2 - 2 cos: equal in exact arithmetic, rounded relative to the
    # terms (2 per position and tap, 5 taps) over 512 channels, then a mean and the sum over taps
    assert_equal_up_to_rounding(lp(x, -x), baseline, reduction=512, depth=4, scale=2 * 5)
    widths = (64, 128, 256, 512, 512)
    lp.load_lin({f'lin{k}.model.1.weight': torch.full((1, c, 1, 1), 0.5 * k) for k, c in enumerate(widths)})
    per_tap = [(2 - 2 * cos(fa, fb, dim=1)).mean((1, 2)) for fa, fb in zip(lp.taps(x), lp.taps(-x))]
    assert_equal_up_to_rounding(lp(x, -x), sum(0.5 * k * d for k, d in enumerate(per_tap)), reduction=512, depth=4,
                                scale=2 * sum(0.5 * k for k in range(5)))
    lp.load_lin({f'lin{k}.model.1.weight': torch.rand(1, c, 1, 1) for k, c in enumerate(widths)})
    assert lp.has_learned_lin and not any(p.requires_grad for p in lp.parameters())
    with pytest.raises(ValueError, match='VGG16'):
        lp.load_vgg16({'classifier.0.weight': torch.zeros(1)})


def test_missing_vgg_weights_give_a_clear_message(tmp_path, monkeypatch):
    import torchvision.models
    from tokenizer import build
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))

    def offline(*a, **k):
        raise OSError('no network')
    monkeypatch.setattr(torchvision.models.VGG16_Weights.IMAGENET1K_V1.__class__, 'get_state_dict', offline)
    with pytest.raises(RuntimeError, match=r'--lpips_vgg=PATH.*--lp=0'):
        build.resolve_vgg16('auto')
    with pytest.raises(FileNotFoundError):
        build.resolve_vgg16(str(tmp_path / 'nope.pth'))
    torch.save({'features.0.weight': torch.zeros(1)}, tmp_path / 'checkpoints.pth')
    os.makedirs(tmp_path / 'checkpoints')
    torch.save({'x': torch.ones(1)}, tmp_path / 'checkpoints' / build.VGG16_FILE)
    assert 'x' in build.resolve_vgg16('auto')  # the torch hub cache is used before any download


def test_psnr_ssim_and_phi_usage():
    from tokenizer.codebook import phi_indices_used
    from tokenizer.metrics import psnr_per_image, ssim_per_image
    x = torch.rand(3, 3, 16, 16)
    assert_equal_up_to_rounding(psnr_per_image(x, x), torch.full((3,), 100.0), reduction=1, depth=3)  # the 1e-10 floor
    assert psnr_per_image(x, (x + 0.1).clamp(0, 1)).mean().item() < 25
    assert_equal_up_to_rounding(ssim_per_image(x, x), torch.ones(3), reduction=11 * 11, depth=4)  # windows, a mean
    assert ssim_per_image(x, torch.rand_like(x)).max().item() < 0.5
    assert phi_indices_used((1, 2, 4), 4) in ([0, 1, 3], [0, 2, 3])
    assert phi_indices_used((1, 2, 3, 4, 6, 8), 4) == [0, 1, 2, 3]


def test_ssim_matches_scikit_image_on_real_photos():
    """Wang et al.'s SSIM as scikit-image computes it (Gaussian window sigma 1.5, 11 taps at its truncate=3.5,
    population covariances, K1=0.01, K2=0.03, the border of half a window left out, channels averaged)."""
    skdata = pytest.importorskip('skimage.data', reason='scikit-image provides the real test photos')
    from skimage.metrics import structural_similarity
    from tokenizer.metrics import ssim_per_image
    rng = np.random.default_rng(0)
    clean = np.stack([skdata.astronaut()[:96, 200:328], skdata.chelsea()[100:196, 150:278]]).astype(np.float64) / 255
    noisy = np.clip(clean + rng.normal(0, 0.08, clean.shape), 0, 1)
    dim = clean * 0.7 + 0.1  # a contrast and brightness change: the luminance term matters too
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float()  # noqa: E731
    for other in (noisy, dim):
        ours = ssim_per_image(to_t(other), to_t(clean))
        ref = [structural_similarity(c, o, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                     data_range=1.0, channel_axis=2) for c, o in zip(clean, other)]
        assert 0.1 < min(ref) and max(ref) < 0.99  # far from both ends, where the constants matter
        torch.testing.assert_close(ours, torch.tensor(ref, dtype=torch.float32), rtol=0, atol=2e-4)


def test_dead_codes_are_reinitialised_from_latents_and_their_moments_reset():
    import models
    from tokenizer.trainer import LossConfig, ReinitConfig, VQVAETrainer
    from utils.amp_sc import AmpOptimizer
    torch.manual_seed(0)
    vae = models.VQVAE(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 2), v_patch_nums=(1, 2, 4), test_mode=False)
    opt = AmpOptimizer(torch.optim.AdamW(vae.parameters(), lr=1e-3), list(vae.parameters()), 'cpu')
    tr = VQVAETrainer(torch.device('cpu'), vae, vae, None, None, opt, None, None, LossConfig(),
                      ReinitConfig(every=0, threshold=0.5), seed=3)  # re-init by hand below
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    tr.train_step(0, True, x)  # fills the EMA and the AdamW state
    hits_V = vae.quantize.ema_vocab_hit_SV.sum(0)
    dead = hits_V < 0.5
    assert dead.any()
    before = vae.quantize.embedding.weight.detach().clone()
    state = opt.optimizer.state[vae.quantize.embedding.weight]
    for key in ('exp_avg', 'exp_avg_sq'):  # unused codes have no gradient: give every row moments to be reset
        state[key].copy_(torch.rand_like(state[key]) + 0.5)
    moments = {key: state[key].clone() for key in ('exp_avg', 'exp_avg_sq')}
    n = tr.reinit_dead_codes(x)
    after = vae.quantize.embedding.weight.detach()
    assert n == int(dead.sum()) and tr.num_reinit >= n
    assert torch.equal(after[~dead], before[~dead]) and not torch.equal(after[dead], before[dead])
    assert (vae.quantize.ema_vocab_hit_SV.sum(0)[dead] >= 0.5 - 1e-6).all()  # not dead again at once
    for key, m in moments.items():
        assert not state[key][dead].any(), key  # the new codes start with fresh AdamW moments
        assert torch.equal(state[key][~dead], m[~dead]), key  # the live codes keep theirs


def test_dead_codes_are_reinitialised_at_the_end_of_every_rc_every_iterations_until_rc_until():
    """--vq_reinit=k: after iterations k-1, 2k-1, ... (each k-th step, counting from 1), before iteration `until`;
    only on iterations that end an accumulation cycle."""
    import models
    from tokenizer.trainer import LossConfig, ReinitConfig, VQVAETrainer
    from utils.amp_sc import AmpOptimizer
    torch.manual_seed(0)
    vae = models.VQVAE(vocab_size=32, z_channels=4, ch=32, ch_mult=(1, 2), v_patch_nums=(1, 2, 4), test_mode=False)
    opt = AmpOptimizer(torch.optim.SGD(vae.parameters(), lr=0.0), list(vae.parameters()), 'cpu')
    tr = VQVAETrainer(torch.device('cpu'), vae, vae, None, None, opt, None, None, LossConfig(),
                      ReinitConfig(every=3, until=8, threshold=1e9), seed=0)  # every code counts as dead
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    done = [g_it for g_it in range(10) if 'reinit' in tr.train_step(g_it, True, x)]
    assert done == [2, 5]  # not 8: that is past `until`
    assert 'reinit' not in tr.train_step(5, False, x)  # mid-cycle: not yet


# -------------------------------------------------------------------------------------------- real training runs
# 24 images, batch 4: 6 iterations per epoch, 12 in all; the GAN starts at iteration 2, dead codes are re-drawn every
# 2 iterations, checkpoints every 4 iterations and at epoch ends; TensorBoard at every iteration, 4 images shown.
REFERENCE_FLAGS = dict(ep=2, ckpt_every_iters=4, log_steps=1, hflip=1, vq_reinit_until=1.0, n_vis=4,
                       tb_every_iters=1)


@pytest.fixture(scope='module')
def reference(data, tmp_path_factory):
    """One uninterrupted run in this process: (output folder, its console text)."""
    import train_vae
    from support import intra_op_threads
    out = tmp_path_factory.mktemp('vae_reference') / 'vae'
    with intra_op_threads(1):  # the arithmetic of the OMP_NUM_THREADS=1 processes of the other tests
        assert train_vae.main(vae_argv(data, out, **REFERENCE_FLAGS)) == 0
    return out, (out / 'stdout.txt').read_text()


@pytest.mark.slow
def test_train_steps_checkpoint_logs_and_train_py_round_trip(data, reference, tmp_path):
    out, console = reference
    assert 'codebook usage per scale' in console and 're-initialised' in console
    for name in ('vae-ckpt-last.pth', 'vae-ckpt-best.pth', 'log.txt', 'stdout.txt'):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert records[-1]['ep'] == 2 and len(records[-1]['vusage']) == 3 and 'vpsnr' in records[-1]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb_dir = next(out.glob('tb-*'))
    acc = EventAccumulator(str(tb_dir), size_guidance={'images': 0, 'scalars': 0})
    acc.Reload()
    tags = set(acc.Tags()['scalars'])
    for tag in ('VAE_val/psnr', 'VAE_val/ssim', 'VAE_val_usage/pn1', 'VAE_usage_ema/pn4', 'VAE_iter_loss/rec_l2',
                'VAE_iter_loss/d_loss', 'VAE_iter_loss/d_weight', 'VAE_opt/lr'):
        assert tag in tags, tag
    assert acc.Tags()['images'] == ['VAE_rec/rows_input_then_scales_1_to_SN']

    import models
    ckpt = torch.load(out / 'vae-ckpt-last.pth', map_location='cpu', weights_only=True)  # loads without pickle code
    assert ckpt['vae_config']['ch_mult'] == [1, 1, 2] and ckpt['image_size'] == 16
    vae = models.load_vae_checkpoint(out / 'vae-ckpt-last.pth')
    assert vae.v_patch_nums == (1, 2, 4) and vae.image_size == 16 and vae.vocab_size == 64
    for k, v in vae.state_dict().items():
        assert torch.equal(v, ckpt['trainer']['vae_wo_ddp'][k]), k

    # train.py reads the architecture from the tokenizer checkpoint: only --patch_size and --pn describe the data
    var_out = tmp_path / 'var'
    import train
    assert train.main(train_args(data, out / 'vae-ckpt-best.pth', var_out, pn='1_2_4', patch_size=4, ep=1,
                                 mid_reso=1.0) + ['--alng_typo=1e-3']) == 0
    assert "ignoring unknown arguments (typos?): ['--alng_typo=1e-3']" in (var_out / 'stderr.txt').read_text()
    vae2, var = models.load_checkpoint_models(var_out / 'ar-ckpt-last.pth')
    assert vae2.ch_mult == (1, 1, 2) and var.patch_nums == (1, 2, 4)
    best = models.load_vae_checkpoint(out / 'vae-ckpt-best.pth')
    assert all(torch.equal(v, vae2.state_dict()[k]) for k, v in best.state_dict().items() if 'ema_vocab' not in k)


def test_vae_init_fine_tunes_an_official_format_file(data, tmp_path, capsys):
    import models
    import train_vae
    torch.manual_seed(0)
    plain = models.VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2), v_patch_nums=(1, 2, 4))
    torch.save(plain.state_dict(), tmp_path / 'official_like.pth')  # a plain state dict, like vae_ch160v4096z32.pth
    out = tmp_path / 'ft'
    argv = vae_argv(data, out, ep=1, dw=0, vq_reinit=0, vae_init=tmp_path / 'official_like.pth')
    assert train_vae.main(argv) == 0
    tuned = models.load_vae_checkpoint(out / 'vae-ckpt-last.pth')
    moved = [k for k, v in plain.state_dict().items()
             if 'ema_vocab' not in k and not torch.equal(v, tuned.state_dict()[k])]
    assert moved and len(moved) < len(plain.state_dict())  # trained from those weights (the unused Phi stays put)
    capsys.readouterr()
    assert train_vae.main(argv) == 0  # re-running a finished command does nothing (the demo relies on it)
    assert 'nothing to do' in capsys.readouterr().out
    capsys.readouterr()
    bad = vae_argv(data, tmp_path / 'bad', ep=1, vocab=128, vae_init=tmp_path / 'official_like.pth')
    assert train_vae.main(bad) == 2
    err = capsys.readouterr().err
    assert 'error: --vae_init' in err and '--vocab=64 --cvae=8 --vae_ch=32 --vae_ch_mult=1_1_2' in err  # the flags


def test_a_discriminator_too_deep_for_the_images_is_refused_at_start(data, tmp_path, capsys):
    import train_vae
    assert train_vae.main(vae_argv(data, tmp_path / 'vae', disc_layers=3)) == 2  # 16 px; 3 stride-2 layers need 24
    err = capsys.readouterr().err
    assert '--disc_layers=3 needs images of at least 24 px but they are 16 px' in err and 'Traceback' not in err
    assert not (tmp_path / 'vae' / 'vae-ckpt-last.pth').exists()


@pytest.mark.slow
def test_three_processes_with_the_gan_resume_bit_for_bit_inside_an_accumulation_cycle(tmp_path):
    """A 3-process torchrun job with the GAN, its adaptive weight and bf16 autocast. With three ranks the order in
    which DDP adds the gradients depends on its bucket layout, which it rebuilds after the first synced backward: a
    resumed run settles the buckets of the VQVAE and (the GAN having started) of the discriminator first, so its steps
    equal the uninterrupted run's, bit for bit.

    --ac=2 with 3 iterations per epoch: epoch 0 ends inside a cycle (no_sync on the first micro-batch of both DDP
    modules); the kill comes after that epoch's checkpoint, which points at the cycle's start (with the codebook-usage
    EMA of that moment)."""
    data = make_image_folder(tmp_path / 'data', n_classes=3, n_train=3, n_val=1)
    # 9 images, global batch 6 with --ac=2: 3 per iteration (1 per rank), 3 iterations per epoch, 6 in all; the GAN
    # starts at iteration 2 (the first cycle start after --disc_start=0.25 epochs); dead codes re-drawn every 2
    # iterations to the end
    flags = dict(bs=6, ac=2, ep=2, fp16=2, log_steps=1, hflip=1, tblr=0.02, vq_reinit_until=1.0)
    ref_out = tmp_path / 'reference'
    ref = run_vae(vae_argv(data, ref_out, **flags), nproc=3, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert sorted(read_losses(ref_out)) == list(range(6)) and 'GAN from iteration 2' in ref.stdout
    ckpt = torch.load(ref_out / 'vae-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert len(ckpt['rng']) == 3 and ckpt['derived']['batch_size'] == 1
    assert 'disc_wo_ddp' in ckpt['trainer'] and ckpt['metrics']['n'] == 3  # every rank's validation images
    out = tmp_path / 'interrupted'
    argv = vae_argv(data, out, **flags)
    killed_at = kill_after_step(argv, out, step=3, cmd=vae_cmd(argv, nproc=3), timeout=300)
    assert killed_at < 5, 'the kill came too late to test anything'
    resumed = run_vae(argv, nproc=3, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert '[auto-resume] loaded' in resumed.stdout and 'epoch 0, iteration 2' in resumed.stdout
    assert read_losses(out) == read_losses(ref_out)
    assert_same_final_checkpoint(ref_out, out, 'vae-ckpt-last.pth')
