# Implements VAR, next-scale prediction (arXiv 2404.02905, sections 3-4).
"""VAR: a class-conditional, block-causal transformer over the token maps of all scales.

Shape legend: B batch, L tokens of all scales, l tokens of one scale, C width, D condition width (= C),
V vocabulary, Cvae code width, H heads, h/w one scale's side, si scale index, S number of scales.

The class is the model only: the official constructor, `init_weights`, `get_logits`, `forward` and
`autoregressive_infer_cfg` (the sampling loop, written scale by scale as in the paper), with the loop's pieces as
public methods (`sampling_labels`, `first_scale_input`, `sample_scales`, `next_scale_input`, and `scale_step`).
`models.engine` stands on them to make sampling fast (compiled steps, CUDA graphs, a bf16 stream) and holds the
caches that needs; this module imports nothing from it. The FlexAttention block masks of training
(`attn_impl='flex'`) are cached in `models.basic_var.flex_block_mask`.
"""
import itertools
import math
import numbers
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .basic_var import AdaLNBeforeHead, AdaLNSelfAttn, SharedAdaLin, flex_block_mask, kv_caches_on
from .helpers import (active_autocast_dtype, check_edit_inputs, get_edit_mask, gumbel_softmax_with_rng,
                      init_module_weights, replace_embedding, sample_with_top_k_top_p_)
from .inspect_ckpt import describe_mismatch, describe_var_fit
from .vqvae import VQVAE

__all__ = ['VAR', 'AdaLNSelfAttn', 'sample_with_top_k_top_p_', 'gumbel_softmax_with_rng', 'get_edit_mask',
           'replace_embedding', 'sample_codes', 'scale_step']


def sample_codes(logits_BlV: torch.Tensor, ratio: float, embedding: nn.Embedding, rng, top_k: int, top_p: float,
                 more_smooth: bool, partial_sort: bool = False, capturable: bool = False) -> torch.Tensor:
    """One scale's codes (B, l, Cvae) from its CFG-combined logits, at sampling progress ratio = si / (S - 1).

    Hard: top-k/top-p filtered sampling, then the codebook rows. more_smooth: a Gumbel softmax of the filtered logits
    times (1 + ratio) at temperature max(0.27 (1 - 0.95 ratio), 0.005), mixing the codebook rows (official).
    `capturable`: the same numbers without a host sync (inside a CUDA-graph capture; see `sample_with_top_k_top_p_`).
    """
    idx_Bl = sample_with_top_k_top_p_(logits_BlV, rng=rng, top_k=top_k, top_p=top_p, num_samples=1,
                                      partial_sort=partial_sort, capturable=capturable)[:, :, 0]
    if not more_smooth:
        return embedding(idx_Bl)
    gum_t = max(0.27 * (1 - ratio * 0.95), 0.005)
    return gumbel_softmax_with_rng(logits_BlV.mul(1 + ratio), tau=gum_t, hard=False, dim=-1, rng=rng) \
        @ embedding.weight.unsqueeze(0)


