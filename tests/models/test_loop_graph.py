"""The whole sampling loop as one CUDA graph (`cuda_graph='loop'`, models/cuda_graphs.SamplingLoopGraph).

On the CPU the loop runs without the capture (`capture=False`): the same static buffers, the same generator hand-over
and the same loop code as the graph, checked against the plain path for the same seeds: the same f_hat, and the
caller's generators left where the plain path leaves them. On a GPU the captured graph is checked the same way."""
import pytest
import torch

from support import assert_equal_up_to_rounding, decoding, requires_cuda, rounding_chain
from models.engine import release_sampling_caches, sampling_engine

BF16 = torch.bfloat16
SETTINGS = [dict(cfg=1.5, top_k=20, top_p=0.9, more_smooth=False), dict(cfg=3.0, top_k=0, top_p=0.0, more_smooth=True)]


def _plain_f_hat(var, **kw):
    """f_hat of the plain path (the on_scale hook sees the final latent last)."""
    seen = []
    sampling_engine(var).sample(on_scale=lambda si, f: seen.append(f.clone()), **kw)
    return seen[-1]


def _generators(var, g_seed, B):
    """What `autoregressive_infer_cfg` makes of g_seed (labels given): None, the model's rng, or one per row."""
    _, rng = var.sampling_labels(B, torch.zeros(B, dtype=torch.long), g_seed)
    return rng


def _plain_loop(var, label_B, rng, settings):
    """The plain path's loop (autoregressive_infer_cfg without a graph) drawing from the given generators."""
    cond_BD, lvl_pos, next_token_map, f_hat = var.first_scale_input(label_B)
    with sampling_engine(var).steps(cond_BD, next_token_map) as step:
        return var.sample_scales(step, next_token_map, f_hat, lvl_pos, rng, **settings)


def _states(rng):
    if rng is None:
        return [torch.get_rng_state()]
    return [g.get_state() for g in ([rng] if isinstance(rng, torch.Generator) else rng)]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_capturable_draw_is_torch_multinomials_own(dtype):
    """The loop graph's draw (no host-side check) gives torch.multinomial's ids for one sample per row, and leaves
    the generator where torch.multinomial leaves it; one generator or one per row block."""
    from models.helpers import multinomial_one_capturable, multinomial_with_rng
    probs = torch.rand(6, 512, generator=torch.Generator().manual_seed(0)).pow(3).to(dtype)
    probs[:, :100] = 0  # filtered-out tokens
    g_ref, g_new = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(multinomial_one_capturable(probs, g_new), torch.multinomial(probs, 1, True, generator=g_ref))
    assert torch.equal(g_new.get_state(), g_ref.get_state())
    rows_ref = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    rows_new = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    ids = multinomial_with_rng(probs, 1, True, rows_new, capturable=True)
    assert torch.equal(ids, multinomial_with_rng(probs, 1, True, rows_ref))
    assert (ids >= 100).all()
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(rows_new, rows_ref))
    with pytest.raises(ValueError, match='one sample'):
        multinomial_with_rng(probs, 2, True, None, capturable=True)


