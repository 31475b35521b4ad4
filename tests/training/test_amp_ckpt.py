"""The optimizer step (AMP, scaler, clipping, accumulation, non-finite skipping) and checkpoint files."""
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import torch

import train
from support import assert_equal_up_to_rounding
from train_support import ROOT, X16, cpu_env, make_image_folder, make_tiny_vae_ckpt, train_args
from trainer import VARTrainer
from utils.amp_sc import AmpOptimizer, NonFiniteError
from utils.ckpt import (CheckpointError, atomic_copy, atomic_save, auto_resume, find_checkpoints, load_checkpoint,
                        remove_stale_tmp)


def linear_setup(fp16=0, clip=2.0, ac=1, max_nonfinite=100, lr=0.1):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return model, AmpOptimizer(opt, list(model.parameters()), 'cpu', fp16=fp16, grad_clip=clip,
                               n_gradient_accumulation=ac, max_nonfinite=max_nonfinite)


def make_trainer(vae, var, lr=1e-3):
    opt = torch.optim.AdamW(var.parameters(), lr=lr)
    amp = AmpOptimizer(opt, list(var.parameters()), 'cpu')
    return VARTrainer(torch.device('cpu'), var.patch_nums, [16 * p for p in var.patch_nums], vae, var, var, amp, 0.0)


def _loss_with_known_grads(model):
    """A loss on a random batch, the parameters before the step, its gradients and their total L2 norm."""
    x = torch.randn(8, 4)
    ref = [p.detach().clone() for p in model.parameters()]
    loss = model(x).pow(2).sum() * 10
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    return x, loss, ref, grads, torch.cat([g.flatten() for g in grads]).norm().item()


def test_clipping_returns_the_pre_clip_norm_and_steps_with_clipped_grads():
    model, amp = linear_setup(clip=0.5)
    x, loss, ref, grads, norm = _loss_with_known_grads(model)
    grad_norm, scale_log2 = amp.backward_clip_step(loss, stepping=True)
    assert norm > 0.5 and scale_log2 is None
    # the clipping's norm of per-tensor norms vs one norm of all 15 gradients; the step written out: up to rounding
    assert_equal_up_to_rounding(grad_norm, norm, reduction=15, depth=2, dtype=torch.float32)
    for p, p0, g in zip(model.parameters(), ref, grads):
        assert_equal_up_to_rounding(p, p0 - 0.1 * g * (0.5 / (norm + 1e-6)), reduction=15, depth=5)
        assert p.grad is None  # zero_grad(set_to_none=True)


def test_accumulation_divides_the_loss_and_steps_every_ac_iterations():
    model, amp = linear_setup(clip=0.0, ac=2)
    x1, x2 = torch.randn(8, 4), torch.randn(8, 4)
    p0 = model.weight.detach().clone()
    g_ref = torch.autograd.grad(model(x1).sum() / 2 + model(x2).sum() / 2, model.weight)[0]
    assert amp.backward_clip_step(model(x1).sum(), stepping=False) == (None, None)
    assert torch.equal(model.weight, p0)
    grad_norm, _ = amp.backward_clip_step(model(x2).sum(), stepping=True)
    assert grad_norm is not None
    # two backward passes accumulated vs one of the summed loss: up to rounding
    assert_equal_up_to_rounding(model.weight, p0 - 0.1 * g_ref, reduction=2 * 8, depth=3)


def test_non_finite_steps_are_skipped_counted_and_eventually_stop_the_run():
    model, amp = linear_setup(max_nonfinite=3)
    p0 = model.weight.detach().clone()
    bad = lambda: model(torch.randn(2, 4)).sum() * float('nan')  # noqa: E731
    for k in (1, 2):
        grad_norm, _ = amp.backward_clip_step(bad(), stepping=True)
        assert math.isnan(grad_norm) and amp.num_skipped == k and torch.equal(model.weight, p0)
    amp.backward_clip_step(model(torch.randn(2, 4)).sum(), stepping=True)  # a good step resets the streak
    assert amp.consecutive_skipped == 0 and amp.num_skipped == 2 and not torch.equal(model.weight, p0)
    amp.backward_clip_step(bad(), stepping=True)
    amp.backward_clip_step(bad(), stepping=True)
    with pytest.raises(NonFiniteError, match='3 consecutive steps'):
        amp.backward_clip_step(bad(), stepping=True)
    assert amp.num_skipped == 5


