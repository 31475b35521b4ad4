"""VAR models: the multi-scale VQVAE tokenizer and the next-scale-prediction transformer.

`build_vae_var` keeps the official signature and defaults; `models.presets` (re-exported here) is the one source
of the patch-number presets, the released models and their Hub files; loading of official and of this project's
checkpoints lives in `models.loading` (re-exported here); the fast sampling paths live in `models.engine`.
Importing this package touches neither the network nor any global state.
"""
from typing import Optional, Sequence, Tuple, Union

import torch

from .inspect_ckpt import infer_vae_config, infer_var_config
from .loading import (HubDownloadError, hub_download, load_checkpoint_models, load_pretrained, load_vae_checkpoint,
                      read_checkpoint)
from .presets import (HUB_REPO_ID, OFFICIAL_DEPTHS, PATCH_NUMS, PRESETS, VAE_FILENAME, preset_config, var_filename,
                      width_heads_drop_path)
from .quant import VectorQuantizer2
from .var import VAR
from .vqvae import OFFICIAL_CH_MULT, VQVAE


def build_vae_var(device: Union[str, torch.device], patch_nums: Sequence[int] = PATCH_NUMS['256'], V: int = 4096,
                  Cvae: int = 32, ch: int = 160, share_quant_resi: int = 4, num_classes: int = 1000, depth: int = 16,
                  shared_aln: bool = False, attn_l2_norm: bool = True, flash_if_available: bool = True,
                  fused_if_available: bool = True, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5,
                  init_head: float = 0.02, init_std: float = -1, *, ch_mult: Sequence[int] = OFFICIAL_CH_MULT,
                  embed_dim: Optional[int] = None, num_heads: Optional[int] = None, mlp_ratio: float = 4.0,
                  drop_path_rate: Optional[float] = None, cond_drop_rate: float = 0.1,
                  attn_impl: str = 'sdpa') -> Tuple[VQVAE, VAR]:
    """Build the frozen VQVAE and an initialised VAR, directly on `device` ('meta' allocates nothing).

    The positional arguments are the official ones. Keyword-only extensions (defaults keep the official
    numerics): `ch_mult` (VQVAE downsampling), `embed_dim` / `num_heads` (default 64*depth / depth),
    `mlp_ratio`, `drop_path_rate` (default 0.1*depth/24), `cond_drop_rate`, `attn_impl` (the training attention,
    see `VAR`).
    Returns (vae_local, var_wo_ddp). `var.build_config` holds these arguments (minus device) so that a
    checkpoint can rebuild the same model.
    """
    derived = width_heads_drop_path(depth)
    width = embed_dim if embed_dim is not None else derived['embed_dim']
    heads = num_heads if num_heads is not None else derived['num_heads']
    dpr = drop_path_rate if drop_path_rate is not None else derived['drop_path_rate']
    with torch.device(device):
        vae_local = VQVAE(vocab_size=V, z_channels=Cvae, ch=ch, test_mode=True, share_quant_resi=share_quant_resi,
                          v_patch_nums=patch_nums, ch_mult=ch_mult)
        var_wo_ddp = VAR(vae_local=vae_local, num_classes=num_classes, depth=depth, embed_dim=width, num_heads=heads,
                         mlp_ratio=mlp_ratio, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=dpr, norm_eps=1e-6,
                         shared_aln=shared_aln, cond_drop_rate=cond_drop_rate, attn_l2_norm=attn_l2_norm,
                         patch_nums=patch_nums, flash_if_available=flash_if_available,
                         fused_if_available=fused_if_available, attn_impl=attn_impl)
    var_wo_ddp.init_weights(init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head,
                            init_std=init_std)
    var_wo_ddp.build_config = dict(
        patch_nums=tuple(patch_nums), V=V, Cvae=Cvae, ch=ch, share_quant_resi=share_quant_resi, num_classes=num_classes,
        depth=depth, shared_aln=shared_aln, attn_l2_norm=attn_l2_norm, ch_mult=tuple(ch_mult), embed_dim=width,
        num_heads=heads, mlp_ratio=mlp_ratio, drop_path_rate=dpr, cond_drop_rate=cond_drop_rate,
    )
    return vae_local, var_wo_ddp


__all__ = ['VQVAE', 'VectorQuantizer2', 'VAR', 'build_vae_var', 'PRESETS', 'PATCH_NUMS', 'preset_config',
           'OFFICIAL_DEPTHS', 'HUB_REPO_ID', 'VAE_FILENAME', 'var_filename',
           'infer_var_config', 'infer_vae_config', 'HubDownloadError', 'hub_download', 'load_pretrained',
           'load_vae_checkpoint', 'load_checkpoint_models', 'read_checkpoint']
