# The perceptual term of VAR's tokenizer loss (arXiv 2404.02905, section 3.2): LPIPS on VGG16 features (Zhang et al.,
# arXiv 1801.03924, section 3: unit-normalised activations, per-channel weights, spatial mean, sum over layers).
"""The LPIPS perceptual distance on VGG16, and where its learned per-channel weights are found.

Shape legend: B batch, C channels, H/W image size, h/w a feature map's size. Images are in [-1, 1].
`LPIPS()` is built with random VGG16 weights and weight 1 per channel (the paper's uncalibrated "baseline"); the caller
loads torchvision's ImageNet VGG16 state dict (keys `features.N.*`) with `load_vgg16` and, for the calibrated
distance, the learned per-channel weights (keys `linK.model.1.weight`) with `load_lin`. The `lpips` package ships the
learned ones in its wheel: `shipped_lin_file()` finds that file without importing the package's code.
"""
import importlib.util
import os
from typing import List, Mapping

import torch
import torch.nn as nn

# VGG16's convolution widths ('M' = 2x2 max-pool); the layout of torchvision's `vgg16().features`, indices included.
VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
# The ReLU outputs LPIPS compares (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) as indices into `features`.
VGG16_TAPS = (3, 8, 15, 22, 29)
# LPIPS's input scaling: a [-1, 1] image goes to (x - shift) / scale, the ImageNet statistics in that range.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# The learned VGG weights (version 0.1 of the paper's release) inside the installed `lpips` package.
LPIPS_PACKAGE = 'lpips'
LPIPS_PACKAGE_LIN = ('weights', 'v0.1', 'vgg.pth')


def _vgg16_features() -> nn.Sequential:
    layers: List[nn.Module] = []
    c_in = 3
    for v in VGG16_CFG:
        if v == 'M':
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            c_in = v
    return nn.Sequential(*layers)


def _unit_channels(x_BChw: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # vector_norm's gradient at a zero vector is 0, where sqrt(sum of squares) gives NaN (an all-zero ReLU position)
    return x_BChw / (torch.linalg.vector_norm(x_BChw, dim=1, keepdim=True) + eps)


def shipped_lin_file() -> str:
    """The path of the learned VGG per-channel weights in the installed `lpips` package (`weights/v0.1/vgg.pth`).

    Only the package's location is looked up (its code is not imported: it would build its own VGG16 through
    torchvision's deprecated API). Raises FileNotFoundError when the package or the file is missing.
    """
    spec = importlib.util.find_spec(LPIPS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the calibrated LPIPS needs the '{LPIPS_PACKAGE}' package, which ships its learned "
                                f"weights: pip install -r requirements.txt (or pass --lpips_lin=PATH, or "
                                f"--lpips_lin=none for the uncalibrated baseline)")
    path = os.path.join(list(spec.submodule_search_locations)[0], *LPIPS_PACKAGE_LIN)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the '{LPIPS_PACKAGE}' package has no {'/'.join(LPIPS_PACKAGE_LIN)} (expected "
                                f"{path}); reinstall it with pip install -r requirements.txt")
    return path


class LPIPS(nn.Module):
    """Perceptual distance between two image batches in [-1, 1] -> (B,), as in the LPIPS paper.

    Each tapped VGG16 activation is unit-normalised over its channels; the squared differences are weighted per
    channel, averaged over positions and summed over the taps. The weights are the paper's learned `lin` weights once
    `load_lin` is called, else 1 for every channel: the paper's "baseline" variant, a sum over the taps of the
    per-position cosine distance 2 - 2 cos(a, b); it is larger than learned LPIPS, whose weights lie mostly below 1.
    Every parameter is frozen; the module stays in eval mode.
    """

    def __init__(self):
        super().__init__()
        self.features = _vgg16_features()
        self.register_buffer('shift_1311', torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('scale_1311', torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        widths = [self.features[i - 1].out_channels for i in VGG16_TAPS]
        self.lin = nn.ParameterList([nn.Parameter(torch.ones(c)) for c in widths])  # the baseline's weights
        self.has_learned_lin = False
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> 'LPIPS':
        return super().train(False)  # a fixed metric: never in training mode

    def extra_repr(self) -> str:
        return f"lin={'learned' if self.has_learned_lin else 'uniform'}"

    def load_vgg16(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """torchvision's VGG16 state dict (the `features.*` entries; the classifier is ignored)."""
        own = {k for k in self.features.state_dict()}
        feats = {k[len('features.'):]: v for k, v in state_dict.items() if k.startswith('features.')}
        missing = sorted(own - set(feats))
        if missing:
            raise ValueError(f'not a torchvision VGG16 state dict: missing {["features." + k for k in missing[:4]]}')
        self.features.load_state_dict({k: feats[k] for k in own}, strict=True)

    def load_lin(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """The LPIPS paper's per-channel weights (`lin{k}.model.1.weight`, shape (1, C, 1, 1), k = 0..4)."""
        for k, p in enumerate(self.lin):
            key = f'lin{k}.model.1.weight'
            if key not in state_dict:
                raise ValueError(f'not an LPIPS linear-layer state dict: no {key}')
            p.data.copy_(state_dict[key].reshape(-1).to(p))
        self.has_learned_lin = True

    def taps(self, img_B3HW: torch.Tensor) -> List[torch.Tensor]:
        h = (img_B3HW - self.shift_1311) / self.scale_1311
        out = []
        for i, layer in enumerate(self.features[:VGG16_TAPS[-1] + 1]):
            h = layer(h)
            if i in VGG16_TAPS:
                out.append(h)
        return out

    def forward(self, a_B3HW: torch.Tensor, b_B3HW: torch.Tensor) -> torch.Tensor:
        dist_B = a_B3HW.new_zeros(a_B3HW.shape[0], dtype=torch.float32)
        for w_C, fa, fb in zip(self.lin, self.taps(a_B3HW), self.taps(b_B3HW)):
            diff_BChw = (_unit_channels(fa.float()) - _unit_channels(fb.float())).square()  # fp32: small differences
            hw = diff_BChw.shape[2] * diff_BChw.shape[3]
            dist_B = dist_B + torch.einsum('bchw,c->b', diff_BChw, w_C.float()) / hw
        return dist_B


__all__ = ['LPIPS', 'VGG16_TAPS', 'shipped_lin_file']
