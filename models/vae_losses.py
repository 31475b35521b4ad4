# Losses of the VQVAE tokenizer of VAR (arXiv 2404.02905, section 3.2: reconstruction + perceptual + GAN + VQ terms):
# a patch discriminator (Isola et al., arXiv 1611.07004), LPIPS-style perceptual distance (Zhang et al., arXiv
# 1801.03924) and the adaptive GAN weight of VQGAN (Esser et al., arXiv 2012.09841, eq. 7).
"""nn.Modules and pure functions for training the tokenizer; nothing here reads files or touches the network.

Shape legend: B batch, C channels, H/W image size, h/w a feature map's size.
Images are in [-1, 1]. `LPIPS` is built with random weights; its VGG16 weights (torchvision's ImageNet state dict,
keys `features.N.*`) and, optionally, the learned per-channel weights of the LPIPS paper (keys `linK.model.1.weight`)
are loaded by the caller with `load_vgg16` / `load_lin`.
"""
import math
from typing import List, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------- discriminator
def _groups(c: int) -> int:
    return math.gcd(32, c)


class PatchDiscriminator(nn.Module):
    """A PatchGAN: strided 4x4 convolutions -> one real/fake logit per overlapping patch, (B, 1, h, w).

    Args:
        in_channels: image channels.
        ch: width of the first layer (doubles per layer, capped at 8x).
        n_layers: number of stride-2 convolutions, the first included (pix2pix's 3 give 30x30 logits at 256 px); two
            stride-1 convolutions follow, so images need at least 2**n_layers * 3 pixels a side (`min_image_size`).
    GroupNorm instead of BatchNorm: no running statistics, so the same numbers under DDP and at any batch size.
    """

    def __init__(self, in_channels: int = 3, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers: List[nn.Module] = [nn.Conv2d(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        c_out = ch
        for n in range(1, n_layers + 1):
            c_in, c_out = c_out, ch * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(_groups(c_out), c_out), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(c_out, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """The DCGAN init: conv weights N(0, std), norm scales N(1, std), biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, std)
                nn.init.zeros_(m.bias)

    @property
    def min_image_size(self) -> int:
        """The smallest image side that still gives one logit (each 4x4 stride-1 convolution with padding 1 loses a
        pixel, each stride-2 one halves)."""
        side = 1
        for m in reversed([m for m in self.main if isinstance(m, nn.Conv2d)]):
            side = side * 2 if m.stride[0] == 2 else side + 1
        return side

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.main(img_B3HW)


def d_loss_fn(kind: str, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss: 'hinge' (mean relu(1 - real) + relu(1 + fake), halved) or 'vanilla' (softplus, halved)."""
    if kind == 'hinge':
        return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
    if kind == 'vanilla':
        return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
    raise ValueError(f"unknown discriminator loss {kind!r} (hinge, vanilla)")


def g_loss_fn(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator's adversarial loss: raise the discriminator's logits on reconstructions."""
    return -logits_fake.mean()


def adaptive_gan_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4, loss_scale: float = 1.0) -> torch.Tensor:
    """||d nll / d W|| / (||d g / d W|| + 1e-4) at the decoder's last weight W, clamped to [0, max_weight], detached.

    It balances the adversarial gradient against the reconstruction gradient where both enter the decoder. Under fp16
    autocast pass the GradScaler's scale as `loss_scale`: both gradients are taken of the scaled losses (small
    reconstruction gradients would otherwise underflow to 0 in fp16) and unscaled before the ratio; where a scaled
    gradient overflows, it is taken again at a 16x smaller scale (down to 1). The step's own backward cannot report
    that overflow to the GradScaler, so without the retry the GAN term would stay off for as long as the scale stays
    high. A ratio that is still non-finite gives 0: the step then ignores the GAN term instead of diverging. Under DDP
    each rank takes the ratio of its own batch's gradients (as VQGAN's code does): the weights differ a little between
    ranks, and the averaged gradient is that of the mean of the ranks' weighted losses.
    """
    nll_grad = _unscaled_grad(nll_loss, last_layer, loss_scale)
    g_grad = _unscaled_grad(g_loss, last_layer, loss_scale)
    w = nll_grad.norm() / (g_grad.norm() + 1e-4)
    w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
    return w.clamp(0.0, max_weight).detach()


def _unscaled_grad(loss: torch.Tensor, weight: torch.Tensor, loss_scale: float) -> torch.Tensor:
    """d loss / d weight in float32, taken of loss * loss_scale; the scale shrinks 16x while the result overflows."""
    while True:
        grad = torch.autograd.grad(loss * loss_scale, weight, retain_graph=True)[0].float()
        if loss_scale <= 1.0 or bool(torch.isfinite(grad).all()):
            return grad / loss_scale
        loss_scale = max(loss_scale / 16, 1.0)


# ------------------------------------------------------------------------------------------------------ perceptual
# VGG16's convolution widths ('M' = 2x2 max-pool); the layout of torchvision's `vgg16().features`, indices included.
VGG16_CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
# The ReLU outputs LPIPS compares (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) as indices into `features`.
VGG16_TAPS = (3, 8, 15, 22, 29)
# LPIPS's input scaling: a [-1, 1] image goes to (x - shift) / scale, the ImageNet statistics in that range.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


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


class LPIPS(nn.Module):
    """Perceptual distance between two image batches in [-1, 1] -> (B,), as in the LPIPS paper.

    Each tapped VGG16 activation is unit-normalised over its channels; the squared differences are weighted per
    channel, averaged over positions and summed over the taps. The weights are the paper's learned `lin` weights once
    `load_lin` is called, else 1 for every channel: the paper's "baseline" variant, a sum over the taps of the
    per-position cosine distance 2 - 2 cos(a, b); it is larger than learned LPIPS, whose weights lie mostly below 1. Every parameter is frozen; the
    module stays in eval mode.
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
            dist_B = dist_B + torch.einsum('bchw,c->b', diff_BChw, w_C.float()) / (diff_BChw.shape[2] * diff_BChw.shape[3])
        return dist_B


# --------------------------------------------------------------------------------------------------------- metrics
def psnr_per_image(a_B3HW: torch.Tensor, b_B3HW: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB of each image pair (B,); images in [0, data_range]."""
    mse_B = (a_B3HW.float() - b_B3HW.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse_B.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-x.square() / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_per_image(a_B3HW: torch.Tensor, b_B3HW: torch.Tensor, data_range: float = 1.0, win: int = 11,
                   sigma: float = 1.5) -> torch.Tensor:
    """SSIM (Wang et al. 2004: Gaussian 11x11 window, sigma 1.5, K1=0.01, K2=0.03, valid positions) per image (B,).

    Computed on each channel and averaged; the window shrinks to the image for images smaller than 11 pixels.
    """
    a, b = a_B3HW.float(), b_B3HW.float()
    C = a.shape[1]
    win = min(win, a.shape[-1], a.shape[-2])
    w_11hw = _gaussian_window(win, sigma, a.device).expand(C, 1, win, win)
    blur = lambda x: F.conv2d(x, w_11hw, groups=C)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------- codebook upkeep
def phi_indices_used(patch_nums: Sequence[int], num_phis: int) -> List[int]:
    """Which of a partially shared quantiser's `num_phis` Phi convolutions the scales select (see quant.py)."""
    from .quant import _nearest_tick, _phi_ticks
    SN = len(patch_nums)
    ticks = _phi_ticks(num_phis)
    return sorted({_nearest_tick(ticks, si / (SN - 1) if SN > 1 else 1.0) for si in range(SN)})


@torch.no_grad()
def dead_code_mask(ema_vocab_hit_SV: torch.Tensor, threshold: float) -> torch.Tensor:
    """Codes whose EMA hit count, summed over all scales, is below `threshold` -> bool (V,)."""
    return ema_vocab_hit_SV.sum(0) < threshold


@torch.no_grad()
def replacement_codes(f_NC: torch.Tensor, n: int, generator: torch.Generator, noise: float = 0.01) -> torch.Tensor:
    """`n` new code vectors: latent vectors drawn from `f_NC` (with replacement when n > N) plus a little noise."""
    N = f_NC.shape[0]
    pick = torch.randint(0, N, (n,), generator=generator, device=generator.device).to(f_NC.device)
    chosen = f_NC[pick]
    jitter = torch.randn(chosen.shape, generator=generator, device=generator.device).to(f_NC.device)
    return chosen + noise * chosen.std() * jitter


__all__ = ['PatchDiscriminator', 'd_loss_fn', 'g_loss_fn', 'adaptive_gan_weight', 'LPIPS', 'psnr_per_image',
           'ssim_per_image', 'phi_indices_used', 'dead_code_mask', 'replacement_codes', 'VGG16_TAPS']
