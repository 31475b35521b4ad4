"""A cache folder of its own for each web-demo server: Gradio keeps every upload (rejected ones too) and every
output image there, and serves them by path. With a folder per server, removed when the server stops, an upload
neither outlives its server nor is served by the next one; the folders of servers that were killed (no clean-up ran)
are removed by the next server that starts. Gradio's `delete_cache` (webapp/ui.py) trims the folder while it runs.
"""
import contextlib
import os
import shutil
import tempfile
import time
from typing import Iterator

PREFIX = 'var-webapp-'


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_servers_folders(base: str) -> list:
    """Delete the cache folders under `base` whose server process (pid in the name) no longer runs."""
    removed = []
    for entry in os.listdir(base) if os.path.isdir(base) else []:
        if not entry.startswith(PREFIX):
            continue
        pid = entry[len(PREFIX):].split('-', 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(base, entry), ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def server_cache_dir() -> Iterator[str]:
    """Point Gradio at a new folder (GRADIO_TEMP_DIR, read when the page is built) for the life of the block; under
    the folder the user chose through GRADIO_TEMP_DIR, if any, else the system's temporary folder."""
    base = os.environ.get('GRADIO_TEMP_DIR') or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    remove_dead_servers_folders(base)
    folder = tempfile.mkdtemp(prefix=f'{PREFIX}{os.getpid()}-', dir=base)
    previous = os.environ.get('GRADIO_TEMP_DIR')
    os.environ['GRADIO_TEMP_DIR'] = folder
    try:
        yield folder
    finally:
        for _ in range(50):  # the server's closing threads may still be writing or deleting files in it
            shutil.rmtree(folder, ignore_errors=True)
            if not os.path.exists(folder):
                break
            time.sleep(0.1)
        if previous is None:
            os.environ.pop('GRADIO_TEMP_DIR', None)
        else:
            os.environ['GRADIO_TEMP_DIR'] = previous
