"""train.py --fsdp 1 (FSDP2) and --act_ckpt 1 on the CPU (gloo): in real 2-process torchrun jobs, the same losses and
weights as DDP, and an exact resume after a SIGTERM to one rank; in this process (a gloo group of one
rank, no start-up cost), the resume of the 2-process checkpoint on one rank with and without FSDP, and the exports of
a sharded checkpoint to the single-file formats, loaded strictly. One uninterrupted FSDP run (module fixture) serves
every comparison."""
import shutil

import pytest
import torch

from train_support import (X4, assert_same_state, make_image_folder, make_tiny_vae_ckpt, read_steps,
                           run_train, train_args)
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
    """The same 2-rank job with DDP, started as `srun python train.py` starts its tasks on two nodes (node-local output
    folders), and with FSDP + activation checkpointing under torchrun -> SimpleNamespace(data, vae, ddp_nodes (the two
    working folders), ddp_results ((exit code, stdout, stderr) per task), ddp (node 0's output folder, the master's),
    fsdp)."""
    from pathlib import Path
    from types import SimpleNamespace
    root = tmp_path_factory.mktemp('fsdp')
    data = make_image_folder(root / 'data', n_classes=3, n_train=8, n_val=2)
    vae = make_tiny_vae_ckpt(root / 'vae.pth', X4)
    nodes = [root / 'ddp_node0', root / 'ddp_node1']
    ddp_results = srun_tasks(train_args(data, vae, Path('out'), **FLAGS), nodes)
    # run once: a rank that aborts in the interpreter's teardown after a finished run is a failure (gloo threads that
    # outlived the run used to: see dist.finalize and resume_with_lr0)
    for code, _, err in ddp_results:
        assert code == 0, err[-3000:]
    fsdp = run_train(train_args(data, vae, root / 'fsdp', **FLAGS, fsdp=1, act_ckpt=1), nproc=2)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    for out in (nodes[0] / 'out', root / 'fsdp'):
        assert sorted(read_steps(out)) == list(range(6))
    return SimpleNamespace(data=data, vae=vae, ddp_nodes=nodes, ddp_results=ddp_results, ddp=nodes[0] / 'out',
                           fsdp=root / 'fsdp')


