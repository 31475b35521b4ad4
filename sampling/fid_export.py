# Implements the 50,000-image ImageNet export of VAR (arXiv 2404.02905), section 5 (50 per class, PNG + OpenAI .npz),
# behind its FID/IS numbers.
"""The resumable, distributed FID export: which images to draw, who draws them, and the folder's manifest.

The export hands out fixed chunks of `--bs` images, so the same `--bs` on the same kind of device gives
byte-identical files for any number of processes. Each PNG is written atomically, images already on disk are skipped,
and `manifest.json` keeps every setting that changes the pixels: a restart completes a killed run, and a run with
other settings refuses the folder. Rank 0 decides the plan; the other ranks receive it (or its error).
"""
import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import dist
import models
from models.atomic_files import atomic_write
from models.presets import HUB_REPO_ID, VAE_FILENAME, var_filename
from sampling.draw import progress_bar, sample_items
from sampling.image_sets import (ImageSetError, UnreadablePNG, evaluation_order, iter_png_images, npz_image_shape,
                                 npz_tmp_path, save_png, write_npz_images)
from sampling.settings import FidExportJob
from utils.runtime import ConfigError

MANIFEST = 'manifest.json'
MANIFEST_VERSION = 1


def png_name(cls: int, index: int) -> str:
    return f'{cls:04d}_{index:05d}.png'


def file_sha256(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def model_identity(ckpt: Optional[str], vae_ckpt: Optional[str], var_ckpt: Optional[str], depth: int
                   ) -> Dict[str, str]:
    """What the manifest records of the weights (sample.py's model flags): file hashes for local files, the Hub file
    names otherwise."""
    if ckpt:
        ident = {'ckpt_sha256': file_sha256(ckpt)}
        if vae_ckpt:  # the tokenizer of a checkpoint that holds none
            ident['vae'] = f'sha256:{file_sha256(vae_ckpt)}'
        return ident
    ident = {'depth': str(depth)}
    for key, path, hub_name in (('vae', vae_ckpt, VAE_FILENAME), ('var', var_ckpt, var_filename(depth))):
        ident[key] = f'sha256:{file_sha256(path)}' if path else f'hub:{HUB_REPO_ID}/{hub_name}'
    return ident


def image_size(var: models.VAR) -> int:
    return var.patch_nums[-1] * var.vae_proxy[0].downsample


def fid_manifest(job: FidExportJob, var: models.VAR, classes: Sequence[int], device: torch.device) -> dict:
    """Every setting that changes the pixels (not the batch size, the number of processes, or paths)."""
    s, cuda = job.sampling, device.type == 'cuda'
    return dict(
        version=MANIFEST_VERSION, model=dict(job.model), image_size=image_size(var),
        classes='all' if list(classes) == list(range(var.num_classes)) else list(classes), per_class=job.per_class,
        seed=s.seed, cfg=s.cfg, top_k=s.top_k, top_p=s.top_p, more_smooth=s.more_smooth,
        fp16=s.fp16 if cuda else 0, tf32=bool(job.tf32) if cuda else False,
        fast=int(s.fast) if cuda else 0,  # 0/1 compare equal to the older false/true
        device=device.type, to_uint8='x*255, truncated',
        rejection=None if job.rejection is None else dict(
            arch=job.rejection.arch, sha256=file_sha256(job.rejection.ckpt), candidates=job.rejection.candidates),
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
    atomic_write(path, lambda f: json.dump(manifest, f, indent=1), mode='w', fsync=False)


def png_written(path: str) -> bool:
    # an empty file is what a machine crash (not a kill: writes are renamed into place) can leave: draw it again
    return os.path.exists(path) and os.path.getsize(path) > 0


def plan_chunks(items: List[Tuple[int, int]], bs: int, out_dir: str) -> Tuple[List[List[Tuple[int, int]]], int]:
    """Fixed chunks of `bs` consecutive items, keeping those with an image missing on disk; and the images on disk."""
    on_disk = {it for it in items if png_written(os.path.join(out_dir, png_name(*it)))}
    chunks = [items[s:s + bs] for s in range(0, len(items), bs)]
    return [ch for ch in chunks if not on_disk.issuperset(ch)], len(on_disk)


def npz_shape_or_none(path: str) -> Optional[Tuple[int, ...]]:
    try:
        return npz_image_shape(path)
    except ImageSetError:
        return None


def export(job: FidExportJob, var: models.VAR, classifier: Optional[torch.nn.Module], device: torch.device) -> None:
    """Draw the missing images of the job's classes x per_class into its folder on every rank, then pack the .npz on
    rank 0 (`classifier`: the loaded one of `job.rejection`). A folder of another configuration, or an image that
    cannot be read back, is a ConfigError."""
    classes = list(job.classes) if job.classes is not None else list(range(var.num_classes))
    items = [(c, i) for c in classes for i in range(job.per_class)]
    npz_path = job.npz
    rank, world = dist.get_rank(), dist.get_world_size()
    plan, n_done, error = None, 0, None
    if rank == 0:  # one process decides; the others receive its plan (or its error) and exit together with it
        try:
            prepare_out_dir(job.out, npz_path, fid_manifest(job, var, classes, device),
                            {png_name(*it) for it in items})
            plan, n_done = plan_chunks(items, job.bs, job.out)
        except (ValueError, OSError, json.JSONDecodeError) as e:
            error = str(e)
    plan, error = dist.broadcast_object((plan, error))
    if error is not None:
        raise ConfigError(error)
    mine = plan[rank::world]
    if rank == 0:
        print(f'{n_done} of {len(items)} images already on disk; {len(plan)} chunks of '
              f'<= {job.bs} to draw on {world} process(es)', flush=True)
    bar = progress_bar(sum(map(len, mine)))
    for chunk in mine:
        imgs = sample_items(var, chunk, job.sampling, classifier,
                            job.rejection.candidates if job.rejection is not None else 1)
        for (c, i), img in zip(chunk, imgs):
            path = os.path.join(job.out, png_name(c, i))
            if not png_written(path):
                save_png(img, path)
        bar.update(len(chunk))
    bar.close()
    dist.barrier()
    if rank == 0:
        files = evaluation_order(os.path.join(job.out, png_name(*it)) for it in items)  # classes mixed for IS
        missing = [f for f in files if not png_written(f)]
        if missing:
            raise ConfigError(f'{len(missing)} images are missing after sampling, e.g. {missing[0]}')
        shape = (len(files), image_size(var), image_size(var), 3)
        if not plan and os.path.exists(npz_path) and npz_shape_or_none(npz_path) == shape:
            print(f'nothing to do: {job.out} and {npz_path} are complete')
            return
        try:
            write_npz_images(npz_path, iter_png_images(files, 100), shape)
        except UnreadablePNG as e:  # e.g. cut short by a machine crash: remove it so that a re-run draws it again
            os.remove(e.path)
            raise ConfigError(f'{e}; it was deleted: re-run the same command to draw it again') from e
        print(f'wrote {len(files)} PNGs to {job.out} and {npz_path}')
