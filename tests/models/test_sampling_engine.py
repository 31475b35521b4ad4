"""The sampling engine (models/engine.py) and the other fast paths agree with the plain (official-equivalent) paths
they replace; the engine's caches live beside the model, not on it."""
import contextlib
import gc
import weakref

import pytest
import torch

from support import (GUMBEL_GAIN, assert_equal_up_to_rounding, decoding, requires_cuda, rounding_chain,
                     teacher_forced_tokens)
from models import engine as engine_mod
from models import var as var_mod
from models.basic_var import SelfAttention, kv_caching, optional_kernels
from models.engine import GRAPH_DECODE_CHUNK, release_cuda_graphs, sampling_engine
from models.var import scale_step
from models.helpers import filter_top_k_top_p_, filter_top_k_top_p_partial_


def test_prealloc_kv_cache_equals_concat(tiny_models):
    _, var = tiny_models
    kw = dict(B=3, label_B=torch.tensor([0, 4, 9]), g_seed=5, cfg=3.0, top_k=1)
    ref = sampling_engine(var).sample(**kw, kv_cache='concat')
    fast = sampling_engine(var).sample(**kw, kv_cache='prealloc')
    assert torch.equal(ref, fast)  # greedy: the same ids, then the same decode (the same computation)
    kw = dict(B=2, label_B=torch.tensor([1, 2]), g_seed=0, cfg=1.5, top_k=20, top_p=0.9, more_smooth=True)
    # soft codes: attention over keys in a preallocated (strided) buffer vs concatenated ones may round differently
    # (two computations), and the Gumbel softmax passes the logits' rounding on amplified
    vae = var.vae_proxy[0]
    chain = rounding_chain(var, *decoding(vae), longest_sum=var.L)
    assert_equal_up_to_rounding(sampling_engine(var).sample(**kw, kv_cache='concat'),
                                sampling_engine(var).sample(**kw, kv_cache='prealloc'), gain=GUMBEL_GAIN, **chain)


@pytest.mark.parametrize('top_k,top_p', [(5, 0.0), (50, 0.9), (200, 0.96), (900, 0.5)])
def test_partial_sort_filter_equals_full_sort(top_k, top_p):
    g = torch.Generator().manual_seed(top_k)
    logits = torch.randn(4, 7, 4096, generator=g) * 3
    ref = filter_top_k_top_p_(logits.clone(), top_k, top_p)
    fast = filter_top_k_top_p_partial_(logits.clone(), top_k, top_p)
    assert torch.equal(torch.isinf(ref), torch.isinf(fast))
    assert torch.equal(ref[torch.isfinite(ref)], fast[torch.isfinite(fast)])


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_partial_sort_filter_with_ties_keeps_the_same_logits(dtype):
    """Half-precision logits tie often, at the k-th value too: every tie there survives top-k and counts for top-p.
    Where equal logits straddle the top-p cut, which of them stay is unspecified (the reference's sort order among
    equal values); the kept values themselves must agree, row by row."""
    tie = torch.tensor([[5.0, 4.0, 1.0, 1.0, 1.0, 0.0]])
    assert torch.equal(filter_top_k_top_p_partial_(tie.clone(), 3, 0.9), filter_top_k_top_p_(tie.clone(), 3, 0.9))
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 64, 4096, generator=g) * 3).to(dtype).float()
    ref = filter_top_k_top_p_(logits.clone(), 900, 0.96)
    fast = filter_top_k_top_p_partial_(logits.clone(), 900, 0.96)
    assert torch.equal(ref.sort(dim=-1).values, fast.sort(dim=-1).values)


def test_partial_sort_sampling_matches(tiny_models):
    _, var = tiny_models
    kw = dict(B=2, label_B=torch.tensor([3, 7]), g_seed=11, cfg=2.0, top_k=8, top_p=0.9)
    assert torch.equal(var.autoregressive_infer_cfg(**kw), sampling_engine(var).sample(**kw, partial_sort=True))


