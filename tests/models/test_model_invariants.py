"""Behavioural invariants of the models beyond the golden vectors (tiny configs, CPU)."""

import pytest
import torch
import torch.nn.functional as F

from support import TINY, GUMBEL_GAIN, assert_equal_up_to_rounding, decoding, rounding_chain
from models import build_vae_var
from models.quant import PhiNonShared, PhiPartiallyShared, PhiShared


def _images(B, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, size, size, generator=g) * 2 - 1


def _tf_logits_with_cache(var, label_B, x_BLCv):
    """Run the blocks scale by scale through the KV cache (no mask), as sampling does, without CFG."""
    B = label_B.shape[0]
    cond_BD = var.class_emb(label_B)
    lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    x_full = torch.cat((cond_BD.unsqueeze(1) + var.pos_start.expand(B, -1, -1), var.word_embed(x_BLCv)), 1) + lvl_pos
    outs = []
    for b in var.blocks:
        b.attn.kv_caching(True)
    try:
        for bg, ed in var.begin_ends:
            x = x_full[:, bg:ed]
            for b in var.blocks:
                x = b(x=x, cond_BD=var.shared_ada_lin(cond_BD), attn_bias=None)
            outs.append(var.get_logits(x, cond_BD))
    finally:
        for b in var.blocks:
            b.attn.kv_caching(False)
    return torch.cat(outs, 1)


@pytest.mark.parametrize('shared_aln', [False, True])
def test_kv_cache_logits_equal_teacher_forced(tiny_models, shared_aln):
    vae, var = tiny_models
    if shared_aln:
        torch.manual_seed(1)
        vae, var = build_vae_var(device='cpu', **{**TINY, 'shared_aln': True})
        var.init_weights(init_adaln_gamma=0.5, init_head=1.0)
        var.cond_drop_rate = 0.0
        var.eval()
    with torch.no_grad():
        idx_Bl = vae.img_to_idxBl(_images(3, 64))
        x_BLCv = vae.quantize.idxBl_to_var_input(idx_Bl)
        label_B = torch.tensor([1, 5, 10])
        teacher = var(label_B, x_BLCv)
        cached = _tf_logits_with_cache(var, label_B, x_BLCv)
    # two computations: attention over each scale's queries with a growing cache vs over all L at once with the mask
    assert_equal_up_to_rounding(cached, teacher, **rounding_chain(var, longest_sum=var.L))


def test_block_causal_mask_never_sees_finer_scales(tiny_models):
    _, var = tiny_models
    bias = var.attn_bias_for_masking[0, 0]
    lvl = var.lvl_1L[0]
    for i in range(var.L):
        for j in range(var.L):
            assert (bias[i, j] == 0) == bool(lvl[i] >= lvl[j])
    # behavioural: changing the input of a finer scale leaves coarser logits unchanged
    with torch.no_grad():
        x = torch.randn(2, var.L - var.first_l, var.Cvae)
        label = torch.tensor([0, 3])
        a = var(label, x)
        x2 = x.clone()
        bg, _ = var.begin_ends[2]
        x2[:, bg - var.first_l:] += 5.0
        b = var(label, x2)
    # the same computation on those rows (same shapes; masked positions add exact zeros): bitwise equal
    torch.testing.assert_close(a[:, :bg], b[:, :bg], rtol=0, atol=0)
    assert not torch.allclose(a[:, bg:], b[:, bg:])


