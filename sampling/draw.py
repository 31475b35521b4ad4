# Implements the sampling protocol of VAR (arXiv 2404.02905), section 5: class-conditional images with CFG, top-k and
# top-p, each drawn with its own seeded generator.
"""Class-conditional images as uint8 arrays, each image with its own generator.

Image k of class c is drawn with a generator seeded from (seed, c, k) (`image_seed`), so the output depends neither on
the number of processes nor on which images share a batch, apart from floating-point round-off between batch sizes or
devices. How they are drawn is one `sampling.settings.SamplingSettings`.
"""
import hashlib
import sys
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

import dist
import models
from models.engine import sampling_engine
from sampling.rejection import sample_best_of
from sampling.settings import SamplingSettings
from utils.runtime import autocast_context


def image_seed(seed: int, cls: int, index: int, candidate: int = 0) -> int:
    """The generator seed of one image: a 63-bit hash of (seed, class, index within the class, candidate)."""
    digest = hashlib.sha256(f'var-sample/{seed}/{cls}/{index}/{candidate}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') & (2 ** 63 - 1)


def to_uint8_BHW3(img_B3HW: torch.Tensor) -> np.ndarray:
    """[0, 1] images -> uint8 HWC: x*255 in float32, truncated (the demo's rule; it multiplies in the tensor's own
    dtype, which under fp16 autocast moves ~4% of pixels by one level)."""
    return img_B3HW.float().permute(0, 2, 3, 1).mul(255).to(torch.uint8).cpu().numpy()


def fast_switches(fast: int, device: torch.device) -> dict:
    """sample.py's --fast level -> the engine's fast-path switches (`SamplingEngine.sample`; CUDA only, none
    elsewhere)."""
    if not fast or device.type != 'cuda':
        return {}
    switches = dict(partial_sort=True, compiled=True, cuda_graph=True)
    if fast >= 2:
        switches['stream_dtype'] = torch.bfloat16
    if fast >= 3:
        switches['cuda_graph'] = 'loop'
    return switches


@torch.inference_mode()
def sample_uint8(var: models.VAR, labels: Sequence[int], seeds: Sequence[int], settings: SamplingSettings,
                 on_scale: Optional[Callable[[int, torch.Tensor], None]] = None) -> np.ndarray:
    """One image per (label, seed) -> uint8 (B, H, W, 3). `on_scale(si, f_hat_BChw)` runs after every scale, inside
    the sampling's inference mode and autocast (see `VAR.autoregressive_infer_cfg`); `settings.seed` is not read
    here (the seeds are given)."""
    device = var.class_emb.weight.device
    label_B = torch.tensor(list(labels), dtype=torch.long, device=device)
    with autocast_context(settings.fp16, device):
        fast = fast_switches(settings.fast, device)
        img_B3HW = sampling_engine(var).sample(len(labels), label_B, g_seed=list(seeds), cfg=settings.cfg,
                                               top_k=settings.top_k, top_p=settings.top_p,
                                               more_smooth=settings.more_smooth, on_scale=on_scale, **fast)
    return to_uint8_BHW3(img_B3HW)


def sample_items(var: models.VAR, items: Sequence[Tuple[int, int]], settings: SamplingSettings,
                 classifier: Optional[torch.nn.Module] = None, candidates: int = 1) -> np.ndarray:
    """Images for (class, index) pairs -> uint8 (B, H, W, 3), image k of class c seeded by image_seed(settings.seed,
    c, k); with a classifier, the best of `candidates` draws."""
    labels = [c for c, _ in items]
    if classifier is None:
        return sample_uint8(var, labels, [image_seed(settings.seed, c, i) for c, i in items], settings)

    def draw(candidate: int) -> np.ndarray:
        return sample_uint8(var, labels, [image_seed(settings.seed, c, i, candidate) for c, i in items], settings)
    return sample_best_of(draw, classifier, labels, candidates)


def progress_bar(total: int) -> tqdm:
    """A bar over `total` images with an ETA, on the first process only."""
    return tqdm(total=total, unit='img', desc='sampling', disable=not dist.is_master(), file=sys.stdout)
