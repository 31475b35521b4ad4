"""The pre-tokenised dataset: pretokenize.py (real processes, torchrun, SIGKILL) and train.py --pretok."""
import contextlib
import io
import json
import re
import signal
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

import models
import pretokenize
from support import intra_op_threads
from train_support import (ROOT, TINY_PN, cpu_env, free_port, make_image_folder, make_tiny_vae_ckpt, read_steps,
                            train_args, write_image)
from utils import pretok
from utils.data import ValTransform


def pretok_cmd(data: Path, vae: Path, out: Path, nproc: int = 1, **extra):
    flags = dict(data_path=data, vae_ckpt=vae, out=out, pn=TINY_PN, bs=4, chunk=5, workers=0, tf32=0, device='cpu')
    flags.update(extra)
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={free_port()}']
    return cmd + [str(ROOT / 'pretokenize.py')] + [f'--{k}={v}' for k, v in flags.items()]


def run_pretok(*args, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(pretok_cmd(*args, **kw), cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=150)
    return r


def pretok_here(data: Path, vae: Path, out: Path, **extra) -> subprocess.CompletedProcess:
    """pretokenize.main in this process, with one intra-op thread like the real processes' OMP_NUM_THREADS=1 (the
    same arithmetic, so the same bytes); its exit code and output as a CompletedProcess."""
    argv = pretok_cmd(data, vae, out, **extra)[2:]
    stdout, stderr = io.StringIO(), io.StringIO()
    with intra_op_threads(1), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        code = pretokenize.main(argv)
    # a process prints its warnings on stderr; pytest would keep them to itself
    shown = ''.join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue() + shown)


def set_files(out: Path):
    """The bytes of every file of a finished set (meta.json without its absolute paths)."""
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != 'meta.json'}
    meta = json.loads((out / 'meta.json').read_text())
    for k in ('vae_ckpt', 'data_path'):
        meta.pop(k)
    return files, meta


@pytest.fixture(scope='module')
def tokset(tmp_path_factory):
    """A folder of real image files (one of them unreadable), a tiny tokenizer and its token set with flips."""
    root = tmp_path_factory.mktemp('pretok')
    data = make_image_folder(root / 'data', n_train=7, n_val=3)
    (data / 'train' / 'class_01' / 'broken.jpg').write_bytes(b'not a jpeg at all')
    write_image(data / 'train' / 'class_02' / 'odd_margin.png', 2, 99, size=(97, 80))  # 97x80 -> 87x72: odd margin
    vae = make_tiny_vae_ckpt(root / 'vae.pth')
    out = root / 'tokens'
    r = pretok_here(data, vae, out, hflip=1)
    assert r.returncode == 0, r.stderr[-3000:]
    return data, vae, out, r


