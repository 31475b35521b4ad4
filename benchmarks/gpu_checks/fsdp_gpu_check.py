"""One-GPU check of the scale-out switches (the H200 figures README's "Scale-out" section owes): d30 at 256 px and d36
at 512 px, plain (DDP's single-GPU equivalent) and FSDP2 (a one-rank mesh), each with and without activation
checkpointing: peak memory and images/s of the training step at a fixed batch, then the largest per-GPU batch that
fits (doubling until out of memory). bf16 autocast, fused AdamW, clipping, random token ids (no tokenizer in the
step). Writes $OUT/fsdp_gpu_check.json (or --out) and prints a table; about 5 minutes on one H200.

    OUT=/tmp/out python -m benchmarks.gpu_checks.fsdp_gpu_check            # or: bash benchmarks/fsdp_gpu_check.sh
"""
import argparse
import gc
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from benchmarks.timings.common import machine, print_table, write_json

CASES = (('d30', 256, 16), ('d36', 512, 8))  # preset, image side, the fixed per-GPU batch
MAX_BATCH = 512


def build(preset: str, fsdp: bool, act_ckpt: bool, device: str = 'cuda'):
    from models import PRESETS, build_vae_var
    from utils.fsdp import checkpoint_blocks, shard_model
    torch.manual_seed(0)
    vae, var = build_vae_var(device=device, **PRESETS[preset])
    del vae
    var.train()
    if act_ckpt:
        checkpoint_blocks(var.blocks)
    if fsdp:
        shard_model(var, torch.device(device), fp16=2)
    opt = torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=device == 'cuda')
    return var, opt


def make_step(var, opt, B: int, device: str = 'cuda'):
    V, L = var.V, var.L
    label_B = torch.randint(0, var.num_classes, (B,), device=device)
    x_BLCv = torch.randn(B, L - var.first_l, var.Cvae, device=device)
    gt_BL = torch.randint(0, V, (B, L), device=device)

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            logits_BLV = var(label_B, x_BLCv)
            loss = F.cross_entropy(logits_BLV.view(-1, V), gt_BL.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(step, repeats: int) -> Dict[str, float]:
    step()  # warm-up: optimizer state, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    secs = (time.perf_counter() - t0) / repeats
    return {'s_per_step': secs, 'peak_alloc_GiB': torch.cuda.max_memory_allocated() / 2 ** 30,
            'peak_reserved_GiB': torch.cuda.max_memory_reserved() / 2 ** 30}


def largest_batch(var, opt, start: int, deadline: float) -> Optional[int]:
    """The largest power-of-two multiple of `start` whose step fits (None if the time ran out first)."""
    fits, B = None, start
    while B <= MAX_BATCH and time.time() < deadline:
        try:
            make_step(var, opt, B)()
            torch.cuda.synchronize()
            fits, B = B, B * 2
        except torch.OutOfMemoryError:
            break
        finally:
            opt.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
    return fits


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default=os.path.join(os.environ.get('OUT', '.'), 'fsdp_gpu_check.json'))
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--budget_s', type=float, default=270, help='stop the batch searches after this many seconds')
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print('needs a CUDA GPU')
        return 2
    for k, v in (('RANK', '0'), ('LOCAL_RANK', '0'), ('WORLD_SIZE', '1'), ('MASTER_ADDR', '127.0.0.1'),
                 ('MASTER_PORT', '29531')):
        os.environ.setdefault(k, v)
    import dist
    from utils.runtime import set_tf32
    dist.initialize(device='cuda')
    set_tf32(True)
    t_start = time.time()
    rows: List[Dict] = []
    for preset, px, B in CASES:
        for fsdp in (False, True):
            for act_ckpt in (False, True):
                row = {'model': preset, 'px': px, 'fsdp': fsdp, 'act_ckpt': act_ckpt, 'batch': B}
                try:
                    var, opt = build(preset, fsdp, act_ckpt)
                    r = measure(make_step(var, opt, B), args.repeats)
                    row.update(img_per_s=B / r['s_per_step'], **r)
                    deadline = t_start + args.budget_s * (len(rows) + 1) / (2 * len(CASES) * 2)
                    row['largest_batch'] = largest_batch(var, opt, B, deadline)
                except torch.OutOfMemoryError as e:
                    row['error'] = f'out of memory: {str(e)[:200]}'
                var = opt = None  # free this configuration's model before the next one is built
                gc.collect()
                torch.cuda.empty_cache()
                rows.append(row)
                print(row, flush=True)
    print_table('training step, one GPU, bf16', rows, ['model', 'px', 'fsdp', 'act_ckpt', 'batch', 'img_per_s',
                                                       'peak_alloc_GiB', 'peak_reserved_GiB', 'largest_batch'])
    write_json(args.out, {'machine': machine(), 'rows': rows, 'seconds': time.time() - t_start})
    dist.finalize()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
