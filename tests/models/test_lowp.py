"""The bf16 residual stream of the fast sampling path (models/lowp.py, `stream_dtype`): within bf16 tolerance of the
float32 reference, measured against what the reference's own bf16 autocast deviates by; refreshed from the model's
weights on every call; kept beside the model, not on it."""
import copy

import pytest
import torch

from support import assert_equal_up_to_rounding, requires_cuda, rounding_chain, teacher_forced_tokens
from models.engine import release_sampling_caches, sampling_engine
from models.lowp import DecoderCopy, StepCopy

BF16 = torch.bfloat16


def _teacher_forced_inputs(vae, var, B=4):
    torch.manual_seed(1)
    label_B = torch.tensor([3, 5, 1, 0])[:B]
    x_BLCv = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(torch.rand(B, 3, 64, 64) * 2 - 1))
    return teacher_forced_tokens(var, label_B, x_BLCv)


def _all_steps(var, cond_BD, x_BLC, autocast: bool, stream_dtype=None, kv_cache='prealloc'):
    with torch.autocast('cpu', dtype=BF16, enabled=autocast):
        with sampling_engine(var).steps(cond_BD, x_BLC[:, :1], kv_cache=kv_cache, stream_dtype=stream_dtype) as step:
            return torch.cat([step(si, x_BLC[:, bg:ed]) for si, (bg, ed) in enumerate(var.begin_ends)], dim=1)


@torch.no_grad()
def test_bf16_stream_logits_stay_within_the_deviation_of_bf16_autocast(tiny_models):
    """Teacher-forced through every scale: the bf16 stream's logits deviate from the float32 reference by no more than
    a small multiple of what the official bf16 autocast path deviates by; the caller's autocast does not change them;
    both KV-cache modes give the same logits; no cache stays switched on."""
    vae, var = tiny_models
    cond_BD, x_BLC = _teacher_forced_inputs(vae, var)
    ref = _all_steps(var, cond_BD, x_BLC, autocast=False)
    amp = _all_steps(var, cond_BD, x_BLC, autocast=True)
    low = _all_steps(var, cond_BD, x_BLC, autocast=False, stream_dtype=BF16)
    assert low.dtype == torch.float32 and low.shape == ref.shape
    amp_err, low_err = (amp - ref).abs().mean(), (low - ref).abs().mean()
    assert 0 < amp_err and 0 < low_err < 3 * amp_err, (amp_err, low_err)
    assert (low - ref).abs().max() < 0.05 * ref.std()  # bf16 vs float32: a known approximation
    # autocast is off inside the bf16 steps: the same computation, exact
    assert torch.equal(_all_steps(var, cond_BD, x_BLC, autocast=True, stream_dtype=BF16), low)
    # keys in a preallocated buffer vs concatenated ones (two computations): bf16 ops, each rounded once
    assert_equal_up_to_rounding(_all_steps(var, cond_BD, x_BLC, autocast=False, stream_dtype=BF16, kv_cache='concat'),
                                low, reduction=1, depth=rounding_chain(var)['depth'], dtype=BF16)
    step_copy = sampling_engine(var)._step_copy
    assert not any(b.attn.caching or b.attn.cached_k is not None for b in list(var.blocks) + list(step_copy.blocks))


