"""Atomic file writes: a reader sees the old file or the complete new one, never a half-written one.

The one writer of the project. It lives at the bottom of the layers (models/ imports nothing from utils/) so that
model folders, checkpoints, logs, token sets and image sets all write the same way: into a temporary file in the
target's folder (`.NAME.tmp-HOST-PID`, found again by `stale_temp_files`), fsync'ed by default, then renamed over the
target with os.replace (and the folder fsync'ed, so that the rename survives a crash); the temporary file is removed
when the write fails. Plain os and shutil only: importing this module touches nothing.
"""
import contextlib
import glob
import os
import shutil
import socket
from typing import Any, Callable, Iterator, List, Optional


def temp_path(path: str) -> str:
    """The temporary file beside `path` that an atomic write of `path` by this process uses."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f'.{name}.tmp-{socket.gethostname()}-{os.getpid()}')


def stale_temp_files(folder: str) -> List[str]:
    """The temporary files in `folder` of this host's atomic writes (a killed writer leaves its own behind)."""
    return glob.glob(os.path.join(folder, f'.*.tmp-{socket.gethostname()}-*'))


def _fsync_path(path: str) -> None:
    with open(path, 'rb+') as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support syncing a directory
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, fsync: bool = True, tmp: Optional[str] = None) -> Iterator[str]:
    """Yield a temporary path to write `path`'s content to (for writers that take a path: PIL, np.memmap, zipfile);
    on a clean exit it replaces `path`, on an error it is removed. `tmp`: a fixed temporary name instead of
    `temp_path(path)` (it must be in the same folder). `fsync=False`: no fsync of the file or the folder (many small
    files whose loss in a crash is repaired by re-running, e.g. the PNGs of an export)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = tmp or temp_path(path)
    try:
        yield tmp
        if fsync:
            _fsync_path(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str, write: Callable[[Any], None], mode: str = 'wb', fsync: bool = True) -> None:
    """Write `path` through `write(file)` (the file opened with `mode`), atomically; see `atomic_path`."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, mode) as f:
            write(f)


def atomic_copy(src: str, dst: str) -> None:
    """Copy `src` to `dst` atomically, keeping the modification time of `src`."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
        st = os.stat(src)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
