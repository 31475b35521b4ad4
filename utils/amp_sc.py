# The optimizer step of the VAR training recipe (arXiv 2404.02905).
"""`AmpOptimizer`: autocast, fp16 GradScaler, gradient accumulation, clipping, and non-finite step skipping.

fp16 = 0 -> fp32; 1 -> float16 autocast + GradScaler(init_scale=2**11, growth_interval=1000), its scale capped at 32768
(official quirk: the cap is tested strictly, so the scale may sit at 65536 for one step); 2 -> bfloat16 autocast.
A step whose gradient norm is not finite is skipped in every mode (the fp16 scaler semantics) and counted; after
`max_nonfinite` consecutive skips `NonFiniteError` is raised.
"""
import contextlib
import math
from typing import Dict, List, Optional, Tuple

import torch

from utils.runtime import autocast_dtype

FP16_INIT_SCALE = 2.0 ** 11
FP16_GROWTH_INTERVAL = 1000
FP16_MAX_SCALE = 32768.0


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss or gradient."""


class AmpOptimizer:
    """Wraps an optimizer with the recipe's mixed precision, accumulation and clipping.

    Args:
        optimizer: the (AdamW) optimizer.
        params: the parameters to clip (all of VAR's).
        device_type: 'cuda' or 'cpu' (the model's device type; autocast and the scaler are built for it).
        fp16: 0, 1 or 2 (see the module docstring).
        grad_clip: clip the global L2 norm to this; <= 0 disables clipping (the norm is still measured).
        n_gradient_accumulation: the loss is divided by it.
        max_nonfinite: raise after this many consecutive skipped steps (<= 0: never).
        sharded: the parameters are FSDP shards (DTensors): the fp16 scaler then agrees on inf/NaN across ranks, and
            the clipped norm is the global one over all shards.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: List[torch.nn.Parameter], device_type: str,
                 fp16: int = 0, grad_clip: float = 2.0, n_gradient_accumulation: int = 1, max_nonfinite: int = 100,
                 sharded: bool = False):
        self.optimizer = optimizer
        self.params = list(params)
        self.device_type = device_type
        self.dtype = autocast_dtype(fp16)
        if self.dtype is not None and not torch.amp.is_autocast_available(device_type):
            raise RuntimeError(f'--fp16={fp16} needs autocast on {device_type!r}, which this PyTorch lacks; '
                               f'use --fp16=0 (fp32)')
        if self.dtype is torch.bfloat16 and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
            raise RuntimeError('--fp16=2 (bf16) is not supported by this GPU; use --fp16=1 (fp16) or 0')
        self.scaler = None
        if fp16 == 1 and sharded:  # a rank's shards may hold an inf that the others' lack: all-reduce the flag
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            self.scaler = ShardedGradScaler(device_type, init_scale=FP16_INIT_SCALE,
                                            growth_interval=FP16_GROWTH_INTERVAL)
        elif fp16 == 1:
            self.scaler = torch.amp.GradScaler(device_type, init_scale=FP16_INIT_SCALE,
                                               growth_interval=FP16_GROWTH_INTERVAL)
        self.grad_clip = grad_clip
        self.n_gradient_accumulation = n_gradient_accumulation
        self.max_nonfinite = max_nonfinite
        self.num_skipped = 0
        self.consecutive_skipped = 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context for the forward pass and the loss (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=True)

    def backward_clip_step(self, loss: torch.Tensor, stepping: bool) -> Tuple[Optional[float], Optional[float]]:
        """Backward of loss/ac; on stepping iterations unscale, clip, step, update the scaler and zero the grads.

        Returns (pre-clip grad norm, log2 of the fp16 scale) on stepping iterations, (None, None) otherwise; the scale
        is None without a scaler.
        """
        loss = loss.mul(1 / self.n_gradient_accumulation)  # official: times 1/ac (not /ac: they round differently)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(retain_graph=False, create_graph=False)
        if not stepping:
            return None, None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if hasattr(norm, 'full_tensor'):  # a DTensor under FSDP: the norm over every rank's shards (a collective)
            norm = norm.full_tensor()
        grad_norm = float(norm)
        finite = math.isfinite(grad_norm)
        if finite:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        scale_log2 = None
        if self.scaler is not None:
            # A skipped step still updates the scaler: unscale_ recorded the inf, so the scale backs off.
            scale = self.scaler.get_scale()
            if scale > FP16_MAX_SCALE:
                self.scaler.update(new_scale=FP16_MAX_SCALE)
            else:
                self.scaler.update()
            scale_log2 = math.log2(scale)
        self.optimizer.zero_grad(set_to_none=True)
        self._count(finite, grad_norm)
        return grad_norm, scale_log2

    def _count(self, finite: bool, grad_norm: float) -> None:
        if finite:
            self.consecutive_skipped = 0
            return
        self.num_skipped += 1
        self.consecutive_skipped += 1
        if 0 < self.max_nonfinite <= self.consecutive_skipped:
            raise NonFiniteError(f'{self.consecutive_skipped} consecutive steps had a non-finite loss or gradient '
                                 f'(last grad norm {grad_norm}); stopping. The last saved checkpoint is untouched. '
                                 f'Lower the lr (--tblr), use --fp16=2 or fp32, or raise --max_nonfinite.')

    def state_dict(self, optimizer: bool = True) -> Dict:
        """The optimizer's (unless `optimizer` is False: a sharded checkpoint holds it apart), scaler's and skip
        counters' state."""
        sd = {'num_skipped': self.num_skipped, 'consecutive_skipped': self.consecutive_skipped}
        if optimizer:
            sd['optimizer'] = self.optimizer.state_dict()
        if self.scaler is not None:
            sd['scaler'] = self.scaler.state_dict()
        return sd

    def load_state_dict(self, state: Dict) -> List[str]:
        """Load the optimizer (unless absent: a sharded checkpoint loads it apart) and the scaler; returns warnings (a
        scaler mismatch is only reported, as officially)."""
        if 'optimizer' in state:
            self.optimizer.load_state_dict(state['optimizer'])
        self.num_skipped = state.get('num_skipped', 0)
        self.consecutive_skipped = state.get('consecutive_skipped', 0)
        notes = []
        if self.scaler is not None:
            if 'scaler' in state:
                try:
                    self.scaler.load_state_dict(state['scaler'])
                except Exception as e:
                    notes.append(f'could not load the fp16 scaler state: {e}')
            else:
                notes.append('the checkpoint has no fp16 scaler state; starting from init_scale')
        return notes