def test_fp16_scaler_constants_backoff_and_the_32768_cap():
    model, amp = linear_setup(fp16=1)
    assert amp.scaler.get_scale() == 2.0 ** 11 and amp.scaler.get_growth_interval() == 1000
    with amp.autocast():
        assert model(torch.randn(2, 4)).dtype == torch.float16
    p0 = model.weight.detach().clone()
    grad_norm, scale_log2 = amp.backward_clip_step(model(torch.randn(2, 4)).sum() * float('inf'), stepping=True)
    assert not math.isfinite(grad_norm) and scale_log2 == 11 and amp.num_skipped == 1
    assert amp.scaler.get_scale() == 2.0 ** 10 and torch.equal(model.weight, p0)  # backoff x0.5, no step
    amp.scaler.update(new_scale=65536.0)
    _, scale_log2 = amp.backward_clip_step(model(torch.randn(2, 4)).sum(), stepping=True)
    assert scale_log2 == 16 and amp.scaler.get_scale() == 32768.0  # strict test: 65536 lasts one step
    _, scale_log2 = amp.backward_clip_step(model(torch.randn(2, 4)).sum(), stepping=True)
    assert scale_log2 == 15 and amp.scaler.get_scale() == 32768.0


def test_fp16_scale_of_exactly_32768_follows_the_normal_update():
    # spec 6.5 step 4: only a scale strictly above 32768 is forced back to 32768
    def at_32768(growth_tracker):
        model, amp = linear_setup(fp16=1)
        sd = amp.scaler.state_dict()
        amp.scaler.load_state_dict({**sd, 'scale': 32768.0, '_growth_tracker': growth_tracker})
        return model, amp
    model, amp = at_32768(0)
    _, scale_log2 = amp.backward_clip_step(model(torch.randn(2, 4)).sum() * float('inf'), stepping=True)
    assert scale_log2 == 15 and amp.num_skipped == 1 and amp.scaler.get_scale() == 16384.0  # backoff x0.5
    model, amp = at_32768(999)  # the 1000th finite step in a row: the normal update doubles it
    _, scale_log2 = amp.backward_clip_step(model(torch.randn(2, 4)).sum(), stepping=True)
    assert scale_log2 == 15 and amp.scaler.get_scale() == 65536.0
    _, scale_log2 = amp.backward_clip_step(model(torch.randn(2, 4)).sum(), stepping=True)
    assert scale_log2 == 16 and amp.scaler.get_scale() == 32768.0  # then the cap applies


def test_without_clipping_the_true_norm_is_returned_and_non_finite_steps_are_still_skipped():
    model, amp = linear_setup(clip=0.0)
    x, loss, ref, grads, norm = _loss_with_known_grads(model)
    grad_norm, _ = amp.backward_clip_step(loss, stepping=True)
    assert norm > 2.0
    assert_equal_up_to_rounding(grad_norm, norm, reduction=15, depth=2, dtype=torch.float32)
    for p, p0, g in zip(model.parameters(), ref, grads):
        assert_equal_up_to_rounding(p, p0 - 0.1 * g, reduction=1, depth=2)  # not clipped: the SGD step written out
    p0 = model.weight.detach().clone()
    grad_norm, _ = amp.backward_clip_step(model(x).sum() * float('nan'), stepping=True)
    assert math.isnan(grad_norm) and amp.num_skipped == 1 and amp.consecutive_skipped == 1
    assert torch.equal(model.weight, p0) and not model.weight.isnan().any()


