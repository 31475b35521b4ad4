# Implements the AdaLN transformer blocks of VAR (arXiv 2404.02905, section 4).
"""FFN, SelfAttention (SDPA, or flash-attn / xformers when importable), AdaLNSelfAttn, AdaLNBeforeHead.

Shape legend: B batch, L tokens, C width, D condition width, H heads, c head dim (C // H).
"""
import contextlib
import functools
import math
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from .helpers import DropPath

if TYPE_CHECKING:  # FlexAttention is imported where it is used: its import (torch._dynamo) costs ~1.5 s per process
    from torch.nn.attention.flex_attention import BlockMask

__all__ = ['FFN', 'SelfAttention', 'AdaLNSelfAttn', 'AdaLNBeforeHead', 'SharedAdaLin', 'kv_caching', 'flex_block_mask']


@functools.lru_cache(maxsize=None)
def optional_kernels() -> dict:
    """Optional fused kernels, looked up once on first use (never at import)."""
    found = {'flash_attn_func': None, 'xformers_attn': None, 'fused_mlp_func': None}
    try:
        from flash_attn import flash_attn_func
        found['flash_attn_func'] = flash_attn_func
    except Exception:
        pass
    try:
        from flash_attn.ops.fused_dense import fused_mlp_func
        found['fused_mlp_func'] = fused_mlp_func
    except Exception:
        pass
    try:
        from xformers.ops import memory_efficient_attention
        found['xformers_attn'] = memory_efficient_attention
    except Exception:
        pass
    return found


@functools.lru_cache(maxsize=None)
def compiled_flex_attention() -> Callable:
    """FlexAttention compiled once (eager FlexAttention is a slow reference implementation on GPU).

    Static shapes: one kernel per (batch, length, dtype, grad mode). Progressive training (`--pg`) with its
    validation passes can reach ~9 of them, past dynamo's recompile limit (8), after which the remaining shapes run
    eagerly (slow). Not yet measured on a GPU: whether `dynamic=None` kernels are as fast.
    """
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _block_mask(patch_nums: tuple, ed: int, device: str) -> 'BlockMask':
    from torch.nn.attention.flex_attention import create_block_mask
    lvl_L = torch.cat([torch.full((pn * pn,), si, device=device) for si, pn in enumerate(patch_nums)])[:ed]

    def block_causal(b, h, q_idx, kv_idx):
        return lvl_L[q_idx] >= lvl_L[kv_idx]

    return create_block_mask(block_causal, B=None, H=None, Q_LEN=ed, KV_LEN=ed, device=device)


def flex_block_mask(patch_nums: Sequence[int], ed: int, device: Union[str, torch.device]) -> 'BlockMask':
    """VAR's block-causal mask (position i sees j iff scale(i) >= scale(j)) of the first `ed` positions, as a
    FlexAttention BlockMask whose fully masked tiles are skipped.

    Built once per (scales, ed, device) and kept in this module, not on the model: the mask depends on nothing else.
    Under torch.compile, build it eagerly first (e.g. for every `ed` of `VAR.begin_ends`), outside the compiled region.
    """
    return _block_mask(tuple(int(pn) for pn in patch_nums), int(ed), str(torch.device(device)))


class FFN(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2; flash-attn's fused MLP on CUDA half precision when available."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 drop: float = 0.0, fused_if_available: bool = True):
        super().__init__()
        self.fused_mlp_func = optional_kernels()['fused_mlp_func'] if fused_if_available else None
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate='tanh')
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop, inplace=True) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_mlp_func is not None and x.is_cuda and x.dtype != torch.float32:
            return self.drop(self.fused_mlp_func(
                x=x, weight1=self.fc1.weight, weight2=self.fc2.weight, bias1=self.fc1.bias, bias2=self.fc2.bias,
                activation='gelu_approx', save_pre_act=self.training, return_residual=False, checkpoint_lvl=0,
                heuristic=0, process_group=None))
        return self.drop(self.fc2(self.act(self.fc1(x))))

    def extra_repr(self) -> str:
        return f'fused_mlp_func={self.fused_mlp_func is not None}'


