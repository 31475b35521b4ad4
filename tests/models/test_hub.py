"""Whole-model folders (models/model_folder.py, the hub.py script), the official VARHF, and loading that never runs
code from a file.

Everything offline: folders on disk, a Hub cache laid out by hand, and an upload function that records its files.
"""
import argparse
import contextlib
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

import support
from support import assert_equal_up_to_rounding, rounding_chain, shared_path

import hub
import sample
from models import load_checkpoint_models, model_folder, read_checkpoint
from models.loading import UnsafeCheckpointError
from models.var import VARHF

# the keys the official VARHF mixin writes to config.json: its constructor's parameters
OFFICIAL_VARHF_KEYS = {'vae_kwargs', 'num_classes', 'depth', 'embed_dim', 'num_heads', 'mlp_ratio', 'drop_rate',
                       'attn_drop_rate', 'drop_path_rate', 'norm_eps', 'shared_aln', 'cond_drop_rate',
                       'attn_l2_norm', 'patch_nums', 'flash_if_available', 'fused_if_available'}
NAMES = [f'kind {i}' for i in range(10)]


def _cli(module, *argv):
    """A script's main() in this process -> (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _draw(var, seed=3):
    with torch.inference_mode():
        return var.autoregressive_infer_cfg(B=2, label_B=torch.tensor([1, 7]), g_seed=seed, cfg=2.0, top_k=10,
                                            top_p=0.9)


def test_the_config_keys_are_the_official_constructor_arguments():
    """One list of VAR's configuration keys (models.loading.VAR_ARG_KEYS, read from the constructor): VAR.config's
    keys, and with `vae_kwargs` the keys the official VARHF writes."""
    from models import build_vae_var
    from models.loading import VAR_ARG_KEYS
    _, var = build_vae_var('meta', patch_nums=(1, 2), V=16, Cvae=4, ch=32, depth=1, num_classes=10)
    assert tuple(var.config) == VAR_ARG_KEYS and set(VAR_ARG_KEYS) | {'vae_kwargs'} == OFFICIAL_VARHF_KEYS


def _assert_same_tensors(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture
def train_ckpt(tiny_models, tmp_path):
    """A checkpoint as this project's train.py writes it (training state included), with class names."""
    vae, var = tiny_models
    path = tmp_path / 'ar-ckpt-best.pth'
    torch.save({'epoch': 3, 'iter': 0,
                'trainer': {'var_wo_ddp': var.state_dict(), 'vae_local': vae.state_dict(), 'var_opt': {}},
                'args': {'data_path': '/data/kinds', 'depth': 2, 'width': 128, 'pn': '1_2_3_4', 'bs': 64,
                         'ep': 30, 'tblr': 1e-4, 'fp16': 2, 'hflip': True, 'tlr': None},
                'derived': {'world_size': 2}, 'best': {'vL_mean': 3.25, 'vacc_mean': 12.5},
                'model_config': dict(var.build_config), 'vae_config': vae.config, 'class_names': NAMES}, path)
    return path


@pytest.fixture
def folder(train_ckpt, tmp_path):
    out = tmp_path / 'folder'
    code, stdout, err = _cli(hub, 'save', out, '--ckpt', train_ckpt)
    assert code == 0, err
    return out


def test_official_files_to_folder_and_back_bit_for_bit(tmp_path):
    """Official-format .pth files (the golden tiny config) -> folder -> the official outputs; folder -> .pth files
    with the same tensors, dtypes included; the official VARHF reads the folder's VAR."""
    g = torch.load(shared_path('golden', 'tiny_pn4.pt'), map_location='cpu', weights_only=False)
    torch.save(g['vae_state_dict'], tmp_path / 'vae.pth')
    torch.save(g['var_state_dict'], tmp_path / 'var.pth')
    code, _, err = _cli(hub, 'save', tmp_path / 'f', '--ckpt', tmp_path / 'var.pth',
                        '--vae_ckpt', tmp_path / 'vae.pth')
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / 'f')) == ['README.md', 'config.json', 'model.safetensors', 'vae.safetensors']

    vae, var = model_folder.from_pretrained(tmp_path / 'f')
    var.cond_drop_rate = 0.0
    out, inp = g['outputs'], g['inputs']
    with torch.no_grad():
        # the official code's float32 logits on another machine: the same math, other kernels
        assert_equal_up_to_rounding(var(inp['label_B'], out['idxBl_to_var_input']), out['var_forward_logits'],
                                    **rounding_chain(var, longest_sum=var.L))
        img = var.autoregressive_infer_cfg(B=inp['label_B'].shape[0], label_B=inp['label_B'], g_seed=0, cfg=1.5,
                                           top_k=1, top_p=0.0)
        # the golden conformance's documented tolerance for sampled images (../shared/tools/conformance.py)
        torch.testing.assert_close(img, out['greedy_cfg1.5_img'], rtol=1e-2, atol=2e-3)
        assert all(torch.equal(a, b) for a, b in zip(vae.img_to_idxBl(inp['img_B3HW']), out['img_to_idxBl']))

    code, stdout, err = _cli(hub, 'export', tmp_path / 'f', tmp_path / 'back')
    assert code == 0, err
    _assert_same_tensors(torch.load(tmp_path / 'back' / 'vae_ch32v64z8.pth', weights_only=True), g['vae_state_dict'])
    _assert_same_tensors(torch.load(tmp_path / 'back' / 'var_d2.pth', weights_only=True), g['var_state_dict'])
    _, var_back = load_checkpoint_models(tmp_path / 'back' / 'var_d2-model.pth')
    _assert_same_tensors(var_back.state_dict(), var.state_dict())

    cfg = json.loads((tmp_path / 'f' / 'config.json').read_text())
    assert OFFICIAL_VARHF_KEYS <= set(cfg) and cfg['patch_nums'] == [1, 2, 3, 4] and cfg['depth'] == 2
    official = VARHF.from_pretrained(tmp_path / 'f')
    _assert_same_tensors(official.state_dict(), var.state_dict())


