"""The user-facing pages: the README's set-up commands at the top, relative links and images that resolve, and every
`python -m benchmarks...` command of the pages and GPU scripts naming a module that imports."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / 'README.md', ROOT / 'benchmarks' / 'RESULTS.md', *sorted((ROOT / 'docs').glob('*.md'))]
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')


def test_readme_opens_with_the_two_set_up_commands_and_stays_short():
    text = (ROOT / 'README.md').read_text()
    first_block = text.split('```bash\n', 1)[1].split('```', 1)[0].splitlines()
    assert [line.split()[:2] for line in first_block] == [['make', 'demo'], ['make', 'test']]
    assert len(text.splitlines()) <= 260


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_resolve(page):
    text = re.sub(r'```.*?```', '', page.read_text(), flags=re.S)  # links inside code blocks are not links
    targets = [t for t in LINK.findall(text) if not re.match(r'[a-z]+:', t) and not t.startswith('#')]
    missing = [t for t in targets if not (page.parent / t.split('#')[0]).exists()]
    assert not missing, missing


def test_benchmark_commands_name_modules_that_import():
    files = [*PAGES, *(ROOT / 'benchmarks').rglob('*.sh'), *(ROOT / 'benchmarks').rglob('*.py')]
    names = {m for f in files for m in re.findall(r'-m (benchmarks(?:\.[a-z_]+)+)', f.read_text())}
    assert 'benchmarks.timings.bench_sample' in names
    for name in sorted(names):
        assert callable(importlib.import_module(name).main), name
