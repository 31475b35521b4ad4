"""Where the tokenizer's gradients go: the quantiser's straight-through estimator and its codebook / commitment terms,
the generator and discriminator steps of the trainer (each loss reaches only its own network), and the layer the
adaptive GAN weight measures. Each expectation is computed independently of the code under test."""
import pytest
import torch
import torch.nn.functional as F

from models import VQVAE
from models.quant import VectorQuantizer2
from support import assert_equal_up_to_rounding, rounding_chain
from tokenizer.discriminator import PatchDiscriminator

PATCH_NUMS = (1, 2, 4)


def _quantiser(beta: float = 0.25) -> VectorQuantizer2:
    torch.manual_seed(0)
    q = VectorQuantizer2(vocab_size=32, Cvae=4, using_znorm=False, beta=beta, v_patch_nums=PATCH_NUMS,
                         quant_resi=0.5, share_quant_resi=4)
    q.embedding.weight.data.normal_()
    return q.train()


def test_f_hat_passes_gradients_straight_through_to_the_encoder_and_none_to_the_codebook():
    q = _quantiser()
    f = torch.randn(2, 4, 4, 4, requires_grad=True)
    f_hat, _, _ = q(f)
    g = torch.randn_like(f_hat)
    (f_hat * g).sum().backward()
    assert torch.equal(f.grad, g)  # identity Jacobian
    assert all(p.grad is None or not p.grad.any() for p in q.parameters())  # the codebook and Phis learn only from vq
    # the value is the quantised latent: the cumulative f_hat of the last scale (up to the rounding of the
    # straight-through f + (f_hat - f))
    assert_equal_up_to_rounding(f_hat, q.f_to_idxBl_or_fhat(f.detach(), to_fhat=True)[-1], **rounding_chain(q))


@pytest.mark.parametrize('beta', [0.25, 1.0])
def test_vq_loss_sends_only_the_commitment_term_to_the_encoder(beta):
    """L_vq = mean over scales s of ||sg(f) - f_hat_s||^2 + beta ||f - sg(f_hat_s)||^2: the encoder gets the beta term's
    gradient, the codebook and the Phis only the first term's."""
    q = _quantiser(beta)
    f = torch.randn(2, 4, 4, 4, requires_grad=True)
    _, _, vq_loss = q(f)
    vq_loss.backward()

    f_hats = q.f_to_idxBl_or_fhat(f.detach(), to_fhat=True)  # the cumulative f_hat after each scale
    SN, N = len(PATCH_NUMS), f.numel()
    expected = sum(beta * 2 * (f.detach() - fh) / N for fh in f_hats) / SN
    assert_equal_up_to_rounding(f.grad, expected, **rounding_chain(q))  # autograd vs the formula

    # the codebook term alone, differentiated with the encoder output held fixed
    q2 = _quantiser(beta)
    f_hats_with_grad, f_hat = [], torch.zeros_like(f)
    f_rest = f.detach().clone()
    for si, pn in enumerate(PATCH_NUMS):
        z = f_rest if si == SN - 1 else F.interpolate(f_rest, size=(pn, pn), mode='area')
        idx = q2.nearest_idx(z.permute(0, 2, 3, 1).reshape(-1, 4)).view(2, pn, pn)
        h = q2.embedding(idx).permute(0, 3, 1, 2)
        h = h if si == SN - 1 else F.interpolate(h, size=(4, 4), mode='bicubic')
        h = q2.phi(si, SN)(h)
        f_hat = f_hat + h
        f_rest = f_rest - h.detach()
        f_hats_with_grad.append(f_hat)
    (sum(F.mse_loss(fh, f.detach()) for fh in f_hats_with_grad) / SN).backward()
    chain = rounding_chain(q, longest_sum=f.numel(), backward=True)  # a weight gradient: over the batch and positions
    for (name, p), p2 in zip(q.named_parameters(), q2.parameters()):
        assert (p.grad is None) == (p2.grad is None), name  # an unused Phi gets none
        if p.grad is not None:
            assert_equal_up_to_rounding(p.grad, p2.grad, **chain, msg=name)
    assert q.embedding.weight.grad.abs().sum(1).gt(0).sum() <= sum(pn * pn * 2 for pn in PATCH_NUMS)  # used codes only