def test_idxBl_to_var_input_matches_autoregressive_path(tiny_models):
    vae, _ = tiny_models
    quant = vae.quantize
    with torch.no_grad():
        idx_Bl = vae.img_to_idxBl(_images(2, 64, seed=3))
        teacher = quant.idxBl_to_var_input(idx_Bl)
        f_hat = torch.zeros(2, vae.Cvae, 4, 4)
        pieces = []
        SN = len(quant.v_patch_nums)
        for si, pn in enumerate(quant.v_patch_nums):
            h_BChw = quant.embedding(idx_Bl[si]).transpose(1, 2).reshape(2, vae.Cvae, pn, pn)
            f_hat, nxt = quant.get_next_autoregressive_input(si, SN, f_hat, h_BChw)
            if si < SN - 1:
                pieces.append(nxt.flatten(2).transpose(1, 2))
    # the same computation (embedding, bicubic_up, phi, add_, area_down in the same order on the same shapes): exact
    torch.testing.assert_close(torch.cat(pieces, 1), teacher, rtol=0, atol=0)
    # and the final f_hat decodes to the same image as idxBl_to_img (embed_to_fhat runs the same ops): exact
    with torch.no_grad():
        torch.testing.assert_close(vae.fhat_to_img(f_hat), vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True),
                                   rtol=0, atol=0)


def test_f_to_idxBl_or_fhat_round_trip(tiny_models):
    vae, _ = tiny_models
    quant = vae.quantize
    with torch.no_grad():
        f = vae.quant_conv(vae.encoder(_images(2, 64, seed=5)))
        idx_Bl = quant.f_to_idxBl_or_fhat(f, to_fhat=False)
        fhats = quant.f_to_idxBl_or_fhat(f, to_fhat=True)
        ms_h = [quant.embedding(idx).transpose(1, 2).reshape(2, vae.Cvae, pn, pn)
                for idx, pn in zip(idx_Bl, quant.v_patch_nums)]
        again = quant.embed_to_fhat(ms_h, all_to_max_scale=True, last_one=False)
        for a, b in zip(fhats, again):  # two computations: bicubic_up of channels-last vs contiguous codes, then phi
            assert_equal_up_to_rounding(a, b, **rounding_chain(quant, longest_sum=16))
        assert [i.shape for i in idx_Bl] == [(2, pn * pn) for pn in quant.v_patch_nums]
        # tokenising the same latent again gives the same ids
        assert all(torch.equal(a, b) for a, b in zip(idx_Bl, quant.f_to_idxBl_or_fhat(f.clone(), to_fhat=False)))


