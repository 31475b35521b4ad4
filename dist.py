"""Thin, stateless helpers over torch.distributed.

Every helper asks `torch.distributed.is_initialized()` at call time, so the same code runs under torchrun (any number
of processes and nodes) and as a plain single process, where the collectives are no-ops or identities. Nothing here
moves a tensor between devices: NCCL needs CUDA tensors, gloo takes CPU tensors; the caller picks the device.
"""
import datetime
import os
from typing import Dict, List, Mapping, Optional

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


class LaunchError(RuntimeError):
    """The launch environment names several processes but not how they meet (e.g. SLURM tasks without MASTER_ADDR)."""


def launch_ranks(env: Mapping[str, str]) -> Optional[Dict[str, int]]:
    """{'rank', 'world_size'} of this process as its launcher describes it, or None for a plain single process.

    torchrun exports RANK and WORLD_SIZE. Without them, a task started by SLURM's `srun python train.py` (one task
    per GPU, as timm and LlamaGen allow) is read from SLURM_PROCID and the step's task count (SLURM_STEP_NUM_TASKS,
    else SLURM_NTASKS); its local rank from SLURM_LOCALID (`get_local_rank`). SLURM does not say where rank 0 listens:
    MASTER_ADDR and MASTER_PORT must be exported, else LaunchError names them. One task is a plain process.
    """
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return dict(rank=int(env['RANK']), world_size=int(env['WORLD_SIZE']))
    if 'SLURM_PROCID' not in env:
        return None
    world_size = int(env.get('SLURM_STEP_NUM_TASKS') or env.get('SLURM_NTASKS') or 1)
    if world_size <= 1:
        return None
    missing = [k for k in ('MASTER_ADDR', 'MASTER_PORT') if not env.get(k)]
    if missing:
        raise LaunchError(f'started as SLURM task {env["SLURM_PROCID"]} of {world_size} without torchrun, but '
                          f'{" and ".join(missing)} {"is" if len(missing) == 1 else "are"} not set: export '
                          f'MASTER_ADDR (the first node of the job, e.g. $(scontrol show hostnames '
                          f'"$SLURM_JOB_NODELIST" | head -n 1)) and MASTER_PORT (a free port, e.g. 29500) before srun, '
                          f'or launch one torchrun per node (launch/slurm_train.sbatch)')
    return dict(rank=int(env['SLURM_PROCID']), world_size=world_size)


def initialize(backend: Optional[str] = None, timeout_minutes: float = 30, device: str = '') -> None:
    """Join the process group its launcher describes: torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) or
    SLURM's for `srun python train.py` (see `launch_ranks`).

    Without either (a plain `python train.py`) this does nothing. The backend defaults to `backend_for(device)`: NCCL
    for a CUDA run, gloo for a CPU run (`device='cpu'`, or no CUDA). On a CUDA run each process binds to its local
    rank's device. `timeout_minutes` bounds every collective: a process that waits longer for the others (one hung,
    stopped or died) gets an error (`is_peer_failure`) instead of waiting for ever.
    """
    if tdist.is_initialized():
        return
    ranks = launch_ranks(os.environ)
    if ranks is None:
        return
    if backend is None:
        backend = backend_for(device)
    if torch.cuda.is_available() and (not device or torch.device(device).type == 'cuda'):
        torch.cuda.set_device(get_local_rank() % torch.cuda.device_count())
    tdist.init_process_group(backend=backend, init_method='env://', timeout=datetime.timedelta(minutes=timeout_minutes),
                             **ranks)


# what the backends say when a collective's peer is gone: gloo raises RuntimeError with these (a stopped or hung peer
# times out, a dead one closes its connection); NCCL's and the store's errors are DistError subclasses
_PEER_FAILURE_MARKS = ('Timed out waiting', 'Connection closed by peer', 'Connection reset by peer', 'Broken pipe',
                       'Socket Timeout', 'NCCL communicator was aborted')


def is_peer_failure(err: BaseException) -> bool:
    """True for an error of a collective whose other processes died, hung or were stopped (see `initialize`)."""
    if isinstance(err, tdist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(mark in str(err) for mark in _PEER_FAILURE_MARKS)


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
    # torchrun exports LOCAL_RANK, srun SLURM_LOCALID (torchrun's wins when srun starts torchrun); a single process: 0
    return int(os.environ.get('LOCAL_RANK', os.environ.get('SLURM_LOCALID', 0)))


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
