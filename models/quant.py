# Implements the multi-scale residual quantiser of VAR (arXiv 2404.02905, Algorithms 1-2).
"""VectorQuantizer2: one codebook shared by all scales, with the Phi residual convolutions.

Shape legend: B batch, C = Cvae code width, H/W latent size (= last patch num), ph/pw one scale's size,
l = ph*pw tokens of one scale, N rows of code vectors, V vocabulary, SN number of scales, si scale index.

Interpolation conventions used throughout: "area" down (adaptive average pooling), "bicubic" up
(align_corners=False); both are skipped at the last scale, whose size is the latent's.
"""
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F


class Phi(nn.Conv2d):
    """3x3 refiner blended with its input: h*(1-r) + conv(h)*r."""

    def __init__(self, embed_dim: int, quant_resi: float):
        super().__init__(in_channels=embed_dim, out_channels=embed_dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


def _phi_ticks(K: int) -> np.ndarray:
    # float64 ticks decide which Phi serves which scale; ties are resolved by float64 rounding (as the official code)
    if K == 4:
        return np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K)
    return np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)


def _nearest_tick(ticks: np.ndarray, at_from_0_to_1: float) -> int:
    return int(np.argmin(np.abs(ticks - at_from_0_to_1)).item())


class PhiShared(nn.Module):
    """One Phi for every scale (share_quant_resi=1)."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, _: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """K Phis spread over the scales (share_quant_resi=K>=2; official K=4)."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = _phi_ticks(len(qresi_ls))

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return self.qresi_ls[_nearest_tick(self.ticks, at_from_0_to_1)]

    def extra_repr(self) -> str:
        return f'ticks={self.ticks}'


class PhiNonShared(nn.ModuleList):
    """One Phi per scale (share_quant_resi=0); keys are `quant_resi.{k}`."""

    def __init__(self, qresi: List[nn.Module]):
        super().__init__(qresi)
        self.ticks = _phi_ticks(len(qresi))

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return super().__getitem__(_nearest_tick(self.ticks, at_from_0_to_1))

    def extra_repr(self) -> str:
        return f'ticks={self.ticks}'


def _make_phi(Cvae: int, quant_resi: float) -> nn.Module:
    return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()


