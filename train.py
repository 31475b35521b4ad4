# Trains VAR (arXiv 2404.02905) with the official recipe (see docs/architecture.md).
"""Train VAR on an ImageNet-style folder, in one process or under torchrun (NCCL on GPU, gloo on CPU).

    torchrun --nproc_per_node=8 train.py --depth=16 --bs=768 --ep=200 --fp16=1 --alng=1e-3 --wpe=0.1 \
        --data_path=/path/to/imagenet [--vae_ckpt=vae_ch160v4096z32.pth]
    python train.py ...          # the same, in a single process
    python train.py ... --pretok=/path/to/tokens   # from a set written by pretokenize.py (fixed crops, faster)

Re-running the same command resumes from the newest checkpoint in the output folder at the exact iteration.
"""
import math
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import make_grid

import dist
import models
from models.basic_var import flex_block_mask
from models.inspect_ckpt import describe_mismatch
from models.loading import official_vae_path
from models.lowp import EncoderCopy
from models.vqvae import downsample_factor
from trainer import VARTrainer
from utils import arg_util
from utils.amp_sc import AmpOptimizer
from utils.ckpt import BEST_NAME, CKPT_GLOB, LAST_NAME
from utils.ckpt_sharded import SHARDS_KEY, load_full_into, load_sharded
from utils.data import build_dataset
from utils.fsdp import checkpoint_blocks, shard_model
from utils.lr_control import build_param_groups, lr_wd_annealing, progressive_si
from utils.pretok import TOKEN_CONFIG_KEYS, build_pretok_dataset, check_compatible, vae_fingerprint
from utils.run import TrainingRun, main_of
from utils.run_logs import LogLayout, StepScalars, tags
from utils.runtime import ConfigError, user_errors

COMPILE_MODES = {1: 'reduce-overhead', 2: 'max-autotune', 3: 'default'}
VIS_SAMPLES = 8  # class-conditional samples written to TensorBoard at each validation
LOSS_FMT, ACC_FMT = '{median:.4f} ({global_avg:.4f})', '{median:.2f} ({global_avg:.2f})'


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
    arg_util.check_patch_size(args.patch_size, downsample_factor(vae_cfg['ch_mult']), vae_path)
    vae_local, var_wo_ddp = models.build_vae_var(
        device=device, patch_nums=cfg.patch_nums, V=vae_cfg['vocab_size'], Cvae=vae_cfg['z_channels'],
        ch=vae_cfg['ch'], share_quant_resi=vae_cfg['share_quant_resi'], num_classes=num_classes, depth=args.depth,
        shared_aln=args.saln, attn_l2_norm=args.anorm, flash_if_available=args.fuse, fused_if_available=args.fuse,
        init_adaln=args.aln, init_adaln_gamma=args.alng, init_head=args.hd, init_std=args.ini,
        ch_mult=vae_cfg['ch_mult'], embed_dim=args.width or None, attn_impl='flex' if args.flex else 'sdpa')
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
        for _, ed in var_wo_ddp.begin_ends:  # build the block masks eagerly, outside any compiled region
            flex_block_mask(var_wo_ddp.patch_nums, ed, var_wo_ddp.lvl_1L.device)
    return vae_local, var_wo_ddp, vae_cfg