def test_varhf_writes_the_official_config_keys(tmp_path):
    """VARHF as officially: the mixin's config.json holds vae_kwargs and the VAR arguments, the VAR weights round-trip
    (the tokenizer is not saved: the official flaw, kept for code written against the class)."""
    torch.manual_seed(0)
    m = VARHF(dict(vocab_size=64, z_channels=8, ch=32, v_patch_nums=(1, 2, 3)), num_classes=3, depth=2,
              embed_dim=64, num_heads=2, patch_nums=(1, 2, 3))
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    assert set(cfg) == OFFICIAL_VARHF_KEYS and cfg['vae_kwargs']['ch'] == 32 and cfg['patch_nums'] == [1, 2, 3]
    again = VARHF.from_pretrained(tmp_path)
    _assert_same_tensors(again.state_dict(), m.state_dict())
    assert not os.path.exists(tmp_path / 'vae.safetensors')
    # our loader reads that folder too when given the tokenizer
    vae_path = tmp_path / 'vae.pth'
    torch.save(m.vae_proxy[0].state_dict(), vae_path)
    with pytest.raises(model_folder.FolderError, match='holds no tokenizer weights'):
        model_folder.from_pretrained(tmp_path)
    vae, var = model_folder.from_pretrained(tmp_path, vae_path=str(vae_path))
    _assert_same_tensors(var.state_dict(), m.state_dict())


def test_training_checkpoint_to_folder_samples_the_same(folder, train_ckpt, tiny_models, tmp_path):
    """A train.py checkpoint -> folder: the same samples for a seed, the class names in config.json, and a card in
    the Hub's format with the training command (it parses back to the run's flags) and the validation metrics."""
    _, var_ref = load_checkpoint_models(train_ckpt)
    vae, var = model_folder.from_pretrained(folder)
    torch.testing.assert_close(_draw(var), _draw(var_ref), rtol=0, atol=0)
    cfg = json.loads((folder / 'config.json').read_text())
    assert cfg['class_names'] == NAMES and cfg['sampling'] == dict(cfg=1.5, top_k=900, top_p=0.96, more_smooth=False)

    from huggingface_hub import ModelCard
    card = ModelCard.load(folder / 'README.md')
    assert 'var' in card.data.tags and card.data.library_name == 'pytorch'
    command = card.text.split('```bash\n')[1].split('\n```')[0]
    assert command.startswith('torchrun --nproc_per_node=2 train.py ')
    from utils.arg_util import build_parser
    parsed = build_parser().parse_args(command.split()[3:])
    assert (parsed.data_path, parsed.depth, parsed.width, parsed.bs, parsed.ep, parsed.hflip) == \
        ('/data/kinds', 2, 128, 64, 30, True)
    assert '--tblr' not in command and '--fp16=2' in command  # defaults are left out
    assert '| validation (train.py) vL_mean | 3.25 |' in card.text and 'kind 0, kind 1' in card.text