def test_tokens_are_the_tokenizer_ids_of_the_fixed_crop(tokset):
    data, vae_path, out, run = tokset
    meta = pretok.read_meta(str(out))
    assert meta['variants'] == ['orig', 'hflip'] and meta['patch_nums'] == [1, 2, 3, 4]
    assert meta['splits']['train']['n'] == 22 and meta['splits']['val']['n'] == 9
    broken = str(data / 'train' / 'class_01' / 'broken.jpg')
    assert meta['splits']['train']['skipped'] == [broken]
    assert 'broken.jpg' in run.stderr and '1 unreadable skipped' in run.stdout
    vae = models.load_vae_checkpoint(vae_path, patch_nums=(1, 2, 3, 4))
    assert meta['vae_fingerprint'] == pretok.vae_fingerprint(vae)

    tokens = np.load(out / 'train_tokens.npy')
    labels = np.load(out / 'train_labels.npy')
    files = (out / 'train_files.txt').read_text().splitlines()
    assert tokens.shape == (22, 2, 1 + 4 + 9 + 16) and tokens.dtype == np.uint16 and len(files) == 22
    assert 'class_01/broken.jpg' not in files
    val_crop = ValTransform(64, 72)  # the official validation crop (of the flipped image for variant 1)
    odd = files.index('class_02/odd_margin.png')
    img = Image.open(data / 'train' / files[odd]).convert('RGB')
    assert not torch.equal(val_crop(TF.hflip(img)), val_crop(img).flip(-1))  # flip-then-crop is not crop-then-flip here
    for i in (0, 8, odd, 21):
        img = Image.open(data / 'train' / files[i]).convert('RGB')
        assert labels[i] == int(files[i].split('/')[0].split('_')[1])
        for variant, src in enumerate((img, TF.hflip(img))):
            with torch.no_grad():
                ids = torch.cat(vae.img_to_idxBl(val_crop(src)[None]), 1)[0]
            assert torch.equal(ids, torch.from_numpy(tokens[i, variant].astype(np.int64))), (i, variant)
    val_tokens = np.load(out / 'val_tokens.npy')
    assert val_tokens.shape == (9, 1, 30) and meta['splits']['val']['n_variants'] == 1  # validation reads variant 0
    val_files = (out / 'val_files.txt').read_text().splitlines()
    img = Image.open(data / 'val' / val_files[4]).convert('RGB')
    with torch.no_grad():
        ids = torch.cat(vae.img_to_idxBl(val_crop(img)[None]), 1)[0]
    assert torch.equal(ids, torch.from_numpy(val_tokens[4, 0].astype(np.int64)))
    assert not (out / 'parts').exists()


def test_dataset_draws_flips_like_the_image_transform(tokset):
    _, _, out, _ = tokset
    n, train, val, _ = pretok.build_pretok_dataset(str(out), hflip=True)
    assert n == 3 and len(train) == 22 and len(val) == 9
    tokens = np.load(out / 'train_tokens.npy')
    seen = set()
    for seed in range(40):
        ids, label = train[(5, seed)]
        g = torch.Generator()
        g.manual_seed(seed)
        flip = int(torch.rand(1, generator=g).item() < 0.5)  # utils.data.TrainTransform's draw
        assert torch.equal(ids, torch.from_numpy(tokens[5, flip].astype(np.int64)))
        seen.add(flip)
    assert seen == {0, 1}
    assert torch.equal(val[2][0], torch.from_numpy(np.load(out / 'val_tokens.npy')[2, 0].astype(np.int64)))
    plain = pretok.PretokenizedDataset(str(out), 'train', hflip=False)
    assert all(torch.equal(plain[(3, s)][0], plain[3][0]) for s in range(5))


def test_second_run_finds_the_set_complete_and_other_settings_are_refused(tokset, tmp_path):
    data, vae, out, _ = tokset
    before = set_files(out)
    (out / 'parts').mkdir()  # as if killed between writing meta.json and removing the parts
    r = pretok_here(data, vae, out, hflip=1)
    assert r.returncode == 0 and 'complete already' in r.stdout
    assert set_files(out) == before and not (out / 'parts').exists()
    r = pretok_here(data, vae, out, hflip=0)
    assert r.returncode == 2 and 'other settings (variants)' in r.stderr

    unfinished = tmp_path / 'unfinished'
    (unfinished / 'parts').mkdir(parents=True)
    settings = json.loads(json.dumps(pretok.read_meta(str(out))))
    settings.update(mid_reso=1.5, sizes={})
    (unfinished / 'parts' / 'settings.json').write_text(json.dumps(settings))
    r = pretok_here(data, vae, unfinished, hflip=1)
    assert r.returncode == 2 and 'unfinished token set made with other settings' in r.stderr
    assert 'mid_reso' in r.stderr and not (unfinished / 'meta.json').exists()


