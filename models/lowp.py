"""Low-precision copies of what the fast paths run: VAR's per-scale step and the VQVAE decoder in bf16 (sampling),
and the VQVAE encoder in bf16 (the training step's tokenizer encode, `train.py --vbf16 1`).

Under autocast the official inference keeps a float32 residual stream: every block reads and writes float32
activations, and each matrix product first casts its input (and its weight) to bf16. On a GPU the elementwise and
cast traffic around that stream costs more than the matrix products (benchmarks/RESULTS.md). The `stream_dtype`
switch of `VAR.autoregressive_infer_cfg` runs copies of the step's modules (`StepCopy`: the shared AdaLN projection,
the blocks, the head) and of the decoder (`DecoderCopy`) with weights and activations in bf16, autocast off inside:
half the bytes, no casts. LayerNorm, GroupNorm, softmax and the L2 norms accumulate in float32 inside their bf16
kernels; the logits leave the step as float32, so CFG, filtering and sampling are those of the reference path.

The results agree with the reference within bf16 tolerance, not bit for bit (tests/models/test_lowp.py); the
default (`stream_dtype=None`) is the official float32 stream. A copy belongs to the model's `SamplingEngine`, not to
the model, and is refreshed from the model's current weights at the start of every sampling call (by name, so
replaced parameters are seen too): the cost is one read of the weights, small against one batch of sampling.
"""
import copy
from typing import Dict, Iterable, Tuple

import torch
import torch.nn as nn

__all__ = ['StepCopy', 'DecoderCopy', 'EncoderCopy', 'STREAM_DTYPES', 'check_stream_dtype']

STREAM_DTYPES = (torch.bfloat16,)  # float16's range is too narrow for VAR's residual stream


def check_stream_dtype(stream_dtype) -> None:
    if stream_dtype is not None and stream_dtype not in STREAM_DTYPES:
        raise ValueError(f'stream_dtype must be None (the float32 stream of the reference path) or torch.bfloat16, '
                         f'got {stream_dtype!r}')


def _copy_in(modules: Dict[str, nn.Module], dtype: torch.dtype) -> Dict[str, nn.Module]:
    """Deep copies of `modules` whose floating parameters and buffers are made directly in `dtype` (the float32
    originals are never copied whole: a d36 step in float32 would be 9 GiB of temporary memory). The copies are
    normal tensors even when made under inference_mode: `refresh` writes into them in place, in any mode."""
    memo = {}
    with torch.inference_mode(False), torch.no_grad():
        for m in modules.values():
            for t in list(m.parameters()) + list(m.buffers()):
                if id(t) not in memo and t.is_floating_point():
                    low = t.detach().to(dtype)
                    memo[id(t)] = nn.Parameter(low, requires_grad=False) if isinstance(t, nn.Parameter) else low
        return {name: copy.deepcopy(m, memo) for name, m in modules.items()}


def _named_tensors(module: nn.Module) -> Iterable[Tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


class _RefreshedCopy(nn.Module):
    """Copies of some modules of a source model in `dtype` (optionally channels-last), as attributes of the same names,
    so that their parameter and buffer names are the source's and `refresh` can match them by name."""

    def __init__(self, parts: Dict[str, nn.Module], dtype: torch.dtype, channels_last: bool = False):
        super().__init__()
        for name, m in _copy_in(parts, dtype).items():
            setattr(self, name, m)
        self.eval()
        self.dtype, self.device = dtype, next(self.parameters()).device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def refresh(self, source: nn.Module) -> None:
        """Copy the source's current weights (also parameters replaced since, e.g. `load_state_dict(assign=True)`)."""
        src = dict(_named_tensors(source))
        for name, t in _named_tensors(self):
            t.copy_(src[name])


class StepCopy(_RefreshedCopy):
    """The modules of one KV-cached scale step of a VAR (`models.var.scale_step` runs it as it runs the model)
    in `dtype`, with the model's names, so that `refresh` can copy the model's weights into it."""

    def __init__(self, var: nn.Module, dtype: torch.dtype):
        super().__init__(dict(shared_ada_lin=var.shared_ada_lin, blocks=var.blocks, head_nm=var.head_nm,
                              head=var.head), dtype)
        self.patch_nums, self.L, self.V = var.patch_nums, var.L, var.V  # what the CUDA-graph capture reads

    def get_logits(self, h_BlC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Final AdaLN + head in `dtype` -> float32 logits (the reference casts h to float32 first)."""
        return self.head(self.head_nm(h_BlC, cond_BD)).float()


class DecoderCopy(_RefreshedCopy):
    """`post_quant_conv` and the decoder of a VQVAE in `dtype` (optionally channels-last): latent -> image in [-1, 1],
    float32, as `VQVAE.fhat_to_img`."""

    def __init__(self, vae: nn.Module, dtype: torch.dtype, channels_last: bool = False):
        super().__init__(dict(post_quant_conv=vae.post_quant_conv, decoder=vae.decoder), dtype, channels_last)

    def forward(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        f = f_hat_BChw.to(dtype=self.dtype, memory_format=self.memory_format)
        with torch.autocast(f.device.type, enabled=False):
            return self.decoder(self.post_quant_conv(f)).float().clamp_(-1, 1)


class EncoderCopy(_RefreshedCopy):
    """The encoder and `quant_conv` of a VQVAE in `dtype` (optionally channels-last), for the training step's
    tokenizer encode: images in [-1, 1] -> the float32 latent f, then the VQVAE's own (float32) quantiser gives the
    ids (`img_to_idxBl`, as `VQVAE.img_to_idxBl`). Faster on a GPU; ids near a tie between two codes may differ from
    the float32 encode's (`benchmarks/timings/bench_encode` reports the share)."""

    def __init__(self, vae: nn.Module, dtype: torch.dtype, channels_last: bool = False):
        super().__init__(dict(encoder=vae.encoder, quant_conv=vae.quant_conv), dtype, channels_last)
        self._vae = [vae]  # a plain list: the tokenizer is not a submodule of its copy

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        x = img_B3HW.to(dtype=self.dtype, memory_format=self.memory_format)
        with torch.autocast(x.device.type, enabled=False):
            return self.quant_conv(self.encoder(x)).float().contiguous()

    @torch.no_grad()
    def img_to_idxBl(self, img_B3HW: torch.Tensor, v_patch_nums=None):
        """Images -> per-scale token ids, each (B, ph*pw) int64, through this copy's encoder."""
        return self._vae[0].quantize.f_to_idxBl_or_fhat(self(img_B3HW), to_fhat=False, v_patch_nums=v_patch_nums)
