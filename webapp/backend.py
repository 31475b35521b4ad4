# Implements the sampling and zero-shot editing of VAR (arXiv 2404.02905, sections 3.2 and 5) for the web demo.
"""The web demo's work, as plain functions of a loaded model: no Gradio here.

- `generate`: class-conditional images, drawn exactly as sample.py draws them (image k of class c uses the generator
  seed `sampling.draw.image_seed(seed, c, k)`), so a seed shown in the page reproduces with sample.py.
- `scales`: one of those images decoded after every scale (1x1 ... 16x16 tokens for the released models): the
  coarse-to-fine picture of next-scale prediction; the last is exactly the generated image.
- `edit`: zero-shot in-painting, out-painting and class editing through `sampling.editing`, as edit.py does;
  `read_upload` checks an uploaded photo's size from its header before decoding it, and `reconstruction` shows what
  the model's tokenizer makes of it (an edit cannot look closer to the photo than that).

Every user mistake is a ValueError whose message can be shown as it is.
Shape legend: B batch, H/W image size, pn a scale's side; images leave here as uint8 (H, W, 3) arrays.
"""
import contextlib
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import models
from sampling import editing
from sampling.class_names import imagenet_class_names
from sampling.draw import image_seed, sample_uint8, to_uint8_BHW3
from sampling.settings import SamplingSettings

MAX_IMAGES = 16  # per request: CPU sampling is slow, and the queue is shared
MAX_VARIATIONS = 8
MAX_PIXELS = 40_000_000  # a larger upload is refused rather than decoded and resized
UNCONDITIONAL = 'none (unconditional)'
# scikit-image's real photos (no download): the bundled examples of the Edit tab
EXAMPLE_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket')

ScaleHook = Callable[[int, torch.Tensor], None]  # (si, f_hat_BChw), see VAR.autoregressive_infer_cfg


@dataclass
class DemoModel:
    """A loaded (vae, var) pair and what the page says about it."""
    vae: models.VQVAE
    var: models.VAR
    class_names: List[str]
    fp16: int = 1  # the --fp16 code: CUDA autocast dtype (the CPU runs float32)
    source: str = ''
    choices: List[str] = field(init=False)

    def __post_init__(self) -> None:
        self.choices = [display_name(i, name) for i, name in enumerate(self.class_names)]

    @property
    def vocabulary(self) -> int:
        return self.var.V

    def domain_note(self) -> str:
        """What the model was trained on, as the Edit tab says it: a model that did not learn ImageNet's 1000 classes
        has a tokenizer that reconstructs other photos poorly, and an edit cannot look closer than that."""
        size, n = self.image_size, len(self.class_names)
        if n == 1000 and self.class_names == imagenet_class_names():
            return (f'This model learned ImageNet\'s 1000 classes at {size} px: photos of other kinds of scenes are '
                    f'reconstructed less faithfully (see the tokenizer\'s reconstruction below the photo).')
        shown = ', '.join(self.choices[:4]) + (', ...' if n > 4 else '')
        return (f'This model learned only {n} classes ({shown}) at {size} px. Its tokenizer was trained on such '
                f'images too: a photo unlike them is reconstructed poorly (see the tokenizer\'s reconstruction below '
                f'the photo), and the edits cannot look closer to the photo than that reconstruction.')

    @property
    def device(self) -> torch.device:
        return self.var.class_emb.weight.device

    @property
    def image_size(self) -> int:
        return self.vae.image_size


def display_name(cls: int, name: str) -> str:
    """A class's entry in the page's lists: 'id: name', with the id once ('0: tshirt_top' for a class folder named
    '0_tshirt_top'; '3' for the placeholder name 'class 3')."""
    m = re.fullmatch(rf'(?:class[\s_]*)?0*{cls}(?:[\s_.:-]+(.*))?', name.strip(), flags=re.IGNORECASE)
    if m is None:
        return f'{cls}: {name}'
    return f'{cls}: {m.group(1)}' if m.group(1) else str(cls)


def whole_number(value: Union[str, int, float, None], what: str) -> int:
    """A number field's value -> int; ValueError for what is not a finite whole number (2.5, inf, 1e400, text)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f'{what} must be a whole number, got {value!r}') from None
    if not math.isfinite(number) or not number.is_integer():
        raise ValueError(f'{what} must be a whole number, got {value}')
    return int(number)


def parse_class(value: Union[str, int, float, None], num_classes: int, allow_none: bool = False) -> Optional[int]:
    """A class picker's value ('291: lion', '291' or 291) -> the class id; the unconditional entry -> None."""
    if value is None or (isinstance(value, str) and value.strip() in ('', UNCONDITIONAL)):
        if allow_none:
            return None
        raise ValueError('pick a class')
    text = str(value).split(':', 1)[0].strip()
    try:
        cls = whole_number(text, 'class')
    except ValueError:
        raise ValueError(f'class {value!r}: expected a class id (a whole number) or a "id: name" entry of the '
                         f'list') from None
    if not 0 <= cls < num_classes:
        raise ValueError(f'class {cls} is out of range: this model has classes 0..{num_classes - 1}')
    return cls