@pytest.mark.slow
def test_two_processes_killed_then_one_completes_the_same_set(tmp_path):
    """A 2-process torchrun pretokenisation (flip variants) is SIGKILLed, agent and workers, once parts are on disk;
    the same command in one process completes it: the files equal those one process writes alone, byte for byte (the
    parts do not depend on how many processes wrote them, nor on a restart)."""
    from train_support import kill_tree
    data = make_image_folder(tmp_path / 'data', n_train=40, n_val=2)
    vae = make_tiny_vae_ckpt(tmp_path / 'vae.pth')
    ref = tmp_path / 'ref'
    assert pretok_here(data, vae, ref, chunk=2, bs=2, hflip=1).returncode == 0

    out = tmp_path / 'killed'
    log = open(tmp_path / 'killed.log', 'w')
    proc = subprocess.Popen(pretok_cmd(data, vae, out, nproc=2, chunk=2, bs=2, hflip=1), cwd=ROOT, env=cpu_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    try:
        while not (out / 'parts').is_dir() or len(list((out / 'parts').glob('train_*.npz'))) < 3:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / 'killed.log').read_text()[-3000:]
            time.sleep(0.005)
    finally:
        kill_tree(proc.pid)  # torchrun's workers run in sessions of their own
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == -signal.SIGKILL and not (out / 'meta.json').exists()
    n_parts = len(list((out / 'parts').glob('train_*.npz')))
    assert 3 <= n_parts < 60
    r = pretok_here(data, vae, out, chunk=2, bs=2, hflip=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'{n_parts} already on disk' in r.stdout or f'{n_parts + 1} already on disk' in r.stdout
    assert set_files(out) == set_files(ref)


def write_square_folder(root: Path, n_classes: int = 3, n_train: int = 8, n_val: int = 3) -> Path:
    """Square images: with --mid_reso=1 the official random crop has a single position, so it equals the centre crop."""
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('val', n_val)):
        for c in range(n_classes):
            d = root / split / f'c{c}'
            d.mkdir(parents=True)
            for k in range(n):
                arr = rng.integers(0, 256, (5, 5, 3)).astype(np.uint8)
                img = Image.fromarray(arr).resize((80, 80), Image.BICUBIC)
                img.save(d / f'{k}.png')
    return root


@pytest.mark.slow
def test_training_from_tokens_equals_training_from_images(tmp_path):
    """Same flips (per-sample seeds), same crops, progressive stages included: bit-identical losses and validation."""
    data = write_square_folder(tmp_path / 'data')
    vae = make_tiny_vae_ckpt(tmp_path / 'vae.pth')
    tok = tmp_path / 'tok'
    r = pretok_here(data, vae, tok, hflip=1, mid_reso=1.0, bs=8)
    assert r.returncode == 0, r.stderr[-3000:]
    common = dict(hflip=1, mid_reso=1.0, ep=3, pg=0.6, pg0=1, log_steps=1)
    import train  # both runs in this process, with the same thread count: the same arithmetic
    with intra_op_threads(1):
        assert train.main(train_args(data, vae, tmp_path / 'img', **common)) == 0
        assert train.main(train_args(data, vae, tmp_path / 'tok_run', pretok=tok, **common)) == 0
    console = (tmp_path / 'tok_run' / 'stdout.txt').read_text() + (tmp_path / 'tok_run' / 'stderr.txt').read_text()
    assert 'pre-tokenised dataset' in console
    assert 'is not read: the images come from --pretok' in console
    steps_img, steps_tok = read_steps(tmp_path / 'img'), read_steps(tmp_path / 'tok_run')
    assert len(steps_img) == 9 and steps_img == steps_tok
    epochs = [[{k: v for k, v in json.loads(line).items() if not k.endswith('_time')}
               for line in (tmp_path / d / 'log.txt').read_text().splitlines()[1:]] for d in ('img', 'tok_run')]
    assert len(epochs[0]) == 3 and epochs[0] == epochs[1] and 'vL_tail' in epochs[0][-1]


