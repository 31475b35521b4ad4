"""Sharded checkpoints of an FSDP run (`--fsdp 1`), beside the single-file ones of utils/ckpt.py.

A sharded checkpoint is two things in the run's output folder:
- a folder `ar-ckpt-shards-e{epoch}-i{iter}-{nonce}/` written collectively with `torch.distributed.checkpoint` (DCP):
  each rank writes its shards of the model weights and of the optimizer state, rank 0 the metadata;
- the usual `ar-ckpt-last.pth` (and `ar-ckpt-best.pth`), written atomically by rank 0 once the folder is complete:
  everything else a resume needs (position, every rank's RNG state, scaler, progressive state, args, best metrics,
  the frozen tokenizer) and, under the key `shards`, the name of that folder.

So the file is the commit point: a crash while the shards are written leaves the previous file, which names the
previous, complete folder; folders no file names are deleted after each save. Auto-resume (utils/ckpt.py) finds the
file as usual. Loading goes through DCP's resharding, so a checkpoint written by N ranks resumes on M ranks, with
FSDP or with DDP / one process (full tensors on every rank); `load_full_into` takes a single-file (DDP) checkpoint
into an FSDP run. The folder must be on a file system all ranks share.
"""
import contextlib
import os
import re
import shutil
import socket
import uuid
import warnings
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

import dist
from utils.ckpt import CheckpointError, atomic_write, save_run_checkpoint
from utils.runtime import ConfigError

SHARDS_KEY = 'shards'  # the file's entry naming its folder of shards (relative to the file's folder)


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every load without a process group, which is what a single process means to do."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.distributed is disabled')
        yield


def check_folder_shared(out_dir: str) -> None:
    """Raise ConfigError on every rank unless every rank sees a file that rank 0 writes in `out_dir` (a collective).

    Each rank writes its own shards and rank 0 the file that names them, so a sharded checkpoint in node-local
    folders is split across the nodes: the run would train to its end and no node could resume or export it. Checked
    at start-up. The name is new each time, so no file system has it cached as absent."""
    name = dist.broadcast_object(f'.shared-check-{uuid.uuid4().hex}')
    path = os.path.join(out_dir, name)
    if dist.is_master():
        atomic_write(path, lambda f: f.write(socket.gethostname()), mode='w')
    dist.barrier()
    seen = dist.allgather_object((os.path.isfile(path), socket.gethostname()))
    dist.barrier()  # every rank has looked before the file goes
    if dist.is_master():
        os.remove(path)
    blind = [f'rank {rank} (host {host})' for rank, (ok, host) in enumerate(seen) if not ok]
    if blind:
        raise ConfigError(f'--fsdp 1 writes one checkpoint from the shards of every rank into the output folder, but '
                          f'{", ".join(blind)} cannot see {os.path.abspath(out_dir)} as rank 0 (host {seen[0][1]}) '
                          f'writes it: the folder is not shared between the nodes. Give --local_out_dir_path a '
                          f'folder on a file system that every node mounts (the same path on all), or train with '
                          f'DDP (without --fsdp), whose checkpoints each node keeps whole in its own folder')


def shards_prefix(last_name: str) -> str:
    """'ar-ckpt-last.pth' -> 'ar-ckpt-shards-': the name start of a run's shard folders."""
    return last_name.rsplit('-last', 1)[0] + '-shards-'