def test_phi_index_maps():
    q10 = PhiPartiallyShared(torch.nn.ModuleList([torch.nn.Identity() for _ in range(4)]))
    assert [list(q10.qresi_ls).index(q10[si / 9]) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    q14 = PhiPartiallyShared(torch.nn.ModuleList([torch.nn.Identity() for _ in range(4)]))
    assert [list(q14.qresi_ls).index(q14[si / 13]) for si in range(14)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    mods = [torch.nn.Identity() for _ in range(6)]
    ns = PhiNonShared(mods)
    assert [list(ns).index(ns[si / 5]) for si in range(6)] == list(range(6))
    sh = PhiShared(torch.nn.Identity())
    assert sh[0.0] is sh[1.0]


@pytest.mark.parametrize('cfg', [
    dict(patch_nums=(1, 2, 4), share_quant_resi=0),
    dict(patch_nums=(1, 2, 3, 4), share_quant_resi=1, shared_aln=True),
    dict(patch_nums=(1, 3, 4), share_quant_resi=2, attn_l2_norm=False),
])
def test_other_configs_train_and_sample(cfg):
    torch.manual_seed(0)
    vae, var = build_vae_var(device='cpu', **{**TINY, **cfg})
    var.cond_drop_rate = 0.0
    img = _images(2, 64)
    idx_Bl = vae.img_to_idxBl(img)
    x = vae.quantize.idxBl_to_var_input(idx_Bl)
    logits = var(torch.tensor([0, 9]), x)
    assert logits.shape == (2, var.L, 64) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert var.head.weight.grad is not None
    var.eval()
    out = var.autoregressive_infer_cfg(B=2, label_B=torch.tensor([1, 2]), g_seed=0, cfg=2.0, top_k=5, top_p=0.9)
    assert out.shape == (2, 3, 64, 64) and 0 <= out.min() and out.max() <= 1


def test_vae_forward_trains_and_tracks_usage():
    torch.manual_seed(0)
    from models import VQVAE
    vae = VQVAE(vocab_size=64, z_channels=8, ch=32, v_patch_nums=(1, 2, 4), test_mode=False, ch_mult=(1, 2, 4))
    vae.train()
    rec, usages, vq_loss = vae(_images(2, 16), ret_usages=True)
    assert rec.shape == (2, 3, 16, 16) and vq_loss.ndim == 0 and len(usages) == 3
    (F.mse_loss(rec, _images(2, 16)) + vq_loss).backward()
    assert vae.quantize.embedding.weight.grad is not None and vae.encoder.conv_in.weight.grad is not None
    assert vae.quantize.ema_vocab_hit_SV.sum() > 0


def test_per_row_seeds_do_not_depend_on_batch(tiny_models):
    _, var = tiny_models
    labels = torch.tensor([1, 2, 3, 4])
    together = var.autoregressive_infer_cfg(B=4, label_B=labels, g_seed=[10, 11, 12, 13], cfg=1.5, top_k=10, top_p=0.9)
    alone = var.autoregressive_infer_cfg(B=2, label_B=labels[2:], g_seed=[12, 13], cfg=1.5, top_k=10, top_p=0.9)
    # the same tokens (a draw that round-off of the logits moves across a bin edge is ~1e-6 likely), decoded as a
    # batch of 4 vs of 2: two computations, the decode's rounding
    vae = var.vae_proxy[0]
    decode = rounding_chain(*decoding(vae))
    assert_equal_up_to_rounding(together[2:], alone, **decode)
    smooth = var.autoregressive_infer_cfg(B=2, label_B=labels[:2], g_seed=[10, 11], cfg=1.5, top_k=10, more_smooth=True)
    smooth1 = var.autoregressive_infer_cfg(B=1, label_B=labels[1:2], g_seed=[11], cfg=1.5, top_k=10, more_smooth=True)
    # soft codes: the logits' rounding (a batch of 2 vs 1 through the transformer) reaches the image through the
    # Gumbel softmax, amplified
    chain = rounding_chain(var, *decoding(vae), longest_sum=var.L)
    assert_equal_up_to_rounding(smooth[1:], smooth1, **chain, gain=GUMBEL_GAIN)


def test_seeded_sampling_repeats_and_seeds_differ(tiny_models):
    _, var = tiny_models
    a = var.autoregressive_infer_cfg(B=2, label_B=3, g_seed=7, cfg=2.0, top_k=20, top_p=0.95)
    b = var.autoregressive_infer_cfg(B=2, label_B=3, g_seed=7, cfg=2.0, top_k=20, top_p=0.95)
    c = var.autoregressive_infer_cfg(B=2, label_B=3, g_seed=8, cfg=2.0, top_k=20, top_p=0.95)
    assert torch.equal(a, b) and not torch.equal(a, c)
    unc = var.autoregressive_infer_cfg(B=2, label_B=None, g_seed=1)
    assert unc.shape == (2, 3, 64, 64)


def test_bf16_autocast_runs_on_cpu(tiny_models):
    vae, var = tiny_models
    idx_Bl = vae.img_to_idxBl(_images(2, 64))
    x = vae.quantize.idxBl_to_var_input(idx_Bl)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = var(torch.tensor([0, 1]), x)
        img = var.autoregressive_infer_cfg(B=2, label_B=1, g_seed=0, top_k=1)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    ref = var(torch.tensor([0, 1]), x)
    assert (logits - ref).abs().max() < 0.1 * ref.abs().max()  # bf16 vs float32: a known approximation
    # decoded in the autocast dtype, as official
    assert img.shape == (2, 3, 64, 64) and torch.isfinite(img.float()).all()


# ---------------------------------------------------------------------------------------------- bad input
def test_label_out_of_range_is_a_value_error(tiny_models):
    vae, var = tiny_models
    x = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(_images(1, 64)))
    with pytest.raises(ValueError, match=r'\[0, 10\]'):
        var(torch.tensor([11]), x)
    with pytest.raises(ValueError, match=r'\[0, 10\]'):
        var.autoregressive_infer_cfg(B=1, label_B=torch.tensor([42]))


def test_a_single_scale_is_refused():
    with pytest.raises(ValueError, match='at least two scales'):
        build_vae_var(device='cpu', **{**TINY, 'patch_nums': (4,)})


def test_wrong_image_size_says_what_is_expected(tiny_models):
    vae, _ = tiny_models
    for size in (32, 63, 80):  # too small, one pixel short, a 5x5 latent
        with pytest.raises(ValueError, match=r'use 64x64 images'):
            vae.img_to_idxBl(_images(1, size))
    with pytest.raises(ValueError, match=r'\(B, 3, 64, 64\)'):
        vae.img_to_idxBl(_images(1, 64)[:, :1])
    # as officially, any image whose latent is the last scale's size is accepted (the strided convolutions floor)
    idx_Bl = vae.img_to_idxBl(_images(1, 72))
    assert [t.shape[1] for t in idx_Bl] == [pn * pn for pn in vae.v_patch_nums]
    assert vae.img_to_reconstructed_img(_images(1, 79), last_one=True).shape == (1, 3, 64, 64)


def test_official_attributes_rng_and_uniform_prob_can_be_assigned(tiny_models):
    """Official code replaces `var.rng` with a fresh Generator; an assigned class prior drives unlabelled sampling."""
    _, var = tiny_models
    g = torch.Generator().manual_seed(3)
    var.rng = g
    assert var.rng is g
    prior = torch.zeros(1, var.num_classes)
    prior[0, 4] = 1.0
    var.uniform_prob = prior
    try:
        assert torch.equal(var.uniform_prob, prior)
        only4 = var.autoregressive_infer_cfg(B=2, label_B=None, g_seed=5, top_k=1)
        # unlabelled sampling draws its labels from the prior first, so the generator state differs from label_B=4;
        # with greedy top-k 1 the remaining draws do not matter
        assert torch.equal(only4, var.autoregressive_infer_cfg(B=2, label_B=4, g_seed=5, top_k=1))
    finally:
        var.uniform_prob = None
    assert torch.equal(var.uniform_prob, torch.full((1, var.num_classes), 1 / var.num_classes))


def test_checkpoint_of_another_config_names_keys_and_fit(tiny_models, tmp_path):
    _, var = tiny_models
    torch.manual_seed(0)
    _, other = build_vae_var(device='cpu', **{**TINY, 'depth': 3, 'patch_nums': (1, 2, 4)})
    with pytest.raises(RuntimeError) as e:
        var.load_state_dict(other.state_dict())
    msg = str(e.value)
    assert 'pos_1LC' in msg and 'blocks.2.' in msg and 'depth=3' in msg and 'patch_nums=(1, 2, 4)' in msg


def test_truncated_checkpoint_says_so(tiny_models, tmp_path):
    from models import read_checkpoint
    _, var = tiny_models
    p = tmp_path / 'var.pth'
    torch.save(var.state_dict(), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match='truncated or corrupt'):
        read_checkpoint(p)
    with pytest.raises(FileNotFoundError, match='not found'):
        read_checkpoint(tmp_path / 'missing.pth')


# ---------------------------------------------------------------------------------------------- sampling helpers
def test_top_p_never_removes_the_most_likely_token():
    """As official: top-p removes the sorted positions whose cumulative probability is <= 1 - top_p, but never the
    largest. With a tiny top_p only the argmax survives, also where the cumulative sum reaches exactly 1 (uniform
    rows: every position is then <= 1 - top_p in float32), and sampling returns it."""
    from models.helpers import filter_top_k_top_p_, filter_top_k_top_p_partial_, sample_with_top_k_top_p_
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 64, generator=g) * 2
    logits[0, :2] = 0.0  # uniform rows: probabilities 1/64, a float32 cumsum of exactly 1
    argmax = logits.argmax(-1)
    for top_k, filt in ((0, filter_top_k_top_p_), (8, filter_top_k_top_p_), (8, filter_top_k_top_p_partial_)):
        out = filt(logits.clone(), top_k, 1e-9)
        finite = torch.isfinite(out)
        assert finite.sum(-1).eq(1).all(), (top_k, filt.__name__)  # exactly one survivor per row
        rows = torch.ones_like(argmax, dtype=torch.bool)
        rows[0, :2] = False  # ties: any one of them is the most likely token
        assert torch.equal(out.argmax(-1)[rows], argmax[rows])
        assert torch.equal(out[finite], logits[finite])  # the survivor keeps its logit
    ids = sample_with_top_k_top_p_(logits.clone(), top_k=0, top_p=1e-9, rng=torch.Generator().manual_seed(1))
    assert ids.shape == (3, 5, 1)
    assert torch.equal(ids[..., 0][rows], argmax[rows])
    # a large top_p keeps more than one token (the filter is not simply an argmax)
    assert torch.isfinite(filter_top_k_top_p_(logits.clone(), 0, 0.9)).sum(-1).gt(1).all()


