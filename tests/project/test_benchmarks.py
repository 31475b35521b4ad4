"""The benchmarks that run without a GPU: the CPU input-pipeline benchmark end to end, and the shared table; the GPU
ones at least import (they use the sampling engine's API)."""
import importlib
import json

import pytest

from benchmarks.timings.common import print_table

BENCHMARKS = ('timings.bench_data', 'timings.bench_encode', 'timings.bench_sample', 'timings.bench_train',
              'timings.kernel_profile', 'timings.profile_sample', 'analytic.memory_model', 'gpu_checks.fsdp_gpu_check',
              'gpu_checks.synthetic_data')


@pytest.mark.parametrize('name', BENCHMARKS)
def test_every_benchmark_imports_and_has_a_main(name):
    assert callable(importlib.import_module(f'benchmarks.{name}').main)


def test_bench_data_runs_on_real_photos_and_writes_json(tmp_path, capsys):
    from benchmarks.timings import bench_data
    out = tmp_path / 'data.json'
    bench_data.main(['--n', '16', '--batch', '4', '--epochs', '1', '--workers', '0', '--json', str(out)])
    res = json.loads(out.read_text())
    assert res['machine']['torch'] and res['n'] == 16 and len(res['rows']) == 1
    row = res['rows'][0]
    assert row['workers'] == 0 and row['images img/s'] > 0 and row['tokens img/s'] > 0
    assert 'Input pipeline, 256 px' in capsys.readouterr().out


def test_bench_encode_compares_candidates_with_the_official_encode(tmp_path, capsys):
    from benchmarks.timings import bench_encode
    out = tmp_path / 'encode.json'
    bench_encode.main(['--device', 'cpu', '--reso', '64', '--batch', '2', '--ch', '32', '--repeats', '1',
                       '--variants', 'channels_last', '--json', str(out)])
    rows = json.loads(out.read_text())['rows']
    assert [row['variant'] for row in rows] == ['eager', 'channels_last']  # the official path always runs first
    assert rows[0]['ids_equal_%'] == 100 and rows[0]['speedup'] == 1
    assert rows[1]['img_per_s'] > 0 and 0 <= rows[1]['ids_equal_%'] <= 100
    assert 'Tokenizer encode' in capsys.readouterr().out


def test_table_leaves_cells_of_failed_rows_empty(capsys):
    print_table('t', [{'model': 'd36', 'path': 'reference', 'note': 'out of memory'},
                      {'model': 'd36', 'path': 'fast', 'img_per_s': 12.345, 'peak_gib': 150.2}],
                ['model', 'path', 'img_per_s', 'peak_gib', 'note'])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].split() == ['d36', 'reference', 'out', 'of', 'memory']
    assert lines[-1].split() == ['d36', 'fast', '12.3', '150']


def test_transformer_flops_match_a_hand_count():
    """depth 1, width 8 (FFN 32), scales 1 and 2 (1 + 4 tokens), 5 codes of width 2, CFG (2 rows per image)."""
    from benchmarks.analytic.flops import transformer_flops
    f = transformer_flops(1, 8, (1, 2), 5, 2)
    # blocks: (1 + 4) tokens x 2 rows x (8*64 + 4*8*32); attention: 2 rows x 4*8 x (1*1 + 4*5)
    assert f['blocks'] == 10 * 1536 and f['attention'] == 2 * 32 * 21
    # AdaLN 12*8*8 per row and scale; head 2*8*5 per token + its AdaLN 4*8*8 per row and scale
    assert f['adaln'] == 2 * 2 * 768 and f['head'] == 10 * 80 + 2 * 2 * 256
    # the next scale's 4 tokens embedded once (B rows); Phi 18*2*2 per position of the 2x2 last scale, twice
    assert f['embed'] == 4 * 2 * 2 * 8 and f['phi'] == 2 * 4 * 18 * 4
    assert f['total'] == 22304
    assert transformer_flops(1, 8, (1, 2), 5, 2, cfg=False)['blocks'] == 5 * 1536