def test_skip_counters_survive_a_state_round_trip():
    model, amp = linear_setup(max_nonfinite=3)
    for _ in range(2):
        amp.backward_clip_step(model(torch.randn(2, 4)).sum() * float('nan'), stepping=True)
    sd = amp.state_dict()
    assert (sd['num_skipped'], sd['consecutive_skipped']) == (2, 2)
    model2, other = linear_setup(max_nonfinite=3)
    assert other.load_state_dict(sd) == []
    assert (other.num_skipped, other.consecutive_skipped) == (2, 2)
    with pytest.raises(NonFiniteError, match='3 consecutive steps'):  # the streak goes on after a resume
        other.backward_clip_step(model2(torch.randn(2, 4)).sum() * float('nan'), stepping=True)


def test_bf16_autocast_on_cpu_and_state_round_trip():
    model, amp = linear_setup(fp16=2)
    with amp.autocast():
        assert model(torch.randn(2, 4)).dtype == torch.bfloat16
    assert amp.scaler is None
    model16, amp16 = linear_setup(fp16=1)
    amp16.backward_clip_step(model16(torch.randn(2, 4)).sum(), stepping=True)  # the scale exists after a step
    amp16.scaler.update(new_scale=512.0)
    sd = amp16.state_dict()
    _, other = linear_setup(fp16=1)
    assert other.load_state_dict(sd) == [] and other.scaler.get_scale() == 512.0
    assert 'scaler' in sd and 'no fp16 scaler state' in other.load_state_dict(amp.state_dict())[0]


def test_trainer_stops_on_persistent_non_finite_loss(tiny_models):
    vae, var = tiny_models
    var.train()
    trainer = make_trainer(vae, var)
    amp = trainer.var_opt
    amp.max_nonfinite = 2
    img_B3HW, label_B = torch.rand(2, 3, 64, 64) * 2 - 1, torch.tensor([1, 2])
    out = trainer.train_step(True, img_B3HW, label_B, metrics=True, details=True)
    assert math.isfinite(out['loss'].item()) and set(out['per_scale']) == {'acc_16', 'L_16', 'acc_32', 'L_32',
                                                                           'acc_48', 'L_48', 'acc_64', 'L_64'}
    with torch.no_grad():
        var.head.bias[0] = float('nan')
    snapshot = {k: v.clone() for k, v in var.state_dict().items()}
    assert math.isnan(trainer.train_step(True, img_B3HW, label_B)['loss'].item()) and amp.num_skipped == 1
    assert all(torch.equal(v, snapshot[k]) or v.isnan().any() for k, v in var.state_dict().items())
    with pytest.raises(NonFiniteError):
        trainer.train_step(True, img_B3HW, label_B)


