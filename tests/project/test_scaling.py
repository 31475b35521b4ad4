"""Scaling laws as a tool (issue 24, arXiv 2404.02905 section 4): the power-law fit and the compute frontier on
numbers with known answers, N and the training FLOPs against a hand count, and scaling.py end to end on a two-member
micro sweep (sweep, rerun, interrupted-and-resumed sweep, fit, plot), in process."""
import json
import math
import random

import pytest

import scaling
import trainer
from scaling_laws.fit import fit_power_law, pareto_frontier
from scaling_laws.members import meta_models, param_counts, train_flops_per_image
from scaling_laws.sweep import plan_family
from train_support import X4, make_image_folder, make_tiny_vae_ckpt, train_args
from utils.ckpt import load_checkpoint

LAWS = ('L_last', 'L_mean', 'Err_last', 'Err_mean')


def log_sums(xs):
    """n, mean and sum of squared deviations of log x (the regression's design)."""
    lx = [math.log(x) for x in xs]
    mx = sum(lx) / len(lx)
    return len(lx), mx, sum((v - mx) ** 2 for v in lx)


@pytest.mark.parametrize('alpha, beta, floor', [(-0.23, 2.0e-9, 0.0), (-0.016, 4.9e2, 0.0), (0.5, 3.0, 0.0),
                                                (-0.13, 2.2e-5, 4.5)])
def test_the_fit_recovers_an_exact_power_law(alpha, beta, floor):
    xs = [10 ** (2 + k / 3) for k in range(10)]
    ys = [floor + (beta * x) ** alpha for x in xs]
    law = fit_power_law(xs, ys, floor=floor)
    assert law.alpha == pytest.approx(alpha, rel=1e-9)
    assert law.beta == pytest.approx(beta, rel=1e-7)
    assert law.r == pytest.approx(math.copysign(1.0, alpha), abs=1e-12)
    assert law(xs[3]) == pytest.approx(ys[3], rel=1e-9) and len(law.points) == 10 and not law.dropped


def test_the_fit_stays_within_its_standard_errors_under_noise():
    """log y = alpha log x + b + e, e ~ N(0, sigma^2): least squares is unbiased with standard errors
    sigma / sqrt(Sxx) for the slope and sigma * sqrt(1/n + mean^2 / Sxx) for the intercept; 4 of them bound the
    error (a failure once in ~16,000 seeds), and 1 - r^2 = SSE / SST stays under 4 n sigma^2 / (alpha^2 Sxx)."""
    alpha, beta, sigma = -0.2, 3.0e-7, 0.02
    rng = random.Random(1)
    xs = [10 ** (4 + 4 * k / 29) for k in range(30)]
    ys = [(beta * x) ** alpha * math.exp(rng.gauss(0, sigma)) for x in xs]
    law = fit_power_law(xs, ys)
    n, mx, sxx = log_sums(xs)
    assert abs(law.alpha - alpha) < 4 * sigma / math.sqrt(sxx)
    assert abs(law.alpha * law.log_beta - alpha * math.log(beta)) < 4 * sigma * math.sqrt(1 / n + mx ** 2 / sxx)
    assert 1 - law.r ** 2 < 4 * n * sigma ** 2 / (alpha ** 2 * sxx) and law.r < 0


def test_the_fit_names_what_it_cannot_use():
    law = fit_power_law([1, 10, 100, 1000], [5.2, 4.9, 4.6, 4.4], floor=4.5)  # the last point is under the floor
    assert law.dropped == ((1000.0, 4.4),) and len(law.points) == 3
    with pytest.raises(ValueError, match='1 point'):
        fit_power_law([10], [1.0])
    with pytest.raises(ValueError, match='same x'):
        fit_power_law([10, 10], [1.0, 2.0])
    with pytest.raises(ValueError, match='above the floor'):
        fit_power_law([1, 10], [4.0, 4.4], floor=4.5)


def test_the_frontier_of_hand_made_curves():
    """Three runs' (compute, loss) curves: the frontier is the lower-left envelope, a tie in compute keeps the
    lower loss, and a point that only equals the best so far is not on it."""
    small = [(1, 5.0), (2, 4.0), (4, 3.5), (8, 3.4)]
    medium = [(2, 4.5), (4, 3.0), (8, 2.0), (16, 2.0)]
    large = [(4, 3.2), (16, 1.5), (32, 1.6)]
    assert pareto_frontier(small + medium + large) == [(1, 5.0), (2, 4.0), (4, 3.0), (8, 2.0), (16, 1.5)]
    assert pareto_frontier(small) == small