def test_drop_path_scales_the_kept_samples():
    """Stochastic depth (timm semantics, as official): in training each sample is zeroed with probability p and the
    kept ones are divided by 1 - p, so the expectation is unchanged; in eval mode (or p = 0) it is the identity."""
    from models.helpers import DropPath, drop_path
    torch.manual_seed(0)
    x = torch.ones(20000, 3, 2)
    for p in (0.5, 0.2):
        y = drop_path(x, p, training=True)
        per_sample = y[:, 0, 0]
        assert torch.equal(y, per_sample.view(-1, 1, 1).expand_as(y))  # whole samples are kept or dropped
        kept = per_sample != 0
        # 1 / (1 - p) rounded once in float32 vs x / float32(1 - p) (two roundings)
        assert_equal_up_to_rounding(per_sample[kept], torch.full_like(per_sample[kept], 1 / (1 - p)), reduction=1,
                                    depth=2)
        assert abs(kept.float().mean().item() - (1 - p)) < 0.02
        assert abs(y.mean().item() - 1.0) < 0.03
    assert drop_path(x, 0.5, training=False) is x and drop_path(x, 0.0, training=True) is x
    m = DropPath(0.5)
    assert torch.equal(m.eval()(x), x)
    assert set(m.train()(x).unique().tolist()) == {0.0, 2.0}