def _model_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """{'model': ..., 'optim': ...} keyed by parameter names: DTensor shards under FSDP, full tensors otherwise."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {'model': model_sd, 'optim': optim_sd}


def save_sharded_run_checkpoint(state: Dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                                out_dir: str, last_name: str, best_name: str, best_updated: bool,
                                rng: Optional[Dict[str, Any]] = None) -> str:
    """Write the shards of `model` and `optimizer`, then the file (see the module docstring); a collective.

    `state` holds everything else (without the weights and the optimizer state). Returns the folder's name.
    """
    import torch.distributed.checkpoint as dcp
    epoch, it = state['epoch'], state['iter']
    name = dist.broadcast_object(f'{shards_prefix(last_name)}e{epoch}-i{it}-{uuid.uuid4().hex[:8]}')
    folder = os.path.join(out_dir, name)
    dcp.save(_model_optim_state(model, optimizer), checkpoint_id=folder)
    dist.barrier()  # every rank's shards are on disk before the file names the folder
    save_run_checkpoint({**state, SHARDS_KEY: name}, out_dir, last_name, best_name, best_updated, rng=rng,
                        master_only=True)
    if dist.is_master():
        remove_unreferenced_shards(out_dir, last_name, best_name)
    return name


def remove_unreferenced_shards(out_dir: str, last_name: str, best_name: str) -> list:
    """Delete the shard folders that neither the last nor the best file names (older saves, killed writes).

    While one of the two files exists but cannot be read (truncated), the newest complete folder stays too: it may
    be the state that file named, the newest one on disk, and it can be recovered by hand until a later save."""
    prefix = shards_prefix(last_name)
    folders = [e for e in os.listdir(out_dir) if e.startswith(prefix) and os.path.isdir(os.path.join(out_dir, e))]
    if not folders:  # the files are only read when there is something to delete
        return []
    keep, broken = set(), False
    for file_name in (last_name, best_name):
        readable, name = read_shards_reference(os.path.join(out_dir, file_name))
        keep.add(name)
        broken |= not readable
    if broken:
        complete = [e for e in folders if e not in keep and not missing_shard_files(os.path.join(out_dir, e))]
        if complete:
            keep.add(max(complete, key=lambda e: os.stat(os.path.join(out_dir, e, '.metadata')).st_mtime_ns))
    removed = [e for e in folders if e not in keep]
    for entry in removed:
        shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)
    return removed


def read_shards_reference(path: str) -> Tuple[bool, Optional[str]]:
    """(readable, the shard folder it names or None) of a checkpoint file; a file that is not there is readable
    and names nothing, a broken one is not readable."""
    if not os.path.isfile(path):
        return True, None
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:
        return False, None
    return True, (ckpt.get(SHARDS_KEY) if isinstance(ckpt, dict) else None)


def referenced_shards(path: str) -> Optional[str]:
    """The shard folder that a checkpoint file names, or None (no file, a single-file checkpoint, a broken file)."""
    return read_shards_reference(path)[1]


def complete_shard_positions(out_dir: str, prefix: str = 'ar-ckpt-shards-') -> List[Tuple[int, int]]:
    """(epoch, iteration) of each complete shard folder in `out_dir`, from its name ('...-e{epoch}-i{iter}-...')."""
    positions = []
    for entry in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        m = re.fullmatch(re.escape(prefix) + r'e(\d+)-i(\d+)-[0-9a-f]+', entry)
        if m and not missing_shard_files(os.path.join(out_dir, entry)):
            positions.append((int(m.group(1)), int(m.group(2))))
    return positions


def missing_shard_files(folder: str) -> List[str]:
    """The files that a complete folder of shards holds and `folder` lacks or holds cut short ('name (why)'): its
    metadata first, then the data files it lists (one or more per rank that wrote it)."""
    from torch.distributed.checkpoint import FileSystemReader
    if not os.path.isfile(os.path.join(folder, '.metadata')):
        return ['.metadata (missing)']
    try:
        storage = FileSystemReader(folder).read_metadata().storage_data
    except Exception as e:
        return [f'.metadata (unreadable: {type(e).__name__})']
    needed: Dict[str, int] = {}  # data file -> the bytes its entries reach
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    missing = []
    for name, size in sorted(needed.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            missing.append(f'{name} (missing)')
        elif os.path.getsize(path) < size:
            missing.append(f'{name} (cut short: {os.path.getsize(path)} of {size} bytes)')
    return missing


def shards_folder(ckpt: Dict[str, Any], ckpt_path: str) -> str:
    """The folder of shards that a checkpoint file names; CheckpointError naming what is missing when it is not
    complete (a folder that was not shared between the nodes keeps each node's shards apart)."""
    folder = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), ckpt[SHARDS_KEY])
    missing = missing_shard_files(folder) if os.path.isdir(folder) else ['the whole folder']
    if missing:
        raise CheckpointError(f'{ckpt_path} names the sharded checkpoint {folder}, which lacks {", ".join(missing)}. '
                              f'Each rank writes its own shard files: when the output folder was not shared by every '
                              f'node, the missing files are in the same folder on the other nodes; copy them here, '
                              f'or resume from a complete checkpoint')
    return folder


def load_sharded(ckpt: Dict[str, Any], ckpt_path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the weights and optimizer state a sharded checkpoint names into `model` (FSDP, DDP's inner module or a
    plain one) and `optimizer`, resharded for this run's ranks. Raises ValueError naming the mismatch when the
    checkpoint belongs to another model configuration."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    folder = shards_folder(ckpt, ckpt_path)
    state = _model_optim_state(model, optimizer)
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    except Exception as e:  # DCP wraps shape and key mismatches of the ranks into one error
        raise ValueError(f'the sharded checkpoint {folder} does not fit this model: {e}') from e
    set_state_dict(model, optimizer, model_state_dict=state['model'], optim_state_dict=state['optim'])


def load_full_into(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: Dict[str, torch.Tensor],
                   optim_sd: Dict[str, Any]) -> None:
    """Load a single-file checkpoint's full state (a plain state dict, and `torch.optim`'s own state dict, whose
    parameters are numbered in the order of `optimizer.param_groups`) into a sharded `model` and its optimizer: each
    rank keeps its shards. Raises ValueError when the parameters do not correspond."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group['params']]  # torch.optim's numbering
    saved_ids = [i for group in optim_sd['param_groups'] for i in group['params']]
    if len(saved_ids) != len(order) or sorted(saved_ids) != list(range(len(order))):
        raise ValueError(f'the optimizer state holds {len(saved_ids)} parameters, this model {len(order)}')
    by_name = {'state': {order[i]: st for i, st in optim_sd['state'].items()},
               'param_groups': [{**g, 'params': [order[i] for i in g['params']]} for g in optim_sd['param_groups']]}
    set_state_dict(model, optimizer, model_state_dict=dict(model_sd), optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True))


def read_full_tensors(folder: str, prefix: str = 'model.') -> Dict[str, torch.Tensor]:
    """The full tensors of a folder of shards whose flattened keys start with `prefix`, without it, in one process on
    the CPU: 'model.' gives VAR's state dict (official keys, float32), 'optim.state.' the optimizer's moments."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    metadata = FileSystemReader(folder).read_metadata()
    tensors = {key: torch.empty(md.size, dtype=md.properties.dtype)
               for key, md in metadata.state_dict_metadata.items()  # keys flattened as 'model.<parameter name>', ...
               if key.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    with _quiet_single_process():
        dcp.load(tensors, checkpoint_id=folder, no_dist=True)
    return {key[len(prefix):]: t for key, t in tensors.items()}