def _plain_attention(attn: SelfAttention, x, bias):
    """Reference: the attention written out with an explicit softmax."""
    B, L, C = x.shape
    qkv = x @ attn.mat_qkv.weight.T + torch.cat((attn.q_bias, attn.zero_k_bias, attn.v_bias))
    q, k, v = qkv.view(B, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    if attn.attn_l2_norm:
        q = torch.nn.functional.normalize(q, dim=-1) * attn.scale_mul_1H11.clamp_max(attn.max_scale_mul).exp()
        k = torch.nn.functional.normalize(k, dim=-1)
    w = (q @ k.transpose(-1, -2)) * attn.scale + (0 if bias is None else bias)
    out = (w.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
    return attn.proj(out)


@pytest.mark.parametrize('l2', [True, False])
def test_sdpa_equals_plain_attention(tiny_models, l2):
    _, var = tiny_models
    torch.manual_seed(0)
    attn = SelfAttention(0, embed_dim=128, num_heads=4, attn_l2_norm=l2, flash_if_available=False)
    x = torch.randn(2, var.L, 128)
    bias = var.attn_bias_for_masking
    with torch.no_grad():
        assert_equal_up_to_rounding(attn(x, bias), _plain_attention(attn, x, bias),
                                    **rounding_chain(attn, longest_sum=var.L))
    assert 'kernel=sdpa' in repr(attn)


@pytest.mark.gpu
@requires_cuda()
@pytest.mark.parametrize('kernel', ['flash_attn_func', 'xformers_attn'])
def test_fused_attention_kernels_match_sdpa(kernel):
    if optional_kernels()[kernel] is None:
        pytest.skip(f'{kernel} is not installed')
    torch.manual_seed(0)
    attn = SelfAttention(0, embed_dim=256, num_heads=4, attn_l2_norm=True, flash_if_available=True).cuda()
    plain = SelfAttention(0, embed_dim=256, num_heads=4, attn_l2_norm=True, flash_if_available=False).cuda()
    plain.load_state_dict(attn.state_dict())
    if kernel == 'xformers_attn':
        attn.flash_attn_func = None
    else:
        attn.xformers_attn = None
    x = torch.randn(4, 680, 256, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        # two bf16 computations: float32 sums, each op's result rounded to bf16 (reduction 1 per op)
        assert_equal_up_to_rounding(attn(x, None).float(), plain(x, None).float(), reduction=1,
                                    depth=rounding_chain(attn)['depth'], dtype=torch.bfloat16)


def _flex_vs_dense(var, x, label):
    ref = var(label, x)
    var.attn_impl = 'flex'
    try:
        out = var(label, x)
    finally:
        var.attn_impl = 'sdpa'
    return out, ref


@pytest.mark.filterwarnings('ignore::UserWarning')
def test_flex_attention_path_equals_dense_mask(tiny_models):
    """Forward on CPU (FlexAttention has no CPU backward); the backward is checked on CUDA below."""
    vae, var = tiny_models
    x = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(torch.rand(2, 3, 64, 64) * 2 - 1))
    label = torch.tensor([2, 8])
    with torch.no_grad():
        out, ref = _flex_vs_dense(var, x, label)
        chain = rounding_chain(var, longest_sum=var.L)
        assert_equal_up_to_rounding(out, ref, **chain)
        var.prog_si = 2  # progressive training uses a shorter prefix: the mask follows
        try:
            out, ref = _flex_vs_dense(var, x[:, :var.begin_ends[2][1] - 1], label)
        finally:
            var.prog_si = -1
        assert_equal_up_to_rounding(out, ref, **chain)


@pytest.mark.gpu
@requires_cuda()
def test_flex_attention_gradients_match_on_cuda():
    from models import build_vae_var
    torch.manual_seed(0)
    vae, var = build_vae_var(device='cuda', patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), V=512, Cvae=16, ch=32,
                             depth=4, num_classes=10, drop_path_rate=0.0, cond_drop_rate=0.0)
    var.init_weights(init_adaln_gamma=0.5, init_head=1.0)
    x = torch.randn(2, var.L - 1, 16, device='cuda')
    label = torch.tensor([1, 2], device='cuda')
    grads = []
    for impl in ('sdpa', 'flex'):
        var.attn_impl = impl
        var.zero_grad(set_to_none=True)
        var(label, x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in var.named_parameters() if p.grad is not None})
    # a weight gradient sums over the batch and tokens
    chain = rounding_chain(var, longest_sum=x.shape[0] * var.L, backward=True)
    for n in grads[0]:
        assert_equal_up_to_rounding(grads[1][n], grads[0][n], **chain, msg=n)


