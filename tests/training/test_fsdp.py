"""train.py --fsdp 1 (FSDP2) and --act_ckpt 1 in real 2-process torchrun jobs (gloo, CPU): the same losses and weights
as DDP, exact resume after SIGTERM to one rank and after a SIGKILL, resume at another world size under DDP, and the
export of a sharded checkpoint to the single-file formats, loaded strictly. One uninterrupted FSDP run (module
fixture) serves every comparison; the unit tests of the sharded checkpoint files run in-process."""
import shutil

import pytest
import torch

from train_support import (X4, assert_same_state, kill_after_step, make_image_folder, make_tiny_vae_ckpt, read_steps,
                           run_train, sigterm_to_rank1, signal_after_step, train_args, train_cmd)
from utils.ckpt import load_checkpoint
from utils.ckpt_sharded import SHARDS_KEY, read_full_tensors, remove_unreferenced_shards, shards_folder

# global batch 8 = 2 ranks x 4, --ac 2 (bs 16): 3 iterations per epoch, 6 in all, optimizer steps at odd g_it, and each
# epoch end cuts an accumulation cycle; progressive training for the first half (from scale 1); checkpoints every 2
# iterations and at epoch ends; validation at the end; a large lr so that any state not restored shows; fp32, where
# FSDP and DDP agree up to round-off
FLAGS = dict(patch_size=4, bs=16, ac=2, ep=2, fp16=0, ckpt_every_iters=2, log_steps=1, tblr=0.5, pg=0.5, pg0=1,
             val_every_ep=2)


def full_state(out):
    """(the last checkpoint file, VAR's full weights, the optimizer's full moments) of a run's output folder."""
    ckpt = load_checkpoint(str(out / 'ar-ckpt-last.pth'))
    if SHARDS_KEY not in ckpt:
        return ckpt, ckpt['trainer']['var_wo_ddp'], None
    folder = shards_folder(ckpt, str(out / 'ar-ckpt-last.pth'))
    return ckpt, read_full_tensors(folder), read_full_tensors(folder, 'optim.state.')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """The same 2-process job with DDP and with FSDP + activation checkpointing: (data, vae, root, ddp, fsdp)."""
    root = tmp_path_factory.mktemp('fsdp')
    data = make_image_folder(root / 'data', n_classes=3, n_train=8, n_val=2)
    vae = make_tiny_vae_ckpt(root / 'vae.pth', X4)
    for name, extra in (('ddp', {}), ('fsdp', dict(fsdp=1, act_ckpt=1))):
        done = run_train(train_args(data, vae, root / name, **FLAGS, **extra), nproc=2)
        assert done.returncode == 0, done.stderr[-3000:]
        assert sorted(read_steps(root / name)) == list(range(6))
    return data, vae, root, root / 'ddp', root / 'fsdp'


@pytest.mark.slow
def test_fsdp_with_act_ckpt_trains_as_ddp(runs):
    """Losses and final weights of FSDP (sharded weights, gradients reduce-scattered, global-norm clipping on the
    shards) with activation checkpointing equal DDP's up to float32 round-off. FSDP reduces every micro-batch of an
    accumulation cycle while DDP adds the micro-batches locally and reduces once: the sums differ in their last bits,
    which AdamW's normalisation lifts to ~1e-5 in weights whose gradients are near zero."""
    _, _, _, ddp_out, fsdp_out = runs
    ddp_losses, fsdp_losses = read_steps(ddp_out), read_steps(fsdp_out)
    for g_it, loss in ddp_losses.items():
        assert fsdp_losses[g_it] == pytest.approx(loss, rel=1e-5, abs=1e-6), g_it
    ckpt, var_sd, optim_sd = full_state(fsdp_out)
    _, ddp_sd, _ = full_state(ddp_out)
    assert (ckpt['epoch'], ckpt['iter']) == (2, 0) and len(ckpt['rng']) == 2 and optim_sd
    assert sorted(var_sd) == sorted(ddp_sd)
    for k, t in ddp_sd.items():
        torch.testing.assert_close(var_sd[k], t, rtol=1e-4, atol=5e-5)
    # only the shard folder the files name is kept
    assert [p.name for p in fsdp_out.glob('ar-ckpt-shards-*')] == [ckpt[SHARDS_KEY]]


