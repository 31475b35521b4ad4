"""Read a model's configuration back from its state dict, and explain mismatches in plain words.

Everything here works on key names and shapes only, so it also serves checkpoints of unknown origin.
"""
import math
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch

from .presets import PATCH_NUMS


def _count_indices(sd: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in sd for m in [rx.fullmatch(k)] if m}
    return max(found) + 1 if found else 0


def infer_var_config(sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """VAR state dict -> the `build_vae_var` arguments it was made with (depth, width, patch_nums, ...)."""
    if 'pos_1LC' not in sd or 'class_emb.weight' not in sd:
        raise ValueError('this does not look like a VAR state dict (no pos_1LC / class_emb.weight)')
    depth = _count_indices(sd, r'blocks\.(\d+)\.attn\.proj\.weight')
    C = sd['pos_1LC'].shape[2]
    cfg: Dict[str, Any] = dict(depth=depth, embed_dim=C, num_classes=sd['class_emb.weight'].shape[0] - 1,
                               V=sd['head.weight'].shape[0], Cvae=sd['word_embed.weight'].shape[1],
                               shared_aln='shared_ada_lin.1.weight' in sd,
                               attn_l2_norm='blocks.0.attn.scale_mul_1H11' in sd)
    cfg['num_heads'] = sd['blocks.0.attn.scale_mul_1H11'].shape[1] if cfg['attn_l2_norm'] else max(1, C // 64)
    if 'blocks.0.ffn.fc1.weight' in sd:
        cfg['mlp_ratio'] = sd['blocks.0.ffn.fc1.weight'].shape[0] / C
    if 'lvl_1L' in sd and sd['lvl_1L'].device.type != 'meta':
        counts = torch.bincount(sd['lvl_1L'].reshape(-1).long()).tolist()
        cfg['patch_nums'] = tuple(round(math.sqrt(c)) for c in counts)
    else:
        L, S = sd['pos_1LC'].shape[1], sd['lvl_embed.weight'].shape[0]
        match = [pn for pn in PATCH_NUMS.values() if sum(p * p for p in pn) == L and len(pn) == S]
        cfg['patch_nums'] = match[0] if match else None
    return cfg


def infer_vae_config(sd: Mapping[str, torch.Tensor], v_patch_nums: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """VQVAE state dict -> `VQVAE(...)` arguments (patch nums are not stored; pass them or get the 256 preset)."""
    if 'encoder.conv_in.weight' not in sd or 'quantize.embedding.weight' not in sd:
        raise ValueError('this does not look like a VQVAE state dict (no encoder.conv_in / quantize.embedding)')
    ch = sd['encoder.conv_in.weight'].shape[0]
    levels = _count_indices(sd, r'encoder\.down\.(\d+)\.block\.0\.conv1\.weight')
    ch_mult = [sd[f'encoder.down.{i}.block.0.conv1.weight'].shape[0] // ch for i in range(levels)]
    V, Cvae = sd['quantize.embedding.weight'].shape
    cfg: Dict[str, Any] = dict(vocab_size=V, z_channels=Cvae, ch=ch, ch_mult=ch_mult,
                               quant_conv_ks=sd['quant_conv.weight'].shape[-1], quant_resi=0.5, default_qresi_counts=0)
    if 'quantize.quant_resi.qresi.weight' in sd:
        cfg['share_quant_resi'] = 1
    elif 'quantize.quant_resi.qresi_ls.0.weight' in sd:
        cfg['share_quant_resi'] = _count_indices(sd, r'quantize\.quant_resi\.qresi_ls\.(\d+)\.weight')
    elif 'quantize.quant_resi.0.weight' in sd:
        cfg['share_quant_resi'] = 0
        cfg['default_qresi_counts'] = _count_indices(sd, r'quantize\.quant_resi\.(\d+)\.weight')
    else:
        cfg['share_quant_resi'], cfg['quant_resi'] = 4, 0.0  # no Phi at all
    cfg['v_patch_nums'] = list(v_patch_nums or PATCH_NUMS['256'])
    return cfg


def describe_mismatch(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str,
                      fits: Optional[str] = None, limit: int = 12) -> Optional[str]:
    """A readable report of missing / unexpected / wrongly shaped keys, or None when everything matches."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f'{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}'
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return None

    def block(title, items):
        if not items:
            return ''
        more = f'\n    ... and {len(items) - limit} more' if len(items) > limit else ''
        return f'\n  {title} ({len(items)}):\n    ' + '\n    '.join(items[:limit]) + more

    msg = f'{what} does not match the model' + block('shape mismatches', shapes) + block('missing keys', missing) \
        + block('unexpected keys', unexpected)
    if fits:
        msg += f'\n  The checkpoint fits: {fits}'
    return msg


def _inferred(infer: Callable[[Mapping[str, torch.Tensor]], Dict[str, Any]],
              sd: Mapping[str, torch.Tensor]) -> Optional[Dict[str, Any]]:
    try:
        return infer(sd)
    except (ValueError, KeyError, IndexError):
        return None


def describe_var_fit(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    c = _inferred(infer_var_config, sd)
    return None if c is None else (f"depth={c['depth']} (width {c['embed_dim']}, heads {c['num_heads']}), "
                                   f"patch_nums={c['patch_nums']}, shared_aln={c['shared_aln']}, "
                                   f"num_classes={c['num_classes']}, V={c['V']}, Cvae={c['Cvae']}")


def describe_vae_fit(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    c = _inferred(infer_vae_config, sd)
    return None if c is None else (f"ch={c['ch']}, ch_mult={tuple(c['ch_mult'])}, vocab_size={c['vocab_size']}, "
                                   f"z_channels={c['z_channels']}, share_quant_resi={c['share_quant_resi']}")
