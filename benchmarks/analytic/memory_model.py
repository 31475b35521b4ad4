"""Per-GPU training memory of VAR under DDP / FSDP, with and without activation checkpointing: a model, not a
measurement (the H200 figures are taken by benchmarks/fsdp_gpu_check.sh).

    python -m benchmarks.analytic.memory_model                 # the table of docs/scale_out.md (d30, d36)
    python -m benchmarks.analytic.memory_model --depth 30 --batch 16 --world 8

Terms (bytes; P parameters, P_blk those of one transformer block, B per-GPU batch, L tokens, C width, V vocabulary):
- model states, DDP: fp32 weights 4P + fp32 gradients 4P + DDP's gradient buckets 4P + AdamW's two moments 8P, and
  under autocast the half-precision weight copies the backward keeps (2P);
- model states, FSDP over N GPUs: (4 + 4 + 8)P/N sharded, plus the working copies: the gathered half-precision
  weights and their fp32 unsharded gradients of two blocks at a time (the current and the prefetched one), and the
  root group's (embeddings, AdaLN condition, head: float32, gathered through the step);
- activations: what autograd saves. A block saves about ACT_ELEMS_PER_TOKEN_C * C elements per token (counted with
  saved-tensor hooks on the CPU; `tests/project/test_memory_model.py` checks the model against that count on a tiny
  VAR), with a GPU attention kernel keeping O(L) per head and no L x L scores; the head keeps its logits (half) and the
  loss its float32 logits and log-probabilities. With activation checkpointing a block keeps only its input, and
  the backward recomputes one block at a time.
Not modelled: the frozen tokenizer (about 0.4 GiB), the allocator's fragmentation and cuDNN / NCCL workspaces, the
transient gradients of activations during the backward (about one block's worth).
"""
import argparse
import contextlib
import functools
import json
import sys
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch

ACT_ELEMS_PER_TOKEN_C = 24  # saved elements per token and block, in units of the width C (counted, see above)
GIB = 2 ** 30


@functools.lru_cache(maxsize=None)
def model_shape(depth: int, patch_nums: Sequence[int], shared_aln: bool, V: int = 4096, num_classes: int = 1000,
                embed_dim: Optional[int] = None) -> Dict[str, int]:
    """P, P_blk, C, heads, L, V of a VAR, counted on the meta device (nothing is allocated; `patch_nums` a tuple).
    Cached: treat the result as read-only."""
    from models import build_vae_var
    _, var = build_vae_var(device='meta', patch_nums=tuple(patch_nums), V=V, depth=depth, shared_aln=shared_aln,
                           num_classes=num_classes, embed_dim=embed_dim)
    return {'P': sum(p.numel() for p in var.parameters()), 'P_blk': sum(p.numel() for p in var.blocks[0].parameters()),
            'C': var.C, 'H': var.num_heads, 'L': var.L, 'V': V, 'depth': depth}


def block_bytes(shape: Dict[str, int], batch: int, act_bytes: int = 2, attn_scores: bool = False) -> int:
    """What one block saves for its backward. `act_bytes`: 2 under bf16/fp16 autocast, 4 in fp32; `attn_scores`: the
    attention kernel keeps the L x L scores (the CPU's math path), else O(L) per head (GPU kernels)."""
    B, L, C, H = batch, shape['L'], shape['C'], shape['H']
    return B * L * ACT_ELEMS_PER_TOKEN_C * C * act_bytes + (B * H * L * L * act_bytes if attn_scores else 0)


def activation_bytes(shape: Dict[str, int], batch: int, act_ckpt: bool, act_bytes: int = 2,
                     attn_scores: bool = False) -> int:
    """Activations held at the end of the forward; with `act_ckpt` the backward adds one recomputed block
    (`block_bytes`) on top, which `estimate` counts."""
    B, L, C, V, depth = batch, shape['L'], shape['C'], shape['V'], shape['depth']
    head = B * L * V * (act_bytes + 4 + 4)  # the head's logits, their float32 copy and log-probabilities
    if act_ckpt:
        return depth * B * L * C * act_bytes + head  # every block's input
    return depth * block_bytes(shape, batch, act_bytes, attn_scores) + head


def state_bytes(shape: Dict[str, int], world: int, fsdp: bool, half: bool = True) -> int:
    """Weights, gradients, optimizer state and the working copies of one GPU (see the module docstring)."""
    P, P_blk = shape['P'], shape['P_blk']
    if not fsdp:
        return 20 * P + (2 * P if half else 0)
    P_root = P - shape['depth'] * P_blk
    gathered = 2 if half else 4  # the blocks' weights are gathered in the compute dtype, the root's in float32
    return 16 * P // world + 2 * P_blk * (gathered + 4) + P_root * (4 + 4)


def estimate(depth: int, patch_nums: Sequence[int], shared_aln: bool, batch: int, world: int, fsdp: bool,
             act_ckpt: bool, half: bool = True) -> Dict[str, float]:
    """GiB per GPU: states, activations and their total, for one configuration."""
    shape = model_shape(depth, tuple(patch_nums), shared_aln)
    states = state_bytes(shape, world, fsdp, half)
    act_bytes = 2 if half else 4
    acts = activation_bytes(shape, batch, act_ckpt, act_bytes)
    if act_ckpt:  # the backward recomputes one block at a time
        acts += block_bytes(shape, batch, act_bytes)
    return {'params_M': shape['P'] / 1e6, 'states_GiB': states / GIB, 'activations_GiB': acts / GIB,
            'total_GiB': (states + acts) / GIB}


@contextlib.contextmanager
def count_saved_bytes(exclude: Sequence[torch.Tensor] = ()) -> Iterator[Callable[[], int]]:
    """Within the context, autograd's saved tensors are counted (each storage once, `exclude`'s storages, e.g. the
    parameters, not at all); yields a function that returns the bytes counted so far."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield lambda: sum(seen.values())


CONFIGS = (('DDP', False, False), ('DDP + act_ckpt', False, True), ('FSDP', True, False),
           ('FSDP + act_ckpt', True, True))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from models.presets import PRESETS
    p = argparse.ArgumentParser(description='Per-GPU training memory of VAR (a model; bf16 autocast, AdamW).')
    p.add_argument('--depth', type=int, nargs='*', default=[30, 36], help='released depths (presets)')
    p.add_argument('--batch', type=int, nargs='*', default=[16, 32], help='per-GPU batch sizes')
    p.add_argument('--world', type=int, default=8, help='GPUs FSDP shards over')
    p.add_argument('--json', default='', help='also write the rows to this file')
    args = p.parse_args(argv)
    rows = []
    for depth in args.depth:
        preset = PRESETS[f'd{depth}']
        for batch in args.batch:
            for name, fsdp, ckpt in CONFIGS:
                est = estimate(depth, preset['patch_nums'], preset['shared_aln'], batch, args.world, fsdp, ckpt)
                rows.append({'model': f'd{depth}', 'batch': batch, 'world': args.world, 'config': name, **est})
    print(f'| model | per-GPU batch | {" | ".join(c[0] for c in CONFIGS)} |')
    print('|---|---|' + '---|' * len(CONFIGS))
    for i in range(0, len(rows), len(CONFIGS)):
        cells = ' | '.join(f'{r["total_GiB"]:.1f} GiB' for r in rows[i:i + len(CONFIGS)])
        print(f'| {rows[i]["model"]} ({rows[i]["params_M"]:.0f}M) | {rows[i]["batch"]} | {cells} |')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
