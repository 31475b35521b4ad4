"""One run per output folder: a lock that a training run holds on its folder while it runs.

Two runs pointed at the same folder would both write `ar-ckpt-last.pth`, `steps.jsonl` and the logs, each overwriting
the other's work while both exit 0. The lock is an exclusive `flock` on `<folder>/.run.lock`: the kernel releases it
when its holder ends in any way (a SIGKILL, a crashed node's reboot), so a dead run's lock never blocks the next one
and nothing needs cleaning up, while a stopped or hung run keeps it (its processes still exist: end them first). The
file also holds its holder's host, pid, start time and command, which a refused run quotes.

Network file systems mostly support `flock` (NFS forwards it to the server as a POSIX lock; Lustre needs its `flock`
mount option). Where a file system refuses it, the lock falls back to the file's contents: a live process of this
host named there holds the folder; one of another host cannot be checked, and the run warns and goes on.
"""
import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any, Dict, List, Optional

LOCK_NAME = '.run.lock'
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class FolderLockedError(RuntimeError):
    """Another live run holds the output folder."""


def _describe(holder: Dict[str, Any]) -> str:
    if not holder:
        return 'another run (its lock file names no holder yet)'
    started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))
    return (f'the run of pid {holder.get("pid")} on host {holder.get("host")}, started {started}: '
            f'{holder.get("cmd", "?")}')


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class FolderLock:
    """`acquire()` takes the folder (FolderLockedError names the holder when a live run has it); `release()` gives
    it back (also done by the kernel when the process ends). Only one process of a job (rank 0) takes it."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = None
        self.notes: List[str] = []  # what the caller should tell the user (a file system without flock)

    def read_holder(self) -> Dict[str, Any]:
        try:
            with open(self.path) as f:
                return json.loads(f.read() or '{}')
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderLockedError(
                f'the output folder {os.path.dirname(self.path)} is in use by {_describe(self.read_holder())}. Two '
                f'runs in one folder overwrite each other\'s checkpoints and logs: wait for it to end (or stop it), '
                f'or give this run another --local_out_dir_path') from None
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                os.close(fd)
                raise
            self._check_holder_without_flock()
        self._fd = fd
        me = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time(), 'cmd': ' '.join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)

    def _check_holder_without_flock(self) -> None:
        holder = self.read_holder()
        if not holder or holder.get('pid') == os.getpid():
            return
        if holder.get('host') == socket.gethostname():
            if _pid_alive(int(holder.get('pid', -1))):
                raise FolderLockedError(f'the output folder {os.path.dirname(self.path)} is in use by '
                                        f'{_describe(holder)}; give this run another --local_out_dir_path')
            return  # a dead run's file
        self.notes.append(f'this file system does not lock files; {self.path} names {_describe(holder)}, which '
                          f'cannot be checked from here: make sure it has ended')

    def __del__(self) -> None:  # a run whose set-up failed lets go of the folder when it is collected
        self.release()

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
