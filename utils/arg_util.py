# Command line of the VAR training recipe (arXiv 2404.02905): the official flag names and defaults, plus our extras.
"""Arguments of train.py.

`build_parser()` declares the official flags with their official defaults (each with a readable long alias) and the
extras of this re-implementation. `parse_args()` returns an argparse.Namespace that holds the user's inputs only.
`derive(args, world_size)` is the single, pure place where everything computed from them lives (per-GPU batch, scaled
lr, warm-up, patch_nums from the --pn presets, ...); it returns a frozen `Derived`.
"""
import argparse
import dataclasses
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from models.presets import PATCH_NUMS as PN_PRESETS  # --pn 256/512/1024: the models' one registry of scales
from utils.runtime import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


def str2bool(v: str | bool) -> bool:
    """Explicit booleans: 1/0, true/false, yes/no, on/off (any case)."""
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ('1', 'true', 't', 'yes', 'y', 'on'):
        return True
    if s in ('0', 'false', 'f', 'no', 'n', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected a boolean (0/1/true/false), got {v!r}')


def positive_int(s: str) -> int:
    """An argparse type: an integer >= 1 (an interval; the last epoch is always validated)."""
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {v}')
    return v


def positive_float(s: str) -> float:
    """An argparse type: a number > 0."""
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {s}')
    return v


def parse_int_tuple(s: str) -> Tuple[int, ...]:
    """'1_2_3', '1-2-3', '1,2,3' or '1 2 3' -> (1, 2, 3)."""
    try:
        return tuple(int(x) for x in re.split(r'[_\-,\s]+', str(s).strip()) if x != '')
    except ValueError:
        raise ValueError(f'expected integers separated by "_", e.g. 1_2_3_4, got {s!r}') from None


def parse_patch_nums(pn: str) -> Tuple[int, ...]:
    """--pn: a preset ('256', '512', '1024') or scale sides separated by '_' (or '-')."""
    pn = str(pn).strip()
    return PN_PRESETS[pn] if pn in PN_PRESETS else parse_int_tuple(pn)


def check_patch_size(patch_size: int, downsample: int, vae_path: str) -> None:
    """--patch_size must be the tokenizer's downsampling factor (`VQVAE.downsample`); raises ConfigError."""
    if downsample != patch_size:
        raise ConfigError(f'the tokenizer {vae_path} downsamples by {downsample} but --patch_size={patch_size}')


def flag(group, names: Sequence[str], **kw) -> None:
    group.add_argument(*names, **kw)


def bool_flag(group, names: Sequence[str], default: bool, help: str) -> None:
    # `--hflip` alone means true; `--hflip=0` and `--hflip false` are explicit.
    group.add_argument(*names, type=str2bool, nargs='?', const=True, default=default, help=help)


def add_schedule_flags(o, *, bs: int, ep: int, tblr: float, twd: float, wpe: float, sche: str) -> None:
    """Batch, epochs, lr/wd schedule and clipping flags shared by train.py and train_vae.py (official names)."""
    flag(o, ['--bs', '--global_batch_size'], dest='bs', type=int, default=bs, help='global batch size (all ranks)')
    flag(o, ['--ac', '--grad_accum'], dest='ac', type=int, default=1, help='gradient accumulation steps')
    flag(o, ['--ep', '--epochs'], dest='ep', type=int, default=ep, help='epochs')
    flag(o, ['--tblr', '--base_lr'], dest='tblr', type=float, default=tblr, help='base lr for a batch of 256')
    flag(o, ['--twd', '--weight_decay'], dest='twd', type=float, default=twd, help='weight decay (none on 1-d/bias)')
    flag(o, ['--twde', '--weight_decay_end'], dest='twde', type=float, default=0.0, help='final wd (0: = twd)')
    flag(o, ['--tclip', '--grad_clip'], dest='tclip', type=float, default=2.0, help='grad-norm clip (<=0: off)')
    flag(o, ['--wp', '--warmup_epochs'], dest='wp', type=float, default=0.0, help='warm-up epochs (0: ep/50)')
    flag(o, ['--wp0', '--warmup_start_ratio'], dest='wp0', type=float, default=0.005, help='lr ratio at it 0')
    flag(o, ['--wpe', '--final_lr_ratio'], dest='wpe', type=float, default=wpe, help='lr ratio at the end')
    flag(o, ['--sche', '--lr_schedule'], dest='sche', default=sche,
         help='cos, lin, lin0, lin00, linX, exp (train.py forces lin{pg} with --pg)')


def add_precision_flags(o) -> None:
    bool_flag(o, ['--afuse', '--fused_adamw'], True, 'fused AdamW')
    flag(o, ['--fp16', '--precision'], dest='fp16', type=int, default=0, choices=[0, 1, 2],
         help='0 fp32, 1 fp16 autocast + GradScaler, 2 bf16 autocast')
    bool_flag(o, ['--tf32'], True, 'allow TF32 matmuls and convolutions')
    flag(o, ['--max_nonfinite'], type=int, default=100,
         help='stop after this many consecutive steps skipped for a non-finite loss or gradient')


def add_data_flags(p, *, exp_name: str):
    """The data flags of both trainers (where the images are, how they are read); returns the group."""
    d = p.add_argument_group('data')
    flag(d, ['--data_path'], default='/path/to/imagenet',
         help='class folders (train/ and val/, one sub-folder per class) or parquet shards (docs/data.md)')
    flag(d, ['--exp_name'], default=exp_name, help='experiment name (free text)')
    bool_flag(d, ['--hflip'], False, 'random horizontal flip (applied first)')
    flag(d, ['--workers', '--num_workers'], dest='workers', type=int, default=0,
         help='data-loading worker processes per rank; 0 loads in the main process')
    flag(d, ['--mid_reso'], type=float, default=1.125, help='resize the shorter edge to round(mid_reso*reso) first')
    return d


def add_run_flags(p, *, out_dir: str, last_name: str, val_every_ep: int, tb_every_iters: int):
    """Seeds, output folder, checkpoint interval, validation and logging cadence; returns the group."""
    r = p.add_argument_group('run')
    flag(r, ['--seed'], type=int, default=None, help='seed (per rank: seed*world_size+rank); None: non-deterministic')
    flag(r, ['--same_seed_for_all_ranks'], type=int, default=0, help='added to the sampler seed')
    flag(r, ['--local_out_dir_path', '--out_dir'], dest='local_out_dir_path', default=None,
         help=f'checkpoints, log.txt, TensorBoard (default: {out_dir})')
    flag(r, ['--ckpt_every_iters'], type=int, default=0, help=f'also save {last_name} every N iterations (0: off)')
    flag(r, ['--val_every_ep'], type=positive_int, default=val_every_ep,
         help='validate (and save best) every N epochs and at the end')
    flag(r, ['--tb_every_iters'], type=positive_int, default=tb_every_iters,
         help='iteration-wise TensorBoard scalars every N iterations')
    bool_flag(r, ['--log_steps'], False, 'append every step loss to steps.jsonl (reproducibility checks)')
    flag(r, ['--device'], default='', help="'' picks cuda:LOCAL_RANK when available, else cpu")
    flag(r, ['--dist_timeout'], type=positive_float, default=30.0,
         help='minutes a process of a multi-process job waits in a collective for the others before the run stops '
              'with an error (a node that died, hung or was stopped); keep it above the longest checkpoint save')
    return r


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Train VAR (next-scale prediction) on an ImageNet-style folder.',
                                allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    d = add_data_flags(p, exp_name='text')
    flag(d, ['--patch_size'], type=int, default=16, help='image pixels per token side (the VAE downsampling)')
    flag(d, ['--pretok'], default='',
         help='read a pre-tokenised dataset written by pretokenize.py instead of the images of --data_path '
              '(fixed crops; faster; not the official augmentation)')

    m = p.add_argument_group('model')
    flag(m, ['--depth'], type=int, default=16, help='VAR depth; width = 64*depth, heads = depth')
    flag(m, ['--width'], type=int, default=0, help='override the width (0: official 64*depth; for tiny tests)')
    flag(m, ['--pn', '--patch_nums'], dest='pn', default='1_2_3_4_5_6_8_10_13_16',
         help="scales: a preset '256', '512', '1024' or sides joined by '_'")
    bool_flag(m, ['--saln', '--shared_aln'], False, 'shared AdaLN (d36-s)')
    bool_flag(m, ['--anorm', '--attn_l2_norm'], True, 'L2-normalised attention')
    bool_flag(m, ['--fuse', '--fused_kernels'], True, 'flash-attn / xformers / fused MLP when available')
    flag(m, ['--ini', '--init_std'], dest='ini', type=float, default=-1.0, help='init std (<0: sqrt(1/(3*width)))')
    flag(m, ['--hd', '--init_head'], dest='hd', type=float, default=0.02, help='head weight multiplier')
    flag(m, ['--aln', '--init_adaln'], dest='aln', type=float, default=0.5, help='AdaLN scale/shift multiplier')
    flag(m, ['--alng', '--init_adaln_gamma'], dest='alng', type=float, default=1e-5, help='AdaLN gamma multiplier')
    flag(m, ['--vfast', '--vae_compile'], dest='vfast', type=int, default=0,
         help='torch.compile the VAE: 0 off, 1 reduce-overhead, 2 max-autotune, 3 default')
    flag(m, ['--tfast', '--var_compile'], dest='tfast', type=int, default=0, help='torch.compile VAR (as --vfast)')
    bool_flag(m, ['--flex', '--flex_attn'], False,
              'block-causal attention through a FlexAttention block mask instead of the dense additive mask (CUDA)')
    bool_flag(m, ['--vbf16', '--vae_encode_bf16'], False,
              'the tokenizer encode on a bf16 copy of the encoder (models/lowp.py; faster on a GPU, may change a small '
              'share of token ids: see benchmarks/timings/bench_encode.py)')

    s = p.add_argument_group('scale-out')
    bool_flag(s, ['--fsdp'], False,
              'shard VAR with FSDP2 per transformer block (weights, gradients, optimizer state) instead of DDP; '
              'sharded checkpoints (torch.distributed.checkpoint); needs torchrun')
    bool_flag(s, ['--act_ckpt', '--activation_checkpointing'], False,
              'recompute each transformer block in the backward pass instead of keeping its activations')

    t = p.add_argument_group('tokenizer')
    flag(t, ['--vae_ckpt'], default='',
         help='local VQVAE checkpoint: the official state dict or one carrying its config (its architecture is read '
              'from the file); empty: vae_ch160v4096z32.pth in the working directory (official), else from the '
              'Hugging Face Hub')

    o = p.add_argument_group('optimisation')
    add_schedule_flags(o, bs=768, ep=250, tblr=1e-4, twd=0.05, wpe=0.01, sche='lin0')
    flag(o, ['--tlr'], type=float, default=None, help='ignored: always recomputed as ac*tblr*bs/256 (official)')
    flag(o, ['--ls', '--label_smooth'], dest='ls', type=float, default=0.0, help='label smoothing')
    flag(o, ['--opt', '--optimizer'], dest='opt', default='adamw', choices=['adam', 'adamw'], help='both are AdamW')
    add_precision_flags(o)

    g = p.add_argument_group('progressive training')
    flag(g, ['--pg', '--progressive'], dest='pg', type=float, default=0.0, help='fraction of training that grows')
    flag(g, ['--pg0'], type=int, default=4, help='first progressive scale index')
    flag(g, ['--pgwp'], type=float, default=0.0, help='per-stage warm-up epochs (0: ep/300)')

    add_run_flags(p, out_dir='<repo>/local_output', last_name='ar-ckpt-last.pth', val_every_ep=10, tb_every_iters=500)
    return p


def parse_tolerant(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse a trainer's command line. Unknown flags are tolerated with a warning, as in the official code."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        warnings.warn(f'ignoring unknown arguments: {unknown}', stacklevel=3)
    args.unknown_args = unknown  # the run also writes them to its log
    return args


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse train.py's command line (unknown flags: a warning, as officially)."""
    return parse_tolerant(build_parser(), argv)


@dataclasses.dataclass(frozen=True)
class RunDerived:
    """What both trainers derive alike from their shared flags (see `derive_run`); `Derived` and
    `tokenizer.args.VAEDerived` add their own values."""
    world_size: int
    batch_size: int         # per rank and per iteration
    glb_batch_size: int     # batch_size * world_size (the official code writes it back into bs)
    tlr: float              # peak lr = ac * tblr * glb_batch_size / 256
    twde: float             # final weight decay
    wp: float               # warm-up epochs
    patch_nums: Tuple[int, ...]
    workers: int
    val_batch_size: int     # round(1.5 * batch_size)
    out_dir: str
    tb_dir_name: str


def derive_run(args: argparse.Namespace, world_size: int, default_out_dir: str,
               tb_name: Callable[[int], str]) -> Dict[str, Any]:
    """Pure: the `RunDerived` values but the peak lr (each recipe writes its own scaling), as keyword arguments.
    `tb_name(glb_batch_size)` names the TensorBoard folder (characters other than word, '-+,.' become '_')."""
    batch_size = round(args.bs / args.ac / world_size)
    if batch_size < 1:
        raise ValueError(f'--bs={args.bs} is too small for --ac={args.ac} and {world_size} processes')
    glb_batch_size = batch_size * world_size
    return dict(
        world_size=world_size,
        batch_size=batch_size,
        glb_batch_size=glb_batch_size,
        twde=args.twde or args.twd,
        wp=args.wp if args.wp != 0 else args.ep / 50,
        patch_nums=parse_patch_nums(args.pn),
        workers=min(max(0, args.workers), batch_size),
        val_batch_size=round(batch_size * 1.5),
        out_dir=args.local_out_dir_path or default_out_dir,
        tb_dir_name=re.sub(r'[^\w\-+,.]', '_', tb_name(glb_batch_size)),
    )


@dataclasses.dataclass(frozen=True)
class Derived(RunDerived):
    """Values computed from train.py's arguments (official names). See `derive`."""
    sche: str               # lr schedule name
    pgwp: float             # per-stage progressive warm-up epochs
    resos: Tuple[int, ...]  # patch_size * pn for each scale
    data_load_reso: int


def derive(args: argparse.Namespace, world_size: int) -> Derived:
    """Pure: every derived quantity of the official recipe. `args` is not modified."""
    opt = args.opt.lower().strip()
    run = derive_run(args, world_size, str(REPO_ROOT / 'local_output'),
                     lambda glb: f'tb-VARd{args.depth}__pn{args.pn}__b{glb}ep{args.ep}{opt[:4]}lr{args.tblr:g}'
                                 f'wd{args.twd:g}')
    resos = tuple(pn * args.patch_size for pn in run['patch_nums'])
    return Derived(
        **run,
        tlr=args.ac * args.tblr * run['glb_batch_size'] / 256,
        sche=f'lin{args.pg:g}' if args.pg > 0 else args.sche,
        pgwp=args.pgwp if args.pgwp != 0 else args.ep / 300,
        resos=resos,
        data_load_reso=max(resos),
    )
