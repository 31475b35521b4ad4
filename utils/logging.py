# Logging of the VAR training recipe (arXiv 2404.02905), without patching print or sys.stdout.
"""Rank-0 console and files, TensorBoard, meters and progress.

* `print0`: print on the global master only.
* `Console`: the master's console lines, also appended to `stdout.txt` / `stderr.txt` in the output folder.
* `LogTxt`: `log.txt`, a JSON header line per process start, then one JSON dict per epoch.
* `TensorboardLogger`: a SummaryWriter on the master only (a no-op elsewhere); purges events past a resume point.
* `SmoothedValue` / `MetricLogger`: windowed meters whose global averages can be summed across ranks.
"""
import collections
import contextlib
import datetime
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

import dist
from models.atomic_files import atomic_write  # the project's one atomic writer


def print0(*args, **kwargs) -> None:
    """print() on the global master only (flushed, so that interleaved logs stay ordered)."""
    if dist.is_master():
        print(*args, **kwargs, flush=True)


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def epoch_record(ep: int, ep_total: int, iters_train: int, stats: Dict[str, Any], t_start: float,
                 it_start: int) -> Tuple[Dict[str, Any], float]:
    """The log.txt record of finished epoch `ep` (0-based) with the remaining time and finish time, and the remaining
    seconds, extrapolated from the iterations done since this process started (at global iteration it_start)."""
    done_its = (ep + 1) * iters_train - it_start
    remain = (time.time() - t_start) / max(done_its, 1) * (ep_total - ep - 1) * iters_train
    record = {'ep': ep + 1, 'it': (ep + 1) * iters_train, **stats, 'remain_time': format_seconds(remain),
              'finish_time': time.strftime('%Y-%m-%d %H:%M', time.localtime(time.time() + remain))}
    return record, remain


def git_info(repo_dir: str) -> Dict[str, str]:
    """commit id, branch and subject of the repository, or '[unknown]' outside git."""
    def run(*cmd: str) -> str:
        try:
            out = subprocess.run(cmd, cwd=repo_dir, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else '[unknown]'
        except (OSError, subprocess.SubprocessError):
            return '[unknown]'
    return {'commit': run('git', 'rev-parse', 'HEAD'), 'branch': run('git', 'rev-parse', '--abbrev-ref', 'HEAD'),
            'commit_msg': run('git', 'log', '-1', '--format=%s')}


class Console:
    """Console lines of the master, copied to files in `out_dir` (the official tee, without replacing sys.stdout)."""

    def __init__(self, out_dir: Optional[str], enabled: bool):
        self.enabled = enabled
        self.out_path = os.path.join(out_dir, 'stdout.txt') if out_dir and enabled else None
        self.err_path = os.path.join(out_dir, 'stderr.txt') if out_dir and enabled else None

    def _emit(self, msg: str, stream, path: Optional[str]) -> None:
        if not self.enabled:
            return
        stamp = time.strftime('[%m-%d %H:%M:%S]')
        print(f'{stamp} {msg}', file=stream, flush=True)
        if path:
            with open(path, 'a') as f:
                f.write(f'{stamp} {msg}\n')

    def info(self, msg: str) -> None:
        self._emit(msg, sys.stdout, self.out_path)

    def warn(self, msg: str) -> None:
        self._emit(msg, sys.stderr, self.err_path)


class LogTxt:
    """`log.txt` (master only): a JSON header line once per process start, then one JSON dict per line."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled
        self._header_written = False

    def write(self, header: Dict[str, Any], record: Optional[Dict[str, Any]] = None) -> None:
        """Append `record`, preceded by `header` on this process's first write."""
        if not self.enabled:
            return
        with open(self.path, 'a') as f:
            if not self._header_written:
                f.write(json.dumps(header) + '\n')
                self._header_written = True
            if record is not None:
                f.write(json.dumps(record) + '\n')


def open_steps_log(path: str, resume_g_it: int):
    """`steps.jsonl` for appending, without the records of global steps >= `resume_g_it` that an interrupted run
    wrote after its last checkpoint (the resumed run writes them again): one record per step, as TensorBoard's purge."""
    if os.path.exists(path):
        with open(path) as f:
            lines = f.read().splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)['g_it'] < resume_g_it:
                    kept.append(line + '\n')
            except (ValueError, KeyError):  # a line cut short by a kill
                continue
        if len(kept) != len(lines):
            atomic_write(path, lambda f: f.writelines(kept), mode='w', fsync=False)
    return open(path, 'a')


class TensorboardLogger:
    """SummaryWriter wrapper: active only when `enabled` (the master); the writer is created on first use.

    `purge_step` drops events at or after that step left by an earlier run that was interrupted and resumed. It
    covers the iteration axis; the epoch axis (step = epochs done) is kept clean by `held()`.
    """

    def __init__(self, log_dir: str, enabled: bool, purge_step: Optional[int] = None):
        self.log_dir, self.enabled, self.purge_step = log_dir, enabled, purge_step
        self._writer = None
        self._held: Optional[List[Tuple[str, tuple]]] = None

    @contextlib.contextmanager
    def held(self):
        """Queue the events of the block and write them when it ends normally. An epoch's summary goes through this
        around its checkpoint save: a run killed before the save leaves none of them behind, so the resumed run, which
        repeats that epoch, writes each once (TensorBoard's purge cannot help on the epoch axis)."""
        self._held = []
        try:
            yield self
            queued, self._held = self._held, None
            for method, args in queued:
                getattr(self.writer, method)(*args)
        finally:
            self._held = None

    def _write(self, method: str, *args) -> None:
        if self._held is not None:
            self._held.append((method, args))
        else:
            getattr(self.writer, method)(*args)

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is slow to import
            self._writer = SummaryWriter(log_dir=self.log_dir, purge_step=self.purge_step, flush_secs=30)
        return self._writer

    def scalars(self, step: int, head: str = '', **values: Optional[float]) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            self._write('add_scalar', f'{head}/{k}' if head else k, v, step)

    def image(self, tag: str, img_3HW: torch.Tensor, step: int) -> None:
        if self.enabled:
            self._write('add_image', tag, img_3HW, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class SmoothedValue:
    """A meter: median/average over the last `window` values, and the global average."""

    def __init__(self, window: int = 20, fmt: str = '{median:.4f} ({global_avg:.4f})'):
        self.deque = collections.deque(maxlen=window)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self, device: torch.device) -> None:
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        dist.allreduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median().item()) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Named meters (created on first update); `None` values are ignored (e.g. tnm on non-stepping iterations)."""

    def __init__(self, delimiter: str = '  '):
        self.meters: Dict[str, SmoothedValue] = {}
        self.delimiter = delimiter

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def update(self, **values: Optional[float]) -> None:
        for k, v in values.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters.setdefault(k, SmoothedValue()).update(float(v))

    def synchronize_between_processes(self, device: torch.device) -> None:
        # Same meters in the same order on every rank, so the collectives line up.
        for name in sorted(self.meters):
            self.meters[name].synchronize_between_processes(device)

    def global_avgs(self) -> Dict[str, float]:
        return {k: m.global_avg for k, m in self.meters.items()}

    def __str__(self) -> str:
        return self.delimiter.join(f'{k}: {m}' for k, m in self.meters.items())


def log_iters(iters_train: int, start_it: int) -> Iterable[int]:
    """The iterations of an epoch whose metrics are measured and printed (official: 5 or 30 evenly spaced ones)."""
    n = 30 if iters_train > 8000 else 5
    its = set(torch.linspace(0, iters_train - 1, n).long().tolist())
    its.add(start_it)
    return its
