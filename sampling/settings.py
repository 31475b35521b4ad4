"""How images are drawn, as values checked once where they are made.

`SamplingSettings` is what every sampling call needs (sample.py's flags of the same names); `FidExportJob` is the FID
export's whole job. The scripts (sample.py, edit.py, app.py through webapp/backend.py, the offline demo) build them
from their inputs; nothing below them reads a command line.
"""
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from models.helpers import check_sampling_settings


@dataclass(frozen=True)
class SamplingSettings:
    """cfg, top_k, top_p, more_smooth: `VAR.autoregressive_infer_cfg`'s (0 turns top-k / top-p off); seed: the base
    of every image's own generator seed (`sampling.draw.image_seed`; an edit's variation i: seed + i); fp16: the CUDA
    autocast code (0 float32, 1 fp16, 2 bf16; the CPU samples in float32); fast: sample.py's --fast level (CUDA fast
    paths, `sampling.draw.fast_switches`). The defaults are sample.py's: the official FID settings. ValueError when a
    value is out of range."""
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    more_smooth: bool = False
    seed: int = 0
    fp16: int = 1
    fast: int = 0

    def __post_init__(self) -> None:
        check_sampling_settings(self.cfg, self.top_k, self.top_p)
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2 ** 63):
            raise ValueError(f'seed must be a whole number in 0..2^63-1, got {self.seed}')
        if self.fp16 not in (0, 1, 2):
            raise ValueError(f'fp16 must be 0 (float32), 1 (fp16) or 2 (bf16), got {self.fp16}')
        if self.fast not in (0, 1, 2, 3):
            raise ValueError(f'fast must be 0, 1, 2 or 3, got {self.fast}')


@dataclass(frozen=True)
class Rejection:
    """Classifier rejection sampling: a torchvision classifier (`arch`, its state dict `ckpt`) keeps the best of
    `candidates` images drawn per kept one."""
    arch: str
    ckpt: str
    candidates: int

    def __post_init__(self) -> None:
        if self.candidates < 1:
            raise ValueError(f'candidates must be at least 1, got {self.candidates}')


@dataclass(frozen=True)
class FidExportJob:
    """The FID export (sampling/fid_export.py): `per_class` images of each of `classes` (None: all) as PNGs in `out`
    and one `npz`, drawn `bs` at a time per process. `model` names the weights in the manifest
    (`fid_export.model_identity`); `tf32` is the CUDA matmul setting the images were drawn with."""
    out: str
    npz: str
    per_class: int
    bs: int
    sampling: SamplingSettings
    model: Dict[str, str] = field(default_factory=dict)
    classes: Optional[Tuple[int, ...]] = None
    rejection: Optional[Rejection] = None
    tf32: bool = True

    def __post_init__(self) -> None:
        if min(self.per_class, self.bs) < 1:
            raise ValueError(f'per_class and bs must be at least 1, got {self.per_class} and {self.bs}')