class SelfAttention(nn.Module):
    """Multi-head self-attention with a zero k-bias buffer, optional L2-normalised q/k and a KV cache.

    KV cache modes (inference): `kv_caching(True)` grows the cache by concatenation (the official, reference
    path); `kv_caching(True, max_len=L)` preallocates L positions and writes each scale in place.
    """

    def __init__(self, block_idx: int, embed_dim: int = 768, num_heads: int = 12, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_l2_norm: bool = False, flash_if_available: bool = True):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim {embed_dim} must be divisible by num_heads {num_heads}')
        self.block_idx, self.num_heads, self.head_dim = block_idx, num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if self.attn_l2_norm:
            self.scale = 1
            self.scale_mul_1H11 = nn.Parameter(torch.full(size=(1, self.num_heads, 1, 1), fill_value=4.0).log())
            # float32(ln 100), as a Python float
            self.max_scale_mul = torch.log(torch.tensor(100.0, device='cpu')).item()
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)

        self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(embed_dim)), nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer('zero_k_bias', torch.zeros(embed_dim))

        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop, inplace=True) if proj_drop > 0 else nn.Identity()
        self.attn_drop: float = attn_drop
        kernels = optional_kernels()
        self.flash_attn_func = kernels['flash_attn_func'] if flash_if_available else None
        self.xformers_attn = kernels['xformers_attn'] if flash_if_available else None

        self.caching, self.cached_k, self.cached_v = False, None, None
        self.kv_max_len, self.cached_len = 0, 0

    def kv_caching(self, enable: bool, max_len: int = 0) -> None:
        """Turn the KV cache on or off (clearing it); `max_len > 0` selects the preallocated cache."""
        self.caching, self.cached_k, self.cached_v = enable, None, None
        self.kv_max_len, self.cached_len = (max_len if enable else 0), 0

    @torch.compiler.disable
    def _append_kv(self, k: torch.Tensor, v: torch.Tensor, dim_cat: int):
        # a compile boundary: the cache is Python state; compiled code on either side sees plain tensors
        if self.kv_max_len > 0:
            n = k.shape[dim_cat]
            if self.cached_k is None:
                shape = list(k.shape)
                shape[dim_cat] = self.kv_max_len
                # Under autocast the attention kernel casts k and v to the autocast dtype anyway, so storing them
                # in that dtype gives the same result with half the memory of a float32 k.
                dtype = torch.get_autocast_dtype(k.device.type) if torch.is_autocast_enabled(k.device.type) else None
                self.cached_k = k.new_empty(shape, dtype=dtype or k.dtype)
                self.cached_v = v.new_empty(shape, dtype=dtype or v.dtype)
                self.cached_len = 0
            self.cached_k.narrow(dim_cat, self.cached_len, n).copy_(k)
            self.cached_v.narrow(dim_cat, self.cached_len, n).copy_(v)
            self.cached_len += n
            return self.cached_k.narrow(dim_cat, 0, self.cached_len), self.cached_v.narrow(dim_cat, 0, self.cached_len)
        if self.cached_k is None:
            self.cached_k, self.cached_v = k, v
        else:
            self.cached_k = torch.cat((self.cached_k, k), dim=dim_cat)
            self.cached_v = torch.cat((self.cached_v, v), dim=dim_cat)
        return self.cached_k, self.cached_v

    def forward(self, x: torch.Tensor, attn_bias) -> torch.Tensor:
        """x (B,L,C); attn_bias an additive (1,1,L,L) mask, a FlexAttention BlockMask, or None (no mask)."""
        B, L, C = x.shape
        qkv_bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(input=x, weight=self.mat_qkv.weight, bias=qkv_bias).view(B, L, 3, self.num_heads, self.head_dim)
        main_type = qkv.dtype
        using_flex = attn_bias is not None and not isinstance(attn_bias, torch.Tensor)  # a BlockMask
        using_flash = self.flash_attn_func is not None and attn_bias is None and qkv.dtype != torch.float32 \
            and qkv.is_cuda
        using_xform = not (using_flash or using_flex) and self.xformers_attn is not None and qkv.is_cuda
        if using_flash or using_xform:
            q, k, v = qkv.unbind(dim=2)  # BL3Hc -> 3 x BLHc
            dim_cat = 1
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)  # BL3Hc -> 3 x BHLc
            dim_cat = 2

        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            if using_flash or using_xform:
                scale_mul = scale_mul.transpose(1, 2)  # 1H11 -> 11H1
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)

        if self.caching:
            k, v = self._append_kv(k, v, dim_cat)

        dropout_p = self.attn_drop if self.training else 0.0
        if using_flex:
            if dropout_p > 0:
                raise ValueError('FlexAttention does not support attention dropout; use the SDPA path')
            from torch.nn.attention.flex_attention import flex_attention
            flex = compiled_flex_attention() if qkv.is_cuda else flex_attention
            oup = flex(q.to(main_type), k.to(main_type), v.to(main_type), block_mask=attn_bias,
                       scale=self.scale).transpose(1, 2).reshape(B, L, C)
        elif using_flash:
            oup = self.flash_attn_func(q.to(main_type), k.to(main_type), v.to(main_type), dropout_p=dropout_p,
                                       softmax_scale=self.scale).view(B, L, C)
        elif using_xform:
            bias = None if attn_bias is None else attn_bias.to(dtype=main_type).expand(B, self.num_heads, -1, -1)
            oup = self.xformers_attn(q.to(main_type), k.to(main_type), v.to(main_type), attn_bias=bias,
                                     p=dropout_p, scale=self.scale).view(B, L, C)
        else:
            oup = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p,
                                                 scale=self.scale).transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(oup))

    def extra_repr(self) -> str:
        kernel = 'flash_attn' if self.flash_attn_func is not None \
            else ('xformers' if self.xformers_attn is not None else 'sdpa')
        return f'kernel={kernel}, l2_norm={self.attn_l2_norm}, heads={self.num_heads}'


