"""Helpers for the training tests: a small ImageFolder of real image files, a tiny tokenizer, train.py commands."""
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from support import ROOT
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


def folder_to_parquet(folder: Path, out: Path, n_shards: int = 3, group_rows: int = 2, names: bool = True) -> Path:
    """The images of a class-folder set (make_image_folder) as parquet shards in the Hub's layout
    (out/data/train-0000K-of-0000N.parquet, out/data/validation-...): the file bytes unchanged, rows in the folders'
    sorted order (SafeImageFolder's), `group_rows` rows per row group, the class names in the features metadata
    unless `names` is False; returns out."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from utils.data import SafeImageFolder
    image_type = pa.struct([('bytes', pa.binary()), ('path', pa.string())])
    for split, hub_split in (('train', 'train'), ('val', 'validation')):
        images = SafeImageFolder(str(folder / split), transform=None)
        meta = {'info': {'features': {'image': {'_type': 'Image'},
                                      'label': {'names': images.classes, '_type': 'ClassLabel'}}}}
        rows = [({'bytes': Path(p).read_bytes(), 'path': os.path.relpath(p, images.root)}, label)
                for p, label in images.samples]
        (out / 'data').mkdir(parents=True, exist_ok=True)
        bounds = np.linspace(0, len(rows), n_shards + 1).round().astype(int)
        for k in range(n_shards):
            part = rows[bounds[k]:bounds[k + 1]]
            table = pa.table({'image': pa.array([r[0] for r in part], image_type),
                              'label': pa.array([r[1] for r in part], pa.int64())})
            if names:
                table = table.replace_schema_metadata({b'huggingface': json.dumps(meta).encode()})
            pq.write_table(table, out / 'data' / f'{hub_split}-{k:05d}-of-{n_shards:05d}.parquet',
                           row_group_size=group_rows)
    return out


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


def _proc_stat(pid: int) -> List[str]:
    """The fields of /proc/PID/stat after the command name (state, parent, ...), or [] once the process is gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
        return []


def parent_pid(pid: int) -> int:
    """The parent of a live process (from /proc), or -1."""
    fields = _proc_stat(pid)
    return int(fields[1]) if len(fields) > 1 else -1


def process_tree(pid: int) -> List[int]:
    """`pid` and all its descendants, parents first."""
    children: Dict[int, List[int]] = {}
    for name in os.listdir('/proc'):
        if name.isdigit():
            children.setdefault(parent_pid(int(name)), []).append(int(name))
    tree = [pid]
    for p in tree:
        tree.extend(sorted(children.get(p, [])))
    return tree


