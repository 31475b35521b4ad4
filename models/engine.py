# The fast paths of VAR's sampling loop (arXiv 2404.02905, section 3.2: next-scale prediction with a KV cache).
"""Sampling engine: VAR's sampling loop with its fast paths, standing on the model's public pieces.

`VAR.autoregressive_infer_cfg` (models/var.py) is the sampling loop as the paper writes it: per scale, transformer
step -> CFG -> top-k/top-p -> sample -> next-scale input, then decode. `sampling_engine(var).sample(...)` runs the
same loop (`VAR.first_scale_input`, `VAR.sample_scales`) with fast versions of the two parts that have them: the
transformer step of each scale (`SamplingEngine.steps`) and the final decode (`decode`). The model knows nothing of
the engine. One switch each, every one numerically equal to the plain path (tests/models/test_sampling_engine.py):

- `kv_cache='concat'` grows each block's KV cache by concatenation (the official path, the reference);
  `'prealloc'` writes each scale into a cache preallocated for all L positions.
- `compiled=True` runs the step (and the VQVAE decoder) through torch.compile.
- `cuda_graph=True` replays CUDA graphs of the steps (`models.cuda_graphs`), captured on first use per batch size,
  autocast dtype and mode; the decode then runs in chunks of GRAPH_DECODE_CHUNK images to keep the peak low.
- `cuda_graph='loop'` captures the whole loop instead (`sample_in_one_graph`): every scale's step, CFG, filtering,
  sampling and next-scale input in one graph whose registered generators draw the plain path's random numbers.
- `stream_dtype=torch.bfloat16` runs the steps and the decoder on bf16 copies of their modules (`models.lowp`):
  a bf16 residual stream instead of the official float32 one. The only switch that changes the numbers (within bf16
  tolerance); it combines with the others.
- (`partial_sort`, the top-p over the top-k survivors, is a switch of `helpers.sample_with_top_k_top_p_`.)

The caches (the compiled step, the captured graphs, the bf16 copies) belong to one `SamplingEngine` per model,
found with `sampling_engine(var)` in a weak mapping owned by this module: the model carries none of them (its
attributes and state dict are those of the model alone), a deep copy of the model starts with no caches, and an
engine goes away with its model. `release_cuda_graphs(var)` frees the graphs' memory, `release_sampling_caches(var)`
everything.
"""
import contextlib
import functools
import weakref
from typing import Callable, Dict, Iterator, List, Optional, Union

import torch
import torch.nn as nn

from .basic_var import kv_caches_on
from .helpers import active_autocast_dtype, check_edit_inputs
from .lowp import DecoderCopy, StepCopy, check_stream_dtype
from .var import scale_step

GRAPH_DECODE_CHUNK = 16  # images per decoder call on the CUDA-graph path
# the bf16 decoder copy's memory format; to be chosen by measurement (benchmarks.timings.profile_sample, decode rows)
LOWP_DECODER_CHANNELS_LAST = False

__all__ = ['SamplingEngine', 'sampling_engine', 'release_cuda_graphs', 'release_sampling_caches',
           'GRAPH_DECODE_CHUNK', 'KV_CACHE_MODES']

KV_CACHE_MODES = ('concat', 'prealloc')

ScaleStep = Callable[[int, torch.Tensor], torch.Tensor]  # (si, x_2BlC) -> logits_2BlV, float32


