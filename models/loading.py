"""Loading official and project checkpoints, locally or from the Hugging Face Hub (only when asked).

Official release files (`vae_ch160v4096z32.pth`, `var_d{16,20,24,30,36}.pth`) are plain state dicts.
This project's checkpoints are dicts that carry their configuration (`model_config`, `vae_config`) next to
the weights, so they load with no extra flags; configurations missing from older files are read back
from the key names and shapes (`inspect_ckpt`).
"""
import inspect
import os
import pickle
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from .inspect_ckpt import infer_vae_config, infer_var_config
from .presets import HUB_REPO_ID, NUM_CLASSES, OFFICIAL_DEPTHS, VAE_FILENAME, preset_config, var_filename, \
    width_heads_drop_path
from .var import VAR
from .vqvae import VQVAE

# VAR's official constructor arguments, the VQVAE aside: the keys of `VAR.config` and of a model folder's config.json
# (keyword-only extensions such as `attn_impl` are choices of a run, not of the model)
VAR_ARG_KEYS = tuple(name for name, p in inspect.signature(VAR).parameters.items()
                     if p.kind is p.POSITIONAL_OR_KEYWORD and name != 'vae_local')
# the kernel choices are the loading machine's, not the checkpoint's: a rebuilt VAR uses what is available here
_KERNEL_SWITCHES = ('flash_if_available', 'fused_if_available')


class UnsafeCheckpointError(RuntimeError):
    """A file holding Python objects outside the allow-list: unpickling it could run code, so it is not loaded."""


def _allowed_globals() -> list:
    """The few non-tensor types that checkpoints are known to hold and that carry data only: argparse.Namespace
    (arguments saved by older training code), paths, and numpy arrays, dtypes and scalars (under both the numpy 1
    and numpy 2 module names). Everything torch's weights_only loader allows (tensors, containers, numbers,
    strings) is allowed as well."""
    import argparse
    import pathlib
    allowed = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
               pathlib.PureWindowsPath]
    try:
        import numpy as np
    except ImportError:
        return allowed
    try:
        from numpy._core import multiarray  # numpy 2
    except ImportError:
        from numpy.core import multiarray  # numpy 1
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        allowed += [(multiarray._reconstruct, f'{mod}._reconstruct'), (multiarray.scalar, f'{mod}.scalar')]
    allowed += [np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32,
                                            np.int64, np.uint8, np.bool_)]
    return allowed


def _why_unsafe(path: str, error: Exception) -> str:
    """What the safe loader refused: the Python globals the file names, or where it stopped."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint (a plain pickle or garbage): torch cannot list its globals safely
        names = []
    if names:
        more = f' and {len(names) - 8} more' if len(names) > 8 else ''
        return f'it holds Python objects that are not on the allow-list ({", ".join(names[:8])}{more})'
    detail = str(error).split('WeightsUnpickler error:')[-1].strip().split('\n')[0].strip()
    return (f'it is no torch.save file of tensors and plain values (the safe loader stopped at: {detail}): a '
            'plain pickle, objects that could run code, or a corrupt file')


def read_checkpoint(path: Union[str, os.PathLike], mmap: bool = False) -> Any:
    """torch.load on the CPU that never runs code from the file, with errors that say what is wrong with it.

    Loading is `weights_only=True` with an explicit allow-list (`_allowed_globals`): official release files and
    this project's checkpoints are tensors, containers and plain values only. A file that needs anything else is
    refused (UnsafeCheckpointError) before any of its objects is built. `mmap` maps the tensors instead of reading
    them (for a look at a checkpoint's small entries).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if os.path.getsize(path) == 0:
        raise RuntimeError(f'checkpoint {path} is empty (0 bytes): the download or save was interrupted')
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f'refusing to load {path}: {_why_unsafe(path, e)}. Unpickling it could run code from the file, so it is '
            'not loaded. Model loading reads safetensors folders, plain state '
            'dicts and this project\'s checkpoints. If the file is yours and you trust it, load it once yourself '
            '(torch.load(path, weights_only=False)) and save its state dicts.') from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise RuntimeError(f'checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e}); '
                           'download it again or use an earlier checkpoint') from e


class HubDownloadError(RuntimeError):
    """A file could not be fetched from the Hugging Face Hub; the message says how to pass a local copy."""


def _path_flag(filename: str) -> str:
    """The command-line flag that takes a local copy of this Hub file."""
    return '--vae_ckpt' if filename == VAE_FILENAME else '--var_ckpt'


