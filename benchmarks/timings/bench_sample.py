"""Sampling throughput and peak memory: the fast path against the reference path, in the same run.

reference = the official-equivalent path: KV cache grown by concatenation, full-vocabulary sort for top-p,
            NCHW decoder, no graphs.
fast      = preallocated KV cache written in place, top-p over the top-k survivors, torch.compile of the
            per-scale transformer steps and of the decoder, CUDA graphs of the per-scale steps.
fast_bf16 = fast with the bf16 residual stream and bf16 decoder (models/lowp.py; bf16 rows only: the paths with
            the bf16 stream are the ones whose numbers differ from the reference's, within bf16 tolerance).
loop_bf16 = fast_bf16 with the whole loop as one CUDA graph (cuda_graph='loop': every scale's step, CFG, filtering
            with the full sort, sampling and next-scale input in one replay).
Both run under the same autocast dtype, with CFG (2B rows), top-k 900, top-p 0.96, including the VQVAE decode.
Random weights: speed does not depend on them. Each row also gives ms per image, the achieved TFLOP/s of the model
FLOPs (benchmarks.analytic.flops: transformer with CFG plus decode) and their % of the dense bf16 peak (--peak_tflops).

    python -m benchmarks.timings.bench_sample --depths 16,20,24,30 --batches 16,64,256 --dtypes bf16,fp16 \\
        --d36 --d36_batches 16
    python -m benchmarks.timings.bench_sample --depths 30 --paths reference,fast_bf16
"""
import argparse
import gc

import torch

from benchmarks.timings.common import DTYPES, add_ratios, peak_gib, print_table, time_cuda, write_json
from benchmarks.analytic.flops import device_peak_tflops, sampling_flops
from models import PRESETS, build_vae_var
from models.engine import release_cuda_graphs, release_sampling_caches, sampling_engine
from utils.runtime import set_tf32

COLUMNS = ['model', 'batch', 'dtype', 'path', 'img_per_s', 'ms_per_img', 'peak_gib', 'tflops', 'pct_peak', 'speedup',
           'mem_ratio', 'note']
PATHS = {
    'reference': dict(kv_cache='concat', partial_sort=False, cuda_graph=False),
    'fast': dict(kv_cache='prealloc', partial_sort=True, cuda_graph=True, compiled=True),
    'fast_bf16': dict(kv_cache='prealloc', partial_sort=True, cuda_graph=True, compiled=True,
                      stream_dtype=torch.bfloat16),
    'loop_bf16': dict(kv_cache='prealloc', cuda_graph='loop', compiled=True, stream_dtype=torch.bfloat16),
}


def bench_one(depth: int, B: int, dtype: torch.dtype, repeats: int, peak_tflops: float, paths=tuple(PATHS)):
    torch.manual_seed(0)
    vae, var = build_vae_var(device='cuda', **PRESETS[f'd{depth}'])
    var.eval()
    flops_per_img = sampling_flops(vae, var, cfg=True)['total']  # model FLOPs: transformer with CFG + decode
    labels = torch.arange(B, device='cuda') % 1000
    rows = []
    for name in paths:
        kw = PATHS[name]
        if kw.get('stream_dtype', dtype) != dtype:
            continue  # the bf16 stream under fp16 autocast would be a bf16 row in an fp16 table
        def run():
            with torch.inference_mode(), torch.autocast('cuda', dtype=dtype):
                sampling_engine(var).sample(B=B, label_B=labels, g_seed=0, cfg=1.5, top_k=900, top_p=0.96, **kw)

        row = dict(model=f'd{depth}', batch=B, dtype=str(dtype).split('.')[-1], path=name)
        try:
            run()  # compile/capture and allocator warm-up, untimed
            mem = peak_gib(run)
            sec = time_cuda(run, warmup=1, repeats=repeats)
            tflops = flops_per_img * B / sec / 1e12
            row.update(img_per_s=B / sec, ms_per_img=1000 * sec / B, sec_per_batch=sec, peak_gib=mem, tflops=tflops,
                       pct_peak=100 * tflops / peak_tflops if peak_tflops else None,
                       gflop_per_img=flops_per_img / 1e9)
        except torch.cuda.OutOfMemoryError:
            row.update(note='out of memory')  # a row, not a crash: the other paths and configurations still run
        release_cuda_graphs(var)  # each path's graphs go before the next path's peak is measured
        torch.cuda.empty_cache()
        rows.append(row)
    release_sampling_caches(var)
    torch._dynamo.reset()  # compiled code holds references to this model's parameters
    ref = next((r for r in rows if r['path'] == 'reference' and 'img_per_s' in r), None)
    for row in rows:
        add_ratios(row, ref)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--depths', default='16')
    p.add_argument('--batches', default='64')
    p.add_argument('--dtypes', default='bf16')
    p.add_argument('--d36', action='store_true', help='also d36 at 512 px, at the batches of --d36_batches')
    p.add_argument('--d36_batches', default='32,64', help='d36 batches (512 px: the reference needs ~4x the memory)')
    p.add_argument('--paths', default=','.join(PATHS), help='of: ' + ', '.join(PATHS))
    p.add_argument('--peak_tflops', type=float, default=0.0,
                   help="the device's dense bf16 peak for the %% column "
                        "(default: from benchmarks.analytic.flops by GPU name)")
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--tf32', type=int, default=1)
    p.add_argument('--json', default='bench_sample.json')
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit('bench_sample needs a CUDA GPU')
    set_tf32(bool(args.tf32))
    peak = args.peak_tflops or device_peak_tflops(torch.cuda.get_device_name())
    rows = []
    configs = [(int(d), int(b), DTYPES[t]) for d in args.depths.split(',') if d for b in args.batches.split(',')
               for t in args.dtypes.split(',')]  # --depths '' with --d36: d36 alone
    if args.d36:
        configs += [(36, int(b), DTYPES[t]) for b in args.d36_batches.split(',') for t in args.dtypes.split(',')]
    paths = [p for p in args.paths.split(',') if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise SystemExit(f'unknown --paths {sorted(unknown)}; known: {", ".join(PATHS)}')
    for depth, B, dtype in configs:
        new = bench_one(depth, B, dtype, args.repeats, peak, paths)
        rows += new
        gc.collect()  # the models of bench_one are garbage now
        torch.cuda.empty_cache()
        print_table('VAR sampling (cfg 1.5, top-k 900, top-p 0.96, VQVAE decode included)', new, COLUMNS)
        # after every configuration: a cut run keeps its rows
        write_json(args.json, {'benchmark': 'sample', 'peak_tflops': peak, 'rows': rows})
    print_table('VAR sampling, all configurations', rows, COLUMNS)


if __name__ == '__main__':
    main()