def _cuda_var():
    """A small VAR on the GPU, in eval mode, with an init that gives the sampling tests a real signal."""
    from models import build_vae_var
    torch.manual_seed(0)
    _, var = build_vae_var(device='cuda', V=512, Cvae=16, ch=32, depth=4, num_classes=10)
    var.init_weights(init_adaln_gamma=0.5, init_head=1.0)
    return var.eval()


@pytest.mark.gpu
@requires_cuda()
def test_cuda_graph_sampling_equals_plain_path():
    var = _cuda_var()
    B = GRAPH_DECODE_CHUNK + 4  # the graph path decodes in chunks
    kw = dict(B=B, label_B=torch.arange(B, device='cuda') % 10, g_seed=3, cfg=1.5, top_k=1)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = var.autoregressive_infer_cfg(**kw)
        vae = var.vae_proxy[0]
        for _ in range(2):  # capture, then replay
            out = sampling_engine(var).sample(**kw, cuda_graph=True)
            # greedy: the same ids; decoded in chunks vs at once (two computations)
            assert_equal_up_to_rounding(out, ref, **rounding_chain(*decoding(vae)))
        with torch.autocast('cuda', dtype=torch.bfloat16):
            # the graphs read Linear weights cast once to bf16: the same numbers as autocast's casts
            ref16 = sampling_engine(var).sample(**kw, kv_cache='prealloc')
            out16 = sampling_engine(var).sample(**kw, cuda_graph=True)
            var.blocks[0].ffn.fc1.weight.data.mul_(1.5)  # a write the version counters do not see
            ref16b = sampling_engine(var).sample(**kw, kv_cache='prealloc')
            out16b = sampling_engine(var).sample(**kw, cuda_graph=True)
            with torch.inference_mode():
                out16c = sampling_engine(var).sample(**kw, cuda_graph=True)  # a capture of its own
        # The graphs follow the weight change: whatever the graph path differs from the plain one by (chunked decode:
        # other conv algorithms, bf16 rounding) is far below what the change moves. Stale weights give out16b = out16.
        change = (ref16b.float() - ref16.float()).abs().mean()
        assert change > 0
        for graph_out, plain in ((out16, ref16), (out16b, ref16b), (out16c, ref16b)):
            assert (graph_out.float() - plain.float()).abs().mean() < 0.1 * change
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        release_cuda_graphs(var)


@pytest.mark.gpu
@requires_cuda()
def test_compiled_cuda_graph_sampling_equals_plain_path():
    var = _cuda_var()
    kw = dict(B=4, label_B=torch.tensor([0, 1, 2, 3], device='cuda'), g_seed=3, cfg=1.5, top_k=1)
    try:
        with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16):
            ref = sampling_engine(var).sample(**kw, kv_cache='prealloc')
            out = sampling_engine(var).sample(**kw, cuda_graph=True, compiled=True, partial_sort=True)
        assert (out.float() - ref.float()).abs().mean() < 2e-2  # bf16, compiled kernels: a known approximation
    finally:
        release_cuda_graphs(var)


