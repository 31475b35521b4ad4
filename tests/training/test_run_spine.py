"""The run spine shared by train.py and train_vae.py (utils/run.py): the process-group backend of a CPU run, the
cross-rank resume-point check, the skip-streak guard of periodic checkpoints, exit codes, and the progressive stages
of a run (issue 16: the official loop feeds the unrounded warm-up length to the stage rule)."""
import pytest
import torch

import dist
import train
import train_vae
from train_support import X4, make_image_folder, make_tiny_vae_ckpt, train_args
from utils.ckpt import CheckpointError, load_checkpoint
from utils.run import check_same_resume_point


class _Joined(Exception):
    """Raised by the fake init_process_group: the test only needs the backend it was asked for."""


@pytest.fixture
def gpu_in_sight(monkeypatch):
    """A torchrun rank on a machine where CUDA is reported available; init_process_group records its backend."""
    asked = []

    def init_process_group(backend=None, **kw):
        asked.append(backend)
        raise _Joined
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda *a: None)
    monkeypatch.setattr(torch.distributed, 'init_process_group', init_process_group)
    return asked


def test_backend_rule_is_gloo_for_a_cpu_run_even_with_a_gpu_in_sight():
    assert dist.backend_for('cpu', cuda_available=True) == 'gloo'
    assert dist.backend_for('', cuda_available=True) == 'nccl'
    assert dist.backend_for('cuda:1', cuda_available=True) == 'nccl'
    assert dist.backend_for('', cuda_available=False) == 'gloo'


def test_launch_ranks_from_torchrun_else_from_srun():
    """torchrun's variables win; `srun python train.py` tasks are read from SLURM's; one task, or the batch script
    itself without srun's step count, is a plain process; SLURM tasks without MASTER_ADDR/MASTER_PORT are refused."""
    slurm = dict(SLURM_PROCID='3', SLURM_LOCALID='1', SLURM_NTASKS='8', MASTER_ADDR='node1', MASTER_PORT='29500')
    assert dist.launch_ranks({}) is None
    assert dist.launch_ranks(dict(slurm, RANK='0', WORLD_SIZE='2')) == dict(rank=0, world_size=2)  # srun torchrun
    assert dist.launch_ranks(slurm) == dict(rank=3, world_size=8)
    assert dist.launch_ranks(dict(slurm, SLURM_STEP_NUM_TASKS='4')) == dict(rank=3, world_size=4)  # this step's tasks
    assert dist.launch_ranks(dict(slurm, SLURM_NTASKS='1')) is None
    with pytest.raises(dist.LaunchError, match='MASTER_ADDR is not set: export MASTER_ADDR'):
        dist.launch_ranks({k: v for k, v in slurm.items() if k != 'MASTER_ADDR'})


def test_srun_tasks_without_master_addr_are_exit_2_without_a_traceback(tmp_path, capsys, monkeypatch):
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(k, raising=False)
    for k, v in dict(SLURM_PROCID='0', SLURM_LOCALID='0', SLURM_NTASKS='2').items():
        monkeypatch.setenv(k, v)
    data = make_image_folder(tmp_path / 'data', n_classes=2, n_train=2, n_val=1)
    assert train.main(train_args(data, tmp_path / 'vae.pth', tmp_path / 'a', bs=2)) == 2
    err = capsys.readouterr().err
    assert 'SLURM task 0 of 2 without torchrun, but MASTER_ADDR and MASTER_PORT are not set' in err
    assert 'Traceback' not in err and not (tmp_path / 'a').exists()


@pytest.mark.parametrize('entry', ['train', 'train_vae'])
def test_both_trainers_join_with_gloo_for_device_cpu_on_a_gpu_machine(gpu_in_sight, entry, tmp_path):
    """`torchrun train_vae.py --device=cpu` on a machine with a GPU used to pick NCCL, which cannot reduce CPU
    tensors; both entry points now follow the one rule of dist.backend_for."""
    main = {'train': train.main, 'train_vae': train_vae.main}[entry]
    with pytest.raises(_Joined):
        main([f'--data_path={tmp_path}', '--device=cpu'])
    assert gpu_in_sight == ['gloo']


