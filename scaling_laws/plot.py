# Log-log figures of the scaling laws, laid out as figures 5 and 6 of arXiv 2404.02905.
"""One figure from scaling.json: the top row against N (every finished member's final validation), the bottom row
against training compute C (each member's validation curve, the frontier ringed); one column per law (L_last, L_mean,
Err_last, Err_mean). Every panel carries its fitted line and equation with Pearson r. Losses with a floor are drawn
as reducible loss (cross-entropy minus the floor). Written as PNG and SVG.
"""
import math
from typing import Any, Dict, List

from scaling_laws.fit import format_beta
from scaling_laws.report import METRICS

Y_LABELS = {'L_last': 'test loss, last scale', 'L_mean': 'test loss, all scales',
            'Err_last': 'token error rate, last scale', 'Err_mean': 'token error rate, all scales'}


def tick_label(v: float, _pos=None) -> str:
    return f'{v:.4g}' if 1e-3 <= abs(v) < 1e4 else f'{v:.1e}'


def _law(report: Dict[str, Any], law: str, x: str) -> Dict[str, Any]:
    return next(e for e in report['laws'] if e['law'] == law and e['x'] == x)


def _draw_fit(ax, entry: Dict[str, Any], x_name: str) -> None:
    """The fitted line over the fitted points' x range, its equation and r in the panel's corner."""
    if 'error' in entry:
        ax.text(0.97, 0.96, 'not fitted:\n' + entry['error'][:40], transform=ax.transAxes, fontsize=7, color='0.4',
                ha='right', va='top')
        return
    xs = [p[0] for p in entry['points']]
    lo, hi = math.log(min(xs)), math.log(max(xs))
    grid = [math.exp(lo + (hi - lo) * i / 40) for i in range(41)]
    log_beta = entry['log10_beta'] * math.log(10)
    ax.plot(grid, [math.exp(entry['alpha'] * (log_beta + math.log(x))) for x in grid], '--', color='tab:red', lw=1.5,
            zorder=3)
    floor = f' - {entry["floor"]:g}' if entry['floor'] else ''
    beta = format_beta(entry['log10_beta'])
    text = f'{entry["law"]}{floor} = ({beta}·{x_name})$^{{{entry["alpha"]:.3g}}}$\nr = {entry["r"]:.4f}'
    top = entry['alpha'] < 0  # the corner that a falling (or rising) line leaves free
    ax.text(0.97, 0.96 if top else 0.04, text, transform=ax.transAxes, fontsize=8, color='tab:red', ha='right',
            va='top' if top else 'bottom', bbox=dict(facecolor='white', alpha=0.8, edgecolor='none'), zorder=5)


def plot_report(report: Dict[str, Any], out_base: str) -> List[str]:
    """Draw the figure of a scaling.json dict to `out_base`.png and .svg; returns the paths."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    members = report['members']
    n_kind = report['n_kind']
    colors = plt.get_cmap('viridis')([i / max(1, len(members) - 1) * 0.9 for i in range(len(members))])
    fig, axes = plt.subplots(2, len(METRICS), figsize=(4.2 * len(METRICS), 7.6), squeeze=False)
    for col, (law, key) in enumerate(METRICS.items()):
        by_n, by_c = _law(report, law, 'N'), _law(report, law, 'C')
        floor = by_n['floor']
        ylabel = f'{Y_LABELS[law]} - {floor:g}' if floor else Y_LABELS[law]

        ax = axes[0][col]
        for m, color in zip(members, colors):
            last = m['history'][-1] if m['history'] else None
            if m['finished'] and last is not None and last[key] - floor > 0:
                ax.scatter([m['n_params'][n_kind]], [last[key] - floor], color=color, s=36, zorder=4,
                           label=m['name'])
        _draw_fit(ax, by_n, 'N')
        ax.set(xscale='log', yscale='log', xlabel=f'parameters N ({n_kind.replace("_", " ")})', ylabel=ylabel,
               title=f'{law} vs N')

        ax = axes[1][col]
        for m, color in zip(members, colors):
            pts = [(h['compute'], h[key] - floor) for h in m['history'] if h[key] - floor > 0]
            if pts:
                ax.plot([c for c, _ in pts], [y for _, y in pts], '-o', color=color, ms=3, lw=1, alpha=0.8,
                        label=m['name'])
        if 'points' in by_c:
            ax.scatter([c for c, _ in by_c['points']], [y - floor for _, y in by_c['points']], s=60,
                       facecolors='none', edgecolors='black', zorder=4, label='frontier')
        _draw_fit(ax, by_c, 'C')
        ax.set(xscale='log', yscale='log', xlabel='training compute C (FLOPs)', ylabel=ylabel, title=f'{law} vs C')
    for row in axes:
        for ax in row:
            ax.grid(True, which='both', alpha=0.25)
            for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
                # plain-text tick labels (TeX-style ones cost seconds to lay out); minor ones only on a short range
                axis.set_major_formatter(FuncFormatter(tick_label))
                axis.set_minor_formatter(NullFormatter() if hi > 3 * lo else FuncFormatter(tick_label))
    axes[1][0].legend(fontsize=7, loc='lower left')
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.08, top=0.95, wspace=0.3, hspace=0.3)
    paths = [f'{out_base}.png', f'{out_base}.svg']
    for path in paths:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return paths
