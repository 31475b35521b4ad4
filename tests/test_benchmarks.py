"""The benchmarks that run without a GPU: the CPU input-pipeline benchmark end to end, and the shared table."""
import json
import subprocess
import sys

from benchmarks.common import print_table
from train_fixtures import ROOT, cpu_env


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


def test_table_leaves_cells_of_failed_rows_empty(capsys):
    print_table('t', [{'model': 'd36', 'path': 'reference', 'note': 'out of memory'},
                      {'model': 'd36', 'path': 'fast', 'img_per_s': 12.345, 'peak_gib': 150.2}],
                ['model', 'path', 'img_per_s', 'peak_gib', 'note'])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].split() == ['d36', 'reference', 'out', 'of', 'memory']
    assert lines[-1].split() == ['d36', 'fast', '12.3', '150']
