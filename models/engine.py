# The fast paths of VAR's sampling loop (arXiv 2404.02905, section 3.2: next-scale prediction with a KV cache).
"""Sampling engine: the machinery that runs VAR's per-scale transformer steps fast, kept beside the model.

`VAR.autoregressive_infer_cfg` (models/var.py) is the sampling loop as the paper writes it: per scale, transformer
step -> CFG -> top-k/top-p -> sample -> next-scale input, then decode. It asks the engine for the two parts that have
fast paths: the transformer step of each scale (`SamplingEngine.steps`) and the final decode (`decode`). Behind them,
one switch each, every one numerically equal to the plain path (tests/models/test_sampling_engine.py):

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
from typing import Callable, Dict, Iterator, Optional

import torch
import torch.nn as nn

from .basic_var import kv_caching
from .lowp import DecoderCopy, StepCopy, check_stream_dtype

GRAPH_DECODE_CHUNK = 16  # images per decoder call on the CUDA-graph path
# the bf16 decoder copy's memory format; to be chosen by measurement (benchmarks.profile_sample, decode rows)
LOWP_DECODER_CHANNELS_LAST = False

__all__ = ['SamplingEngine', 'sampling_engine', 'release_cuda_graphs', 'release_sampling_caches', 'scale_step',
           'GRAPH_DECODE_CHUNK', 'KV_CACHE_MODES']

KV_CACHE_MODES = ('concat', 'prealloc')

ScaleStep = Callable[[int, torch.Tensor], torch.Tensor]  # (si, x_2BlC) -> logits_2BlV, float32


def active_autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast is running in on this device type, or None when autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def scale_step(var: nn.Module, x_BlC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
    """One scale of KV-cached inference: all blocks (no mask: the cache holds only earlier scales) and the head.

    x_BlC the scale's input tokens (2B rows: conditional, then unconditional), cond_BD their class embeddings
    -> float32 logits (2B, l, V).
    """
    cond_BD_or_gss = var.shared_ada_lin(cond_BD)
    for b in var.blocks:
        x_BlC = b(x=x_BlC, cond_BD=cond_BD_or_gss, attn_bias=None)
    return var.get_logits(x_BlC, cond_BD)


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
        kv_caching(model.blocks, True, model.L if kv_cache == 'prealloc' else 0)
        try:
            yield lambda si, x_BlC: step(x_BlC, cond_BD)
        finally:
            kv_caching(model.blocks, False)

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
