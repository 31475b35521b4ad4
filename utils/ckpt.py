# Checkpoint files of the VAR training recipe (arXiv 2404.02905), written atomically.
"""Checkpoint I/O: atomic writes, loading with clear errors, auto-resume, and RNG state capture.

Files (official names): `ar-ckpt-last.pth` (end of every epoch, and every `--ckpt_every_iters` iterations) and
`ar-ckpt-best.pth` (a copy of last when the validation last-scale loss improves). A write goes to a temporary file in
the same folder, is fsync'ed, then renamed over the target with os.replace, so a crash mid-save leaves the previous
file intact. Auto-resume loads the newest `ar-ckpt*.pth` that loads, falling back to the next one if it is broken.
"""
import glob
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import dist
from models.atomic_files import atomic_copy, atomic_write, stale_temp_files  # the project's one atomic writer

LAST_NAME = 'ar-ckpt-last.pth'
BEST_NAME = 'ar-ckpt-best.pth'
CKPT_GLOB = 'ar-ckpt*.pth'


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (truncated, corrupt or not a training checkpoint). `cause` is the
    reason alone, without the advice of the message (auto-resume, which moves on to another file, reports it)."""

    def __init__(self, message: str, cause: str = ''):
        super().__init__(message)
        self.cause = cause or message


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to `path` atomically (see `models.atomic_files.atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_tmp(folder: str) -> List[str]:
    """Delete temporary files left by a save of this host that was killed (not those of other hosts)."""
    mine = stale_temp_files(folder)
    for p in mine:
        os.remove(p)
    return mine


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load a training checkpoint on the CPU; raise CheckpointError with the reason if it is unusable."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)  # ranks share the page cache
    except Exception as e:
        cause = f'cannot load it ({type(e).__name__}: {e}); it is probably truncated or corrupt'
        raise CheckpointError(f'{path}: {cause} (e.g. an interrupted copy). Delete it to resume from another '
                              f'checkpoint, or move it away to start afresh.', cause) from e
    if not isinstance(ckpt, dict) or 'trainer' not in ckpt or 'epoch' not in ckpt:
        raise CheckpointError(f'{path} is not a VAR training checkpoint (no "trainer"/"epoch" entries); '
                              f'model weights are loaded with other options, not by auto-resume',
                              'not a training checkpoint (no "trainer"/"epoch" entries)')
    return ckpt


def find_checkpoints(folder: str, pattern: str = CKPT_GLOB) -> List[str]:
    """Checkpoint files in `folder`, newest modification time first (ar-ckpt-last.pth first on a tie)."""
    paths = [p for p in glob.glob(os.path.join(folder, pattern)) if os.path.isfile(p)]
    return sorted(paths, key=lambda p: (os.stat(p).st_mtime_ns, os.path.basename(p) == LAST_NAME), reverse=True)


def auto_resume(folder: str, pattern: str = CKPT_GLOB) -> Tuple[Optional[Dict[str, Any]], Optional[str], List[str]]:
    """Load the newest usable checkpoint of `folder`.

    Returns (checkpoint or None, its path or None, the newer files it skipped as 'name: why'). If every candidate is
    broken, raise CheckpointError rather than silently starting from scratch. A skipped file is left as it is.
    """
    skipped, messages = [], []
    candidates = find_checkpoints(folder, pattern)
    for path in candidates:
        try:
            return load_checkpoint(path), path, skipped
        except CheckpointError as e:
            skipped.append(f'{os.path.basename(path)}: {e.cause}')
            messages.append(str(e))
    if candidates:
        raise CheckpointError('no usable checkpoint among ' + ', '.join(candidates) + ':\n' + '\n'.join(messages))
    return None, None, skipped


def rng_state() -> Dict[str, Any]:
    """This process's torch RNG states: the CPU one and, if any, that of its current CUDA device."""
    state = {'cpu': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['cpu'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


class CutCycle:
    """The resume point of a gradient-accumulation cycle that an epoch end cuts (--ac > 1).

    The gradients gathered inside a cycle live only in each rank's memory, so a checkpoint written at the epoch end
    must point back at the cycle's first iteration, with the RNG states and trainer state of that moment; the
    weights, optimizer and scaler do not change before the cycle's optimizer step, so a resumed run recomputes the
    same gradients. `start` holds (epoch, it, rng_state, patch) while such a cycle is open, else None; `patch` is
    what the trainer's forward passes change, laid out as its state dict ({section: {key: value}}).
    """

    def __init__(self):
        self.start: Optional[Tuple[int, int, Dict[str, Any], Dict[str, Dict[str, Any]]]] = None

    def begin_iteration(self, ep: int, it: int, iters: int, ac: int,
                        trainer_patch: Callable[[], Dict[str, Dict[str, Any]]]) -> None:
        g_it = ep * iters + it
        if g_it % ac == 0 and g_it + ac > (ep + 1) * iters:
            self.start = (ep, it, rng_state(), trainer_patch())

    def end_iteration(self, stepping: bool) -> None:
        if stepping:
            self.start = None

    def resume_point(self, epoch: int, it: int, trainer_state: Dict[str, Any]
                     ) -> Tuple[int, int, Optional[Dict[str, Any]]]:
        """(epoch, it, RNG state or None) to checkpoint; inside a cut cycle, `trainer_state` is patched in place."""
        if self.start is None:
            return epoch, it, None
        epoch, it, rng, patch = self.start
        for section, values in patch.items():
            trainer_state[section].update(values)
        return epoch, it, rng


def save_run_checkpoint(state: Dict[str, Any], out_dir: str, last_name: str, best_name: str,
                        best_updated: bool, rng: Optional[Dict[str, Any]] = None, master_only: bool = False) -> None:
    """Every rank's RNG state (`rng`, or its current one) is gathered into `state['rng']` (a collective: all ranks
    call this); then each node's local master (with `master_only`, rank 0 alone: a folder all nodes share) writes
    `best_name` when `best_updated`, and `last_name`, atomically.

    The best copy is written first: a kill between the two leaves the new state in `best_name`, which auto-resume
    finds too, rather than a best copy that no later run would refresh.
    """
    rngs = dist.allgather_object(rng if rng is not None else rng_state())
    if not (dist.is_master() if master_only else dist.is_local_master()):
        return
    last = os.path.join(out_dir, last_name)
    if best_updated:
        best = os.path.join(out_dir, best_name)
        atomic_save({**state, 'rng': rngs}, best)
        atomic_copy(best, last)
    else:
        atomic_save({**state, 'rng': rngs}, last)
