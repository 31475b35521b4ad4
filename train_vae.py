# Trains the multi-scale VQVAE tokenizer of VAR (arXiv 2404.02905, section 3.2), on train.py's spine.
"""Train VAR's tokenizer on an ImageNet-style folder, in one process or under torchrun (NCCL on GPU, gloo on CPU).

    torchrun --nproc_per_node=8 train_vae.py --data_path=/path/to/imagenet --bs=256 --ep=100 --fp16=2
    python train_vae.py --data_path=DATA --vae_ch=32 --vae_ch_mult=1_2_4 --vocab=512 --pn=1_2_3_4_6_8 --lp=0 ...
    python train_vae.py --data_path=DATA --vae_init=vae_ch160v4096z32.pth ...     # fine-tune the official VQVAE

Losses: L1/L2 reconstruction, the quantiser's codebook + beta*commitment term, LPIPS (VGG16; --lp=0 turns it off and
needs no weights) and a patch discriminator with VQGAN's adaptive weight from --disc_start on. Per-scale codebook usage
is logged (collapse at the coarse scales is the known failure); --vq_reinit revives dead codes.
The checkpoint (`vae-ckpt-last.pth`, `vae-ckpt-best.pth` by validation PSNR) carries `vae_config`, so
`train.py --vae_ckpt=.../vae-ckpt-best.pth` and `sample.py` need no architecture flags. Re-running the same command
resumes at the exact iteration.
"""
import math
import sys
from typing import Any, Dict, List, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import dist
from tokenizer.args import derive_vae, parse_vae_args
from tokenizer.build import build_lpips, build_vqvae, make_opt, step_scalars
from tokenizer.discriminator import PatchDiscriminator
from tokenizer.trainer import LossConfig, ReinitConfig, VQVAETrainer
from utils.data import build_dataset
from utils.lr_control import lr_wd_annealing
from utils.run import TrainingRun, main_of
from utils.run_logs import LogLayout, StepScalars, tags
from utils.runtime import ConfigError, user_errors

LAST_NAME = 'vae-ckpt-last.pth'
BEST_NAME = 'vae-ckpt-best.pth'
CKPT_GLOB = 'vae-ckpt*.pth'


