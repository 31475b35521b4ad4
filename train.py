# Trains VAR (arXiv 2404.02905) with the official recipe: spec sections 6-9.
"""Train VAR on an ImageNet-style folder, in one process or under torchrun (NCCL on GPU, gloo on CPU).

    torchrun --nproc_per_node=8 train.py --depth=16 --bs=768 --ep=200 --fp16=1 --alng=1e-3 --wpe=0.1 \
        --data_path=/path/to/imagenet [--vae_ckpt=vae_ch160v4096z32.pth]
    python train.py ...          # the same, in a single process
    python train.py ... --pretok=/path/to/tokens   # from a set written by pretokenize.py (fixed crops, faster)

Re-running the same command resumes from the newest checkpoint in the output folder at the exact iteration.
"""
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torchvision.utils import make_grid
from tqdm import tqdm

import dist
import models
from models.inspect_ckpt import describe_mismatch
from models.loading import official_vae_path
from trainer import VARTrainer
from utils import arg_util
from utils.amp_sc import AmpOptimizer, NonFiniteError
from utils.ckpt import (BEST_NAME, LAST_NAME, CheckpointError, CutCycle, auto_resume, remove_stale_tmp,
                        save_run_checkpoint, set_rng_state)
from utils.data import build_dataset
from utils.data_sampler import DistInfiniteBatchSampler, EvalDistributedSampler
from utils.logging import (Console, LogTxt, MetricLogger, SmoothedValue, TensorboardLogger, epoch_record,
                           format_seconds, git_info, log_iters, open_steps_log)
from utils.lr_control import build_param_groups, lr_wd_annealing, progressive_si
from utils.pretok import TOKEN_CONFIG_KEYS, build_pretok_dataset, check_compatible, vae_fingerprint
from utils.runtime import (ConfigError, GracefulStop, StopTraining, check_ranks_agree, rank_generator,
                           resolve_device, seed_everything, set_tf32, user_errors)

COMPILE_MODES = {1: 'reduce-overhead', 2: 'max-autotune', 3: 'default'}
VIS_SAMPLES = 8  # class-conditional samples written to TensorBoard at each validation


def build_models(args, cfg: arg_util.Derived, num_classes: int, device: torch.device):
    """(vae_local, var_wo_ddp, vae_config): the tokenizer's architecture comes from its checkpoint."""
    width = args.width or 64 * args.depth
    if width % args.depth:
        raise ConfigError(f'--width={width} must be a multiple of the number of attention heads, which is --depth '
                          f'({args.depth})')
    vae_path = official_vae_path(args.vae_ckpt)
    vae_file = models.load_vae_checkpoint(vae_path, device='cpu', patch_nums=cfg.patch_nums)
    vae_sd = vae_file.state_dict()
    vae_cfg = models.infer_vae_config(vae_sd, v_patch_nums=cfg.patch_nums)
    downsample = 2 ** (len(vae_cfg['ch_mult']) - 1)
    if downsample != args.patch_size:
        raise ConfigError(f'the tokenizer {vae_path} downsamples by {downsample} but --patch_size={args.patch_size}')
    vae_local, var_wo_ddp = models.build_vae_var(
        device=device, patch_nums=cfg.patch_nums, V=vae_cfg['vocab_size'], Cvae=vae_cfg['z_channels'],
        ch=vae_cfg['ch'], share_quant_resi=vae_cfg['share_quant_resi'], num_classes=num_classes, depth=args.depth,
        shared_aln=args.saln, attn_l2_norm=args.anorm, flash_if_available=args.fuse, fused_if_available=args.fuse,
        init_adaln=args.aln, init_adaln_gamma=args.alng, init_head=args.hd, init_std=args.ini,
        ch_mult=vae_cfg['ch_mult'], embed_dim=args.width or None)
    vae_local.load_state_dict(vae_sd, strict=True)
    vae_local.eval()
    # build_vae_var fixes the official quantiser settings; a checkpoint whose config says otherwise would tokenise
    # differently here than in sample.py or pretokenize.py
    differ = {k: (vae_file.config[k], vae_local.config[k]) for k in TOKEN_CONFIG_KEYS
              if vae_file.config[k] != vae_local.config[k]}
    if differ:
        raise ConfigError(f'the tokenizer {vae_path} has settings that train.py does not build (checkpoint, '
                          f'train.py): {differ}')
    if args.flex:
        var_wo_ddp.attn_impl = 'flex'
        for _, ed in var_wo_ddp.begin_ends:  # build the block masks eagerly, outside any compiled region
            var_wo_ddp.flex_block_mask(ed)
    return vae_local, var_wo_ddp, vae_cfg


