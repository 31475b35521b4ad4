# Model FLOPs of VAR (arXiv 2404.02905): sampling and training per image, counted from the architecture.
"""Model FLOPs of VAR sampling and training per image: the one count behind the benchmarks' achieved TFLOP/s and % of
the device's peak (benchmarks/analytic/flops.py) and the training compute C of the scaling laws (scaling.py).

Counted: the matrix products and convolutions (2 FLOPs per multiply-add), the work that sets the hardware's pace;
elementwise work (norms, activations, sampling) is left out, as in the usual model-FLOPs utilisation.

    transformer, per scale si with l = pn_si^2 new tokens, K = tokens of scales 0..si (the KV cache), rows = 2 with
    CFG (conditional and unconditional halves), per block:
        qkv 6C^2, proj 2C^2, FFN 4*C*hidden per token; attention 4*C*K per token (scores and weighted values);
        AdaLN 12*C*D per row (per block; once for all blocks with shared AdaLN)
    head: 2*C*V per token, its AdaLN 4*C*D per row;
    next-scale input: word_embed 2*Cvae*C per token of the next scale, on the B conditional rows only (the halves
    are identical and repeated); the quantiser's Phi 3x3 convolution 18*Cvae^2 per position of the last scale, per
    scale and image;
    decode: post_quant_conv + decoder, counted by torch's FLOP counter on the meta device (no memory, no time).

    training step (teacher forcing, one row per image, all L tokens at once): the same per-token terms, attention
    over the positions the block-causal mask allows (a token of scale si sees the K tokens of scales 0..si; the
    dense-mask reference computes all L, FlexAttention skips the masked tiles), word_embed on the L - first_l
    teacher-forcing tokens; backward = 2x forward, less the word embedding's input gradient (its input is data);
    encode (with images): encoder, quant_conv, the quantiser and the teacher-forcing input, counted on the meta device.
"""
from typing import Dict, Sequence

import torch


def transformer_flops(depth: int, embed_dim: int, patch_nums: Sequence[int], vocab_size: int, cvae: int,
                      mlp_ratio: float = 4.0, shared_aln: bool = False, cfg: bool = True) -> Dict[str, float]:
    """FLOPs per image of the sampling loop without the decode: {'blocks', 'attention', 'adaln', 'head', 'embed',
    'phi', 'total'} (see the module docstring for the formulas)."""
    C = D = embed_dim
    hidden = round(C * mlp_ratio)
    rows = 2 if cfg else 1
    out = dict(blocks=0.0, attention=0.0, adaln=0.0, head=0.0, embed=0.0, phi=0.0)
    seen = 0
    last = patch_nums[-1] ** 2
    for si, pn in enumerate(patch_nums):
        new = pn * pn
        seen += new
        tokens = rows * new
        out['blocks'] += depth * tokens * (8 * C * C + 4 * C * hidden)
        out['attention'] += depth * tokens * 4 * C * seen
        out['adaln'] += (1 if shared_aln else depth) * rows * 12 * C * D
        out['head'] += tokens * 2 * C * vocab_size + rows * 4 * C * D
        if si + 1 < len(patch_nums):
            out['embed'] += patch_nums[si + 1] ** 2 * 2 * cvae * C
        out['phi'] += last * 18 * cvae * cvae
    out['total'] = sum(out.values())
    return out


def decode_flops(vae) -> float:
    """FLOPs per image of `vae.fhat_to_img` at the last scale, counted by torch's FLOP counter on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    side = vae.v_patch_nums[-1]
    meta = _meta_copy(vae)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta.decoder(meta.post_quant_conv(torch.empty(1, vae.Cvae, side, side, device='meta')))
    return float(counter.get_total_flops())


def _meta_copy(vae):
    from models.vqvae import VQVAE
    with torch.device('meta'):
        return VQVAE(test_mode=True, **vae.config)


def sampling_flops(vae, var, cfg: bool = True) -> Dict[str, float]:
    """FLOPs per image of `var.autoregressive_infer_cfg` with the decode: the transformer_flops terms, 'decode',
    and 'total'."""
    mlp_ratio = var.blocks[0].ffn.fc1.out_features / var.C
    out = transformer_flops(var.depth, var.C, var.patch_nums, var.V, var.Cvae, mlp_ratio=mlp_ratio,
                            shared_aln=not isinstance(var.shared_ada_lin, torch.nn.Identity), cfg=cfg)
    out['decode'] = decode_flops(vae)
    out['total'] += out['decode']
    return out


def teacher_forcing_flops(depth: int, embed_dim: int, patch_nums: Sequence[int], vocab_size: int, cvae: int,
                          mlp_ratio: float = 4.0, shared_aln: bool = False, first_l: int = 1) -> Dict[str, float]:
    """Forward FLOPs per image of VAR's training forward over all scales: {'blocks', 'attention', 'adaln', 'head',
    'embed', 'total'}."""
    C = D = embed_dim
    hidden = round(C * mlp_ratio)
    L = sum(pn * pn for pn in patch_nums)
    out = dict(blocks=depth * L * (8 * C * C + 4 * C * hidden), attention=0.0,
               adaln=(1 if shared_aln else depth) * 12 * C * D, head=L * 2 * C * vocab_size + 4 * C * D,
               embed=(L - first_l) * 2 * cvae * C)
    seen = 0
    for pn in patch_nums:
        seen += pn * pn
        out['attention'] += depth * pn * pn * 4 * C * seen
    out['total'] = float(sum(out.values()))
    return out


def encode_flops(vae, patch_nums: Sequence[int]) -> float:
    """FLOPs per image of the training step's tokenisation (`img_to_idxBl` and the teacher-forcing input), counted
    by torch's FLOP counter on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    side = vae.downsample * patch_nums[-1]
    meta = _meta_copy(vae)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        idx_Bl = meta.img_to_idxBl(torch.empty(1, 3, side, side, device='meta'), v_patch_nums=patch_nums)
        meta.quantize.idxBl_to_var_input(idx_Bl)
    return float(counter.get_total_flops())


def training_flops(vae, var, with_encode: bool = True) -> Dict[str, float]:
    """FLOPs per image of one training step: 'forward' and 'backward' of the transformer (with 'attention', the
    part of both that the block-causal mask allows), 'encode' (0 without images) and 'total'."""
    mlp_ratio = var.blocks[0].ffn.fc1.out_features / var.C
    fwd = teacher_forcing_flops(var.depth, var.C, var.patch_nums, var.V, var.Cvae, mlp_ratio=mlp_ratio,
                                shared_aln=not isinstance(var.shared_ada_lin, torch.nn.Identity), first_l=var.first_l)
    out = dict(forward=fwd['total'], backward=2 * fwd['total'] - fwd['embed'], attention=3 * fwd['attention'],
               encode=encode_flops(vae, var.patch_nums) if with_encode else 0.0)
    out['total'] = out['forward'] + out['backward'] + out['encode']
    return out
