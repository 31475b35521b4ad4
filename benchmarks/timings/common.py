"""Timing and reporting helpers shared by the benchmarks (CUDA events, medians, one table, JSON)."""
import json
import platform
import statistics
import sys
from typing import Any, Callable, Dict, List, Optional

import torch

from utils.runtime import autocast_dtype

# the --dtypes names of the benchmarks, on the --fp16 codes of every script (utils.runtime)
DTYPES = {'fp16': autocast_dtype(1), 'bf16': autocast_dtype(2)}


def machine() -> Dict[str, str]:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'
    return {'gpu': gpu, 'torch': torch.__version__, 'python': platform.python_version(), 'host': platform.node()}


def time_cuda(fn: Callable[[], None], warmup: int = 1, repeats: int = 5) -> float:
    """Median seconds per call, timed with CUDA events after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def add_ratios(row: Dict[str, Any], ref: Optional[Dict[str, Any]]) -> None:
    """Give a measured row its speed-up and memory ratio against the reference row (when both were measured)."""
    if ref is not None and row is not ref and 'img_per_s' in row and 'img_per_s' in ref:
        row['speedup'] = row['img_per_s'] / ref['img_per_s']
        row['mem_ratio'] = row['peak_gib'] / ref['peak_gib']


def peak_gib(fn: Callable[[], None]) -> float:
    """GPU memory one call needs at its peak, in GiB: the caching allocator's reserved peak, its cache emptied first.

    Reserved rather than allocated: a CUDA graph's temporaries live in its private memory pool, which stays reserved
    between replays and which the allocated-bytes counters do not see (replays allocate nothing), so an allocated peak
    would leave out the graph path's working memory.
    """
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_reserved() / 2 ** 30


def print_table(title: str, rows: List[Dict], columns: List[str]) -> None:
    m = machine()
    print(f'\n{title}  [GPU: {m["gpu"]}, torch {m["torch"]}]')
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print('  '.join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print('  '.join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
    sys.stdout.flush()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f'{v:.3g}' if abs(v) < 100 else f'{v:.0f}'
    return '' if v is None else str(v)


def write_json(path: str, payload: Dict) -> None:
    with open(path, 'w') as f:
        json.dump({'machine': machine(), **payload}, f, indent=1)