@pytest.mark.slow
def test_ddp_job_writes_checkpoints_log_and_tensorboard(runs):
    """The 2-rank DDP job (the reference of the FSDP tests) as any run: one RNG state per rank in its checkpoints,
    the class names in sorted folder order, a best checkpoint, log.txt's epoch records and TensorBoard's scalars and
    sample grid."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    data, ddp_out = runs.data, runs.ddp
    ckpt = load_checkpoint(str(ddp_out / 'ar-ckpt-last.pth'))
    assert (ckpt['epoch'], ckpt['iter']) == (2, 0) and len(ckpt['rng']) == 2  # one RNG state per rank
    assert ckpt['derived']['world_size'] == 2 and SHARDS_KEY not in ckpt
    assert ckpt['class_names'] == sorted(p.name for p in (data / 'train').iterdir())  # id i = i-th sorted folder
    assert '3 classes, ids in sorted folder order (0: ' in (ddp_out / 'stdout.txt').read_text()
    assert (ddp_out / 'ar-ckpt-best.pth').exists()
    records = [json.loads(line) for line in (ddp_out / 'log.txt').read_text().splitlines()]
    assert records[0]['is_master'] and [r['ep'] for r in records[1:]] == [1, 2] and 'vL_tail' in records[-1]
    tb_dirs = list(ddp_out.glob('tb-VARd2__pn1_2_3_4__*'))
    assert len(tb_dirs) == 1
    ea = EventAccumulator(str(tb_dirs[0]))
    ea.Reload()
    scalars = set(ea.Tags()['scalars'])
    # the iteration scalars come at g_it 0: no optimizer step there with --ac 2 (no grad norm), and progressive
    # training at scale index 1 (losses and accuracies of the 4 and 8 px scales)
    for tag in ('AR_opt_lr/lr_max/sche_tlr', 'AR_opt_grad/nonfinite/skipped_total', 'AR_iter_loss/z_voc_usage',
                'AR_iter_loss/acc_8', 'AR_iter_loss/L_4', 'AR_iter_schedule/prog_si', 'AR_ep_loss/L_mean',
                'AR_ep_loss/vL_tail', 'AR_z_burnout/rest_hours'):
        assert tag in scalars, tag
    assert ea.Tags()['images'] == ['AR_samples/cfg1.5']


def srun_tasks(argv, folders):
    """`srun python train.py ...` on two nodes, one task each, as SLURM starts them: only SLURM's variables and
    MASTER_ADDR/MASTER_PORT, each task in its own working folder (node-local output folders) -> [(exit code,
    stdout, stderr)]."""
    import subprocess
    import sys

    from train_support import ROOT, cpu_env, free_port
    port, procs = str(free_port()), []
    for task, folder in enumerate(folders):
        folder.mkdir(exist_ok=True)
        env = {k: v for k, v in cpu_env().items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE')}
        env.update(SLURM_PROCID=str(task), SLURM_LOCALID='0', SLURM_NODEID=str(task), SLURM_NTASKS='2',
                   SLURM_STEP_NUM_TASKS='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *argv], cwd=folder, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=150) for p in procs]
    return [(p.returncode, *output) for p, output in zip(procs, outputs)]


@pytest.mark.slow
def test_srun_tasks_on_two_nodes_join_one_job_and_fsdp_needs_a_shared_folder(runs, tmp_path):
    """Two tasks on two nodes, as `srun python train.py` starts them (no torchrun), with node-local output folders:
    - under --fsdp 1 they stop at start-up (exit 2, before training) with a message that the folder is not shared: a
      sharded checkpoint would be split across the nodes;
    - with DDP (the fixture's DDP job) they form one 2-rank job: one master, world size 2 in the checkpoints, each
      node's folder holding the whole checkpoint, the same weights in both; its losses are those of the torchrun FSDP
      job up to round-off (test_fsdp_with_act_ckpt_trains_as_ddp), which two 1-rank jobs would not give."""
    from pathlib import Path
    nodes = [tmp_path / 'node0', tmp_path / 'node1']
    results = srun_tasks(train_args(runs.data, runs.vae, Path('out'), **FLAGS, fsdp=1), nodes)
    for code, _, err in results:
        assert code == 2 and 'the folder is not shared between the nodes' in err and 'Traceback' not in err, err
    assert 'rank 1 (host ' in results[0][2] and not (nodes[0] / 'out' / 'ar-ckpt-last.pth').exists()
    assert not list((nodes[0] / 'out').glob('.shared-check-*'))
    (_, out0, _), (_, out1, _) = runs.ddp_results
    assert '[fit] done' in out0 and '[fit] done' not in out1  # one master
    weights = []
    for folder in runs.ddp_nodes:
        ckpt = load_checkpoint(str(folder / 'out' / 'ar-ckpt-last.pth'))
        assert ckpt['derived']['world_size'] == 2 and len(ckpt['rng']) == 2
        weights.append(ckpt['trainer']['var_wo_ddp'])
    assert_same_state(weights[0], weights[1], 'the two nodes\' weights')


@pytest.mark.slow
def test_fsdp_with_act_ckpt_trains_as_ddp(runs):
    """Losses and final weights of FSDP (sharded weights, gradients reduce-scattered, global-norm clipping on the
    shards) with activation checkpointing equal DDP's up to float32 round-off. FSDP reduces every micro-batch of an
    accumulation cycle while DDP adds the micro-batches locally and reduces once: the sums differ in their last bits,
    which AdamW's normalisation lifts to ~1e-5 in weights whose gradients are near zero."""
    ddp_out, fsdp_out = runs.ddp, runs.fsdp
    ddp_losses, fsdp_losses = read_steps(ddp_out), read_steps(fsdp_out)
    for g_it, loss in ddp_losses.items():
        # two computations whose weights AdamW's normalisation moves apart (docstring): a documented tolerance
        assert fsdp_losses[g_it] == pytest.approx(loss, rel=1e-5, abs=1e-6), g_it
    ckpt, var_sd, optim_sd = full_state(fsdp_out)
    _, ddp_sd, _ = full_state(ddp_out)
    assert (ckpt['epoch'], ckpt['iter']) == (2, 0) and len(ckpt['rng']) == 2 and optim_sd
    assert sorted(var_sd) == sorted(ddp_sd)
    for k, t in ddp_sd.items():  # the same documented tolerance: AdamW lifts the last bits of near-zero gradients
        torch.testing.assert_close(var_sd[k], t, rtol=1e-4, atol=5e-5)
    # only the shard folder the files name is kept
    assert [p.name for p in fsdp_out.glob('ar-ckpt-shards-*')] == [ckpt[SHARDS_KEY]]


@pytest.mark.slow
def test_fsdp_sigterm_to_one_rank_then_rerun_gives_the_uninterrupted_run(runs, tmp_path):
    """A 2-process FSDP job stopped before it finishes: SIGTERM (a preemption notice) to rank 1 alone, and both ranks
    agree to save a sharded checkpoint at the end of the accumulation cycle and stop (exit code 130 each; torchrun
    reports a failed worker). The same command resumes there, writes its periodic sharded checkpoints and finishes:
    per-step losses, weights, optimizer moments, RNG states and the position equal the uninterrupted run's bit for
    bit. (A SIGKILL and its resume are the DDP tests'; the sharded files' own checks run in this process.) These runs
    go without --act_ckpt: that the uninterrupted run used it and still matches bit for bit is the test that
    activation checkpointing changes no number."""
    from train_support import signal_after_step, sigterm_to_rank1, train_cmd
    data, vae, ref_out = runs.data, runs.vae, runs.fsdp
    out = tmp_path / 'interrupted'
    argv = train_args(data, vae, out, **FLAGS, fsdp=1)
    _, log = signal_after_step(train_cmd(argv, nproc=2), out, step=0, send=sigterm_to_rank1)
    assert 'SIGTERM: saving a checkpoint' in log and '[stop] stopped on request at epoch 0, iteration 2' in log, \
        log[-3000:]
    assert 'KeyboardInterrupt' not in log and 'exitcode  : 130' in log
    ckpt = load_checkpoint(str(out / 'ar-ckpt-last.pth'))
    assert (ckpt['epoch'], ckpt['iter']) == (0, 2) and len(ckpt['rng']) == 2 and SHARDS_KEY in ckpt
    resumed = run_train(argv, nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'ar-ckpt-last.pth: epoch 0, iteration 2' in resumed.stdout
    assert read_steps(out) == read_steps(ref_out)
    ref_ckpt, ref_sd, ref_optim = full_state(ref_out)
    got_ckpt, got_sd, got_optim = full_state(out)
    for key in ('epoch', 'iter', 'trainer', 'best', 'rng'):
        assert_same_state(ref_ckpt[key], got_ckpt[key], key)
    assert_same_state(ref_sd, got_sd, 'weights')
    assert_same_state(ref_optim, got_optim, 'optimizer')


@pytest.fixture
def one_rank_group(monkeypatch):
    """The torchrun environment of one process, so that train.main in this process joins a gloo group of one rank
    (and leaves it at its end): FSDP without the cost of starting processes."""
    from train_support import free_port
    for k, v in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', LOCAL_WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                     MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(k, v)


GLOO_THREADS = ('pt_gloo_runloop', 'gloo_tcp_loop')  # a gloo group's worker threads, its transport's event loop


def gloo_threads() -> set:
    """The ids of this process's gloo threads (Linux: /proc)."""
    import os
    ids = set()
    for tid in os.listdir('/proc/self/task'):
        try:
            with open(f'/proc/self/task/{tid}/comm') as f:
                if f.read().strip() in GLOO_THREADS:
                    ids.add(tid)
        except OSError:  # the thread ended meanwhile
            continue
    return ids


def resume_with_lr0(argv, out, fsdp):
    """train.main in this process, one more epoch at lr 0 from the 2-process checkpoint in `out`: the weights must
    stay the checkpoint's and the optimizer count on -> the new last checkpoint's (weights, AdamW step counts). The
    finished run leaves no gloo thread behind: with FSDP, DTensor's caches keep the device mesh, which held the group
    past destroy_process_group; with DDP, the reducer holds it until the model goes (utils.run.main_of)."""
    import train
    before = gloo_threads()  # of groups that other tests in this process may have left
    assert train.main(argv + [f'--fsdp={fsdp}']) == 0
    assert gloo_threads() <= before, f'the fsdp={fsdp} run left its gloo threads running'
    console = (out / 'stdout.txt').read_text() + (out / 'stderr.txt').read_text()
    assert 'ar-ckpt-last.pth: epoch 2, iteration 0' in console
    assert 'written with another number of processes' in console
    ckpt, var_sd, optim_sd = full_state(out)
    assert ckpt['epoch'] == 3 and (SHARDS_KEY in ckpt) == bool(fsdp)
    if optim_sd is None:
        steps = {int(s['step']) for s in ckpt['trainer']['var_opt']['optimizer']['state'].values()}
    else:
        steps = {int(t) for k, t in optim_sd.items() if k.endswith('.step')}
    return var_sd, steps


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_one_process_with_and_without_fsdp_and_exports(runs, tmp_path, one_rank_group):
    """The 2-process FSDP checkpoint resumes in one process (train.main here, one gloo rank) with FSDP (resharded)
    and without it (the DDP code path: full tensors); with lr 0 the weights stay the checkpoint's and AdamW counts on
    from its 3 steps. Its exports load strictly through models.load_checkpoint_models and the official-format path
    load_var_weights."""
    import models
    from models.loading import load_var_weights, read_checkpoint
    from utils.export_ckpt import export, main as export_main
    data, vae, fsdp_out = runs.data, runs.vae, runs.fsdp
    _, var_sd, _ = full_state(fsdp_out)
    for fsdp in (1, 0):
        out = tmp_path / f'one_process_fsdp{fsdp}'
        shutil.copytree(fsdp_out, out)
        got_sd, steps = resume_with_lr0(train_args(data, vae, out, **{**FLAGS, 'ep': 3, 'tblr': 0.0}), out, fsdp)
        assert_same_state(var_sd, got_sd, f'weights, fsdp={fsdp}')
        assert steps == {3 + 1}  # g_it 6-7 step; g_it 8 opens a cycle that the run's end drops

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
    import hub  # the sharded checkpoint straight to a model folder (hub.py save gathers the shards)
    assert hub.main(['save', str(tmp_path / 'folder'), '--ckpt', str(fsdp_out / 'ar-ckpt-last.pth')]) == 0
    _, var_f = models.model_folder.from_pretrained(tmp_path / 'folder')  # strict
    assert_same_state(var_sd, var_f.state_dict(), 'model folder')


@pytest.mark.slow
def test_ddp_checkpoint_resumes_under_fsdp(runs, tmp_path, one_rank_group):
    """A 2-process DDP (single-file) checkpoint continues under --fsdp 1 on one rank: the full weights and AdamW state
    are sharded on load; the next checkpoint is sharded."""
    data, vae, ddp_out = runs.data, runs.vae, runs.ddp
    out = tmp_path / 'ddp_to_fsdp'
    shutil.copytree(ddp_out, out)
    _, ddp_sd, _ = full_state(ddp_out)
    got_sd, steps = resume_with_lr0(train_args(data, vae, out, **{**FLAGS, 'ep': 3, 'tblr': 0.0}), out, fsdp=1)
    assert_same_state(ddp_sd, got_sd, 'weights')
    assert steps == {3 + 1}


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


def test_the_roots_pre_backward_hook_runs_although_its_output_is_a_view(one_rank_group):
    """FSDP2 warns that VAR's sharded root returns a view (in float32 its head, an nn.Linear on (B, L, C), returns a
    view of a 2-D product): an in-place op on that output would drop the root's pre-backward hook. The trainer takes
    its loss from the output out of place, under `root_output_view_allowed` (which silences that warning alone): the
    hook runs on the backward, and the gradients are the unsharded model's, bit for bit (one rank: the all-gather and
    reduce-scatter copy; the same kernels compute both)."""
    import copy
    import warnings

    import torch.nn.functional as F

    import dist
    from models import build_vae_var
    from train_support import TINY_VAE
    from utils.fsdp import release_process_groups, root_output_view_allowed, shard_model
    dist.initialize(device='cpu')
    try:
        torch.manual_seed(0)
        _, var = build_vae_var(device='cpu', ch_mult=X4, **TINY_VAE)
        plain = copy.deepcopy(var)
        shard_model(var, torch.device('cpu'), fp16=0)
        state = var._get_fsdp_state()
        hook, calls = state._pre_backward, []
        state._pre_backward = lambda *grads: (calls.append(len(grads)), hook(*grads))[1]  # counts, then runs it
        label_B = torch.tensor([0, 2])
        x_BLCv = torch.randn(2, var.L - var.first_l, var.Cvae)
        gt_BL = torch.randint(0, var.V, (2, var.L))
        losses = []
        for model in (var, plain):
            torch.manual_seed(1)  # the condition dropout's draw
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                with root_output_view_allowed():
                    logits_BLV = model(label_B, x_BLCv)
            assert logits_BLV._base is not None and not [w for w in caught if 'view tensor' in str(w.message)]
            losses.append(F.cross_entropy(logits_BLV.view(-1, var.V), gt_BL.view(-1)))
            losses[-1].backward()
        assert calls == [1], 'the root pre-backward hook did not run once'
        assert torch.equal(losses[0], losses[1])
        grads = {n: p.grad.full_tensor() for n, p in var.named_parameters()}
        for n, p in plain.named_parameters():
            assert torch.equal(grads[n], p.grad), n
        with warnings.catch_warnings(record=True) as caught:  # the warning's cause is still there without the guard
            warnings.simplefilter('always')
            var(label_B, x_BLCv)
        assert [w for w in caught if 'view tensor' in str(w.message)]
    finally:
        release_process_groups(var)
        dist.finalize()


def write_shards(folder, value: float = 1.0) -> None:
    """A complete folder of shards as one process writes it (metadata and one data file)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.distributed is disabled')  # one process is what we mean
        dcp.save({'model': {'w': torch.full((64,), value)}}, checkpoint_id=str(folder), no_dist=True)


def test_an_incomplete_sharded_checkpoint_names_its_missing_files_in_the_export(tmp_path, capsys):
    """A sharded checkpoint whose folder lacks a rank's data file (an output folder that was not shared: the other
    node has it) or holds it cut short: the export names the file, exit 2, no traceback; so does a resume."""
    from utils.export_ckpt import main as export_main
    name = 'ar-ckpt-shards-e1-i0-abcd0123'
    write_shards(tmp_path / name)
    ckpt = tmp_path / 'ar-ckpt-last.pth'
    torch.save({'epoch': 1, 'iter': 0, 'trainer': {}, SHARDS_KEY: name}, ckpt)
    data_files = sorted(p.name for p in (tmp_path / name).glob('*.distcp'))
    assert data_files and shards_folder(torch.load(ckpt), str(ckpt))  # complete
    data = tmp_path / name / data_files[0]
    data.write_bytes(data.read_bytes()[:10])
    assert export_main([str(tmp_path), '--out', str(tmp_path / 'm.pth')]) == 2
    err = capsys.readouterr().err
    assert f'lacks {data_files[0]} (cut short: 10 of' in err and 'Traceback' not in err
    data.unlink()
    assert export_main([str(ckpt), '--out', str(tmp_path / 'm.pth')]) == 2
    err = capsys.readouterr().err
    assert f'lacks {data_files[0]} (missing)' in err and 'not shared by every node' in err
    assert not (tmp_path / 'm.pth').exists()


def test_a_truncated_newest_file_keeps_the_shards_it_named_and_the_warning_says_what_the_resume_costs(tmp_path):
    """ar-ckpt-last.pth cut short (a crash of the file system, a bad copy): auto-resume skips it for the best file;
    the clean-up after a save keeps the newest complete shard folder (the state the broken file named) instead of
    deleting it, and the warning names the skipped file, the file resumed from and the iterations trained again."""
    import json
    import os

    from utils.ckpt import atomic_save, auto_resume
    from utils.run import skipped_note
    best_name, last_name = 'ar-ckpt-shards-e1-i0-aaaa0000', 'ar-ckpt-shards-e1-i2-bbbb1111'
    for value, name in enumerate((best_name, last_name, 'ar-ckpt-shards-e0-i3-cccc2222')):
        write_shards(tmp_path / name, value)
    (tmp_path / 'ar-ckpt-shards-e0-i3-cccc2222' / '.metadata').unlink()  # a killed write
    os.utime(tmp_path / best_name / '.metadata', (1, 1))  # older than the last state
    atomic_save({'epoch': 1, 'iter': 0, 'trainer': {}, SHARDS_KEY: best_name}, str(tmp_path / 'ar-ckpt-best.pth'))
    last = tmp_path / 'ar-ckpt-last.pth'
    atomic_save({'epoch': 1, 'iter': 2, 'trainer': {}, SHARDS_KEY: last_name}, str(last))
    last.write_bytes(last.read_bytes()[:200])
    os.utime(tmp_path / 'ar-ckpt-best.pth', (1, 1))
    (tmp_path / 'steps.jsonl').write_text(''.join(json.dumps({'g_it': g}) + '\n' for g in range(7)) + '{"g_it": 7')
    ckpt, path, skipped = auto_resume(str(tmp_path))
    assert path.endswith('ar-ckpt-best.pth') and len(skipped) == 1 and skipped[0].startswith('ar-ckpt-last.pth: ')
    assert 'probably truncated' in skipped[0] and 'Delete it' not in skipped[0]
    note = skipped_note(skipped, path, ckpt['epoch'], ckpt['iter'], 4, str(tmp_path))
    assert 'skipped ar-ckpt-last.pth: cannot load it' in note
    assert 'Resumed from ar-ckpt-best.pth at epoch 1, iteration 0 (global iteration 4)' in note
    # steps.jsonl reached 7 (its last line is cut short), the newest complete folder e1-i2 = global iteration 6
    assert 'had got to global iteration 7, so 3 iterations are trained again' in note
    removed = remove_unreferenced_shards(str(tmp_path), 'ar-ckpt-last.pth', 'ar-ckpt-best.pth')
    assert removed == ['ar-ckpt-shards-e0-i3-cccc2222']
    assert sorted(p.name for p in tmp_path.glob('ar-ckpt-shards-*')) == [best_name, last_name]
    atomic_save({'epoch': 1, 'iter': 3, 'trainer': {}, SHARDS_KEY: best_name}, str(last))  # the next save
    assert remove_unreferenced_shards(str(tmp_path), 'ar-ckpt-last.pth', 'ar-ckpt-best.pth') == [last_name]
