"""The life cycle of a training run, written once for train.py (VAR) and train_vae.py (its tokenizer).

`TrainingRun` holds what every run has: this process's place (rank, device, seeds, TF32), the console, the resume
point that every rank must agree on, the loaders positioned at it, the restore, the DDP bucket warm-up, the logs
(utils/run_logs.py, from the scalars each step returns; TensorBoard held until the epoch's checkpoint is on disk), the
graceful stop, the periodic and epoch checkpoints (none during a streak of skipped steps) and the epoch loop. A recipe
subclasses it, builds its parts in its constructor and supplies the abstract methods: one iteration (`step`),
validation, and its side of a checkpoint. `main_of` runs one and maps its errors to exit codes, the same for both.
"""
import abc
import dataclasses
import gc
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import dist
from utils.amp_sc import AmpOptimizer, NonFiniteError
from utils.ckpt import CheckpointError, CutCycle, auto_resume, remove_stale_tmp, save_run_checkpoint, set_rng_state
from utils.ckpt_sharded import (check_folder_shared, complete_shard_positions, remove_unreferenced_shards,
                                save_sharded_run_checkpoint)
from utils.data_sampler import DistInfiniteBatchSampler, EvalDistributedSampler
from utils.fsdp import release_process_groups
from utils.logging import Console, TensorboardLogger, epoch_record, format_seconds, log_iters
from utils.run_lock import FolderLock, FolderLockedError
from utils.run_logs import LogLayout, RunLogs, StepScalars
from utils.runtime import (ConfigError, GracefulStop, StopTraining, check_ranks_agree, rank_generator,
                           resolve_device, seed_everything, set_tf32, user_errors)


