"""`make scaling`: the scaling laws of VAR (arXiv 2404.02905, section 4) at toy scale, offline, on 2 CPU cores.

    python -m demo.scaling_demo                  # about 25 minutes on 2 CPU cores (after the tokenizer)
    python -m demo.scaling_demo --prepare_only   # only the data, the tokenizer and the token ids

Steps: (1) the offline demo's Fashion-MNIST ImageFolder and its x4 tokenizer (demo/run_demo.py's CPU preset, reused
from demo_output/ when there, else made the same way); (2) the token ids once with pretokenize.py: with mid_reso 1
and no flip the crop is the whole 32x32 image, so `train.py --pretok` trains on exactly the ids that the on-the-fly
encode gives, without encoding every step; (3) `scaling.py sweep`: a family of depths, width 32*depth (a CPU-sized
version of the recipe's 64*depth), the same data, batch and epochs for all; (4) `scaling.py fit` and `plot` into
docs/ (docs/scaling_fit/ and docs/img/scaling.png). A second run reuses every finished step and resumes the rest.
"""
import argparse
import os
import sys
import time
from typing import Any, Dict, List

from demo import fashion_mnist as fm
from demo.run_demo import PRESETS, ROOT, flags, log, run_script

DEMO = PRESETS['cpu']
# chosen from a timing on 2 CPU cores (docs/scaling.md): 6 sizes, 2 epochs of the 10,000 images, about 22 minutes
SWEEP: Dict[str, Any] = dict(depths='1,2,3,4,5,6', width_per_depth=32,
                             var=dict(bs=16, ep=2, tblr=1.6e-2, alng=1e-3, wpe=0.1, wp=0.2, fp16=0, workers=0))


def prepare(out: str, seed: int, no_install: bool) -> Dict[str, str]:
    """The demo's data and tokenizer (reused when there) and the token ids; returns their paths."""
    paths = {'data': os.path.join(out, 'fashion_mnist'), 'tokenizer': os.path.join(out, 'tokenizer'),
             'tokens': os.path.join(out, 'fashion_mnist_tokens')}
    raw = fm.locate_raw_files(os.path.join(out, 'cache'), install=not no_install, log=log)
    counts = fm.write_image_folder(paths['data'], raw, {'train': DEMO['data']['train_per_class'],
                                                        'val': DEMO['data']['val_per_class']}, log=log)
    log(f'[data] {paths["data"]}: {counts}')
    # the offline demo's tokenizer flags (demo/run_demo.py, step 3): train_vae.py does nothing once it is finished
    run_script('train_vae.py', flags(dict(data_path=paths['data'], out_dir=paths['tokenizer'], seed=seed,
                                          mid_reso=1.0, tb_every_iters=50, ckpt_every_iters=100, **DEMO['vae'])))
    paths['vae_ckpt'] = os.path.join(paths['tokenizer'], 'vae-ckpt-last.pth')
    run_script('pretokenize.py', flags(dict(data_path=paths['data'], out=paths['tokens'], vae_ckpt=paths['vae_ckpt'],
                                            pn=DEMO['var']['pn'], patch_size=DEMO['var']['patch_size'], mid_reso=1.0,
                                            hflip=0, workers=0, bs=250)))
    return paths


def sweep_flags(paths: Dict[str, str], seed: int, ep: int) -> List[str]:
    """train.py's flags, the same for every member."""
    var = dict(SWEEP['var'], ep=ep)
    return flags(dict(pretok=paths['tokens'], vae_ckpt=paths['vae_ckpt'], pn=DEMO['var']['pn'],
                      patch_size=DEMO['var']['patch_size'], mid_reso=1.0, seed=seed, tb_every_iters=100,
                      val_every_ep=1, ckpt_every_iters=200, **var))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default=os.path.join(ROOT, 'demo_output'), help='the offline demo\'s folder (reused)')
    p.add_argument('--docs', default=os.path.join(ROOT, 'docs'), help='where the fitted tables and figure go')
    p.add_argument('--depths', default=SWEEP['depths'], help='the family\'s depths')
    p.add_argument('--width_per_depth', type=int, default=SWEEP['width_per_depth'])
    p.add_argument('--ep', type=int, default=SWEEP['var']['ep'], help='epochs of every member')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--prepare_only', action='store_true', help='stop after the data, tokenizer and token ids')
    p.add_argument('--no_install', action='store_true', help='never run apt-get for the data')
    args = p.parse_args(argv)
    import scaling
    t0 = time.time()
    out = os.path.abspath(args.out)
    paths = prepare(out, args.seed, args.no_install)
    log(f'[scaling demo] data, tokenizer and token ids ready in {time.time() - t0:.0f}s')
    if args.prepare_only:
        return 0
    sweep_dir = os.path.join(out, 'scaling')
    t1 = time.time()
    code = scaling.main(['sweep', '--out', sweep_dir, '--depths', args.depths, '--width_per_depth',
                         str(args.width_per_depth), *sweep_flags(paths, args.seed, args.ep)])
    if code != 0:
        return code
    log(f'[scaling demo] sweep: {time.time() - t1:.0f}s')
    report = os.path.join(args.docs, 'scaling_fit')
    code = scaling.main(['fit', '--out', sweep_dir, '--report', report])
    if code == 0:
        os.makedirs(os.path.join(args.docs, 'img'), exist_ok=True)
        code = scaling.main(['plot', '--out', sweep_dir, '--report', report,
                             '--fig', os.path.join(args.docs, 'img', 'scaling')])
    log(f'[scaling demo] done in {time.time() - t0:.0f}s (sweep {time.time() - t1:.0f}s)')
    return code


if __name__ == '__main__':
    sys.exit(main())