@pytest.mark.slow
def test_fsdp_sigterm_and_sigkill_then_rerun_give_the_uninterrupted_run(runs, tmp_path):
    """SIGTERM to rank 1 (a preemption): a sharded checkpoint, exit 130. The same command again, SIGKILLed after a
    periodic checkpoint; then once more to the end. Per-step losses, weights, optimizer moments, RNG states and the
    position equal the uninterrupted run's bit for bit. These runs go without --act_ckpt: that the uninterrupted
    run used it and still matches bit for bit is the test that activation checkpointing changes no number."""
    data, vae, _, _, ref_out = runs
    out = tmp_path / 'interrupted'
    argv = train_args(data, vae, out, **FLAGS, fsdp=1)
    proc, log = signal_after_step(train_cmd(argv, nproc=2), out, step=0, send=sigterm_to_rank1)
    assert 'SIGTERM: saving a checkpoint' in log and 'exitcode  : 130' in log, log[-3000:]  # the workers' code
    assert '[stop] stopped on request at epoch 0, iteration' in log, log[-3000:]
    # g_it 3 writes the periodic checkpoint (1, 1); the kill comes once step 4 is logged
    killed_at = kill_after_step(argv, out, step=4, nproc=2)
    assert killed_at < 5, 'the kill came too late to test anything'
    resumed = run_train(argv, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'ar-ckpt-last.pth: epoch 1, iteration 1' in resumed.stdout
    assert read_steps(out) == read_steps(ref_out)
    ref_ckpt, ref_sd, ref_optim = full_state(ref_out)
    got_ckpt, got_sd, got_optim = full_state(out)
    for key in ('epoch', 'iter', 'trainer', 'best', 'rng'):
        assert_same_state(ref_ckpt[key], got_ckpt[key], key)
    assert_same_state(ref_sd, got_sd, 'weights')
    assert_same_state(ref_optim, got_optim, 'optimizer')


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_in_one_process_without_fsdp_and_exports(runs, tmp_path):
    """The 2-process FSDP checkpoint resumes in one process on the DDP code path (train.main in this process: no
    process group, so no wrapper; weights and optimizer state gathered: with lr 0 the weights stay the checkpoint's,
    the optimizer counts on from its 3 steps); its exports load strictly through models.load_checkpoint_models and
    the official-format path load_var_weights."""
    import models
    import train
    from models.loading import load_var_weights, read_checkpoint
    from utils.export_ckpt import export, main as export_main
    data, vae, _, _, fsdp_out = runs
    out = tmp_path / 'one_process'
    shutil.copytree(fsdp_out, out)
    _, var_sd, _ = full_state(fsdp_out)
    assert train.main(train_args(data, vae, out, **{**FLAGS, 'ep': 3, 'tblr': 0.0})) == 0
    console = (out / 'stdout.txt').read_text() + (out / 'stderr.txt').read_text()
    assert 'ar-ckpt-last.pth: epoch 2, iteration 0' in console
    assert 'written with another number of processes' in console
    ckpt = load_checkpoint(str(out / 'ar-ckpt-last.pth'))  # DDP writes the single-file format
    assert SHARDS_KEY not in ckpt and ckpt['epoch'] == 3
    assert_same_state(var_sd, ckpt['trainer']['var_wo_ddp'], 'weights')
    steps = {int(s['step']) for s in ckpt['trainer']['var_opt']['optimizer']['state'].values()}
    assert steps == {3 + 1}  # 3 steps before; then g_it 6-7 steps, g_it 8 opens a cycle that the run's end drops

    project = export(str(fsdp_out), str(tmp_path / 'model.pth'))
    vae_m, var_m = models.load_checkpoint_models(project)  # strict
    assert_same_state(var_sd, var_m.state_dict(), 'export')
    official = tmp_path / 'var_d2.pth'
    assert export_main([str(fsdp_out / 'ar-ckpt-last.pth'), '--out', str(official), '--format', 'official']) == 0
    official_sd = torch.load(official, map_location='cpu', weights_only=True)
    assert sorted(official_sd) == sorted(var_m.state_dict())
    var_o = load_var_weights(vae_m, official_sd, var_config=read_checkpoint(project)['model_config'])  # strict
    assert_same_state(var_sd, var_o.state_dict(), 'official export')
    with pytest.raises(ValueError, match='export_ckpt'):
        models.load_checkpoint_models(fsdp_out / 'ar-ckpt-last.pth')


def test_fsdp_needs_torchrun(tmp_path, capsys):
    """--fsdp 1 in a plain single process says how to launch it (exit code 2, no traceback)."""
    from train import main
    data = make_image_folder(tmp_path / 'data', n_classes=2, n_train=2, n_val=1)
    vae = make_tiny_vae_ckpt(tmp_path / 'vae.pth', X4)
    assert main(train_args(data, vae, tmp_path / 'out', patch_size=4, bs=2, ep=1, fsdp=1)) == 2
    assert 'torchrun --nproc_per_node=1' in capsys.readouterr().err


def test_unreferenced_shard_folders_are_removed(tmp_path):
    """After a save, only the shard folders that ar-ckpt-last.pth / ar-ckpt-best.pth name remain (a killed write
    leaves a folder no file names)."""
    for name in ('ar-ckpt-shards-e0-i2-aaaa', 'ar-ckpt-shards-e1-i0-bbbb', 'ar-ckpt-shards-e1-i1-cccc'):
        (tmp_path / name).mkdir()
    torch.save({SHARDS_KEY: 'ar-ckpt-shards-e1-i0-bbbb'}, tmp_path / 'ar-ckpt-last.pth')
    torch.save({SHARDS_KEY: 'ar-ckpt-shards-e0-i2-aaaa'}, tmp_path / 'ar-ckpt-best.pth')
    removed = remove_unreferenced_shards(str(tmp_path), 'ar-ckpt-last.pth', 'ar-ckpt-best.pth')
    assert removed == ['ar-ckpt-shards-e1-i1-cccc']
    assert sorted(p.name for p in tmp_path.glob('ar-ckpt-shards-*')) == ['ar-ckpt-shards-e0-i2-aaaa',
                                                                          'ar-ckpt-shards-e1-i0-bbbb']
