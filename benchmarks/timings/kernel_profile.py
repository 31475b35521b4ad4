"""Top CUDA kernels of one sampling call (torch.profiler), to see what the GPU spends its time on.

    python -m benchmarks.timings.kernel_profile --depth 16 --batch 64
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from models import PRESETS, build_vae_var
from models.engine import sampling_engine


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('--depth', type=int, default=16)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--rows', type=int, default=25)
    args = p.parse_args(argv)
    vae, var = build_vae_var(device='cuda', **PRESETS[f'd{args.depth}'])
    var.eval()
    labels = torch.arange(args.batch, device='cuda')

    def run():
        with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16):
            sampling_engine(var).sample(B=args.batch, label_B=labels, g_seed=0, cfg=1.5, top_k=900, top_p=0.96,
                                        kv_cache='prealloc', partial_sort=True)
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=args.rows, max_name_column_width=60))


if __name__ == '__main__':
    main()
