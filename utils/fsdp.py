"""Scale-out wrappers of a training model: FSDP2 sharding (`--fsdp 1`) and activation checkpointing (`--act_ckpt 1`).

`shard_model` applies PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) to every transformer block and then to
the root, so each block's weights are gathered just before its forward (and again before its backward) and freed
after; the root group holds the embeddings, the AdaLN condition and the head. The sharded parameters stay float32
(the optimizer's master weights); the blocks compute in the `--fp16` dtype, the root in float32 (as VAR's forward
does under autocast), and gradients are reduce-scattered in float32 (`MixedPrecisionPolicy`). Under --fp16 1/2 the
validation and the sample grid therefore run under autocast too, not in float32 as with DDP (official).
`checkpoint_blocks` recomputes each block's activations in the backward pass instead of keeping them (with or without
FSDP); the module tree and its state-dict keys are unchanged by both.
"""
import contextlib
import warnings
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import dist
from utils.runtime import ConfigError, autocast_dtype


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> None:
    """Activation checkpointing per block: while gradients are recorded, a block keeps only its inputs and
    recomputes its forward in the backward pass (non-reentrant, with the forward's RNG state, so drop path and
    dropout draw the same numbers: the gradients equal those without checkpointing). Under no_grad (validation,
    sampling with a KV cache) the forward runs as usual. The forward is replaced on the instance, so the module tree,
    the state-dict keys and FSDP's hooks (which run around `forward`) are untouched."""
    for block in blocks:
        if getattr(block, 'act_ckpt', False):
            continue
        plain_forward = block.forward

        def forward(*args: Any, _plain=plain_forward, **kwargs: Any):
            if not torch.is_grad_enabled():
                return _plain(*args, **kwargs)
            return checkpoint(_plain, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
        block.forward = forward
        block.act_ckpt = True


def shard_model(model: nn.Module, device: torch.device, fp16: int) -> nn.Module:
    """FSDP2 over all ranks: one group per transformer block (`model.blocks`), then the root. `model` is sharded in
    place (its class becomes an FSDPModule) and returned; build the optimizer after this, from its parameters.

    Works in one process too (a mesh of one rank: nothing is sharded, but the same code path runs).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    if not dist.is_initialized():
        raise ConfigError('--fsdp 1 needs torch.distributed: launch with torchrun, e.g. torchrun '
                          '--nproc_per_node=1 train.py ... for one process')
    # the ranks built their replicas from different seeds (seed * world_size + rank): start from rank 0's, as DDP does
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # the blocks compute in the --fp16 dtype (their gathered weights, and their floating inputs, cast to it); the root
    # (embeddings, AdaLN condition, head) stays float32, as VAR's forward computes its embeddings in float32 outside
    # autocast; gradients are reduced in float32 and the sharded master weights stay float32
    blocks_mp = MixedPrecisionPolicy(param_dtype=autocast_dtype(fp16), reduce_dtype=torch.float32)
    root_mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=blocks_mp)
    fully_shard(model, mesh=mesh, mp_policy=root_mp)
    # sampling (the validation's image grid) calls a method, not forward: gather the root's weights around it too
    register_fsdp_forward_method(model, 'autoregressive_infer_cfg')
    return model


@contextlib.contextmanager
def root_output_view_allowed() -> Iterator[None]:
    """Around a training forward of a sharded model: FSDP2 warns when its root returns a view, which VAR's does in
    float32 (its head, an nn.Linear on (B, L, C), returns a view of a 2-D product; under autocast `.float()` copies).
    The warning is about an in-place op on that output after the forward, which would drop the root's pre-backward
    hook; the trainer takes the loss from it out of place, and tests/training/test_fsdp.py shows the hook runs on
    every backward and the gradients are those of the unsharded model. Only that warning is silenced, only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=r'FSDP2-wrapped module .* returned a view tensor',
                                category=UserWarning)
        yield


def is_sharded(model: nn.Module) -> bool:
    """True for a module that `shard_model` wrapped (an FSDP2 module)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def release_process_groups(model: nn.Module) -> None:
    """Make the device mesh of a sharded `model` let go of its process groups; call it when the run ends.

    DTensor's caches keep every mesh they have seen until the process exits, and a mesh holds its process groups (for
    torch.compile), so `destroy_process_group` alone would leave the group alive, and with it gloo's worker threads,
    into the interpreter's teardown. There a worker that frees the last work of a collective (a barrier keeps the
    works before it, tensors that Python has let go) takes the GIL, the finalizing interpreter ends the thread, and
    the unwinding aborts the process: 'terminate called without an active exception' after a finished run. Without
    the mesh's hold, `dist.finalize` drops the group's last reference and joins those threads before the teardown.
    """
    from torch.distributed.tensor import DTensor
    meshes = {id(p.device_mesh): p.device_mesh for p in model.parameters() if isinstance(p, DTensor)}
    for mesh in meshes.values():
        mesh._pg_registry.clear()  # private: group name -> group; eager collectives resolve groups by name
