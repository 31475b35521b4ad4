# Scaling laws of VAR (arXiv 2404.02905, section 4): a family of models, trained and fitted.
"""Train a family of VAR models of growing size, fit the paper's power laws to them, and draw them.

    python scaling.py sweep --out runs/scaling --depths 2,3,4,6,8 --data_path ... --vae_ckpt ... --ep 10 --bs 64
    python scaling.py sweep --out runs/scaling --depths 2,4,8 --nproc_per_node 8 ...       # each member on torchrun
    python scaling.py fit --out runs/scaling [--floor_last 4.5 --floor_mean 5] [--report docs]
    python scaling.py plot --out runs/scaling [--report docs --fig docs/img/scaling]

`sweep` runs train.py once per member (width 64*depth by default; --widths or --width_per_depth for small ones), each
in its own folder under --out, one after the other; every flag it does not know goes to train.py unchanged, the same
for all members (validation every epoch unless --val_every_ep is given: the compute laws need the curves). A rerun
skips finished members and resumes an interrupted one exactly (train.py's auto-resume). `fit` reads the members'
validation history and writes scaling.json, scaling.csv and scaling.md; `plot` draws scaling.png and scaling.svg.
"""
import argparse
import os
import subprocess
import sys
import time
from typing import List, Sequence

import train
from scaling_laws.members import PARAM_KINDS, checkpoint_position, config_with_size, find_members, model_counts
from scaling_laws.report import FILES, fit_laws, read_report, write_report
from scaling_laws.sweep import MemberSpec, SweepClock, check_passthrough, member_argv, plan_family
from utils import arg_util
from utils.ckpt import LAST_NAME, load_checkpoint
from utils.logging import format_seconds
from utils.runtime import ConfigError

ROOT = os.path.dirname(os.path.abspath(__file__))


def int_list(s: str) -> List[int]:
    try:
        return [int(v) for v in s.replace('_', ',').split(',') if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected integers separated by commas, e.g. 2,3,4, got {s!r}') from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    s = sub.add_parser('sweep', help='train one model per size (other flags go to train.py)', allow_abbrev=False,
                       formatter_class=fmt)
    s.add_argument('--out', required=True, help='the sweep folder: one sub-folder per member')
    s.add_argument('--depths', type=int_list, required=True, help='the members\' depths, e.g. 2,3,4,6,8')
    s.add_argument('--widths', type=int_list, default=None, help='one width per depth (default: the recipe\'s)')
    s.add_argument('--width_per_depth', type=int, default=None,
                   help='width = this * depth (default 64, the recipe; smaller for CPU-sized families)')
    s.add_argument('--nproc_per_node', type=int, default=0,
                   help='run each member as a torchrun job of this many processes (0: in this process)')
    f = sub.add_parser('fit', help='fit the power laws to a sweep', allow_abbrev=False, formatter_class=fmt)
    f.add_argument('--out', required=True, help='the sweep folder')
    f.add_argument('--report', default=None, help='where scaling.json/.csv/.md go (default: --out)')
    f.add_argument('--params', choices=PARAM_KINDS, default='no_class_emb',
                   help="N: 'all' parameters, without the class embedding, or the transformer blocks only "
                        "(the paper's 18*d*w^2)")
    f.add_argument('--floor_last', type=float, default=0.0,
                   help='entropy floor subtracted from the last-scale loss (reducible loss; the paper: 4.5)')
    f.add_argument('--floor_mean', type=float, default=0.0,
                   help='entropy floor subtracted from the loss over all scales (the paper: 5)')
    g = sub.add_parser('plot', help='draw the fitted laws', allow_abbrev=False, formatter_class=fmt)
    g.add_argument('--out', required=True, help='the sweep folder')
    g.add_argument('--report', default=None, help='the folder of scaling.json (default: --out)')
    g.add_argument('--fig', default=None, help='the figure\'s path without extension (default: REPORT/scaling)')
    return p


def log(msg: str) -> None:
    print(f'[scaling] {msg}', flush=True)


def run_member(argv: Sequence[str], nproc: int) -> int:
    """train.py with `argv` in this process, or as a torchrun job of `nproc` processes; its exit code."""
    if nproc <= 0:
        return train.main(list(argv))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           os.path.join(ROOT, 'train.py'), *argv]
    log('$ ' + ' '.join(cmd))
    return subprocess.run(cmd, cwd=ROOT).returncode