# ---------------------------------------------------------------------------------------------- sampling
def test_more_smooth_gumbel_gets_scaled_filtered_cfg_logits_and_the_tau_schedule(tiny_models, monkeypatch):
    """As official: at scale si (ratio = si/(S-1)) the Gumbel softmax receives the CFG-combined, top-k/top-p filtered
    logits times (1 + ratio), with tau = max(0.27 (1 - 0.95 ratio), 0.005)."""
    import models.var as var_mod
    from models.helpers import filter_top_k_top_p_
    _, var = tiny_models
    B, cfg, top_k, top_p = 2, 2.5, 10, 0.9
    raw, seen = [], []
    real_gumbel = var_mod.gumbel_softmax_with_rng
    real_step = var_mod.scale_step

    def step_spy(model, x_BlC, cond_BD):
        out = real_step(model, x_BlC, cond_BD)
        raw.append(out.clone())
        return out

    def gumbel_spy(logits, tau=1, hard=False, eps=1e-10, dim=-1, rng=None):
        seen.append((logits.clone(), tau, hard))
        return real_gumbel(logits, tau=tau, hard=hard, eps=eps, dim=dim, rng=rng)
    monkeypatch.setattr(var_mod, 'scale_step', step_spy)
    monkeypatch.setattr(var_mod, 'gumbel_softmax_with_rng', gumbel_spy)
    img = var.autoregressive_infer_cfg(B=B, label_B=torch.tensor([2, 7]), g_seed=4, cfg=cfg, top_k=top_k, top_p=top_p,
                                       more_smooth=True)
    assert img.shape == (B, 3, 64, 64)
    S = len(var.patch_nums)
    assert len(raw) == len(seen) == S
    for si, (logits_2BlV, (gum_logits, tau, hard)) in enumerate(zip(raw, seen)):
        ratio = si / (S - 1)
        t = cfg * ratio
        expected = filter_top_k_top_p_((1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:], top_k, top_p) * (1 + ratio)
        assert not hard
        assert tau == max(0.27 * (1 - 0.95 * ratio), 0.005), si  # the same float64 ops: exact
        assert torch.equal(torch.isinf(gum_logits), torch.isinf(expected)), si
        # the same computation (the sampling loop's CFG, filter and scaling, op for op): exact
        torch.testing.assert_close(gum_logits, expected, rtol=0, atol=0, msg=f'scale {si}')
    assert_equal_up_to_rounding(seen[-1][1], 0.27 * 0.05, reduction=1, depth=3)  # 0.27 (1 - 0.95) in float64