def test_sampling_state_after_an_error_and_official_attributes(tiny_models, monkeypatch):
    """An exception mid-sampling leaves no KV cache switched on; `rng` and `uniform_prob` exist as officially; an
    integer-like seed (numpy, 0-d tensor) is a seed; with label_B=None and a seed list each row draws its own label."""
    import numpy as np
    _, var = tiny_models
    calls = []

    def failing_step(model, x_BlC, cond_BD):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError('boom')
        return scale_step(model, x_BlC, cond_BD)
    monkeypatch.setattr(var_mod, 'scale_step', failing_step)
    with pytest.raises(RuntimeError, match='boom'):
        var.autoregressive_infer_cfg(B=2, label_B=torch.tensor([1, 2]), g_seed=0, top_k=5)
    assert not any(b.attn.caching or b.attn.cached_k is not None for b in var.blocks)
    monkeypatch.undo()

    assert isinstance(var.rng, torch.Generator) and var.uniform_prob.shape == (1, var.num_classes)
    kw = dict(B=2, label_B=torch.tensor([1, 2]), cfg=1.5, top_k=5)
    ref = var.autoregressive_infer_cfg(g_seed=5, **kw)
    assert torch.equal(var.autoregressive_infer_cfg(g_seed=np.int64(5), **kw), ref)
    assert torch.equal(var.autoregressive_infer_cfg(g_seed=torch.tensor(5), **kw), ref)
    batch = var.autoregressive_infer_cfg(B=3, label_B=None, g_seed=[7, 8, 9], top_k=5)
    alone = var.autoregressive_infer_cfg(B=1, label_B=None, g_seed=[8], top_k=5)
    # row 1's label and tokens from seed 8 alone; decoded as a batch of 3 vs of 1 (two computations)
    vae = var.vae_proxy[0]
    assert_equal_up_to_rounding(batch[1:2], alone, **rounding_chain(*decoding(vae)))


def test_cast_linear_weights_give_the_autocast_numbers_and_follow_updates(tiny_models):
    """The CUDA-graph path reads Linear weights pre-cast to the autocast dtype: bit-identical logits to autocast's own
    casts (checked on CPU autocast), the model's parameters back afterwards, and in-place updates (also through
    `.data`, which no version counter sees) or replaced parameters copied over on `refresh`. A replaced tensor
    changes the addresses the graphs were captured with (they are then captured again)."""
    from models.cuda_graphs import CastLinearWeights, tensor_addresses
    _, var = tiny_models
    own = {n: p for n, p in var.named_parameters()}
    torch.manual_seed(0)
    x_BlC, cond_BD = torch.randn(4, 9, var.C), var.class_emb(torch.tensor([0, 1, 2, 3]))

    def logits(cast=None):
        kv_caching(var.blocks, True, var.L)
        try:
            with torch.autocast('cpu', dtype=torch.bfloat16), (cast.swapped_in() if cast else contextlib.nullcontext()):
                return scale_step(var, x_BlC, cond_BD)
        finally:
            kv_caching(var.blocks, False)

    with torch.no_grad():
        cast = CastLinearWeights(var, torch.bfloat16)
        assert {p.dtype for *_, p in cast.entries} == {torch.bfloat16} and len(cast.entries) > 4 * var.depth
        with cast.swapped_in():
            assert var.head.weight.dtype == var.blocks[0].attn.mat_qkv.weight.dtype == torch.bfloat16
        assert torch.equal(logits(cast), logits())
        assert all(p is own[n] for n, p in var.named_parameters())  # swapped back

        saved = {k: v.clone() for k, v in var.state_dict().items()}
        try:
            before = logits()
            var.head.weight.mul_(1.5)  # an in-place update (as an optimiser step)
            var.blocks[0].ffn.fc1.weight.data.mul_(0.5)  # a write through .data
            assert not torch.equal(logits(), before)
            cast.refresh()
            assert torch.equal(logits(cast), logits())
            addresses = tensor_addresses(var)
            var.load_state_dict(saved)  # in place: same addresses
            assert tensor_addresses(var) == addresses
            var.load_state_dict(saved, assign=True)  # replaced parameter objects
            assert tensor_addresses(var) != addresses
            cast.refresh()
            assert torch.equal(logits(cast), logits())
        finally:
            var.load_state_dict(saved)