def area_down(f_BChw: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    return F.interpolate(f_BChw, size=(ph, pw), mode='area')


def bicubic_up(h_BChw: torch.Tensor, H: int, W: int) -> torch.Tensor:
    return F.interpolate(h_BChw, size=(H, W), mode='bicubic')


class VectorQuantizer2(nn.Module):
    """Multi-scale residual quantiser.

    Args:
        vocab_size: V codebook entries of width Cvae, shared by all scales.
        using_znorm: cosine nearest neighbour instead of L2 (False in VAR).
        beta: weight of the commitment term.
        default_qresi_counts: number of non-shared Phis (0 -> one per scale).
        v_patch_nums: the scales' side lengths, coarse to fine.
        quant_resi: Phi blend ratio r (|r| <= 1e-6 disables Phi).
        share_quant_resi: 0 non-shared, 1 shared, n >= 2 partially shared with n Phis.
    """

    def __init__(self, vocab_size: int, Cvae: int, using_znorm: bool, beta: float = 0.25,
                 default_qresi_counts: int = 0, v_patch_nums: Sequence[int] = None, quant_resi: float = 0.5,
                 share_quant_resi: int = 4):
        super().__init__()
        self.vocab_size, self.Cvae, self.using_znorm = vocab_size, Cvae, using_znorm
        self.v_patch_nums = tuple(v_patch_nums)
        self.quant_resi_ratio = quant_resi
        if share_quant_resi == 0:
            K = default_qresi_counts or len(self.v_patch_nums)
            self.quant_resi = PhiNonShared([_make_phi(Cvae, quant_resi) for _ in range(K)])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(_make_phi(Cvae, quant_resi))
        else:
            phis = nn.ModuleList([_make_phi(Cvae, quant_resi) for _ in range(share_quant_resi)])
            self.quant_resi = PhiPartiallyShared(phis)

        self.register_buffer('ema_vocab_hit_SV', torch.full((len(self.v_patch_nums), self.vocab_size), fill_value=0.0))
        self.record_hit = 0
        self.beta = beta
        self.embedding = nn.Embedding(self.vocab_size, self.Cvae)
        self.prog_si = -1  # progressive training: -1 means all scales

    def eini(self, eini: float) -> None:
        """Optional codebook init: truncated normal (eini > 0) or uniform +-|eini|/V (eini < 0)."""
        if eini > 0:
            nn.init.trunc_normal_(self.embedding.weight.data, std=eini)
        elif eini < 0:
            self.embedding.weight.data.uniform_(-abs(eini) / self.vocab_size, abs(eini) / self.vocab_size)

    def extra_repr(self) -> str:
        return f'{self.v_patch_nums}, znorm={self.using_znorm}, beta={self.beta}, quant_resi={self.quant_resi_ratio}'

    def phi(self, si: int, SN: int) -> nn.Module:
        """The Phi serving scale `si` of `SN` (indexed by si/(SN-1) in [0, 1])."""
        return self.quant_resi[si / (SN - 1) if SN > 1 else 1.0]

    # ------------------------------------------------------------------ nearest neighbour
    def nearest_idx(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of z_NC (float32; no gradient through distances)."""
        E_VC = self.embedding.weight.data
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(E_VC.T, dim=0), dim=1)
        d_NV = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(E_VC.square(), dim=1, keepdim=False)
        d_NV.addmm_(z_NC, E_VC.T, alpha=-2, beta=1)
        return torch.argmin(d_NV, dim=1)

    # ------------------------------------------------------------------ training (VQVAE.forward)
    def forward(self, f_BChw: torch.Tensor,
                ret_usages: bool = False) -> Tuple[torch.Tensor, Optional[List[float]], torch.Tensor]:
        """Quantise at every scale with straight-through gradients -> (f_hat, usages or None, mean vq loss)."""
        f_BChw = f_BChw.float()
        B, C, H, W = f_BChw.shape
        f_no_grad = f_BChw.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        distributed = tdist.is_available() and tdist.is_initialized()
        SN = len(self.v_patch_nums)
        mean_vq_loss = torch.zeros((), device=f_BChw.device)
        with torch.autocast(f_BChw.device.type, enabled=False):
            for si, pn in enumerate(self.v_patch_nums):
                last = si == SN - 1
                z_BChw = f_rest if last else area_down(f_rest, pn, pn)
                idx_N = self.nearest_idx(z_BChw.permute(0, 2, 3, 1).reshape(-1, C))
                hit_V = idx_N.bincount(minlength=self.vocab_size).float()
                if self.training and distributed:
                    tdist.all_reduce(hit_V)

                h_BChw = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
                h_BChw = (h_BChw if last else bicubic_up(h_BChw, H, W)).contiguous()
                h_BChw = self.phi(si, SN)(h_BChw)
                f_hat = f_hat + h_BChw  # out of place: gradients reach the codebook and Phi
                f_rest -= h_BChw

                # Usage statistics. The official code only updates them under torch.distributed; we also
                # update them in one process (a buffer only: outputs and losses are unchanged).
                if self.training:
                    self._record_hits(si, hit_V)
                mean_vq_loss = mean_vq_loss + F.mse_loss(f_hat.data, f_BChw).mul_(self.beta) \
                    + F.mse_loss(f_hat, f_no_grad)

            mean_vq_loss = mean_vq_loss * (1.0 / SN)
            f_hat = (f_hat.data - f_no_grad).add_(f_BChw)  # straight-through: value f_hat, identity gradient

        usages = None
        if ret_usages:
            world_size = tdist.get_world_size() if distributed else 1
            margin = world_size * (f_BChw.numel() / f_BChw.shape[1]) / self.vocab_size * 0.08
            usages = [(self.ema_vocab_hit_SV[si] >= margin).float().mean().item() * 100 for si in range(SN)]
        return f_hat, usages, mean_vq_loss

    @torch.no_grad()
    def _record_hits(self, si: int, hit_V: torch.Tensor) -> None:
        if si >= self.ema_vocab_hit_SV.shape[0]:
            return
        if self.record_hit == 0:
            self.ema_vocab_hit_SV[si].copy_(hit_V)
        elif self.record_hit < 100:
            self.ema_vocab_hit_SV[si].mul_(0.9).add_(hit_V.mul(0.1))
        else:
            self.ema_vocab_hit_SV[si].mul_(0.99).add_(hit_V.mul(0.01))
        self.record_hit += 1  # counts scales, not steps (official behaviour)

    # ------------------------------------------------------------------ tokenisation
    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool,
                           v_patch_nums: Optional[Sequence[Union[int, Tuple[int, int]]]] = None) -> List[torch.Tensor]:
        """Latent -> per-scale token ids (B, ph*pw) int64, or the cumulative f_hat (B,C,H,W) after each scale."""
        B, C, H, W = f_BChw.shape
        f_no_grad = f_BChw.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        patch_hws = [(pn, pn) if isinstance(pn, int) else (pn[0], pn[1]) for pn in (v_patch_nums or self.v_patch_nums)]
        if patch_hws[-1] != (H, W):
            raise ValueError(f'the last patch num {patch_hws[-1]} must equal the latent size {(H, W)}')
        SN = len(patch_hws)
        out: List[torch.Tensor] = []
        for si, (ph, pw) in enumerate(patch_hws):
            if 0 <= self.prog_si < si:
                break
            last = si == SN - 1
            z_BChw = f_rest if last else area_down(f_rest, ph, pw)
            idx_N = self.nearest_idx(z_BChw.permute(0, 2, 3, 1).reshape(-1, C))
            h_BChw = self.embedding(idx_N.view(B, ph, pw)).permute(0, 3, 1, 2)
            h_BChw = (h_BChw if last else bicubic_up(h_BChw, H, W)).contiguous()
            h_BChw = self.phi(si, SN)(h_BChw)
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
            out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, ph * pw))
        return out

    # ------------------------------------------------------------------ decoding helpers
    def embed_to_fhat(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool = True,
                      last_one: bool = False) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Per-scale code maps (B,C,pn,pn) -> cumulative f_hat after each scale (or only the last)."""
        ls_f_hat_BChw = []
        B = ms_h_BChw[0].shape[0]
        H = W = self.v_patch_nums[-1]
        SN = len(self.v_patch_nums)
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, H, W, dtype=torch.float32)
            for si, pn in enumerate(self.v_patch_nums):
                h_BChw = ms_h_BChw[si]
                if si < SN - 1:
                    h_BChw = bicubic_up(h_BChw, H, W)
                f_hat.add_(self.phi(si, SN)(h_BChw))
                if not last_one:
                    ls_f_hat_BChw.append(f_hat.clone())
        else:
            # experimental (official): grow f_hat scale by scale instead of working at the largest size
            pn0 = self.v_patch_nums[0]
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, pn0, pn0, dtype=torch.float32)
            for si, pn in enumerate(self.v_patch_nums):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode='bicubic')
                f_hat.add_(self.phi(si, SN)(ms_h_BChw[si]))
                if not last_one:
                    ls_f_hat_BChw.append(f_hat)
        return f_hat if last_one else ls_f_hat_BChw

    # ------------------------------------------------------------------ VAR teacher forcing and inference
    def idxBl_to_var_input(self, gt_ms_idx_Bl: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """Ground-truth ids -> VAR's teacher-forcing input (B, L - first_l, Cvae) float32, or None (prog_si == 0)."""
        next_scales = []
        B = gt_ms_idx_Bl[0].shape[0]
        C = self.Cvae
        H = W = self.v_patch_nums[-1]
        SN = len(self.v_patch_nums)
        f_hat = gt_ms_idx_Bl[0].new_zeros(B, C, H, W, dtype=torch.float32)
        pn_next = self.v_patch_nums[0]
        for si in range(SN - 1):
            if self.prog_si == 0 or (0 <= self.prog_si - 1 < si):
                break
            h_BChw = self.embedding(gt_ms_idx_Bl[si]).transpose(1, 2).reshape(B, C, pn_next, pn_next)
            f_hat.add_(self.phi(si, SN)(bicubic_up(h_BChw, H, W)))
            pn_next = self.v_patch_nums[si + 1]
            next_scales.append(area_down(f_hat, pn_next, pn_next).view(B, C, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1) if next_scales else None

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor,
                                      h_BChw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add scale si's codes to f_hat in place -> (f_hat, next scale's input map or f_hat at the last)."""
        HW = self.v_patch_nums[-1]
        if si != SN - 1:
            f_hat.add_(self.phi(si, SN)(bicubic_up(h_BChw, HW, HW)))
            pn = self.v_patch_nums[si + 1]
            return f_hat, area_down(f_hat, pn, pn)
        f_hat.add_(self.phi(si, SN)(h_BChw))
        return f_hat, f_hat
