"""CUDA-graph capture of VAR's sampling: the per-scale inference steps (`cuda_graph=True`, `ScaleStepGraphs`) or the
whole loop as one graph (`cuda_graph='loop'`, `SamplingLoopGraph`), for the sampling paths of `models.engine`.

Every scale has static shapes (2B rows, pn*pn tokens, a KV cache that ends at the scale's end), so the whole
transformer step of each scale -- all blocks and the head -- is captured once and replayed. The captured
graphs share one memory pool and are replayed in capture order; the KV caches are persistent buffers owned
here, written in place at fixed offsets. CFG, filtering and sampling stay outside the graphs (they draw from
the caller's generator). Under autocast the graphs read copies of the Linear weights made once in the autocast
dtype (`CastLinearWeights`) instead of casting every weight again at every replay.
"""
import contextlib
import weakref
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from .basic_var import kv_caches_on, kv_caching


class CastLinearWeights:
    """Copies of a model's nn.Linear weights and biases in one dtype, swapped in while a graph is captured.

    Autocast casts a float32 weight to its dtype at every matmul, and a captured graph cannot keep autocast's cast
    cache, so each replay would repeat every cast. Swapping in copies already in the autocast dtype gives the same
    numbers (autocast leaves a tensor of its dtype as it is) without the casts. `refresh` copies the model's current
    weights into the same memory: once per sampling call instead of once per scale, and it sees every kind of update
    (optimiser steps, `load_state_dict`, writes through `.data`).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.entries: List[Tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
        for m in model.modules():
            if isinstance(m, nn.Linear):
                for name in ('weight', 'bias'):
                    p = m._parameters.get(name)
                    if p is not None:
                        self.entries.append((m, name, p, nn.Parameter(p.detach().to(dtype), requires_grad=False)))

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy every weight (or the parameter now in its place) into its low-precision copy."""
        for i, (m, name, _, copy) in enumerate(self.entries):
            p = m._parameters[name]
            copy.copy_(p)
            self.entries[i] = (m, name, p, copy)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within: the modules hold the copies as their parameters; after: their own parameters again."""
        try:
            for m, name, _, copy in self.entries:
                m._parameters[name] = copy
            yield
        finally:
            for m, name, p, _ in self.entries:
                m._parameters[name] = p


@contextlib.contextmanager
def capture_precision(device_type: str, amp_dtype: Optional[torch.dtype],
                      cast: Optional[CastLinearWeights]) -> Iterator[None]:
    """Within: the autocast a capture reproduces (none, or `amp_dtype` with its weight-cast cache off) and the
    pre-cast Linear weights swapped in. Autocast's cache lives only as long as the caller's autocast context: graphs
    that read cached casts would read freed memory on a later replay, so it is cleared and kept off (the same
    numbers)."""
    torch.clear_autocast_cache()
    amp = torch.autocast(device_type, dtype=amp_dtype, cache_enabled=False) if amp_dtype is not None \
        else contextlib.nullcontext()
    with amp, (cast.swapped_in() if cast is not None else contextlib.nullcontext()):
        yield


def tensor_addresses(model: nn.Module) -> List[int]:
    """Where every parameter and buffer lives: a captured graph reads them there, so any change means a recapture."""
    return [t.data_ptr() for t in list(model.parameters()) + list(model.buffers())]


class ScaleStepGraphs:
    """The per-scale transformer step `step(x_BlC, cond_BD) -> logits` of a VAR captured for each scale, for one
    batch size (2B rows) and autocast dtype.

    The model is held by a weak reference: the graphs live in the engine's cache, which must not keep the model alive.
    """

    def __init__(self, var: nn.Module, cond_BD: torch.Tensor, first_x: torch.Tensor,
                 step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], amp_dtype: Optional[torch.dtype] = None):
        self._var = weakref.ref(var)
        self.attns = [b.attn for b in var.blocks]
        B2, C = cond_BD.shape
        device = cond_BD.device
        self.static_cond = cond_BD.detach().clone()
        self.static_x: List[torch.Tensor] = [  # zeros: capturing must not draw from the caller's CUDA RNG
            torch.zeros(B2, pn * pn, C, device=device, dtype=first_x.dtype) for pn in var.patch_nums]
        self.static_logits: List[torch.Tensor] = []
        self.graphs: List[torch.cuda.CUDAGraph] = []
        self.cast = CastLinearWeights(var, amp_dtype) if amp_dtype is not None else None
        self.addresses = tensor_addresses(var)
        try:
            # the graph and its streams belong to the model's GPU, whichever is current
            with torch.cuda.device(device), capture_precision('cuda', amp_dtype, self.cast):
                self._capture(var, step, device, B2)
        except BaseException:
            kv_caching(var.blocks, False)  # a failed capture (e.g. out of memory) leaves no cache switched on
            raise

    def _capture(self, var, step, device: torch.device, B2: int) -> None:
        # warm up on a side stream (allocates the persistent caches, picks kernels), then capture in order
        kv_caching(var.blocks, True, var.L)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for si in range(len(var.patch_nums)):
                step(self.static_x[si], self.static_cond)
        torch.cuda.current_stream(device).wait_stream(side)
        self.kv = [(b.attn.cached_k, b.attn.cached_v) for b in var.blocks]
        self._rewind()

        # one logits buffer for all scales: each graph's temporaries return to the shared pool after capture
        max_l = max(pn * pn for pn in var.patch_nums)
        self.logits_buf = torch.empty(B2, max_l, var.V, device=device, dtype=torch.float32)
        pool = torch.cuda.graph_pool_handle()
        for si, pn in enumerate(var.patch_nums):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.logits_buf[:, :pn * pn].copy_(step(self.static_x[si], self.static_cond))
            self.static_logits.append(self.logits_buf[:, :pn * pn])
            self.graphs.append(g)
        kv_caching(var.blocks, False)  # the model forgets the caches; the graphs keep writing into self.kv

    def _rewind(self) -> None:
        for attn, (k, v) in zip(self.attns, self.kv):
            attn.cached_k, attn.cached_v, attn.cached_len = k, v, 0

    def still_valid(self) -> bool:
        """False once any parameter or buffer of the model has moved (e.g. `load_state_dict(assign=True)`, `.to()`)."""
        var = self._var()
        return var is not None and tensor_addresses(var) == self.addresses

    def set_condition(self, cond_BD: torch.Tensor) -> None:
        """The condition of the next sampling run; also brings the cast weights up to date with the model."""
        self.static_cond.copy_(cond_BD)
        if self.cast is not None:
            self.cast.refresh()

    def run(self, si: int, x_BlC: torch.Tensor) -> torch.Tensor:
        """Replay scale `si` on `x_BlC` -> its float32 logits (a static buffer, valid until the next replay)."""
        self.static_x[si].copy_(x_BlC)
        self.graphs[si].replay()
        return self.static_logits[si]


def rng_layout(rng) -> str:
    """'global' (no generator: the device's default one), 'one' (one generator for the batch) or 'rows:B'."""
    if rng is None:
        return 'global'
    if isinstance(rng, torch.Generator):
        return 'one'
    return f'rows:{len(rng)}'


class SamplingLoopGraph:
    """The whole sampling loop of a VAR for one batch size, one set of sampling settings and one generator layout,
    captured as one CUDA graph: the first scale's input from the labels, then for every scale the transformer step,
    CFG, top-k/top-p filtering, sampling, and the next scale's input; out comes the final latent f_hat (decoded
    outside the graph, in chunks).

    Random numbers: the graph owns generators of its own (one, or one per row), registered with it before capture.
    Each run copies the caller's generator states in, replays, and copies the advanced states back: the same random
    numbers as the plain path (CUDA's graph-safe Philox reads the seed and offset at replay), and the caller's
    generators end where the plain path would leave them. With no generator the device's default one is used,
    which CUDA graphs handle themselves. Nothing in the loop syncs with the host: filtering uses the full sort (the
    partial sort's tie handling needs a sync) and the draw is `helpers.multinomial_one_capturable` (torch.multinomial's
    own single-sample method, without its host-side check).

    `capture=False` runs the same loop eagerly (on any device) instead of replaying a graph: the CPU tests check the
    loop, the static buffers and the generator hand-over that way; only the capture itself needs a GPU.
    """

    def __init__(self, var: nn.Module, model: nn.Module, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 B: int, settings: dict, layout: str, amp_dtype: Optional[torch.dtype], device: torch.device,
                 capture: bool = True):
        self._var, self._model = weakref.ref(var), weakref.ref(model)
        self.step, self.settings, self.capture = step, dict(settings), capture
        self.static_label = torch.zeros(B, dtype=torch.long, device=device)
        n_gens = {'global': 0, 'one': 1}.get(layout, B)
        self.gens = [torch.Generator(device=device) for _ in range(n_gens)]
        self.rng = None if layout == 'global' else (self.gens[0] if layout == 'one' else self.gens)
        # Under autocast: pre-cast Linear weights for what runs under it, the whole model or, when the steps run on
        # a bf16 copy with autocast off, the word embedding of the next-scale input
        self.amp_dtype = amp_dtype
        cast_root = var if model is var else var.word_embed
        self.cast = CastLinearWeights(cast_root, amp_dtype) if amp_dtype is not None else None
        self.addresses = self._addresses(var, model)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_f_hat: Optional[torch.Tensor] = None
        if capture:
            self._capture(var, model, device)

    @staticmethod
    def _addresses(var: nn.Module, model: nn.Module) -> List[int]:
        return tensor_addresses(var) + tensor_addresses(var.vae_quant_proxy[0]) + tensor_addresses(model)

    def _precision(self):
        return capture_precision(self.static_label.device.type, self.amp_dtype, self.cast)

    def _loop(self, var: nn.Module) -> torch.Tensor:
        cond_BD, lvl_pos, next_token_map, f_hat = var.first_scale_input(self.static_label)
        return var.sample_scales(lambda si, x_BlC: self.step(x_BlC, cond_BD), next_token_map, f_hat, lvl_pos,
                                 self.rng, capturable=True, **self.settings)

    def _capture(self, var: nn.Module, model: nn.Module, device: torch.device) -> None:
        kv_caching(model.blocks, True, model.L)
        try:
            with torch.cuda.device(device), self._precision():
                # warm up on a side stream (allocates the KV caches, compiles, picks kernels); the default
                # generator's state is put back: the warm-up's draws are not the caller's
                rng_state = torch.cuda.get_rng_state(device)
                side = torch.cuda.Stream(device=device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    self._loop(var)
                torch.cuda.current_stream(device).wait_stream(side)
                torch.cuda.set_rng_state(rng_state, device)
                self.kv = [(b.attn.cached_k, b.attn.cached_v) for b in model.blocks]
                for b in model.blocks:
                    b.attn.cached_len = 0
                self.graph = torch.cuda.CUDAGraph()
                for g in self.gens:
                    self.graph.register_generator_state(g)
                with torch.cuda.graph(self.graph):
                    self.static_f_hat = self._loop(var)
        finally:
            kv_caching(model.blocks, False)  # the graph keeps writing into self.kv

    def still_valid(self) -> bool:
        """False once a tensor the graph reads has moved, or its model is gone."""
        var, model = self._var(), self._model()
        if var is None or model is None:
            return False
        return self._addresses(var, model) == self.addresses

    def run(self, label_B: torch.Tensor, rng) -> torch.Tensor:
        """Sample for `label_B`, drawing from `rng` (the layout this graph was made for) -> the final f_hat."""
        self.static_label.copy_(label_B)
        if self.cast is not None:
            self.cast.refresh()
        callers = [] if rng is None else ([rng] if isinstance(rng, torch.Generator) else list(rng))
        for own, theirs in zip(self.gens, callers):
            own.set_state(theirs.get_state())
        if self.capture:
            self.graph.replay()
        else:
            var, model = self._var(), self._model()
            with kv_caches_on(model.blocks, model.L), self._precision():
                self.static_f_hat = self._loop(var)
        for own, theirs in zip(self.gens, callers):
            theirs.set_state(own.get_state())
        return self.static_f_hat
