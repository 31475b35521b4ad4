"""Kill-and-resume equivalence: a run SIGKILLed at an arbitrary step and re-run with the same command gives the same
per-step losses as an uninterrupted run (single process, CPU, fixed seed, fp16 autocast with its GradScaler)."""
from train_fixtures import X4, kill_after_step, make_image_folder, make_tiny_vae_ckpt, read_steps, run_train, train_args


def test_sigkill_and_rerun_gives_the_uninterrupted_losses(tmp_path):
    data = make_image_folder(tmp_path / 'data', n_classes=3, n_train=8, n_val=2)
    vae = make_tiny_vae_ckpt(tmp_path / 'vae.pth', X4)
    # 24 images, batch 4: 6 iterations per epoch, 12 in all; checkpoints every 4 iterations and at epoch ends
    flags = dict(patch_size=4, bs=4, ep=2, fp16=1, hflip=1, ckpt_every_iters=4, log_steps=1)

    ref_out = tmp_path / 'reference'
    ref = run_train(train_args(data, vae, ref_out, **flags))
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = read_steps(ref_out)
    assert sorted(reference) == list(range(12))

    out = tmp_path / 'interrupted'
    argv = train_args(data, vae, out, **flags)
    # step 8 is logged after the interval checkpoint of step 7 was written: the resume is mid-epoch
    killed_at = kill_after_step(argv, out, step=8)
    assert killed_at < 11, 'the kill came too late to test anything'
    before = read_steps(out)
    resumed = run_train(argv)  # the very same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'ar-ckpt-last.pth: epoch 1, iteration 2' in resumed.stdout
    after = read_steps(out)
    assert after == reference  # bit-identical per-step losses
    assert all(after[k] == v for k, v in before.items())  # steps replayed after the checkpoint agree too
