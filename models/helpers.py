# Implements the sampling helpers of VAR (arXiv 2404.02905).
"""Top-k/top-p filtering, Gumbel softmax with an explicit generator, the editing mask, drop path and the
official initialisation of generic layers.

Shape legend: B batch, l tokens of one scale, V vocabulary.

`rng` arguments accept either one `torch.Generator` (the official behaviour: one stream for the whole
batch) or a sequence of B generators (one stream per batch row, so that a row's sample does not depend
on which other rows share its batch; used by the distributed FID export).
"""
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

RNG = Union[None, torch.Generator, Sequence[torch.Generator]]


def check_sampling_settings(cfg: float, top_k: int, top_p: float) -> None:
    """ValueError unless cfg >= 0, top_k >= 0 and top_p in [0, 1] (0 turns either filter off)."""
    if not cfg >= 0:  # NaN too
        raise ValueError(f'--cfg must be >= 0 (0 = no guidance), got {cfg:g}')
    if top_k < 0:
        raise ValueError(f'--top_k must be >= 0 (0 = no top-k filter), got {top_k}')
    if not 0 <= top_p <= 1:
        raise ValueError(f'--top_p must lie in [0, 1] (0 = no top-p filter), got {top_p:g}')


def _is_per_row(rng: RNG) -> bool:
    return rng is not None and not isinstance(rng, torch.Generator)


def filter_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set the logits outside the top-k / top-p sets to -inf, in place (official semantics).

    Top-k keeps every logit >= the k-th largest (ties may keep more than k). Top-p sorts ascending, removes
    the positions whose cumulative probability is <= 1 - top_p, and always keeps the largest one.
    """
    V = logits_BlV.shape[-1]
    if top_k > 0:
        kth_Bl1 = logits_BlV.topk(min(top_k, V), largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth_Bl1, -torch.inf)
    if top_p > 0:
        sorted_logits_BlV, sorted_idx_BlV = logits_BlV.sort(dim=-1, descending=False)
        sorted_remove_BlV = sorted_logits_BlV.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_remove_BlV[..., -1:] = False  # never remove the most likely token
        remove_BlV = sorted_remove_BlV.scatter(sorted_idx_BlV.ndim - 1, sorted_idx_BlV, sorted_remove_BlV)
        logits_BlV.masked_fill_(remove_BlV, -torch.inf)
    return logits_BlV


def filter_top_k_top_p_partial_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Fast path of `filter_top_k_top_p_` for top_k > 0: the top-p sort runs over the top-k survivors only.

    After top-k every other logit is -inf (probability 0), so the ascending cumulative sum over the whole vocabulary
    equals the one over the survivors up to float32 summation order. The survivors are every logit >= the k-th
    largest, so ties there keep more than k (common with fp16/bf16 logits): the sort then takes that many, one
    host sync per call. Both functions keep the same tokens, except where equal logits straddle the top-p cut (the
    reference's order among equal values is itself unspecified).
    """
    V = logits_BlV.shape[-1]
    if top_k <= 0 or top_k >= V:
        return filter_top_k_top_p_(logits_BlV, top_k, top_p)
    vals_Blk, idx_Blk = logits_BlV.topk(top_k, largest=True, sorted=True, dim=-1)
    keep_BlV = logits_BlV >= vals_Blk[..., -1:]
    logits_BlV.masked_fill_(~keep_BlV, -torch.inf)
    if top_p > 0:
        n_keep = int(keep_BlV.sum(dim=-1).max())
        if n_keep > top_k:  # ties at the k-th value: sort all survivors (rows with fewer get -inf, probability 0)
            vals_Blk, idx_Blk = logits_BlV.topk(n_keep, largest=True, sorted=True, dim=-1)
        # ascending order over the survivors: flip the descending top-k
        asc_vals_Blk, asc_idx_Blk = vals_Blk.flip(-1), idx_Blk.flip(-1)
        remove_Blk = asc_vals_Blk.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove_Blk[..., -1:] = False
        logits_BlV.scatter_(-1, asc_idx_Blk, asc_vals_Blk.masked_fill(remove_Blk, -torch.inf))
    return logits_BlV


