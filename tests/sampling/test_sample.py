"""sample.py and sampling/draw.py, sampling/fid_export.py on a tiny 64px model: grids, the FID export (1 vs 2 real
processes, a real kill and restart), classifier rejection, and clear errors for bad input. CPU only."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import support

import sample
from sampling import draw, fid_export
from sampling.image_sets import evaluation_order, npz_tmp_path
from train_support import free_port

ROOT = str(support.ROOT)
FID_ARGS = ['--mode', 'fid', '--per_class', '4', '--bs', '2', '--classes', '0,1,2,3,4,5,6,7,8,9']


def _main(*argv):
    """sample.main in this process; a user mistake (exit code 2) is raised as SystemExit with its stderr message."""
    support.main_in_process(sample.main, *argv)


def _command(argv, nproc):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={free_port()}']
    return launcher + [os.path.join(ROOT, 'sample.py')] + [str(a) for a in argv]


def _env(threads=1):
    """The same intra-op thread count in every process of a comparison, so that 1-process and 2-process runs do
    identical arithmetic (torchrun would give each of several workers one thread, a plain process all cores). Idle
    OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY, which changes no number): two processes of two threads
    on a 2-core machine would otherwise spin against each other, for seconds."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY='PASSIVE', CUDA_VISIBLE_DEVICES='')


def _run(argv, nproc=1, threads=1):
    res = subprocess.run(_command(argv, nproc), cwd=ROOT, env=_env(threads), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _pngs(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder)) if n.endswith('.png')}


def test_help_shows_the_defaults():
    from train_support import assert_help_shows_defaults
    assert_help_shows_defaults(sample.get_parser(), {'--cfg': 1.5, '--top_k': 900, '--top_p': 0.96, '--more_smooth': 0,
                                                     '--per_class': 50})


def test_image_seed_is_a_pure_function():
    seeds = {draw.image_seed(0, c, i, k) for c in range(10) for i in range(10) for k in range(3)}
    assert len(seeds) == 300 and all(0 <= s < 2 ** 63 for s in seeds)
    assert draw.image_seed(0, 3, 4) == draw.image_seed(0, 3, 4, 0) != draw.image_seed(1, 3, 4)


def test_to_uint8_truncates_x_times_255():
    """The demo's rule: x*255 in float32, then truncated toward 0 (not rounded), channels last."""
    x = torch.tensor([0.0, 0.999, 1.0, 0.5, 0.3, 1 / 255, 0.0039])
    img_B3HW = torch.stack([x, x.flip(0), x * 0.5]).view(1, 3, 1, -1)
    out = draw.to_uint8_BHW3(img_B3HW)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 7, 3)
    expected = np.floor(img_B3HW.numpy().astype(np.float32) * np.float32(255)).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(out, expected)
    assert out[0, 0, :, 0].tolist() == [0, 254, 255, 127, 76, 1, 0]  # 254.7 -> 254, 127.5 -> 127, 0.99 -> 0
    half = draw.to_uint8_BHW3(torch.full((1, 3, 1, 1), 0.999, dtype=torch.float16))  # widened first, then x255
    assert half.tolist() == [[[[254, 254, 254]]]]


def test_rejection_candidates_get_their_own_seeds(monkeypatch):
    """Candidate k of image (c, i) is drawn with image_seed(seed, c, i, k): best-of-N compares N different images, and
    candidate 0 is the image drawn without rejection."""
    from sampling.settings import SamplingSettings
    calls = []

    def fake_sample_uint8(var, labels, seeds, settings):
        calls.append((list(labels), list(seeds)))
        return np.zeros((len(labels), 2, 2, 3), np.uint8)
    monkeypatch.setattr(draw, 'sample_uint8', fake_sample_uint8)
    classifier = lambda img_BHW3: torch.full((len(img_BHW3), 10), 0.1)  # noqa: E731
    items = [(3, 0), (3, 1), (7, 0)]
    settings = SamplingSettings(seed=5)
    draw.sample_items(None, items, settings, classifier, candidates=3)
    assert calls == [([3, 3, 7], [draw.image_seed(5, c, i, k) for c, i in items]) for k in range(3)]
    assert len({s for _, seeds in calls for s in seeds}) == 9  # no two candidates (or images) share a seed
    calls.clear()
    draw.sample_items(None, items, settings, None)
    assert calls == [([3, 3, 7], [draw.image_seed(5, c, i, 0) for c, i in items])]