class TrainingRun(abc.ABC):
    """One training run.

    A recipe's constructor calls `super().__init__` (this process: rank, device, output folder, console, seeds), then
    builds its parts in its own order and sets the attributes annotated below; `fit` does the rest: the resume point,
    the loaders, the restore, the logs and the epochs. Its class names its checkpoint files, the progress bar's label
    and the `LogLayout` of its scalars.
    """

    last_name = best_name = ckpt_glob = ''
    bar_name = 'Ep'  # the progress bar's and the iteration log's label
    layout = LogLayout()
    # set by the recipe's constructor
    train_set: Dataset  # from then on `iters_train` and `max_it` are known
    val_set: Dataset
    trainer: Any  # with state_dict()
    optimizers: List[AmpOptimizer]  # the main one first: its skipped steps are reported
    best: Dict[str, float]  # the best validation metrics so far
    about: str  # the recipe's part of the `[init]` line

    def __init__(self, args, derive: Callable[[Any, int], Any], cudnn_benchmark: bool):
        self.args = args
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        with user_errors(ValueError):  # flags that do not fit together (e.g. --bs too small for the processes)
            self.cfg = cfg = derive(args, self.world_size)
        self.device = resolve_device(args.device)
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.lock = lock_output_folder(cfg.out_dir)  # before anything is written there
        self.console = Console(cfg.out_dir, enabled=dist.is_master())
        for note in self.lock.notes:
            self.console.warn(f'[lock] {note}')
        if getattr(args, 'fsdp', False) and self.world_size > 1:  # train.py's sharded checkpoints
            check_folder_shared(cfg.out_dir)
        self.stop = GracefulStop(self.device)
        if getattr(args, 'unknown_args', None):
            self.console.warn(f'ignoring unknown arguments (typos?): {args.unknown_args}')
        seed_everything(args.seed, self.rank, self.world_size, benchmark=cudnn_benchmark)
        set_tf32(args.tf32)
        self.cut_cycle = CutCycle()  # an accumulation cycle that an epoch end cuts: checkpoints point at its start
        self.logs: Optional[RunLogs] = None

    @property
    def iters_train(self) -> int:
        return math.ceil(len(self.train_set) / self.cfg.glb_batch_size)

    @property
    def max_it(self) -> int:
        return self.args.ep * self.iters_train

    @property
    def resume_g_it(self) -> int:
        """The global iteration this run starts at (0 for a new run)."""
        return self.start_ep * self.iters_train + self.start_it

    @property
    def tb(self) -> TensorboardLogger:
        """TensorBoard, for what validation shows."""
        return self.logs.tb

    # ------------------------------------------------------------------ the recipe's own
    @abc.abstractmethod
    def step(self, batch: Any, g_it: int, stepping: bool, metrics: bool, tb: bool) -> StepScalars:
        """One iteration -> its scalars; with the meters if `metrics`, the TensorBoard tags if `tb` (a collective)."""

    @abc.abstractmethod
    def validate(self, ep: int, record: Dict[str, Any]) -> bool:
        """Validation after epoch `ep` (its logs, `record`, `self.best`); True when the best improved."""

    @abc.abstractmethod
    def load_trainer_state(self, ckpt: Dict[str, Any], path: str, changed: Dict[str, Tuple[Any, Any]]) -> List[str]:
        """Restore the trainer from `ckpt['trainer']` (raise ConfigError when it cannot); returns notes."""

    @abc.abstractmethod
    def settle_ddp_buckets(self) -> None:
        """After a restore, the trainer's throwaway zero-weighted backward (utils.ddp.settle_ddp_buckets)."""

    @abc.abstractmethod
    def replicated_modules(self) -> List[torch.nn.Module]:
        """The trained modules whose replicas must agree across ranks before a save."""

    @abc.abstractmethod
    def checkpoint_extras(self) -> Dict[str, Any]:
        """What the checkpoint holds besides position, trainer, args, derived values and best metrics."""

    @abc.abstractmethod
    def cycle_patch(self) -> Dict[str, Dict[str, Any]]:
        """The trainer state that forward passes change, as a patch of its state dict (see utils.ckpt.CutCycle)."""

    def sharded_state(self) -> Optional[Tuple[torch.nn.Module, torch.optim.Optimizer]]:
        """(model, optimizer) whose state a sharded checkpoint holds (utils/ckpt_sharded.py), or None (the default:
        single-file checkpoints). A trainer that supports it returns them under --fsdp 1, and then saves the rest
        through `trainer.state_dict(weights=False)`."""
        return None

    # ------------------------------------------------------------------ set-up (`fit`)
    def open_data(self) -> None:
        """The resume point (every rank reads its node's output folder; all must agree) and the loaders, positioned at
        that point."""
        args, cfg = self.args, self.cfg
        if dist.is_local_master():
            remove_stale_tmp(cfg.out_dir)
        self.ckpt, self.ckpt_path, skipped = auto_resume(cfg.out_dir, self.ckpt_glob)
        self.start_ep, self.start_it = (self.ckpt['epoch'], self.ckpt['iter']) if self.ckpt else (0, 0)
        if skipped:
            self.console.warn(skipped_note(skipped, self.ckpt_path, self.start_ep, self.start_it, self.iters_train,
                                           cfg.out_dir))
        check_same_resume_point((self.start_ep, self.start_it))
        if self.start_it >= self.iters_train:  # the data set shrank since: start the next epoch
            self.start_ep, self.start_it = self.start_ep + 1, 0
        sampler = DistInfiniteBatchSampler(self.world_size, self.rank, len(self.train_set), cfg.glb_batch_size,
                                           same_seed_for_all_ranks=args.same_seed_for_all_ranks, fill_last=True,
                                           shuffle=True, start_ep=self.start_ep, start_it=self.start_it,
                                           aug_seed=args.seed)
        pin = self.device.type == 'cuda'
        self.ld_train = DataLoader(self.train_set, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=pin,
                                   generator=rank_generator(args.seed, self.rank, self.world_size))
        self.ld_val = DataLoader(self.val_set, batch_size=cfg.val_batch_size, num_workers=0, pin_memory=pin,
                                 drop_last=False, sampler=EvalDistributedSampler(self.val_set, self.world_size,
                                                                                 self.rank))

    def resume(self) -> None:
        """From the checkpoint found by `open_data`, if any: the trainer's state, every rank's RNG, the best metrics;
        then the DDP bucket warm-up, so that the first step reduces as the uninterrupted run's did."""
        if self.ckpt is None:
            return
        ckpt, path = self.ckpt, self.ckpt_path
        old_args = ckpt.get('args', {})
        changed = {k: (old_args[k], v) for k, v in vars(self.args).items() if k in old_args and old_args[k] != v}
        notes = self.load_trainer_state(ckpt, path, changed)
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
        self.settle_ddp_buckets()
        self.ckpt = None  # the weights now live in the models

    def open_logs(self) -> None:
        """log.txt, TensorBoard and steps.jsonl (utils.run_logs.RunLogs), and the `[init]` line."""
        args, cfg = self.args, self.cfg
        self.logs = RunLogs(self.layout, self.console, cfg.out_dir, cfg.tb_dir_name, args.exp_name, self.resume_g_it,
                            resumed=self.ckpt_path is not None, log_steps=args.log_steps)
        self.console.info(f'[init] world_size={self.world_size} device={self.device} train={len(self.train_set)} '
                          f'val={len(self.val_set)} iters/ep={self.iters_train} {self.about} '
                          f'{json.dumps(dataclasses.asdict(cfg))}')

    # ------------------------------------------------------------------ checkpoints
    def save(self, epoch: int, it: int, best_updated: bool = False) -> None:
        """The last (and on a better validation, the best) checkpoint on every node's local master, atomically.

        When an epoch ends inside an accumulation cycle (--ac > 1), the checkpoint points at the cycle's first
        iteration, with the RNG and the trainer state of that moment (see utils.ckpt.CutCycle).
        """
        for module in self.replicated_modules():
            check_ranks_agree(module)
        sharded = self.sharded_state()
        trainer_state = self.trainer.state_dict() if sharded is None else self.trainer.state_dict(weights=False)
        epoch, it, rng = self.cut_cycle.resume_point(epoch, it, trainer_state)
        state = {'epoch': epoch, 'iter': it, 'trainer': trainer_state, 'args': vars(self.args),
                 'derived': dataclasses.asdict(self.cfg), 'best': dict(self.best), **self.checkpoint_extras()}
        if sharded is None:
            save_run_checkpoint(state, self.cfg.out_dir, self.last_name, self.best_name, best_updated, rng=rng)
            if dist.is_local_master():  # a run that resumed a sharded checkpoint leaves its folders behind
                remove_unreferenced_shards(self.cfg.out_dir, self.last_name, self.best_name)
        else:
            save_sharded_run_checkpoint(state, *sharded, self.cfg.out_dir, self.last_name, self.best_name,
                                        best_updated, rng=rng)

    def may_save_periodically(self, g_it: int, it: int, stepping: bool) -> bool:
        """--ckpt_every_iters: only at the end of an accumulation cycle, never during a streak of skipped
        (non-finite) steps, and not at an epoch's last iteration (the epoch-end checkpoint covers it)."""
        every = self.args.ckpt_every_iters
        return every > 0 and (g_it + 1) % every == 0 and stepping and it + 1 < self.iters_train \
            and all(opt.consecutive_skipped == 0 for opt in self.optimizers)

    # ------------------------------------------------------------------ loop
    def fit(self) -> None:
        self.open_data()  # the resume point (the same on every rank) and the loaders
        self.resume()  # weights, optimizers, RNG, best metrics; DDP buckets settled
        self.open_logs()
        if self.start_ep >= self.args.ep:
            self.console.info(f'[fit] nothing to do: the checkpoint is at epoch {self.start_ep} of {self.args.ep}')
            return
        with self.stop:
            self.fit_epochs()

    def fit_epochs(self) -> None:
        args, logs = self.args, self.logs
        ld_iter = iter(self.ld_train)
        t_start, it_start = time.time(), self.resume_g_it
        for ep in range(self.start_ep, args.ep):
            first_it = self.start_it if ep == self.start_ep else 0
            stats, img_per_s = self.train_one_ep(ep, first_it, ld_iter)
            record, remain = epoch_record(ep, args.ep, self.iters_train, stats, t_start, it_start)
            with logs.tb.held():  # the epoch-axis events are written once the epoch's checkpoint is on disk
                best_updated = False
                if (ep + 1) % args.val_every_ep == 0 or ep + 1 == args.ep:
                    best_updated = self.validate(ep, record)
                logs.epoch(ep, stats, record, remain, img_per_s)
                if ep + 1 == args.ep:  # the run is over: a last unfinished cycle is dropped, as officially
                    self.cut_cycle.start = None
                self.save(ep + 1, 0, best_updated)
            logs.write_record(record)
            self.stop.at_epoch_end(ep, args.ep)
        summary = self.layout.summary.format(best=self.best, skipped=self.optimizers[0].num_skipped,
                                             unreadable=self.train_set.num_skipped, run=self)
        self.console.info(f'[fit] done: {args.ep} epochs, {summary}')

    def train_one_ep(self, ep: int, first_it: int, ld_iter) -> Tuple[Dict[str, Any], Optional[float]]:
        """Iterations [first_it, iters_train) of epoch `ep`; returns the epoch's statistics and its images/s per
        process (None when fewer than two iterations ran)."""
        args, iters, main_opt = self.args, self.iters_train, self.optimizers[0]
        self.logs.start_epoch()
        log_its = log_iters(iters, first_it)
        bar = tqdm(total=iters, initial=first_it, desc=f'[{self.bar_name} {ep}/{args.ep}]',
                   disable=not dist.is_master(), mininterval=1.0 if sys.stderr.isatty() else 60.0, dynamic_ncols=True,
                   leave=False)
        t0 = t_after_first = time.time()
        for it in range(first_it, iters):
            g_it = ep * iters + it
            self.cut_cycle.begin_iteration(ep, it, iters, args.ac, self.cycle_patch)
            batch = next(ld_iter)
            stepping = (g_it + 1) % args.ac == 0
            skipped_before = main_opt.num_skipped
            log_prefix = None
            if it in log_its:
                eta = (time.time() - t0) / (it - first_it + 1) * (iters - it - 1)
                log_prefix = f'[{self.bar_name}]: [{ep:4d}/{args.ep}]  [{it:4d}/{iters}]  eta: {format_seconds(eta)}'
            tb_now = g_it == 0 or (g_it + 1) % args.tb_every_iters == 0
            scalars = self.step(batch, g_it, stepping, metrics=log_prefix is not None, tb=tb_now)
            self.cut_cycle.end_iteration(stepping)
            self.logs.iteration(ep, it, g_it, scalars, log_prefix)
            if main_opt.num_skipped > skipped_before:
                self.console.warn(f'[step {g_it}] non-finite loss or gradient (grad norm {scalars.grad_norm}): step '
                                  f'skipped ({main_opt.consecutive_skipped} in a row, {main_opt.num_skipped} in '
                                  f'total)')
            bar.update(1)
            if it == first_it:
                t_after_first = time.time()  # throughput excludes the first (warm-up / compile) iteration
            if stepping:  # SIGINT / SIGTERM on any rank: save at this cycle boundary
                self.stop.at_cycle_end(ep, it, iters, self.save)
            if self.may_save_periodically(g_it, it, stepping):
                self.save(ep, it + 1)
        bar.close()
        img_per_s = None
        if iters - first_it > 1:
            if self.device.type == 'cuda':
                torch.cuda.synchronize(self.device)
            img_per_s = (iters - first_it - 1) * self.cfg.batch_size / (time.time() - t_after_first)
            peak = f', peak GPU memory {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB' \
                if self.device.type == 'cuda' else ''
            self.console.info(f'[ep{ep}] speed: {img_per_s:.1f} images/s per process{peak}')
        return self.logs.epoch_stats(self.device), img_per_s

    def close(self) -> None:
        """The logs; a sharded model's device mesh lets go of the process group (see `main_of`)."""
        if self.logs is not None:
            self.logs.close()
        sharded = self.sharded_state()
        if sharded is not None:
            release_process_groups(sharded[0])
        self.lock.release()


