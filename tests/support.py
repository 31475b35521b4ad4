"""Test helpers shared by every test folder: paths, the tiny model config and the `../shared` ground truth.

Importable as `support` (pyproject.toml puts `tests/` on pytest's path); fixtures live in conftest.py.
"""
import contextlib
import io
from pathlib import Path
from typing import Callable, List

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'

TINY = dict(patch_nums=(1, 2, 3, 4), V=64, Cvae=8, ch=32, share_quant_resi=4, depth=2, num_classes=10)


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip: CI has it beside the checkout, a user's clone usually does not."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f'{p} is absent (the ground truth lives in ../shared beside the checkout)')
    return p


@contextlib.contextmanager
def intra_op_threads(n: int):
    """Run the block with `n` intra-op threads, as a process started with OMP_NUM_THREADS=n computes: the thread
    count is part of what fixes float rounding on the CPU, so a result compared bit for bit with a real process's
    must be made with the same count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def requires_cuda():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


def main_in_process(main: Callable[[List[str]], int], *argv) -> None:
    """A script's main() in this process; a user mistake (exit code 2, no traceback) is raised as SystemExit with its
    stderr message."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    if code != 0:
        assert code == 2 and 'Traceback' not in err.getvalue(), (code, err.getvalue())
        raise SystemExit(err.getvalue().strip())


def teacher_forced_tokens(var, label_B: torch.Tensor, x_BLCv: torch.Tensor):
    """-> (cond_BD, x_BLC): the class embeddings and the transformer's input for all L positions (start token, then
    the teacher-forcing tokens, with level and position), as VAR's forward builds them, for feeding the engine's
    per-scale steps slice by slice."""
    cond_BD = var.class_emb(label_B)
    lvl_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    return cond_BD, torch.cat((cond_BD.unsqueeze(1) + var.pos_start, var.word_embed(x_BLCv)), dim=1) + lvl_pos
