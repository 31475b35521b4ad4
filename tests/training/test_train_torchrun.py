"""Real torchrun jobs (gloo, CPU) on a small ImageFolder of real images: 2 processes train and write checkpoints,
log.txt and TensorBoard events; 3 processes, after a SIGKILL of the whole job (torchrun and its workers), resume to
the same per-step losses and the same final checkpoint, bit for bit."""
import json

import pytest

from train_support import (X4, assert_same_final_checkpoint, kill_after_step, make_image_folder, make_tiny_vae_ckpt,
                            read_steps, run_train, train_args)
from utils.ckpt import load_checkpoint

pytestmark = pytest.mark.slow


def test_torchrun_two_processes_train_checkpoint_and_log(tmp_path):
    data = make_image_folder(tmp_path / 'data', n_classes=3, n_train=8, n_val=2)
    vae = make_tiny_vae_ckpt(tmp_path / 'vae.pth', X4)
    # global batch 8 = 2 ranks x 4: 3 iterations per epoch, 9 in all
    # a large lr (0.5 * 8 / 256) so that any state not restored shows in the losses and weights
    flags = dict(patch_size=4, bs=8, ep=3, ckpt_every_iters=2, log_steps=1, tblr=0.5)

    ref_out = tmp_path / 'reference'
    ref = run_train(train_args(data, vae, ref_out, **flags), nproc=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert sorted(read_steps(ref_out)) == list(range(9))

    ckpt = load_checkpoint(str(ref_out / 'ar-ckpt-last.pth'))
    assert (ckpt['epoch'], ckpt['iter']) == (3, 0) and len(ckpt['rng']) == 2  # one RNG state per rank
    assert ckpt['derived']['batch_size'] == 4 and ckpt['derived']['world_size'] == 2
    assert ckpt['class_names'] == sorted(p.name for p in (data / 'train').iterdir())  # id i = i-th sorted folder
    assert '3 classes, ids in sorted folder order (0: ' in ref.stdout
    assert (ref_out / 'ar-ckpt-best.pth').exists()
    records = [json.loads(line) for line in (ref_out / 'log.txt').read_text().splitlines()]
    assert records[0]['is_master'] and [r['ep'] for r in records[1:]] == [1, 2, 3] and 'vL_tail' in records[-1]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb_dirs = list(ref_out.glob('tb-VARd2__pn1_2_3_4__b8ep3adam*'))
    assert len(tb_dirs) == 1
    ea = EventAccumulator(str(tb_dirs[0]))
    ea.Reload()
    scalars = set(ea.Tags()['scalars'])
    for tag in ('AR_opt_lr/lr_max/sche_tlr', 'AR_opt_grad/grad/grad_norm', 'AR_iter_loss/z_voc_usage',
                'AR_iter_loss/acc_16', 'AR_iter_loss/L_4', 'AR_ep_loss/L_mean', 'AR_ep_loss/vL_tail',
                'AR_z_burnout/rest_hours'):
        assert tag in scalars, tag
    assert ea.Tags()['images'] == ['AR_samples/cfg1.5']

    # a SIGKILL of the whole job and the same command: test_three_processes_resume_bit_for_bit below (3 ranks)


def test_three_processes_resume_bit_for_bit(tmp_path):
    """With three ranks the order in which DDP adds the gradients depends on its bucket layout, which it rebuilds after
    the first synced backward: a resumed run settles its buckets first, so its steps equal the uninterrupted run's."""
    data = make_image_folder(tmp_path / 'data', n_classes=3, n_train=6, n_val=1)
    vae = make_tiny_vae_ckpt(tmp_path / 'vae.pth', X4)
    # global batch 6 = 3 ranks x 2: 3 iterations per epoch, 6 in all; a large lr so that round-off shows
    flags = dict(patch_size=4, bs=6, ep=2, ckpt_every_iters=2, log_steps=1, tblr=0.5, hflip=1)
    ref_out = tmp_path / 'reference'
    ref = run_train(train_args(data, vae, ref_out, **flags), nproc=3, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / 'interrupted'
    argv = train_args(data, vae, out, **flags)
    killed_at = kill_after_step(argv, out, step=2, nproc=3, timeout=300)
    assert killed_at < 5, 'the kill came too late to test anything'
    resumed = run_train(argv, nproc=3, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert '[auto-resume] loaded' in resumed.stdout
    assert read_steps(out) == read_steps(ref_out)
    assert_same_final_checkpoint(ref_out, out)