# ----------------------------------------------------------------------------------------------------------- sampling
def sampling_settings(model: DemoModel, seed, cfg, top_k, top_p, more_smooth) -> SamplingSettings:
    """The page's sampling controls as the settings sample.py would build from the same flags (checked as it checks
    them, and top-k within the model's vocabulary)."""
    top_k = whole_number(top_k, 'top-k')
    if not top_k <= model.vocabulary:
        raise ValueError(f'top-k must lie in 0..{model.vocabulary} (the size of this model\'s vocabulary), got {top_k}')
    if seed is None:
        raise ValueError('seed must be a whole number in 0..2^63-1, got nothing')
    return SamplingSettings(cfg=float(cfg), top_k=top_k, top_p=float(top_p), more_smooth=bool(more_smooth),
                            seed=whole_number(seed, 'seed'), fp16=model.fp16, fast=0)


def generate(model: DemoModel, cls: int, num_images: int, seed: int, cfg: float, top_k: int, top_p: float,
             more_smooth: bool, on_scale: Optional[ScaleHook] = None) -> np.ndarray:
    """Images 0..num_images-1 of class `cls` -> uint8 (B, H, W, 3); the same as
    `sample.py --classes cls,cls,... --seed seed` with these settings (one batch, as sample.py's --bs 25 draws them)."""
    if not 1 <= whole_number(num_images, 'number of images') <= MAX_IMAGES:
        raise ValueError(f'number of images must lie in 1..{MAX_IMAGES}, got {num_images}')
    cls = parse_class(cls, model.var.num_classes)
    settings = sampling_settings(model, seed, cfg, top_k, top_p, more_smooth)
    seeds = [image_seed(settings.seed, cls, k) for k in range(int(num_images))]
    return sample_uint8(model.var, [cls] * len(seeds), seeds, settings, on_scale=on_scale)


def scales(model: DemoModel, cls: int, num_images: int, index: int, seed: int, cfg: float, top_k: int, top_p: float,
           more_smooth: bool, on_scale: Optional[ScaleHook] = None) -> List[np.ndarray]:
    """Image `index` of `generate(model, cls, num_images, ...)` after every scale -> one uint8 (H, W, 3) per scale,
    coarse to fine. The whole batch is drawn again, as generate draws it, so that the last entry is exactly that
    gallery image (a batch of another size may round differently); the earlier ones decode its cumulative latent."""
    if not 0 <= whole_number(index, 'image') < int(num_images):
        raise ValueError(f'image {index} is not among the {num_images} generated images (0..{int(num_images) - 1})')
    row = int(index)
    decoded: List[np.ndarray] = []

    def decode(si: int, f_hat_BChw: torch.Tensor) -> None:
        if si < len(model.var.patch_nums) - 1:  # the last one is the sample itself, decoded by the sampling
            # the plain path's decode: [-1, 1] -> [0, 1]
            img_13HW = model.vae.fhat_to_img(f_hat_BChw[row:row + 1]).add_(1).mul_(0.5)
            decoded.append(to_uint8_BHW3(img_13HW)[0])
        if on_scale is not None:
            on_scale(si, f_hat_BChw)

    imgs = generate(model, cls, num_images, seed, cfg, top_k, top_p, more_smooth, on_scale=decode)
    return decoded + [imgs[row]]


# ----------------------------------------------------------------------------------------------------------- editing
def check_photo(img: Image.Image) -> None:
    if img.width * img.height > MAX_PIXELS:
        raise ValueError(f'the image is {img.width}x{img.height} pixels, more than this demo takes '
                         f'({MAX_PIXELS // 1_000_000} megapixels); scale it down first')
    if min(img.size) < 8:
        raise ValueError(f'the image is {img.width}x{img.height} pixels: too small to edit')


@contextlib.contextmanager
def _quiet_bomb_warning() -> Iterator[None]:
    """PIL warns on opening an image above its own pixel limit; the size check after the open says it to the user."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        yield


def read_upload(path: str) -> np.ndarray:
    """An uploaded photo file -> uint8 (H, W, 3). Its size is read from the header first: a photo above MAX_PIXELS
    is refused before a pixel is decoded (a 12000x12000 PNG can be a few hundred KB on disk and 430 MB decoded)."""
    name = os.path.basename(path)
    try:
        with _quiet_bomb_warning(), Image.open(path) as img:  # the header only
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise ValueError(f'{name} is {width}x{height} pixels, more than this demo takes '
                                 f'({MAX_PIXELS // 1_000_000} megapixels); scale it down first')
            img.load()
            photo = img.convert('RGB')
    except UnidentifiedImageError:
        raise ValueError(f'{name} is not an image (PNG, JPEG, WebP, ...)') from None
    except Image.DecompressionBombError as e:
        raise ValueError(f'{name} is too large: {e}') from None
    except OSError as e:  # truncated or otherwise broken
        raise ValueError(f'{name} cannot be read as an image ({type(e).__name__}: {e})') from None
    check_photo(photo)
    return np.asarray(photo)


def check_upload_header(path: str) -> None:
    """Raise ValueError when the image file at `path` declares more than MAX_PIXELS (reads the header only); files
    PIL cannot identify are left to the decoder's own message."""
    try:
        with _quiet_bomb_warning(), Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        return
    if width * height > MAX_PIXELS:
        raise ValueError(f'the image is {width}x{height} pixels, more than this demo takes '
                         f'({MAX_PIXELS // 1_000_000} megapixels); scale it down first')


