# The scaling laws of arXiv 2404.02905 (section 4, figures 5 and 6) fitted to a sweep, and their tables.
"""Every law of the paper for one sweep, and the files that hold them.

Laws: L_last (cross-entropy on the last scale, vL_tail), L_mean (over all tokens of all scales, vL_mean), Err_last
and Err_mean (token error rate, 1 - top-1 accuracy), each against N (the final validation of every finished
member) and against C (the compute frontier over all members' validation points). Losses may have an entropy
floor subtracted (reducible loss); error rates are fitted as they are.

Files: scaling.json (members, their histories and counts, laws with their points), scaling.csv (one row per law)
and scaling.md (the Markdown tables that `fit` prints).
"""
import csv
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence

from scaling_laws.fit import fit_power_law, format_beta, pareto_frontier
from scaling_laws.members import Member
from utils.ckpt import atomic_write

# law name -> the history key it reads
METRICS = {'L_last': 'vL_tail', 'L_mean': 'vL_mean', 'Err_last': 'err_tail', 'Err_mean': 'err_mean'}
FILES = ('scaling.json', 'scaling.csv', 'scaling.md')


def fit_laws(members: Sequence[Member], n_kind: str = 'no_class_emb',
             floors: Optional[Dict[str, float]] = None) -> List[Dict[str, Any]]:
    """One entry per (law, x): 'law', 'x' ('N' or 'C'), and the PowerLaw's fields, or 'error' when it cannot be
    fitted (e.g. fewer than two finished members)."""
    floors = floors or {}
    finished = [m for m in members if m.final is not None]
    laws = []
    for law, key in METRICS.items():
        floor = floors.get(law, 0.0)
        by_n = ([m.n_params[n_kind] for m in finished], [m.final[key] for m in finished])
        frontier = pareto_frontier([(h['compute'], h[key]) for m in members for h in m.history])
        by_c = ([c for c, _ in frontier], [y for _, y in frontier])
        for x_name, (xs, ys) in (('N', by_n), ('C', by_c)):
            entry: Dict[str, Any] = {'law': law, 'x': x_name, 'floor': floor}
            try:
                entry.update(fit_power_law(xs, ys, floor=floor).as_dict())
            except ValueError as e:
                entry['error'] = str(e)
            laws.append(entry)
    return laws


def sci(v: float) -> str:
    return f'{v:.3g}' if 1e-3 <= abs(v) < 1e4 or not math.isfinite(v) else f'{v:.2e}'


def law_label(entry: Dict[str, Any]) -> str:
    return f'{entry["law"]} - {entry["floor"]:g}' if entry['floor'] else entry['law']


def markdown(members: Sequence[Member], laws: Sequence[Dict[str, Any]], n_kind: str) -> str:
    """The members' table and the laws' table, in Markdown."""
    lines = ['| member | depth | width | N (all) | N (no class emb) | N (blocks) | train FLOPs/img | images | C | '
             'L_last | L_mean | Err_last | Err_mean | epochs |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for m in members:
        last = m.history[-1] if m.history else None
        vals = (f'{last["vL_tail"]:.4f} | {last["vL_mean"]:.4f} | {last["err_tail"]:.4f} | {last["err_mean"]:.4f}'
                if last else '- | - | - | -')
        lines.append(f'| {m.name} | {m.depth} | {m.width} | {m.n_params["all"]:,} | {m.n_params["no_class_emb"]:,} | '
                     f'{m.n_params["blocks"]:,} | {sci(m.flops_per_image)} | {last["images"] if last else 0:,} | '
                     f'{sci(last["compute"]) if last else "-"} | {vals} | {m.epoch}/{m.target_ep} |')
    lines += ['', f'N = parameters ({n_kind.replace("_", " ")}), C = training FLOPs (forward + backward of the '
              f'transformer per image x images seen; the compute laws use the frontier).', '',
              '| law | vs | alpha | beta | Pearson r | points | equation |', '|---|---|---:|---:|---:|---:|---|']
    for e in laws:
        if 'error' in e:
            lines.append(f'| {law_label(e)} | {e["x"]} | - | - | - | - | not fitted: {e["error"]} |')
            continue
        dropped = f' ({len(e["dropped"])} under the floor)' if e['dropped'] else ''
        floor = f'{e["floor"]:g} + ' if e['floor'] else ''
        beta = format_beta(e['log10_beta'])
        lines.append(f'| {law_label(e)} | {e["x"]} | {e["alpha"]:.4f} | {beta} | {e["r"]:.4f} | '
                     f'{len(e["points"])}{dropped} | {e["law"]} = {floor}({beta}·{e["x"]})^{e["alpha"]:.3g} |')
    return '\n'.join(lines) + '\n'


def write_report(out_dir: str, members: Sequence[Member], laws: Sequence[Dict[str, Any]], n_kind: str,
                 notes: Sequence[str] = ()) -> str:
    """scaling.json, scaling.csv, scaling.md in `out_dir` (each written atomically); returns the Markdown."""
    os.makedirs(out_dir, exist_ok=True)
    md = markdown(members, laws, n_kind)
    data = {'n_kind': n_kind, 'members': [m.as_dict() for m in members], 'laws': list(laws), 'notes': list(notes)}
    atomic_write(os.path.join(out_dir, 'scaling.json'), lambda f: json.dump(data, f, indent=1), mode='w')

    def write_csv(f) -> None:
        w = csv.writer(f)
        w.writerow(['law', 'x', 'floor', 'alpha', 'beta', 'r', 'points', 'error'])
        for e in laws:
            w.writerow([e['law'], e['x'], e['floor'], e.get('alpha', ''), e.get('beta', ''), e.get('r', ''),
                        len(e.get('points', ())), e.get('error', '')])
    atomic_write(os.path.join(out_dir, 'scaling.csv'), write_csv, mode='w')
    atomic_write(os.path.join(out_dir, 'scaling.md'), lambda f: f.write(md), mode='w')
    return md


def read_report(out_dir: str) -> Dict[str, Any]:
    """scaling.json of `out_dir` (written by `write_report`)."""
    path = os.path.join(out_dir, 'scaling.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no {path}: run `python scaling.py fit` first')
    with open(path) as f:
        return json.load(f)