@pytest.mark.parametrize('shared_aln', [False, True])
def test_sampling_flops_equal_torchs_flop_counter_on_a_real_sample(shared_aln):
    """The whole count against torch's FLOP counter around a real autoregressive_infer_cfg on the CPU, decode
    included. The counter does not see the CPU's fused attention kernel, so that term is compared by hand above."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.analytic.flops import sampling_flops
    from models import build_vae_var
    torch.manual_seed(0)
    vae, var = build_vae_var('cpu', patch_nums=(1, 2, 3, 4), V=64, Cvae=8, ch=32, depth=2, num_classes=10,
                             shared_aln=shared_aln)
    with FlopCounterMode(display=False) as counter:
        var.eval().autoregressive_infer_cfg(B=3, label_B=torch.tensor([1, 2, 3]), g_seed=0, cfg=1.5, top_k=1)
    f = sampling_flops(vae, var)
    assert counter.get_total_flops() / 3 == f['total'] - f['attention']
    assert f['decode'] > f['total'] / 2  # at this size the decoder dominates


def test_teacher_forcing_flops_match_a_hand_count():
    """depth 1, width 8 (FFN 32), scales 1 and 2 (1 + 4 = 5 tokens), 5 codes of width 2, one row per image."""
    from benchmarks.analytic.flops import teacher_forcing_flops
    f = teacher_forcing_flops(1, 8, (1, 2), 5, 2)
    assert f['blocks'] == 5 * 1536 and f['adaln'] == 768 and f['head'] == 5 * 80 + 256
    # the sos token sees itself; the 4 tokens of scale 2 see all 5; word_embed on the 4 teacher-forcing tokens
    assert f['attention'] == 1 * 32 * 1 + 4 * 32 * 5 and f['embed'] == 4 * 2 * 2 * 8
    assert f['total'] == 5 * 1536 + 768 + 656 + 672 + 128


def test_training_flops_equal_torchs_flop_counter_on_a_real_step():
    """Forward and backward of a real training step, and the tokenisation of real-size images, under torch's FLOP
    counter on the CPU (whose fused attention kernel the counter does not see: that term is the hand count's)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.analytic.flops import training_flops
    from models import build_vae_var
    torch.manual_seed(0)
    vae, var = build_vae_var('cpu', patch_nums=(1, 2, 3, 4), V=64, Cvae=8, ch=32, depth=2, num_classes=10)
    B = 3
    with FlopCounterMode(display=False) as encode, torch.no_grad():
        idx_Bl = vae.img_to_idxBl(torch.rand(B, 3, 64, 64) * 2 - 1)
        x_BLCv = vae.quantize.idxBl_to_var_input(idx_Bl)
    with FlopCounterMode(display=False) as step:
        logits_BLV = var.train()(torch.tensor([1, 2, 3]), x_BLCv)
        F.cross_entropy(logits_BLV.view(-1, var.V), torch.cat(idx_Bl, 1).view(-1)).backward()
    f = training_flops(vae, var)
    assert encode.get_total_flops() / B == f['encode'] > 0
    assert step.get_total_flops() / B == f['forward'] + f['backward'] - f['attention']
    assert f['total'] == f['forward'] + f['backward'] + f['encode']
    assert training_flops(vae, var, with_encode=False)['encode'] == 0


def test_device_peaks():
    from benchmarks.analytic.flops import device_peak_tflops
    assert device_peak_tflops('NVIDIA H200') == 790 and device_peak_tflops('NVIDIA H100 80GB HBM3') == 989
    assert device_peak_tflops('some new GPU') == 0


def test_synthetic_data_of_the_gpu_checks_is_an_image_folder(tmp_path):
    from PIL import Image

    from benchmarks.gpu_checks import synthetic_data
    from utils.data import build_dataset
    assert synthetic_data.main(['--out', str(tmp_path), '--train', '8', '--val', '4', '--size', '40x30']) == 0
    files = sorted(tmp_path.rglob('*.jpg'))
    assert len(files) == 12 and {f.parent.name for f in files} == {f'class{c}' for c in range(4)}
    assert Image.open(files[0]).size == (40, 30)
    num_classes, train_set, val_set = build_dataset(str(tmp_path), final_reso=16)  # what train.py reads
    assert (num_classes, len(train_set), len(val_set)) == (4, 8, 4) and train_set[0][0].shape == (3, 16, 16)


def _suite_commands(script: str):
    """The `python -m benchmarks.PACKAGE.NAME ARGS` commands of a GPU script (continuation lines joined, $OUT and $PY
    read as a folder and python) -> [(name, argv)], and the sum of its step time limits."""
    import re
    import shlex
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / 'benchmarks' / script).read_text().replace('\\\n', ' ')
    commands, limit_s = [], 0
    for line in text.splitlines():
        step = re.match(r'\s*step \S+ (\d+) ', line)
        limit_s += int(step.group(1)) if step else 0
        found = re.search(r'-m benchmarks\.([\w.]+)(.*?)(?:>|$)', line.split('#')[0])
        if found:
            argv = shlex.split(found.group(2).replace('"$OUT', '"/tmp/suite_out'))
            commands.append((found.group(1), argv))
    return commands, limit_s


@pytest.mark.parametrize('script', ['gpu_suite.sh', 'fsdp_gpu_check.sh', 'gpu_checks/gpu_train_check.sh'])
def test_gpu_scripts_pass_flags_their_benchmarks_accept(script, monkeypatch):
    """Before a GPU's minutes are spent: every benchmark a GPU script runs accepts its flags (each main is stopped
    right after its parser has read them), and the suite's step limits fit the device tool's 600 s per command."""
    import argparse
    commands, limit_s = _suite_commands(script)
    assert commands
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)  # a wrong flag exits with code 2 here
        raise SystemExit('flags parsed')
    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', parse_then_stop)
    for name, argv in commands:
        module = importlib.import_module(f'benchmarks.{name}')
        with pytest.raises(SystemExit) as stop:
            module.main(argv)
        assert stop.value.code == 'flags parsed', (name, argv, stop.value.code)
    if script == 'gpu_suite.sh':
        assert 0 < limit_s <= 595