def reached_iteration(out_dir: str, iters_per_epoch: int) -> Optional[int]:
    """The furthest global iteration a run in `out_dir` is known to have finished, from steps.jsonl (--log_steps) and
    the names of complete shard folders (--fsdp 1), or None when neither is there."""
    reached = []
    try:
        with open(os.path.join(out_dir, 'steps.jsonl'), 'rb') as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            for line in f.read().decode(errors='replace').splitlines():
                if line.startswith('{') and line.endswith('}'):
                    reached.append(json.loads(line)['g_it'] + 1)
    except (OSError, ValueError, KeyError):
        pass
    reached += [ep * iters_per_epoch + it for ep, it in complete_shard_positions(out_dir)]
    return max(reached) if reached else None


def skipped_note(skipped: List[str], resumed_path: Optional[str], ep: int, it: int, iters_per_epoch: int,
                 out_dir: str) -> str:
    """The warning of a resume that skipped broken checkpoint files: which, from where it resumed, what it costs."""
    g_it = ep * iters_per_epoch + it
    note = f'[auto-resume] skipped {"; ".join(skipped)}. Resumed from {os.path.basename(resumed_path or "")} at ' \
           f'epoch {ep}, iteration {it} (global iteration {g_it})'
    reached = reached_iteration(out_dir, iters_per_epoch)
    if reached is not None and reached > g_it:
        note += f'; the run had got to global iteration {reached}, so {reached - g_it} iterations are trained again'
    return note + ('. A skipped file stays as it is until this run\'s next save of that name replaces it: move it '
                   'away now to keep it')


