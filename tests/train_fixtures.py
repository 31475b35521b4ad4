"""Helpers for the training tests: a small ImageFolder of real image files, a tiny tokenizer, train.py commands."""
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = dict(patch_nums=(1, 2, 3, 4), V=64, Cvae=8, ch=32, share_quant_resi=4, depth=2, num_classes=3)
TINY_PN = '1_2_3_4'
X16 = (1, 1, 2, 2, 4)  # the official x16 tokenizer layout: 64x64 images for these scales
X4 = (1, 1, 2)         # a 3-level x4 tokenizer (16x16 images, --patch_size=4): fast enough for multi-run tests


def write_image(path: Path, cls: int, k: int, size: Optional[Tuple[int, int]] = None) -> None:
    """A real picture file: a class-coloured gradient with shapes and noise, of varying (or the given (w, h)) size
    and format."""
    rng = np.random.default_rng(1000 * cls + k)
    w, h = int(rng.integers(66, 110)), int(rng.integers(66, 110))
    w, h = size or (w, h)
    base = np.array([(60 + 90 * cls) % 256, (200 - 70 * cls) % 256, (30 + 50 * k) % 256], dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = base + 60 * np.stack([np.sin(xx / (5 + k)), np.cos(yy / (4 + cls)), np.sin((xx + yy) / 9)], -1)
    arr += rng.normal(0, 12, size=arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), 'RGB')
    draw = ImageDraw.Draw(img)
    x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    draw.ellipse([x0, y0, x0 + w // 3, y0 + h // 3], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    img.save(path, quality=90) if path.suffix == '.jpg' else img.save(path)


def make_image_folder(root: Path, n_classes: int = 3, n_train: int = 8, n_val: int = 3) -> Path:
    """root/train/<class>/*.{png,jpg} and root/val/<class>/*; returns root."""
    for split, n in (('train', n_train), ('val', n_val)):
        for c in range(n_classes):
            d = root / split / f'class_{c:02d}'
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                write_image(d / f'img_{k:03d}.{"jpg" if k % 2 else "png"}', c, k + (0 if split == 'train' else 50))
    return root


def make_tiny_vae_ckpt(path: Path, ch_mult: Sequence[int] = X16) -> Path:
    """A tiny tokenizer saved as a plain state dict (the official release format)."""
    from models import build_vae_var
    torch.manual_seed(0)
    vae, _ = build_vae_var(device='cpu', ch_mult=ch_mult, **TINY_VAE)
    torch.save(vae.state_dict(), path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def train_args(data: Path, vae: Path, out: Path, **extra) -> List[str]:
    """The command-line flags of a tiny CPU run (any flag can be overridden through `extra`, e.g. patch_size=4 for
    the x4 tokenizer)."""
    flags: Dict[str, object] = dict(data_path=data, vae_ckpt=vae, local_out_dir_path=out, pn=TINY_PN, depth=2,
                                    width=64, bs=8, ep=2, fp16=0, seed=1, workers=0, tf32=0, afuse=0, fuse=0,
                                    val_every_ep=1)
    flags.update(extra)
    return [f'--{k}={v}' for k, v in flags.items()]


def cpu_env(threads: int = 1) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT),
               PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='')
    return env


def train_cmd(argv: Sequence[str], nproc: int = 1) -> List[str]:
    """python train.py ..., or python -m torch.distributed.run --nproc_per_node=N train.py ... (gloo on CPU)."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={free_port()}']
    return cmd + [str(ROOT / 'train.py'), *argv]


def run_train(argv: Sequence[str], nproc: int = 1, timeout: float = 150) -> subprocess.CompletedProcess:
    """Run train.py to completion in real processes."""
    return subprocess.run(train_cmd(argv, nproc), cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                          timeout=timeout)


def kill_after_step(argv: Sequence[str], out: Path, step: int, nproc: int = 1, timeout: float = 150,
                    cmd: Optional[List[str]] = None) -> int:
    """Start train.py (or `cmd`, e.g. train_vae.py), SIGKILL its whole process group once steps.jsonl shows global
    step `step`; returns the last step logged before the kill (the kill is real: no handler runs, a save in progress
    is cut short)."""
    import json
    import signal
    import time
    log = open(out.parent / f'{out.name}.killed.log', 'w')
    proc = subprocess.Popen(cmd or train_cmd(argv, nproc), cwd=ROOT, env=cpu_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    steps_file, deadline = out / 'steps.jsonl', time.time() + timeout
    try:
        while True:
            lines = steps_file.read_text().splitlines() if steps_file.exists() else []
            last = json.loads(lines[-1])['g_it'] if lines and lines[-1].endswith('}') else -1
            if last >= step:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f'the trainer ended (rc={proc.returncode}) or timed out before step {step}: '
                                     + (out.parent / f'{out.name}.killed.log').read_text()[-3000:])
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    return last


def read_steps(out: Path) -> Dict[int, float]:
    """g_it -> loss from steps.jsonl; a resumed run rewrites the steps after its checkpoint (last one wins)."""
    import json
    losses = {}
    for line in (out / 'steps.jsonl').read_text().splitlines():
        rec = json.loads(line)
        losses[rec['g_it']] = rec['loss']
    return losses


def assert_help_shows_defaults(parser, official: Dict[str, object]) -> None:
    """Every option with a default shows it in --help as '(default: X)'; `official` pins some of them."""
    import re
    text = parser.format_help()

    def option_help(option: str) -> str:  # its lines up to the next option, whitespace-normalised
        m = re.search(rf'^  {re.escape(option)}\b.*?(?=^  -|^\S|^$|\Z)', text, re.M | re.S)
        return ' '.join(m.group(0).split())
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and action.default is not None:
            assert f'(default: {action.default})' in option_help(action.option_strings[0]), action.dest
    for option, value in official.items():
        assert option_help(option).endswith(f'(default: {value})'), option
