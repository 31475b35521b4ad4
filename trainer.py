# VAR trainer (arXiv 2404.02905): teacher-forced next-scale prediction loss, progressive training, validation.
"""`VARTrainer` owns the loss, the progressive-training state and the metrics of one step (arXiv 2404.02905).

It knows nothing of argparse or files: train.py builds the models, the `AmpOptimizer` and the data, and decides
what to log and save. Tensor names carry their shapes (B batch, L all tokens, l one scale's tokens, V vocabulary,
Cvae code width).
"""
import contextlib
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dist
from utils.amp_sc import AmpOptimizer
from utils.ddp import ddp_of, settle_ddp_buckets, unwrap
from utils.fsdp import root_output_view_allowed


class VARTrainer:
    """Training and evaluation of VAR on the tokens of a frozen VQVAE.

    Args:
        device: where the batches and the metric tensors live.
        patch_nums, resos: the scales (token sides) and their pixel resolutions.
        vae_local: the frozen VQVAE (tokenizer), in eval mode.
        var_wo_ddp: VAR itself (state dicts, evaluation, sampling).
        var: the module the training forward goes through (DDP and/or compiled VAR, or var_wo_ddp itself).
        var_opt: the optimizer step (autocast, scaler, clipping, accumulation).
        label_smooth: label smoothing of the training loss.
        eval_in_autocast: validate and sample under `var_opt`'s autocast rather than in fp32 (official): needed when
            the blocks' weights are gathered in half precision for every forward (--fsdp 1 --fp16 1/2).
        encode: images -> per-scale ids for training and validation batches; None: `vae_local.img_to_idxBl`
            (official), else e.g. a bf16 copy's (`models.lowp.EncoderCopy`, train.py --vbf16) or a compiled one
            (train.py --vfast).
    """

    def __init__(self, device: torch.device, patch_nums: Sequence[int], resos: Sequence[int], vae_local: nn.Module,
                 var_wo_ddp: nn.Module, var: nn.Module, var_opt: AmpOptimizer, label_smooth: float,
                 eval_in_autocast: bool = False, encode: Optional[Callable] = None):
        self.device = device
        self.patch_nums, self.resos = tuple(patch_nums), tuple(resos)
        self.vae_local, self.quantize_local = vae_local, vae_local.quantize
        self.var_wo_ddp, self.var = var_wo_ddp, var
        self.var_opt = var_opt
        self.label_smooth = label_smooth
        self.eval_in_autocast = eval_in_autocast
        self.encode = encode
        self.V = vae_local.vocab_size
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.last_l = self.patch_nums[-1] ** 2
        self.begin_ends = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        self.train_loss = nn.CrossEntropyLoss(label_smoothing=label_smooth, reduction='none')
        self.val_loss = nn.CrossEntropyLoss(label_smoothing=0.0, reduction='mean')
        # Per-token weights 1/L; kept at the full L in progressive stages too (official quirk).
        self.loss_weight = torch.ones(1, self.L, device=device) / self.L
        self.prog_it, self.last_prog_si, self.first_prog = 0, -1, True

    # ------------------------------------------------------------------ training
    def _progressive_stage(self, prog_si: int, prog_wp_it: float) -> Tuple[int, float]:
        """Update the per-stage warm-up state; returns (prog_si for the loss, stage warm-up factor prog_wp)."""
        if self.last_prog_si != prog_si:
            if self.last_prog_si != -1:
                self.first_prog = False
            self.last_prog_si, self.prog_it = prog_si, 0
        self.prog_it += 1
        prog_wp = max(min(self.prog_it / prog_wp_it, 1), 0.01) if prog_wp_it > 0 else 1.0
        if self.first_prog:
            prog_wp = 1.0  # no stage warm-up in the first stage
        if prog_si == len(self.patch_nums) - 1:
            prog_si = -1  # the last stage is the full model: no progressive weighting (the model keeps S-1)
        return prog_si, prog_wp

    @torch.no_grad()
    def tokenize(self, inp: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A batch -> (ground-truth ids gt_BL, teacher-forcing input x_BLCv_wo_first_l).

        `inp` is either images inp_B3HW in [-1, 1], encoded by the frozen VQVAE in fp32 outside autocast (official;
        or by `encode`), or integer ids gt_BL from a pre-tokenised dataset (utils/pretok.py), which skip the encoder.
        """
        if inp.is_floating_point():
            gt_idx_Bl: List[torch.Tensor] = (self.encode or self.vae_local.img_to_idxBl)(inp)
            gt_BL = torch.cat(gt_idx_Bl, dim=1)
        else:
            if inp.dim() != 2 or inp.shape[1] != self.L:
                raise ValueError(f'token batches must be (B, {self.L}) for patch_nums {self.patch_nums}, '
                                 f'got {tuple(inp.shape)}')
            prog_si = self.quantize_local.prog_si  # in progressive training, the scales up to prog_si only,
            n_scales = prog_si + 1 if prog_si >= 0 else len(self.begin_ends)  # like img_to_idxBl
            gt_BL = inp[:, :self.begin_ends[n_scales - 1][1]].long().contiguous()
            gt_idx_Bl = [gt_BL[:, bg:ed] for bg, ed in self.begin_ends[:n_scales]]
        x_BLCv_wo_first_l = self.quantize_local.idxBl_to_var_input(gt_idx_Bl)
        return gt_BL, x_BLCv_wo_first_l

    def _ddp(self) -> Optional[DDP]:
        """The DDP wrapper of the model (under torch.compile, the compiled module's inner one), or None."""
        return ddp_of(self.var)

    def settle_ddp_buckets(self, batch_size: int) -> None:
        """For a run that resumes: one zero-weighted synced backward through the DDP wrapper, so that DDP rebuilds its
        buckets before the first real step (see `utils.ddp.settle_ddp_buckets`). No-op without DDP."""
        if self._ddp() is None:
            return
        var = self.var_wo_ddp

        def throwaway_backward() -> None:
            label_B = torch.zeros(batch_size, dtype=torch.long, device=self.device)
            x_BLCv = torch.zeros(batch_size, var.L - var.first_l, var.Cvae, device=self.device)
            with self.var_opt.autocast():
                logits_BLV = self.var(label_B, x_BLCv)
            logits_BLV.float().sum().mul(0).backward()
        settle_ddp_buckets(throwaway_backward, [self.var_opt.optimizer], self.device)

    def train_step(self, stepping: bool, inp: torch.Tensor, label_B: torch.Tensor, prog_si: int = -1,
                   prog_wp_it: float = 1.0, metrics: bool = False, details: bool = False) -> Dict[str, Any]:
        """One forward/backward (and optimizer step when `stepping`).

        Args:
            stepping: whether this iteration ends an accumulation cycle (steps and syncs gradients).
            inp: images (B, 3, H, W) in [-1, 1], or token ids (B, L) of a pre-tokenised dataset.
            label_B: class ids.
            prog_si: progressive stage (-1: all scales); prog_wp_it: iterations of a stage's warm-up.
            metrics: also measure Lm, Lt, Accm, Acct (console meters).
            details: also measure per-scale accuracy/loss and vocabulary usage (a collective: every rank must pass
                the same value).
        Returns a dict with 'loss' (detached 0-d tensor), 'grad_norm', 'scale_log2', 'prog_si', 'prog_wp' and the
        requested metrics.
        """
        self.var_wo_ddp.prog_si = self.quantize_local.prog_si = prog_si
        prog_si, prog_wp = self._progressive_stage(prog_si, prog_wp_it)
        try:
            B, V = label_B.shape[0], self.V
            gt_BL, x_BLCv_wo_first_l = self.tokenize(inp)
            ddp = self._ddp()
            with ddp.no_sync() if ddp is not None and not stepping else contextlib.nullcontext():
                with self.var_opt.autocast():
                    with root_output_view_allowed():  # FSDP2 only: the loss below takes the logits out of place
                        logits_BLV = self.var(label_B, x_BLCv_wo_first_l)
                    loss_BL = self.train_loss(logits_BLV.view(-1, V), gt_BL.view(-1)).view(B, -1)
                    if prog_si >= 0:
                        bg, ed = self.begin_ends[prog_si]
                        lw_1L = self.loss_weight[:, :ed].clone()
                        lw_1L[:, bg:ed] *= min(max(prog_wp, 0.0), 1.0)
                    else:
                        lw_1L = self.loss_weight
                    loss = loss_BL.mul(lw_1L).sum(dim=-1).mean()
                grad_norm, scale_log2 = self.var_opt.backward_clip_step(loss, stepping)
        finally:
            self.var_wo_ddp.prog_si = self.quantize_local.prog_si = -1

        out = {'loss': loss.detach(), 'grad_norm': grad_norm, 'scale_log2': scale_log2, 'prog_si': prog_si,
               'prog_wp': prog_wp}
        if metrics or details:
            out.update(self._step_metrics(logits_BLV.detach(), gt_BL, prog_si, details))
        return out

    @torch.no_grad()
    def _step_metrics(self, logits_BLV: torch.Tensor, gt_BL: torch.Tensor, prog_si: int, details: bool
                      ) -> Dict[str, Any]:
        V = self.V
        pred_BL = logits_BLV.argmax(dim=-1)
        m = {'Lm': self.val_loss(logits_BLV.reshape(-1, V).float(), gt_BL.reshape(-1)).item(),
             'Accm': (pred_BL == gt_BL).float().mean().item() * 100}
        if prog_si >= 0:  # the last scale is not trained yet
            m['Lt'] = m['Acct'] = -1.0
        else:
            tail_BlV, tail_Bl = logits_BLV[:, -self.last_l:], gt_BL[:, -self.last_l:]
            m['Lt'] = self.val_loss(tail_BlV.reshape(-1, V).float(), tail_Bl.reshape(-1)).item()
            m['Acct'] = (pred_BL[:, -self.last_l:] == tail_Bl).float().mean().item() * 100
        if details:
            chosen_V = pred_BL.reshape(-1).bincount(minlength=V).float()
            dist.allreduce(chosen_V)
            chosen_V /= chosen_V.sum()
            m['voc_usage'] = (chosen_V > 0.001 / V).float().mean().item() * 100
            per_scale = {}
            for si, (bg, ed) in enumerate(self.begin_ends):
                if 0 <= prog_si < si:
                    break
                reso = self.resos[si]
                pred_BlV, tar_Bl = logits_BLV[:, bg:ed], gt_BL[:, bg:ed]
                per_scale[f'acc_{reso}'] = (pred_BlV.argmax(dim=-1) == tar_Bl).float().mean().item() * 100
                per_scale[f'L_{reso}'] = self.val_loss(pred_BlV.reshape(-1, V).float(), tar_Bl.reshape(-1)).item()
            m['per_scale'] = per_scale
        return m

    # ------------------------------------------------------------------ evaluation
    def _eval_autocast(self) -> contextlib.AbstractContextManager:
        return self.var_opt.autocast() if self.eval_in_autocast else contextlib.nullcontext()

    @torch.no_grad()
    def eval_ep(self, ld_val) -> Tuple[float, float, float, float, int, float]:
        """Validation in fp32 (official): (L_mean, L_tail, acc_mean, acc_tail, number of images, seconds).

        The condition drop of VAR's forward stays active in eval mode (official quirk), so ~10% of the samples are
        scored unconditionally. Sums are all-reduced over ranks before averaging.
        """
        t0 = time.time()
        var = self.var_wo_ddp
        was_training = var.training
        var.eval()
        V, last_l = self.V, self.last_l
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # L_mean, L_tail, acc_mean, acc_tail, tot
        for inp, label_B in ld_val:  # images or token ids
            inp = inp.to(self.device, non_blocking=True)
            label_B = label_B.to(self.device, non_blocking=True)
            B = label_B.shape[0]
            gt_BL, x_BLCv_wo_first_l = self.tokenize(inp)
            with self._eval_autocast():
                logits_BLV = var(label_B, x_BLCv_wo_first_l).float()
            tail_BlV, tail_Bl = logits_BLV[:, -last_l:], gt_BL[:, -last_l:]
            sums[0] += self.val_loss(logits_BLV.reshape(-1, V), gt_BL.reshape(-1)).double() * B
            sums[1] += self.val_loss(tail_BlV.reshape(-1, V), tail_Bl.reshape(-1)).double() * B
            sums[2] += (logits_BLV.argmax(dim=-1) == gt_BL).sum().double() * (100 / gt_BL.shape[1])
            sums[3] += (tail_BlV.argmax(dim=-1) == tail_Bl).sum().double() * (100 / last_l)
            sums[4] += B
        var.train(was_training)
        dist.allreduce(sums)
        tot = int(round(sums[4].item()))
        L_mean, L_tail, acc_mean, acc_tail = (sums[:4] / max(tot, 1)).tolist()
        return L_mean, L_tail, acc_mean, acc_tail, tot, time.time() - t0

    @torch.no_grad()
    def sample_images(self, label_B: torch.Tensor, g_seed: int, cfg: float = 1.5, top_k: int = 900,
                      top_p: float = 0.95) -> torch.Tensor:
        """Class-conditional samples (B, 3, H, W) in [0, 1] for a visual check, in fp32 like the validation.

        Sampling draws from its own generator seeded with `g_seed`, so the global RNG stream of training is untouched.
        """
        var = self.var_wo_ddp
        was_training = var.training
        var.eval()
        try:
            with self._eval_autocast():
                return var.autoregressive_infer_cfg(B=label_B.shape[0], label_B=label_B, g_seed=g_seed, cfg=cfg,
                                                    top_k=min(top_k, self.V), top_p=top_p, more_smooth=False).float()
        finally:
            var.train(was_training)

    # ------------------------------------------------------------------ state
    def progressive_state(self) -> Dict[str, Any]:
        return {'prog_it': self.prog_it, 'last_prog_si': self.last_prog_si, 'first_prog': self.first_prog}

    def state_dict(self, weights: bool = True) -> Dict[str, Any]:
        """The official layout: config, var_wo_ddp, vae_local, var_opt (optimizer [+ scaler]). With `weights` False,
        without VAR's weights and the optimizer state (a sharded checkpoint holds those apart)."""
        sd = {
            'config': {'patch_nums': self.patch_nums, 'resos': self.resos, 'label_smooth': self.label_smooth,
                       **self.progressive_state()},
            'vae_local': unwrap(self.vae_local).state_dict(),
            'var_opt': self.var_opt.state_dict(optimizer=weights),
        }
        if weights:
            sd['var_wo_ddp'] = unwrap(self.var_wo_ddp).state_dict()
        return sd

    def load_state_dict(self, state: Dict[str, Any], strict: bool = True, skip_vae: bool = False) -> List[str]:
        """Restore VAR, (the VAE,) the optimizer/scaler and the progressive state; returns notes to report. VAR's
        weights and the optimizer state are skipped when absent (a sharded checkpoint loads them apart)."""
        notes = []
        missing, unexpected = [], []
        if 'var_wo_ddp' in state:
            missing, unexpected = unwrap(self.var_wo_ddp).load_state_dict(state['var_wo_ddp'], strict=False)
        if missing or unexpected:
            msg = f'VAR state dict: missing keys {list(missing)}, unexpected keys {list(unexpected)}'
            if strict:
                raise RuntimeError(msg)
            notes.append(msg)
        if not skip_vae:
            unwrap(self.vae_local).load_state_dict(state['vae_local'], strict=True)
        notes += self.var_opt.load_state_dict(state['var_opt'])
        config = state.get('config') or {}
        self.prog_it = config.get('prog_it', 0)
        self.last_prog_si = config.get('last_prog_si', -1)
        self.first_prog = config.get('first_prog', True)
        for k, mine in (('patch_nums', self.patch_nums), ('resos', self.resos), ('label_smooth', self.label_smooth)):
            theirs = config.get(k)
            if theirs is not None and (tuple(theirs) if isinstance(theirs, (list, tuple)) else theirs) != mine:
                notes.append(f'config mismatch: {k} is {mine} now but {theirs} in the checkpoint')
        return notes