def test_the_resume_point_check_refuses_ranks_that_disagree(monkeypatch):
    check_same_resume_point((1, 2))  # one process: nothing to compare
    monkeypatch.setattr(dist, 'allgather_object', lambda point: [point, (1, 0)])
    with pytest.raises(CheckpointError, match=r'different resume points .*\(1, 2\), \(1, 0\)'):
        check_same_resume_point((1, 2))


@pytest.mark.parametrize('entry', ['train', 'train_vae'])
def test_both_trainers_stop_with_exit_4_when_the_ranks_found_different_resume_points(monkeypatch, tmp_path, capsys,
                                                                                     entry):
    """Another rank (faked) found a checkpoint that this one lacks: the run stops before training (exit code 4)."""
    data = make_image_folder(tmp_path / 'data', n_classes=2, n_train=2, n_val=1)
    monkeypatch.setattr(dist, 'allgather_object', lambda point: [point, (point[0] + 1, 0)])
    if entry == 'train':
        vae = make_tiny_vae_ckpt(tmp_path / 'vae.pth', X4)
        code = train.main(train_args(data, vae, tmp_path / 'out', patch_size=4, bs=4, ep=1))
    else:
        code = train_vae.main(vae_flags(data, tmp_path / 'out', ep=1))
    assert code == 4
    err = capsys.readouterr().err
    assert 'different resume points' in err and 'Traceback' not in err
    assert not list((tmp_path / 'out').glob('*ckpt*.pth'))


def vae_flags(data, out, **extra):
    flags = dict(data_path=data, out_dir=out, vae_ch=32, vae_ch_mult='1_1_2', vocab=64, cvae=8, pn='1_2_4',
                 mid_reso=1.0, lp=0, dw=0, bs=2, ep=2, seed=1, tf32=0, afuse=0, workers=0, val_every_ep=1)
    flags.update(extra)
    return [f'--{k}={v}' for k, v in flags.items()]


def test_the_tokenizer_keeps_its_last_good_checkpoint_during_a_streak_of_skipped_steps(tmp_path, capsys):
    """As train.py: an absurd lr makes every loss after the first step non-finite; the periodic checkpoint is not
    written during the streak of skipped steps (it would hold the state of a diverging run), exit code 3."""
    data = make_image_folder(tmp_path / 'data', n_classes=2, n_train=3, n_val=1)
    out = tmp_path / 'out'
    argv = vae_flags(data, out, tblr=1e35, wp0=1, max_nonfinite=2, ckpt_every_iters=1, bs=2, ep=3, log_steps=1,
                     vq_reinit=0)
    assert train_vae.main(argv) == 3
    err = capsys.readouterr().err
    assert '2 consecutive steps had a non-finite loss' in err and 'Traceback' not in err
    ckpt = load_checkpoint(str(out / 'vae-ckpt-last.pth'))
    assert (ckpt['epoch'], ckpt['iter']) == (0, 1)  # saved after the good step, not during the NaN streak