def reconstruction(model: DemoModel, photo: Image.Image) -> np.ndarray:
    """The photo as the model sees it (fitted to its size) after its tokenizer's encode and decode: the closest any
    edit can come to it -> uint8 (size, size, 3)."""
    x_13HW = editing.pil_to_tensor(editing.fit_to_model(photo.convert('RGB'), model.image_size)).to(model.device)
    with torch.no_grad():
        img_13HW = model.vae.img_to_reconstructed_img(x_13HW.mul(2).sub(1), model.var.patch_nums, last_one=True)
    return to_uint8_BHW3(img_13HW.add(1).mul(0.5))[0]


def example_photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photos (EXAMPLE_PHOTOS) as uint8 (H, W, 3)."""
    if name not in EXAMPLE_PHOTOS:
        raise ValueError(f'example photo must be one of {", ".join(EXAMPLE_PHOTOS)}, got {name!r}')
    from skimage import data as photos
    return np.asarray(getattr(photos, name)())


def _as_image(value, what: str, mode: str) -> Optional[Image.Image]:
    """An editor's image (array, PIL image or file path; None stays None) -> PIL image in `mode`."""
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.dtype != np.uint8:
        raise ValueError(f'{what}: expected uint8 pixels, got {value.dtype}')
    return editing.read_image(value, what=what, mode=mode)


def editor_region(value: Optional[dict]) -> Tuple[Image.Image, Optional[np.ndarray]]:
    """An image editor's value {'background', 'layers', 'composite'} -> (the photo, the painted region or None).

    The region is every pixel that any layer paints (alpha > 0), as a uint8 (H, W) map with 255 inside, at the
    photo's size (a layer of another size is resized to it)."""
    if not isinstance(value, dict) or value.get('background') is None:
        raise ValueError('no photo: upload one or pick an example photo')
    photo = _as_image(value['background'], 'photo', 'RGBA')
    check_photo(photo)
    painted: Optional[np.ndarray] = None
    for i, layer in enumerate(value.get('layers') or []):
        alpha = _as_image(layer, f'brush layer {i}', 'RGBA').getchannel('A')
        if alpha.size != photo.size:
            alpha = alpha.resize(photo.size, Image.Resampling.NEAREST)
        inside = np.asarray(alpha) > 0
        painted = inside if painted is None else painted | inside
    region = None if painted is None or not painted.any() else painted.astype(np.uint8) * 255
    # a transparent photo is flattened on white, as the editor shows it
    flat = Image.alpha_composite(Image.new('RGBA', photo.size, 'white'), photo).convert('RGB')
    return flat, region


def parse_box(text: Optional[str]) -> Optional[Tuple[float, float, float, float]]:
    """'y0,x0,y1,x1' (relative, of the centre-cropped square) -> the box; empty -> None."""
    if text is None or not str(text).strip():
        return None
    try:
        values = tuple(float(v) for v in str(text).replace(' ', '').split(','))
    except ValueError:
        raise ValueError(f'box: expected four numbers y0,x0,y1,x1 in [0, 1], got {text!r}') from None
    editing.box_region((1,), values)  # checks the count and the ranges
    return values  # type: ignore[return-value]


def edit(model: DemoModel, photo: Image.Image, region: Optional[np.ndarray], box: Optional[Sequence[float]],
         mode: str, cls: Optional[int], num_samples: int, seed: int, cfg: float, top_k: int, top_p: float,
         more_smooth: bool) -> editing.EditResult:
    """Zero-shot edit of `photo` through `sampling.editing.zero_shot_edit` (edit.py's path): the painted `region`
    (uint8 (H, W), 255 inside, at the photo's size) or else the relative `box`; `cls` None = unconditional."""
    if mode not in editing.MODES:
        raise ValueError(f'mode must be one of {", ".join(editing.MODES)}, got {mode!r}')
    if region is None and box is None:
        raise ValueError('no region: paint over the part of the photo to edit with the brush, or give a box')
    if not 1 <= int(num_samples) <= MAX_VARIATIONS:
        raise ValueError(f'number of variations must lie in 1..{MAX_VARIATIONS}, got {num_samples}')
    check_photo(photo)
    return editing.zero_shot_edit(
        model.vae, model.var, photo, mode=mode, box=box, mask=region, class_label=cls, num_samples=int(num_samples),
        settings=sampling_settings(model, seed, cfg, top_k, top_p, more_smooth))


def edit_images(result: editing.EditResult) -> Tuple[List[np.ndarray], np.ndarray]:
    """An edit's variations and its input | mask | edits strip as uint8 (H, W, 3) arrays."""
    variations = [np.asarray(editing.to_pil(img_3HW)) for img_3HW in result.images_n3HW]
    return variations, np.asarray(result.strip())