def lock_output_folder(out_dir: str) -> FolderLock:
    """Rank 0 locks the output folder (utils/run_lock.py); every rank raises ConfigError if it is in use (a
    collective: all ranks stop together, before writing anything)."""
    lock = FolderLock(out_dir)
    refusal = ''
    if dist.is_master():
        try:
            lock.acquire()
        except FolderLockedError as e:
            refusal = str(e)
    refusal = dist.broadcast_object(refusal)
    if refusal:
        raise ConfigError(refusal)
    return lock


def check_same_resume_point(point: Tuple[int, int]) -> None:
    """Raise CheckpointError unless every rank found the same (epoch, iteration) to resume from (a collective)."""
    points = dist.allgather_object(tuple(point))
    if len(set(points)) != 1:
        raise CheckpointError(f'the ranks found different resume points (epoch, iteration): {points}; make the '
                              f'output folders of all nodes hold the same checkpoints')


class PeerLostError(RuntimeError):
    """Another process of a multi-process job stopped answering (see dist.is_peer_failure)."""


def first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[:limit] + '...'


def report_error(run: Optional[TrainingRun], err: BaseException) -> None:
    """The message alone: in the run's console (stderr and stderr.txt) on the master, else on stderr."""
    if run is not None and dist.is_master():
        run.console.warn(f'error: {err}')
    else:
        print(f'[rank {dist.get_rank()}] error: {err}', file=sys.stderr, flush=True)


