"""Stop-and-resume equivalence: a run stopped by Ctrl-C and re-run with the same command gives the same per-step losses
as an uninterrupted run (single process, CPU, fixed seed, fp16 autocast with its GradScaler); Ctrl-C writes a
checkpoint at the next iteration before stopping. (SIGTERM to one rank of a 2-process job: tests/training/test_fsdp.py;
a hung node SIGKILLed and a resume inside an accumulation cycle cut by the epoch end, on two nodes:
tests/training/test_train_torchrun.py; a SIGKILLed 3-process job: tests/tokenizer/test_vae_train.py.)"""
import os

import pytest

from train_support import (X4, assert_same_final_checkpoint, make_image_folder, make_tiny_vae_ckpt, read_steps,
                           run_train, signal_after_step, train_args)

# 24 images, batch 4: 6 iterations per epoch, 12 in all; checkpoints every 4 iterations and at epoch ends; a large lr
# (0.5 * 4 / 256) so that any state not restored shows in the losses and weights; a fractional lr warm-up (3 its)
REFERENCE_FLAGS = dict(patch_size=4, bs=4, ep=2, fp16=1, hflip=1, ckpt_every_iters=4, log_steps=1, tblr=0.5, wp=0.5)


def uninterrupted_losses(data, vae, out, flags, n_steps):
    """train.main in this process, with one intra-op thread like the real processes' OMP_NUM_THREADS=1: the same
    arithmetic as theirs, without a process start."""
    import train
    from support import intra_op_threads
    with intra_op_threads(1):
        assert train.main(train_args(data, vae, out, **flags)) == 0
    losses = read_steps(out)
    assert sorted(losses) == list(range(n_steps))
    return losses


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """One uninterrupted run shared by the tests that compare against it: (data, vae, its output folder, losses)."""
    root = tmp_path_factory.mktemp('resume_kill')
    data = make_image_folder(root / 'data', n_classes=3, n_train=8, n_val=2)
    vae = make_tiny_vae_ckpt(root / 'vae.pth', X4)
    losses = uninterrupted_losses(data, vae, root / 'reference', REFERENCE_FLAGS, n_steps=12)
    return data, vae, root / 'reference', losses


@pytest.mark.slow
def test_ctrl_c_then_rerun_gives_the_uninterrupted_run(reference, tmp_path):
    """Ctrl-C (SIGINT) early in epoch 0: a checkpoint at the next iteration, exit code 130. The same command resumes
    mid-epoch from that checkpoint and finishes: per-step losses, weights, optimizer, GradScaler and RNG states equal
    the uninterrupted run's bit for bit, and steps.jsonl ends with one record per step (the replayed steps replace
    theirs). (A SIGKILL and its resume: the multi-process tests.)"""
    import re
    import signal

    from train_support import train_cmd
    data, vae, ref_out, ref_losses = reference
    out = tmp_path / 'interrupted'
    argv = train_args(data, vae, out, **REFERENCE_FLAGS)
    proc, log = signal_after_step(train_cmd(argv), out, step=1, send=lambda p: os.killpg(p.pid, signal.SIGINT))
    assert proc.returncode == 130, log[-3000:]
    assert 'SIGINT: saving a checkpoint' in log and 'Traceback' not in log
    stopped = re.search(r'\[stop\] stopped on request at epoch 0, iteration (\d+)', log)
    assert stopped and 're-run the same command' in log, log[-3000:]
    before = read_steps(out)
    resumed = run_train(argv)  # the very same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'ar-ckpt-last.pth: epoch 0, iteration {stopped.group(1)}' in resumed.stdout
    after = read_steps(out)
    assert after == ref_losses  # bit-identical per-step losses
    assert all(after[k] == v for k, v in before.items())  # steps replayed after the checkpoint agree too
    assert len((out / 'steps.jsonl').read_text().splitlines()) == 12
    assert_same_final_checkpoint(ref_out, out)  # weights, optimizer, scaler, RNG: bit for bit


@pytest.mark.slow
def test_train_py_feeds_the_official_schedule_to_the_optimizer(reference):
    """The lr and wd that train.py sets at every step are those of lr_wd_annealing with the derived values (the
    warm-up of --wp=0.5 epochs, 3 iterations, rounded as the official lr_wd_annealing does)."""
    import json

    import torch

    from utils import arg_util
    from utils.lr_control import build_param_groups, lr_wd_annealing
    data, vae, ref_out, _ = reference
    argv = train_args(data, vae, ref_out, **REFERENCE_FLAGS)
    cfg = arg_util.derive(arg_util.parse_args(argv), world_size=1)
    args = arg_util.parse_args(argv)
    iters = 6
    layer = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(build_param_groups(layer.named_parameters()), lr=cfg.tlr)
    logged = [json.loads(line) for line in (ref_out / 'steps.jsonl').read_text().splitlines()]
    assert [s['g_it'] for s in logged] == list(range(12))
    wds = set()
    for s in logged:
        _, max_lr, _, max_wd = lr_wd_annealing(cfg.sche, opt, cfg.tlr, args.twd, cfg.twde, s['g_it'],
                                               round(cfg.wp * iters), args.ep * iters, wp0=args.wp0, wpe=args.wpe)
        assert (s['lr'], s['wd']) == (max_lr, max_wd), s
        wds.add(max_wd)
    assert wds == {0.05}  # the official default --twde=0 means a constant wd (twde = twd)


def test_graceful_stop_counts_a_quick_repeat_as_the_same_ctrl_c(monkeypatch):
    """A terminal's Ctrl-C reaches torchrun's workers twice within moments (directly, then forwarded): that is one
    request. A second Ctrl-C a second or more later stops at once; the previous handlers come back on exit."""
    import signal

    import torch

    from utils.runtime import GracefulStop
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop(torch.device('cpu')) as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the forwarded copy: no KeyboardInterrupt
        assert stop.requested()
        stop.first_at -= GracefulStop.REPEAT_S
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
