# Implements zero-shot editing with VAR (arXiv 2404.02905, section 5 and Fig. 8).
"""Zero-shot editing for users: in-painting, out-painting and class-conditional editing of a real image.

The model never saw a mask in training. Editing works because sampling is scale by scale: at every scale the
tokens inside the *kept* part of the image are replaced by the input image's own tokens before they enter the
cumulative feature map, so VAR generates the rest around (or inside) them
(`VAR.autoregressive_infer_cfg(..., input_img_tokens=, edit_mask=)`, or the engine's `sample` with the same
arguments).

Vocabulary used here:
- the *region* is what the user marks: a box in relative coordinates (y0, x0, y1, x1) of the square the model
  sees, or a mask image whose white pixels mark it;
- the *keep mask* is what the library takes: a (pn, pn) float map at the last scale's token grid, 1 = keep the
  input's token, 0 = let VAR generate. `inpaint` and `class-edit` regenerate the region (keep = 1 - region);
  `outpaint` keeps the region and regenerates around it (keep = region).
The library resizes the keep mask bilinearly to every scale and thresholds it at 0.5; scales of at most 3 tokens
always keep the input's tokens (official procedure, `kept_token_masks` shows the result).

Shape legend: B batch, n variations, H/W image size, pn the last scale's side, h/w a mask's size.
Images are float in [0, 1] here; the tokenizer gets them mapped to [-1, 1].
"""
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

import models
from models.engine import sampling_engine
from models.var import get_edit_mask, replace_embedding
from sampling.draw import fast_switches
from sampling.settings import SamplingSettings
from utils.runtime import autocast_context

MODES = ('inpaint', 'outpaint', 'class-edit')
# Defaults of the official zero-shot editing notebook: the box, and how the edits are drawn (fp16 autocast on a GPU)
DEFAULT_BOX = (0.1, 0.1, 0.8, 0.8)  # y0, x0, y1, x1
EDIT_SETTINGS = SamplingSettings(cfg=3.0, top_k=900, top_p=0.95, more_smooth=True, seed=0, fp16=1)
# A token belongs to a mask-image region when at least this fraction of its pixels are in it.
DEFAULT_MASK_THRESHOLD = 0.5

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray]


# ----------------------------------------------------------------------------------------------------------- images
def read_image(src: ImageSource, what: str = 'image', mode: str = 'RGB') -> Image.Image:
    """A file path, a PIL image or a uint8 array (H, W[, C]) -> a PIL image in `mode`, with errors naming `src`."""
    if isinstance(src, Image.Image):
        return src.convert(mode)
    if isinstance(src, np.ndarray):
        if src.dtype == bool:
            src = src.astype(np.uint8) * 255
        if src.dtype != np.uint8 or src.ndim not in (2, 3) or (src.ndim == 3 and src.shape[2] not in (1, 3, 4)):
            raise ValueError(f'{what}: expected a uint8 array of shape (H, W), (H, W, 3) or (H, W, 4), got '
                             f'{src.dtype} {src.shape}')
        return Image.fromarray(src[..., 0] if src.ndim == 3 and src.shape[2] == 1 else src).convert(mode)
    path = os.fspath(src)
    if os.path.isdir(path):
        raise ValueError(f'{what} {path} is a folder, not an image file')
    if not os.path.isfile(path):
        raise ValueError(f'{what} {path}: no such file')
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so that a truncated file fails here and not later
            return img.convert(mode)
    except UnidentifiedImageError as e:
        raise ValueError(f'{what} {path} is not an image file that PIL can read') from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f'{what} {path} cannot be read ({type(e).__name__}: {e})') from e


def _cover_and_crop(width: int, height: int, size: int) -> Tuple[Tuple[int, int], Tuple[int, int, int, int]]:
    """Resize so that the shorter side is `size`, then centre-crop a square -> (resized (w, h), crop box)."""
    scale = size / min(width, height)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (w - size) // 2, (h - size) // 2
    return (w, h), (left, top, left + size, top + size)


