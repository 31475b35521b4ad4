# The released VAR models and their scales (arXiv 2404.02905, sections 4-5 and Table 1).
"""One source for the facts every script, loader and benchmark shares about the released models.

- `PATCH_NUMS`: the token-map sides per scale for 256, 512 and 1024 px (train.py's `--pn 256/512/1024`).
- `PRESETS`: the released checkpoints as `build_vae_var` arguments (depth, scales, shared AdaLN); d36 is the 512 px
  model and the only one with shared AdaLN.
- `width_heads_drop_path(depth)`: the shape every depth derives (width 64*depth, heads = depth, drop-path 0.1*depth/24).
- The Hugging Face Hub repository and file names of the released weights.

Plain data and pure functions: importing this module touches nothing.
"""
from typing import Any, Dict, Sequence, Union

PATCH_NUMS: Dict[str, tuple] = {
    '256': (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    '512': (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    '1024': (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}

# The released checkpoints (FoundationVision/var on the Hugging Face Hub).
PRESETS: Dict[str, Dict[str, Any]] = {
    'd16': dict(depth=16, patch_nums=PATCH_NUMS['256'], shared_aln=False),
    'd20': dict(depth=20, patch_nums=PATCH_NUMS['256'], shared_aln=False),
    'd24': dict(depth=24, patch_nums=PATCH_NUMS['256'], shared_aln=False),
    'd30': dict(depth=30, patch_nums=PATCH_NUMS['256'], shared_aln=False),
    'd36': dict(depth=36, patch_nums=PATCH_NUMS['512'], shared_aln=True),
}
OFFICIAL_DEPTHS = tuple(p['depth'] for p in PRESETS.values())
NUM_CLASSES = 1000  # ImageNet: every released model is class-conditional on its 1000 classes

HUB_REPO_ID = 'FoundationVision/var'
VAE_FILENAME = 'vae_ch160v4096z32.pth'
VAE_DOWNSAMPLE = 16  # the released VQVAE's patch size: image side = 16 * the last scale's side


def width_heads_drop_path(depth: int) -> Dict[str, Any]:
    """What a depth implies in the official recipe: embed_dim 64*depth, num_heads = depth, drop_path 0.1*depth/24."""
    return dict(embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24)


def preset_name(name_or_depth: Union[str, int]) -> str:
    """'d16' or 16 -> 'd16', checked against the released models."""
    name = name_or_depth if isinstance(name_or_depth, str) else f'd{name_or_depth}'
    if name not in PRESETS:
        raise ValueError(f'unknown model {name_or_depth!r}; released models: {", ".join(PRESETS)}')
    return name


def preset_config(name_or_depth: Union[str, int]) -> Dict[str, Any]:
    """`build_vae_var` arguments of a released model ('d16' or 16 ... 'd36')."""
    return dict(PRESETS[preset_name(name_or_depth)])


def var_filename(name_or_depth: Union[str, int]) -> str:
    """The Hub file of a released VAR, e.g. 'var_d16.pth'."""
    return f'var_{preset_name(name_or_depth)}.pth'


def image_size(patch_nums: Sequence[int], downsample: int = VAE_DOWNSAMPLE) -> int:
    """Generated image side in pixels: 256 for PATCH_NUMS['256'], 512 for d36's scales."""
    return patch_nums[-1] * downsample
