# The adversarial part of VAR's tokenizer loss (arXiv 2404.02905, section 3.2): a patch discriminator (Isola et al.,
# arXiv 1611.07004), its hinge / vanilla losses and the adaptive GAN weight of VQGAN (Esser et al., arXiv 2012.09841,
# eq. 7).
"""The patch discriminator, the discriminator and generator losses, and VQGAN's adaptive GAN weight.

Shape legend: B batch, H/W image size, h/w the discriminator's logit map. Images are in [-1, 1].
"""
import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F


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


__all__ = ['PatchDiscriminator', 'd_loss_fn', 'g_loss_fn', 'adaptive_gan_weight']
