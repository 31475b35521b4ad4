# Tokenizer trainer of VAR (arXiv 2404.02905, section 3.2): the multi-scale VQVAE with reconstruction, perceptual,
# adversarial and quantiser losses (VQGAN recipe, arXiv 2012.09841); the official code releases no such trainer.
"""`VQVAETrainer` owns the tokenizer's losses, its two optimizer steps (VQVAE, discriminator), codebook upkeep and the
validation metrics. Like `trainer.VARTrainer` it knows nothing of argparse or files: train_vae.py wires it.

Legend: B batch, H/W image size, C = Cvae code width, h/w latent size, V vocabulary, SN number of scales.
"""
import contextlib
import dataclasses
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dist
from tokenizer.codebook import dead_code_mask, replacement_codes
from tokenizer.discriminator import adaptive_gan_weight, d_loss_fn, g_loss_fn
from tokenizer.metrics import psnr_per_image, ssim_per_image
from utils.amp_sc import AmpOptimizer
from utils.ddp import ddp_of, settle_ddp_buckets, unwrap


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights and switches of the tokenizer loss.

    total = l1*|x - x'| + l2*(x - x')^2 + vq*L_vq + lp*LPIPS + [after disc_start_it] dw*w_adaptive*L_G
    """
    l1: float = 0.0
    l2: float = 1.0
    vq: float = 1.0
    lp: float = 0.0
    dw: float = 0.0
    adaptive: bool = True
    d_loss: str = 'hinge'
    disc_start_it: int = 0


@dataclasses.dataclass(frozen=True)
class ReinitConfig:
    """Dead-code re-initialisation: every `every` iterations until iteration `until`, codes with fewer summed EMA hits
    than `threshold` get a random latent vector of the current batch (0 disables)."""
    every: int = 0
    until: int = 0
    threshold: float = 0.0


class VQVAETrainer:
    """Training and evaluation of the VQVAE tokenizer.

    Args:
        device: where batches and metric tensors live.
        vae_wo_ddp / vae: the VQVAE, and the module the training forward goes through (DDP-wrapped or itself).
        disc_wo_ddp / disc: the patch discriminator (or None when dw == 0) and its DDP wrapper.
        vae_opt / disc_opt: their optimizer steps (autocast, scaler, clipping, accumulation).
        lpips: a frozen perceptual distance (or None when lp == 0).
        loss: loss weights; reinit: dead-code re-initialisation.
        seed: seeds the generator of the dead-code draws (identical on every rank; rank 0's draw is broadcast).
    """

    def __init__(self, device: torch.device, vae_wo_ddp: nn.Module, vae: nn.Module, disc_wo_ddp: Optional[nn.Module],
                 disc: Optional[nn.Module], vae_opt: AmpOptimizer, disc_opt: Optional[AmpOptimizer],
                 lpips: Optional[nn.Module], loss: LossConfig, reinit: ReinitConfig = ReinitConfig(), seed: int = 0):
        self.device = device
        self.vae_wo_ddp, self.vae = vae_wo_ddp, vae
        self.disc_wo_ddp, self.disc = disc_wo_ddp, disc
        self.vae_opt, self.disc_opt = vae_opt, disc_opt
        self.lpips = lpips
        self.loss, self.reinit = loss, reinit
        if loss.dw > 0 and disc_wo_ddp is None:
            raise ValueError('a GAN weight dw > 0 needs a discriminator')
        if loss.lp > 0 and lpips is None:
            raise ValueError('a perceptual weight lp > 0 needs an LPIPS module')
        self.patch_nums = tuple(unwrap(vae_wo_ddp).v_patch_nums)
        self.num_reinit = 0  # codes re-initialised so far
        self.reinit_gen = torch.Generator(device=device)
        self.reinit_gen.manual_seed(seed)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where the adaptive GAN weight compares gradients."""
        return unwrap(self.vae_wo_ddp).decoder.conv_out.weight

    def gan_active(self, g_it: int) -> bool:
        return self.loss.dw > 0 and g_it >= self.loss.disc_start_it

    # ------------------------------------------------------------------ training
    def train_step(self, g_it: int, stepping: bool, inp_B3HW: torch.Tensor, metrics: bool = False) -> Dict[str, Any]:
        """One forward/backward of the VQVAE, then of the discriminator once it has started.

        Args:
            g_it: global iteration (decides the GAN start and the dead-code upkeep).
            stepping: whether this iteration ends an accumulation cycle.
            inp_B3HW: images in [-1, 1].
            metrics: also return the per-scale codebook usage (EMA of hits, %), a host sync per scale.
        Returns the detached loss terms, grad norms, scale and, if asked, usages.
        """
        lc = self.loss
        gan = self.gan_active(g_it)
        vae_ddp, disc_ddp = self._ddp(self.vae), self._ddp(self.disc)
        out: Dict[str, Any] = {}

        # 1) VQVAE: reconstruction + quantiser + perceptual + adversarial
        if self.disc_wo_ddp is not None:
            self.disc_wo_ddp.requires_grad_(False)  # the generator loss must not leave gradients in the discriminator
        with self._no_sync(vae_ddp, stepping):
            with self.vae_opt.autocast():
                rec_B3HW, _, vq_loss = self.vae(inp_B3HW, ret_usages=False)
                rec_B3HW = rec_B3HW.float()
                rec_l1 = (rec_B3HW - inp_B3HW).abs().mean()
                rec_l2 = (rec_B3HW - inp_B3HW).square().mean()
                nll = lc.l1 * rec_l1 + lc.l2 * rec_l2
                if lc.lp > 0:
                    lp_loss = self.lpips(rec_B3HW, inp_B3HW).mean()
                    nll = nll + lc.lp * lp_loss
                    out['lpips'] = lp_loss.detach()
                total = nll + lc.vq * vq_loss
                if gan:
                    # float32: under fp16 the scaled gradient into a half scalar (dw*w*scale) would overflow
                    g_loss = g_loss_fn(self.disc_wo_ddp(rec_B3HW).float())
                    scaler = self.vae_opt.scaler
                    d_weight = adaptive_gan_weight(nll, g_loss, self.last_layer,
                                                   loss_scale=scaler.get_scale() if scaler is not None else 1.0) \
                        if lc.adaptive else torch.ones((), device=rec_B3HW.device)
                    total = total + lc.dw * d_weight * g_loss
                    out.update(g_loss=g_loss.detach(), d_weight=d_weight)
            grad_norm, scale_log2 = self.vae_opt.backward_clip_step(total, stepping)
        out.update(loss=total.detach(), rec_l1=rec_l1.detach(), rec_l2=rec_l2.detach(), vq=vq_loss.detach(),
                   grad_norm=grad_norm, scale_log2=scale_log2,
                   usages=self.usage_percent(inp_B3HW.shape[0]) if metrics else None)

        # 2) discriminator: real images vs detached reconstructions
        if gan:
            self.disc_wo_ddp.requires_grad_(True)
            with self._no_sync(disc_ddp, stepping):
                with self.disc_opt.autocast():
                    logits_real = self.disc(inp_B3HW.detach())
                    logits_fake = self.disc(rec_B3HW.detach())
                    d_loss = d_loss_fn(lc.d_loss, logits_real.float(), logits_fake.float())
                d_grad_norm, d_scale_log2 = self.disc_opt.backward_clip_step(d_loss, stepping)
            out.update(d_loss=d_loss.detach(), logits_real=logits_real.detach().float().mean(),
                       logits_fake=logits_fake.detach().float().mean(), d_grad_norm=d_grad_norm,
                       d_scale_log2=d_scale_log2)

        # 3) codebook upkeep, identical on every rank
        rc = self.reinit
        if stepping and rc.every > 0 and g_it < rc.until and (g_it + 1) % rc.every == 0:
            out['reinit'] = self.reinit_dead_codes(inp_B3HW)
        return out

    def usage_percent(self, batch_per_rank: int) -> List[float]:
        """Per-scale codebook usage (%) of the training EMA: the share of codes whose EMA hit count reaches 8% of what
        a uniform use of the codebook gives at that scale (world * batch * pn^2 / V hits per step).

        The official `ret_usages` measures every scale against the last scale's margin, so coarse scales, which see
        pn^2 / last^2 as many tokens, read ~0% however evenly their codes are used; this one reads 100% then.
        """
        quant = unwrap(self.vae_wo_ddp).quantize
        tokens = torch.tensor([pn * pn if isinstance(pn, int) else pn[0] * pn[1] for pn in self.patch_nums],
                              dtype=torch.float32, device=quant.ema_vocab_hit_SV.device)
        margin_S1 = (0.08 * dist.get_world_size() * batch_per_rank / quant.vocab_size * tokens).unsqueeze(1)
        ema_SV = quant.ema_vocab_hit_SV[:len(self.patch_nums)]
        return (ema_SV >= margin_S1).float().mean(1).mul(100).tolist()

    @staticmethod
    def _ddp(module: Optional[nn.Module]) -> Optional[DDP]:
        return ddp_of(module)

    def settle_ddp_buckets(self, batch_size: int, image_size: int, disc_too: bool) -> None:
        """For a run that resumes: one zero-weighted synced backward through the VQVAE's DDP wrapper (and the
        discriminator's when `disc_too`, i.e. when the uninterrupted run had already stepped it), so that DDP rebuilds
        its buckets before the first real step (see `utils.ddp.settle_ddp_buckets`). The codebook-usage statistics
        that the forward updates are put back. No-op without DDP."""
        vae_ddp, disc_ddp = self._ddp(self.vae), self._ddp(self.disc) if disc_too else None
        if vae_ddp is None and disc_ddp is None:
            return
        usage = self.usage_state()
        zeros_B3HW = torch.zeros(batch_size, 3, image_size, image_size, device=self.device)

        def throwaway_backward() -> None:
            if vae_ddp is not None:
                with self.vae_opt.autocast():
                    rec_B3HW, _, vq_loss = self.vae(zeros_B3HW, ret_usages=False)
                (rec_B3HW.float().sum() + vq_loss.float()).mul(0).backward()
            if disc_ddp is not None:
                with self.disc_opt.autocast():
                    logits = self.disc(zeros_B3HW).float().sum() + self.disc(zeros_B3HW).float().sum()
                logits.mul(0).backward()
        optimizers = [self.vae_opt.optimizer] + ([self.disc_opt.optimizer] if self.disc_opt is not None else [])
        settle_ddp_buckets(throwaway_backward, optimizers, self.device)
        quantize = unwrap(self.vae_wo_ddp).quantize
        quantize.record_hit = usage['config']['record_hit']
        quantize.ema_vocab_hit_SV.copy_(usage['vae_wo_ddp']['quantize.ema_vocab_hit_SV'])

    @staticmethod
    def _no_sync(ddp: Optional[DDP], stepping: bool):
        return ddp.no_sync() if ddp is not None and not stepping else contextlib.nullcontext()

    @torch.no_grad()
    def reinit_dead_codes(self, inp_B3HW: torch.Tensor) -> int:
        """Give each dead code a random latent vector of this batch (rank 0 draws, everyone receives).

        Their EMA hits are reset to the threshold (so they get a fair chance before they count as dead again) and
        their AdamW moments are zeroed. Returns the number of re-initialised codes.
        """
        vae = unwrap(self.vae_wo_ddp)
        quant = vae.quantize
        threshold = self.reinit.threshold
        dead_V = dead_code_mask(quant.ema_vocab_hit_SV, threshold)  # the EMA is all-reduced: same on every rank
        n = int(dead_V.sum().item())
        if n == 0:
            return 0
        was_training = vae.training
        vae.eval()
        f_BChw = vae.quant_conv(vae.encoder(inp_B3HW)).float()
        vae.train(was_training)
        f_NC = f_BChw.permute(0, 2, 3, 1).reshape(-1, quant.Cvae)
        E_VC = quant.embedding.weight
        new_E_VC = E_VC.data.clone()
        new_E_VC[dead_V] = replacement_codes(f_NC, n, self.reinit_gen)
        dist.broadcast(new_E_VC, src=0)
        E_VC.data.copy_(new_E_VC)
        quant.ema_vocab_hit_SV[:, dead_V] = threshold / quant.ema_vocab_hit_SV.shape[0]
        state = self.vae_opt.optimizer.state.get(E_VC, {})
        for key in ('exp_avg', 'exp_avg_sq'):
            if key in state and state[key].shape == E_VC.shape:
                state[key][dead_V] = 0
        self.num_reinit += n
        return n

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_ep(self, ld_val, max_images: int = 0) -> Dict[str, Any]:
        """Reconstruction quality on the validation loader (fp32, eval mode), summed over ranks.

        Returns psnr (dB) and ssim (means over images of images in [0, 1]), l1 and l2 (in [-1, 1] units), per-scale
        usage (% of the V codes chosen at least once at each scale over the validation images), the number of images
        and the seconds taken. `max_images` caps the images per rank (0: all).
        """
        t0 = time.time()
        vae = unwrap(self.vae_wo_ddp)
        was_training = vae.training
        vae.eval()
        SN, V = len(self.patch_nums), vae.vocab_size
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # psnr, ssim, l1, l2, count
        hits_SV = torch.zeros(SN, V, dtype=torch.float64, device=self.device)
        seen = 0
        for inp_B3HW, _ in ld_val:
            if max_images and seen >= max_images:
                break
            inp_B3HW = inp_B3HW.to(self.device, non_blocking=True)
            if max_images:
                inp_B3HW = inp_B3HW[:max_images - seen]
            seen += inp_B3HW.shape[0]
            m = reconstruction_metrics(vae, inp_B3HW)
            sums += torch.stack([m['psnr_B'].sum(), m['ssim_B'].sum(), m['l1_B'].sum(), m['l2_B'].sum(),
                                 torch.tensor(float(inp_B3HW.shape[0]), device=self.device)]).double()
            for si, idx_Bl in enumerate(m['idx_Bl']):
                hits_SV[si] += idx_Bl.reshape(-1).bincount(minlength=V).double()
        vae.train(was_training)
        dist.allreduce(sums)
        dist.allreduce(hits_SV)
        n = max(int(round(sums[4].item())), 1)
        psnr, ssim, l1, l2 = (sums[:4] / n).tolist()
        usage = (hits_SV > 0).double().mean(1).mul(100).tolist()
        return {'psnr': psnr, 'ssim': ssim, 'l1': l1, 'l2': l2, 'usage': usage, 'n': n, 'seconds': time.time() - t0}

    @torch.no_grad()
    def visual_grid(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Rows: the inputs, then the reconstruction from the first k scales for k = 1..SN; images in [0, 1]."""
        vae = unwrap(self.vae_wo_ddp)
        was_training = vae.training
        vae.eval()
        recs = vae.img_to_reconstructed_img(img_B3HW.to(self.device), last_one=False)
        vae.train(was_training)
        rows = [img_B3HW.to(self.device)] + list(recs)
        return torch.cat(rows, dim=0).add(1).mul(0.5).clamp(0, 1).float().cpu()

    # ------------------------------------------------------------------ state
    def usage_state(self) -> Dict[str, Dict[str, Any]]:
        """The codebook-usage statistics, the only state that a forward pass changes (between optimizer steps), laid
        out as a patch of `state_dict()`."""
        quantize = unwrap(self.vae_wo_ddp).quantize
        return {'config': {'record_hit': quantize.record_hit},
                'vae_wo_ddp': {'quantize.ema_vocab_hit_SV': quantize.ema_vocab_hit_SV.detach().cpu().clone()}}

    def state_dict(self) -> Dict[str, Any]:
        vae = unwrap(self.vae_wo_ddp)
        sd = {'config': {'patch_nums': self.patch_nums, 'loss': dataclasses.asdict(self.loss),
                         'record_hit': vae.quantize.record_hit, 'num_reinit': self.num_reinit,
                         'reinit_gen': self.reinit_gen.get_state()},
              'vae_wo_ddp': vae.state_dict(), 'vae_opt': self.vae_opt.state_dict()}
        if self.disc_wo_ddp is not None:
            sd['disc_wo_ddp'] = unwrap(self.disc_wo_ddp).state_dict()
            sd['disc_opt'] = self.disc_opt.state_dict()
        return sd

    def load_state_dict(self, state: Dict[str, Any]) -> List[str]:
        """Restore weights, optimizers, the usage EMA's counter and the re-init generator; returns notes."""
        notes: List[str] = []
        vae = unwrap(self.vae_wo_ddp)
        vae.load_state_dict(state['vae_wo_ddp'], strict=True)
        notes += self.vae_opt.load_state_dict(state['vae_opt'])
        if self.disc_wo_ddp is not None:
            if 'disc_wo_ddp' in state:
                unwrap(self.disc_wo_ddp).load_state_dict(state['disc_wo_ddp'], strict=True)
                notes += self.disc_opt.load_state_dict(state['disc_opt'])
            else:
                notes.append('the checkpoint has no discriminator: it starts from its initialisation')
        config = state.get('config') or {}
        vae.quantize.record_hit = config.get('record_hit', 0)
        self.num_reinit = config.get('num_reinit', 0)
        if 'reinit_gen' in config:
            self.reinit_gen.set_state(config['reinit_gen'])
        old_loss = config.get('loss')
        if old_loss and old_loss != dataclasses.asdict(self.loss):
            notes.append(f'loss settings changed since the checkpoint: {old_loss} -> {dataclasses.asdict(self.loss)}')
        return notes


@torch.no_grad()
def reconstruction_metrics(vae: nn.Module, inp_B3HW: torch.Tensor) -> Dict[str, Any]:
    """Tokenise and decode a batch (the path VAR uses) -> per-image psnr/ssim/l1/l2 (B,) and the per-scale ids."""
    idx_Bl = vae.img_to_idxBl(inp_B3HW)
    rec_B3HW = vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True).float()
    x01, r01 = inp_B3HW.float().add(1).mul(0.5), rec_B3HW.add(1).mul(0.5)
    return {'psnr_B': psnr_per_image(r01, x01), 'ssim_B': ssim_per_image(r01, x01),
            'l1_B': (rec_B3HW - inp_B3HW).abs().flatten(1).mean(1),
            'l2_B': (rec_B3HW - inp_B3HW).square().flatten(1).mean(1), 'idx_Bl': idx_Bl, 'rec_B3HW': rec_B3HW}


__all__ = ['VQVAETrainer', 'LossConfig', 'ReinitConfig', 'reconstruction_metrics']