@torch.no_grad()
def test_step_copy_is_bf16_with_the_model_names_and_follows_weight_changes(tiny_models):
    """Every floating tensor of the copy is bf16 under the model's own name; `refresh` copies in-place updates (also
    through `.data`) and parameters replaced by `load_state_dict(assign=True)`."""
    vae, var = tiny_models
    step_copy = StepCopy(var, BF16)
    own = dict(var.named_parameters())
    named = dict(step_copy.named_parameters())
    assert named and all(t.dtype == BF16 and not t.requires_grad for t in named.values())
    assert all(torch.equal(t, own[n].to(BF16)) for n, t in named.items())
    assert {n.split('.')[0] for n in named} == {'blocks', 'head_nm', 'head'} | (
        {'shared_ada_lin'} if any(n.startswith('shared_ada_lin') for n in own) else set())
    saved = {k: v.clone() for k, v in var.state_dict().items()}
    try:
        var.head.weight.mul_(1.5)
        var.blocks[0].ffn.fc1.weight.data.mul_(0.5)
        var.load_state_dict({k: v * 2 if k.startswith('blocks.1.') else v for k, v in var.state_dict().items()},
                            assign=True)
        step_copy.refresh(var)
        own = dict(var.named_parameters())
        assert all(torch.equal(t, own[n].to(BF16)) for n, t in step_copy.named_parameters())
    finally:
        var.load_state_dict(saved)


@torch.no_grad()
def test_sampling_with_the_bf16_stream_follows_the_weights_and_leaves_the_model_alone(tiny_models):
    """End to end: images in [0, 1] of the reference's shape; after a weight change the next call samples with the new
    weights (equal to a fresh copy of the changed model); the model's attributes and state dict are untouched, the
    copies live in the engine and are freed by `release_sampling_caches`."""
    _, var = tiny_models
    kw = dict(B=3, label_B=torch.tensor([0, 4, 9]), g_seed=5, cfg=1.5, top_k=1, stream_dtype=BF16)
    attrs, keys = set(vars(var)), list(var.state_dict())
    out = sampling_engine(var).sample(**kw)
    assert out.shape == sampling_engine(var).sample(**dict(kw, stream_dtype=None)).shape
    assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert torch.equal(sampling_engine(var).sample(**kw), out)
    engine = sampling_engine(var)
    assert isinstance(engine._step_copy, StepCopy) and isinstance(engine._decoder_copy, DecoderCopy)
    assert set(vars(var)) == attrs and list(var.state_dict()) == keys

    saved = {k: v.clone() for k, v in var.state_dict().items()}
    try:
        var.head.weight.data.mul_(-1.0)  # a change the copy must see: flips which token is greedy
        changed = sampling_engine(var).sample(**kw)
        assert not torch.equal(changed, out)
        assert torch.equal(sampling_engine(copy.deepcopy(var)).sample(**kw), changed)  # a fresh engine and copy
    finally:
        var.load_state_dict(saved)
    release_sampling_caches(var)
    assert engine._step_copy is None and engine._decoder_copy is None


@torch.no_grad()
@pytest.mark.parametrize('channels_last', [False, True])
def test_bf16_decoder_copy_stays_within_the_deviation_of_bf16_autocast(tiny_models, channels_last):
    """The decoder copy (NCHW or channels-last) against the float32 decoder: within a small multiple of what autocast
    bf16 deviates by; float32 images in [-1, 1]."""
    vae, var = tiny_models
    torch.manual_seed(2)
    f_hat = vae.quantize.embedding(torch.randint(0, vae.V, (2, 16))).transpose(1, 2).reshape(2, vae.Cvae, 4, 4)
    ref = vae.fhat_to_img(f_hat)
    with torch.autocast('cpu', dtype=BF16):
        amp = vae.fhat_to_img(f_hat).float()
    dec = DecoderCopy(vae, BF16, channels_last=channels_last)
    low = dec(f_hat)
    assert low.dtype == torch.float32 and low.shape == ref.shape and low.abs().max() <= 1
    amp_err, low_err = (amp - ref).abs().mean(), (low - ref).abs().mean()
    assert 0 < low_err < 3 * amp_err, (amp_err, low_err)
    if channels_last:
        assert dec.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert (low - DecoderCopy(vae, BF16)(f_hat)).abs().mean() < 2 * amp_err  # other kernels, same precision