def hub_download(filename: str, repo_id: str = HUB_REPO_ID, cache_dir: Optional[str] = None,
                 local_files_only: bool = False) -> str:
    """Fetch one file from the Hub with huggingface_hub (its cache, its offline mode) -> local path."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise HubDownloadError('downloading weights needs huggingface_hub (pip install huggingface_hub); '
                               f'or pass a local path to {filename}') from e
    try:
        return hf_hub_download(repo_id=repo_id, filename=filename, cache_dir=cache_dir,
                               local_files_only=local_files_only)
    except Exception as e:
        raise HubDownloadError(
            f'could not get {filename} from the Hugging Face Hub repo {repo_id} ({type(e).__name__}: {e}).\n'
            f'If this machine is offline, download it elsewhere (https://huggingface.co/{repo_id}) and pass its '
            f'local path ({_path_flag(filename)} /path/to/{filename}), or warm the Hub cache and set HF_HUB_OFFLINE=1.'
        ) from e


def official_vae_path(explicit: Optional[str] = None) -> str:
    """The tokenizer file for training: `explicit` if given, else the official `vae_ch160v4096z32.pth` in the working
    directory (where the official train.py looks), else the Hub's copy."""
    if explicit:
        return explicit
    if os.path.isfile(VAE_FILENAME):
        return VAE_FILENAME
    return hub_download(VAE_FILENAME)


def _strip_prefixes(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        while k.startswith(('_orig_mod.', 'module.')):  # DDP and torch.compile wrappers, in either nesting order
            k = k.split('.', 1)[1]
        out[k.replace('._orig_mod.', '.')] = v
    return out


def _find_state_dict(ckpt: Any, marker: str,
                     candidates: Sequence[Tuple[str, ...]]) -> Optional[Dict[str, torch.Tensor]]:
    if isinstance(ckpt, Mapping) and all(isinstance(k, str) for k in ckpt):
        plain = _strip_prefixes(ckpt)
        if any(k.endswith(marker) for k in plain):  # a bare state dict, wrapped modules (e.g. a compiled encoder) too
            return plain
    for path in candidates:
        node = ckpt
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and node:
            return _strip_prefixes(node)
    return None


def _vae_state_dict(ckpt: Any) -> Optional[Dict[str, torch.Tensor]]:
    return _find_state_dict(ckpt, 'encoder.conv_in.weight',
                            [('trainer', 'vae_local'), ('trainer', 'vae_wo_ddp'), ('trainer', 'vae'), ('vae',),
                             ('vae_state_dict',), ('model',), ('state_dict',)])


def _var_state_dict(ckpt: Any) -> Optional[Dict[str, torch.Tensor]]:
    return _find_state_dict(ckpt, 'pos_1LC', [('trainer', 'var_wo_ddp'), ('var',), ('var_state_dict',), ('model',),
                                               ('state_dict',)])


def _materialise(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], device) -> None:
    module.to_empty(device=device)
    module.load_state_dict(dict(sd), strict=True)


def build_vae(vae_config: Mapping[str, Any], device: Union[str, torch.device] = 'cpu') -> VQVAE:
    with torch.device(device):
        return VQVAE(test_mode=True, **vae_config)


def build_var(vae: VQVAE, var_config: Mapping[str, Any], device: Union[str, torch.device] = 'cpu') -> VAR:
    kw = {k: var_config[k] for k in VAR_ARG_KEYS if k not in _KERNEL_SWITCHES and var_config.get(k) is not None}
    with torch.device(device):
        return VAR(vae_local=vae, **kw)


def load_vae_checkpoint(path: Union[str, os.PathLike], device: Union[str, torch.device] = 'cpu',
                        patch_nums: Optional[Sequence[int]] = None) -> VQVAE:
    """A frozen VQVAE from an official file or one of our checkpoints (which carry `vae_config`).

    `patch_nums` overrides the scales (e.g. the 512 preset for the official VAE); by default they come from
    the checkpoint's config, or the 256 preset for official files.
    """
    ckpt = read_checkpoint(path)
    sd = _vae_state_dict(ckpt)
    if sd is None:
        raise ValueError(f'{path} holds no VQVAE weights (looked for encoder.* keys at the top level and under '
                         f"'trainer'/'vae_local', 'vae', 'vae_state_dict')")
    cfg = dict(ckpt['vae_config']) if isinstance(ckpt, Mapping) and 'vae_config' in ckpt else infer_vae_config(sd)
    if patch_nums is not None:
        cfg['v_patch_nums'] = list(patch_nums)
    vae = build_vae(cfg, device='meta')
    hits = sd.get('quantize.ema_vocab_hit_SV')
    other_scales = hits is not None and hits.shape[0] != len(cfg['v_patch_nums'])
    _materialise(vae, sd, device)
    if other_scales:  # the usage statistics of other scales are dropped: start them from zero, not from to_empty
        vae.quantize.ema_vocab_hit_SV.zero_()
    return vae.eval()