def multinomial_one_capturable(probs_NV: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row, as `torch.multinomial(probs_NV, 1, generator=generator)` draws it, without its host-side
    check of the probabilities (a sync that a CUDA-graph capture cannot hold).

    torch.multinomial draws a single sample as argmax(p / q) with q ~ Exp(1) from one `exponential_` call on the
    generator; this does the same, so the ids and the generator's state afterwards are the same
    (tests/models/test_loop_graph.py checks both against torch.multinomial).
    """
    q_NV = torch.empty_like(probs_NV).exponential_(1, generator=generator)
    return (probs_NV / q_NV).argmax(dim=-1, keepdim=True)


def multinomial_with_rng(probs_NV: torch.Tensor, num_samples: int, replacement: bool, rng: RNG,
                         capturable: bool = False) -> torch.Tensor:
    """`torch.multinomial` drawing from one generator, or row-block by row-block from per-row generators.

    With a sequence of B generators, `probs_NV` has N = B*l rows and row block b (l rows) uses rng[b].
    `capturable` (one sample per row only): `multinomial_one_capturable`, for a CUDA-graph capture.
    """
    if capturable:
        if num_samples != 1:
            raise ValueError('the capturable draw takes one sample per row')
        draw = multinomial_one_capturable
    else:
        def draw(p, g):
            return torch.multinomial(p, num_samples=num_samples, replacement=replacement, generator=g)
    if not _is_per_row(rng):
        return draw(probs_NV, rng)
    B = len(rng)
    chunks = probs_NV.view(B, -1, probs_NV.shape[-1]).unbind(0)
    return torch.cat([draw(p, g) for p, g in zip(chunks, rng)], 0)


def sample_with_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0, rng: RNG = None,
                             num_samples: int = 1, partial_sort: bool = False,
                             capturable: bool = False) -> torch.Tensor:
    """Filter `logits_BlV` in place, then sample token ids -> (B, l, |num_samples|) int64.

    Args:
        top_k / top_p: 0 disables each filter.
        rng: a generator, a sequence of B generators, or None for the global generator.
        num_samples: a negative value samples without replacement (official convention).
        partial_sort: use the partial-sort filter (see `filter_top_k_top_p_partial_`).
        capturable: nothing that syncs with the host, for a CUDA-graph capture (the full-sort filter and
            `multinomial_one_capturable`: the same numbers).
    """
    B, l, V = logits_BlV.shape  # noqa: E741 (l: tokens of one scale, the shape legend)
    (filter_top_k_top_p_partial_ if partial_sort and not capturable else filter_top_k_top_p_)(logits_BlV, top_k, top_p)
    replacement = num_samples >= 0
    probs_NV = logits_BlV.softmax(dim=-1).view(-1, V)
    return multinomial_with_rng(probs_NV, abs(num_samples), replacement, rng, capturable).view(B, l, -1)


def gumbel_softmax_with_rng(logits: torch.Tensor, tau: float = 1, hard: bool = False, eps: float = 1e-10,
                            dim: int = -1, rng: RNG = None) -> torch.Tensor:
    """Gumbel softmax whose noise comes from `rng` (global generator and `F.gumbel_softmax` when None).

    `eps` is accepted for signature compatibility and unused, as in the official code.
    """
    if rng is None:
        return F.gumbel_softmax(logits=logits, tau=tau, hard=hard, eps=eps, dim=dim)
    if _is_per_row(rng):
        exp_noise = torch.cat([torch.empty_like(row).exponential_(generator=g)
                               for row, g in zip(logits.split(1, dim=0), rng)], 0)
    else:
        exp_noise = torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=rng)
    gumbels = -exp_noise.log()
    y_soft = ((logits + gumbels) / tau).softmax(dim)
    if not hard:
        return y_soft
    index = y_soft.max(dim, keepdim=True)[1]
    y_hard = torch.zeros_like(logits, memory_format=torch.legacy_contiguous_format).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def get_edit_mask(patch_nums: Sequence[int], y0: float, x0: float, y1: float, x1: float,
                  device: Union[str, torch.device] = 'cpu', inpainting: bool = True) -> torch.Tensor:
    """A (pn_last, pn_last) float mask: 1 = keep the given image's token, 0 = let VAR generate.

    The box (relative coordinates) is set to 1 and then inverted when `inpainting` (regenerate the box);
    outpainting keeps the box and regenerates the rest. Bounds use Python's round, as the official notebook.
    """
    ph = pw = patch_nums[-1]
    edit_mask = torch.zeros(ph, pw, device=device)
    edit_mask[round(y0 * ph):round(y1 * ph), round(x0 * pw):round(x1 * pw)] = 1
    if inpainting:
        edit_mask = 1 - edit_mask
    return edit_mask


def replace_embedding(edit_mask: torch.Tensor, h_BChw: torch.Tensor, gt_BChw: torch.Tensor, ph: int,
                      pw: int) -> torch.Tensor:
    """Keep ground-truth codes where the mask (resized bilinearly to ph x pw, > 0.5) says so.

    Scales of at most 3 tokens always take the ground truth (official procedure).
    """
    B = h_BChw.shape[0]
    h, w = edit_mask.shape[-2:]
    if edit_mask.ndim == 2:
        edit_mask = edit_mask.unsqueeze(0).expand(B, h, w)
    force_gt_B1hw = F.interpolate(edit_mask.unsqueeze(1).to(dtype=torch.float32), size=(ph, pw), mode='bilinear',
                                  align_corners=False).gt(0.5).int()
    if ph * pw <= 3:
        force_gt_B1hw.fill_(1)
    return gt_BChw * force_gt_B1hw + h_BChw * (1 - force_gt_B1hw)


def check_edit_inputs(input_img_tokens, edit_mask) -> None:
    """ValueError unless zero-shot editing gets both of its inputs or neither."""
    if (input_img_tokens is None) != (edit_mask is None):
        raise ValueError('zero-shot editing needs both input_img_tokens and edit_mask')


def init_module_weights(modules: Iterable[nn.Module], init_std: float, conv_std_or_gain: float) -> None:
    """The official initialisation of generic layers: Linear and Embedding weights trunc-normal(init_std), biases 0;
    norm layers weight 1, bias 0; convolutions trunc-normal(conv_std_or_gain) when > 0, else Xavier-normal with gain
    -conv_std_or_gain."""
    for m in modules:
        with_weight = hasattr(m, 'weight') and m.weight is not None
        with_bias = hasattr(m, 'bias') and m.bias is not None
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight.data, std=init_std)
            if with_bias:
                m.bias.data.zero_()
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight.data, std=init_std)
            if m.padding_idx is not None:
                m.weight.data[m.padding_idx].zero_()
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                            nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
            if with_weight:
                m.weight.data.fill_(1.0)
            if with_bias:
                m.bias.data.zero_()
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d,
                            nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            if conv_std_or_gain > 0:
                nn.init.trunc_normal_(m.weight.data, std=conv_std_or_gain)
            else:
                nn.init.xavier_normal_(m.weight.data, gain=-conv_std_or_gain)
            if with_bias:
                m.bias.data.zero_()


def active_autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast is running in on this device type, or None when autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False,
              scale_by_keep: bool = True) -> torch.Tensor:
    """Stochastic depth per sample: zero whole samples with probability `drop_prob` (global RNG)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(mask_shape).bernoulli_(keep_prob)
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    """Drop paths (stochastic depth) per sample, applied on the main path of residual blocks."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'