def test_trainer_progressive_stage_eval_and_state_round_trip(tiny_models):
    vae, var = tiny_models
    var.train()
    trainer = make_trainer(vae, var)
    img_B3HW, label_B = torch.rand(2, 3, 64, 64) * 2 - 1, torch.tensor([1, 2])
    out = trainer.train_step(True, img_B3HW, label_B, prog_si=1, prog_wp_it=4, metrics=True, details=True)
    assert out['Lt'] == out['Acct'] == -1 and set(out['per_scale']) == {'acc_16', 'L_16', 'acc_32', 'L_32'}
    assert out['prog_wp'] == 1.0 and var.prog_si == -1 == vae.quantize.prog_si  # reset after the step
    trainer.train_step(True, img_B3HW, label_B, prog_si=2, prog_wp_it=4)
    out = trainer.train_step(True, img_B3HW, label_B, prog_si=2, prog_wp_it=4)
    assert out['prog_wp'] == 0.5 and (trainer.prog_it, trainer.last_prog_si, trainer.first_prog) == (2, 2, False)
    out = trainer.train_step(True, img_B3HW, label_B, prog_si=3, prog_wp_it=4, metrics=True)
    assert out['prog_si'] == -1 and out['Lt'] >= 0  # the last stage is the full model

    ld_val = [(img_B3HW, label_B), (img_B3HW[:1], label_B[:1])]
    L_mean, L_tail, acc_mean, acc_tail, tot, _ = trainer.eval_ep(ld_val)
    assert tot == 3 and all(math.isfinite(v) for v in (L_mean, L_tail, acc_mean, acc_tail)) and var.training
    assert trainer.sample_images(torch.tensor([0, 9]), g_seed=0).shape == (2, 3, 64, 64) and var.training

    sd = trainer.state_dict()
    assert set(sd) == {'config', 'var_wo_ddp', 'vae_local', 'var_opt'} and 'vae_local' not in sd['var_wo_ddp']
    from models import build_vae_var
    from support import TINY
    vae2, var2 = build_vae_var(device='cpu', **TINY)
    other = make_trainer(vae2, var2)
    assert other.load_state_dict(sd) == []
    assert (other.prog_it, other.last_prog_si, other.first_prog) == (1, 3, False)
    assert all(torch.equal(v, var2.state_dict()[k]) for k, v in var.state_dict().items())
    opt_state = other.var_opt.optimizer.state_dict()['state']
    assert opt_state.keys() == trainer.var_opt.optimizer.state_dict()['state'].keys()


def test_train_py_stops_with_a_clear_message_and_keeps_its_last_good_checkpoint(tmp_path, capsys):
    data, vae = make_image_folder(tmp_path / 'data', n_train=3, n_val=1), make_tiny_vae_ckpt(tmp_path / 'vae.pth', X16)
    out = tmp_path / 'out'
    # an absurd lr: the first step is finite, its update makes every later loss NaN
    argv = train_args(data, vae, out, tblr=1e35, wp0=1, max_nonfinite=2, ckpt_every_iters=1, bs=3, ep=3,
                      log_steps=1)
    assert train.main(argv) == 3
    assert '2 consecutive steps had a non-finite loss' in capsys.readouterr().err
    ckpt = load_checkpoint(str(out / 'ar-ckpt-last.pth'))
    assert (ckpt['epoch'], ckpt['iter']) == (0, 1)  # saved after the good step, not during the NaN streak
    assert '2 consecutive' in (out / 'stderr.txt').read_text()


def test_atomic_save_round_trip_and_corrupt_files(tmp_path):
    p = tmp_path / 'ar-ckpt-last.pth'
    atomic_save({'epoch': 1, 'iter': 0, 'trainer': {'w': torch.ones(3)}}, str(p))
    assert load_checkpoint(str(p))['trainer']['w'].sum() == 3
    assert [f.name for f in tmp_path.iterdir()] == ['ar-ckpt-last.pth']  # no temporary file left
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_checkpoint(str(p))
    torch.save({'just': 'weights'}, str(tmp_path / 'x.pth'))
    with pytest.raises(CheckpointError, match='not a VAR training checkpoint'):
        load_checkpoint(str(tmp_path / 'x.pth'))