# ------------------------------------------------------------------------------------------------------- grid mode
def test_grid_png_matches_fid_images(tiny_ckpt, tmp_path):
    _main('--ckpt', tiny_ckpt, '--classes', '3,3,5,7', '--nrow', '2', '--bs', '2', '--out', tmp_path / 'grid.png')
    grid = np.asarray(Image.open(tmp_path / 'grid.png'))
    assert grid.shape == (2 + 2 * 66, 2 + 2 * 66, 3)  # 2x2 tiles of 64px with 2px padding
    # The k-th repeat of a class in a grid is image k of that class in the FID export (same seeds, same batch size).
    _main('--ckpt', tiny_ckpt, '--mode', 'fid', '--classes', '3,5', '--per_class', '2', '--bs', '2',
          '--out', tmp_path / 'fid')
    assert np.array_equal(grid[2:66, 2:66], np.asarray(Image.open(tmp_path / 'fid' / '0003_00000.png')))
    assert np.array_equal(grid[2:66, 68:132], np.asarray(Image.open(tmp_path / 'fid' / '0003_00001.png')))
    assert not np.array_equal(grid[2:66, 2:66], grid[2:66, 68:132])
    assert np.load(tmp_path / 'fid.npz')['arr_0'].shape == (4, 64, 64, 3)


def test_grid_shows_progress(tiny_ckpt, tmp_path, capsys):
    _main('--ckpt', tiny_ckpt, '--classes', '1,2,3', '--bs', '2', '--out', tmp_path / 'grid.png')
    out = capsys.readouterr().out
    assert re.search(r'sampling: 100%.*\| 3/3 \[', out), out  # images done, then the elapsed time and the ETA
    assert out.index('3/3') < out.index('wrote')


def test_grid_is_saved_in_the_format_of_its_extension(tiny_ckpt, tmp_path):
    for name, fmt in (('grid.jpg', 'JPEG'), ('grid.WEBP', 'WEBP'), ('grid', 'PNG')):  # no extension: PNG
        _main('--ckpt', tiny_ckpt, '--classes', '1,2', '--out', tmp_path / name)
        with Image.open(tmp_path / name) as img:
            assert (img.format, img.size) == (fmt, (134, 68)), name
    for name, match in (('grid.xyz', '.xyz is not an image extension'), ('grid.mpg', 'cannot write RGB images')):
        with pytest.raises(SystemExit, match=f'error: --out .*{name}: .*{match}'):
            _main('--ckpt', tiny_ckpt, '--classes', '1', '--out', tmp_path / name)
        assert not (tmp_path / name).exists()