def load_var_weights(vae: VQVAE, sd: Mapping[str, torch.Tensor], device: Union[str, torch.device] = 'cpu',
                     var_config: Optional[Mapping[str, Any]] = None) -> VAR:
    cfg = dict(var_config) if var_config else infer_var_config(sd)
    var = build_var(vae, cfg, device='meta')
    var.vae_proxy, var.vae_quant_proxy = (vae,), (vae.quantize,)
    _materialise(var, sd, device)
    return var.eval()


def load_pretrained(depth: int, vae_path: Optional[str] = None, var_path: Optional[str] = None,
                    device: Union[str, torch.device] = 'cpu', cache_dir: Optional[str] = None,
                    local_files_only: bool = False) -> Tuple[VQVAE, VAR]:
    """The official (vae, var) pair for `depth` in eval mode; files come from local paths or the Hub.

    The configuration is the preset's (`models.presets.PRESETS`: d16-d30 use the 256 px scales; d36 the 512 px
    scales and shared AdaLN). Loading is strict.
    """
    if depth not in OFFICIAL_DEPTHS:
        raise ValueError(f'no official checkpoint of depth {depth}; released depths: {OFFICIAL_DEPTHS}')
    preset = preset_config(depth)
    patch_nums = preset['patch_nums']
    vae_path = vae_path or hub_download(VAE_FILENAME, cache_dir=cache_dir, local_files_only=local_files_only)
    var_path = var_path or hub_download(var_filename(depth), cache_dir=cache_dir, local_files_only=local_files_only)
    vae = load_vae_checkpoint(vae_path, device=device, patch_nums=patch_nums)
    var_sd = _var_state_dict(read_checkpoint(var_path))
    if var_sd is None:
        raise ValueError(f'{var_path} holds no VAR weights (no pos_1LC key)')
    var_cfg = dict(num_classes=NUM_CLASSES, attn_l2_norm=True, **width_heads_drop_path(depth), **preset)
    return vae, load_var_weights(vae, var_sd, device=device, var_config=var_cfg)


def load_checkpoint_models(path: Union[str, os.PathLike], device: Union[str, torch.device] = 'cpu',
                           vae_path: Optional[str] = None) -> Tuple[VQVAE, VAR]:
    """(vae, var) from one of our training checkpoints (or any file holding both state dicts).

    A checkpoint without VQVAE weights needs `vae_path` (e.g. an official VAR file plus the official VAE).
    """
    return models_from_checkpoint(read_checkpoint(path), os.fspath(path), device=device, vae_path=vae_path)


def models_from_checkpoint(ckpt: Any, path: str, device: Union[str, torch.device] = 'cpu',
                           vae_path: Optional[str] = None) -> Tuple[VQVAE, VAR]:
    """`load_checkpoint_models` on a checkpoint already read (`path` names it in errors)."""
    var_sd = _var_state_dict(ckpt)
    if var_sd is None and isinstance(ckpt, Mapping) and 'shards' in ckpt:
        raise ValueError(f'{path} is a sharded (--fsdp 1) training checkpoint: its weights are in the folder '
                         f'{ckpt["shards"]} beside it. Gather them into one file first: python -m utils.export_ckpt '
                         f'{path} --out model.pth')
    if var_sd is None:
        raise ValueError(f'{path} holds no VAR weights (looked for pos_1LC at the top level and under '
                         f"'trainer'/'var_wo_ddp', 'var', 'var_state_dict')")
    model_config = ckpt.get('model_config') if isinstance(ckpt, Mapping) else None
    var_cfg = dict(model_config) if model_config else infer_var_config(var_sd)
    if vae_path is not None:
        vae = load_vae_checkpoint(vae_path, device=device, patch_nums=var_cfg['patch_nums'])
    else:
        vae_sd = _vae_state_dict(ckpt)
        if vae_sd is None:
            raise ValueError(f'{path} holds no VQVAE weights; pass the tokenizer with vae_path=')
        if isinstance(ckpt, Mapping) and 'vae_config' in ckpt:
            vae_cfg = dict(ckpt['vae_config'])
        else:
            vae_cfg = infer_vae_config(vae_sd, v_patch_nums=var_cfg['patch_nums'])
            if model_config:
                vae_cfg.update(ch_mult=list(model_config.get('ch_mult', vae_cfg['ch_mult'])))
        vae_cfg['v_patch_nums'] = list(var_cfg['patch_nums'])
        vae = build_vae(vae_cfg, device='meta')
        _materialise(vae, vae_sd, device)
        vae.eval()
    return vae, load_var_weights(vae, var_sd, device=device, var_config=var_cfg)
