# A family of VAR models of growing depth, as in arXiv 2404.02905, section 4 (the scaling-law study).
"""The plan of a sweep: which members (depth, width), their train.py command lines, and the time still to go.

The family follows the recipe rule of models/presets.py (width 64*depth, heads = depth, drop path 0.1*depth/24)
unless the widths are given (for models small enough for a CPU); heads stay = depth, as train.py builds them. Every
member gets the same train.py flags and its own folder `d{depth}w{width}` under the sweep folder.
"""
import dataclasses
import os
from typing import Dict, List, Optional, Sequence

from models.presets import width_heads_drop_path
from utils.logging import format_seconds

# what the sweep sets for each member; passing them through would give every member the same value
RESERVED_FLAGS = ('--depth', '--width', '--local_out_dir_path', '--out_dir')


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    depth: int
    width: int

    @property
    def name(self) -> str:
        return f'd{self.depth}w{self.width}'


def plan_family(depths: Sequence[int], widths: Optional[Sequence[int]] = None,
                width_per_depth: Optional[int] = None) -> List[MemberSpec]:
    """The members, smallest first: `widths[i]` for `depths[i]` when given, else `width_per_depth * depth`, else the
    recipe's 64*depth. Raises ValueError for a width that the depth's heads do not divide, or a repeated member."""
    if not depths:
        raise ValueError('no depths given')
    if widths is not None and len(widths) != len(depths):
        raise ValueError(f'{len(widths)} widths for {len(depths)} depths: give one width per depth')
    specs = []
    for i, d in enumerate(depths):
        if d < 1:
            raise ValueError(f'depth {d} < 1')
        if widths is not None:
            w = widths[i]
        elif width_per_depth is not None:
            w = width_per_depth * d
        else:
            w = width_heads_drop_path(d)['embed_dim']
        if w < 1 or w % d:
            raise ValueError(f'width {w} of depth {d}: the width must be a positive multiple of the heads (= depth)')
        specs.append(MemberSpec(d, w))
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f'a member appears twice: {[s.name for s in specs]}')
    return sorted(specs, key=lambda s: (s.depth * s.width ** 2, s.depth))


def check_passthrough(train_flags: Sequence[str]) -> None:
    """Raise ValueError when the flags for train.py hold one that the sweep sets per member."""
    for f in train_flags:
        name = f.split('=', 1)[0]
        if name in RESERVED_FLAGS:
            raise ValueError(f'{name} is set by the sweep for each member (--depths/--widths, --out); leave it out')


def member_argv(spec: MemberSpec, sweep_dir: str, train_flags: Sequence[str]) -> List[str]:
    """train.py's command line of one member: the shared flags, then its size and folder."""
    return [*train_flags, f'--depth={spec.depth}', f'--width={spec.width}',
            f'--local_out_dir_path={os.path.join(sweep_dir, spec.name)}']


class SweepClock:
    """The time still to go: seconds per unit of work (training FLOPs per image; all members see the same images) of
    the latest member trained in this process (the members grow, and a bigger one uses the CPU or GPU better than
    the smallest). The work of each member is known once one member's checkpoint gives the family's configuration
    (`set_work`)."""

    def __init__(self):
        self.work: Optional[Dict[str, float]] = None  # member name -> its work still to do (0 once done)
        self.seconds_per_work: Optional[float] = None
        self.done: set = set()

    def set_work(self, work: Dict[str, float]) -> None:
        self.work = {name: 0.0 if name in self.done else w for name, w in work.items()}

    def finished(self, name: str, seconds: float, fraction_done_before: float = 0.0) -> None:
        """Member `name` ran for `seconds`, `fraction_done_before` of it having been done before (a resume)."""
        self.done.add(name)
        if self.work is not None:
            work = self.work[name] * (1 - fraction_done_before)
            if work > 0:
                self.seconds_per_work = seconds / work
            self.work[name] = 0.0

    def skip(self, name: str) -> None:
        self.done.add(name)
        if self.work is not None:
            self.work[name] = 0.0

    def estimate(self, name: Optional[str] = None) -> str:
        """The predicted time of member `name` (None: of every member still to do), or 'unknown' before a timing."""
        if self.work is None or self.seconds_per_work is None:
            return 'unknown until a member is timed'
        rest = self.work[name] if name is not None else sum(self.work.values())
        return format_seconds(rest * self.seconds_per_work)
