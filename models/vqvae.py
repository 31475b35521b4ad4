# Implements the multi-scale VQVAE tokenizer of VAR (arXiv 2404.02905, section 3.2).
"""VQVAE: encoder -> quant_conv -> multi-scale residual quantiser -> post_quant_conv -> decoder.

Shape legend: B batch, C = Cvae, H/W image size, h/w latent size, l tokens of one scale.
Images are in [-1, 1] on the way in; the image-returning helpers clamp to [-1, 1].
"""
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .basic_vae import Decoder, Encoder
from .inspect_ckpt import describe_mismatch, describe_vae_fit
from .quant import VectorQuantizer2

OFFICIAL_CH_MULT = (1, 1, 2, 2, 4)



def downsample_factor(ch_mult: Sequence[int]) -> int:
    """Image pixels per token side of a VQVAE with these channel multipliers (one halving per level after the first):
    16 for the official (1, 1, 2, 2, 4)."""
    return 2 ** (len(ch_mult) - 1)

class VQVAE(nn.Module):
    """Args follow the official constructor; `ch_mult` is our extension (default: the official 16x downsampling)."""

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 128, dropout: float = 0.0,
                 beta: float = 0.25, using_znorm: bool = False, quant_conv_ks: int = 3, quant_resi: float = 0.5,
                 share_quant_resi: int = 4, default_qresi_counts: int = 0,
                 v_patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), test_mode: bool = True,
                 ch_mult: Sequence[int] = OFFICIAL_CH_MULT):
        super().__init__()
        self.test_mode = test_mode
        self.V, self.Cvae = vocab_size, z_channels
        self.vocab_size = vocab_size
        self.ch, self.ch_mult = ch, tuple(ch_mult)
        self.v_patch_nums = tuple(v_patch_nums)
        # everything needed to rebuild this model; travels with our checkpoints
        self.config: Dict[str, Any] = dict(
            vocab_size=vocab_size, z_channels=z_channels, ch=ch, dropout=dropout, beta=beta, using_znorm=using_znorm,
            quant_conv_ks=quant_conv_ks, quant_resi=quant_resi, share_quant_resi=share_quant_resi,
            default_qresi_counts=default_qresi_counts, v_patch_nums=list(self.v_patch_nums), ch_mult=list(self.ch_mult),
        )
        ddconfig = dict(dropout=dropout, ch=ch, z_channels=z_channels, in_channels=3, ch_mult=self.ch_mult,
                        num_res_blocks=2, using_sa=True, using_mid_sa=True)
        self.encoder = Encoder(double_z=False, **ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.downsample = downsample_factor(self.ch_mult)
        self.quantize = VectorQuantizer2(vocab_size=vocab_size, Cvae=self.Cvae, using_znorm=using_znorm, beta=beta,
                                         default_qresi_counts=default_qresi_counts, v_patch_nums=v_patch_nums,
                                         quant_resi=quant_resi, share_quant_resi=share_quant_resi)
        self.quant_conv = nn.Conv2d(self.Cvae, self.Cvae, quant_conv_ks, stride=1, padding=quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(self.Cvae, self.Cvae, quant_conv_ks, stride=1, padding=quant_conv_ks // 2)

        self._compiled: Dict[str, Any] = {}
        if self.test_mode:
            self.eval()
            for p in self.parameters():
                p.requires_grad_(False)

    @property
    def image_size(self) -> int:
        """The image side that the last patch num corresponds to."""
        return self.downsample * self.v_patch_nums[-1]

    def _encode_checked(self, x: torch.Tensor, v_patch_nums: Optional[Sequence] = None) -> torch.Tensor:
        """quant_conv(encoder(x)), refusing images whose latent is not the last scale's size. As officially, any image
        with that latent is accepted (the strided convolutions floor, so sides 64...79 all give 4 at x16)."""
        last = (v_patch_nums or self.v_patch_nums)[-1]
        ph, pw = (last, last) if isinstance(last, int) else last
        expected = (ph * self.downsample, pw * self.downsample)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f'expected images of shape (B, 3, H, W), e.g. (B, 3, {expected[0]}, {expected[1]}) for '
                             f'patch_nums ending in {last}; got {tuple(x.shape)}')
        too_small = x.shape[-2] < expected[0] or x.shape[-1] < expected[1]
        f = None if too_small else self.quant_conv(self.encoder(x))
        if too_small or tuple(f.shape[-2:]) != (ph, pw):
            raise ValueError(f'images of shape {tuple(x.shape)} do not give the {(ph, pw)} latent that patch_nums '
                             f'ending in {last} need: use {expected[0]}x{expected[1]} images (downsample '
                             f'x{self.downsample})')
        return f

    # ------------------------------------------------------------------ training
    def forward(self, inp: torch.Tensor,
                ret_usages: bool = False) -> Tuple[torch.Tensor, Optional[List[float]], torch.Tensor]:
        """VAE training path -> (reconstruction, unclamped; per-scale usages in % or None; vq loss)."""
        f_hat, usages, vq_loss = self.quantize(self.quant_conv(self.encoder(inp)), ret_usages=ret_usages)
        return self.decoder(self.post_quant_conv(f_hat)), usages, vq_loss

    # ------------------------------------------------------------------ inference helpers (official API)
    def fhat_to_img(self, f_hat: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        """Decode a latent to an image in [-1, 1]; `compiled` runs the decoder through torch.compile (fast path)."""
        decoder = self.compiled_decoder() if compiled else self.decoder
        return decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def compiled_decoder(self):
        # kept in a plain dict so that the compiled wrapper never shows up as a submodule / state-dict keys
        if 'decoder' not in self._compiled:
            self._compiled['decoder'] = torch.compile(self.decoder)
        return self._compiled['decoder']

    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor,
                     v_patch_nums: Optional[Sequence[Union[int, Tuple[int, int]]]] = None) -> List[torch.Tensor]:
        """Images (B,3,H,W) in [-1,1] -> per-scale token ids, each (B, ph*pw) int64."""
        f = self._encode_checked(inp_img_no_grad, v_patch_nums)
        return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_img(self, ms_idx_Bl: List[torch.Tensor], same_shape: bool,
                     last_one: bool = False) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Per-scale token ids -> images in [-1,1] (the last, or one per cumulative scale)."""
        B = ms_idx_Bl[0].shape[0]
        ms_h_BChw = []
        for idx_Bl in ms_idx_Bl:
            pn = round(idx_Bl.shape[1] ** 0.5)
            ms_h_BChw.append(self.quantize.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn))
        return self.embed_to_img(ms_h_BChw=ms_h_BChw, all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool,
                     last_one: bool = False) -> Union[torch.Tensor, List[torch.Tensor]]:
        if last_one:
            return self.fhat_to_img(self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale, last_one=True))
        f_hats = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale, last_one=False)
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]

    def img_to_reconstructed_img(self, x: torch.Tensor, v_patch_nums: Optional[Sequence] = None,
                                 last_one: bool = False) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Encode, quantise and decode -> the final reconstruction, or one per cumulative scale."""
        f = self._encode_checked(x, v_patch_nums)
        ls_f_hat_BChw = self.quantize.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=v_patch_nums)
        if last_one:
            return self.fhat_to_img(ls_f_hat_BChw[-1])
        return [self.fhat_to_img(f_hat) for f_hat in ls_f_hat_BChw]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Strict load that accepts an `ema_vocab_hit_SV` of another number of scales.

        Official quirk kept: the mismatching entry is replaced *in the caller's dict* by this model's buffer.
        """
        key = 'quantize.ema_vocab_hit_SV'
        if key in state_dict and state_dict[key].shape[0] != self.quantize.ema_vocab_hit_SV.shape[0]:
            state_dict[key] = self.quantize.ema_vocab_hit_SV
        if strict:
            msg = describe_mismatch(self, state_dict, 'VQVAE checkpoint', fits=describe_vae_fit(state_dict))
            if msg:
                raise RuntimeError(msg)
        return super().load_state_dict(state_dict=state_dict, strict=strict, assign=assign)