def test_scripts_take_a_folder_and_a_repo_id_from_an_offline_hub_cache(folder, tmp_path, monkeypatch):
    """sample.py --ckpt FOLDER, and --ckpt OWNER/NAME read from a Hub cache in the Hub's offline mode (HF_HUB_OFFLINE=1,
    no --local_files_only), draw the same grid as the train.py checkpoint it came from."""
    import huggingface_hub.constants
    cache = tmp_path / 'hf-cache'
    commit = '0123456789abcdef0123456789abcdef01234567'
    snap = cache / 'models--someone--tiny-var' / 'snapshots' / commit
    snap.mkdir(parents=True)
    for name in os.listdir(folder):
        (snap / name).write_bytes((folder / name).read_bytes())
    (cache / 'models--someone--tiny-var' / 'refs').mkdir()
    (cache / 'models--someone--tiny-var' / 'refs' / 'main').write_text(commit)

    _, var = model_folder.from_pretrained('someone/tiny-var', cache_dir=str(cache), local_files_only=True)
    _, var_ref = model_folder.from_pretrained(folder)
    _assert_same_tensors(var.state_dict(), var_ref.state_dict())

    grid = ['--classes', '1,2', '--top_k', '5', '--seed', '4', '--nrow', '2', '--device', 'cpu']
    code, _, err = _cli(sample, '--ckpt', folder, '--out', tmp_path / 'folder.png', *grid)
    assert code == 0, err
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)  # what HF_HUB_OFFLINE=1 sets at import
    code, _, err = _cli(sample, '--ckpt', 'someone/tiny-var', '--cache_dir', cache, '--out', tmp_path / 'hub.png',
                        *grid)
    assert code == 0, err
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / 'folder.png')), np.asarray(Image.open(tmp_path / 'hub.png')))

    code, _, err = _cli(sample, '--ckpt', 'nobody/absent', '--cache_dir', cache, '--local_files_only', '--classes', '1',
                        '--out', tmp_path / 'x.png')
    assert code == 2 and 'nobody/absent' in err and 'Traceback' not in err


def test_push_to_hub_uploads_the_checked_folder(folder, monkeypatch):
    """`hub.py push` up to the upload call: the repo is created, and the upload gets the folder's four files."""
    from huggingface_hub import HfApi
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(('create', repo_id, kw.get('private')))

    def upload_folder(self, folder_path, repo_id, allow_patterns=None, commit_message=None, **kw):
        files = sorted(n for n in os.listdir(folder_path) if n in (allow_patterns or []))
        calls.append(('upload', repo_id, files, commit_message))
        return argparse.Namespace(oid='c0ffee')

    monkeypatch.setattr(HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(HfApi, 'upload_folder', upload_folder)
    code, stdout, err = _cli(hub, 'push', folder, 'me/tiny-var', '--private')
    assert code == 0, err
    assert calls == [('create', 'me/tiny-var', True),
                     ('upload', 'me/tiny-var', ['README.md', 'config.json', 'model.safetensors', 'vae.safetensors'],
                      'Upload VAR-d2 (VQVAE + VAR, safetensors)')]
    assert 'https://huggingface.co/me/tiny-var' in stdout

    calls.clear()  # a partial folder is refused before anything is uploaded
    os.remove(folder / 'vae.safetensors')
    code, _, err = _cli(hub, 'push', folder, 'me/tiny-var')
    assert code == 2 and 'vae.safetensors' in err and calls == []


def test_corrupt_or_partial_folders_name_the_problem(folder, tmp_path):
    def fails(pattern, path=folder):
        with pytest.raises((model_folder.FolderError, RuntimeError), match=pattern):
            model_folder.from_pretrained(path)

    from safetensors.torch import load_file, save_file
    model_file = folder / 'model.safetensors'
    good = model_file.read_bytes()
    sd = load_file(model_file)
    save_file({**sd, 'blocks.9.extra': torch.zeros(1)}, model_file)
    fails(r'unexpected keys \(1\):\n    blocks.9.extra')
    save_file({k: v for k, v in sd.items() if k != 'head.weight'}, model_file)
    fails(r'missing keys \(1\):\n    head.weight')
    save_file({**sd, 'head.bias': torch.zeros(3)}, model_file)
    fails(r'head.bias: checkpoint \(3,\) vs model \(64,\)')
    model_file.write_bytes(good[:len(good) // 2])
    fails('model.safetensors is not a readable safetensors file')
    os.remove(model_file)
    fails('model.safetensors is missing')
    model_file.write_bytes(good)

    cfg_file = folder / 'config.json'
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, 'depth': 3}))
    fails(r'missing keys \(\d+\):\n    blocks.2.')
    cfg_file.write_text('{"depth": 2')
    fails('config.json is not valid JSON')
    cfg_file.write_text(json.dumps({k: v for k, v in cfg.items() if k != 'vae_kwargs'}))
    fails('lacks vae_kwargs')
    os.remove(cfg_file)
    fails('has no config.json')
    fails('neither a folder nor a Hugging Face Hub repo id', 'not a/valid id')
    fails('is a file', folder / 'README.md')