def scale_step(model: nn.Module, x_BlC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
    """One scale of KV-cached inference: all blocks (no mask: the cache holds only earlier scales) and the head.

    model: a VAR (or its bf16 step copy, `models.lowp.StepCopy`) whose blocks' KV caches are on (`kv_caching`);
    x_BlC the scale's input tokens (2B rows: conditional, then unconditional), cond_BD their class embeddings
    -> float32 logits (2B, l, V).
    """
    cond_BD_or_gss = model.shared_ada_lin(cond_BD)
    for b in model.blocks:
        x_BlC = b(x=x_BlC, cond_BD=cond_BD_or_gss, attn_bias=None)
    return model.get_logits(x_BlC, cond_BD)


class VAR(nn.Module):
    """Args follow the official constructor; `attn_impl` (keyword only) picks the training attention: 'sdpa' (a
    dense additive mask, official) or 'flex' (FlexAttention block masks, the same numbers). The VAE is held
    unregistered, so VAR's state dict has no VAE keys."""

    def __init__(self, vae_local: VQVAE, num_classes: int = 1000, depth: int = 16, embed_dim: int = 1024,
                 num_heads: int = 16, mlp_ratio: float = 4.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                 cond_drop_rate: float = 0.1, attn_l2_norm: bool = False,
                 patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                 flash_if_available: bool = True, fused_if_available: bool = True, *, attn_impl: str = 'sdpa'):
        super().__init__()
        assert embed_dim % num_heads == 0
        # the constructor's arguments (the VQVAE aside): a model folder's config.json holds them (models.model_folder)
        self.config = dict(num_classes=num_classes, depth=depth, embed_dim=embed_dim, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                           drop_path_rate=drop_path_rate, norm_eps=norm_eps, shared_aln=shared_aln,
                           cond_drop_rate=cond_drop_rate, attn_l2_norm=attn_l2_norm, patch_nums=list(patch_nums),
                           flash_if_available=flash_if_available, fused_if_available=fused_if_available)
        self.Cvae, self.V = vae_local.Cvae, vae_local.vocab_size
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.cond_drop_rate = cond_drop_rate
        self.prog_si = -1  # progressive training: -1 means all scales
        self.patch_nums = tuple(patch_nums)
        if len(self.patch_nums) < 2:
            raise ValueError(f'VAR needs at least two scales, got patch_nums={self.patch_nums}: the guidance ramp and '
                             f'the Phi positions divide by len(patch_nums) - 1 (the official code fails there too)')
        ends = list(itertools.accumulate(pn ** 2 for pn in self.patch_nums))
        self.L, self.first_l = ends[-1], self.patch_nums[0] ** 2
        self.begin_ends = [(ed - pn ** 2, ed) for ed, pn in zip(ends, self.patch_nums)]  # each scale's [bg, ed)
        self.num_stages_minus_1 = len(self.patch_nums) - 1
        self.num_classes = num_classes
        self.drop_path_rate = drop_path_rate
        self.attn_impl = attn_impl  # training attention: 'sdpa' (dense additive mask, official) or 'flex'
        self._rng: Optional[torch.Generator] = None
        self._uniform_prob: Optional[torch.Tensor] = None

        self.vae_proxy = (vae_local,)
        self.vae_quant_proxy = (vae_local.quantize,)

        # 1. input (word) embedding
        self.word_embed = nn.Linear(self.Cvae, self.C)
        # 2. class embedding; row `num_classes` is the unconditional class
        init_std = math.sqrt(1 / self.C / 3)
        self.class_emb = nn.Embedding(self.num_classes + 1, self.C)
        nn.init.trunc_normal_(self.class_emb.weight.data, mean=0, std=init_std)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        nn.init.trunc_normal_(self.pos_start.data, mean=0, std=init_std)
        # 3. absolute position embedding (one block per scale) and level embedding
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        for bg, ed in self.begin_ends:
            nn.init.trunc_normal_(self.pos_1LC.data[:, bg:ed], mean=0, std=init_std)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), self.C)
        nn.init.trunc_normal_(self.lvl_embed.weight.data, mean=0, std=init_std)
        # 4. backbone blocks
        if shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(self.D, 6 * self.C))
        else:
            self.shared_ada_lin = nn.Identity()
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device='cpu')]
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(block_idx=block_idx, last_drop_p=0 if block_idx == 0 else dpr[block_idx - 1],
                          embed_dim=self.C, cond_dim=self.D, shared_aln=shared_aln, norm_layer=norm_layer,
                          num_heads=num_heads, mlp_ratio=mlp_ratio, drop=drop_rate, attn_drop=attn_drop_rate,
                          drop_path=dpr[block_idx], attn_l2_norm=attn_l2_norm,
                          flash_if_available=flash_if_available, fused_if_available=fused_if_available)
            for block_idx in range(depth)
        ])
        # 5. block-causal mask: position i sees j iff scale(i) >= scale(j)
        d_L = torch.cat([torch.full((pn * pn,), i, device='cpu') for i, pn in enumerate(self.patch_nums)])
        d_1L1 = d_L.view(1, self.L, 1)
        dT_11L = d_1L1.transpose(1, 2)
        self.register_buffer('lvl_1L', dT_11L[:, 0].contiguous().to(self.class_emb.weight.device))
        attn_bias = torch.where(d_1L1 >= dT_11L, 0.0, -torch.inf).reshape(1, 1, self.L, self.L)
        self.register_buffer('attn_bias_for_masking', attn_bias.contiguous().to(self.class_emb.weight.device))
        # 6. classifier head
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_layer=norm_layer)
        self.head = nn.Linear(self.C, self.V)

    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = 0.02, conv_std_or_gain: float = 0.02) -> None:
        """Official initialisation. `init_std < 0` means sqrt(1/(3C)); pos_start/pos_1LC keep their init."""
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        init_module_weights(self.modules(), init_std, conv_std_or_gain)

        if init_head >= 0:
            head = self.head[-1] if isinstance(self.head, nn.Sequential) else self.head
            head.weight.data.mul_(init_head)
            head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()

        depth = len(self.blocks)
        for sab in self.blocks:
            sab.attn.proj.weight.data.div_(math.sqrt(2 * depth))
            sab.ffn.fc2.weight.data.div_(math.sqrt(2 * depth))
            if hasattr(sab, 'ada_lin'):
                sab.ada_lin[-1].weight.data[2 * self.C:].mul_(init_adaln)
                sab.ada_lin[-1].weight.data[:2 * self.C].mul_(init_adaln_gamma)
                sab.ada_lin[-1].bias.data.zero_()
            elif hasattr(sab, 'ada_gss'):
                sab.ada_gss.data[:, :, 2:].mul_(init_adaln)
                sab.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)

    # ------------------------------------------------------------------ helpers
    def _check_labels(self, label_B: torch.Tensor) -> None:
        if torch.compiler.is_compiling():  # a host sync; checked in eager runs only
            return
        if label_B.numel() and (int(label_B.min()) < 0 or int(label_B.max()) > self.num_classes):
            raise ValueError(f'class labels must lie in [0, {self.num_classes}] ({self.num_classes} = unconditional); '
                             f'got values in [{int(label_B.min())}, {int(label_B.max())}]')

    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Final AdaLN + head -> float32 logits."""
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    def _drop_condition(self, label_B: torch.Tensor) -> torch.Tensor:
        # Official quirk kept: the condition is dropped with probability cond_drop_rate in eval mode too.
        # It always draws rand(B) from the global RNG, so the RNG stream matches the official one.
        drop_B = torch.rand(label_B.shape[0], device=label_B.device) < self.cond_drop_rate
        return torch.where(drop_B, self.num_classes, label_B)

    # ------------------------------------------------------------------ training
    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: Optional[torch.Tensor]) -> torch.Tensor:
        """Teacher-forced logits (B, ed, V) float32; ed = L, or the end of scale `prog_si` in progressive training.

        Args:
            label_B: class ids in [0, num_classes] (num_classes = unconditional).
            x_BLCv_wo_first_l: (B, ed - first_l, Cvae) teacher-forcing input from `idxBl_to_var_input`
                (None when prog_si == 0).
        """
        self._check_labels(label_B)
        bg, ed = self.begin_ends[self.prog_si] if self.prog_si >= 0 else (0, self.L)
        B = label_B.shape[0]
        device_type = label_B.device.type
        with torch.autocast(device_type, enabled=False):  # embeddings in float32
            label_B = self._drop_condition(label_B)
            sos = cond_BD = self.class_emb(label_B)
            sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            if self.prog_si == 0:
                x_BLC = sos
            else:
                x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
            x_BLC = x_BLC + (self.lvl_embed(self.lvl_1L[:, :ed].expand(B, -1)) + self.pos_1LC[:, :ed])

        if self.attn_impl not in ('sdpa', 'flex'):
            raise ValueError(f"attn_impl must be 'sdpa' or 'flex', got {self.attn_impl!r}")
        if self.attn_impl == 'sdpa':
            attn_bias = self.attn_bias_for_masking[:, :, :ed, :ed]
        else:
            attn_bias = flex_block_mask(self.patch_nums, ed, self.lvl_1L.device)
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        amp_dtype = active_autocast_dtype(device_type)
        if amp_dtype is not None:  # under AMP the residual stream runs in the autocast dtype (official)
            x_BLC = x_BLC.to(dtype=amp_dtype)
            cond_BD_or_gss = cond_BD_or_gss.to(dtype=amp_dtype)
            if isinstance(attn_bias, torch.Tensor):
                attn_bias = attn_bias.to(dtype=amp_dtype)

        for b in self.blocks:
            x_BLC = b(x=x_BLC, cond_BD=cond_BD_or_gss, attn_bias=attn_bias)
        logits_BLV = self.get_logits(x_BLC.float(), cond_BD)

        if self.prog_si == 0:
            # official: keep word_embed in the graph (DDP) when it is unused; adds exactly zero
            if isinstance(self.word_embed, nn.Linear):
                logits_BLV[0, 0, 0] += self.word_embed.weight[0, 0] * 0 + self.word_embed.bias[0] * 0
        return logits_BLV

    # ------------------------------------------------------------------ sampling
    @property
    def rng(self) -> torch.Generator:
        """The official attribute: a generator on the model's device, re-seeded by sampling with an int g_seed."""
        device = self.class_emb.weight.device
        if self._rng is None or self._rng.device != device:
            self._rng = torch.Generator(device=device)
        return self._rng

    @rng.setter
    def rng(self, generator: torch.Generator) -> None:
        """Official code assigns `var.rng = torch.Generator(device=...)` (e.g. the trainer); that works here too."""
        self._rng = generator

    @property
    def uniform_prob(self) -> torch.Tensor:
        """The official attribute: (1, num_classes) of 1/num_classes on the model's device (not a buffer); an
        assigned tensor (another class prior for unlabelled sampling) replaces it."""
        device = self.class_emb.weight.device
        if self._uniform_prob is not None:
            return self._uniform_prob.to(device)
        return torch.full((1, self.num_classes), 1.0 / self.num_classes, dtype=torch.float32, device=device)

    @uniform_prob.setter
    def uniform_prob(self, prob_1C: torch.Tensor) -> None:
        self._uniform_prob = prob_1C

    def sampling_labels(self, B: int, label_B: Optional[Union[int, torch.Tensor]], g_seed):
        """The labels and generator of a sampling call -> (label_B (B,) on the model's device, rng).

        rng is None (global RNG), `self.rng` seeded with g_seed (as official), or one generator per row when g_seed
        is a sequence. label_B None draws the labels from `uniform_prob` with that rng (per row with a seed list).
        """
        device = self.class_emb.weight.device
        if g_seed is None:
            rng = None
        elif isinstance(g_seed, numbers.Integral) or (isinstance(g_seed, torch.Tensor) and g_seed.dim() == 0):
            rng = self.rng
            rng.manual_seed(int(g_seed))
        else:
            seeds = [int(s) for s in g_seed]
            if len(seeds) != B:
                raise ValueError(f'g_seed has {len(seeds)} seeds for a batch of {B}')
            rng = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        if label_B is None:
            uniform_prob = self.uniform_prob
            if isinstance(rng, list):
                label_B = torch.cat([torch.multinomial(uniform_prob, 1, replacement=True, generator=g).view(1)
                                     for g in rng])
            else:
                label_B = torch.multinomial(uniform_prob, num_samples=B, replacement=True, generator=rng).reshape(B)
        elif isinstance(label_B, int):
            label_B = torch.full((B,), fill_value=self.num_classes if label_B < 0 else label_B, device=device)
        label_B = label_B.to(device)
        self._check_labels(label_B)
        return label_B, rng

    @torch.no_grad()
    def autoregressive_infer_cfg(self, B: int, label_B: Optional[Union[int, torch.LongTensor]], g_seed=None,
                                 cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
                                 input_img_tokens: Optional[List[torch.Tensor]] = None,
                                 edit_mask: Optional[torch.Tensor] = None,
                                 on_scale: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
        """Class-conditional sampling with classifier-free guidance -> images (B, 3, H, W) in [0, 1].

        Args:
            B: batch size.
            label_B: (B,) class ids, an int for the whole batch (negative = unconditional), or None (uniform).
            g_seed: None (global RNG), an int (one generator for the batch, as official), or B ints
                (one generator per row: a row's sample does not depend on the rest of the batch).
            cfg: guidance strength; ramps linearly from 0 at the first scale to cfg at the last.
            top_k / top_p: filters (0 disables); more_smooth: Gumbel-softmax soft codes (visual quality).
            input_img_tokens / edit_mask: zero-shot editing. Per-scale ids of the input image (from
                `VQVAE.img_to_idxBl`) and an (h, w) or (B, h, w) mask, 1 = keep the image's token.
            on_scale: called as on_scale(si, f_hat_BChw) after each scale with the cumulative latent so far (to
                watch the image form, e.g. `VQVAE.fhat_to_img`, or to report progress). It must not change f_hat,
                which the loop keeps adding to in place; the last call's f_hat is the one decoded into the result.
        The plain path, written scale by scale (the KV cache preallocated for all L positions, which gives the
        numbers of the official growth by concatenation). The fast paths (compiled steps, CUDA graphs, a bf16
        stream) run the same pieces through `models.engine.sampling_engine(var).sample`. The caller puts the model
        in eval mode, as with the official code.
        """
        check_edit_inputs(input_img_tokens, edit_mask)
        label_B, rng = self.sampling_labels(B, label_B, g_seed)
        cond_BD, lvl_pos, next_token_map, f_hat = self.first_scale_input(label_B)
        with kv_caches_on(self.blocks, self.L):
            f_hat = self.sample_scales(lambda si, x_BlC: scale_step(self, x_BlC, cond_BD), next_token_map, f_hat,
                                       lvl_pos, rng, cfg, top_k, top_p, more_smooth, input_img_tokens=input_img_tokens,
                                       edit_mask=edit_mask, on_scale=on_scale)
        return self.vae_proxy[0].fhat_to_img(f_hat).add_(1).mul_(0.5)

    def first_scale_input(self, label_B: torch.Tensor):
        """The start of a sampling loop -> (cond_BD: the 2B class embeddings, conditional rows then unconditional;
        lvl_pos (1, L, C); the first scale's 2B input tokens; f_hat, the (B, Cvae, pn, pn) latent of zeros that
        every scale adds to)."""
        B = label_B.shape[0]
        uncond_B = torch.full_like(label_B, fill_value=self.num_classes)
        sos = cond_BD = self.class_emb(torch.cat((label_B, uncond_B), dim=0))
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        next_token_map = sos.unsqueeze(1).expand(2 * B, self.first_l, -1) \
            + self.pos_start.expand(2 * B, self.first_l, -1) + lvl_pos[:, :self.first_l]
        f_hat = sos.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        return cond_BD, lvl_pos, next_token_map, f_hat

    def sample_scales(self, step: Callable[[int, torch.Tensor], torch.Tensor], next_token_map: torch.Tensor,
                      f_hat: torch.Tensor, lvl_pos: torch.Tensor, rng, cfg: float, top_k: int, top_p: float,
                      more_smooth: bool, partial_sort: bool = False, input_img_tokens=None, edit_mask=None,
                      on_scale=None, capturable: bool = False) -> torch.Tensor:
        """Every scale in order: transformer step -> CFG -> filtered sampling -> (editing) -> f_hat and the next
        scale's input; the inputs come from `first_scale_input`. `step(si, x_2BlC) -> logits_2BlV` runs the
        transformer on scale si with a KV cache (`scale_step` for the plain path; the engine passes its fast steps).
        `partial_sort` / `capturable`: see `sample_codes`. -> the final f_hat."""
        B, device = f_hat.shape[0], f_hat.device
        quant = self.vae_quant_proxy[0]
        for si, pn in enumerate(self.patch_nums):
            ratio = si / self.num_stages_minus_1
            logits_2BlV = step(si, next_token_map)
            t = cfg * ratio
            logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
            h_BlCvae = sample_codes(logits_BlV, ratio, quant.embedding, rng, top_k, top_p, more_smooth, partial_sort,
                                    capturable)
            h_BChw = h_BlCvae.transpose_(1, 2).reshape(B, self.Cvae, pn, pn)
            if edit_mask is not None:  # zero-shot editing: the input image's codes where the mask says so
                gt_BlCvae = quant.embedding(input_img_tokens[si].to(device))
                gt_BChw = gt_BlCvae.transpose_(1, 2).reshape(B, self.Cvae, pn, pn)
                h_BChw = replace_embedding(edit_mask.to(device), h_BChw, gt_BChw, pn, pn)
            f_hat, next_token_map = self.next_scale_input(si, f_hat, h_BChw, lvl_pos)
            if on_scale is not None:
                on_scale(si, f_hat)
        return f_hat

    def next_scale_input(self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor,
                         lvl_pos: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Add scale si's codes to f_hat (through Phi) -> (f_hat, the next scale's 2B input tokens, None after
        the last scale). The next input is f_hat downsampled to the next side, embedded, plus its level/position."""
        B = h_BChw.shape[0]
        quant = self.vae_quant_proxy[0]
        f_hat, next_BChw = quant.get_next_autoregressive_input(si, len(self.patch_nums), f_hat, h_BChw)
        if si == self.num_stages_minus_1:
            return f_hat, None
        bg, ed = self.begin_ends[si + 1]
        next_BlCvae = next_BChw.view(B, self.Cvae, -1).transpose(1, 2)
        next_BlC = self.word_embed(next_BlCvae) + lvl_pos[:, bg:ed]
        return f_hat, next_BlC.repeat(2, 1, 1)  # cond and uncond halves are identical

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict loading that names mismatched keys and shapes, and says which config the checkpoint fits."""
        if strict:
            msg = describe_mismatch(self, state_dict, 'VAR checkpoint', fits=describe_var_fit(state_dict))
            if msg:
                raise RuntimeError(msg)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return f'depth={self.depth}, C={self.C}, heads={self.num_heads}, patch_nums={self.patch_nums}, ' \
               f'drop_path_rate={self.drop_path_rate:g}, cond_drop_rate={self.cond_drop_rate:g}'


def __getattr__(name: str):
    """`models.var.VARHF` is made on first use (PEP 562): its base class comes from huggingface_hub, which importing
    `models` does not load (the models package imports torch alone)."""
    if name == 'VARHF':
        from .var_hf import make_varhf
        globals()['VARHF'] = cls = make_varhf()
        return cls
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