class Run:
    """Everything one training run holds: configuration, data, models, trainer, logs; `fit()` runs the epochs."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.cfg = cfg = arg_util.derive(args, self.world_size)
        self.device = resolve_device(args.device)
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.console = Console(cfg.out_dir, enabled=dist.is_master())
        self.stop = GracefulStop(self.device)
        if getattr(args, 'unknown_args', None):
            self.console.warn(f'ignoring unknown arguments (typos?): {args.unknown_args}')
        if args.tlr is not None:
            self.console.warn(f'--tlr={args.tlr} is ignored: the peak lr is ac*tblr*bs/256 = {cfg.tlr:g} (official)')
        seed_everything(args.seed, self.rank, self.world_size, benchmark=args.pg == 0)
        set_tf32(args.tf32)

        # data: images (official), or the token ids of a pre-tokenised dataset (--pretok)
        self.pretok_meta = None
        if args.flex and self.device.type != 'cuda':
            raise ConfigError('--flex 1 needs a CUDA device (FlexAttention has no backward pass on the CPU); '
                              'drop it to train with the dense mask through SDPA')
        if args.pretok:
            with user_errors(FileNotFoundError, ValueError):
                self.num_classes, train_set, val_set, self.pretok_meta = build_pretok_dataset(args.pretok, args.hflip)
            self.console.info(f'[data] pre-tokenised dataset {args.pretok}: fixed crops '
                              f'(mid_reso {self.pretok_meta["mid_reso"]}), variants {self.pretok_meta["variants"]}')
            if args.data_path != arg_util.build_parser().get_default('data_path'):
                self.console.warn(f'--data_path {args.data_path} is not read: the images come from --pretok')
        else:
            with user_errors(FileNotFoundError, ValueError):
                self.num_classes, train_set, val_set = build_dataset(args.data_path, cfg.data_load_reso, args.hflip,
                                                                     args.mid_reso)
        self.train_set = train_set
        names = ', '.join(f'{i}: {c}' for i, c in enumerate(train_set.classes[:5]))
        self.console.info(f'[data] {len(train_set.classes)} classes, ids in sorted folder order ({names}'
                          f'{", ..." if len(train_set.classes) > 5 else ""}); the checkpoint keeps the list as '
                          f"'class_names'")
        if cfg.workers == 0 and not args.pretok and len(train_set) > 50_000:
            self.console.warn(f'--workers=0 (the official default): {len(train_set)} images will be decoded and '
                              f'resized in the training process itself; pass e.g. --workers=8 (per process)')
        self.iters_train = math.ceil(len(train_set) / cfg.glb_batch_size)

        # resume point (every rank reads the checkpoint of its node's output folder)
        if dist.is_local_master():
            remove_stale_tmp(cfg.out_dir)
        ckpt, ckpt_path, notes = auto_resume(cfg.out_dir)
        for note in notes:
            self.console.warn(f'[auto-resume] skipped a broken checkpoint: {note}')
        self.start_ep, self.start_it = (ckpt['epoch'], ckpt['iter']) if ckpt else (0, 0)
        points = dist.allgather_object((self.start_ep, self.start_it))
        if len(set(points)) != 1:
            raise CheckpointError(f'the ranks found different resume points (epoch, iteration): {points}; '
                                  f'make the output folders of all nodes hold the same checkpoints')
        if self.start_it >= self.iters_train:  # the data set shrank since: start the next epoch
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

        # models, optimizer, trainer
        self.vae_local, self.var_wo_ddp, self.vae_cfg = build_models(args, cfg, self.num_classes, self.device)
        if self.pretok_meta is not None:
            with user_errors(ValueError):
                check_compatible(self.pretok_meta, args.pretok, cfg.patch_nums, self.vae_local.vocab_size,
                                 vae_fingerprint(self.vae_local), cfg.data_load_reso)
        var = self.var_wo_ddp
        if dist.is_initialized():
            var = DDP(var, device_ids=[self.device.index] if self.device.type == 'cuda' else None,
                      find_unused_parameters=False, broadcast_buffers=False)
        if args.tfast:
            mode = COMPILE_MODES[args.tfast]
            if mode == 'reduce-overhead' and args.ac > 1:
                # CUDA-graph trees hand back gradients in graph memory that the next micro-batch overwrites, which
                # breaks their accumulation into .grad
                self.console.warn('--tfast=1 (reduce-overhead: CUDA graphs) cannot accumulate gradients over --ac '
                                  'micro-batches; compiling VAR in the default mode instead')
                mode = 'default'
            var = torch.compile(var, mode=mode)
        if args.vfast:  # the tokenizer runs through img_to_idxBl, not forward: compile that method
            self.vae_local.img_to_idxBl = torch.compile(self.vae_local.img_to_idxBl, mode=COMPILE_MODES[args.vfast])
        groups = build_param_groups(self.var_wo_ddp.named_parameters())
        opt = torch.optim.AdamW(groups, lr=cfg.tlr, betas=(0.9, 0.95), weight_decay=0.0,
                                fused=args.afuse and self.device.type in ('cuda', 'cpu'))
        self.var_opt = AmpOptimizer(opt, list(self.var_wo_ddp.parameters()), self.device.type, fp16=args.fp16,
                                    grad_clip=args.tclip, n_gradient_accumulation=args.ac,
                                    max_nonfinite=args.max_nonfinite)
        self.trainer = VARTrainer(self.device, cfg.patch_nums, cfg.resos, self.vae_local, self.var_wo_ddp, var,
                                  self.var_opt, label_smooth=args.ls)
        self.best = {'vL_mean': math.inf, 'vL_tail': math.inf, 'vacc_mean': -1.0, 'vacc_tail': -1.0}
        self.cut_cycle = CutCycle()  # an accumulation cycle that an epoch end cuts: checkpoints point at its start
        if ckpt:
            self._restore(ckpt, ckpt_path)
            self.trainer.settle_ddp_buckets(cfg.batch_size)  # the first step reduces as the uninterrupted run's did

        # logs
        self.tb = TensorboardLogger(os.path.join(cfg.out_dir, cfg.tb_dir_name), enabled=dist.is_master(),
                                    purge_step=self.start_ep * self.iters_train + self.start_it if ckpt else None)
        self.log_txt = LogTxt(os.path.join(cfg.out_dir, 'log.txt'), enabled=dist.is_master())
        git = git_info(str(arg_util.REPO_ROOT))
        self.header = {'is_master': dist.is_master(), 'name': args.exp_name, 'cmd': ' '.join(sys.argv),
                       'commit': git['commit'], 'branch': git['branch'], 'tb_log_dir_path': self.tb.log_dir}
        self.log_txt.write(self.header)
        self.steps_file = open_steps_log(os.path.join(cfg.out_dir, 'steps.jsonl'),
                                         self.start_ep * self.iters_train + self.start_it) \
            if args.log_steps and dist.is_master() else None
        n_params = sum(p.numel() for p in self.var_wo_ddp.parameters())
        self.console.info(f'[init] world_size={self.world_size} device={self.device} classes={self.num_classes} '
                          f'train={len(train_set)} val={len(val_set)} iters/ep={self.iters_train} '
                          f'VAR params={n_params / 1e6:.2f}M {json.dumps(dataclasses.asdict(cfg))}')

    def _restore(self, ckpt: Dict[str, Any], path: str) -> None:
        """Auto-resume: weights, optimizer, scaler, progressive state, best metrics and every rank's RNG."""
        old_args = ckpt.get('args', {})
        changed = {k: (old_args[k], v) for k, v in vars(self.args).items() if k in old_args and old_args[k] != v}
        mismatch = describe_mismatch(self.var_wo_ddp, ckpt['trainer']['var_wo_ddp'], 'VAR checkpoint')
        if mismatch:
            flags = {k: v for k, v in changed.items() if k != 'unknown_args'}
            raise ConfigError(f'{path} belongs to a run of another configuration, so this one cannot resume from it. '
                              f'Flags that differ (that run, this one): {flags}. Pass that run\'s flags, or another '
                              f'--local_out_dir_path for a new run.\n{mismatch}')
        notes = self.trainer.load_state_dict(ckpt['trainer'], strict=False, skip_vae=True)
        rngs = ckpt.get('rng')
        if rngs is not None and len(rngs) == self.world_size:
            set_rng_state(rngs[self.rank])
        else:
            notes.append('the checkpoint was written with another number of processes: RNG states not restored, '
                         'the run continues but is not bit-identical to an uninterrupted one')
        self.best.update(ckpt.get('best', {}))
        if changed:
            notes.append(f'arguments changed since the checkpoint (old, new): {changed}')
        for note in notes:
            self.console.warn(f'[auto-resume] {note}')
        self.console.info(f'[auto-resume] loaded {path}: epoch {self.start_ep}, iteration {self.start_it}')

    def save(self, epoch: int, it: int, best_updated: bool = False) -> None:
        """Write ar-ckpt-last.pth (and ar-ckpt-best.pth) on every node's local master, atomically.

        When an epoch ends inside an accumulation cycle (--ac > 1), the checkpoint points at the cycle's first
        iteration, with the RNG and progressive-training state of that moment (see utils.ckpt.CutCycle).
        """
        check_ranks_agree(self.var_wo_ddp)
        trainer_state = self.trainer.state_dict()
        epoch, it, rng = self.cut_cycle.resume_point(epoch, it, trainer_state)
        state = {'epoch': epoch, 'iter': it, 'trainer': trainer_state, 'args': vars(self.args),
                 'derived': dataclasses.asdict(self.cfg), 'best': dict(self.best),
                 'model_config': dict(getattr(self.var_wo_ddp, 'build_config', {})), 'vae_config': self.vae_cfg,
                 'class_names': list(self.train_set.classes)}  # class id i is folder class_names[i]
        save_run_checkpoint(state, self.cfg.out_dir, LAST_NAME, BEST_NAME, best_updated, rng=rng)

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
            stats, img_per_s = self.train_one_ep(ep, first_it, ld_iter)
            record, remain = epoch_record(ep, args.ep, self.iters_train, stats, t_start, it_start)
            with self.tb.held():  # the epoch-axis events are written once the epoch's checkpoint is on disk
                best_updated = False
                if (ep + 1) % args.val_every_ep == 0 or ep + 1 == args.ep:
                    vL_mean, vL_tail, vacc_mean, vacc_tail, tot, secs = self.trainer.eval_ep(self.ld_val)
                    best_updated = self.best['vL_tail'] > vL_tail
                    self.best.update(vL_mean=min(self.best['vL_mean'], vL_mean),
                                     vL_tail=min(self.best['vL_tail'], vL_tail),
                                     vacc_mean=max(self.best['vacc_mean'], vacc_mean),
                                     vacc_tail=max(self.best['vacc_tail'], vacc_tail))
                    val = {'vL_mean': vL_mean, 'vL_tail': vL_tail, 'vacc_mean': vacc_mean, 'vacc_tail': vacc_tail}
                    record.update(val)
                    self.tb.scalars(ep + 1, 'AR_ep_loss', **val)
                    self.console.info(f'[ep{ep}] (val {tot} images, {secs:.1f}s) Lm: {vL_mean:.4f}, '
                                      f'Lt: {vL_tail:.4f}, Accm: {vacc_mean:.2f}, Acct: {vacc_tail:.2f}, '
                                      f'best Lt: {self.best["vL_tail"]:.4f}')
                    self.visualize(ep + 1)
                self.tb.scalars(ep + 1, 'AR_ep_loss',
                                **{k: stats[k] for k in ('L_mean', 'L_tail', 'acc_mean', 'acc_tail')})
                self.tb.scalars(ep + 1, 'AR_z_burnout', rest_hours=round(remain / 3600, 2))
                self.tb.scalars(ep + 1, 'AR_speed', img_per_s_per_process=img_per_s)
                self.console.info(f'[ep{ep}] (training) Lm: {stats["L_mean"]:.4f}, Lt: {stats["L_tail"]:.4f}, '
                                  f'Accm: {stats["acc_mean"]:.2f}, Acct: {stats["acc_tail"]:.2f}, '
                                  f'Remain: {record["remain_time"]}, Finish: {record["finish_time"]}')
                if ep + 1 == args.ep:  # the run is over: a last unfinished cycle is dropped, as officially
                    self.cut_cycle.start = None
                self.save(ep + 1, 0, best_updated)
            self.log_txt.write(self.header, record)
            self.tb.flush()
            self.stop.at_epoch_end(ep, args.ep)
        self.console.info(f'[fit] done: {args.ep} epochs, best val Lt {self.best["vL_tail"]:.4f}, '
                          f'{self.var_opt.num_skipped} skipped step(s), '
                          f'{self.train_set.num_skipped} unreadable image read(s) skipped by this rank')

    def train_one_ep(self, ep: int, first_it: int, ld_iter) -> Tuple[Dict[str, float], Optional[float]]:
        """Iterations [first_it, iters_train) of epoch `ep`; returns the epoch's averaged meters and its images/s per
        process (None when fewer than two iterations ran)."""
        args, cfg, trainer = self.args, self.cfg, self.trainer
        iters, max_it = self.iters_train, args.ep * self.iters_train
        wp_it = round(cfg.wp * iters)
        me = MetricLogger()
        me.add_meter('tlr', SmoothedValue(window=1, fmt='{value:.2g}'))
        me.add_meter('tnm', SmoothedValue(window=1, fmt='{value:.2f}'))
        for name in ('Lm', 'Lt'):
            me.add_meter(name, SmoothedValue(fmt='{median:.4f} ({global_avg:.4f})'))
        for name in ('Accm', 'Acct'):
            me.add_meter(name, SmoothedValue(fmt='{median:.2f} ({global_avg:.2f})'))
        log_its = log_iters(iters, first_it)
        bar = tqdm(total=iters, initial=first_it, desc=f'[Ep {ep}/{args.ep}]', disable=not dist.is_master(),
                   mininterval=1.0 if sys.stderr.isatty() else 60.0, dynamic_ncols=True, leave=False)
        t0 = time.time()
        lr_wd = grad_norm = None
        for it in range(first_it, iters):
            g_it = ep * iters + it
            self.cut_cycle.begin_iteration(ep, it, iters, args.ac, lambda: {'config': self.trainer.progressive_state()})
            inp, label_B = next(ld_iter)  # images, or token ids with --pretok
            inp = inp.to(self.device, non_blocking=True)
            label_B = label_B.to(self.device, non_blocking=True)
            stepping = (g_it + 1) % args.ac == 0
            lr_wd = lr_wd_annealing(cfg.sche, self.var_opt.optimizer, cfg.tlr, args.twd, cfg.twde, g_it, wp_it,
                                    max_it, wp0=args.wp0, wpe=args.wpe)
            prog_si = progressive_si(g_it, wp_it, max_it, args.pg, args.pg0, len(cfg.patch_nums))
            tb_now = g_it == 0 or (g_it + 1) % args.tb_every_iters == 0
            skipped_before = self.var_opt.num_skipped
            out = trainer.train_step(stepping, inp, label_B, prog_si=prog_si, prog_wp_it=cfg.pgwp * iters,
                                     metrics=it in log_its, details=tb_now)
            self.cut_cycle.end_iteration(stepping)
            if out['grad_norm'] is not None:
                grad_norm = out['grad_norm']
            me.update(tlr=lr_wd[1])
            if it in log_its:
                me.update(Lm=out['Lm'], Lt=out['Lt'], Accm=out['Accm'], Acct=out['Acct'], tnm=out['grad_norm'])
                eta = (time.time() - t0) / (it - first_it + 1) * (iters - it - 1)
                self.console.info(f'[Ep]: [{ep:4d}/{args.ep}]  [{it:4d}/{iters}]  eta: {format_seconds(eta)}  {me}')
            if self.var_opt.num_skipped > skipped_before:
                self.console.warn(f'[step {g_it}] non-finite loss or gradient (grad norm {out["grad_norm"]}): step '
                                  f'skipped ({self.var_opt.consecutive_skipped} in a row, '
                                  f'{self.var_opt.num_skipped} in total)')
            if tb_now:
                self.log_tb_iter(g_it, out, lr_wd)
            if self.steps_file is not None:
                self.steps_file.write(json.dumps({'g_it': g_it, 'ep': ep, 'it': it, 'loss': out['loss'].item(),
                                                  'grad_norm': out['grad_norm'], 'lr': lr_wd[1],
                                                  'wd': lr_wd[3]}) + '\n')
                self.steps_file.flush()
            bar.update(1)
            if it == first_it:
                t_after_first = time.time()  # throughput excludes the first (warm-up / compile) iteration
            if stepping:  # SIGINT / SIGTERM on any rank: save at this cycle boundary
                self.stop.at_cycle_end(ep, it, iters, self.save)
            every = args.ckpt_every_iters
            # Only at the end of an accumulation cycle and outside a streak of skipped steps; the end-of-epoch
            # checkpoint covers it + 1 == iters.
            if every > 0 and (g_it + 1) % every == 0 and stepping and it + 1 < iters \
                    and self.var_opt.consecutive_skipped == 0:
                self.save(ep, it + 1)
        bar.close()
        img_per_s = None
        if iters - first_it > 1:
            if self.device.type == 'cuda':
                torch.cuda.synchronize(self.device)
            img_per_s = (iters - first_it - 1) * cfg.batch_size / (time.time() - t_after_first)
            peak = f', peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB' \
                if self.device.type == 'cuda' else ''
            self.console.info(f'[ep{ep}] speed: {img_per_s:.1f} images/s per process{peak}')
        me.synchronize_between_processes(self.device)
        avg = me.global_avgs()
        # the epoch's grad norm is the meter's average over the logged stepping iterations (official `tnm`)
        tnm = avg['tnm'] if me.meters['tnm'].count else grad_norm
        return {'lr': lr_wd[1] if lr_wd else None, 'wd': lr_wd[3] if lr_wd else None, 'grad_norm': tnm,
                'L_mean': avg.get('Lm', -1.0), 'L_tail': avg.get('Lt', -1.0), 'acc_mean': avg.get('Accm', -1.0),
                'acc_tail': avg.get('Acct', -1.0)}, img_per_s

    def log_tb_iter(self, g_it: int, out: Dict[str, Any], lr_wd: Tuple[float, float, float, float]) -> None:
        min_lr, max_lr, min_wd, max_wd = lr_wd
        self.tb.scalars(g_it, 'AR_opt_lr', **{'lr_min/sche_tlr': min_lr, 'lr_max/sche_tlr': max_lr})
        self.tb.scalars(g_it, 'AR_opt_wd', **{'wd_max/sche_twd': max_wd, 'wd_min/sche_twd': min_wd})
        self.tb.scalars(g_it, 'AR_opt_grad', **{'fp16/scale_log2': out['scale_log2'],
                                                'nonfinite/skipped_total': self.var_opt.num_skipped})
        if self.args.tclip > 0:
            self.tb.scalars(g_it, 'AR_opt_grad',
                            **{'grad/grad_norm': out['grad_norm'], 'grad/grad_clip': self.args.tclip})
        steps = (-10000, -1000, g_it) if g_it == 0 else (g_it,)
        for step in steps:
            self.tb.scalars(step, 'AR_iter_loss', z_voc_usage=out['voc_usage'])
        self.tb.scalars(g_it, 'AR_iter_loss', **out['per_scale'])
        prog_si = out['prog_si']
        self.tb.scalars(g_it, 'AR_iter_schedule', prog_a_reso=self.cfg.resos[prog_si], prog_si=prog_si,
                        prog_wp=out['prog_wp'])

    def visualize(self, step: int) -> None:
        """A grid of class-conditional samples in TensorBoard (master only; uses its own seeded generator)."""
        if not dist.is_master():
            return
        label_B = torch.linspace(0, self.num_classes - 1, VIS_SAMPLES).round().long().to(self.device)
        img_B3HW = self.trainer.sample_images(label_B, g_seed=self.args.seed if self.args.seed is not None else 0)
        self.tb.image('AR_samples/cfg1.5', make_grid(img_B3HW.cpu(), nrow=VIS_SAMPLES // 2), step)

    def close(self) -> None:
        if self.steps_file is not None:
            self.steps_file.close()
        self.tb.close()


def report_error(run: Optional[Run], err: Exception) -> None:
    if run is not None and dist.is_master():
        run.console.warn(f'[error] {err}')
    else:
        print(f'[rank {dist.get_rank()}] {err}', file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = arg_util.parse_args(argv)
    dist.initialize(backend='gloo' if args.device == 'cpu' else None)  # NCCL cannot reduce CPU tensors
    run = None
    try:
        run = Run(args)
        run.fit()
        dist.barrier()
        return 0
    except StopTraining as e:  # SIGINT / SIGTERM: the checkpoint is written
        if run is not None and dist.is_master():
            run.console.info(f'[stop] {e}')
        return 130
    except NonFiniteError as e:  # raised on every rank at the same step: gradients are synchronised
        report_error(run, e)
        return 3
    except CheckpointError as e:
        report_error(run, e)
        return 4
    except ConfigError as e:  # a wrong path, flag or checkpoint: the message says what to change
        report_error(run, e)
        return 2
    except models.HubDownloadError as e:  # offline without --vae_ckpt: the message says what to pass
        report_error(run, e)
        return 2
    finally:
        if run is not None:
            run.close()
        dist.finalize()


if __name__ == '__main__':
    sys.exit(main())