def test_cast_linear_weights_refresh_picks_up_replaced_parameters(tiny_models):
    """After `load_state_dict(..., assign=True)` with other values, `refresh` copies the NEW parameters (not the
    replaced objects) into the cast copies, and `swapped_in` hands the new parameters back to the modules."""
    from models.cuda_graphs import CastLinearWeights
    _, var = tiny_models
    saved = {k: v.clone() for k, v in var.state_dict().items()}
    try:
        with torch.no_grad():
            cast = CastLinearWeights(var, torch.bfloat16)
            old = {id(m): (m.weight, m.bias) for m in var.modules() if isinstance(m, torch.nn.Linear)}
            doubled = {k: v * 2 if v.is_floating_point() else v.clone() for k, v in saved.items()}
            var.load_state_dict(doubled, assign=True)
            linears = [m for m in var.modules() if isinstance(m, torch.nn.Linear)]
            assert all(m.weight is not old[id(m)][0] for m in linears)  # replaced objects, with other values
            assert torch.equal(var.head.weight, 2 * old[id(var.head)][0]) and var.head.weight.abs().max() > 0
            cast.refresh()
            for m, name, p, copy in cast.entries:
                assert p is m._parameters[name]
                assert torch.equal(copy, m._parameters[name].to(torch.bfloat16))
            new = {n: p for n, p in var.named_parameters()}
            with cast.swapped_in():
                assert var.head.weight.dtype == torch.bfloat16
                # one rounding to bf16: within half its ulp (eps / 2, relative)
                torch.testing.assert_close(var.head.weight.float(), 2 * saved['head.weight'],
                                           rtol=torch.finfo(torch.bfloat16).eps / 2, atol=0)
            assert all(p is new[n] for n, p in var.named_parameters())  # the loaded parameters are back
    finally:
        var.load_state_dict(saved)


# the model's own attributes (nn.Module's internals aside): no cache of any fast path is among them
MODEL_ATTRIBUTES = {'C', 'Cvae', 'D', 'L', 'V', '_rng', '_uniform_prob', 'attn_impl', 'begin_ends', 'build_config',
                    'config', 'cond_drop_rate', 'depth', 'drop_path_rate', 'first_l', 'num_classes', 'num_heads',
                    'num_stages_minus_1', 'patch_nums', 'prog_si', 'vae_proxy',
                    'vae_quant_proxy'}


def _own_attributes(var):
    return set(vars(var)) - set(vars(torch.nn.Module()))


def test_engine_caches_are_not_model_attributes(tiny_models):
    """VAR is only the model: its attributes and state dict are the same before and after sampling through every
    fast path, none of them holds an engine, and the fast-path methods are not on the class."""
    from models.var import VAR
    _, var = tiny_models
    attrs, keys = _own_attributes(var), list(var.state_dict())
    assert attrs == MODEL_ATTRIBUTES
    kw = dict(B=2, label_B=torch.tensor([1, 2]), g_seed=0, top_k=5)
    for fast in (dict(kv_cache='concat'), dict(kv_cache='prealloc'), dict(partial_sort=True)):
        sampling_engine(var).sample(**kw, **fast)
    assert _own_attributes(var) == attrs and list(var.state_dict()) == keys
    assert not any(isinstance(v, engine_mod.SamplingEngine) for v in vars(var).values())
    assert sampling_engine(var) is sampling_engine(var) and sampling_engine(var).var is var
    for name in ('scale_step', 'compiled_scale_step', 'release_cuda_graphs', 'flex_block_mask', '_scale_graphs',
                 '_kv_caching', '_graph_cache', '_compiled_step', '_block_masks'):
        assert not hasattr(VAR, name) and not hasattr(var, name), name
    assert not any(b.attn.caching or b.attn.cached_k is not None for b in var.blocks)


def test_engine_goes_away_with_its_model():
    """The engines live in a weak mapping: a model that is gone takes its engine (and caches) with it, and a deep
    copy of a model starts with an engine of its own."""
    import copy
    from models import build_vae_var
    from support import TINY
    _, var = build_vae_var(device='cpu', **TINY)
    var.eval().autoregressive_infer_cfg(B=1, label_B=0, g_seed=0, top_k=3)
    engine = sampling_engine(var)
    twin = copy.deepcopy(var)
    assert sampling_engine(twin) is not engine and sampling_engine(twin).var is twin
    refs = [weakref.ref(var), weakref.ref(twin)]
    del var, twin
    gc.collect()
    assert all(r() is None for r in refs)  # the engines, which outlive them here, did not keep them alive
    assert engine not in engine_mod._ENGINES.values()
    with pytest.raises(RuntimeError, match='no longer exists'):
        engine.var
    release_cuda_graphs(torch.nn.Linear(1, 1))  # a model without an engine: nothing to release