def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    """A .pth whose unpickling would write a file: every loader refuses it with a clear message, nothing is written
    (the torch zip format and a plain pickle); sample.py --ckpt says so and exits 2."""
    marker = tmp_path / 'pwned'

    class Payload:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)

    torch.save({'trainer': {'var_wo_ddp': {'pos_1LC': torch.zeros(1)}}, 'x': Payload()}, tmp_path / 'evil.pth')
    with open(tmp_path / 'evil_plain.pth', 'wb') as f:
        pickle.dump({'x': Payload()}, f)
    with pytest.raises(UnsafeCheckpointError, match=r'not on the allow-list \(posix.system\)'):
        read_checkpoint(tmp_path / 'evil.pth')
    with pytest.raises(UnsafeCheckpointError, match='could run code'):
        load_checkpoint_models(tmp_path / 'evil_plain.pth')
    code, _, err = _cli(sample, '--ckpt', tmp_path / 'evil.pth', '--out', tmp_path / 'x.png', '--classes', '1')
    assert code == 2 and 'refusing to load' in err and 'Traceback' not in err
    assert not marker.exists()


def test_allow_listed_types_of_older_checkpoints_still_load(tiny_models, tmp_path):
    """Arguments saved as an argparse.Namespace, numpy values and paths are data only: on the allow-list."""
    import pathlib
    vae, var = tiny_models
    torch.save({'trainer': {'var_wo_ddp': var.state_dict(), 'vae_local': vae.state_dict()},
                'args': argparse.Namespace(depth=2, out=pathlib.Path('/runs/x')),
                'metrics': {'fid': np.float64(3.5), 'hist': np.arange(4)},
                'model_config': dict(var.build_config), 'vae_config': vae.config}, tmp_path / 'old.pth')
    ckpt = read_checkpoint(tmp_path / 'old.pth')
    assert ckpt['args'].depth == 2 and float(ckpt['metrics']['fid']) == 3.5
    _, var2 = load_checkpoint_models(tmp_path / 'old.pth')
    _assert_same_tensors(var2.state_dict(), var.state_dict())


def test_no_library_code_unpickles_arbitrary_objects():
    """No torch.load(..., weights_only=False) outside the tests: resume, sampling, editing, the app and the Hub
    code all load through the weights-only unpickler."""
    import ast
    offenders = []
    for path in sorted(support.ROOT.rglob('*.py')):
        rel = path.relative_to(support.ROOT)
        if rel.parts[0] in ('tests', '.venv') or rel.parts[0].startswith('.'):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(rel))):
            if isinstance(node, ast.Call) and any(
                    k.arg == 'weights_only' and not (isinstance(k.value, ast.Constant) and k.value.value is True)
                    for k in node.keywords):
                offenders.append(f'{rel}:{node.lineno}')
    assert offenders == []


def test_save_of_the_official_release_names_the_imagenet_classes(monkeypatch, tmp_path):
    """`hub.py save --depth D` loads through models.load_pretrained (stubbed here with a tiny 1000-class model: the
    released files cannot be downloaded offline) and writes ImageNet's class names and the source into the folder."""
    import models
    from models import build_vae_var
    torch.manual_seed(0)
    vae, var = build_vae_var('cpu', patch_nums=(1, 2), V=16, Cvae=4, ch=32, depth=1, num_classes=1000)
    seen = {}

    def fake_load(depth, **kw):
        seen.update(depth=depth, **kw)
        return vae, var

    monkeypatch.setattr(models, 'load_pretrained', fake_load)
    code, _, err = _cli(hub, 'save', tmp_path / 'f', '--depth', '20', '--local_files_only', '--cfg', '4')
    assert code == 0, err
    assert seen['depth'] == 20 and seen['local_files_only'] is True
    cfg = model_folder.check_folder(str(tmp_path / 'f'))
    assert cfg['class_names'][0] == 'tench' and cfg['sampling']['cfg'] == 4.0
    card = (tmp_path / 'f' / 'README.md').read_text()
    assert 'the official release' in card and 'var_d20.pth' in card and 'cfg=4.0' in card


@pytest.mark.slow
def test_importing_models_loads_neither_the_hub_nor_safetensors():
    """`import models` stays torch-only and offline: VARHF's base class and the folders' formats load on first use."""
    import subprocess
    import sys
    code = ("import sys, models, models.model_folder, models.var; "
            "print(sorted(m for m in ('huggingface_hub', 'safetensors') if m in sys.modules)); "
            "from models.var import VARHF; print('huggingface_hub' in sys.modules)")
    r = subprocess.run([sys.executable, '-c', code], cwd=support.ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ['[]', 'True']