def test_param_and_flop_counts_match_a_hand_count():
    """depth 1, width 8 (1 head, FFN 32), scales 1 and 2 (L = 5), 5 codes of width 2, 3 classes."""
    C, D, L, V, Cvae, hidden = 8, 8, 5, 5, 2, 32
    vae, var = meta_models(dict(patch_nums=(1, 2), V=V, Cvae=Cvae, ch=32, share_quant_resi=4, num_classes=3, depth=1,
                                shared_aln=False, attn_l2_norm=True, ch_mult=(1, 2), embed_dim=C, num_heads=1,
                                mlp_ratio=4.0, drop_path_rate=0.0, cond_drop_rate=0.1))
    # a block: attention (qkv 3C^2 with q and v biases, proj C^2 + C, one scale per head), FFN (2 * C*hidden and
    # biases), AdaLN (6C x D and bias): the paper's 18*C^2 plus the biases
    block = (3 * C * C + 2 * C + C * C + C + 1) + (2 * C * hidden + hidden + C) + (6 * C * D + 6 * C)
    # start token C, positions L*C, word embedding Cvae*C + C, classes (3 + 1 for the unconditional one) * C, levels
    # 2 * C, head AdaLN 2C x D + 2C, head C*V + V
    class_emb = 4 * C
    rest = C + L * C + Cvae * C + C + 2 * C + 2 * C * D + 2 * C + C * V + V
    assert param_counts(var) == {'all': block + class_emb + rest, 'no_class_emb': block + rest, 'blocks': block}
    # forward: blocks L * (8C^2 + 4C*hidden); attention 4C per (token, visible token): 1*1 + 4*5; AdaLN 12*C*D;
    # head 2*C*V per token + its AdaLN 4*C*D; word embedding 2*Cvae*C on the L - 1 teacher-forcing tokens.
    # Backward: twice the forward less the word embedding's input gradient
    embed = (L - 1) * 2 * Cvae * C
    fwd = L * (8 * C * C + 4 * C * hidden) + 4 * C * 21 + 12 * C * D + L * 2 * C * V + 4 * C * D + embed
    assert train_flops_per_image(vae, var) == fwd + 2 * fwd - embed


def test_the_family_follows_the_recipe_unless_widths_are_given():
    assert [(s.depth, s.width, s.name) for s in plan_family([4, 2])] == [(2, 128, 'd2w128'), (4, 256, 'd4w256')]
    assert [s.width for s in plan_family([2, 3], width_per_depth=16)] == [32, 48]
    assert [s.width for s in plan_family([2, 3], widths=[20, 30])] == [20, 30]
    with pytest.raises(ValueError, match='multiple of the heads'):
        plan_family([3], widths=[32])


@pytest.fixture(scope='module')
def tiny_setup(tmp_path_factory):
    """Real image files (2 classes x 4 training, x 2 validation images), an x4 tokenizer, and the train.py flags
    that every member of a sweep shares (2 iterations per epoch)."""
    root = tmp_path_factory.mktemp('scaling')
    data = make_image_folder(root / 'data', n_classes=2, n_train=4, n_val=2)
    vae = make_tiny_vae_ckpt(root / 'vae.pth', ch_mult=X4)
    shared = [f for f in train_args(data, vae, root / 'unused', patch_size=4, bs=4, ep=2)
              if f.split('=')[0] not in ('--depth', '--width', '--local_out_dir_path')]
    return root, shared


def sweep_argv(out, shared):
    return ['sweep', '--out', str(out), '--depths', '1,2', '--width_per_depth', '16', *shared]


@pytest.fixture(scope='module')
def finished_sweep(tiny_setup):
    """An uninterrupted micro sweep, fitted."""
    root, shared = tiny_setup
    out = root / 'sweep'
    assert scaling.main(sweep_argv(out, shared)) == 0
    assert scaling.main(['fit', '--out', str(out)]) == 0
    return out


