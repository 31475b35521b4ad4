"""A real 3-rank job (gloo, CPU) on real images in parquet shards (the Hub's layout: several shards and row groups per
split), with gradient accumulation whose cycles the epoch end cuts, first on one node (torchrun, 3 processes), then on
two nodes of this machine (two torchrun agents, c10d rendezvous, 2 + 1 processes, node-local output folders): when one
node freezes, the other stops within --dist_timeout with a message, and both rerun resume to the same per-step losses
and the same final checkpoint, bit for bit. (A 2-process job's checkpoints, log.txt and TensorBoard events:
tests/training/test_fsdp.py, its DDP run; a single process killed mid-epoch after a periodic checkpoint:
tests/training/test_resume_kill.py.)"""
import os
import re
import signal
from pathlib import Path

import pytest

from train_support import (X4, assert_same_final_checkpoint, folder_to_parquet, kill_tree, make_image_folder,
                           make_tiny_vae_ckpt, process_tree, read_steps, run_train, start_two_nodes, train_args,
                           wait_for_step)

pytestmark = pytest.mark.slow


def test_two_nodes_resume_bit_for_bit_inside_an_accumulation_cycle_after_one_node_hangs(tmp_path):
    """With three ranks the order in which DDP adds the gradients depends on its bucket layout, which it rebuilds after
    the first synced backward: a resumed run settles its buckets first, so its steps equal the uninterrupted run's.

    --ac=2 with 3 iterations per epoch: epoch 0 ends after the first half of a cycle, whose gradients exist only in
    memory. The epoch-end checkpoint points at the cycle's start (with the GradScaler's state of that moment); the job
    stopped after it recomputes that half."""
    # the parquet form of a small class-folder set: each loader reads row groups, the resumed run's included
    data = folder_to_parquet(make_image_folder(tmp_path / 'folder', n_classes=3, n_train=3, n_val=1), tmp_path / 'data')
    vae = make_tiny_vae_ckpt(tmp_path / 'vae.pth', X4)
    # 9 images, global batch 6 with --ac=2: 3 per iteration (1 per rank), 3 iterations per epoch, 6 in all; fp16
    # autocast with its GradScaler; a large lr so that round-off shows; TensorBoard at every iteration
    flags = dict(patch_size=4, bs=6, ac=2, ep=2, fp16=1, log_steps=1, tblr=0.5, hflip=1, tb_every_iters=1)
    # the same job on two nodes of this machine (2 ranks + 1), each with its own working folder and node-local output
    # folder; once step 3 is logged (after the epoch-0 checkpoint), node 1 freezes (SIGSTOP: a hung machine)
    nodes = [tmp_path / 'node0', tmp_path / 'node1']
    for folder in nodes:
        folder.mkdir()
    argv = train_args(data, vae, Path('out'), **flags, dist_timeout=0.1)
    procs = start_two_nodes(argv, nodes, (2, 1), 'hang.log')
    try:
        killed_at = wait_for_step(nodes[0] / 'out', 3, procs, timeout=300)
        for pid in process_tree(procs[1].pid):
            os.kill(pid, signal.SIGSTOP)
        # while node 0 waits for its peer, the reference: the same job uninterrupted on one node (3 processes)
        ref_out = tmp_path / 'reference'
        ref = run_train(train_args(data, vae, ref_out, **flags), nproc=3, timeout=300)
        procs[0].wait(timeout=120)  # node 0 gives up after --dist_timeout (6 s), not the default 30 minutes
    finally:
        for proc in procs:
            kill_tree(proc.pid)
            proc.wait(timeout=30)
    assert killed_at < 5, 'the freeze came too late to test anything'
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert sorted(read_steps(ref_out)) == list(range(6))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(next(ref_out.glob('tb-VARd2__pn1_2_3_4__*'))))
    ea.Reload()  # optimizer steps at odd iterations: the grad norm and the last scale's accuracy
    assert {'AR_opt_grad/grad/grad_norm', 'AR_iter_loss/acc_16', 'AR_iter_loss/L_4'} <= set(ea.Tags()['scalars'])
    log = (nodes[0] / 'hang.log').read_text()
    assert procs[0].returncode != 0 and re.search(r'exitcode\s*:\s*5\b', log), log[-3000:]
    assert 'error: lost the other processes of the job' in log and '--dist_timeout=0.1 minutes' in log
    # both nodes again: each resumes from its own folder's checkpoint
    procs = start_two_nodes(argv, nodes, (2, 1), 'rerun.log')
    for proc, folder in zip(procs, nodes):
        assert proc.wait(timeout=300) == 0, (folder / 'rerun.log').read_text()[-3000:]
    out = nodes[0] / 'out'
    assert 'ar-ckpt-last.pth: epoch 0, iteration 2' in (out / 'stdout.txt').read_text()  # the cut cycle's start
    assert read_steps(out) == read_steps(ref_out)
    assert_same_final_checkpoint(ref_out, nodes[1] / 'out')
    assert_same_final_checkpoint(ref_out, out)