class SamplingEngine:
    """The fast-path caches of one VAR (held weakly) and the steps and decode its sampling loop runs."""

    def __init__(self, var: nn.Module):
        self._var = weakref.ref(var)
        self._compiled_step: Optional[Callable] = None
        self._graphs: Dict[tuple, object] = {}
        self._step_copy: Optional[StepCopy] = None
        self._decoder_copy: Optional[DecoderCopy] = None
        self._compiled_decoder_copy: Optional[Callable] = None

    @property
    def var(self) -> nn.Module:
        var = self._var()
        if var is None:
            raise RuntimeError('the model of this sampling engine no longer exists')
        return var

    @torch.no_grad()
    def sample(self, B: int, label_B: Optional[Union[int, torch.LongTensor]], g_seed=None, cfg: float = 1.5,
               top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
               input_img_tokens: Optional[List[torch.Tensor]] = None, edit_mask: Optional[torch.Tensor] = None,
               on_scale: Optional[Callable[[int, torch.Tensor], None]] = None, *, kv_cache: str = 'prealloc',
               partial_sort: bool = False, cuda_graph: Union[bool, str] = False, compiled: bool = False,
               stream_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """`VAR.autoregressive_infer_cfg` (same arguments, same images) with the fast-path switches. Each but
        stream_dtype gives the numbers of the plain path:

        kv_cache: 'prealloc' (default: in-place writes into a preallocated cache) or 'concat' (the official growth
            by concatenation, kept as the reference path).
        partial_sort: top-p over the top-k survivors only (see `helpers.filter_top_k_top_p_partial_`).
        cuda_graph: True replays CUDA graphs of the per-scale transformer steps (captured on the first call for this
            batch size and autocast dtype; implies the preallocated KV cache). 'loop': the whole loop -- every
            scale's step, CFG, filtering, sampling and next-scale input -- as one graph, captured per batch size and
            sampling settings; the same random numbers as the plain path (its generators are registered with the
            graph). It filters with the full sort (partial_sort's tie handling needs a host sync); editing and
            on_scale use the per-scale graphs. CUDA only.
        compiled: run the per-scale steps and the VQVAE decoder through torch.compile (fuses elementwise work).
        stream_dtype: None (default: the official float32 residual stream) or torch.bfloat16: the steps and the
            decoder run on bf16 copies of their modules, autocast off inside (`models.lowp`). Faster on a GPU; the
            one switch whose numbers agree with the plain path within bf16 tolerance, not exactly.
        """
        var = self.var
        check_edit_inputs(input_img_tokens, edit_mask)
        self.check_switches(var.class_emb.weight.device, kv_cache, cuda_graph, stream_dtype)
        label_B, rng = var.sampling_labels(B, label_B, g_seed)
        if cuda_graph == 'loop' and edit_mask is None and on_scale is None:
            settings = dict(cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth)
            f_hat = self.sample_in_one_graph(label_B, rng, settings, compiled=compiled, stream_dtype=stream_dtype)
        else:
            cond_BD, lvl_pos, next_token_map, f_hat = var.first_scale_input(label_B)
            with self.steps(cond_BD, next_token_map, kv_cache=kv_cache, cuda_graph=bool(cuda_graph),
                            compiled=compiled, stream_dtype=stream_dtype) as step:
                f_hat = var.sample_scales(step, next_token_map, f_hat, lvl_pos, rng, cfg, top_k, top_p, more_smooth,
                                          partial_sort, input_img_tokens, edit_mask, on_scale)
        return self.decode(f_hat, cuda_graph=bool(cuda_graph), compiled=compiled, stream_dtype=stream_dtype)

    @staticmethod
    def check_switches(device: torch.device, kv_cache: str, cuda_graph: bool, stream_dtype=None) -> None:
        """Refuse unknown or impossible switches before anything is drawn from a generator."""
        if kv_cache not in KV_CACHE_MODES:
            raise ValueError(f"kv_cache must be 'concat' or 'prealloc', got {kv_cache!r}")
        if cuda_graph not in (False, True, 'loop'):
            raise ValueError(f"cuda_graph must be False, True (per-scale graphs) or 'loop' (one graph), "
                             f"got {cuda_graph!r}")
        if cuda_graph and device.type != 'cuda':
            raise ValueError(f'cuda_graph={cuda_graph!r} needs the model on a CUDA device')
        check_stream_dtype(stream_dtype)

    def compiled_step(self) -> Callable:
        """`scale_step` through torch.compile (built once per engine; the KV-cache append is a compile boundary)."""
        if self._compiled_step is None:
            self._compiled_step = torch.compile(scale_step, dynamic=True)
        return self._compiled_step

    def step_copy(self, dtype: torch.dtype) -> StepCopy:
        """The model's step modules in `dtype` (`models.lowp`), made on first use and refreshed from the model's
        weights on every call."""
        var = self.var
        device = var.head.weight.device
        if self._step_copy is None or self._step_copy.dtype != dtype or self._step_copy.device != device:
            self._graphs.clear()  # graphs captured on an older copy read its memory
            self._step_copy = None  # free the old copy before making the new one
            self._step_copy = StepCopy(var, dtype)
        else:
            self._step_copy.refresh(var)
        return self._step_copy

    def decoder_copy(self, dtype: torch.dtype, channels_last: bool) -> DecoderCopy:
        """The VQVAE decoder in `dtype` (`models.lowp`), made on first use and refreshed on every call."""
        vae = self.var.vae_proxy[0]
        device = vae.post_quant_conv.weight.device
        copy_ = self._decoder_copy
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if copy_ is None or copy_.dtype != dtype or copy_.device != device or copy_.memory_format != fmt:
            self._decoder_copy = self._compiled_decoder_copy = None
            self._decoder_copy = DecoderCopy(vae, dtype, channels_last=channels_last)
        else:
            copy_.refresh(vae)
        return self._decoder_copy

    def scale_graphs(self, model: nn.Module, cond_BD: torch.Tensor, first_x: torch.Tensor, step: Callable,
                     compiled: bool, amp_dtype: Optional[torch.dtype]):
        """The captured per-scale steps for this batch size, autocast dtype, compile switch, grad mode and train/eval
        mode (captured on first use, and again when the model's tensors have moved; the static input buffers of a
        capture under inference_mode cannot be written outside it). `model` is the VAR, or its bf16 step copy."""
        from .cuda_graphs import ScaleStepGraphs
        key = ('scales', cond_BD.shape[0], amp_dtype, str(cond_BD.device), compiled, torch.is_inference_mode_enabled(),
               self.var.training, id(model))
        if key not in self._graphs or not self._graphs[key].still_valid():
            self._graphs.clear()  # one captured batch size at a time: graphs pin their memory
            self._graphs[key] = ScaleStepGraphs(model, cond_BD, first_x, step, amp_dtype)
        graphs = self._graphs[key]
        graphs.set_condition(cond_BD)
        return graphs

    def step_function(self, device: torch.device, compiled: bool, stream_dtype: Optional[torch.dtype]):
        """-> (the module the steps run on: the VAR or its bf16 copy; `step(x_2BlC, cond_2BD) -> logits`; the
        autocast dtype a graph capture must reproduce, None when the copy runs without autocast)."""
        check_stream_dtype(stream_dtype)
        model = self.var if stream_dtype is None else self.step_copy(stream_dtype)
        base = self.compiled_step() if compiled else scale_step
        if stream_dtype is None:
            return model, functools.partial(base, model), active_autocast_dtype(device.type)
        # the copy is already in its dtype: nothing for autocast or the graphs' weight casts
        return model, functools.partial(_low_precision_step, base, model), None

    def sample_in_one_graph(self, label_B: torch.Tensor, rng, settings: dict, compiled: bool = False,
                            stream_dtype: Optional[torch.dtype] = None, capture: bool = True) -> torch.Tensor:
        """The whole sampling loop for these labels as one CUDA graph (`models.cuda_graphs.SamplingLoopGraph`),
        captured on first use per batch size, settings, generator layout, autocast dtype and switches -> the final
        f_hat (a static buffer, valid until the next call). `capture=False` runs the same loop without a graph (how
        the CPU tests check everything but the capture)."""
        from .cuda_graphs import SamplingLoopGraph, rng_layout
        var = self.var
        device = label_B.device
        model, step, _ = self.step_function(device, compiled, stream_dtype)
        # the caller's: CFG, sampling and the next-scale input run under it
        amp_dtype = active_autocast_dtype(device.type)
        key = ('loop', label_B.shape[0], tuple(sorted(settings.items())), rng_layout(rng), amp_dtype, str(device),
               compiled, stream_dtype, torch.is_inference_mode_enabled(), var.training, id(model), capture)
        if key not in self._graphs or not self._graphs[key].still_valid():
            self._graphs.clear()  # one capture at a time: graphs pin their memory
            self._graphs[key] = SamplingLoopGraph(var, model, step, label_B.shape[0], settings, rng_layout(rng),
                                                  amp_dtype, device, capture=capture)
        return self._graphs[key].run(label_B, rng)

    def release_cuda_graphs(self) -> None:
        """Free the memory held by captured sampling graphs."""
        self._graphs.clear()

    def release(self) -> None:
        """Free every cache: graphs, bf16 copies, compiled functions."""
        self._graphs.clear()
        self._step_copy = self._decoder_copy = self._compiled_decoder_copy = self._compiled_step = None

    @contextlib.contextmanager
    def steps(self, cond_BD: torch.Tensor, first_x: torch.Tensor, kv_cache: str = 'prealloc',
              cuda_graph: bool = False, compiled: bool = False,
              stream_dtype: Optional[torch.dtype] = None) -> Iterator[ScaleStep]:
        """Within: `step(si, x_2BlC) -> logits_2BlV`, the transformer step of scale si, to be called for every scale
        in order; afterwards no KV cache stays switched on, whatever was raised."""
        model, step, amp_dtype = self.step_function(cond_BD.device, compiled, stream_dtype)
        if cuda_graph:
            graphs = self.scale_graphs(model, cond_BD, first_x, step, compiled, amp_dtype)
            yield graphs.run  # the graphs own their KV caches; the model's stay off
            return
        with kv_caches_on(model.blocks, model.L if kv_cache == 'prealloc' else 0):
            yield lambda si, x_BlC: step(x_BlC, cond_BD)

    def decode(self, f_hat_BChw: torch.Tensor, cuda_graph: bool = False, compiled: bool = False,
               stream_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The final latent -> images (B, 3, H, W) in [0, 1] through the VQVAE decoder (or its bf16 copy)."""
        if stream_dtype is None:
            vae = self.var.vae_proxy[0]
            decode = functools.partial(vae.fhat_to_img, compiled=compiled)
        else:
            decode = self.decoder_copy(stream_dtype, LOWP_DECODER_CHANNELS_LAST)
            if compiled:
                if self._compiled_decoder_copy is None:
                    self._compiled_decoder_copy = torch.compile(decode)
                decode = self._compiled_decoder_copy
        if not cuda_graph:
            return decode(f_hat_BChw).add_(1).mul_(0.5)
        # the captured graphs keep their KV caches alive: decode in chunks so that the peak stays low
        return torch.cat([decode(f) for f in f_hat_BChw.split(GRAPH_DECODE_CHUNK)]).add_(1).mul_(0.5)


def _low_precision_step(step: Callable, model: StepCopy, x_BlC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
    """`step` on the bf16 copy: inputs cast to its dtype, autocast off inside (no float32 round trips)."""
    with torch.autocast(x_BlC.device.type, enabled=False):
        return step(model, x_BlC.to(model.dtype), cond_BD.to(model.dtype))


_ENGINES: 'weakref.WeakKeyDictionary[nn.Module, SamplingEngine]' = weakref.WeakKeyDictionary()


def sampling_engine(var: nn.Module) -> SamplingEngine:
    """The engine (and caches) of this model, made on first use."""
    engine = _ENGINES.get(var)
    if engine is None:
        engine = _ENGINES[var] = SamplingEngine(var)
    return engine


def release_cuda_graphs(var: nn.Module) -> None:
    """Free the memory held by the captured sampling graphs of this model (a no-op when it has none)."""
    engine = _ENGINES.get(var)
    if engine is not None:
        engine.release_cuda_graphs()


def release_sampling_caches(var: nn.Module) -> None:
    """Free every fast-path cache of this model: graphs, bf16 copies, compiled functions (a no-op without any)."""
    engine = _ENGINES.get(var)
    if engine is not None:
        engine.release()