def main_of(make_run: Callable[[Any], TrainingRun], args, user_error_types: Tuple[type, ...] = ()) -> int:
    """Run one training to its end under torch.distributed (if launched by torchrun); returns the exit code.

    0 done; 2 a mistake of the set-up (a path, a flag, a checkpoint of another run, an output folder in use:
    `ConfigError` and `user_error_types`), reported as a message without a traceback; 3 a streak of non-finite steps;
    4 the ranks' checkpoints disagree; 5 another process of the job died, hung or was stopped (no answer within
    --dist_timeout); 130 stopped by SIGINT / SIGTERM (after writing a checkpoint) or a second Ctrl-C.
    """
    run = None
    try:
        # gloo for a CPU run even with a GPU in sight: NCCL reduces CUDA only
        dist.initialize(device=args.device, timeout_minutes=args.dist_timeout)
        run = make_run(args)
        run.fit()
        dist.barrier()
        return 0
    except StopTraining as e:  # SIGINT / SIGTERM: the checkpoint is written
        if run is not None and dist.is_master():
            run.console.info(f'[stop] {e}')
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, without a checkpoint
        print(f'[rank {dist.get_rank()}] interrupted: no checkpoint written', file=sys.stderr, flush=True)
        return 130
    except NonFiniteError as e:  # raised on every rank at the same step: gradients are synchronised
        report_error(run, e)
        return 3
    except CheckpointError as e:
        report_error(run, e)
        return 4
    except (ConfigError, dist.LaunchError, *user_error_types) as e:  # the message says what to change
        report_error(run, e)
        return 2
    except RuntimeError as e:
        if not (dist.is_initialized() and dist.is_peer_failure(e)):
            raise
        report_error(run, PeerLostError(f'lost the other processes of the job ({first_line(e)}): a process or node '
                                        f'died, hung or was stopped (a silent one is given up after --dist_timeout='
                                        f'{args.dist_timeout:g} minutes). The checkpoints on disk are intact: end '
                                        f'what is left of the job and rerun the same command on every node to resume '
                                        f'from the last one'))
        return 5
    finally:
        if run is not None:
            run.close()
        # the run's models and optimizers hold the process group (DDP's reducer, FSDP's mesh): they go first, and the
        # collection reaches those in reference cycles (FSDP's modules and hooks), so that destroying the group drops
        # its last reference and joins its threads now, not in the interpreter's teardown (see dist.finalize); without
        # a group there is nothing to join (and a full collection of a large heap, a test process's, costs ~0.2 s)
        run = None
        if dist.is_initialized():
            gc.collect()
        dist.finalize()