class Run(TrainingRun):
    """One VAR training run on the spine of utils.run: data, models, trainer, and what is VAR's own in the loop."""

    last_name, best_name, ckpt_glob = LAST_NAME, BEST_NAME, CKPT_GLOB
    # the official console meters and epoch record: the epoch's grad norm is the average over the logged stepping
    # iterations (`tnm`), its lr and wd those of its last iteration
    layout = LogLayout(
        meters={'tlr': (1, '{value:.2g}'), 'tnm': (1, '{value:.2f}'), 'Lm': (20, LOSS_FMT), 'Lt': (20, LOSS_FMT),
                'Accm': (20, ACC_FMT), 'Acct': (20, ACC_FMT)},
        epoch={'tnm': ('grad_norm', None), 'Lm': ('L_mean', '.4f'), 'Lt': ('L_tail', '.4f'),
               'Accm': ('acc_mean', '.2f'), 'Acct': ('acc_tail', '.2f')},
        epoch_head='AR_ep_loss', lr_wd=True, speed_tags=('AR_z_burnout/rest_hours', 'AR_speed/img_per_s_per_process'),
        summary='best val Lt {best[vL_tail]:.4f}, {skipped} skipped step(s), {unreadable} unreadable image read(s) '
                'skipped by this rank')

    def __init__(self, args):
        # process: rank, device, console, seeds (cudnn benchmark unless progressive), TF32
        super().__init__(args, arg_util.derive, cudnn_benchmark=args.pg == 0)
        cfg = self.cfg
        if args.tlr is not None:
            self.console.warn(f'--tlr={args.tlr} is ignored: the peak lr is ac*tblr*bs/256 = {cfg.tlr:g} (official)')

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
        names = ', '.join(f'{i}: {c}' for i, c in enumerate(train_set.classes[:5]))
        order = getattr(train_set, 'class_order', 'sorted folder order')  # a token set (--pretok) does not say
        self.console.info(f'[data] {len(train_set.classes)} classes, ids in {order} ({names}'
                          f'{", ..." if len(train_set.classes) > 5 else ""}); the checkpoint keeps the list as '
                          f"'class_names'")
        if cfg.workers == 0 and not args.pretok and len(train_set) > 50_000:
            self.console.warn(f'--workers=0 (the official default): {len(train_set)} images will be decoded and '
                              f'resized in the training process itself; pass e.g. --workers=8 (per process)')
        self.train_set, self.val_set = train_set, val_set

        # models, optimizer, trainer
        self.vae_local, self.var_wo_ddp, self.vae_cfg = build_models(args, cfg, self.num_classes, self.device)
        if self.pretok_meta is not None:
            with user_errors(ValueError):
                check_compatible(self.pretok_meta, args.pretok, cfg.patch_nums, self.vae_local.vocab_size,
                                 vae_fingerprint(self.vae_local), cfg.data_load_reso)
        var = self.var_wo_ddp
        if args.act_ckpt:
            checkpoint_blocks(var.blocks)
        if args.fsdp:
            shard_model(var, self.device, args.fp16)  # in place: var_wo_ddp is the FSDP module (no DDP around it)
        elif dist.is_initialized():
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
            if mode == 'reduce-overhead' and args.fsdp:
                # FSDP gathers and frees weights around every block, which a captured CUDA graph cannot replay
                self.console.warn('--tfast=1 (reduce-overhead: CUDA graphs) does not compose with --fsdp 1; compiling '
                                  'VAR in the default mode instead')
                mode = 'default'
            var = torch.compile(var, mode=mode)
        encode = None  # the tokenizer's own img_to_idxBl
        if args.vbf16:
            encode = EncoderCopy(self.vae_local, torch.bfloat16).img_to_idxBl
        if args.vfast:  # the tokenizer runs through img_to_idxBl, not forward: compile that method
            encode = torch.compile(encode or self.vae_local.img_to_idxBl, mode=COMPILE_MODES[args.vfast])
        groups = build_param_groups(self.var_wo_ddp.named_parameters())
        opt = torch.optim.AdamW(groups, lr=cfg.tlr, betas=(0.9, 0.95), weight_decay=0.0,
                                fused=args.afuse and self.device.type in ('cuda', 'cpu'))
        self.var_opt = AmpOptimizer(opt, list(self.var_wo_ddp.parameters()), self.device.type, fp16=args.fp16,
                                    grad_clip=args.tclip, n_gradient_accumulation=args.ac,
                                    max_nonfinite=args.max_nonfinite, sharded=args.fsdp)
        self.trainer = VARTrainer(self.device, cfg.patch_nums, cfg.resos, self.vae_local, self.var_wo_ddp, var,
                                  self.var_opt, label_smooth=args.ls,
                                  eval_in_autocast=args.fsdp and args.fp16 > 0, encode=encode)
        self.optimizers = [self.var_opt]
        self.best = {'vL_mean': math.inf, 'vL_tail': math.inf, 'vacc_mean': -1.0, 'vacc_tail': -1.0}

        # the schedules' iteration counts: the lr/wd warm-up is rounded (inside the official lr_wd_annealing), the
        # progressive stages and their per-stage warm-up use the unrounded products (official train_one_ep)
        self.wp_it_float = cfg.wp * self.iters_train
        self.wp_it = round(self.wp_it_float)
        self.prog_wp_it = cfg.pgwp * self.iters_train
        n_params = sum(p.numel() for p in self.var_wo_ddp.parameters())
        self.about = f'classes={self.num_classes} VAR params={n_params / 1e6:.2f}M'

    # ------------------------------------------------------------------ checkpoints
    def load_trainer_state(self, ckpt: Dict[str, Any], path: str, changed: Dict[str, Tuple[Any, Any]]) -> List[str]:
        flags = {k: v for k, v in changed.items() if k != 'unknown_args'}
        if SHARDS_KEY in ckpt:  # an FSDP checkpoint: weights and optimizer resharded for this run (FSDP or not)
            try:
                load_sharded(ckpt, path, self.var_wo_ddp, self.var_opt.optimizer)
            except ValueError as e:
                raise ConfigError(f'{path} belongs to a run of another configuration, so this one cannot resume '
                                  f'from it. Flags that differ (that run, this one): {flags}.\n{e}') from e
            return self.trainer.load_state_dict(ckpt['trainer'], strict=False, skip_vae=True)
        mismatch = describe_mismatch(self.var_wo_ddp, ckpt['trainer']['var_wo_ddp'], 'VAR checkpoint')
        if mismatch:
            raise ConfigError(f'{path} belongs to a run of another configuration, so this one cannot resume from it. '
                              f'Flags that differ (that run, this one): {flags}. Pass that run\'s flags, or another '
                              f'--local_out_dir_path for a new run.\n{mismatch}')
        if self.args.fsdp:  # a single-file (DDP) checkpoint into FSDP: every rank keeps its shards of the full state
            trainer_state = dict(ckpt['trainer'])
            var_opt_state = dict(trainer_state['var_opt'])
            with user_errors(ValueError):
                load_full_into(self.var_wo_ddp, self.var_opt.optimizer, trainer_state.pop('var_wo_ddp'),
                               var_opt_state.pop('optimizer'))
            return self.trainer.load_state_dict({**trainer_state, 'var_opt': var_opt_state}, strict=False,
                                                skip_vae=True)
        return self.trainer.load_state_dict(ckpt['trainer'], strict=False, skip_vae=True)

    def settle_ddp_buckets(self) -> None:
        self.trainer.settle_ddp_buckets(self.cfg.batch_size)

    def replicated_modules(self) -> List[torch.nn.Module]:
        return [] if self.args.fsdp else [self.var_wo_ddp]  # FSDP ranks hold different shards by design

    def sharded_state(self) -> Optional[Tuple[torch.nn.Module, torch.optim.Optimizer]]:
        return (self.var_wo_ddp, self.var_opt.optimizer) if self.args.fsdp else None

    def checkpoint_extras(self) -> Dict[str, Any]:
        return {'model_config': dict(getattr(self.var_wo_ddp, 'build_config', {})), 'vae_config': self.vae_cfg,
                'class_names': list(self.train_set.classes)}  # class id i is folder class_names[i]

    def cycle_patch(self) -> Dict[str, Dict[str, Any]]:
        return {'config': self.trainer.progressive_state()}

    # ------------------------------------------------------------------ one iteration
    def step(self, batch, g_it: int, stepping: bool, metrics: bool, tb: bool) -> StepScalars:
        """The schedules at `g_it`, then VARTrainer's step."""
        args, cfg = self.args, self.cfg
        inp, label_B = batch  # images, or token ids with --pretok
        inp = inp.to(self.device, non_blocking=True)
        label_B = label_B.to(self.device, non_blocking=True)
        lr_wd = lr_wd_annealing(cfg.sche, self.var_opt.optimizer, cfg.tlr, args.twd, cfg.twde, g_it, self.wp_it,
                                self.max_it, wp0=args.wp0, wpe=args.wpe)
        prog_si = progressive_si(g_it, self.wp_it_float, self.max_it, args.pg, args.pg0, len(cfg.patch_nums))
        out = self.trainer.train_step(stepping, inp, label_B, prog_si=prog_si, prog_wp_it=self.prog_wp_it,
                                      metrics=metrics, details=tb)
        meters = {'tlr': lr_wd[1]}
        if metrics:
            meters.update(Lm=out['Lm'], Lt=out['Lt'], Accm=out['Accm'], Acct=out['Acct'], tnm=out['grad_norm'])
        if tb and g_it == 0:  # official: the first vocabulary usage is also drawn at steps -10000 and -1000
            for step in (-10000, -1000):
                self.tb.scalars(step, 'AR_iter_loss', z_voc_usage=out['voc_usage'])
        return StepScalars(out['loss'], out['grad_norm'], lr=lr_wd[1], wd=lr_wd[3], meters=meters,
                           tb=self.tb_scalars(out, lr_wd) if tb else {})

    def tb_scalars(self, out: Dict[str, Any], lr_wd: Tuple[float, float, float, float]) -> Dict[str, Any]:
        """The official TensorBoard scalars of an iteration, by tag."""
        min_lr, max_lr, min_wd, max_wd = lr_wd
        grad = {'grad/grad_norm': out['grad_norm'], 'grad/grad_clip': self.args.tclip} if self.args.tclip > 0 else {}
        prog_si = out['prog_si']
        return {**tags('AR_opt_lr', **{'lr_min/sche_tlr': min_lr, 'lr_max/sche_tlr': max_lr}),
                **tags('AR_opt_wd', **{'wd_max/sche_twd': max_wd, 'wd_min/sche_twd': min_wd}),
                **tags('AR_opt_grad', **{'fp16/scale_log2': out['scale_log2'],
                                         'nonfinite/skipped_total': self.var_opt.num_skipped}, **grad),
                **tags('AR_iter_loss', z_voc_usage=out['voc_usage'], **out['per_scale']),
                **tags('AR_iter_schedule', prog_a_reso=self.cfg.resos[prog_si], prog_si=prog_si,
                       prog_wp=out['prog_wp'])}

    # ------------------------------------------------------------------ epoch end
    def validate(self, ep: int, record: Dict[str, Any]) -> bool:
        vL_mean, vL_tail, vacc_mean, vacc_tail, tot, secs = self.trainer.eval_ep(self.ld_val)
        best_updated = self.best['vL_tail'] > vL_tail
        self.best.update(vL_mean=min(self.best['vL_mean'], vL_mean), vL_tail=min(self.best['vL_tail'], vL_tail),
                         vacc_mean=max(self.best['vacc_mean'], vacc_mean),
                         vacc_tail=max(self.best['vacc_tail'], vacc_tail))
        val = {'vL_mean': vL_mean, 'vL_tail': vL_tail, 'vacc_mean': vacc_mean, 'vacc_tail': vacc_tail}
        record.update(val)
        self.tb.scalars(ep + 1, 'AR_ep_loss', **val)
        self.console.info(f'[ep{ep}] (val {tot} images, {secs:.1f}s) Lm: {vL_mean:.4f}, Lt: {vL_tail:.4f}, '
                          f'Accm: {vacc_mean:.2f}, Acct: {vacc_tail:.2f}, best Lt: {self.best["vL_tail"]:.4f}')
        self.visualize(ep + 1)
        return best_updated

    def visualize(self, step: int) -> None:
        """A grid of class-conditional samples in TensorBoard (written by the master; uses its own seeded generator).
        Under FSDP every rank samples, since each block gathers its weights from all ranks."""
        if not dist.is_master() and not self.args.fsdp:
            return
        label_B = torch.linspace(0, self.num_classes - 1, VIS_SAMPLES).round().long().to(self.device)
        img_B3HW = self.trainer.sample_images(label_B, g_seed=self.args.seed if self.args.seed is not None else 0)
        self.tb.image('AR_samples/cfg1.5', make_grid(img_B3HW.cpu(), nrow=VIS_SAMPLES // 2), step)


def main(argv=None) -> int:
    """Train VAR; returns the exit code (0 done, 2 a set-up mistake, 3 non-finite steps, 4 checkpoints of the ranks
    disagree, 130 stopped on request), see utils.run.main_of."""
    return main_of(Run, arg_util.parse_args(argv), user_error_types=(models.HubDownloadError,))


if __name__ == '__main__':
    sys.exit(main())