@torch.no_grad()
@pytest.mark.parametrize('g_seed', [None, 7, [3, 1, 4]], ids=['global', 'one', 'rows'])
@pytest.mark.parametrize('settings', SETTINGS, ids=['topk-topp', 'smooth'])
def test_loop_without_capture_equals_the_plain_path(tiny_models, g_seed, settings):
    """Top-k/top-p and Gumbel sampling, every generator layout: the loop's f_hat equals the plain path's (which
    filters with the same full sort), twice in a row (static buffers reused), and the caller's generators end in the
    same states as the plain path leaves them."""
    _, var = tiny_models
    B, label_B = 3, torch.tensor([2, 0, 9])
    engine = sampling_engine(var)
    for _ in range(2):
        torch.manual_seed(123)
        rng = _generators(var, g_seed, B)
        ref = _plain_loop(var, label_B, rng, settings)
        ref_states = _states(rng)

        torch.manual_seed(123)
        rng = _generators(var, g_seed, B)
        out = engine.sample_in_one_graph(label_B, rng, settings, capture=False)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        assert all(torch.equal(a, b) for a, b in zip(_states(rng), ref_states))
    if g_seed is not None:  # and _plain_loop is autoregressive_infer_cfg's own loop
        torch.testing.assert_close(_plain_f_hat(var, B=B, label_B=label_B, g_seed=g_seed, **settings), out,
                                   rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize('stream_dtype', [None, BF16], ids=['f32-stream', 'bf16-stream'])
def test_loop_without_capture_under_autocast_equals_the_plain_path(tiny_models, stream_dtype):
    """Under bf16 autocast the loop reads Linear weights cast once (the whole model, or only the word embedding when
    the steps run on the bf16 copy): the same f_hat as the plain path's autocast casts."""
    _, var = tiny_models
    B, label_B = 2, torch.tensor([5, 1])
    kw = dict(cfg=1.5, top_k=30, top_p=0.95, more_smooth=False)
    with torch.autocast('cpu', dtype=BF16):
        ref = _plain_f_hat(var, B=B, label_B=label_B, g_seed=11, stream_dtype=stream_dtype, **kw)
        graph_loop = sampling_engine(var)
        out = graph_loop.sample_in_one_graph(label_B, _generators(var, 11, B), kw, stream_dtype=stream_dtype,
                                             capture=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    loop = next(iter(graph_loop._graphs.values()))
    cast_names = {type(m).__name__ for m, *_ in loop.cast.entries}
    assert cast_names == {'Linear'}
    n_cast = len(loop.cast.entries)
    assert (n_cast == 2) == (stream_dtype is not None)  # the word embedding's weight and bias alone
    release_sampling_caches(var)


@torch.no_grad()
def test_loop_graph_is_made_again_when_settings_or_weights_change(tiny_models):
    """One capture is kept per engine: other settings or batch make a new one; a parameter that moved
    (`load_state_dict(assign=True)`) invalidates it; `cuda_graph='loop'` is refused off CUDA and unknown values are
    refused."""
    _, var = tiny_models
    engine = sampling_engine(var)
    label_B = torch.tensor([1, 2])
    kw = dict(cfg=1.5, top_k=5, top_p=0.0, more_smooth=False)
    engine.sample_in_one_graph(label_B, None, kw, capture=False)
    first = next(iter(engine._graphs.values()))
    engine.sample_in_one_graph(label_B, None, kw, capture=False)
    assert next(iter(engine._graphs.values())) is first and first.still_valid()
    engine.sample_in_one_graph(label_B, None, dict(kw, cfg=2.0), capture=False)
    assert len(engine._graphs) == 1 and next(iter(engine._graphs.values())) is not first
    loop = next(iter(engine._graphs.values()))
    var.load_state_dict({k: v.clone() for k, v in var.state_dict().items()}, assign=True)
    assert not loop.still_valid()
    with pytest.raises(ValueError, match='CUDA'):
        sampling_engine(var).sample(B=1, label_B=0, cuda_graph='loop')
    with pytest.raises(ValueError, match="'loop'"):
        sampling_engine(var).sample(B=1, label_B=0, cuda_graph='whole')
    release_sampling_caches(var)
    assert not engine._graphs


class _GraphAPIRecorder:
    """torch.cuda's stream and graph API replaced by recorders, so that the capture's bookkeeping runs on the CPU:
    what is registered, warmed up, captured and replayed, and in which order. The work itself runs eagerly."""

    def __init__(self, monkeypatch):
        import contextlib
        self.events = []
        recorder = self

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        class Graph:
            def __init__(self):
                self.registered = []

            def register_generator_state(self, generator):
                recorder.events.append('register')
                self.registered.append(generator)

            def replay(self):
                recorder.events.append('replay')
                recorder.replayed_states = [g.get_state() for g in self.registered]

        @contextlib.contextmanager
        def graph(g, pool=None):
            self.events.append('capture')
            yield
            self.events.append('captured')

        @contextlib.contextmanager
        def side_stream(s):
            self.events.append('side stream')
            yield
        for name, fake in dict(Stream=Stream, CUDAGraph=Graph, graph=graph, stream=side_stream,
                               current_stream=lambda device=None: Stream(),
                               device=lambda device: contextlib.nullcontext(),
                               get_rng_state=lambda device=None: torch.get_rng_state(),
                               set_rng_state=lambda state, device=None: torch.set_rng_state(state)).items():
            monkeypatch.setattr(torch.cuda, name, fake)


@torch.no_grad()
@pytest.mark.parametrize('g_seed', [None, 7, [3, 1, 4]], ids=['global', 'one', 'rows'])
def test_capture_bookkeeping_with_the_graph_api_recorded(tiny_models, monkeypatch, g_seed):
    """The capture path with torch.cuda's graph API recorded: the loop's own generators (none, one, or one per row)
    are registered before the capture, after a warm-up on a side stream whose draws from the global RNG are undone;
    the KV caches stay with the graph and the model's caching is off; every call replays once, with the caller's
    generator states copied into the registered generators first."""
    recorder = _GraphAPIRecorder(monkeypatch)
    _, var = tiny_models
    B, label_B = 3, torch.tensor([2, 0, 9])
    engine = sampling_engine(var)
    settings = dict(cfg=1.5, top_k=20, top_p=0.9, more_smooth=False)
    torch.manual_seed(5)
    if g_seed is None:  # the recorded capture runs the loop once, drawing what a replay would draw
        _plain_loop(var, label_B, None, settings)
    expected_state = torch.get_rng_state()
    torch.manual_seed(5)
    rng = _generators(var, g_seed, B)
    engine.sample_in_one_graph(label_B, rng, settings)
    assert torch.equal(torch.get_rng_state(), expected_state)  # the warm-up's draws are not the caller's
    n_gens = B if isinstance(g_seed, list) else (0 if g_seed is None else 1)
    assert recorder.events == ['side stream'] + ['register'] * n_gens + ['capture', 'captured', 'replay']
    loop = next(iter(engine._graphs.values()))
    assert all(g not in ([rng] if isinstance(rng, torch.Generator) else rng or []) for g in loop.gens)
    assert not any(b.attn.caching or b.attn.cached_k is not None for b in var.blocks)
    assert [k.shape for k, _ in loop.kv] == [(2 * B, var.num_heads, var.L, var.C // var.num_heads)] * var.depth
    callers = [] if rng is None else ([rng] if isinstance(rng, torch.Generator) else rng)
    for g in callers:
        g.manual_seed(1234)  # the next call's states reach the registered generators before the replay
    engine.sample_in_one_graph(label_B, rng, settings)
    assert recorder.events[-1] == 'replay' and recorder.events.count('capture') == 1
    assert all(torch.equal(a, g.get_state()) for a, g in zip(recorder.replayed_states, callers))
    release_sampling_caches(var)


def _cuda_var():
    from models import build_vae_var
    from support import TINY
    torch.manual_seed(0)
    _, var = build_vae_var(device='cuda', **TINY)
    var.init_weights(init_adaln=0.5, init_adaln_gamma=0.5, init_head=1.0, init_std=-1)
    var.cond_drop_rate = 0.0
    return var.eval()


@pytest.mark.gpu
@requires_cuda()
@pytest.mark.parametrize('g_seed', [None, 7, list(range(20))], ids=['global', 'one', 'rows'])
def test_captured_loop_draws_the_plain_paths_random_numbers(g_seed):
    """The captured loop against the plain path, float32 without TF32, top-k/top-p sampling: the same images (the
    registered generators give the graph the plain path's random numbers), on capture and on replay, and the
    caller's generators (or the global CUDA RNG) end in the same states."""
    var = _cuda_var()
    B = 20
    kw = dict(B=B, label_B=torch.arange(B, device='cuda') % 10, g_seed=g_seed, cfg=1.5, top_k=50, top_p=0.9)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for _ in range(2):  # capture, then replay
            torch.cuda.manual_seed(5)
            ref = var.autoregressive_infer_cfg(**kw)
            after_ref = torch.cuda.get_rng_state() if g_seed is None else var.rng.get_state()
            torch.cuda.manual_seed(5)
            out = sampling_engine(var).sample(**kw, cuda_graph='loop')
            after = torch.cuda.get_rng_state() if g_seed is None else var.rng.get_state()
            # the same random numbers and so the same ids; decoded in chunks vs at once (two computations)
            vae = var.vae_proxy[0]
            assert_equal_up_to_rounding(out, ref, **rounding_chain(*decoding(vae)))
            assert torch.equal(after, after_ref)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        release_sampling_caches(var)


@pytest.mark.gpu
@requires_cuda()
def test_captured_loop_under_bf16_with_compile_and_the_bf16_stream():
    """bf16 autocast: the loop graph equals the plain path with the per-scale graphs' weight casts, within compiled
    kernels' rounding; with the bf16 stream too; a weight change reaches the replayed graph."""
    var = _cuda_var()
    B = 20
    kw = dict(B=B, label_B=torch.arange(B, device='cuda') % 10, g_seed=list(range(B)), cfg=1.5, top_k=1)
    try:
        with torch.inference_mode(), torch.autocast('cuda', dtype=BF16):
            ref = var.autoregressive_infer_cfg(**kw)
            for fast in (dict(), dict(compiled=True), dict(compiled=True, stream_dtype=BF16)):
                for _ in range(2):
                    out = sampling_engine(var).sample(**kw, cuda_graph='loop', **fast)
                    assert (out - ref).abs().mean() < 2e-2, fast  # bf16, compiled kernels: a known approximation
            var.head.weight.data.mul_(-1.0)
            ref_b = var.autoregressive_infer_cfg(**kw)
            out_b = sampling_engine(var).sample(**kw, cuda_graph='loop', compiled=True, stream_dtype=BF16)
            assert (ref_b - ref).abs().mean() > 5 * (out_b - ref_b).abs().mean()
    finally:
        release_sampling_caches(var)
