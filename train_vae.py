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
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

import dist
from tokenizer import args as vae_arg_util
from tokenizer.build import build_lpips, build_vqvae, make_opt, step_scalars
from trainer_vae import LossConfig, ReinitConfig, VQVAETrainer
from utils.amp_sc import NonFiniteError
from utils.arg_util import REPO_ROOT
from utils.ckpt import CheckpointError, CutCycle, auto_resume, remove_stale_tmp, save_run_checkpoint, set_rng_state
from utils.data import build_dataset
from utils.data_sampler import DistInfiniteBatchSampler, EvalDistributedSampler
from utils.logging import (Console, LogTxt, MetricLogger, TensorboardLogger, epoch_record, format_seconds, git_info,
                           log_iters, open_steps_log)
from utils.lr_control import lr_wd_annealing
from utils.runtime import (ConfigError, GracefulStop, StopTraining, check_ranks_agree, rank_generator,
                           resolve_device, seed_everything, set_tf32, user_errors)

LAST_NAME = 'vae-ckpt-last.pth'
BEST_NAME = 'vae-ckpt-best.pth'
CKPT_GLOB = 'vae-ckpt*.pth'


class VAERun:
    """One tokenizer training run: configuration, data, models, trainer, logs; `fit()` runs the epochs."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.cfg = cfg = vae_arg_util.derive_vae(args, self.world_size)
        self.device = resolve_device(args.device)
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.console = Console(cfg.out_dir, enabled=dist.is_master())
        self.stop = GracefulStop(self.device)
        if getattr(args, 'unknown_args', None):
            self.console.warn(f'ignoring unknown arguments (typos?): {args.unknown_args}')
        seed_everything(args.seed, self.rank, self.world_size, benchmark=True)
        set_tf32(args.tf32)

        # data (the class labels are not used)
        with user_errors(FileNotFoundError, ValueError):
            _, train_set, val_set = build_dataset(args.data_path, cfg.image_size, args.hflip, args.mid_reso)
        self.train_set, self.val_set = train_set, val_set
        self.iters_train = math.ceil(len(train_set) / cfg.glb_batch_size)
        self.max_it = args.ep * self.iters_train

        # resume point
        if dist.is_local_master():
            remove_stale_tmp(cfg.out_dir)
        ckpt, ckpt_path, notes = auto_resume(cfg.out_dir, CKPT_GLOB)
        for note in notes:
            self.console.warn(f'[auto-resume] skipped a broken checkpoint: {note}')
        self.start_ep, self.start_it = (ckpt['epoch'], ckpt['iter']) if ckpt else (0, 0)
        if self.start_it >= self.iters_train:
            self.start_ep, self.start_it = self.start_ep + 1, 0

        sampler = DistInfiniteBatchSampler(self.world_size, self.rank, len(train_set), cfg.glb_batch_size,
                                           same_seed_for_all_ranks=args.same_seed_for_all_ranks, fill_last=True,
                                           shuffle=True, start_ep=self.start_ep, start_it=self.start_it,
                                           aug_seed=args.seed)
        pin = self.device.type == 'cuda'
        self.ld_train = DataLoader(train_set, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=pin,
                                   generator=rank_generator(args.seed, self.rank, self.world_size))
        self.ld_val = DataLoader(val_set, batch_size=cfg.val_batch_size, num_workers=0, pin_memory=pin,
                                 drop_last=False, sampler=EvalDistributedSampler(val_set, self.world_size, self.rank))

        # models and optimizers
        with user_errors(ValueError):  # --vae_init of another architecture
            self.vae_wo_ddp = build_vqvae(args, cfg, self.device)
        self.disc_wo_ddp = None
        if args.dw > 0:
            from models.vae_losses import PatchDiscriminator
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
        self.best = {'psnr': -math.inf, 'ssim': -math.inf}
        self.cut_cycle = CutCycle()  # an accumulation cycle that an epoch end cuts: checkpoints point at its start
        self.last_val: Dict[str, Any] = {}
        if ckpt:
            self._restore(ckpt, ckpt_path)

        # logs
        self.tb = TensorboardLogger(os.path.join(cfg.out_dir, cfg.tb_dir_name), enabled=dist.is_master(),
                                    purge_step=self.start_ep * self.iters_train + self.start_it if ckpt else None)
        self.log_txt = LogTxt(os.path.join(cfg.out_dir, 'log.txt'), enabled=dist.is_master())
        self.header = {'is_master': dist.is_master(), 'name': args.exp_name, 'cmd': ' '.join(sys.argv),
                       **{k: v for k, v in git_info(str(REPO_ROOT)).items() if k != 'commit_msg'},
                       'tb_log_dir_path': self.tb.log_dir}
        self.log_txt.write(self.header)
        self.steps_file = open_steps_log(os.path.join(cfg.out_dir, 'steps.jsonl'),
                                         self.start_ep * self.iters_train + self.start_it) \
            if args.log_steps and dist.is_master() else None
        n_vae = sum(p.numel() for p in self.vae_wo_ddp.parameters())
        n_disc = sum(p.numel() for p in disc.parameters()) if disc is not None else 0
        self.console.info(f'[init] world_size={self.world_size} device={self.device} train={len(train_set)} '
                          f'val={len(val_set)} iters/ep={self.iters_train} VQVAE params={n_vae / 1e6:.2f}M '
                          f'disc params={n_disc / 1e6:.2f}M lpips={"on" if lpips is not None else "off"} '
                          f'GAN from iteration {loss.disc_start_it} {json.dumps(dataclasses.asdict(cfg))}')

    # ------------------------------------------------------------------ checkpoints
    def _restore(self, ckpt: Dict[str, Any], path: str) -> None:
        notes = self.trainer.load_state_dict(ckpt['trainer'])
        rngs = ckpt.get('rng')
        if rngs is not None and len(rngs) == self.world_size:
            set_rng_state(rngs[self.rank])
        else:
            notes.append('the checkpoint was written with another number of processes: RNG states not restored')
        self.best.update(ckpt.get('best', {}))
        self.last_val = ckpt.get('metrics', {})
        old_args = ckpt.get('args', {})
        changed = {k: (old_args[k], v) for k, v in vars(self.args).items() if k in old_args and old_args[k] != v}
        if changed:
            notes.append(f'arguments changed since the checkpoint (old, new): {changed}')
        for note in notes:
            self.console.warn(f'[auto-resume] {note}')
        self.console.info(f'[auto-resume] loaded {path}: epoch {self.start_ep}, iteration {self.start_it}')

    def save(self, epoch: int, it: int, best_updated: bool = False) -> None:
        """vae-ckpt-last.pth (and vae-ckpt-best.pth on a better val PSNR) on every node's local master.

        When an epoch ends inside an accumulation cycle (--ac > 1), the checkpoint points at the cycle's first
        iteration, with the RNG states and codebook-usage statistics of that moment (see utils.ckpt.CutCycle).
        """
        for module in (self.vae_wo_ddp, self.disc_wo_ddp):
            if module is not None:
                check_ranks_agree(module)
        trainer_state = self.trainer.state_dict()
        epoch, it, rng = self.cut_cycle.resume_point(epoch, it, trainer_state)
        state = {'epoch': epoch, 'iter': it, 'trainer': trainer_state, 'args': vars(self.args),
                 'derived': dataclasses.asdict(self.cfg), 'best': dict(self.best),
                 'metrics': dict(self.last_val), 'vae_config': dict(self.vae_wo_ddp.config),
                 'image_size': self.cfg.image_size}
        save_run_checkpoint(state, self.cfg.out_dir, LAST_NAME, BEST_NAME, best_updated, rng=rng)

    # ------------------------------------------------------------------ loop
    def fit(self) -> None:
        args = self.args
        if self.start_ep >= args.ep:
            self.console.info(f'[fit] nothing to do: the checkpoint is at epoch {self.start_ep} of {args.ep}')
            return
        with self.stop:
            self.fit_epochs()

    def fit_epochs(self) -> None:
        args = self.args
        ld_iter = iter(self.ld_train)
        t_start, it_start = time.time(), self.start_ep * self.iters_train + self.start_it
        for ep in range(self.start_ep, args.ep):
            first_it = self.start_it if ep == self.start_ep else 0
            stats = self.train_one_ep(ep, first_it, ld_iter)
            record, _ = epoch_record(ep, args.ep, self.iters_train, stats, t_start, it_start)
            with self.tb.held():  # the epoch-axis events are written once the epoch's checkpoint is on disk
                best_updated = False
                if (ep + 1) % args.val_every_ep == 0 or ep + 1 == args.ep:
                    best_updated = self.validate(ep + 1)
                    record.update({f'v{k}': v for k, v in self.last_val.items() if k != 'seconds'})
                self.tb.scalars(ep + 1, 'VAE_ep_loss', **{k: v for k, v in stats.items() if isinstance(v, float)})
                self.console.info(f'[ep{ep}] (training) ' + ', '.join(f'{k}: {v:.4g}' for k, v in stats.items()
                                                                        if isinstance(v, float))
                                  + f', Remain: {record["remain_time"]}, Finish: {record["finish_time"]}')
                if ep + 1 == args.ep:  # the run is over: a last unfinished cycle is dropped
                    self.cut_cycle.start = None
                self.save(ep + 1, 0, best_updated)
            self.log_txt.write(self.header, record)
            self.tb.flush()
            self.stop.at_epoch_end(ep, args.ep)
        self.console.info(f'[fit] done: {args.ep} epochs, best val PSNR {self.best["psnr"]:.2f} dB, '
                          f'{self.vae_opt.num_skipped} skipped step(s), {self.trainer.num_reinit} code(s) '
                          f're-initialised, {self.train_set.num_skipped} unreadable image(s) skipped by this rank')

    def train_one_ep(self, ep: int, first_it: int, ld_iter) -> Dict[str, float]:
        from tqdm import tqdm
        args, cfg, trainer = self.args, self.cfg, self.trainer
        iters = self.iters_train
        wp_it = round(cfg.wp * iters)
        me = MetricLogger()
        log_its = log_iters(iters, first_it)
        bar = tqdm(total=iters, initial=first_it, desc=f'[VAE Ep {ep}/{args.ep}]', disable=not dist.is_master(),
                   mininterval=1.0 if sys.stderr.isatty() else 60.0, dynamic_ncols=True, leave=False)
        t0 = time.time()
        for it in range(first_it, iters):
            g_it = ep * iters + it
            self.cut_cycle.begin_iteration(ep, it, iters, args.ac, trainer.usage_state)
            inp_B3HW, _ = next(ld_iter)
            inp_B3HW = inp_B3HW.to(self.device, non_blocking=True)
            stepping = (g_it + 1) % args.ac == 0
            lr_wd = lr_wd_annealing(args.sche, self.vae_opt.optimizer, cfg.tlr, args.twd, cfg.twde, g_it, wp_it,
                                    self.max_it, wp0=args.wp0, wpe=args.wpe)
            if self.disc_opt is not None:
                lr_wd_annealing(args.sche, self.disc_opt.optimizer, cfg.dlr, args.twd, cfg.twde, g_it, wp_it,
                                self.max_it, wp0=args.wp0, wpe=args.wpe)
            tb_now = g_it == 0 or (g_it + 1) % args.tb_every_iters == 0
            skipped_before = self.vae_opt.num_skipped
            out = trainer.train_step(g_it, stepping, inp_B3HW, metrics=tb_now or it in log_its)
            self.cut_cycle.end_iteration(stepping)
            me.update(**step_scalars(out))
            if it in log_its:
                eta = (time.time() - t0) / (it - first_it + 1) * (iters - it - 1)
                usage = '/'.join(f'{u:.0f}' for u in out['usages']) if out['usages'] else ''
                self.console.info(f'[VAE Ep]: [{ep:4d}/{args.ep}]  [{it:4d}/{iters}]  eta: {format_seconds(eta)}  '
                                  f'lr: {lr_wd[1]:.3g}  usage%/scale: {usage}  {me}')
            if out.get('reinit'):
                self.console.info(f'[step {g_it}] re-initialised {out["reinit"]} dead code(s)')
            if self.vae_opt.num_skipped > skipped_before:
                self.console.warn(f'[step {g_it}] non-finite loss or gradient: step skipped '
                                  f'({self.vae_opt.consecutive_skipped} in a row)')
            if tb_now:
                self.log_tb_iter(g_it, out, lr_wd)
            if self.steps_file is not None:
                self.steps_file.write(json.dumps({'g_it': g_it, 'ep': ep, 'it': it, 'loss': out['loss'].item(),
                                                  'grad_norm': out['grad_norm'], 'lr': lr_wd[1]}) + '\n')
                self.steps_file.flush()
            bar.update(1)
            if stepping:  # SIGINT / SIGTERM on any rank: save at this cycle boundary
                self.stop.at_cycle_end(ep, it, iters, self.save)
            every = args.ckpt_every_iters
            if every > 0 and (g_it + 1) % every == 0 and stepping and it + 1 < iters:
                self.save(ep, it + 1)
        bar.close()
        me.synchronize_between_processes(self.device)
        return {k: float(v) for k, v in me.global_avgs().items()}

    def log_tb_iter(self, g_it: int, out: Dict[str, Any], lr_wd) -> None:
        self.tb.scalars(g_it, 'VAE_opt', lr=lr_wd[1], wd=lr_wd[3], grad_norm=out['grad_norm'],
                        scale_log2=out['scale_log2'], d_grad_norm=out.get('d_grad_norm'),
                        skipped_total=self.vae_opt.num_skipped)
        self.tb.scalars(g_it, 'VAE_iter_loss', **{k: out.get(k) for k in (
            'loss', 'rec_l1', 'rec_l2', 'vq', 'lpips', 'g_loss', 'd_weight', 'd_loss', 'logits_real', 'logits_fake')})
        if out['usages']:
            usage = {f'pn{pn}': u for pn, u in zip(self.cfg.patch_nums, out['usages'])}
            self.tb.scalars(g_it, 'VAE_usage_ema', **usage)
        self.tb.scalars(g_it, 'VAE_usage_ema', reinit_total=self.trainer.num_reinit)

    def validate(self, step: int) -> bool:
        """Reconstruction metrics and per-scale usage on the validation split; True if the PSNR is the best so far."""
        m = self.trainer.eval_ep(self.ld_val, max_images=self.args.val_max)
        self.last_val = {k: m[k] for k in ('psnr', 'ssim', 'l1', 'l2', 'usage', 'n', 'seconds')}
        best_updated = m['psnr'] > self.best['psnr']
        self.best.update(psnr=max(self.best['psnr'], m['psnr']), ssim=max(self.best['ssim'], m['ssim']))
        self.tb.scalars(step, 'VAE_val', psnr=m['psnr'], ssim=m['ssim'], l1=m['l1'], l2=m['l2'])
        self.tb.scalars(step, 'VAE_val_usage', **{f'pn{pn}': u for pn, u in zip(self.cfg.patch_nums, m['usage'])})
        usage = ', '.join(f'{pn}x{pn}: {u:.1f}%' for pn, u in zip(self.cfg.patch_nums, m['usage']))
        self.console.info(f'[val ep{step - 1}] ({m["n"]} images, {m["seconds"]:.1f}s) PSNR: {m["psnr"]:.2f} dB, '
                          f'SSIM: {m["ssim"]:.4f}, L1: {m["l1"]:.4f}, best PSNR: {self.best["psnr"]:.2f}; '
                          f'codebook usage per scale: {usage}')
        self.visualize(step)
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

    def close(self) -> None:
        if self.steps_file is not None:
            self.steps_file.close()
        self.tb.close()


def main(argv=None) -> int:
    args = vae_arg_util.parse_vae_args(argv)
    dist.initialize()
    run: Optional[VAERun] = None
    try:
        run = VAERun(args)
        run.fit()
        dist.barrier()
        return 0
    except StopTraining as e:  # SIGINT / SIGTERM: the checkpoint is written
        if run is not None and dist.is_master():
            run.console.info(f'[stop] {e}')
        return 130
    except NonFiniteError as e:
        print(f'[rank {dist.get_rank()}] {e}', file=sys.stderr, flush=True)
        return 3
    except CheckpointError as e:
        print(f'[rank {dist.get_rank()}] {e}', file=sys.stderr, flush=True)
        return 4
    except ConfigError as e:  # a wrong path, flag or file: the message says what to change
        print(f'[rank {dist.get_rank()}] error: {e}', file=sys.stderr, flush=True)
        return 2
    finally:
        if run is not None:
            run.close()
        dist.finalize()


if __name__ == '__main__':
    sys.exit(main())
