"""Where sampling time goes: transformer steps, filtering/sampling, decoding (CUDA events, one config).

    python -m benchmarks.profile_sample --depth 16 --batch 64
"""
import argparse
import time

import torch

from benchmarks.common import peak_gib, time_cuda
from models import PRESETS, build_vae_var
from models.basic_var import kv_caching
from models.engine import release_cuda_graphs, sampling_engine, scale_step
from models.helpers import filter_top_k_top_p_, filter_top_k_top_p_partial_
from utils.runtime import set_tf32


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument('--depth', type=int, default=16)
    p.add_argument('--batch', type=int, default=64)
    args = p.parse_args(argv)
    set_tf32(True)
    B, dt = args.batch, torch.bfloat16
    vae, var = build_vae_var(device='cuda', **PRESETS[f'd{args.depth}'])
    var.eval()
    C, V = var.C, var.V
    cond = var.class_emb(torch.arange(2 * B, device='cuda') % 1001)

    def transformer(prealloc):
        def run():
            kv_caching(var.blocks, True, var.L if prealloc else 0)
            for pn in var.patch_nums:
                scale_step(var, torch.randn(2 * B, pn * pn, C, device='cuda'), cond)
            kv_caching(var.blocks, False)
        return run

    def compiled_transformer():
        step = sampling_engine(var).compiled_step()

        def run():
            kv_caching(var.blocks, True, var.L)
            for pn in var.patch_nums:
                step(var, torch.randn(2 * B, pn * pn, C, device='cuda'), cond)
            kv_caching(var.blocks, False)
        return run

    def full(**kw):
        labels = torch.arange(B, device='cuda')
        return lambda: var.autoregressive_infer_cfg(B=B, label_B=labels, g_seed=0, cfg=1.5, top_k=900, top_p=0.96, **kw)

    with torch.inference_mode(), torch.autocast('cuda', dtype=dt):
        for name, fn in [('transformer concat', transformer(False)), ('transformer prealloc', transformer(True))]:
            print(f'{name:40s} {time_cuda(fn, 1, 5) * 1000:8.1f} ms')
        t0 = time.time()
        fn = compiled_transformer()
        fn()
        print(f'{"(compile time)":40s} {(time.time() - t0):8.1f} s')
        print(f'{"transformer prealloc compiled":40s} {time_cuda(fn, 1, 5) * 1000:8.1f} ms')
        fast = dict(kv_cache='prealloc', partial_sort=True)
        for name, kw in [('full reference', {}), ('full prealloc+partial', fast),
                         ('full +graph', dict(fast, cuda_graph=True)),
                         ('full +compiled', dict(fast, compiled=True)),
                         ('full +compiled+graph', dict(fast, compiled=True, cuda_graph=True))]:
            fn = full(**kw)
            fn()
            mem = peak_gib(fn)
            print(f'{name:40s} {time_cuda(fn, 1, 5) * 1000:8.1f} ms  peak {mem:.1f} GiB')
        release_cuda_graphs(var)
        logits = [torch.randn(B, pn * pn, V, device='cuda') * 3 for pn in var.patch_nums]
        g = torch.Generator(device='cuda').manual_seed(0)
        for name, f in [('filter full-sort', filter_top_k_top_p_), ('filter partial', filter_top_k_top_p_partial_)]:
            def run(f=f):
                for lg in logits:
                    f(lg.clone(), 900, 0.96)
            print(f'{name:40s} {time_cuda(run, 1, 5) * 1000:8.1f} ms')

        def topk_only():
            for lg in logits:
                lg.topk(900, dim=-1, sorted=False)
        print(f'{"topk(900) only":40s} {time_cuda(topk_only, 1, 5) * 1000:8.1f} ms')

        def sort_only():
            for lg in logits:
                lg.sort(dim=-1, descending=True)
        print(f'{"sort only":40s} {time_cuda(sort_only, 1, 5) * 1000:8.1f} ms')

        def multinomial():
            for lg in logits:
                torch.multinomial(lg.softmax(-1).view(-1, V), 1, True, generator=g)
        print(f'{"softmax+multinomial":40s} {time_cuda(multinomial, 1, 5) * 1000:8.1f} ms')

        f_hat = torch.randn(B, 32, 16, 16, device='cuda')
        print(f'{"decode NCHW":40s} {time_cuda(lambda: vae.fhat_to_img(f_hat), 1, 5) * 1000:8.1f} ms')
        dec = torch.compile(vae.decoder)
        t0 = time.time()
        dec(f_hat)
        print(f'{"(decoder compile time)":40s} {(time.time() - t0):8.1f} s')
        print(f'{"decode compiled NCHW":40s} {time_cuda(lambda: dec(vae.post_quant_conv(f_hat)), 1, 5) * 1000:8.1f} ms')
        vae.to(memory_format=torch.channels_last)
        print(f'{"decode channels_last":40s} {time_cuda(lambda: vae.fhat_to_img(f_hat), 1, 5) * 1000:8.1f} ms')
        dec_cl = torch.compile(vae.decoder)  # a candidate for the fast path: NHWC feeds the tensor cores directly
        f_cl = f_hat.contiguous(memory_format=torch.channels_last)
        dec_cl(vae.post_quant_conv(f_cl))
        sec = time_cuda(lambda: dec_cl(vae.post_quant_conv(f_cl)), 1, 5)
        print(f'{"decode compiled channels_last":40s} {sec * 1000:8.1f} ms')

    vae.to(memory_format=torch.contiguous_format)
    print(f'{"decode NCHW fp32 (no autocast)":40s} {time_cuda(lambda: vae.fhat_to_img(f_hat), 1, 3) * 1000:8.1f} ms')


if __name__ == '__main__':
    main()