def test_stream_dtype_other_than_bf16_is_refused_before_sampling(tiny_models):
    _, var = tiny_models
    state = var.rng.manual_seed(11).get_state()
    for bad in (torch.float16, torch.float32, 'bf16'):
        with pytest.raises(ValueError, match='stream_dtype'):
            sampling_engine(var).sample(B=1, label_B=0, g_seed=3, stream_dtype=bad)
    assert torch.equal(var.rng.get_state(), state)  # refused before the seed was set or anything drawn


@pytest.mark.gpu
@requires_cuda()
def test_bf16_stream_with_graphs_and_compile_agrees_on_cuda():
    """On a GPU the whole fast path with the bf16 stream (graphs, compiled steps and decoder) against the plain bf16
    autocast path: greedy images within bf16 tolerance; a weight change reaches the captured graphs."""
    from models import build_vae_var
    from support import TINY
    torch.manual_seed(0)
    vae, var = build_vae_var(device='cuda', **TINY)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=0.5, init_head=1.0, init_std=-1)
    var.cond_drop_rate = 0.0
    var.eval()
    kw = dict(B=20, label_B=torch.arange(20, device='cuda') % 10, g_seed=3, cfg=1.5, top_k=1)
    try:
        with torch.inference_mode(), torch.autocast('cuda', dtype=BF16):
            ref = sampling_engine(var).sample(**kw)
            for compiled in (False, True):
                fast = dict(cuda_graph=True, compiled=compiled, partial_sort=True, stream_dtype=BF16)
                for _ in range(2):  # capture, then replay
                    out = sampling_engine(var).sample(**kw, **fast)
                    assert (out - ref).abs().mean() < 2e-2  # bf16 stream vs autocast: a known approximation
            var.head.weight.data.mul_(-1.0)
            ref_b = sampling_engine(var).sample(**kw)
            out_b = sampling_engine(var).sample(**kw, **fast)
            assert (ref_b - ref).abs().mean() > 5 * (out_b - ref_b).abs().mean()
    finally:
        release_sampling_caches(var)


@torch.no_grad()
def test_bf16_encoder_copy_latent_and_ids(tiny_models):
    """The encoder copy's float32 latent stays within a small multiple of bf16 autocast's deviation from the float32
    encode; its ids come from the tokenizer's own quantiser; the copy holds no tokenizer parameter of its own beyond
    the encoder and quant_conv (the quantiser is the tokenizer's)."""
    from models.lowp import EncoderCopy
    vae, _ = tiny_models
    torch.manual_seed(4)
    imgs = torch.rand(2, 3, 64, 64) * 2 - 1
    ref = vae.quant_conv(vae.encoder(imgs))
    with torch.autocast('cpu', dtype=BF16):
        amp = vae.quant_conv(vae.encoder(imgs)).float()
    for channels_last in (False, True):
        enc = EncoderCopy(vae, BF16, channels_last=channels_last)
        f = enc(imgs)
        assert f.dtype == torch.float32 and f.shape == ref.shape
        assert 0 < (f - ref).abs().mean() < 3 * (amp - ref).abs().mean()
        ids = enc.img_to_idxBl(imgs)
        assert torch.equal(torch.cat(ids, 1), torch.cat(vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=False), 1))
    assert {n.split('.')[0] for n, _ in enc.named_parameters()} == {'encoder', 'quant_conv'}


def test_bf16_copies_made_under_inference_mode_refresh_outside_it(tiny_models):
    """A copy made inside torch.inference_mode is refreshed in place by later calls under no_grad (and back): the
    copies are normal tensors, never inference tensors."""
    _, var = tiny_models
    kw = dict(B=2, label_B=torch.tensor([1, 2]), g_seed=1, top_k=1, stream_dtype=BF16)
    with torch.inference_mode():
        first = sampling_engine(var).sample(**kw)
    assert not sampling_engine(var)._step_copy.head.weight.is_inference()
    with torch.no_grad():
        assert torch.equal(sampling_engine(var).sample(**kw), first)
    with torch.inference_mode():
        assert torch.equal(sampling_engine(var).sample(**kw), first)
    release_sampling_caches(var)
