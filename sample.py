# Implements the sampling protocol of VAR (arXiv 2404.02905), section 5: class-conditional samples with CFG, top-k and
# top-p, and the 50,000-image ImageNet export (50 per class, PNG + OpenAI .npz) behind its FID/IS numbers.
"""Sample images from VAR: a grid image, or the distributed FID export.

Grid (one image per listed class; repeat a class for more):
    python sample.py --depth 16 --classes 980,980,437,437,22,22,562,562 --cfg 4 --top_k 900 --top_p 0.95 --seed 0 \
        --out grid.png
FID export (official settings by default: cfg 1.5, top-k 900, top-p 0.96, more_smooth off, 50 images per class):
    torchrun --nproc_per_node=8 sample.py --mode fid --depth 16 --out samples/d16   # -> samples/d16/*.png + d16.npz

Models: `--depth D` downloads the released `var_dD.pth` and the VAE from the Hub (FoundationVision/var);
`--vae_ckpt/--var_ckpt` use local copies of those files; `--ckpt` loads a checkpoint written by this project's train.py.

Reproducibility: image k of class c is drawn with its own generator seeded from (seed, c, k) (`image_seed`), so the
output depends neither on the number of processes nor on which images share a batch, apart from floating-point
round-off between batch sizes or devices. The FID export hands out fixed chunks of `--bs` images, so the same `--bs`
on the same kind of device gives byte-identical files for any number of processes. It writes each PNG atomically,
skips the images already on disk, and keeps a `manifest.json` of its settings: a restart completes a killed run, and
a run with other settings refuses the folder.
"""
import argparse
import contextlib
import hashlib
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision.utils import make_grid
from tqdm import tqdm

import dist
import models
from image_batches import (ImageSetError, UnreadablePNG, evaluation_order, image_format, is_image_path,
                           iter_png_images, npz_image_shape, npz_tmp_path, save_image, save_png, write_npz_images)
from models.helpers import check_sampling_settings
from models.loading import HUB_REPO_ID, VAE_FILENAME
from rejection import load_classifier, sample_best_of

MANIFEST = 'manifest.json'
MANIFEST_VERSION = 1


def image_seed(seed: int, cls: int, index: int, candidate: int = 0) -> int:
    """The generator seed of one image: a 63-bit hash of (seed, class, index within the class, candidate)."""
    digest = hashlib.sha256(f'var-sample/{seed}/{cls}/{index}/{candidate}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') & (2 ** 63 - 1)


def png_name(cls: int, index: int) -> str:
    return f'{cls:04d}_{index:05d}.png'


def to_uint8_BHW3(img_B3HW: torch.Tensor) -> np.ndarray:
    """[0, 1] images -> uint8 HWC: x*255 in float32, truncated (the demo's rule; it multiplies in the tensor's own
    dtype, which under fp16 autocast moves ~4% of pixels by one level)."""
    return img_B3HW.float().permute(0, 2, 3, 1).mul(255).to(torch.uint8).cpu().numpy()


def autocast_context(fp16: int, device: torch.device):
    """--fp16 0: float32, 1: float16 autocast, 2: bfloat16 autocast (CUDA only; the CPU stays in float32)."""
    if fp16 == 0 or device.type != 'cuda':
        return contextlib.nullcontext()
    return torch.autocast('cuda', dtype=torch.float16 if fp16 == 1 else torch.bfloat16)


@torch.inference_mode()
def sample_uint8(var: models.VAR, labels: Sequence[int], seeds: Sequence[int], args: argparse.Namespace
                 ) -> np.ndarray:
    """One image per (label, seed) -> uint8 (B, H, W, 3)."""
    device = var.class_emb.weight.device
    label_B = torch.tensor(list(labels), dtype=torch.long, device=device)
    with autocast_context(args.fp16, device):
        fast = dict(partial_sort=True, compiled=True, cuda_graph=True) if args.fast and device.type == 'cuda' else {}
        img_B3HW = var.autoregressive_infer_cfg(len(labels), label_B, g_seed=list(seeds), cfg=args.cfg,
                                                top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth,
                                                **fast)
    return to_uint8_BHW3(img_B3HW)