def test_train_refuses_a_set_it_cannot_use(tokset, tmp_path, capsys):
    """Each refusal is one clean message (exit code 2, no traceback) that says what to change."""

    import train

    def refused(argv, match):
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(match, err), err[-2000:]

    data, vae, out, _ = tokset
    other_vae = tmp_path / 'other.pth'
    torch.manual_seed(123)
    vae_b, _ = models.build_vae_var(device='cpu', ch_mult=(1, 1, 2, 2, 4), patch_nums=(1, 2, 3, 4), V=64, Cvae=8, ch=32,
                                    share_quant_resi=4, depth=2, num_classes=3)
    torch.save(vae_b.state_dict(), other_vae)
    refused(train_args(data, other_vae, tmp_path / 'a', pretok=out, ep=1), 'made by another tokenizer')
    znorm = tmp_path / 'znorm.pth'  # same weights, another quantiser setting: other ids, so another fingerprint
    vae_a = models.load_vae_checkpoint(vae, patch_nums=(1, 2, 3, 4))
    torch.save({'vae': vae_a.state_dict(), 'vae_config': dict(vae_a.config, using_znorm=True)}, znorm)
    vae_z = models.load_vae_checkpoint(znorm, patch_nums=(1, 2, 3, 4))
    assert vae_z.quantize.using_znorm and pretok.vae_fingerprint(vae_z) != pretok.vae_fingerprint(vae_a)
    refused(train_args(data, znorm, tmp_path / 'z', ep=1),
            r"settings that train.py does not build .*'using_znorm': \(True, False\)")
    refused(train_args(data, vae, tmp_path / 'b', pretok=out, pn='1_2_4', ep=1),
            r'patch_nums \(1, 2, 3, 4\) in the set, \(1, 2, 4\) in this run')
    refused(train_args(data, vae, tmp_path / 'c', pretok=tmp_path / 'nothing', ep=1), 'written by pretokenize.py')
    no_flip = tmp_path / 'noflip'
    no_flip.mkdir()
    meta = pretok.read_meta(str(out))
    meta['splits']['train']['n_variants'] = 1
    pretok.write_meta(str(no_flip), meta)
    refused(train_args(data, vae, tmp_path / 'd', pretok=no_flip, hflip=1, ep=1),
            're-run pretokenize.py with --hflip=1')
    refused(train_args(tmp_path / 'no_such_folder', vae, tmp_path / 'e', ep=1), 'no_such_folder does not exist')
    refused(train_args(data, vae, tmp_path / 'f', ep=1, depth=3, width=64), r'--width=64 must be a multiple')
    refused(train_args(data, vae, tmp_path / 'g', ep=1, flex=1), r'--flex 1 needs a CUDA device')
    # resuming in the folder of a run of another configuration names the differing flags
    assert train.main(train_args(data, vae, tmp_path / 'h', ep=1)) == 0
    capsys.readouterr()
    refused(train_args(data, vae, tmp_path / 'h', ep=2, width=128),
            r"belongs to a run of another configuration.*'width': \(64, 128\)")


@pytest.mark.slow
def test_loader_workers_read_the_same_batches(tokset):
    """Spawned workers (the default start method from Python 3.14) get the dataset pickled: without its memory map."""
    import pickle

    from torch.utils.data import DataLoader

    from utils.data_sampler import DistInfiniteBatchSampler
    _, _, out, _ = tokset
    _, train, _, _ = pretok.build_pretok_dataset(str(out), hflip=True)
    assert train.tokens.shape[0] == 22  # the parent has the memory map open
    assert len(pickle.dumps(train)) < 4096 + 40 * len(train)  # labels only, not the token array
    batches = {}
    for workers in (0, 2):
        sampler = DistInfiniteBatchSampler(1, 0, len(train), 8, fill_last=True, shuffle=True, aug_seed=3)
        ctx = 'spawn' if workers else None
        it = iter(DataLoader(train, batch_sampler=sampler, num_workers=workers, multiprocessing_context=ctx))
        batches[workers] = [next(it) for _ in range(3)]
    for (ids_a, lab_a), (ids_b, lab_b) in zip(batches[0], batches[2]):
        assert ids_a.shape == (8, 30) and ids_a.dtype == torch.int64
        assert torch.equal(ids_a, ids_b) and torch.equal(lab_a, lab_b)


