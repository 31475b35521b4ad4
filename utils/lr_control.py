# Learning-rate / weight-decay schedules and parameter groups of the VAR training recipe (arXiv 2404.02905).
"""Schedules, the weight-decay parameter filter and the progressive-training stage of the official recipe.

All functions are pure except `lr_wd_annealing`, which writes lr and weight_decay into the optimizer's groups.
"""
import math
from typing import Dict, Iterable, List, Sequence, Tuple

import torch

# A parameter whose name contains one of these gets no weight decay (as do 1-d tensors and biases).
NO_WD_KEYS = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start',
              'start_pos', 'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul')


def lr_ratio(sche: str, cur_it: int, wp_it: int, max_it: int, wp0: float = 0.005, wpe: float = 0.001) -> float:
    """The lr multiplier rho at iteration `cur_it`: linear warm-up from wp0, then the named decay down to wpe."""
    if cur_it < wp_it:
        return wp0 + (1 - wp0) * cur_it / wp_it
    p = (cur_it - wp_it) / (max_it - 1 - wp_it)
    rest = 1 - p
    if sche == 'cos':
        return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * p))
    if sche in ('lin', 'lin0'):
        T = 0.15 if sche == 'lin' else 0.05
        return 1 if p < T else wpe + (1 - wpe) * rest / (1 - T)
    if sche == 'lin00':
        return wpe + (1 - wpe) * rest
    if sche.startswith('lin'):
        # 'linX': rise to a mid value m at p = T, then fall to wpe (used with progressive training, X = pg).
        T = float(sche[3:])
        mid = (1 + wpe + (1 - wpe) * (1 - T)) / 2
        return 1 + (mid - 1) * p / T if p < T else wpe + (mid - wpe) * rest / (1 - T)
    if sche == 'exp':
        T = 0.15
        return 1 if p < T else math.exp((p - T) / (1 - T) * math.log(wpe))
    raise NotImplementedError(f'unknown lr schedule {sche!r} (cos, lin, lin0, lin00, linX, exp)')


def wd_value(wd: float, wd_end: float, cur_it: int, max_it: int) -> float:
    """Cosine from wd to wd_end over the whole run (no warm-up)."""
    q = cur_it / (max_it - 1)
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * q))


def lr_wd_annealing(sche: str, optimizer: torch.optim.Optimizer, peak_lr: float, wd: float, wd_end: float,
                    cur_it: int, wp_it: int, max_it: int, wp0: float = 0.005, wpe: float = 0.001
                    ) -> Tuple[float, float, float, float]:
    """Set lr = rho*peak_lr*lr_sc and weight_decay = wd_cur*wd_sc in every group of `optimizer`.

    Returns (min_lr, max_lr, min_wd, max_wd), as officially: min_wd over the groups with a positive wd, max_wd over all
    groups; -1 stands for an empty set.
    """
    rho = lr_ratio(sche, cur_it, wp_it, max_it, wp0, wpe)
    peak_lr *= rho
    wd_cur = wd_value(wd, wd_end, cur_it, max_it)
    lrs, wds = [], []
    for group in optimizer.param_groups:
        group['lr'] = peak_lr * group.get('lr_sc', 1)
        group['weight_decay'] = wd_cur * group.get('wd_sc', 1)
        lrs.append(group['lr'])
        wds.append(group['weight_decay'])
    positive_wds = [w for w in wds if w > 0]
    return (min(lrs, default=-1), max(lrs, default=-1), min(positive_wds, default=-1), max(wds, default=-1))


def is_no_wd(name: str, param: torch.Tensor, no_wd_keys: Sequence[str] = NO_WD_KEYS) -> bool:
    return param.ndim == 1 or name.endswith('bias') or any(k in name for k in no_wd_keys)


def build_param_groups(named_params: Iterable[Tuple[str, torch.nn.Parameter]],
                       no_wd_keys: Sequence[str] = NO_WD_KEYS) -> List[Dict]:
    """Split parameters into 'ND' (no wd, wd_sc=0) and 'D' (wd_sc=1) groups, ordered by first appearance.

    Every parameter must require grad (the official code asserts it: a frozen parameter here is a bug).
    """
    groups: Dict[str, Dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            raise AssertionError(f'parameter {name} does not require grad; VAR trains all of its parameters')
        key = 'ND' if is_no_wd(name, param, no_wd_keys) else 'D'
        group = groups.setdefault(key, {'name': key, 'params': [], 'param_names': [], 'lr_sc': 1.0,
                                        'wd_sc': 0.0 if key == 'ND' else 1.0})
        group['params'].append(param)
        group['param_names'].append(name)
    return list(groups.values())


def progressive_si(g_it: int, wp_it: float, max_it: int, pg: float, pg0: int, num_scales: int) -> int:
    """The progressive-training stage: the last scale index trained at `g_it` (-1 when pg == 0, i.e. all scales).

    `wp_it` is the unrounded warm-up length wp * iters_per_epoch, as the official loop passes it (only the lr/wd
    schedule rounds it).
    """
    if pg <= 0:
        return -1
    if g_it <= wp_it:
        return pg0
    if g_it >= max_it * pg:
        return num_scales - 1
    frac = min(max((g_it - wp_it) / (max_it * pg - wp_it), 0.0), 1.0)
    return pg0 + round(frac * (num_scales - 1 - pg0))  # Python round (ties to even), as the official code
