"""Fast unit tests of utils/runtime.py (seeding, rank agreement, graceful stop) and utils/logging.py (log_iters,
steps.jsonl, epoch records, format helpers), spec sections 7 (seeding) and 8.2 (logged quantities)."""
import json
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

import dist
from utils import logging as ulog
from utils import runtime


# ------------------------------------------------------------------------------------------------------ seeding
@pytest.fixture
def restore_rng_state():
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    flags = (torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags


def test_seed_everything_uses_seed_times_world_size_plus_rank(restore_rng_state):
    """Spec §7: s = seed·ws + rank seeds random, numpy and torch; cudnn deterministic with a seed."""
    runtime.seed_everything(3, rank=1, world_size=4, benchmark=False)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == random.Random(13).random()
    assert got[1] == np.random.RandomState(13).rand()
    assert torch.equal(got[2], torch.rand(3, generator=torch.Generator().manual_seed(13)))
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    runtime.seed_everything(None, rank=0, world_size=1, benchmark=True)
    assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark


def test_rank_generator_is_seeded_per_rank():
    """Spec §7: the loader generator is None without a seed, else seeded with seed·world_size + rank."""
    assert runtime.rank_generator(None, 0, 2) is None
    g = runtime.rank_generator(5, rank=1, world_size=2)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(11)))


# ------------------------------------------------------------------------------------------ check_ranks_agree
def test_check_ranks_agree_raises_only_when_a_rank_differs(monkeypatch):
    lin = torch.nn.Linear(3, 2)
    runtime.check_ranks_agree(lin)  # one process: nothing to compare
    other = [0.0, 0.0]
    monkeypatch.setattr(dist, 'get_world_size', lambda: 3)
    monkeypatch.setattr(dist, 'allgather_object', lambda obj: [obj, obj, obj])
    runtime.check_ranks_agree(lin)
    monkeypatch.setattr(dist, 'allgather_object', lambda obj: [obj, obj, other])  # one rank of three drifted
    with pytest.raises(RuntimeError, match='different weights'):
        runtime.check_ranks_agree(lin)
    monkeypatch.setattr(dist, 'allgather_object', lambda obj: [obj, other, other])
    with pytest.raises(RuntimeError, match='different weights'):
        runtime.check_ranks_agree(lin)


# ------------------------------------------------------------------------------------------------ GracefulStop
def test_graceful_stop_saves_mid_epoch_and_stops_after_the_epoch_end_checkpoint():
    assert not dist.is_initialized()
    saved = []
    stop = runtime.GracefulStop(torch.device('cpu'))
    stop.at_cycle_end(0, 3, 10, lambda ep, it: saved.append((ep, it)))  # no request: nothing happens
    stop.at_epoch_end(0, 3)
    assert saved == [] and not stop.after_epoch
    stop.flag = True
    with pytest.raises(runtime.StopTraining):
        stop.at_cycle_end(1, 8, 10, lambda ep, it: saved.append((ep, it)))
    assert saved == [(1, 9)]  # resume point: the next iteration
    # a request at an epoch's last iteration: no mid-epoch save, stop after that epoch's checkpoint
    stop = runtime.GracefulStop(torch.device('cpu'))
    stop.flag = True
    stop.at_cycle_end(1, 9, 10, lambda ep, it: saved.append((ep, it)))
    assert saved == [(1, 9)] and stop.after_epoch
    with pytest.raises(runtime.StopTraining):
        stop.at_epoch_end(1, 3)
    stop.at_epoch_end(2, 3)  # the last epoch: training ends normally, no StopTraining


def test_a_repeated_sigterm_never_interrupts_at_once():
    """Only a second SIGINT (Ctrl-C) a second later stops at once; a repeated SIGTERM keeps the graceful stop."""
    before = signal.getsignal(signal.SIGTERM)
    with runtime.GracefulStop(torch.device('cpu')) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()
        stop.first_at -= 10 * runtime.GracefulStop.REPEAT_S
        os.kill(os.getpid(), signal.SIGTERM)  # must not raise KeyboardInterrupt
        assert stop.requested()
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------------------------------- log_iters
def test_log_iters_are_evenly_spaced_with_the_start_iteration():
    """Spec §8.2: {linspace(0, iters_train−1, F) as int} ∪ {start_it}, F = 30 if iters_train > 8000 else 5."""
    assert set(ulog.log_iters(1669, 0)) == {0, 417, 834, 1251, 1668}
    assert set(ulog.log_iters(1669, 7)) == {0, 7, 417, 834, 1251, 1668}
    assert len(set(ulog.log_iters(8000, 0))) == 5
    its = set(ulog.log_iters(8001, 0))
    assert len(its) == 30 and min(its) == 0 and max(its) == 8000