def test_a_set_up_mistake_is_exit_2_without_a_traceback_in_both_trainers(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data', n_classes=2, n_train=2, n_val=1)
    assert train_vae.main(vae_flags(data, tmp_path / 'v', vae_ch=40)) == 2  # not a multiple of 32
    assert train.main(train_args(data, tmp_path / 'missing.pth', tmp_path / 'a', bs=2, ac=4)) == 2  # bs < ac
    err = capsys.readouterr().err
    assert 'error: --vae_ch=40 must be a multiple of 32' in err and 'is too small for --ac=4' in err
    assert 'Traceback' not in err


HOLD_LOCK = """
import sys, time
from utils.run_lock import FolderLock
lock = FolderLock(sys.argv[1])
lock.acquire()
print('held', flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize('entry', ['train', 'train_vae'])
def test_a_second_run_on_a_folder_in_use_is_refused_and_a_dead_runs_lock_is_not(entry, tmp_path, capsys):
    """One run per output folder: while a live process holds the folder's lock, a run pointed there stops with exit 2
    and a message naming the holder, before writing anything; once the holder is SIGKILLed (no clean-up runs), the
    kernel has released its lock and the folder is free again."""
    import subprocess
    import sys

    from train_support import ROOT, cpu_env
    from utils.run_lock import LOCK_NAME, FolderLock
    out = tmp_path / 'out'
    out.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(out)], cwd=ROOT, env=cpu_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'held\n'
        data = make_image_folder(tmp_path / 'data', n_classes=2, n_train=2, n_val=1)
        if entry == 'train':
            code = train.main(train_args(data, tmp_path / 'vae.pth', out, bs=2))
        else:
            code = train_vae.main(vae_flags(data, out))
        err = capsys.readouterr().err
        assert code == 2 and f'is in use by the run of pid {holder.pid} on host' in err, err
        assert 'give this run another --local_out_dir_path' in err and 'Traceback' not in err
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing written: no log, no checkpoint
    finally:
        holder.kill()
        holder.wait(timeout=30)
    lock = FolderLock(str(out))
    lock.acquire()  # the dead holder's lock went with its process
    lock.release()


# ---------------------------------------------------------------------------------------- progressive training
def official_stages(n_its: int, iters_train: int, wp: float, pg: float, pg0: int, num_scales: int):
    """The official train_one_ep's rule, written out: wp_it = wp * iters_train unrounded (a float)."""
    wp_it, max_it = wp * iters_train, n_its
    stages = []
    for g_it in range(n_its):
        if g_it <= wp_it:
            stages.append(pg0)
        elif g_it >= max_it * pg:
            stages.append(num_scales - 1)
        else:
            progress = min(max((g_it - wp_it) / (max_it * pg - wp_it), 0), 1)
            stages.append(pg0 + round(progress * (num_scales - 1 - pg0)))
    return stages


def run_recording_stages(argv, stop_after: int = -1):
    """train.main(argv) -> (exit code, [(prog_si given to VARTrainer.train_step, the stage warm-up factor it used)]);
    a KeyboardInterrupt (a second Ctrl-C: no checkpoint written) comes before step number `stop_after` if given."""
    from trainer import VARTrainer
    calls = []
    real = VARTrainer.train_step

    def recording(self, stepping, inp, label_B, prog_si=-1, prog_wp_it=1.0, **kw):
        if len(calls) == stop_after:
            raise KeyboardInterrupt
        out = real(self, stepping, inp, label_B, prog_si=prog_si, prog_wp_it=prog_wp_it, **kw)
        calls.append((prog_si, out['prog_wp']))
        return out
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VARTrainer, 'train_step', recording)
        code = train.main(argv)
    return code, calls


# 18 images, batch 3: 6 iterations per epoch, 12 in all; warm-up 0.4 epochs (2.4 iterations); validation at the end
PG_FLAGS = dict(patch_size=4, bs=3, ep=2, wp=0.4, pg=0.5, pg0=1, pgwp=0.5, log_steps=1, val_every_ep=2)


@pytest.fixture(scope='module')
def progressive_reference(tmp_path_factory):
    """An uninterrupted progressive run: (data, vae, the stages and warm-up factors of its 12 steps)."""
    root = tmp_path_factory.mktemp('progressive')
    data = make_image_folder(root / 'data', n_classes=3, n_train=6, n_val=1)
    vae = make_tiny_vae_ckpt(root / 'vae.pth', X4)
    code, calls = run_recording_stages(train_args(data, vae, root / 'reference', **PG_FLAGS))
    assert code == 0
    return data, vae, calls