def fit_to_model(img: Image.Image, size: int, resample: int = Image.Resampling.LANCZOS) -> Image.Image:
    """Resize (shorter side -> `size`, the longer one rounded) and centre-crop to size x size. The official demo
    takes images already at the model's size; unlike the validation transform this resizes straight to `size` (no
    `mid_reso` margin), so the whole short side of the photo stays in view."""
    if img.size == (size, size):
        return img
    resized, box = _cover_and_crop(img.width, img.height, size)
    return img.resize(resized, resample=resample).crop(box)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert('RGB'), dtype=np.uint8).copy()).permute(2, 0, 1)[None].float() / 255


def to_pil(img_3HW: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB PIL image; x*255 truncated to uint8, as the official demo converts."""
    return Image.fromarray(img_3HW.detach().float().clamp(0, 1).mul(255).to(torch.uint8).permute(1, 2, 0).cpu().numpy())


# ----------------------------------------------------------------------------------------------------------- regions
def box_region(patch_nums: Sequence[int], box: Sequence[float]) -> torch.Tensor:
    """A box (y0, x0, y1, x1) in [0, 1] of the model's square -> (pn, pn) region map at the last token grid.

    Edges are rounded to tokens with Python's round, as in the official notebook (`get_edit_mask`).
    """
    if len(box) != 4:
        raise ValueError(f'box: expected 4 numbers y0,x0,y1,x1, got {len(box)}')
    y0, x0, y1, x1 = (float(v) for v in box)
    if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
        raise ValueError(f'box: expected 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1 (relative coordinates), got '
                         f'y0={y0:g}, x0={x0:g}, y1={y1:g}, x1={x1:g}')
    return get_edit_mask(patch_nums, y0, x0, y1, x1, device='cpu', inpainting=False)


def mask_region(mask: ImageSource, patch_nums: Sequence[int], image_size: Tuple[int, int], model_size: int,
                threshold: float = DEFAULT_MASK_THRESHOLD) -> torch.Tensor:
    """A mask image (white = the region) -> (pn, pn) region map at the last token grid.

    Args:
        mask: file, PIL image or uint8/bool array; pixels >= 128 (or True) are in the region.
        image_size: (width, height) of the input image before it was fitted to the model. The mask must have this
            size (it then gets the same resize and centre crop) or already be model_size x model_size.
        threshold: a token is in the region when at least this fraction of its pixels are.
    """
    what = f'mask {os.fspath(mask)}' if isinstance(mask, (str, os.PathLike)) else 'mask'
    if not 0 < threshold <= 1:
        raise ValueError(f'mask_threshold must lie in (0, 1], got {threshold:g}')
    m = read_image(mask, what='mask', mode='L')
    if m.size not in (tuple(image_size), (model_size, model_size)):
        raise ValueError(f'{what} is {m.width}x{m.height} pixels; it must match the input image '
                         f'({image_size[0]}x{image_size[1]}) or the model resolution ({model_size}x{model_size})')
    binary = m.point(lambda v: 255 if v >= 128 else 0)
    fitted = fit_to_model(binary, model_size, resample=Image.Resampling.BILINEAR)
    region_11HW = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255)[None, None]
    pn = patch_nums[-1]
    coverage_pn_pn = F.adaptive_avg_pool2d(region_11HW, (pn, pn))[0, 0]  # fraction of each token's pixels
    return (coverage_pn_pn >= threshold).float()


def keep_mask_for(region_hw: torch.Tensor, mode: str, pixels_per_token: Optional[int] = None) -> torch.Tensor:
    """Region map -> keep mask (1 = keep the input's token) for `mode`. A region that is empty or covers every token is
    an error: the keep mask would keep all of the input's tokens (nothing is edited) or none (nothing is kept); its
    message gives the side of a token in pixels when `pixels_per_token` is given (the model's image size over its
    last scale's side: 16 for the released models)."""
    if mode not in MODES:
        raise ValueError(f'mode must be one of {", ".join(MODES)}, got {mode!r}')
    grid = f'the model\'s {region_hw.shape[0]}x{region_hw.shape[1]} token grid'
    if pixels_per_token:
        grid += f' (each token covers {pixels_per_token}x{pixels_per_token} pixels)'
    if not bool(region_hw.gt(0.5).any()):
        raise ValueError(f'the region is empty at {grid}: draw a larger box or mask')
    if bool(region_hw.gt(0.5).all()):
        effect = ('outpaint would keep every token and return the input unedited' if mode == 'outpaint'
                  else f'{mode} would regenerate the whole image instead of editing it')
        raise ValueError(f'the region covers the whole image at {grid}: {effect}; draw a smaller box or mask')
    return region_hw.clone() if mode == 'outpaint' else 1 - region_hw


def kept_token_masks(keep_mask_hw: torch.Tensor, patch_nums: Sequence[int]) -> List[torch.Tensor]:
    """The (pn, pn) bool map of input tokens that sampling keeps at each scale (computed by the library itself)."""
    out = []
    for pn in patch_nums:
        zeros_11hw, ones_11hw = torch.zeros(1, 1, pn, pn), torch.ones(1, 1, pn, pn)
        out.append(replace_embedding(keep_mask_hw.float().cpu(), zeros_11hw, ones_11hw, pn, pn)[0, 0].bool())
    return out


def resolve_label(mode: str, class_label: Optional[int], num_classes: int) -> int:
    """The class to condition on: required for class-edit, unconditional (= num_classes) by default otherwise."""
    if class_label is None:
        if mode == 'class-edit':
            raise ValueError(f'class-edit needs a target class_label in 0..{num_classes - 1}')
        return num_classes
    if not 0 <= int(class_label) < num_classes:
        raise ValueError(f'class_label {class_label} is out of range: this model has classes 0..{num_classes - 1}')
    return int(class_label)


# ----------------------------------------------------------------------------------------------------------- editing
def edit_image(vae: models.VQVAE, var: models.VAR, image_13HW: torch.Tensor, keep_mask_hw: torch.Tensor, label: int,
               num_samples: int = 1, settings: SamplingSettings = EDIT_SETTINGS) -> torch.Tensor:
    """Sample `num_samples` edits of one image -> (n, 3, H, W) float32 in [0, 1].

    Args:
        image_13HW: the input in [0, 1], already at the model's resolution (`fit_to_model`).
        keep_mask_hw: (pn, pn) at the last scale's token grid, 1 = keep the input's token.
        label: class id, or var.num_classes for unconditional editing (cfg then has no effect).
        settings: how the edits are drawn. Variation i uses its own generator seeded with settings.seed + i, so it
            does not depend on how many variations are drawn (variation 0 is the official notebook's single draw);
            settings.fp16 is the autocast of the sampling loop on a GPU (tokenisation always runs in float32), and
            settings.fast its CUDA fast paths (`sampling.draw.fast_switches`).
    """
    size, pn = vae.image_size, var.patch_nums[-1]
    if image_13HW.shape != (1, 3, size, size):
        raise ValueError(f'image: expected shape (1, 3, {size}, {size}) at the model resolution, got '
                         f'{tuple(image_13HW.shape)}; use fit_to_model first')
    if keep_mask_hw.shape != (pn, pn):
        raise ValueError(f'keep mask: expected shape ({pn}, {pn}) (the last scale\'s token grid), got '
                         f'{tuple(keep_mask_hw.shape)}; build it with box_region / mask_region and keep_mask_for')
    if num_samples < 1:
        raise ValueError(f'num_samples must be at least 1, got {num_samples}')
    device = var.class_emb.weight.device
    with torch.no_grad():  # not inference_mode: the returned images stay ordinary tensors for the caller
        idx_Bl_per_scale = vae.img_to_idxBl(image_13HW.to(device).mul(2).sub(1), var.patch_nums)
        tokens = [idx_1l.expand(num_samples, -1) for idx_1l in idx_Bl_per_scale]
        label_B = torch.full((num_samples,), int(label), dtype=torch.long, device=device)
        g_seed = [settings.seed + i for i in range(num_samples)]
        with autocast_context(settings.fp16, device):
            img_n3HW = sampling_engine(var).sample(
                B=num_samples, label_B=label_B, g_seed=g_seed, cfg=settings.cfg, top_k=settings.top_k,
                top_p=settings.top_p, more_smooth=settings.more_smooth, input_img_tokens=tokens,
                edit_mask=keep_mask_hw.to(device=device, dtype=torch.float32), **fast_switches(settings.fast, device))
    return img_n3HW.float()


@dataclass
class EditResult:
    """What `zero_shot_edit` did: the fitted input, the keep mask, the class used and the edited images."""
    input_13HW: torch.Tensor
    keep_mask_hw: torch.Tensor
    label: int
    images_n3HW: torch.Tensor

    def strip(self, gap: int = 4) -> Image.Image:
        return comparison_strip(self.input_13HW[0], self.keep_mask_hw, self.images_n3HW, gap=gap)


def zero_shot_edit(vae: models.VQVAE, var: models.VAR, image: ImageSource, mode: str = 'inpaint',
                   box: Optional[Sequence[float]] = DEFAULT_BOX, mask: Optional[ImageSource] = None,
                   class_label: Optional[int] = None, mask_threshold: float = DEFAULT_MASK_THRESHOLD,
                   num_samples: int = 1, settings: SamplingSettings = EDIT_SETTINGS) -> EditResult:
    """The whole edit: read and fit the image, build the keep mask from `mask` (if given) or `box`, then draw
    `num_samples` edits with `settings` (see `edit_image`)."""
    if mode not in MODES:
        raise ValueError(f'mode must be one of {", ".join(MODES)}, got {mode!r}')
    label = resolve_label(mode, class_label, var.num_classes)
    original = read_image(image)
    size = vae.image_size
    if mask is not None:
        region_hw = mask_region(mask, var.patch_nums, original.size, size, threshold=mask_threshold)
    elif box is not None:
        region_hw = box_region(var.patch_nums, box)
    else:
        raise ValueError('give a region: a box (y0, x0, y1, x1) or a mask image')
    keep_mask_hw = keep_mask_for(region_hw, mode, pixels_per_token=size // var.patch_nums[-1])
    input_13HW = pil_to_tensor(fit_to_model(original, size))
    images_n3HW = edit_image(vae, var, input_13HW, keep_mask_hw, label, num_samples, settings)
    return EditResult(input_13HW=input_13HW, keep_mask_hw=keep_mask_hw, label=label, images_n3HW=images_n3HW.cpu())


def comparison_strip(input_3HW: torch.Tensor, keep_mask_hw: torch.Tensor, images_n3HW: torch.Tensor,
                     gap: int = 4) -> Image.Image:
    """Input | mask | edit 1 | ... | edit n, side by side on white. The mask panel is white where VAR generates
    (the last scale's tokens that are not kept) and black where the input's tokens are kept."""
    _, H, W = input_3HW.shape
    regenerate_11hw = (1 - keep_mask_hw.float().cpu())[None, None]
    mask_3HW = F.interpolate(regenerate_11hw, size=(H, W), mode='nearest')[0].expand(3, H, W)
    panels = [input_3HW.cpu(), mask_3HW] + list(images_n3HW.cpu())
    strip = Image.new('RGB', (len(panels) * W + (len(panels) - 1) * gap, H), (255, 255, 255))
    for i, panel_3HW in enumerate(panels):
        strip.paste(to_pil(panel_3HW), (i * (W + gap), 0))
    return strip
