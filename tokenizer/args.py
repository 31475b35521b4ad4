# Command line of the VQVAE tokenizer trainer of VAR (arXiv 2404.02905, section 3.2); the official code ships none.
"""The flags of train_vae.py and the values derived from them.

The flags shared with train.py keep its names and meanings (`--data_path --bs --ac --ep --tblr --twd --tclip --wp --wp0
--wpe --sche --fp16 --tf32 --seed --pn --hflip --workers --mid_reso ...`, built with the same helpers); the
tokenizer's own flags are below. `derive_vae(args, world_size)` is the one pure place for the derived values.
"""
import argparse
import dataclasses
from typing import Optional, Sequence, Tuple

from models.vqvae import downsample_factor
from utils.arg_util import (REPO_ROOT, RunDerived, add_data_flags, add_precision_flags, add_run_flags,
                            add_schedule_flags, bool_flag, derive_run, flag, parse_int_tuple, parse_tolerant)

OFFICIAL_CH_MULT = '1_1_2_2_4'


def build_vae_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Train the multi-scale VQVAE tokenizer of VAR on an ImageNet-style folder.',
                                allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    add_data_flags(p, exp_name='vae')

    m = p.add_argument_group('model (ignored with --vae_init, whose file sets the architecture)')
    flag(m, ['--vae_ch'], type=int, default=160, help='base width of encoder and decoder (a multiple of 32)')
    flag(m, ['--vae_ch_mult'], default=OFFICIAL_CH_MULT,
         help="width multipliers per level; n levels downsample by 2^(n-1) (official 1_1_2_2_4: x16)")
    flag(m, ['--vocab'], type=int, default=4096, help='codebook size V (shared by all scales)')
    flag(m, ['--cvae'], type=int, default=32, help='code width Cvae')
    flag(m, ['--pn', '--patch_nums'], dest='pn', default='256',
         help="scales: a preset '256', '512', '1024' or sides joined by '_'; the image size is downsample*last")
    flag(m, ['--share_qresi'], type=int, default=4, help='Phi convolutions: 0 one per scale, 1 shared, n>=2 n shared')
    flag(m, ['--beta'], type=float, default=0.25, help='commitment weight of the quantiser loss')
    flag(m, ['--vae_init'], default='',
         help='start from these weights (e.g. the official vae_ch160v4096z32.pth, or a tokenizer checkpoint)')

    loss = p.add_argument_group('losses')
    flag(loss, ['--l1'], type=float, default=0.0, help='weight of the L1 reconstruction loss')
    flag(loss, ['--l2'], type=float, default=1.0, help='weight of the L2 (MSE) reconstruction loss (paper)')
    flag(loss, ['--vq'], type=float, default=1.0, help='weight of the quantiser loss (codebook + beta*commitment)')
    flag(loss, ['--lp'], type=float, default=1.0, help='weight of the LPIPS perceptual loss (0: off, no VGG needed)')
    flag(loss, ['--lpips_vgg'], default='auto',
         help="torchvision VGG16 ImageNet weights (.pth); 'auto': the torch hub cache, else torchvision's download "
              "(once, into that cache)")
    flag(loss, ['--lpips_lin'], default='auto',
         help="LPIPS per-channel weights. 'auto': the paper's learned VGG weights that the lpips package ships "
              "(lpips/weights/v0.1/vgg.pth; pip install -r requirements.txt), the calibrated LPIPS; PATH: a file with "
              "the same keys (linK.model.1.weight); 'none' (or empty, the default before 'auto'): weight 1 per "
              "channel, the paper's uncalibrated 'baseline' (a cosine distance, larger than learned LPIPS)")
    flag(loss, ['--dw', '--disc_weight'], dest='dw', type=float, default=0.5,
         help='weight of the adversarial loss (0: no discriminator)')
    flag(loss, ['--disc_start'], type=float, default=-1.0,
         help='epoch (may be fractional) at which the discriminator and the GAN loss start; <0: ep/5')
    bool_flag(loss, ['--adaptive'], True, "scale the GAN loss by VQGAN's adaptive weight")
    flag(loss, ['--d_loss'], default='hinge', choices=['hinge', 'vanilla'], help='discriminator loss')
    flag(loss, ['--disc_ch'], type=int, default=64, help='discriminator width')
    flag(loss, ['--disc_layers'], type=int, default=3, help='discriminator stride-2 layers')
    flag(loss, ['--dblr'], type=float, default=0.0, help='discriminator base lr (0: = --tblr)')

    q = p.add_argument_group('codebook upkeep')
    flag(q, ['--vq_reinit'], type=int, default=0,
         help='every N iterations, re-initialise dead codes from current latents (0: off)')
    flag(q, ['--vq_reinit_until'], type=float, default=0.5,
         help='stop re-initialising after this fraction of the training')
    flag(q, ['--vq_dead'], type=float, default=0.0,
         help="a code is dead when its EMA hits summed over scales fall below this (0: the usage margin)")

    o = p.add_argument_group('optimisation')
    add_schedule_flags(o, bs=256, ep=100, tblr=2e-4, twd=0.0, wpe=0.1, sche='cos')
    flag(o, ['--abeta1'], type=float, default=0.5, help='AdamW beta1 (GAN-style 0.5)')
    flag(o, ['--abeta2'], type=float, default=0.9, help='AdamW beta2')
    add_precision_flags(o)

    r = add_run_flags(p, out_dir='<repo>/local_output/vae', last_name='vae-ckpt-last.pth', val_every_ep=1,
                      tb_every_iters=100)
    flag(r, ['--val_max'], type=int, default=0, help='validate on at most this many images (0: all)')
    flag(r, ['--n_vis'], type=int, default=8, help='fixed validation images shown reconstructed in TensorBoard')
    return p


def parse_vae_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse train_vae.py's command line; unknown flags are tolerated with a warning (as train.py)."""
    return parse_tolerant(build_vae_parser(), argv)


@dataclasses.dataclass(frozen=True)
class VAEDerived(RunDerived):
    """Values computed from train_vae.py's arguments. See `derive_vae`."""
    dlr: float              # peak lr of the discriminator (same scaling as the VQVAE's tlr)
    disc_start: float       # epoch at which the discriminator starts
    ch_mult: Tuple[int, ...]
    downsample: int
    image_size: int         # downsample * patch_nums[-1]


def derive_vae(args: argparse.Namespace, world_size: int) -> VAEDerived:
    """Pure: every derived quantity of the tokenizer recipe. `args` is not modified."""
    run = derive_run(args, world_size, str(REPO_ROOT / 'local_output' / 'vae'),
                     lambda glb: f'tb-VQVAEch{args.vae_ch}m{args.vae_ch_mult}v{args.vocab}z{args.cvae}__pn{args.pn}'
                                 f'__b{glb}ep{args.ep}lr{args.tblr:g}')
    ch_mult = parse_int_tuple(args.vae_ch_mult)
    if not ch_mult:
        raise ValueError('--vae_ch_mult must list at least one multiplier, e.g. 1_2_4')
    if args.vae_ch % 32:
        raise ValueError(f'--vae_ch={args.vae_ch} must be a multiple of 32 (GroupNorm with 32 groups)')
    downsample = downsample_factor(ch_mult)
    scale = args.ac * run['glb_batch_size'] / 256
    return VAEDerived(
        **run,
        tlr=scale * args.tblr,
        dlr=scale * (args.dblr or args.tblr),
        disc_start=args.disc_start if args.disc_start >= 0 else args.ep / 5,
        ch_mult=ch_mult,
        downsample=downsample,
        image_size=downsample * run['patch_nums'][-1],
    )