# ----------------------------------------------------------------------------------------- the trainer's two steps
def _trainer(adaptive: bool, fp16: int = 0, dw: float = 0.3, vq: float = 1.0, l1: float = 0.5, l2: float = 1.0):
    from tokenizer.trainer import LossConfig, VQVAETrainer
    from utils.amp_sc import AmpOptimizer
    torch.manual_seed(0)
    vae = VQVAE(vocab_size=32, z_channels=4, ch=32, v_patch_nums=PATCH_NUMS, test_mode=False, ch_mult=(1, 1, 2)).train()
    disc = PatchDiscriminator(3, ch=8, n_layers=2)
    vae_opt = AmpOptimizer(torch.optim.SGD(vae.parameters(), lr=0.0), list(vae.parameters()), 'cpu', fp16=fp16)
    disc_opt = AmpOptimizer(torch.optim.SGD(disc.parameters(), lr=0.0), list(disc.parameters()), 'cpu', fp16=fp16)
    loss = LossConfig(l1=l1, l2=l2, vq=vq, dw=dw, adaptive=adaptive, d_loss='hinge', disc_start_it=0)
    return VQVAETrainer(torch.device('cpu'), vae, vae, disc, disc, vae_opt, disc_opt, None, loss), vae, disc


@pytest.mark.parametrize('adaptive, vq', [(False, 1.0), (True, 1.0), (True, 0.5)])
def test_generator_loss_trains_only_the_vae_and_discriminator_loss_only_the_discriminator(adaptive, vq):
    trainer, vae, disc = _trainer(adaptive, vq=vq)
    inp = torch.rand(2, 3, 16, 16) * 2 - 1
    # the expected gradients, from a copy of the networks (forward passes update the usage EMA, not the outputs)
    vae_sd = {k: v.clone() for k, v in vae.state_dict().items()}
    rec, _, vq_loss = vae(inp)
    nll = 0.5 * (rec - inp).abs().mean() + (rec - inp).square().mean()
    g_loss = -disc(rec).mean()
    last = vae.decoder.conv_out.weight
    if adaptive:
        gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
        gg = torch.autograd.grad(g_loss, last, retain_graph=True)[0].norm()
        w = (gn / (gg + 1e-4)).clamp(0, 1e4).detach()
    else:
        w = 1.0
    total = nll + vq * vq_loss + 0.3 * w * g_loss  # the --vq weight scales the quantiser term
    exp_vae = torch.autograd.grad(total, list(vae.parameters()), retain_graph=True, allow_unused=True)
    d_loss = 0.5 * (F.relu(1 - disc(inp)).mean() + F.relu(1 + disc(rec.detach())).mean())
    exp_disc = torch.autograd.grad(d_loss, list(disc.parameters()))
    vae.load_state_dict(vae_sd)

    out = trainer.train_step(g_it=0, stepping=False, inp_B3HW=inp)  # accumulate only: the grads stay in .grad
    assert 'd_loss' in out and 'g_loss' in out
    # the trainer's step vs the losses written out here: two computations, equal up to rounding
    chain = rounding_chain(vae, disc, longest_sum=inp.numel())  # a weight gradient sums over the batch and pixels
    assert_equal_up_to_rounding(out['d_loss'], d_loss.detach(), **chain)
    assert_equal_up_to_rounding(out['vq'], vq_loss.detach(), **chain)
    assert_equal_up_to_rounding(out['loss'], total.detach(), **chain)  # the reported loss is the one differentiated
    chain = rounding_chain(vae, disc, longest_sum=inp.numel(), backward=True)
    for (name, p), e in zip(vae.named_parameters(), exp_vae):
        if e is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            assert_equal_up_to_rounding(p.grad, e, **chain, msg=name)
    for (name, p), e in zip(disc.named_parameters(), exp_disc):
        assert_equal_up_to_rounding(p.grad, e, **chain, msg=name)  # no generator-loss gradient in here
    assert all(p.requires_grad for p in disc.parameters())


def test_before_the_gan_starts_the_discriminator_is_untouched():
    trainer, vae, disc = _trainer(adaptive=True)
    trainer.loss = type(trainer.loss)(**{**trainer.loss.__dict__, 'disc_start_it': 5})
    out = trainer.train_step(g_it=4, stepping=False, inp_B3HW=torch.rand(2, 3, 16, 16) * 2 - 1)
    assert 'd_loss' not in out and 'g_loss' not in out
    assert all(p.grad is None for p in disc.parameters())
    assert trainer.last_layer is vae.decoder.conv_out.weight  # the adaptive weight's layer: the decoder's output conv