def test_int_labels_zero_is_a_class_and_negative_is_unconditional(tiny_models):
    """As official: an int label_B fills the batch with that class; only a negative int means unconditional
    (num_classes). Label 0 is an ordinary class."""
    _, var = tiny_models
    kw = dict(B=2, g_seed=3, cfg=2.0, top_k=5)
    zero = var.autoregressive_infer_cfg(label_B=0, **kw)
    assert torch.equal(zero, var.autoregressive_infer_cfg(label_B=torch.zeros(2, dtype=torch.long), **kw))
    unc = var.autoregressive_infer_cfg(label_B=-1, **kw)
    assert torch.equal(unc, var.autoregressive_infer_cfg(label_B=torch.full((2,), var.num_classes), **kw))
    assert not torch.equal(zero, unc)
    assert torch.equal(var.autoregressive_infer_cfg(label_B=4, **kw),
                       var.autoregressive_infer_cfg(label_B=torch.full((2,), 4), **kw))


def test_dropped_condition_is_the_unconditional_class(tiny_models):
    """As official: u = rand(B) from the global RNG, label <- num_classes where u < cond_drop_rate (in eval mode
    too)."""
    vae, var = tiny_models
    x = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(_images(4, 64, seed=2)))
    label = torch.tensor([0, 3, 5, 9])
    unc_label = torch.full_like(label, var.num_classes)
    with torch.no_grad():
        cond = var(label, x)
        unc = var(unc_label, x)
        assert not torch.allclose(cond, unc)
        var.cond_drop_rate = 1.0
        try:
            torch.testing.assert_close(var(label, x), unc, rtol=0, atol=0)  # the same computation: exact
            var.cond_drop_rate = 0.5  # row by row, from the same global draw
            torch.manual_seed(11)
            dropped = torch.rand(4) < 0.5
            assert 0 < int(dropped.sum()) < 4
            torch.manual_seed(11)
            mixed = var(label, x)
        finally:
            var.cond_drop_rate = 0.0
    # rows of batches of the same shape: the same computation per row, exact
    torch.testing.assert_close(mixed[dropped], unc[dropped], rtol=0, atol=0)
    torch.testing.assert_close(mixed[~dropped], cond[~dropped], rtol=0, atol=0)
    # in training mode too (no drop path here, so the only randomness is the condition drop)
    torch.manual_seed(0)
    _, var_t = build_vae_var(device='cpu', **TINY, drop_path_rate=0.0, cond_drop_rate=1.0)
    var_t.init_weights(init_adaln=0.5, init_adaln_gamma=0.5, init_head=1.0, init_std=-1)
    with torch.no_grad():
        train_out = var_t.train()(label, x)
        var_t.eval().cond_drop_rate = 0.0
        torch.testing.assert_close(train_out, var_t(unc_label, x), rtol=0, atol=0)  # no dropout: the same computation