@pytest.mark.slow
def test_a_micro_sweep_trains_fits_and_plots(tiny_setup, finished_sweep, capsys):
    out = finished_sweep
    report = json.loads((out / 'scaling.json').read_text())
    members = {m['name']: m for m in report['members']}
    assert list(members) == ['d1w16', 'd2w32'] and all(m['finished'] for m in members.values())
    for m in members.values():
        assert [h['ep'] for h in m['history']] == [1, 2]  # a validation per epoch: the sweep's default
        for h in m['history']:
            assert h['images'] == h['it'] * 4 and h['compute'] == m['flops_per_image'] * h['images']
            assert h['err_tail'] == pytest.approx(1 - h['vacc_tail'] / 100)
    assert members['d2w32']['n_params']['blocks'] > members['d1w16']['n_params']['blocks'] > 0
    assert [(e['law'], e['x']) for e in report['laws']] == [(law, x) for law in LAWS for x in ('N', 'C')]
    by_n = report['laws'][0]
    assert [p[0] for p in by_n['points']] == [members[n]['n_params']['no_class_emb'] for n in ('d1w16', 'd2w32')]
    assert 'error' in by_n or abs(by_n['r']) == pytest.approx(1.0)  # two points lie on a line (or are flat)
    assert (out / 'scaling.csv').read_text().count('\n') == 1 + len(report['laws'])
    assert '| L_last | N |' in (out / 'scaling.md').read_text()

    capsys.readouterr()
    assert scaling.main(['plot', '--out', str(out), '--fig', str(out / 'fig')]) == 0
    assert (out / 'fig.png').stat().st_size > 10_000 and '<svg' in (out / 'fig.svg').read_text()[:1000]

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob('*/ar-ckpt-last.pth')}
    assert scaling.main(sweep_argv(out, tiny_setup[1])) == 0  # a rerun does nothing
    assert 'd2w32: finished (epoch 2 of 2), skipped' in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob('*/ar-ckpt-last.pth')} == mtimes


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_to_the_same_numbers(tiny_setup, finished_sweep, monkeypatch):
    """The second member is stopped at once (no checkpoint of its own, as a kill) in its second epoch; the rerun skips
    the first member, resumes the second from its last periodic checkpoint (--ckpt_every_iters, which the
    uninterrupted sweep did not write: the numbers do not depend on it), and every validation number and fitted
    law equals the uninterrupted sweep's."""
    root, shared = tiny_setup
    out, shared = root / 'interrupted', [*shared, '--ckpt_every_iters=1']
    step, calls = trainer.VARTrainer.train_step, []

    def killed_at_the_8th_step(self, *a, **kw):  # member 1: steps 1-4; member 2: 5-8
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return step(self, *a, **kw)
    with monkeypatch.context() as m:
        m.setattr(trainer.VARTrainer, 'train_step', killed_at_the_8th_step)
        assert scaling.main(sweep_argv(out, shared)) == 130
    ckpt = load_checkpoint(str(out / 'd2w32' / 'ar-ckpt-last.pth'))
    assert (ckpt['epoch'], ckpt['iter']) == (1, 1)  # mid-way through the second epoch

    assert scaling.main(sweep_argv(out, shared)) == 0
    assert scaling.main(['fit', '--out', str(out)]) == 0
    ref, got = (json.loads((d / 'scaling.json').read_text()) for d in (finished_sweep, out))
    assert [m['history'] for m in got['members']] == [m['history'] for m in ref['members']]
    assert got['laws'] == ref['laws']


def test_mistakes_are_exit_2_with_a_message(tmp_path, capsys):
    assert scaling.main(['sweep', '--out', str(tmp_path), '--depths', '2', '--depth=3']) == 2
    assert '--depth is set by the sweep' in capsys.readouterr().err
    assert scaling.main(['fit', '--out', str(tmp_path)]) == 2
    assert 'holds no member' in capsys.readouterr().err
    assert scaling.main(['plot', '--out', str(tmp_path)]) == 2
    assert 'run `python scaling.py fit` first' in capsys.readouterr().err


def test_members_run_as_torchrun_jobs_and_a_failure_stops_the_sweep(tmp_path, monkeypatch):
    """--nproc_per_node: each member is one `torch.distributed.run` job of train.py with the shared flags and its own
    size and folder; a member's exit code other than 0 ends the sweep with that code (the rerun resumes there)."""
    import subprocess
    cmds, codes = [], [0, 3]

    def fake_run(cmd, cwd=None):
        cmds.append(cmd)
        return subprocess.CompletedProcess(cmd, codes[len(cmds) - 1])
    monkeypatch.setattr(scaling.subprocess, 'run', fake_run)
    argv = ['sweep', '--out', str(tmp_path), '--depths', '1,2,3', '--width_per_depth', '16', '--nproc_per_node', '2',
            '--ep=1', '--bs=8']
    assert scaling.main(argv) == 3
    assert len(cmds) == 2  # the third member never starts
    assert cmds[0][1:5] == ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    assert cmds[0][5].endswith('train.py')
    assert cmds[1][6:] == ['--ep=1', '--bs=8', '--val_every_ep=1', '--depth=2', '--width=32',
                           f'--local_out_dir_path={tmp_path / "d2w32"}']
