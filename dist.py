"""Thin, stateless helpers over torch.distributed.

Every helper asks `torch.distributed.is_initialized()` at call time, so the same code runs under torchrun (any number
of processes and nodes) and as a plain single process, where the collectives are no-ops or identities. Nothing here
moves a tensor between devices: NCCL needs CUDA tensors, gloo takes CPU tensors; the caller picks the device.
"""
import datetime
import os
from typing import List, Optional

import torch
import torch.distributed as tdist


def backend_for(device: str = '', cuda_available: Optional[bool] = None) -> str:
    """The process-group backend for a run on `device` ('' or 'cuda...': this rank's GPU if any; 'cpu'; ...).

    NCCL reduces only CUDA tensors, so a run on the CPU uses gloo even when a GPU is visible; a GPU run uses NCCL.
    The one rule every entry point follows (through `initialize(device=...)`).
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    kind = torch.device(device).type if device else ('cuda' if cuda_available else 'cpu')
    return 'nccl' if kind == 'cuda' and cuda_available else 'gloo'


def initialize(backend: Optional[str] = None, timeout_minutes: int = 30, device: str = '') -> None:
    """Join the process group described by the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Without those variables (a plain `python train.py`) this does nothing. The backend defaults to
    `backend_for(device)`: NCCL for a CUDA run, gloo for a CPU run (`device='cpu'`, or no CUDA). On a CUDA run each
    process binds to its LOCAL_RANK device.
    """
    if tdist.is_initialized() or 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return
    if backend is None:
        backend = backend_for(device)
    if torch.cuda.is_available() and (not device or torch.device(device).type == 'cuda'):
        torch.cuda.set_device(get_local_rank() % torch.cuda.device_count())
    tdist.init_process_group(backend=backend, init_method='env://', timeout=datetime.timedelta(minutes=timeout_minutes))


def finalize() -> None:
    """Destroy the process group. Call it once nothing else holds the group (a DDP or FSDP model, a device mesh: see
    utils.run.main_of): the group goes with its last reference, and with it gloo's worker threads end here, not in the
    interpreter's teardown, where one that takes the GIL (to free a tensor Python let go) aborts the process."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    # torchrun exports LOCAL_RANK; a single process is local rank 0.
    return int(os.environ.get('LOCAL_RANK', 0))


def is_master() -> bool:
    return get_rank() == 0


def is_local_master() -> bool:
    return get_local_rank() == 0


def get_device() -> torch.device:
    """The device this process should compute on: its local CUDA device if any, else the CPU."""
    if torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def _check_device(t: torch.Tensor) -> None:
    if is_initialized() and tdist.get_backend() == 'nccl' and not t.is_cuda:
        raise ValueError('the NCCL backend only reduces CUDA tensors; move the tensor to the CUDA device first '
                         '(dist.py never moves tensors behind your back)')


def allreduce(t: torch.Tensor, op: str = 'sum') -> torch.Tensor:
    """In-place all-reduce ('sum', 'max', 'min' or 'avg'); returns `t`. Identity in one process."""
    if not is_initialized():
        return t
    _check_device(t)
    if op == 'avg':
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        t.div_(get_world_size())
        return t
    red = {'sum': tdist.ReduceOp.SUM, 'max': tdist.ReduceOp.MAX, 'min': tdist.ReduceOp.MIN}[op]
    tdist.all_reduce(t, op=red)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from rank `src`; returns `t`. Identity in one process."""
    if not is_initialized():
        return t
    _check_device(t)
    tdist.broadcast(t, src=src)
    return t


def allgather(t: torch.Tensor, cat: bool = True) -> torch.Tensor | List[torch.Tensor]:
    """Gather same-shaped tensors from every rank (rank order); concatenated along dim 0 when `cat`."""
    if not is_initialized():
        return t if cat else [t]
    _check_device(t)
    out = [torch.empty_like(t) for _ in range(get_world_size())]
    tdist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0) if cat else out


def allgather_object(obj: object) -> list:
    """Gather one picklable object per rank (rank order). `[obj]` in one process."""
    if not is_initialized():
        return [obj]
    out = [None] * get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Return rank `src`'s object on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]