def is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    fields = _proc_stat(pid)
    return bool(fields) and fields[0] != 'Z'


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun starts its workers in sessions of their own, so killing its
    process group would leave them running), then wait until none of them runs."""
    import signal
    import time
    tree = process_tree(pid)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 30
    while any(is_running(p) for p in tree[1:]) and time.time() < deadline:
        time.sleep(0.01)
    assert not any(is_running(p) for p in tree[1:]), f'processes survived SIGKILL: {tree}'


def kill_after_step(argv: Sequence[str], out: Path, step: int, nproc: int = 1, timeout: float = 150,
                    cmd: Optional[List[str]] = None) -> int:
    """Start train.py (or `cmd`, e.g. train_vae.py), SIGKILL it with all its processes (torchrun's workers included)
    once steps.jsonl shows global step `step`; returns the last step logged before the kill (the kill is real: no
    handler runs, a save in progress is cut short)."""
    import json
    import signal
    import time
    log = open(out.parent / f'{out.name}.killed.log', 'w')
    proc = subprocess.Popen(cmd or train_cmd(argv, nproc), cwd=ROOT, env=cpu_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    steps_file, deadline = out / 'steps.jsonl', time.time() + timeout
    try:
        while True:
            lines = steps_file.read_text().splitlines() if steps_file.exists() else []
            last = json.loads(lines[-1])['g_it'] if lines and lines[-1].endswith('}') else -1
            if last >= step:
                kill_tree(proc.pid)
                break
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f'the trainer ended (rc={proc.returncode}) or timed out before step {step}: '
                                     + (out.parent / f'{out.name}.killed.log').read_text()[-3000:])
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    return last


def signal_after_step(cmd, out, step: int, send, timeout: float = 150):
    """Start `cmd`, call `send(proc)` once steps.jsonl shows global step `step`, wait for the exit -> (proc, log)."""
    import json
    import time
    log_path = out.parent / f'{out.name}.signalled.log'
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        steps_file, deadline = out / 'steps.jsonl', time.time() + timeout
        while True:
            lines = steps_file.read_text().splitlines() if steps_file.exists() else []
            if lines and lines[-1].endswith('}') and json.loads(lines[-1])['g_it'] >= step:
                send(proc)
                break
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.01)
        proc.wait(timeout=timeout)
    return proc, log_path.read_text()


def sigterm_to_rank1(proc) -> None:
    """SIGTERM (a preemption notice) to rank 1 alone of a 2-process torchrun job `proc`."""
    import signal
    children = [int(p) for p in os.listdir('/proc') if p.isdigit() and parent_pid(int(p)) == proc.pid]
    workers = sorted(children)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGTERM)  # the second worker started: rank 1


def assert_same_state(a, b, where: str = 'checkpoint') -> None:
    """Two nested checkpoint structures hold equal values, tensors bit for bit (names the first difference)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), (where, sorted(a, key=str))
        for k in a:
            assert_same_state(a[k], b[k], f'{where}/{k}')
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f'{where}/{k}')
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def assert_same_final_checkpoint(ref_out: Path, out: Path, name: str = 'ar-ckpt-last.pth') -> None:
    """The last checkpoints of an uninterrupted and an interrupted-and-resumed run are identical: weights, optimizer
    and scaler state, progressive state, best metrics, position and every rank's RNG states."""
    from utils.ckpt import load_checkpoint
    ref, got = load_checkpoint(str(ref_out / name)), load_checkpoint(str(out / name))
    for key in ('epoch', 'iter', 'trainer', 'best', 'rng'):
        assert_same_state(ref[key], got[key], key)


def read_steps(out: Path) -> Dict[int, float]:
    """g_it -> loss from steps.jsonl; a resumed run rewrites the steps after its checkpoint (last one wins)."""
    import json
    losses = {}
    for line in (out / 'steps.jsonl').read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
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


def node_cmd(argv: Sequence[str], nproc: int, port: int, node: int, script: str = 'train.py') -> List[str]:
    """The torchrun agent of node `node` (0 or 1) of a two-node job on this machine: node 0 hosts the c10d
    rendezvous at 127.0.0.1:`port`; node k's agent has the address 127.0.0.(k+1) (all of 127/8 is loopback), and the
    rendezvous numbers the nodes in the order of their addresses, so node 0 holds rank 0."""
    return [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', f'--nproc_per_node={nproc}',
            '--rdzv_backend=c10d', f'--rdzv_endpoint=127.0.0.1:{port}', '--rdzv_id=two-nodes',
            f'--rdzv_conf=is_host={int(node == 0)}', f'--local_addr=127.0.0.{node + 1}', str(ROOT / script), *argv]


def start_two_nodes(argv: Sequence[str], folders: Sequence[Path], nprocs: Sequence[int], log_name: str
                    ) -> List[subprocess.Popen]:
    """Start the two agents of a two-node job, each in its own working folder (as on two machines: a relative
    --local_out_dir_path is node-local), logging to folder/log_name."""
    port = free_port()
    procs = []
    for node, (folder, nproc) in enumerate(zip(folders, nprocs)):
        with open(folder / log_name, 'w') as log:
            procs.append(subprocess.Popen(node_cmd(argv, nproc, port, node), cwd=folder, env=cpu_env(), stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def wait_for_step(out: Path, step: int, procs: Sequence[subprocess.Popen], timeout: float = 150) -> int:
    """Wait until steps.jsonl in `out` shows global step `step` (while every process of `procs` runs); returns the
    last step logged."""
    import json
    import time
    steps_file, deadline = out / 'steps.jsonl', time.time() + timeout
    while True:
        lines = steps_file.read_text().splitlines() if steps_file.exists() else []
        last = json.loads(lines[-1])['g_it'] if lines and lines[-1].endswith('}') else -1
        if last >= step:
            return last
        assert all(p.poll() is None for p in procs) and time.time() < deadline, \
            f'a process ended (exit codes {[p.poll() for p in procs]}) or timed out before step {step}'
        time.sleep(0.01)
