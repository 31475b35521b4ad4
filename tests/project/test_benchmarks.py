"""The benchmarks that run without a GPU: the CPU input-pipeline benchmark end to end, and the shared table; the GPU
ones at least import (they use the sampling engine's API)."""
import importlib
import json
import subprocess
import sys

import pytest

from benchmarks.common import print_table
from train_support import ROOT, cpu_env

BENCHMARKS = ('bench_data', 'bench_encode', 'bench_sample', 'bench_train', 'kernel_profile', 'profile_sample',
              'memory_model', 'fsdp_gpu_check')


@pytest.mark.parametrize('name', BENCHMARKS)
def test_every_benchmark_imports_and_has_a_main(name):
    assert callable(importlib.import_module(f'benchmarks.{name}').main)


@pytest.mark.slow
def test_bench_data_runs_on_real_photos_and_writes_json(tmp_path):
    out = tmp_path / 'data.json'
    r = subprocess.run([sys.executable, '-m', 'benchmarks.bench_data', '--n', '16', '--batch', '4', '--epochs', '1',
                        '--workers', '0', '--json', str(out)], cwd=ROOT, env=cpu_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res['machine']['torch'] and res['n'] == 16 and len(res['rows']) == 1
    row = res['rows'][0]
    assert row['workers'] == 0 and row['images img/s'] > 0 and row['tokens img/s'] > 0
    assert 'Input pipeline, 256 px' in r.stdout


@pytest.mark.slow
def test_bench_encode_compares_candidates_with_the_official_encode(tmp_path):
    out = tmp_path / 'encode.json'
    r = subprocess.run([sys.executable, '-m', 'benchmarks.bench_encode', '--device', 'cpu', '--reso', '64', '--batch',
                        '2', '--ch', '32', '--repeats', '1', '--variants', 'channels_last', '--json', str(out)],
                       cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())['rows']
    assert [row['variant'] for row in rows] == ['eager', 'channels_last']  # the official path always runs first
    assert rows[0]['ids_equal_%'] == 100 and rows[0]['speedup'] == 1
    assert rows[1]['img_per_s'] > 0 and 0 <= rows[1]['ids_equal_%'] <= 100
    assert 'Tokenizer encode' in r.stdout


def test_table_leaves_cells_of_failed_rows_empty(capsys):
    print_table('t', [{'model': 'd36', 'path': 'reference', 'note': 'out of memory'},
                      {'model': 'd36', 'path': 'fast', 'img_per_s': 12.345, 'peak_gib': 150.2}],
                ['model', 'path', 'img_per_s', 'peak_gib', 'note'])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].split() == ['d36', 'reference', 'out', 'of', 'memory']
    assert lines[-1].split() == ['d36', 'fast', '12.3', '150']