def test_atomic_save_fsyncs_the_complete_temp_file_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(('fsync', st.st_ino, st.st_size, stat.S_ISDIR(st.st_mode)))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(('replace', os.stat(src).st_ino, os.path.basename(src), os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'replace', replace)
    p = tmp_path / 'ar-ckpt-last.pth'
    atomic_save({'epoch': 1, 'iter': 0, 'trainer': {'w': torch.ones(1000)}}, str(p))
    st = os.stat(p)
    kinds = [e[0] for e in events]
    assert kinds.count('replace') == 1
    i_rep = kinds.index('replace')
    _, ino, tmp_name, dst_name = events[i_rep]
    assert ino == st.st_ino and dst_name == p.name and tmp_name.startswith('.ar-ckpt-last.pth.tmp-')
    # the temp file (same inode as the final file) was fsync'ed with all its bytes flushed, before the rename
    assert ('fsync', st.st_ino, st.st_size, False) in events[:i_rep]
    # and the folder is synced after the rename, making the rename itself durable
    dir_ino = os.stat(tmp_path).st_ino
    assert any(e[0] == 'fsync' and e[1] == dir_ino and e[3] for e in events[i_rep + 1:])
    assert load_checkpoint(str(p))['trainer']['w'].sum() == 1000


def test_remove_stale_tmp_only_removes_this_hosts_temporary_files(tmp_path):
    host = socket.gethostname()
    other = 'another-node-7' if host != 'another-node-7' else 'yet-another-node'
    mine = tmp_path / f'.ar-ckpt-last.pth.tmp-{host}-4242'
    theirs = tmp_path / f'.ar-ckpt-last.pth.tmp-{other}-4242'  # another node's save, possibly in flight
    ckpt = tmp_path / 'ar-ckpt-last.pth'
    for f in (mine, theirs, ckpt):
        f.write_bytes(b'partial')
    assert remove_stale_tmp(str(tmp_path)) == [str(mine)]
    assert not mine.exists() and theirs.exists() and ckpt.exists()


def test_auto_resume_prefers_the_newest_and_falls_back_when_it_is_broken(tmp_path):
    assert auto_resume(str(tmp_path)) == (None, None, [])
    last, best = tmp_path / 'ar-ckpt-last.pth', tmp_path / 'ar-ckpt-best.pth'
    atomic_save({'epoch': 10, 'iter': 0, 'trainer': {}}, str(best))
    time.sleep(0.01)
    atomic_save({'epoch': 12, 'iter': 3, 'trainer': {}}, str(last))
    ckpt, path, notes = auto_resume(str(tmp_path))
    assert (ckpt['epoch'], path, notes) == (12, str(last), [])
    atomic_copy(str(last), str(best))  # same mtime as its source: last still wins the tie
    assert find_checkpoints(str(tmp_path))[0] == str(last)
    atomic_save({'epoch': 10, 'iter': 0, 'trainer': {}}, str(best))
    last.write_bytes(last.read_bytes()[:100])
    os.utime(last)  # broken and newest
    ckpt, path, notes = auto_resume(str(tmp_path))
    assert ckpt['epoch'] == 10 and path == str(best) and 'ar-ckpt-last.pth' in notes[0]
    best.write_bytes(b'')
    with pytest.raises(CheckpointError, match='no usable checkpoint'):
        auto_resume(str(tmp_path))


SLOW_SAVE = '''
import time, torch
from utils.ckpt import atomic_save

class Slow:  # pickled in the middle of the write: lets the test kill the writer mid-save
    def __reduce__(self):
        open({flag!r}, 'w').close()
        time.sleep(60)
        return (int, (0,))

atomic_save({{'epoch': 2, 'iter': 0, 'trainer': {{'w': torch.zeros(100000)}}, 'slow': Slow()}}, {target!r})
'''


@pytest.mark.slow
def test_an_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    target, flag = tmp_path / 'ar-ckpt-last.pth', tmp_path / 'writing'
    atomic_save({'epoch': 1, 'iter': 0, 'trainer': {'w': torch.ones(3)}}, str(target))
    script = SLOW_SAVE.format(flag=str(flag), target=str(target))
    proc = subprocess.Popen([sys.executable, '-c', script], env=cpu_env(), cwd=str(ROOT))  # `-c` imports from cwd
    try:
        deadline = time.time() + 60
        while not flag.exists():
            assert proc.poll() is None and time.time() < deadline, 'the writer did not start'
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = [f for f in tmp_path.iterdir() if f.name.startswith('.ar-ckpt-last.pth.tmp')]
    assert len(leftovers) == 1  # the killed writer's partial file (torch.save pickles in memory first)
    ckpt, path, notes = auto_resume(str(tmp_path))
    assert ckpt['epoch'] == 1 and path == str(target) and notes == []
    assert remove_stale_tmp(str(tmp_path)) == [str(leftovers[0])]
