"""The logs of a training run (utils/run.py), written from the scalars its recipe's step returns.

A recipe does not log its iterations: its `step` returns a `StepScalars`, and `RunLogs` turns those into the console's
iteration and epoch lines, the epoch's meters and record (log.txt), TensorBoard and steps.jsonl. What differs between
recipes is names and formats only, declared once in a `LogLayout`.
"""
import dataclasses
import json
import os
import sys
from typing import Any, Dict, Optional, Tuple

import torch

import dist
from utils.arg_util import REPO_ROOT
from utils.logging import Console, LogTxt, MetricLogger, SmoothedValue, TensorboardLogger, git_info, open_steps_log


@dataclasses.dataclass
class StepScalars:
    """What one training iteration reports (None: not measured at this iteration)."""
    loss: torch.Tensor  # detached, 0-d: steps.jsonl
    grad_norm: Optional[float]  # None on an iteration that does not end an accumulation cycle
    lr: float  # the peak lr and wd the schedules set for this iteration
    wd: float
    meters: Dict[str, Any] = dataclasses.field(default_factory=dict)  # the console's meters, by name
    tb: Dict[str, Any] = dataclasses.field(default_factory=dict)  # TensorBoard scalars at this iteration, by tag
    line: str = ''  # shown between the position and the meters on a logged iteration
    note: str = ''  # a console line of its own after the iteration's (something the step did)


@dataclasses.dataclass(frozen=True)
class LogLayout:
    """How a recipe's scalars are named and formatted in the logs.

    meters: the meters made at each epoch's start, in their console order: name -> (window, format); any other meter is
        made at its first value with SmoothedValue's defaults.
    epoch: the meters whose epoch average the record holds: meter -> (name in the record, format in the `(training)`
        line, or None to leave it out of that line and of TensorBoard); empty: every meter, as named, as '.4g'.
    epoch_head: the TensorBoard head of the averages in the `(training)` line.
    lr_wd: the record starts with the lr and wd of the epoch's last iteration.
    speed_tags: TensorBoard tags for the hours left and the images/s per process, after every epoch (if given).
    summary: the end of the `[fit] done` line, formatted with `best`, `skipped`, `unreadable` and `run`.
    """
    meters: Dict[str, Tuple[int, str]] = dataclasses.field(default_factory=dict)
    epoch: Dict[str, Tuple[str, Optional[str]]] = dataclasses.field(default_factory=dict)
    epoch_head: str = ''
    lr_wd: bool = False
    speed_tags: Tuple[str, ...] = ()
    summary: str = ''


def tags(head: str, **values: Any) -> Dict[str, Any]:
    """{'head/name': value}: TensorBoard tags under one head."""
    return {f'{head}/{k}': v for k, v in values.items()}


class RunLogs:
    """log.txt (a header per process start), TensorBoard (purged past the resume point; `tb`), steps.jsonl
    (--log_steps) and the console's iteration and epoch lines, on the master; the meters on every rank (reduced across
    ranks at an epoch's end)."""

    def __init__(self, layout: LogLayout, console: Console, out_dir: str, tb_dir_name: str, exp_name: str,
                 resume_g_it: int, resumed: bool, log_steps: bool):
        self.layout, self.console = layout, console
        master = dist.is_master()
        self.tb = TensorboardLogger(os.path.join(out_dir, tb_dir_name), enabled=master,
                                    purge_step=resume_g_it if resumed else None)
        self.log_txt = LogTxt(os.path.join(out_dir, 'log.txt'), enabled=master)
        git = git_info(str(REPO_ROOT))
        self.header = {'is_master': master, 'name': exp_name, 'cmd': ' '.join(sys.argv), 'commit': git['commit'],
                       'branch': git['branch'], 'tb_log_dir_path': self.tb.log_dir}
        self.log_txt.write(self.header)
        self.steps_file = open_steps_log(os.path.join(out_dir, 'steps.jsonl'), resume_g_it) \
            if log_steps and master else None
        self.me = MetricLogger()
        self.last: Optional[StepScalars] = None  # the epoch's last iteration
        self.last_grad_norm: Optional[float] = None  # the run's last step

    def start_epoch(self) -> None:
        self.me, self.last = MetricLogger(), None
        for name, (window, fmt) in self.layout.meters.items():
            self.me.add_meter(name, SmoothedValue(window=window, fmt=fmt))

    def iteration(self, ep: int, it: int, g_it: int, s: StepScalars, log_prefix: Optional[str]) -> None:
        """The meters; on a logged iteration (`log_prefix`: the line's start) the console line; TensorBoard (the tags
        the step returned) and steps.jsonl."""
        self.last = s
        if s.grad_norm is not None:
            self.last_grad_norm = s.grad_norm
        self.me.update(**s.meters)
        if log_prefix is not None:
            self.console.info(f'{log_prefix}  {s.line + "  " if s.line else ""}{self.me}')
        if s.note:
            self.console.info(s.note)
        self.tb.scalars(g_it, **s.tb)
        if self.steps_file is not None:
            self.steps_file.write(json.dumps({'g_it': g_it, 'ep': ep, 'it': it, 'loss': s.loss.item(),
                                              'grad_norm': s.grad_norm, 'lr': s.lr, 'wd': s.wd}) + '\n')
            self.steps_file.flush()

    def epoch_stats(self, device: torch.device) -> Dict[str, Any]:
        """The epoch's part of its record: the meters' averages over all ranks (a collective); a grad norm whose meter
        got no value this epoch is the run's last one."""
        self.me.synchronize_between_processes(device)
        avgs = self.me.global_avgs()
        stats = {'lr': self.last.lr if self.last else None, 'wd': self.last.wd if self.last else None} \
            if self.layout.lr_wd else {}
        for meter, (name, _) in self.epoch_names().items():
            stats[name] = avgs[meter]
            if name == 'grad_norm' and not self.me.meters[meter].count:
                stats[name] = self.last_grad_norm
        return stats

    def epoch_names(self) -> Dict[str, Tuple[str, Optional[str]]]:
        """meter -> (its name in the record, its format in the `(training)` line)"""
        return self.layout.epoch or {name: (name, '.4g') for name in self.me.meters}

    def epoch(self, ep: int, stats: Dict[str, Any], record: Dict[str, Any], remain: float,
              img_per_s: Optional[float]) -> None:
        """TensorBoard's epoch scalars and the `(training)` console line of epoch `ep`."""
        shown = [(meter, name, fmt) for meter, (name, fmt) in self.epoch_names().items() if fmt is not None]
        self.tb.scalars(ep + 1, self.layout.epoch_head, **{name: stats[name] for _, name, _ in shown})
        if self.layout.speed_tags:
            hours_tag, speed_tag = self.layout.speed_tags
            self.tb.scalars(ep + 1, **{hours_tag: round(remain / 3600, 2), speed_tag: img_per_s})
        averages = ', '.join(f'{meter}: {stats[name]:{fmt}}' for meter, name, fmt in shown)
        self.console.info(f'[ep{ep}] (training) {averages}, Remain: {record["remain_time"]}, '
                          f'Finish: {record["finish_time"]}')

    def write_record(self, record: Dict[str, Any]) -> None:
        """An epoch's record in log.txt, once its checkpoint is on disk."""
        self.log_txt.write(self.header, record)
        self.tb.flush()

    def close(self) -> None:
        if self.steps_file is not None:
            self.steps_file.close()
        self.tb.close()