# ---------------------------------------------------------------------------------------------- quantiser statistics
def _quantizer(V=16, patch_nums=(1, 2, 4)):
    from models.quant import VectorQuantizer2
    torch.manual_seed(0)
    q = VectorQuantizer2(vocab_size=V, Cvae=4, using_znorm=False, beta=0.25, v_patch_nums=patch_nums,
                         quant_resi=0.5, share_quant_resi=4)
    q.eini(-1)
    return q


def test_vocab_hit_ema_follows_the_warmup_rule():
    """As official: record_hit counts scales; the row of scale si becomes hit_V at record 0, ema*0.9 + hit*0.1 for
    records 1..99 and ema*0.99 + hit*0.01 from 100 on (updated in one process too, a documented deviation)."""
    q = _quantizer()
    SN = len(q.v_patch_nums)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 4, 4, 4, generator=g) * 0.05 for _ in range(3)]
    with torch.no_grad():
        hits = [[idx.flatten().bincount(minlength=q.vocab_size).float() for idx in q.f_to_idxBl_or_fhat(f, False)]
                for f in inputs]
    assert any(not torch.equal(hits[0][si], hits[1][si]) for si in range(SN))
    expected = torch.zeros(SN, q.vocab_size, dtype=torch.float64)
    record = 0
    q.train()
    for call in range(40):  # 120 records: the copy, the 0.9 warm-up and the 0.99 phase
        with torch.no_grad():
            q(inputs[call % 3])
        for si in range(SN):
            h = hits[call % 3][si].double()
            if record == 0:
                expected[si] = h
            elif record < 100:
                expected[si] = expected[si] * 0.9 + h * 0.1
            else:
                expected[si] = expected[si] * 0.99 + h * 0.01
            record += 1
        assert q.record_hit == record
        if call in (5, 20, 33, 39):  # inside the warm-up, at 63 records, just past 100, at the end
            # float32 vs float64 arithmetic of the same recursion: two-term sums, chained over 120 records
            assert_equal_up_to_rounding(q.ema_vocab_hit_SV.double(), expected, reduction=2, depth=record,
                                        dtype=torch.float32, msg=f'call {call}')
    q.eval()
    before = q.ema_vocab_hit_SV.clone()
    with torch.no_grad():
        q(inputs[0])
    assert torch.equal(q.ema_vocab_hit_SV, before) and q.record_hit == record  # eval mode records nothing


def test_vocab_usage_margin():
    """As official: margin = world_size (B H W) / V * 0.08 (one process: world_size 1), and
    usage[si] = 100 * mean(ema_vocab_hit_SV[si] >= margin)."""
    q = _quantizer(V=16).eval()
    B, H = 2, 4
    margin = 1 * (B * H * H) / q.vocab_size * 0.08  # 0.16
    rows = torch.zeros(3, q.vocab_size)
    rows[0, :4] = margin * 1.01  # just above the margin: used
    rows[0, 4:8] = margin * 0.99  # just below: unused
    rows[1, :12] = margin * 5  # well above the margin (and below 10 x margin)
    rows[2, :] = 2.0
    q.ema_vocab_hit_SV.copy_(rows)
    f = torch.randn(B, 4, H, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, usages, _ = q(f, ret_usages=True)
        _, none, _ = q(f, ret_usages=False)
    expected = [100 * (rows[si] >= margin).float().mean().item() for si in range(3)]
    assert expected == [25.0, 75.0, 100.0]
    assert usages == expected and none is None  # multiples of 100 / 16: exact in float32 in any order
