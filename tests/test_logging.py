"""TensorBoard logging across an interruption: the epoch-axis events of an epoch are written only once its checkpoint
is saved (`TensorboardLogger.held`), so a run killed before the save leaves none that its resumed run would repeat."""
import pytest

from utils.logging import TensorboardLogger


def read_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(log_dir))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()['scalars']}


def test_held_events_are_written_when_the_block_ends_and_dropped_when_it_fails(tmp_path):
    tb = TensorboardLogger(str(tmp_path), enabled=True)
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
    tb = TensorboardLogger(str(tmp_path / 'tb'), enabled=False)
    with tb.held():
        tb.scalars(1, 'ep', speed=5.0)
    tb.close()
    assert not (tmp_path / 'tb').exists()