# ---------------------------------------------------------------------------------------------- open_steps_log
def test_open_steps_log_drops_the_steps_at_or_after_the_resume_point(tmp_path):
    path = tmp_path / 'steps.jsonl'
    lines = [json.dumps({'g_it': g, 'loss': 1.0 / (g + 1)}) for g in range(6)]
    path.write_text('\n'.join(lines) + '\n' + '{"g_it": 6, "lo')  # the last line cut short by a kill
    with ulog.open_steps_log(str(path), 3) as f:
        f.write(json.dumps({'g_it': 3, 'loss': 0.0}) + '\n')
    got = [json.loads(line)['g_it'] for line in path.read_text().splitlines()]
    assert got == [0, 1, 2, 3]
    with ulog.open_steps_log(str(tmp_path / 'new.jsonl'), 0) as f:  # a fresh run creates the file
        f.write('{"g_it": 0}\n')
    assert (tmp_path / 'new.jsonl').read_text() == '{"g_it": 0}\n'


# -------------------------------------------------------------------------------------- epoch_record, formatting
def test_format_seconds():
    assert ulog.format_seconds(3661.7) == '1:01:01'
    assert ulog.format_seconds(-5) == '0:00:00'


def test_epoch_record_counts_iterations_and_extrapolates_the_remaining_time():
    # epoch index 1 (the 2nd of 4) just finished, 10 iterations per epoch, this process started at global it 0
    # and has run for 20 s: 1 s per iteration, 2 epochs = 20 iterations left
    record, remain = ulog.epoch_record(1, 4, 10, {'L_mean': 2.5}, t_start=time.time() - 20.0, it_start=0)
    assert record['ep'] == 2 and record['it'] == 20 and record['L_mean'] == 2.5
    assert 19.9 < remain < 21.0 and record['remain_time'] == '0:00:20'
    # a resumed process (started at global it 10) has done only 10 iterations in its 20 s: 2 s per iteration
    _, remain = ulog.epoch_record(1, 4, 10, {}, t_start=time.time() - 20.0, it_start=10)
    assert 39.9 < remain < 41.0
    record, remain = ulog.epoch_record(3, 4, 10, {}, t_start=time.time() - 20.0, it_start=0)
    assert remain == 0.0 and record['remain_time'] == '0:00:00' and record['it'] == 40


def test_log_txt_writes_its_header_once_per_process(tmp_path):
    log = ulog.LogTxt(str(tmp_path / 'log.txt'), enabled=True)
    log.write({'name': 'h'})
    log.write({'name': 'h'}, {'ep': 1})
    log.write({'name': 'h'}, {'ep': 2})
    assert [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()] == \
        [{'name': 'h'}, {'ep': 1}, {'ep': 2}]
    ulog.LogTxt(str(tmp_path / 'other.txt'), enabled=False).write({'name': 'h'}, {'ep': 1})
    assert not (tmp_path / 'other.txt').exists()


# ------------------------------------------------------------------------------------------------------ TensorBoard
# The epoch-axis events of an epoch are written only once its checkpoint is saved (`TensorboardLogger.held`), so a
# run killed before the save leaves none that its resumed run would repeat.
def read_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(log_dir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()['scalars']}


def test_held_events_are_written_when_the_block_ends_and_dropped_when_it_fails(tmp_path):
    tb = ulog.TensorboardLogger(str(tmp_path), enabled=True)
    tb.scalars(10, 'it', loss=1.0)
    with tb.held():
        tb.scalars(1, 'ep', speed=5.0)
        tb.flush()
        assert 'ep/speed' not in read_scalars(tmp_path)  # queued, not on disk
    with pytest.raises(RuntimeError):
        with tb.held():  # e.g. the checkpoint save fails: the epoch's events are not written
            tb.scalars(2, 'ep', speed=6.0)
            raise RuntimeError('save failed')
    tb.scalars(11, 'it', loss=2.0)  # outside a block again: written at once
    tb.close()
    assert read_scalars(tmp_path) == {'it/loss': [(10, 1.0), (11, 2.0)], 'ep/speed': [(1, 5.0)]}


def test_a_disabled_logger_writes_nothing(tmp_path):
    tb = ulog.TensorboardLogger(str(tmp_path / 'tb'), enabled=False)
    with tb.held():
        tb.scalars(1, 'ep', speed=5.0)
    tb.close()
    assert not (tmp_path / 'tb').exists()
