# Reconstruction metrics of VAR's tokenizer (arXiv 2404.02905, section 3.2): PSNR, and SSIM (Wang et al., IEEE TIP
# 2004).
"""PSNR and SSIM of each image pair of two batches, (B,); images in [0, data_range]."""
import torch
import torch.nn.functional as F


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


__all__ = ['psnr_per_image', 'ssim_per_image']