class VAERun(TrainingRun):
    """One tokenizer training run on the spine of utils.run: data, models, trainer, and what is the tokenizer's own."""

    last_name, best_name, ckpt_glob = LAST_NAME, BEST_NAME, CKPT_GLOB
    bar_name = 'VAE Ep'
    layout = LogLayout(epoch_head='VAE_ep_loss',
                       summary='best val PSNR {best[psnr]:.2f} dB, {skipped} skipped step(s), '
                               '{run.trainer.num_reinit} code(s) re-initialised, {unreadable} unreadable image(s) '
                               'skipped by this rank')

    def __init__(self, args):
        super().__init__(args, derive_vae, cudnn_benchmark=True)  # rank, device, console, seeds, TF32
        cfg = self.cfg

        # data (the class labels are not used)
        with user_errors(FileNotFoundError, ValueError):
            _, self.train_set, self.val_set = build_dataset(args.data_path, cfg.image_size, args.hflip, args.mid_reso)

        # models and optimizers
        with user_errors(ValueError):  # --vae_init of another architecture
            self.vae_wo_ddp = build_vqvae(args, cfg, self.device)
        self.disc_wo_ddp = None
        if args.dw > 0:
            with torch.device(self.device):
                self.disc_wo_ddp = PatchDiscriminator(3, ch=args.disc_ch, n_layers=args.disc_layers)
            if cfg.image_size < self.disc_wo_ddp.min_image_size:  # say so now, not when the GAN starts hours later
                raise ConfigError(f'--disc_layers={args.disc_layers} needs images of at least '
                                  f'{self.disc_wo_ddp.min_image_size} px but they are {cfg.image_size} px: lower '
                                  f'--disc_layers (or --dw=0 for no discriminator)')
        vae, disc = self.vae_wo_ddp, self.disc_wo_ddp
        if dist.is_initialized():
            ids = [self.device.index] if self.device.type == 'cuda' else None
            vae = DDP(vae, device_ids=ids, find_unused_parameters=False, broadcast_buffers=False)
            if disc is not None:
                disc = DDP(disc, device_ids=ids, find_unused_parameters=False, broadcast_buffers=False)
        with user_errors(RuntimeError, FileNotFoundError, ValueError):  # VGG16 weights missing (offline) or foreign
            lpips = build_lpips(args, self.device) if args.lp > 0 else None
        self.vae_opt = make_opt(self.vae_wo_ddp, cfg.tlr, args, self.device)
        self.disc_opt = make_opt(self.disc_wo_ddp, cfg.dlr, args, self.device) if disc is not None else None
        margin = self.world_size * cfg.batch_size * cfg.patch_nums[-1] ** 2 / args.vocab * 0.08  # the usage margin
        # the GAN starts at an accumulation-cycle boundary, so its first step averages --ac whole micro-batches
        disc_start_it = -(-round(cfg.disc_start * self.iters_train) // args.ac) * args.ac
        loss = LossConfig(l1=args.l1, l2=args.l2, vq=args.vq, lp=args.lp, dw=args.dw, adaptive=args.adaptive,
                          d_loss=args.d_loss, disc_start_it=disc_start_it)
        reinit = ReinitConfig(every=args.vq_reinit, until=round(args.vq_reinit_until * self.max_it),
                              threshold=args.vq_dead or margin)
        self.trainer = VQVAETrainer(self.device, self.vae_wo_ddp, vae, self.disc_wo_ddp, disc, self.vae_opt,
                                    self.disc_opt, lpips, loss, reinit, seed=args.seed or 0)
        self.optimizers = [self.vae_opt] + ([self.disc_opt] if self.disc_opt is not None else [])
        self.best = {'psnr': -math.inf, 'ssim': -math.inf}
        self.last_val: Dict[str, Any] = {}
        self.wp_it = round(cfg.wp * self.iters_train)  # the lr/wd warm-up, rounded as in train.py
        n_vae = sum(p.numel() for p in self.vae_wo_ddp.parameters())
        n_disc = sum(p.numel() for p in disc.parameters()) if disc is not None else 0
        self.about = (f'VQVAE params={n_vae / 1e6:.2f}M disc params={n_disc / 1e6:.2f}M '
                      f'lpips={"on" if lpips is not None else "off"} GAN from iteration {loss.disc_start_it}')

    # ------------------------------------------------------------------ checkpoints
    def load_trainer_state(self, ckpt: Dict[str, Any], path: str, changed: Dict[str, Tuple[Any, Any]]) -> List[str]:
        self.last_val = ckpt.get('metrics', {})
        return self.trainer.load_state_dict(ckpt['trainer'])

    def settle_ddp_buckets(self) -> None:
        # the discriminator's buckets were rebuilt in the uninterrupted run only if it had made a synced step (the
        # GAN starts at a cycle boundary, so its first synced backward ends the cycle that starts there)
        disc_stepped = self.resume_g_it >= self.trainer.loss.disc_start_it + self.args.ac
        self.trainer.settle_ddp_buckets(self.cfg.batch_size, self.cfg.image_size,
                                        disc_too=self.disc_wo_ddp is not None and disc_stepped)

    def replicated_modules(self) -> List[torch.nn.Module]:
        return [m for m in (self.vae_wo_ddp, self.disc_wo_ddp) if m is not None]

    def checkpoint_extras(self) -> Dict[str, Any]:
        return {'metrics': dict(self.last_val), 'vae_config': dict(self.vae_wo_ddp.config),
                'image_size': self.cfg.image_size}

    def cycle_patch(self) -> Dict[str, Dict[str, Any]]:
        return self.trainer.usage_state()

    # ------------------------------------------------------------------ one iteration
    def step(self, batch, g_it: int, stepping: bool, metrics: bool, tb: bool) -> StepScalars:
        """The schedules at `g_it` (both optimizers), then VQVAETrainer's step."""
        args, cfg = self.args, self.cfg
        inp_B3HW = batch[0].to(self.device, non_blocking=True)
        lr_wd = lr_wd_annealing(args.sche, self.vae_opt.optimizer, cfg.tlr, args.twd, cfg.twde, g_it, self.wp_it,
                                self.max_it, wp0=args.wp0, wpe=args.wpe)
        if self.disc_opt is not None:
            lr_wd_annealing(args.sche, self.disc_opt.optimizer, cfg.dlr, args.twd, cfg.twde, g_it, self.wp_it,
                            self.max_it, wp0=args.wp0, wpe=args.wpe)
        out = self.trainer.train_step(g_it, stepping, inp_B3HW, metrics=tb or metrics)
        usage = '/'.join(f'{u:.0f}' for u in out['usages']) if out['usages'] else ''
        reinit = f'[step {g_it}] re-initialised {out["reinit"]} dead code(s)' if out.get('reinit') else ''
        return StepScalars(out['loss'], out['grad_norm'], lr=lr_wd[1], wd=lr_wd[3], meters=step_scalars(out),
                           tb=self.tb_scalars(out, lr_wd) if tb else {},
                           line=f'lr: {lr_wd[1]:.3g}  usage%/scale: {usage}', note=reinit)

    def tb_scalars(self, out: Dict[str, Any], lr_wd) -> Dict[str, Any]:
        """The TensorBoard scalars of an iteration, by tag."""
        usage = {f'pn{pn}': u for pn, u in zip(self.cfg.patch_nums, out['usages'] or [])}
        return {**tags('VAE_opt', lr=lr_wd[1], wd=lr_wd[3], grad_norm=out['grad_norm'], scale_log2=out['scale_log2'],
                       d_grad_norm=out.get('d_grad_norm'), skipped_total=self.vae_opt.num_skipped),
                **tags('VAE_iter_loss', **{k: out.get(k) for k in ('loss', 'rec_l1', 'rec_l2', 'vq', 'lpips',
                                                                   'g_loss', 'd_weight', 'd_loss', 'logits_real',
                                                                   'logits_fake')}),
                **tags('VAE_usage_ema', **usage, reinit_total=self.trainer.num_reinit)}

    # ------------------------------------------------------------------ epoch end
    def validate(self, ep: int, record: Dict[str, Any]) -> bool:
        """Reconstruction metrics and per-scale usage on the validation split; True if the PSNR is the best so far."""
        step = ep + 1
        m = self.trainer.eval_ep(self.ld_val, max_images=self.args.val_max)
        self.last_val = {k: m[k] for k in ('psnr', 'ssim', 'l1', 'l2', 'usage', 'n', 'seconds')}
        best_updated = m['psnr'] > self.best['psnr']
        self.best.update(psnr=max(self.best['psnr'], m['psnr']), ssim=max(self.best['ssim'], m['ssim']))
        self.tb.scalars(step, 'VAE_val', psnr=m['psnr'], ssim=m['ssim'], l1=m['l1'], l2=m['l2'])
        self.tb.scalars(step, 'VAE_val_usage', **{f'pn{pn}': u for pn, u in zip(self.cfg.patch_nums, m['usage'])})
        usage = ', '.join(f'{pn}x{pn}: {u:.1f}%' for pn, u in zip(self.cfg.patch_nums, m['usage']))
        self.console.info(f'[val ep{ep}] ({m["n"]} images, {m["seconds"]:.1f}s) PSNR: {m["psnr"]:.2f} dB, '
                          f'SSIM: {m["ssim"]:.4f}, L1: {m["l1"]:.4f}, best PSNR: {self.best["psnr"]:.2f}; '
                          f'codebook usage per scale: {usage}')
        self.visualize(step)
        record.update({f'v{k}': v for k, v in self.last_val.items() if k != 'seconds'})
        return best_updated

    def visualize(self, step: int) -> None:
        """Fixed validation images and their reconstructions from the first 1..SN scales, in TensorBoard."""
        if not dist.is_master() or self.args.n_vis <= 0:
            return
        from torchvision.utils import make_grid
        n = min(self.args.n_vis, len(self.val_set))
        picks = torch.linspace(0, len(self.val_set) - 1, n).round().long().tolist()
        img_B3HW = torch.stack([self.val_set[i][0] for i in picks])
        grid = self.trainer.visual_grid(img_B3HW)
        self.tb.image('VAE_rec/rows_input_then_scales_1_to_SN', make_grid(grid, nrow=n, padding=1), step)


def main(argv=None) -> int:
    """Train the tokenizer; returns the exit code (the same as train.py's, see utils.run.main_of)."""
    return main_of(VAERun, parse_vae_args(argv))


if __name__ == '__main__':
    sys.exit(main())