# ------------------------------------------------------------------------------------------------ FID export, processes
@pytest.mark.slow
def test_fid_export_1_vs_2_processes_and_restart_after_a_kill(tiny_ckpt, tmp_path):
    """One process (this one) writes the reference. A second run is killed (SIGKILL) as soon as images appear, loses
    one image and leaves a half-written file; a 2-process restart completes it. Every PNG and the npz must equal the
    reference byte for byte: most of the images of the restarted run come from 2 processes, the rest from the killed
    one. Every process computes with 2 intra-op threads (OMP_NUM_THREADS=2 for torchrun's workers, which would get 1
    each by default): the promise holds for any thread count that is the same in every run (one thread: the
    pre-tokenisation's 1 vs 2 processes, tests/training/test_pretok.py)."""
    one, resumed = tmp_path / 'one', tmp_path / 'resumed'
    with support.intra_op_threads(2):  # the arithmetic of the OMP_NUM_THREADS=2 processes below
        _main('--ckpt', tiny_ckpt, *FID_ARGS, '--out', one)
    ref = _pngs(one)
    assert len(ref) == 40 and sorted(os.listdir(one)) == sorted(ref) + ['manifest.json']
    arr = np.load(tmp_path / 'one.npz')['arr_0']
    assert arr.shape == (40, 64, 64, 3) and arr.dtype == np.uint8
    order = evaluation_order(str(one / n) for n in ref)  # the classes mixed, for the Inception Score's splits
    assert [os.path.basename(p) for p in order] != sorted(ref)
    for k, p in enumerate(order):
        assert np.array_equal(arr[k], np.asarray(Image.open(p)))

    proc = subprocess.Popen(_command(['--ckpt', tiny_ckpt, *FID_ARGS, '--out', resumed], 1), cwd=ROOT, env=_env(2),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline and len(_pngs(resumed) if resumed.exists() else {}) < 2:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _pngs(resumed)
    assert 2 <= len(partial) < 20, 'the run finished before it could be killed'
    assert not (tmp_path / 'resumed.npz').exists()
    os.remove(resumed / sorted(partial)[0])
    (resumed / '0009_00003.png.tmp123').write_bytes(b'half an image')
    kept = {n: os.stat(resumed / n).st_mtime_ns for n in sorted(partial)[1:]}

    res = _run(['--ckpt', tiny_ckpt, *FID_ARGS, '--out', resumed], nproc=2, threads=2)
    assert f'{len(partial) - 1} of 40 images already on disk' in res.stdout
    assert _pngs(resumed) == ref  # no gaps, no duplicates, the same bytes
    assert sorted(os.listdir(resumed)) == sorted(ref) + ['manifest.json']  # the half-written file is gone
    assert {n: os.stat(resumed / n).st_mtime_ns for n in kept} == kept  # finished images were not rewritten
    assert (tmp_path / 'resumed.npz').read_bytes() == (tmp_path / 'one.npz').read_bytes()


def test_fid_images_do_not_depend_on_the_batch_size(tiny_ckpt, tmp_path):
    """Every image has its own generator: batches of 1 and of 3 draw the same tokens. The pixels may differ by one level
    where the decoder's float32 convolutions round differently for another batch size before the truncation."""
    args = ['--ckpt', tiny_ckpt, '--mode', 'fid', '--classes', '2,5,7', '--per_class', '2']
    _main(*args, '--bs', '1', '--out', tmp_path / 'b1')
    _main(*args, '--bs', '3', '--out', tmp_path / 'b3')
    b1, b3 = _pngs(tmp_path / 'b1'), _pngs(tmp_path / 'b3')
    assert len(b1) == 6 and b1.keys() == b3.keys()
    for n in b1:
        diff = np.abs(np.asarray(Image.open(tmp_path / 'b1' / n)).astype(int)
                      - np.asarray(Image.open(tmp_path / 'b3' / n)).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (n, diff.max(), (diff > 0).mean())


def test_fid_export_recovers_from_an_empty_png_and_a_killed_npz_write(tiny_ckpt, tmp_path, capsys):
    args = ['--ckpt', tiny_ckpt, '--mode', 'fid', '--classes', '1,4', '--per_class', '2', '--bs', '2']
    out = tmp_path / 'fid'
    _main(*args, '--out', out)
    ref = _pngs(out)
    npz = (tmp_path / 'fid.npz').read_bytes()
    (out / '0004_00001.png').write_bytes(b'')  # what a machine crash can leave
    (tmp_path / 'fid.npz').unlink()
    with open(npz_tmp_path(str(tmp_path / 'fid.npz')), 'wb') as f:
        f.write(npz[:1000])  # a killed npz write
    _main(*args, '--out', out)
    assert _pngs(out) == ref and (tmp_path / 'fid.npz').read_bytes() == npz
    assert not os.path.exists(npz_tmp_path(str(tmp_path / 'fid.npz')))
    assert '3 of 4 images already on disk' in capsys.readouterr().out

    (out / '0001_00000.png').write_bytes(b'\x89PNG broken')  # unreadable but not empty: found when packing
    (tmp_path / 'fid.npz').unlink()
    with pytest.raises(SystemExit, match='0001_00000.png.*deleted: re-run the same command'):
        _main(*args, '--out', out)
    assert not (out / '0001_00000.png').exists()
    _main(*args, '--out', out)
    assert _pngs(out) == ref and (tmp_path / 'fid.npz').read_bytes() == npz


# ------------------------------------------------------------------------------------------------------ rejection
def test_grid_with_classifier_rejection(tiny_ckpt, tmp_path):
    import torchvision
    torch.manual_seed(0)
    clf = tmp_path / 'mobilenet.pth'
    torch.save(torchvision.models.get_model('mobilenet_v3_small', weights=None).state_dict(), clf)
    _main('--ckpt', tiny_ckpt, '--classes', '1,2', '--out', tmp_path / 'rej.png', '--classifier_ckpt', clf,
          '--classifier_arch', 'mobilenet_v3_small', '--rej_candidates', '2')
    assert Image.open(tmp_path / 'rej.png').size == (134, 68)
    with pytest.raises(SystemExit, match='does not fit torchvision resnet18'):
        _main('--ckpt', tiny_ckpt, '--classes', '1', '--out', tmp_path / 'x.png', '--classifier_ckpt', clf,
              '--classifier_arch', 'resnet18')
    with pytest.raises(SystemExit, match='not a torchvision model'):
        _main('--ckpt', tiny_ckpt, '--classes', '1', '--out', tmp_path / 'x.png', '--classifier_ckpt', clf,
              '--classifier_arch', 'no_such_net')


# -------------------------------------------------------------------------------------------------------- bad input
def test_bad_model_inputs(tiny_ckpt, tmp_path):
    with pytest.raises(SystemExit, match='unknown model'):
        _main('--depth', '17', '--classes', '1', '--out', tmp_path / 'g.png')
    with pytest.raises(SystemExit, match=r'\[10, 12\] are out of range.*0\.\.9'):
        _main('--ckpt', tiny_ckpt, '--classes', '3,10,12', '--out', tmp_path / 'g.png')
    with pytest.raises(SystemExit, match='does not exist'):
        _main('--ckpt', tmp_path / 'missing.pth', '--classes', '1', '--out', tmp_path / 'g.png')
    (tmp_path / 'junk.pth').write_bytes(b'this is not a checkpoint')
    with pytest.raises(SystemExit, match='cannot load .*junk.pth'):
        _main('--ckpt', tmp_path / 'junk.pth', '--classes', '1', '--out', tmp_path / 'g.png')
    with pytest.raises(SystemExit, match='needs --classes'):
        _main('--ckpt', tiny_ckpt, '--out', tmp_path / 'g.png')
    with pytest.raises(SystemExit, match='do not combine'):
        _main('--ckpt', tiny_ckpt, '--var_ckpt', tiny_ckpt, '--classes', '1', '--out', tmp_path / 'g.png')
    assert not (tmp_path / 'g.png').exists()


@pytest.mark.parametrize('flag, value, match', [
    ('--top_p', '1.5', r'--top_p must lie in \[0, 1\] .*got 1.5'),
    ('--top_p', '-0.1', r'--top_p must lie in \[0, 1\] .*got -0.1'),
    ('--top_k', '-1', '--top_k must be >= 0 .*got -1'),
    ('--cfg', '-2', '--cfg must be >= 0 .*got -2'),
    ('--cfg', 'nan', '--cfg must be >= 0 .*got nan'),
])
def test_bad_sampling_values(tiny_ckpt, tmp_path, flag, value, match):
    with pytest.raises(SystemExit, match=f'^error: {match}$'):
        _main('--ckpt', tiny_ckpt, '--classes', '1', flag, value, '--out', tmp_path / 'g.png')
    assert not (tmp_path / 'g.png').exists()


def test_sampling_value_limits_are_accepted():
    for extra in (['--top_p', '0', '--top_k', '0', '--cfg', '0'], ['--top_p', '1']):
        sample.check_args(sample.get_parser().parse_args(['--classes', '1', '--out', 'g.png', *extra]))


def test_fid_refuses_a_file_name_as_out(tiny_ckpt, tmp_path):
    for name in ('d16.png', 'd16.JPG', 'd16.npz', 'd16.png/'):
        with pytest.raises(SystemExit, match=r'in fid mode --out names the folder .* use e\.g\. --out .*d16$'):
            _main('--ckpt', tiny_ckpt, *FID_ARGS, '--out', f'{tmp_path}/{name}')
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope='module')
def finished_fid(tiny_ckpt, tmp_path_factory):
    """A finished FID export of 2 images (classes 0 and 1) with the default settings, and its command line."""
    out = tmp_path_factory.mktemp('finished') / 'fid'
    base = ['--ckpt', tiny_ckpt, '--mode', 'fid', '--classes', '0,1', '--per_class', '1', '--out', out]
    _main(*base)
    return out, base


@pytest.mark.parametrize('flag, value, key', [
    ('--top_p', '0.5', 'top_p'), ('--top_k', '5', 'top_k'), ('--cfg', '3', 'cfg'), ('--seed', '1', 'seed'),
    ('--more_smooth', '1', 'more_smooth'), ('--per_class', '2', 'per_class'), ('--classes', '0,2', 'classes'),
])
def test_fid_refuses_to_resume_with_any_setting_that_changes_the_images(finished_fid, flag, value, key):
    out, base = finished_fid
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    with pytest.raises(SystemExit, match=rf'another configuration \({key}: .* on disk, .* now\)'):
        _main(*base, flag, value)  # the last occurrence of a flag wins
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


def test_fid_manifest_names_every_weight_file(tiny_ckpt, tmp_path):
    """A train.py checkpoint with a separate tokenizer (--ckpt with --vae_ckpt, as edit.py always took it): both files'
    hashes are part of the configuration, so that another tokenizer cannot resume the export."""
    vae = tmp_path / 'vae.pth'
    vae.write_bytes(b'tokenizer weights')
    assert fid_export.model_identity(tiny_ckpt, None, None, 16) == {'ckpt_sha256': fid_export.file_sha256(tiny_ckpt)}
    assert fid_export.model_identity(tiny_ckpt, str(vae), None, 16) == {
        'ckpt_sha256': fid_export.file_sha256(tiny_ckpt), 'vae': f'sha256:{fid_export.file_sha256(str(vae))}'}
    hub = fid_export.model_identity(None, None, None, 20)
    assert hub == {'depth': '20', 'vae': 'hub:FoundationVision/var/vae_ch160v4096z32.pth',
                   'var': 'hub:FoundationVision/var/var_d20.pth'}


def test_fid_manifest_survives_a_failed_rewrite(tmp_path, monkeypatch):
    """Each (re)start rewrites manifest.json; a write cut short (disk full, kill) must leave the previous one whole."""
    import json
    out, npz = str(tmp_path / 'fid'), str(tmp_path / 'fid.npz')
    manifest = {'version': fid_export.MANIFEST_VERSION, 'seed': 0, 'cfg': 1.5, 'top_p': 0.96, 'classes': [0, 1]}
    fid_export.prepare_out_dir(out, npz, manifest, set())
    path = os.path.join(out, fid_export.MANIFEST)
    original = open(path).read()
    real_dump = json.dump

    def dump_then_fail(obj, f, **kw):
        f.write(json.dumps(obj, **kw)[:10])
        f.flush()
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(json, 'dump', dump_then_fail)
    with pytest.raises(OSError, match='No space left'):
        fid_export.prepare_out_dir(out, npz, manifest, set())
    assert open(path).read() == original
    monkeypatch.setattr(json, 'dump', real_dump)
    fid_export.prepare_out_dir(out, npz, manifest, set())  # the next start cleans up and goes on
    assert sorted(os.listdir(out)) == [fid_export.MANIFEST]
    with open(path) as f:
        assert json.load(f) == manifest


def test_fid_refuses_to_mix_configurations(tiny_ckpt, tmp_path):
    out = tmp_path / 'fid'
    base = ['--ckpt', tiny_ckpt, '--mode', 'fid', '--classes', '0,1', '--per_class', '1', '--out', out]
    _main(*base)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    npz_before = (tmp_path / 'fid.npz').read_bytes()
    with pytest.raises(SystemExit, match=r"another configuration \(cfg: 1.5 on disk, 2.0 now"):
        _main(*base, '--cfg', '2')
    with pytest.raises(SystemExit, match='another configuration.*classes'):
        _main(*base[:-5], '0,1,2', *base[-4:])
    _main(*base, '--bs', '1')  # the batch size is not part of the configuration: the finished run is reused
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert (tmp_path / 'fid.npz').read_bytes() == npz_before

    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'cat.png').write_bytes(b'')
    with pytest.raises(SystemExit, match='no manifest.json'):
        _main(*base[:-1], tmp_path / 'other')
    with pytest.raises(SystemExit, match='fid.npz exists'):
        _main(*base[:-1], tmp_path / 'new', '--npz', tmp_path / 'fid.npz')
    assert not (tmp_path / 'new').exists()
    with pytest.raises(SystemExit, match='lists a class twice'):
        _main(*base[:-5], '1,1', *base[-4:])


def test_fast_levels_select_the_engine_switches():
    """sample.py --fast: 0 the plain path; 1 compile + per-scale graphs + partial sort; 2 adds the bf16 stream; 3 runs
    the whole loop as one graph. Off CUDA every level is the plain path (the graphs need a GPU)."""
    import torch
    from sampling.draw import fast_switches
    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    assert fast_switches(0, cuda) == {}
    assert fast_switches(1, cuda) == dict(partial_sort=True, compiled=True, cuda_graph=True)
    assert fast_switches(2, cuda) == dict(partial_sort=True, compiled=True, cuda_graph=True,
                                          stream_dtype=torch.bfloat16)
    assert fast_switches(3, cuda) == dict(partial_sort=True, compiled=True, cuda_graph='loop',
                                          stream_dtype=torch.bfloat16)
    assert all(fast_switches(level, cpu) == {} for level in range(4))
