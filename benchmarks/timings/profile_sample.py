"""Where sampling time goes: transformer steps, filtering/sampling, decoding, each candidate of the fast path
(CUDA events, one config, bf16). Prints one line per candidate and writes them all to --json.

    python -m benchmarks.timings.profile_sample --depth 16 --batch 64

Candidates: the transformer steps with the KV cache grown or preallocated, compiled or not, with the official float32
residual stream or the bf16 one (models/lowp.py); the whole sampling call per switch; top-k/top-p filtering; the
decoder under autocast (NCHW, compiled) and as the bf16 copy (NCHW or channels-last, eager or compiled). The
bf16 decoder rows choose `models.engine.LOWP_DECODER_CHANNELS_LAST`.
"""
import argparse
import contextlib
import time

import torch

from benchmarks.timings.common import peak_gib, time_cuda, write_json
from models import PRESETS, build_vae_var
from models.basic_var import kv_caching
from models.engine import release_sampling_caches, sampling_engine
from models.var import scale_step
from models.helpers import filter_top_k_top_p_, filter_top_k_top_p_partial_
from models.lowp import DecoderCopy, StepCopy
from utils.runtime import set_tf32

BF16 = torch.bfloat16


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--depth', type=int, default=16)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--json', default='profile_sample.json')
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit('profile_sample needs a CUDA GPU')
    set_tf32(True)
    B = args.batch
    vae, var = build_vae_var(device='cuda', **PRESETS[f'd{args.depth}'])
    var.eval()
    C, V = var.C, var.V
    cond = var.class_emb(torch.arange(2 * B, device='cuda') % 1001)
    xs = [torch.randn(2 * B, pn * pn, C, device='cuda') for pn in var.patch_nums]
    rows = []

    def report(name, sec=None, **extra):
        row = dict(name=name, ms=None if sec is None else 1000 * sec, **extra)
        rows.append(row)
        mem = f"  peak {extra['peak_gib']:.1f} GiB" if 'peak_gib' in extra else ''
        print(f'{name:44s} ' + (f'{row["ms"]:8.1f} ms' if sec is not None else f'{extra["compile_s"]:8.1f} s') + mem,
              flush=True)
        write_json(args.json, {'benchmark': 'profile_sample', 'depth': args.depth, 'batch': B, 'rows': rows})

    def steps(model, step, prealloc=True, low=False):
        def run():
            kv_caching(model.blocks, True, model.L if prealloc else 0)
            # the bf16 copy runs with autocast off, as in the engine; the model under the caller's bf16 autocast
            with torch.autocast('cuda', enabled=False) if low else contextlib.nullcontext():
                for x in xs:
                    step(model, x.to(BF16) if low else x, cond.to(BF16) if low else cond)
            kv_caching(model.blocks, False)
        return run

    def timed_first(name, fn):
        t0 = time.time()
        fn()
        torch.cuda.synchronize()
        report(f'({name} first call)', compile_s=time.time() - t0)
        report(name, time_cuda(fn, 1, 5))

    with torch.inference_mode(), torch.autocast('cuda', dtype=BF16):
        copy = StepCopy(var, BF16)
        report('transformer concat (reference)', time_cuda(steps(var, scale_step, prealloc=False), 1, 5))
        report('transformer prealloc', time_cuda(steps(var, scale_step), 1, 5))
        report('transformer prealloc bf16 stream', time_cuda(steps(copy, scale_step, low=True), 1, 5))
        compiled = sampling_engine(var).compiled_step()
        timed_first('transformer prealloc compiled', steps(var, compiled))
        timed_first('transformer prealloc compiled bf16 stream', steps(copy, compiled, low=True))
        del copy

        labels = torch.arange(B, device='cuda') % 1000
        fast = dict(kv_cache='prealloc', partial_sort=True)
        for name, kw in [('full reference', dict(kv_cache='concat')), ('full prealloc+partial', fast),
                         ('full +graph', dict(fast, cuda_graph=True)),
                         ('full +bf16 stream', dict(fast, stream_dtype=BF16)),
                         ('full +bf16 stream+graph', dict(fast, cuda_graph=True, stream_dtype=BF16)),
                         ('full +loop graph', dict(fast, cuda_graph='loop')),
                         ('full +bf16 stream+loop graph', dict(fast, cuda_graph='loop', stream_dtype=BF16))]:
            # (the compiled whole paths are bench_sample's fast and fast_bf16 rows)
            def full(kw=kw):
                sampling_engine(var).sample(B=B, label_B=labels, g_seed=0, cfg=1.5, top_k=900, top_p=0.96, **kw)
            full()
            mem = peak_gib(full)
            report(name, time_cuda(full, 1, 5), peak_gib=mem)
            release_sampling_caches(var)

        logits = [torch.randn(B, pn * pn, V, device='cuda') * 3 for pn in var.patch_nums]
        g = torch.Generator(device='cuda').manual_seed(0)
        for name, f in [('filter full-sort', filter_top_k_top_p_), ('filter partial', filter_top_k_top_p_partial_)]:
            def run(f=f):
                for lg in logits:
                    f(lg.clone(), 900, 0.96)
            report(name, time_cuda(run, 1, 5))

        def multinomial():
            for lg in logits:
                torch.multinomial(lg.softmax(-1).view(-1, V), 1, True, generator=g)
        report('softmax+multinomial', time_cuda(multinomial, 1, 5))

        f_hat = torch.randn(B, var.Cvae, var.patch_nums[-1], var.patch_nums[-1], device='cuda')
        report('decode autocast NCHW (reference)', time_cuda(lambda: vae.fhat_to_img(f_hat), 1, 5))
        timed_first('decode autocast NCHW compiled', lambda: vae.fhat_to_img(f_hat, compiled=True))
        for channels_last in (False, True):
            fmt = 'channels_last' if channels_last else 'NCHW'
            dec = DecoderCopy(vae, BF16, channels_last=channels_last)
            report(f'decode bf16 copy {fmt}', time_cuda(lambda: dec(f_hat), 1, 5))
            dec_c = torch.compile(dec)
            timed_first(f'decode bf16 copy {fmt} compiled', lambda: dec_c(f_hat))
            torch._dynamo.reset()  # the compiled copy goes with its cache entry
    report('decode NCHW fp32 (no autocast)', time_cuda(lambda: vae.fhat_to_img(f_hat), 1, 3))


if __name__ == '__main__':
    main()