def test_progressive_stages_of_a_run_follow_the_official_rule_with_a_fractional_warm_up(progressive_reference):
    """6 iterations per epoch and --wp=0.4: the warm-up is 2.4 iterations. At g_it 5 the official stage is 2
    (progress 0.722); rounding the warm-up to 2 first would give stage 3."""
    expected = official_stages(12, 6, wp=0.4, pg=0.5, pg0=1, num_scales=4)
    assert expected == [1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3]
    assert [si for si, _ in progressive_reference[2]] == expected


def test_a_run_resumed_at_a_stage_boundary_keeps_the_stages_and_their_warm_up(progressive_reference, tmp_path):
    """Stopped right after the checkpoint at g_it 4, where stage 2 begins: the resumed run continues with the
    uninterrupted run's stages and per-stage warm-up factors (the progressive state is restored)."""
    data, vae, reference = progressive_reference
    argv = train_args(data, vae, tmp_path / 'out', ckpt_every_iters=4, **PG_FLAGS)
    code, calls = run_recording_stages(argv, stop_after=4)
    assert code == 130 and calls == reference[:4] and reference[3][0] == 1 and reference[4][0] == 2
    assert load_checkpoint(str(tmp_path / 'out' / 'ar-ckpt-last.pth'))['iter'] == 4
    code, calls = run_recording_stages(argv)
    assert code == 0 and calls == reference[4:]


def test_flex_builds_every_scales_block_mask_through_the_models_cache(tmp_path):
    """train.py --flex 1 (CUDA-only in training) builds its FlexAttention masks eagerly through
    models.basic_var.flex_block_mask; the same set-up runs here on the CPU, where the masks can be built."""
    from models.basic_var import flex_block_mask
    from utils import arg_util
    vae = make_tiny_vae_ckpt(tmp_path / 'vae.pth')
    args = arg_util.parse_args(train_args(tmp_path, vae, tmp_path / 'out', flex=1))
    cfg = arg_util.derive(args, 1)
    _, var, _ = train.build_models(args, cfg, 3, torch.device('cpu'))
    assert var.attn_impl == 'flex'
    for _, ed in var.begin_ends:  # built once by build_models: the cache hands back the same object
        mask = flex_block_mask(var.patch_nums, ed, var.lvl_1L.device)
        assert mask is flex_block_mask(var.patch_nums, ed, 'cpu')
        assert mask.shape[-2:] == (ed, ed)


def test_vbf16_tokenizes_train_and_val_batches_through_the_bf16_encoder(tmp_path, monkeypatch):
    """train.py --vbf16 1 runs to the end with every image batch (training and validation) tokenized by the bf16
    encoder copy (models.lowp.EncoderCopy), and the float32 method of the tokenizer left unused."""
    from models.lowp import EncoderCopy
    from models.vqvae import VQVAE
    data = make_image_folder(tmp_path / 'data', n_classes=2, n_train=4, n_val=2)
    vae = make_tiny_vae_ckpt(tmp_path / 'vae.pth', X4)
    calls = {'bf16': 0, 'fp32': 0}
    copy_encode, own_encode = EncoderCopy.img_to_idxBl, VQVAE.img_to_idxBl

    def counted(kind, fn):
        def wrapper(self, img, *a, **kw):
            calls[kind] += 1
            return fn(self, img, *a, **kw)
        return wrapper
    monkeypatch.setattr(EncoderCopy, 'img_to_idxBl', counted('bf16', copy_encode))
    monkeypatch.setattr(VQVAE, 'img_to_idxBl', counted('fp32', own_encode))
    assert train.main(train_args(data, vae, tmp_path / 'out', patch_size=4, bs=2, ep=1, vbf16=1)) == 0
    assert calls['bf16'] >= 3 and calls['fp32'] == 0, calls  # 2 training steps + validation