def test_engine_steps_equal_teacher_forcing_and_switch_the_cache_off(tiny_models):
    """The engine's per-scale steps, in both KV-cache modes, give the logits of the model's teacher-forced forward
    (no condition drop) for the same token inputs; afterwards no block keeps a cache, also after an error."""
    vae, var = tiny_models
    B = 2
    label_B = torch.tensor([3, 5])
    x_BLCv = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(torch.rand(B, 3, 64, 64) * 2 - 1))
    with torch.no_grad():
        ref_BLV = var(label_B, x_BLCv)
        cond_BD, x_BLC = teacher_forced_tokens(var, label_B, x_BLCv)
        for mode in ('concat', 'prealloc'):
            with sampling_engine(var).steps(cond_BD, x_BLC[:, :1], kv_cache=mode) as step:
                out = torch.cat([step(si, x_BLC[:, bg:ed]) for si, (bg, ed) in enumerate(var.begin_ends)], dim=1)
            # two computations: per-scale steps through the KV cache vs one masked forward over all L tokens
            assert_equal_up_to_rounding(out, ref_BLV, **rounding_chain(var, longest_sum=var.L))
            assert not any(b.attn.caching or b.attn.cached_k is not None for b in var.blocks)
        with pytest.raises(ValueError, match='kv_cache'):
            sampling_engine(var).sample(B=1, label_B=0, kv_cache='grow')
        with pytest.raises(ValueError, match='CUDA'):
            sampling_engine(var).sample(B=1, label_B=0, cuda_graph=True)


def test_flex_block_masks_are_cached_beside_the_model(tiny_models):
    """The training BlockMasks are built once per (scales, length, device) in basic_var and shared by models with the
    same scales; VAR keeps only its `attn_impl` switch."""
    from models.basic_var import flex_block_mask
    _, var = tiny_models
    ed = var.begin_ends[2][1]
    mask = flex_block_mask(var.patch_nums, ed, var.lvl_1L.device)
    assert flex_block_mask(list(var.patch_nums), ed, 'cpu') is mask
    assert mask.shape[-2:] == (ed, ed)
    dense_ll = var.attn_bias_for_masking[0, 0, :ed, :ed] == 0
    q, k = torch.meshgrid(torch.arange(ed), torch.arange(ed), indexing='ij')
    assert torch.equal(mask.mask_mod(0, 0, q, k), dense_ll)


def test_sampling_keeps_the_official_signature_and_the_engine_adds_the_switches():
    """VAR's sampling: the official parameters and defaults first, then this project's editing keywords and the
    per-scale hook (webapp's next-scale view). The engine's `sample`: the same parameters, then its fast-path switches,
    keyword only."""
    import inspect
    from models.var import VAR
    official = [('B', inspect.Parameter.empty), ('label_B', inspect.Parameter.empty), ('g_seed', None), ('cfg', 1.5),
                ('top_k', 0), ('top_p', 0.0), ('more_smooth', False), ('input_img_tokens', None), ('edit_mask', None),
                ('on_scale', None)]
    params = inspect.signature(VAR.autoregressive_infer_cfg).parameters
    assert [(n, p.default) for n, p in params.items()] == [('self', inspect.Parameter.empty)] + official
    params = inspect.signature(engine_mod.SamplingEngine.sample).parameters
    assert [(n, p.default) for n, p in params.items()] == [('self', inspect.Parameter.empty)] + official + [
        ('kv_cache', 'prealloc'), ('partial_sort', False), ('cuda_graph', False), ('compiled', False),
        ('stream_dtype', None)]
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY
               for n in ('kv_cache', 'partial_sort', 'cuda_graph', 'compiled', 'stream_dtype'))