def progress_bar(total: int) -> tqdm:
    """A bar over `total` images with an ETA, on the first process only."""
    return tqdm(total=total, unit='img', desc='sampling', disable=not dist.is_master(), file=sys.stdout)


def sample_items(var: models.VAR, items: Sequence[Tuple[int, int]], args: argparse.Namespace,
                 classifier: Optional[torch.nn.Module]) -> np.ndarray:
    """Images for (class, index) pairs -> uint8 (B, H, W, 3); the best of --rej_candidates with a classifier."""
    labels = [c for c, _ in items]
    if classifier is None:
        return sample_uint8(var, labels, [image_seed(args.seed, c, i) for c, i in items], args)

    def draw(candidate: int) -> np.ndarray:
        return sample_uint8(var, labels, [image_seed(args.seed, c, i, candidate) for c, i in items], args)
    return sample_best_of(draw, classifier, labels, args.rej_candidates)


# ------------------------------------------------------------------------------------------------------------ models
def file_sha256(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def load_models(args: argparse.Namespace, device: torch.device) -> Tuple[models.VQVAE, models.VAR]:
    """The VQVAE and VAR of --ckpt, of --vae_ckpt/--var_ckpt, or downloaded for --depth; eval mode."""
    try:
        if args.ckpt:
            vae, var = models.load_checkpoint_models(args.ckpt, device)
        else:
            vae, var = models.load_pretrained(args.depth, vae_path=args.vae_ckpt, var_path=args.var_ckpt,
                                              device=device, cache_dir=args.cache_dir,
                                              local_files_only=args.local_files_only)
    except Exception as e:  # a missing, truncated or foreign file: say which, not a stack of pickle internals
        what = args.ckpt or ' and '.join(p for p in (args.vae_ckpt, args.var_ckpt) if p) or f'the d{args.depth} model'
        raise SystemExit(f'error: cannot load {what}: {type(e).__name__}: {e}') from e
    return vae.eval(), var.eval()


def model_identity(args: argparse.Namespace) -> Dict[str, str]:
    """What the manifest records of the weights: file hashes for local files, the Hub file names otherwise."""
    if args.ckpt:
        return {'ckpt_sha256': file_sha256(args.ckpt)}
    ident = {'depth': str(args.depth)}
    for key, path, hub_name in (('vae', args.vae_ckpt, VAE_FILENAME), ('var', args.var_ckpt, f'var_d{args.depth}.pth')):
        ident[key] = f'sha256:{file_sha256(path)}' if path else f'hub:{HUB_REPO_ID}/{hub_name}'
    return ident


def image_size(var: models.VAR) -> int:
    return var.patch_nums[-1] * var.vae_proxy[0].downsample


def check_classes(classes: Sequence[int], num_classes: int) -> None:
    bad = sorted({c for c in classes if not 0 <= c < num_classes})
    if bad:
        raise SystemExit(f'error: class labels {bad} are out of range: this model has classes 0..{num_classes - 1}')


# --------------------------------------------------------------------------------------------------------------- grid
def run_grid(args: argparse.Namespace, var: models.VAR, classifier: Optional[torch.nn.Module]) -> None:
    """One image per listed class (the k-th repeat of a class is its image k), tiled --nrow per row into --out, in the
    format its extension names (PNG without one)."""
    seen: Dict[int, int] = {}
    items = []
    for c in args.classes:
        items.append((c, seen.get(c, 0)))
        seen[c] = seen.get(c, 0) + 1
    batches = []
    with progress_bar(len(items)) as bar:
        for s in range(0, len(items), args.bs):
            batches.append(sample_items(var, items[s:s + args.bs], args, classifier))
            bar.update(len(batches[-1]))
    imgs = np.concatenate(batches)
    grid_3HW = make_grid(torch.from_numpy(imgs).permute(0, 3, 1, 2), nrow=args.nrow, padding=2, pad_value=255)
    if os.path.exists(args.out):
        print(f'replacing {args.out}')
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_image(grid_3HW.permute(1, 2, 0).numpy(), args.out, image_format(args.out))
    print(f'wrote {args.out} ({len(items)} images)')


# --------------------------------------------------------------------------------------------------------- FID export
def fid_manifest(args: argparse.Namespace, var: models.VAR, classes: Sequence[int], device: torch.device) -> dict:
    """Every setting that changes the pixels (not --bs, the number of processes, or paths)."""
    return dict(
        version=MANIFEST_VERSION, model=model_identity(args), image_size=image_size(var),
        classes='all' if list(classes) == list(range(var.num_classes)) else list(classes), per_class=args.per_class,
        seed=args.seed, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth,
        fp16=args.fp16 if device.type == 'cuda' else 0, tf32=bool(args.tf32) if device.type == 'cuda' else False,
        fast=bool(args.fast) and device.type == 'cuda',
        device=device.type, to_uint8='x*255, truncated',
        rejection=None if args.classifier_ckpt is None else dict(
            arch=args.classifier_arch, sha256=file_sha256(args.classifier_ckpt), candidates=args.rej_candidates),
    )


def prepare_out_dir(out_dir: str, npz_path: str, manifest: dict, expected_pngs: set) -> None:
    """Create or reopen --out; raise ValueError when it holds anything from another configuration."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f'--out {out_dir} exists and is not a folder')
    path = os.path.join(out_dir, MANIFEST)
    names = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    if MANIFEST in names:
        with open(path) as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            details = '; '.join(f'{k}: {old.get(k)!r} on disk, {manifest.get(k)!r} now' for k in diff)
            raise ValueError(f'{out_dir} holds samples of another configuration ({details}). Use a new --out folder.')
    elif names:
        raise ValueError(f'{out_dir} is not empty and has no {MANIFEST}: it was not written by sample.py. '
                         f'Use a new --out folder.')
    elif os.path.exists(npz_path):
        raise ValueError(f'{npz_path} exists but {out_dir} is new: it belongs to another run. Move it or pass --npz.')
    stray = sorted(n for n in names if n.endswith('.png') and n not in expected_pngs)
    if stray:
        raise ValueError(f'{out_dir} holds images this configuration does not produce ({stray[:3]} ...)')
    for n in names:
        if '.tmp' in n:  # half-written files of a killed run
            os.remove(os.path.join(out_dir, n))
    if MANIFEST in names and os.path.exists(npz_tmp_path(npz_path)):  # a killed npz write of this run
        os.remove(npz_tmp_path(npz_path))
    os.makedirs(out_dir, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(manifest, f, indent=1)
    os.replace(path + '.tmp', path)


def _png_written(path: str) -> bool:
    # an empty file is what a machine crash (not a kill: writes are renamed into place) can leave: draw it again
    return os.path.exists(path) and os.path.getsize(path) > 0


def plan_chunks(items: List[Tuple[int, int]], bs: int, out_dir: str) -> Tuple[List[List[Tuple[int, int]]], int]:
    """Fixed chunks of `bs` consecutive items, keeping those with an image missing on disk; and the images on disk."""
    on_disk = {it for it in items if _png_written(os.path.join(out_dir, png_name(*it)))}
    chunks = [items[s:s + bs] for s in range(0, len(items), bs)]
    return [ch for ch in chunks if not on_disk.issuperset(ch)], len(on_disk)


def run_fid(args: argparse.Namespace, var: models.VAR, classifier: Optional[torch.nn.Module],
            device: torch.device) -> None:
    classes = args.classes if args.classes is not None else list(range(var.num_classes))
    items = [(c, i) for c in classes for i in range(args.per_class)]
    npz_path = args.npz or args.out.rstrip('/\\') + '.npz'
    rank, world = dist.get_rank(), dist.get_world_size()
    plan, n_done, error = None, 0, None
    if rank == 0:  # one process decides; the others receive its plan (or its error) and exit together with it
        try:
            prepare_out_dir(args.out, npz_path, fid_manifest(args, var, classes, device),
                            {png_name(*it) for it in items})
            plan, n_done = plan_chunks(items, args.bs, args.out)
        except (ValueError, OSError, json.JSONDecodeError) as e:
            error = str(e)
    plan, error = dist.broadcast_object((plan, error))
    if error is not None:
        raise SystemExit(f'error: {error}')
    mine = plan[rank::world]
    if rank == 0:
        print(f'{n_done} of {len(items)} images already on disk; {len(plan)} chunks of '
              f'<= {args.bs} to draw on {world} process(es)', flush=True)
    bar = progress_bar(sum(map(len, mine)))
    for chunk in mine:
        imgs = sample_items(var, chunk, args, classifier)
        for (c, i), img in zip(chunk, imgs):
            path = os.path.join(args.out, png_name(c, i))
            if not _png_written(path):
                save_png(img, path)
        bar.update(len(chunk))
    bar.close()
    dist.barrier()
    if rank == 0:
        files = evaluation_order(os.path.join(args.out, png_name(*it)) for it in items)  # classes mixed for IS
        missing = [f for f in files if not _png_written(f)]
        if missing:
            raise SystemExit(f'error: {len(missing)} images are missing after sampling, e.g. {missing[0]}')
        shape = (len(files), image_size(var), image_size(var), 3)
        if not plan and os.path.exists(npz_path) and _npz_shape_or_none(npz_path) == shape:
            print(f'nothing to do: {args.out} and {npz_path} are complete')
            return
        try:
            write_npz_images(npz_path, iter_png_images(files, 100), shape)
        except UnreadablePNG as e:  # e.g. cut short by a machine crash: remove it so that a re-run draws it again
            os.remove(e.path)
            raise SystemExit(f'error: {e}; it was deleted: re-run the same command to draw it again') from e
        print(f'wrote {len(files)} PNGs to {args.out} and {npz_path}')


def _npz_shape_or_none(path: str) -> Optional[Tuple[int, ...]]:
    try:
        return npz_image_shape(path)
    except ImageSetError:
        return None


# ---------------------------------------------------------------------------------------------------------------- main
def parse_classes(text: str) -> List[int]:
    try:
        return [int(c) for c in text.split(',') if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'--classes takes comma-separated integers, got {text!r}')


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--mode', choices=('grid', 'fid'), default='grid',
                   help='grid: one image per --classes entry; fid: the per-class export (default: %(default)s)')
    p.add_argument('--out', required=True, help='grid: the image file (.png; .jpg, .webp ... save in that format); '
                                                'fid: the folder for the PNGs')
    g = p.add_argument_group('model')
    g.add_argument('--depth', type=int, default=16, help='released model: 16, 20, 24, 30 or 36 (default: %(default)s)')
    g.add_argument('--vae_ckpt', default=None, help='local vae_ch160v4096z32.pth (default: from the Hub)')
    g.add_argument('--var_ckpt', default=None, help='local var_d{depth}.pth (default: from the Hub)')
    g.add_argument('--ckpt', default=None, help="a checkpoint of this project's train.py (instead of the above)")
    g.add_argument('--cache_dir', default=None, help='Hugging Face cache folder for the downloads')
    g.add_argument('--local_files_only', action='store_true', help='never touch the network')
    g = p.add_argument_group('sampling (defaults: the official FID settings)')
    g.add_argument('--classes', type=parse_classes, default=None, help='e.g. 980,437,22,562 (fid default: all)')
    g.add_argument('--cfg', type=float, default=1.5, help='classifier-free guidance, >= 0 (default: %(default)s)')
    g.add_argument('--top_k', type=int, default=900,
                   help='keep the k most likely tokens, 0 = all (default: %(default)s)')
    g.add_argument('--top_p', type=float, default=0.96,
                   help='nucleus sampling mass in [0, 1], 0 = off (default: %(default)s)')
    g.add_argument('--more_smooth', type=int, choices=(0, 1), default=0,
                   help='Gumbel soft codes (demos only) (default: %(default)s)')
    g.add_argument('--seed', type=int, default=0, help="the base of every image's own seed (default: %(default)s)")
    g.add_argument('--per_class', type=int, default=50, help='fid: images per class (default: %(default)s)')
    g.add_argument('--bs', type=int, default=25, help='images per forward pass and process (default: %(default)s)')
    g.add_argument('--nrow', type=int, default=8, help='grid: images per row (default: %(default)s)')
    g.add_argument('--npz', default=None, help='fid: the .npz to write (default: OUT.npz beside the folder)')
    g.add_argument('--fp16', type=int, choices=(0, 1, 2), default=1,
                   help='CUDA autocast: 0 fp32, 1 fp16, 2 bf16 (default: %(default)s)')
    g.add_argument('--tf32', type=int, choices=(0, 1), default=1,
                   help='CUDA: allow TF32 matmuls and convolutions (default: %(default)s)')
    g.add_argument('--fast', type=int, choices=(0, 1), default=0,
                   help='CUDA: torch.compile + CUDA graphs + partial-sort top-p (see benchmarks/; first batch '
                        'compiles) (default: %(default)s)')
    g = p.add_argument_group('classifier rejection sampling (off by default)')
    g.add_argument('--classifier_ckpt', default=None, help='torchvision ImageNet classifier state dict (.pth)')
    g.add_argument('--classifier_arch', default='resnet50',
                   help='torchvision model name of that state dict (default: %(default)s)')
    g.add_argument('--rej_candidates', type=int, default=4, help='images drawn per kept image (default: %(default)s)')
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.ckpt and (args.vae_ckpt or args.var_ckpt):
        raise SystemExit('error: --ckpt is a whole train.py checkpoint; do not combine it with --vae_ckpt/--var_ckpt')
    if not args.ckpt:
        try:
            models.preset_config(args.depth)
        except ValueError as e:
            raise SystemExit(f'error: --depth: {e}') from e
    for flag in ('ckpt', 'vae_ckpt', 'var_ckpt', 'classifier_ckpt'):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise SystemExit(f'error: --{flag} {path} does not exist')
    if args.mode == 'grid' and not args.classes:
        raise SystemExit('error: grid mode needs --classes, e.g. --classes 980,437,22,562')
    if args.classes is not None and len(set(args.classes)) != len(args.classes) and args.mode == 'fid':
        raise SystemExit('error: --classes lists a class twice; in fid mode use --per_class for more images')
    if min(args.bs, args.per_class, args.nrow, args.rej_candidates) < 1:
        raise SystemExit('error: --bs, --per_class, --nrow and --rej_candidates must be positive')
    check_sampling_args(args)
    check_out(args)


def check_sampling_args(args: argparse.Namespace) -> None:
    try:
        check_sampling_settings(args.cfg, args.top_k, args.top_p)
    except ValueError as e:
        raise SystemExit(f'error: {e}') from None


def check_out(args: argparse.Namespace) -> None:
    """grid: --out must end in an image extension PIL writes (or none: PNG); fid: it names a folder, not a file."""
    if args.mode == 'grid':
        try:
            image_format(args.out)
        except ValueError as e:
            raise SystemExit(f'error: --out {args.out}: {e}') from e
        return
    folder = args.out.rstrip('/\\')
    if (is_image_path(folder) or folder.lower().endswith('.npz')) and not os.path.isdir(folder):
        stem = os.path.splitext(folder)[0]
        raise SystemExit(f'error: --out {args.out}: in fid mode --out names the folder for the PNGs (OUT.npz goes '
                         f'beside it), not an image or .npz file; use e.g. --out {stem}')


def main(args: argparse.Namespace) -> None:
    check_args(args)
    dist.initialize(timeout_minutes=180)  # ranks meet at the end; --fast compiles on each rank first
    device = dist.get_device()
    if device.type == 'cuda':  # process-wide switches belong to the script, not to an import
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    try:
        _, var = load_models(args, device)
        if args.classes is not None:
            check_classes(args.classes, var.num_classes)
        classifier = None
        if args.classifier_ckpt is not None:
            try:
                classifier = load_classifier(args.classifier_arch, args.classifier_ckpt, device)
            except (ValueError, RuntimeError, OSError) as e:
                raise SystemExit(f'error: {e}') from e
        if args.mode == 'grid':
            if dist.is_master():
                run_grid(args, var, classifier)
        else:
            run_fid(args, var, classifier, device)
    finally:
        dist.finalize()


if __name__ == '__main__':
    main(get_parser().parse_args())
