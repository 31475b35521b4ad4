"""A real 3-process torchrun job (gloo, CPU) on a small ImageFolder of real images, with gradient accumulation whose
cycles the epoch end cuts: after a SIGKILL of the whole job (torchrun and its workers) the same command resumes to the
same per-step losses and the same final checkpoint, bit for bit. (A 2-process job's checkpoints, log.txt and
TensorBoard events: tests/training/test_fsdp.py, its DDP run; a single process killed mid-epoch after a periodic
checkpoint: tests/training/test_resume_kill.py.)"""

import pytest

from train_support import (X4, assert_same_final_checkpoint, kill_after_step, make_image_folder, make_tiny_vae_ckpt,
                            read_steps, run_train, train_args)

pytestmark = pytest.mark.slow


def test_three_processes_resume_bit_for_bit_inside_an_accumulation_cycle(tmp_path):
    """With three ranks the order in which DDP adds the gradients depends on its bucket layout, which it rebuilds after
    the first synced backward: a resumed run settles its buckets first, so its steps equal the uninterrupted run's.

    --ac=2 with 3 iterations per epoch: epoch 0 ends after the first half of a cycle, whose gradients exist only in
    memory. The epoch-end checkpoint points at the cycle's start (with the GradScaler's state of that moment); the run
    killed after it recomputes that half."""
    data = make_image_folder(tmp_path / 'data', n_classes=3, n_train=3, n_val=1)
    vae = make_tiny_vae_ckpt(tmp_path / 'vae.pth', X4)
    # 9 images, global batch 6 with --ac=2: 3 per iteration (1 per rank), 3 iterations per epoch, 6 in all; fp16
    # autocast with its GradScaler; a large lr so that round-off shows; TensorBoard at every iteration
    flags = dict(patch_size=4, bs=6, ac=2, ep=2, fp16=1, log_steps=1, tblr=0.5, hflip=1, tb_every_iters=1)
    ref_out = tmp_path / 'reference'
    ref = run_train(train_args(data, vae, ref_out, **flags), nproc=3, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert sorted(read_steps(ref_out)) == list(range(6))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(next(ref_out.glob('tb-VARd2__pn1_2_3_4__*'))))
    ea.Reload()  # optimizer steps at odd iterations: the grad norm and the last scale's accuracy
    assert {'AR_opt_grad/grad/grad_norm', 'AR_iter_loss/acc_16', 'AR_iter_loss/L_4'} <= set(ea.Tags()['scalars'])
    out = tmp_path / 'interrupted'
    argv = train_args(data, vae, out, **flags)
    killed_at = kill_after_step(argv, out, step=3, nproc=3, timeout=300)  # after the epoch-0 checkpoint
    assert killed_at < 5, 'the kill came too late to test anything'
    resumed = run_train(argv, nproc=3, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'ar-ckpt-last.pth: epoch 0, iteration 2' in resumed.stdout  # the cut cycle's first iteration
    assert read_steps(out) == read_steps(ref_out)
    assert_same_final_checkpoint(ref_out, out)