def know_work(clock: SweepClock, specs: Sequence[MemberSpec], sweep_dir: str) -> None:
    """Give the clock every member's training FLOPs per image, once one member's checkpoint gives the family's
    configuration (tokenizer, scales, classes)."""
    if clock.work is not None:
        return
    for spec in specs:
        path = os.path.join(sweep_dir, spec.name, LAST_NAME)
        if os.path.isfile(path):
            config = dict(load_checkpoint(path)['model_config'])
            clock.set_work({s.name: model_counts(config_with_size(config, s.depth, s.width))[1] for s in specs})
            return


def sweep(args, train_flags: List[str]) -> int:
    specs = plan_family(args.depths, args.widths, args.width_per_depth)
    check_passthrough(train_flags)
    if not any(f.split('=', 1)[0] == '--val_every_ep' for f in train_flags):
        train_flags = [*train_flags, '--val_every_ep=1']  # a validation point per epoch: the compute frontier
    target_ep = arg_util.parse_args(train_flags).ep
    os.makedirs(args.out, exist_ok=True)
    log(f'{len(specs)} members: {", ".join(s.name for s in specs)}; {target_ep} epochs each; train.py flags: '
        f'{" ".join(train_flags)}')
    clock = SweepClock()
    t_sweep = time.time()
    for i, spec in enumerate(specs):
        argv = member_argv(spec, args.out, train_flags)
        pos = checkpoint_position(os.path.join(args.out, spec.name))
        if pos is not None and pos[0] >= target_ep:
            log(f'member {i + 1}/{len(specs)} {spec.name}: finished (epoch {pos[0]} of {target_ep}), skipped')
            clock.skip(spec.name)
            continue
        know_work(clock, specs, args.out)
        state = f'resuming at epoch {pos[0]}, iteration {pos[1]}' if pos else 'starting'
        log(f'member {i + 1}/{len(specs)} {spec.name}: {state}; this member ETA {clock.estimate(spec.name)}, '
            f'the sweep\'s {clock.estimate()}')
        t0 = time.time()
        code = run_member(argv, args.nproc_per_node)
        if code != 0:
            log(f'member {spec.name} stopped with exit code {code}; rerun the same command to resume it')
            return code
        know_work(clock, specs, args.out)
        clock.finished(spec.name, time.time() - t0, fraction_done_before=pos[0] / target_ep if pos else 0.0)
        log(f'member {i + 1}/{len(specs)} {spec.name}: done in {format_seconds(time.time() - t0)}; the sweep\'s ETA '
            f'{clock.estimate()}')
    log(f'sweep done in {format_seconds(time.time() - t_sweep)}: {args.out}')
    return 0


def fit(args) -> int:
    members, notes = find_members(args.out)
    for note in notes:
        log(f'skipped {note}')
    if not members:
        raise ConfigError(f'{args.out} holds no member with a checkpoint: run `python scaling.py sweep` first')
    for m in members:
        if not m.finished:
            notes.append(f'{m.name} is not finished (epoch {m.epoch} of {m.target_ep}): only its curve is used '
                         f'(compute frontier), not a final point')
            log(notes[-1])
    laws = fit_laws(members, args.params, {'L_last': args.floor_last, 'L_mean': args.floor_mean})
    report = args.report or args.out
    print(write_report(report, members, laws, args.params, notes), flush=True)
    log(f'written: {", ".join(os.path.join(report, f) for f in FILES)}')
    return 0


def plot(args) -> int:
    from scaling_laws.plot import plot_report
    report = args.report or args.out
    data = read_report(report)
    paths = plot_report(data, args.fig or os.path.join(report, 'scaling'))
    log(f'written: {", ".join(paths)}')
    return 0


def main(argv=None) -> int:
    """Returns 0 when done, 2 for a mistake in the flags or folders (a message, no traceback), or a member's train.py
    exit code (e.g. 130 when stopped; rerun to resume)."""
    args, rest = build_parser().parse_known_args(argv)
    try:
        if args.command == 'sweep':
            return sweep(args, rest)
        if rest:
            raise ConfigError(f'unknown arguments for {args.command}: {rest}')
        return fit(args) if args.command == 'fit' else plot(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f'[scaling] error: {e}', file=sys.stderr, flush=True)
        return 2


if __name__ == '__main__':
    sys.exit(main())
