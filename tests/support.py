"""Test helpers shared by every test folder: paths, the tiny model config and the `../shared` ground truth.

Importable as `support` (pyproject.toml puts `tests/` on pytest's path); fixtures live in conftest.py.
"""
import contextlib
import io
import math
from pathlib import Path
from typing import Callable, List, Optional

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


# ------------------------------------------------------------------------------------------------ float comparisons
# Every float comparison in the suite is one of two kinds:
# - the same computation (same kernels, shapes and order on the same machine: a rerun, resume vs uninterrupted, a
#   cache on vs off on a provably identical path) is bitwise equal: torch.equal / assert_close(rtol=0, atol=0);
# - two computations equal in exact arithmetic (another batch size or chunking, another kernel or summation order,
#   a definition written out vs the module, float32 vs float64) agree up to rounding: assert_equal_up_to_rounding.
# (Comparisons with a documented approximation, bf16 vs float32 or a golden file's tolerance, say so where they are.)
ROUNDING_SPREAD = 4.0  # lambda below: how many typical rounding errors the bound allows


def assert_equal_up_to_rounding(actual, expected, *, reduction: int, depth: int = 1, gain: float = 1.0,
                                scale: Optional[float] = None, dtype: Optional[torch.dtype] = None,
                                msg: str = '') -> None:
    """Assert that two computations that are equal in exact arithmetic agree up to their rounding in `dtype`.

    Elementwise |actual - expected| <= lambda * eps * sqrt(reduction * depth) * gain * scale, where
      eps        torch.finfo(dtype).eps, twice the unit round-off u; dtype defaults to the less precise of the two
                 tensors' dtypes (float64 for Python floats);
      reduction  the longest sum of one step: a Linear's inputs, a convolution's C_in * k * k, the tokens one
                 attention averages, a mean's terms; 1 for a bf16/fp16 op, which sums in float32 and rounds once;
      depth      how many such steps are chained from the inputs to the compared values (`rounding_chain` counts
                 them for modules: layers, normalisations, the two products of an attention);
      gain       how much the rest of the computation amplifies a relative error of its intermediate values: 1 for
                 layers that normalise, 1 / tau for a softmax at temperature tau;
      scale      the size of the values, by default max |expected| over its finite entries;
      lambda     ROUNDING_SPREAD = 4.
    Why: a sum of n terms rounds to the exact value plus at most ~n u times the sum of their magnitudes, and k chained
    sums of lengths n_1..n_k round like one sum of n_1 + ... + n_k <= reduction * depth terms (Higham, Accuracy and
    Stability of Numerical Algorithms, 2002, ch. 3). Rounding errors of either sign grow like the square root of the
    number of terms, not linearly; an error above lambda sqrt(n) u is exponentially unlikely in lambda (Higham and
    Mary, SIAM J. Sci. Comput. 41(5), 2019). Both computations carry such an error (2 u = eps); in layers that
    normalise, relative to values of the size of the output. The bound comes from the arithmetic, not from one
    machine: other vector units, kernels or thread counts round within it.
    Infinities must sit at the same places (masked logits); NaN fails.
    """
    tensors = [t for t in (actual, expected) if isinstance(t, torch.Tensor)]
    dtype = dtype or max((t.dtype for t in tensors), key=lambda d: torch.finfo(d).eps, default=torch.float64)
    actual, expected = (torch.as_tensor(t).double() for t in (actual, expected))
    finite = expected[torch.isfinite(expected)]
    if scale is None:
        scale = finite.abs().max().item() if finite.numel() else 0.0
    eps = torch.finfo(dtype).eps
    bound = ROUNDING_SPREAD * eps * math.sqrt(reduction * depth) * gain * scale
    derivation = (f'bound {bound:.3g} = {ROUNDING_SPREAD:g} * eps({str(dtype).replace("torch.", "")}) {eps:.3g} '
                  f'* sqrt(reduction {reduction} * depth {depth}) * gain {gain:.3g} * scale {scale:.3g}')
    torch.testing.assert_close(actual, expected, rtol=0, atol=bound,
                               msg=lambda m: f'{msg + ": " if msg else ""}{m}\nnot equal up to rounding: {derivation}')


# more_smooth sampling's soft codes: at the last scale a Gumbel softmax of the logits x (1 + 1) at temperature
# 0.27 * (1 - 0.95) passes a change of the logits on up to 2 / 0.0135 times amplified (gain of a softmax: 1 / tau)
GUMBEL_GAIN = 2 / (0.27 * 0.05)


def rounding_chain(*modules: torch.nn.Module, longest_sum: int = 0, backward: bool = False) -> dict:
    """`reduction` and `depth` for `assert_equal_up_to_rounding` of a computation through `modules`.

    depth counts every Linear, convolution and normalisation layer and two products (q.k, p.v) per attention: no path
    through the modules chains more sums than that; twice as many for gradients (`backward`: the forward, then the
    backward through the same layers). reduction is the longest inner product among them (a Linear's inputs, a
    convolution's C_in * k * k) or `longest_sum`, a longer sum of the computation (the tokens one attention averages,
    a weight gradient's batch x positions)."""
    from models.basic_vae import AttnBlock
    from models.basic_var import SelfAttention
    reduction, depth = longest_sum, 0
    for m in (m for module in modules for m in module.modules()):
        if isinstance(m, torch.nn.Linear):
            reduction, depth = max(reduction, m.in_features), depth + 1
        elif isinstance(m, torch.nn.Conv2d):
            reduction, depth = max(reduction, m.in_channels // m.groups * math.prod(m.kernel_size)), depth + 1
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            depth += 1
        elif isinstance(m, (AttnBlock, SelfAttention)):
            depth += 2
    return dict(reduction=reduction, depth=2 * depth if backward else depth)


def decoding(vae) -> tuple:
    """The modules an image made from token ids passes through: the quantiser (f_hat's sums over the scales and its
    Phi convolutions), post_quant_conv and the decoder; for `rounding_chain`."""
    return vae.quantize, vae.post_quant_conv, vae.decoder
