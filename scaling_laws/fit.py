# Power laws of VAR's test loss and token error rate (arXiv 2404.02905, section 4: figures 5 and 6).
"""The fit `y = (beta * x)^alpha` and the compute frontier, as pure functions of plain numbers.

In log space the law is a line, `log y = alpha * log x + alpha * log beta`: ordinary least squares gives the slope
alpha and the intercept b, so `beta = exp(b / alpha)`; the Pearson r of (log x, log y) says how straight the line is
(-1: a perfect falling power law). With an entropy floor E the fit is of the reducible part `y - E` (the paper plots
loss this way); points at or below the floor cannot be in a power law and are left out, by name.

The frontier (the paper's C_min): of all validation points of all members, those that no point of less or equal
compute beats; a power law in compute is fitted to them.
"""
import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """`y - floor = (beta * x)^alpha`, fitted to `points` (x, y) in log-log space, with Pearson r there.

    `log_beta` is ln(beta), which stays finite where beta itself overflows (a nearly flat law: beta = e^(b/alpha)).
    `dropped` holds the points that were given but not used (at or below the floor)."""
    alpha: float
    log_beta: float
    r: float
    floor: float
    points: Tuple[Tuple[float, float], ...]
    dropped: Tuple[Tuple[float, float], ...] = ()

    @property
    def beta(self) -> float:
        try:
            return math.exp(self.log_beta)
        except OverflowError:
            return math.inf

    def __call__(self, x: float) -> float:
        """The law's y (the floor added back) at x."""
        return math.exp(self.alpha * (self.log_beta + math.log(x))) + self.floor

    def equation(self, x_name: str = 'x', y_name: str = 'y') -> str:
        """The paper's notation, e.g. 'L = (2e-09·N)^-0.23', or 'L = 4.5 + (...)^...' with a floor."""
        floor = f'{self.floor:g} + ' if self.floor else ''
        return f'{y_name} = {floor}({self.beta:.2g}·{x_name})^{self.alpha:.3g}'

    def as_dict(self) -> Dict[str, object]:
        return {'alpha': self.alpha, 'beta': self.beta, 'log10_beta': self.log_beta / math.log(10), 'r': self.r,
                'floor': self.floor, 'points': [list(p) for p in self.points],
                'dropped': [list(p) for p in self.dropped]}


def format_beta(log10_beta: float) -> str:
    """beta for an equation, from its log10, so that a beta beyond float range still reads (e.g. 3.1e+400)."""
    if not math.isfinite(log10_beta):
        return 'nan'
    exp10 = math.floor(log10_beta)
    if -3 <= exp10 < 4:
        return f'{10 ** log10_beta:.3g}'
    return f'{10 ** (log10_beta - exp10):.2g}e{exp10:+d}'


def pearson_r(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson's correlation coefficient; nan when either side does not vary."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def fit_power_law(xs: Sequence[float], ys: Sequence[float], floor: float = 0.0) -> PowerLaw:
    """Least squares of `log(y - floor)` on `log x`: the PowerLaw through (xs, ys).

    Raises ValueError for fewer than two usable points, a non-positive x, or x values that are all equal."""
    if len(xs) != len(ys):
        raise ValueError(f'{len(xs)} x values but {len(ys)} y values')
    if any(x <= 0 for x in xs):
        raise ValueError(f'a power law needs x > 0, got {sorted(xs)[:3]}...')
    points = [(float(x), float(y)) for x, y in zip(xs, ys)]
    kept = [(x, y) for x, y in points if y - floor > 0]
    dropped = tuple(p for p in points if p not in kept)
    if len(points) < 2:
        raise ValueError(f'{len(points)} point(s): a power law needs two')
    if len(kept) < 2:
        raise ValueError(f'{len(kept)} of {len(points)} points lie above the floor {floor:g}: a power law needs two '
                         f'(points: {points})')
    lx = [math.log(x) for x, _ in kept]
    ly = [math.log(y - floor) for _, y in kept]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((v - mx) ** 2 for v in lx)
    if sxx == 0:
        raise ValueError(f'every point has the same x ({kept[0][0]:g}): no slope to fit')
    alpha = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx
    intercept = my - alpha * mx
    # y = (beta x)^alpha  <=>  log y = alpha log x + alpha log beta; a flat line (alpha 0) has no beta
    log_beta = intercept / alpha if alpha != 0 else math.nan
    return PowerLaw(alpha=alpha, log_beta=log_beta, r=pearson_r(lx, ly), floor=floor, points=tuple(kept),
                    dropped=dropped)


def pareto_frontier(points: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The (compute, y) points that no point of less or equal compute beats (strictly lower y), by rising compute:
    the lower-left envelope of all curves, the paper's C_min points."""
    frontier: List[Tuple[float, float]] = []
    best: Optional[float] = None
    # at equal compute the lowest y comes first, so the others are beaten by it
    for c, y in sorted(points, key=lambda p: (p[0], p[1])):
        if best is None or y < best:
            frontier.append((float(c), float(y)))
            best = y
    return frontier