def test_fp16_generator_loss_is_float32_so_a_high_loss_scale_does_not_skip_the_step():
    """The gradient entering the GAN term is dw * weight * scale: from 65504 on, a half-precision scalar overflows and
    the whole VQVAE step (reconstruction included) would be skipped, holding the loss scale down. (A one-convolution
    discriminator keeps every other gradient small.)"""
    import math
    from utils.amp_sc import AmpOptimizer
    trainer, vae, _ = _trainer(adaptive=False, fp16=1, dw=1.0)
    torch.manual_seed(0)
    disc = torch.nn.Conv2d(3, 1, 4, stride=2, padding=1)
    trainer.disc = trainer.disc_wo_ddp = disc
    trainer.disc_opt = AmpOptimizer(torch.optim.SGD(disc.parameters(), lr=0.0), list(disc.parameters()), 'cpu', fp16=1)
    trainer.vae_opt.scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 16)  # the scaler's cap, reached by growth
    out = trainer.train_step(g_it=0, stepping=True, inp_B3HW=torch.rand(2, 3, 16, 16) * 2 - 1)
    assert out['g_loss'].dtype == torch.float32
    assert trainer.vae_opt.num_skipped == 0 and math.isfinite(out['grad_norm'])


def test_training_usage_measures_each_scale_against_its_own_token_count():
    """A codebook used uniformly (the EMA's fixed point: B * pn^2 / V hits per code and step) reads 100% at every scale;
    the official `ret_usages` (the last scale's margin everywhere) reads 0% at the coarse ones."""
    trainer, vae, _ = _trainer(adaptive=False)
    q, B = vae.quantize, 8
    for si, pn in enumerate(PATCH_NUMS):
        q.ema_vocab_hit_SV[si] = B * pn * pn / q.vocab_size
    assert trainer.usage_percent(B) == [100.0] * len(PATCH_NUMS)
    official = q(torch.randn(B, 4, 4, 4), ret_usages=True)[1]  # one more (uniform-ish) update of the EMA
    assert official[0] < 10
    q.ema_vocab_hit_SV.zero_()
    q.ema_vocab_hit_SV[:, 0] = B * 16  # every token of every scale on one code: collapse
    assert trainer.usage_percent(B) == [100 / q.vocab_size] * len(PATCH_NUMS)


def _d_weights_fp32_fp16(one_conv_disc: bool = False, **loss_kw):
    """The adaptive weight of one trainer step in fp32 and under fp16 at the GradScaler's cap 2**15, from the same
    init and batch."""
    from utils.amp_sc import FP16_MAX_SCALE, AmpOptimizer
    weights = []
    for fp16 in (0, 1):
        trainer, _, _ = _trainer(adaptive=True, fp16=fp16, dw=1.0, **loss_kw)
        if one_conv_disc:
            torch.manual_seed(0)
            disc = torch.nn.Conv2d(3, 1, 4, stride=2, padding=1)
            trainer.disc = trainer.disc_wo_ddp = disc
            trainer.disc_opt = AmpOptimizer(torch.optim.SGD(disc.parameters(), lr=0.0), list(disc.parameters()),
                                            'cpu', fp16=fp16)
        if fp16:
            trainer.vae_opt.scaler = torch.amp.GradScaler('cpu', init_scale=FP16_MAX_SCALE)
        torch.manual_seed(1)
        out = trainer.train_step(g_it=0, stepping=False, inp_B3HW=torch.rand(2, 3, 16, 16) * 2 - 1)
        weights.append(out['d_weight'].item())
    return weights


def test_fp16_trainer_step_passes_the_loss_scale_to_the_adaptive_weight():
    """A reconstruction gradient too small for fp16 (a small --l2 weight, as large images give) underflows unless the
    adaptive weight takes its gradients of the scaled losses: with the GradScaler's scale, the trainer's d_weight under
    fp16 matches the fp32 step's. (A one-convolution discriminator keeps the GAN gradient itself far from overflow.)"""
    w32, w16 = _d_weights_fp32_fp16(one_conv_disc=True, l1=0.0, l2=1e-5)
    assert w32 > 0
    assert w16 == pytest.approx(w32, rel=0.01)  # fp16 vs float32: a known approximation


def test_fp16_adaptive_weight_survives_an_overflowing_gan_gradient():
    """At a high GradScaler scale the discriminator's fp16 backward overflows (here: the tiny patch discriminator at
    2**15). The step's own backward cannot tell the scaler (the GAN term enters it with weight 0), so the adaptive
    weight takes that gradient again at a smaller scale instead of turning the GAN term off."""
    w32, w16 = _d_weights_fp32_fp16()
    assert w32 > 0
    assert w16 == pytest.approx(w32, rel=0.15)  # fp16 autocast moves the reconstruction a little