@pytest.mark.slow
def test_offline_without_a_tokenizer_path_is_a_clean_error(tokset, tmp_path, monkeypatch, capfd):
    """No --vae_ckpt and no network (the Hub's offline mode, HF_HUB_OFFLINE=1): pretokenize.py and train.py end with
    a message naming the flag, exit code 2, no traceback (their main()s in this process)."""
    import huggingface_hub.constants

    import train
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)  # what HF_HUB_OFFLINE=1 sets at import
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    data, _, _, _ = tokset
    r = pretok_here(data, '', tmp_path / 'tok')
    assert r.returncode == 2 and '--vae_ckpt' in r.stdout + r.stderr, r.stderr[-2000:]
    assert 'Traceback' not in r.stderr
    capfd.readouterr()
    assert train.main(train_args(data, '', tmp_path / 'run', ep=1)) == 2
    console = capfd.readouterr()
    assert '--vae_ckpt' in console.out + console.err and 'Traceback' not in console.err, console.err[-2000:]

    # as officially, vae_ch160v4096z32.pth in the working directory is used without any flag (and without the Hub)
    data, vae, out, _ = tokset
    cwd = tmp_path / 'cwd'
    cwd.mkdir()
    shutil.copy(vae, cwd / 'vae_ch160v4096z32.pth')
    with contextlib.chdir(cwd):
        r = pretok_here(data, '', tmp_path / 'tok_cwd', hflip=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert set_files(tmp_path / 'tok_cwd') == set_files(out)


# ------------------------------------------------------------------------- fast unit tests (no subprocess, no tokset)
def test_token_dtype_holds_every_id_of_the_vocabulary():
    assert pretok.token_dtype(4096) == np.uint16
    assert pretok.token_dtype(65536) == np.uint16  # ids 0..65535 fit in uint16
    assert pretok.token_dtype(65537) == np.int32


def test_fingerprint_ignores_usage_statistics_but_not_weights(tiny_models):
    vae, _ = tiny_models
    fp = pretok.vae_fingerprint(vae)
    with torch.no_grad():
        vae.quantize.ema_vocab_hit_SV.add_(3.0)  # statistics only: the ids do not change
        assert pretok.vae_fingerprint(vae) == fp
        vae.quantize.embedding.weight[0, 0] += 1.0
    assert pretok.vae_fingerprint(vae) != fp


def _meta(**kw):
    meta = {'format': pretok.FORMAT, 'patch_nums': [1, 2], 'vocab_size': 16, 'final_reso': 32, 'mid_reso': 1.125,
            'variants': ['orig', 'hflip'], 'classes': ['a', 'b'], 'vae_fingerprint': 'f' * 64, 'vae_ckpt': 'v.pth',
            'splits': {'train': {'n': 4, 'n_variants': 2, 'skipped': []},
                       'val': {'n': 2, 'n_variants': 1, 'skipped': []}}}
    meta.update(kw)
    return meta


def test_check_compatible_names_every_difference():
    meta = _meta()
    pretok.check_compatible(meta, 'set', (1, 2), 16, 'f' * 64, final_reso=32)
    pretok.check_compatible(meta, 'set', [1, 2], 16, 'f' * 64)  # no image size given: not checked
    with pytest.raises(ValueError) as e:
        pretok.check_compatible(meta, 'set', (1, 2, 3), 32, 'e' * 64, final_reso=48)
    msg = str(e.value)
    assert 'patch_nums (1, 2) in the set, (1, 2, 3)' in msg and 'vocab_size 16 in the set, 32' in msg
    assert 'image size 32 in the set, 48' in msg and 'another tokenizer' in msg
    for kw, what in ((dict(final_reso=48), 'image size'), (dict(fingerprint='e' * 64), 'another tokenizer')):
        args = dict(patch_nums=(1, 2), vocab_size=16, fingerprint='f' * 64, final_reso=32)
        args.update(kw)
        with pytest.raises(ValueError, match=what):
            pretok.check_compatible(meta, 'set', **args)


def _write_set(root: Path, meta, n_labels=None):
    """A synthetic token set: token value = 100·variant + 10·sample + position (distinct per row)."""
    root.mkdir(parents=True, exist_ok=True)
    L = sum(p * p for p in meta['patch_nums'])
    for split, info in meta['splits'].items():
        n, nv = info['n'], info['n_variants']
        tok = (100 * np.arange(nv)[None, :, None] + 10 * np.arange(n)[:, None, None] + np.arange(L)).astype(np.uint16)
        paths = pretok.split_paths(str(root), split)
        np.save(paths['tokens'], tok)
        np.save(paths['labels'], np.arange(n if n_labels is None else n_labels, dtype=np.int64) % 2)
    pretok.write_meta(str(root), meta)


def test_synthetic_set_reads_rows_variants_and_refuses_inconsistent_files(tmp_path):
    _write_set(tmp_path / 'ok', _meta())
    n, train, val, _ = pretok.build_pretok_dataset(str(tmp_path / 'ok'), hflip=True)
    assert n == 2 and len(train) == 4 and len(val) == 2
    for seed in range(8):
        g = torch.Generator()
        g.manual_seed(seed)
        variant = int(torch.rand(1, generator=g).item() < 0.5)  # TrainTransform's flip draw: variant 1 = flipped
        ids, label = train[(3, seed)]
        assert ids.tolist() == [100 * variant + 30 + j for j in range(5)] and label == 1
    assert val[(1, 0)][0].tolist() == [10, 11, 12, 13, 14]
    assert pretok.PretokenizedDataset(str(tmp_path / 'ok'), 'train')[2][0].tolist() == [20, 21, 22, 23, 24]

    _write_set(tmp_path / 'few_labels', _meta(), n_labels=3)
    with pytest.raises(ValueError, match='holds 3 labels, meta.json says 4'):
        pretok.PretokenizedDataset(str(tmp_path / 'few_labels'), 'train')
    _write_set(tmp_path / 'other_format', _meta(format='var-pretok-v0'))
    with pytest.raises(ValueError, match='unknown format'):
        pretok.read_meta(str(tmp_path / 'other_format'))
    with pytest.raises(ValueError, match='unknown format'):
        pretok.build_pretok_dataset(str(tmp_path / 'other_format'), hflip=False)


def test_chunk_batches_cover_each_chunk_without_straddling():
    assert pretokenize.chunk_batches([0, 2], n=12, chunk=5, bs=2) == [[0, 1], [2, 3], [4], [10, 11]]
    assert pretokenize.chunk_batches([1], n=12, chunk=5, bs=3) == [[5, 6, 7], [8, 9]]
    all_batches = pretokenize.chunk_batches(range(3), n=12, chunk=5, bs=4)
    assert sorted(i for b in all_batches for i in b) == list(range(12))


def test_a_complete_set_ignores_another_chunk_size_but_refuses_another_crop(tokset, capsys):
    """--chunk only splits the work: a finished set is complete whatever its value; --mid_reso changes the ids."""
    data, vae, out, _ = tokset
    flags = [f'--data_path={data}', f'--vae_ckpt={vae}', f'--out={out}', f'--pn={TINY_PN}', '--hflip=1',
             '--workers=0', '--tf32=0', '--device=cpu']
    assert pretokenize.run(pretokenize.get_parser().parse_args(flags + ['--chunk=3', '--bs=2'])) == 0
    assert 'complete already' in capsys.readouterr().out
    with pytest.raises(FileExistsError, match=r'other settings \(mid_px, mid_reso\)'):
        pretokenize.run(pretokenize.get_parser().parse_args(flags + ['--mid_reso=1.25']))