def kv_caching(blocks: Iterable[nn.Module], enable: bool, max_len: int = 0) -> None:
    """Turn the KV cache of every block's attention on or off (see `SelfAttention.kv_caching`)."""
    for b in blocks:
        b.attn.kv_caching(enable, max_len)


@contextlib.contextmanager
def kv_caches_on(blocks: Sequence[nn.Module], max_len: int) -> Iterator[None]:
    """Within: every block's KV cache on (preallocated for max_len positions; 0 grows it by concatenation); after:
    off and cleared, whatever was raised."""
    kv_caching(blocks, True, max_len)
    try:
        yield
    finally:
        kv_caching(blocks, False)


class SharedAdaLin(nn.Linear):
    """The AdaLN projection shared by all blocks: output viewed as (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


class AdaLNSelfAttn(nn.Module):
    """Pre-norm transformer block whose LayerNorms are modulated by the class condition (AdaLN).

    Modulation chunks, in this order: gamma1, gamma2, scale1, scale2, shift1, shift2.
    """

    def __init__(self, block_idx: int, last_drop_p: float, embed_dim: int, cond_dim: int, shared_aln: bool,
                 norm_layer: Callable[..., nn.Module], num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, attn_l2_norm: bool = False,
                 flash_if_available: bool = False, fused_if_available: bool = True):
        super().__init__()
        self.block_idx, self.last_drop_p, self.C = block_idx, last_drop_p, embed_dim
        self.C, self.D = embed_dim, cond_dim
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.attn = SelfAttention(block_idx=block_idx, embed_dim=embed_dim, num_heads=num_heads, attn_drop=attn_drop,
                                  proj_drop=drop, attn_l2_norm=attn_l2_norm, flash_if_available=flash_if_available)
        self.ffn = FFN(in_features=embed_dim, hidden_features=round(embed_dim * mlp_ratio), drop=drop,
                       fused_if_available=fused_if_available)
        self.ln_wo_grad = norm_layer(embed_dim, elementwise_affine=False)
        self.shared_aln = shared_aln
        if self.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B,L,C); cond_BD the class embedding (B,D), or in shared mode the shared projection (B,1,6,C)."""
        if self.shared_aln:
            mods = (self.ada_gss + cond_BD).unbind(2)  # 116C + B16C -> 6 x B1C
        else:
            mods = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)  # B,6C -> 6 x B1C
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods
        x = x + self.drop_path(
            self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_bias=attn_bias).mul_(gamma1))
        x = x + self.drop_path(self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2))
        return x

    def extra_repr(self) -> str:
        return f'shared_aln={self.shared_aln}'


class AdaLNBeforeHead(nn.Module):
    """Final AdaLN before the head; modulated by the raw class embedding (scale, shift)."""

    def __init__(self, C: int, D: int, norm_layer: Callable[..., nn.Module]):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = norm_layer(C, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)
