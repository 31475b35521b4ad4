"""Whole-model folders: the VQVAE and the VAR together, as safetensors, with a readable config and a model card.

A folder (the same layout locally and in a Hub repo) holds
    config.json         the VAR constructor's arguments at the top level and the VQVAE's under `vae_kwargs` (the
                        keys the official `VARHF` mixin writes), plus `class_names`, `sampling` (the settings the
                        card recommends), `vae_weights` and `format_version`
    model.safetensors   VAR's state dict, official keys (the file `VARHF.from_pretrained` reads)
    vae.safetensors     the VQVAE's state dict, official keys
    README.md           a model card in the Hub's format (YAML metadata, then markdown)
The official `VARHF.from_pretrained` therefore reads these folders (with its untrained tokenizer), and
`from_pretrained` here reads the folders `VARHF.save_pretrained` writes (pass the tokenizer with `vae_path=`).

Nothing here unpickles: weights are safetensors and the config is JSON. Hub access (huggingface_hub) happens only
in `resolve_folder` for a repo id and in `push_to_hub`.
"""
import io
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .atomic_files import atomic_write
from .inspect_ckpt import describe_mismatch
from .loading import VAR_ARG_KEYS
from .var import VAR
from .vqvae import OFFICIAL_CH_MULT, VQVAE, downsample_factor

CONFIG_NAME = 'config.json'
VAR_WEIGHTS_NAME = 'model.safetensors'
VAE_WEIGHTS_NAME = 'vae.safetensors'
CARD_NAME = 'README.md'
FORMAT_VERSION = 1
FOLDER_FILES = (CONFIG_NAME, VAR_WEIGHTS_NAME, VAE_WEIGHTS_NAME, CARD_NAME)

_REPO_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$')


class FolderError(ValueError):
    """A model folder (or Hub repo) that is missing, partial or corrupt; the message names the file or key."""


def is_repo_id(name: str) -> bool:
    """'owner/name' with the Hub's characters, and not a path that exists here."""
    return bool(_REPO_ID.match(name)) and not os.path.exists(name) and '..' not in name


def folder_config(vae: VQVAE, var: VAR, class_names: Optional[Sequence[str]] = None,
                  sampling: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """config.json of a folder holding `vae` and `var` (jsonable: tuples become lists)."""
    if class_names is not None and len(class_names) != var.num_classes:
        raise ValueError(f'{len(class_names)} class names for a model of {var.num_classes} classes')
    cfg: Dict[str, Any] = {k: var.config[k] for k in VAR_ARG_KEYS}
    cfg['patch_nums'] = list(cfg['patch_nums'])
    cfg['vae_kwargs'] = {**vae.config, 'test_mode': True}
    cfg['class_names'] = list(class_names) if class_names is not None else None
    cfg['sampling'] = dict(sampling) if sampling else None
    cfg['vae_weights'] = VAE_WEIGHTS_NAME
    cfg['format_version'] = FORMAT_VERSION
    return json.loads(json.dumps(cfg))


def _atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def _save_tensors(state_dict: Mapping[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save
    tensors = {k: v.detach().to('cpu').contiguous() for k, v in state_dict.items()}
    _atomic_write_bytes(path, save(tensors, metadata={'format': 'pt'}))


def save_pretrained(vae: VQVAE, var: VAR, folder: Union[str, os.PathLike], *,
                    class_names: Optional[Sequence[str]] = None, sampling: Optional[Mapping[str, Any]] = None,
                    card: Optional[str] = None) -> str:
    """Write the folder (config.json, model.safetensors, vae.safetensors, README.md) and return its path.

    Tensors are saved bit for bit in their own dtypes. `card` is the README.md text (default: `model_card`'s with
    no training details). Each file is written atomically, so an interrupted save leaves whole files only.
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    cfg = folder_config(vae, var, class_names, sampling)
    _save_tensors(var.state_dict(), os.path.join(folder, VAR_WEIGHTS_NAME))
    _save_tensors(vae.state_dict(), os.path.join(folder, VAE_WEIGHTS_NAME))
    if card is None:
        card = model_card(cfg)
    _atomic_write_bytes(os.path.join(folder, CARD_NAME), card.encode())
    _atomic_write_bytes(os.path.join(folder, CONFIG_NAME), (json.dumps(cfg, indent=2) + '\n').encode())
    return folder


def resolve_folder(name_or_path: Union[str, os.PathLike], *, revision: Optional[str] = None,
                   cache_dir: Optional[str] = None, local_files_only: bool = False,
                   token: Optional[str] = None) -> str:
    """A local folder, or a Hub repo id fetched (config, safetensors and card only) into the Hub cache."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise FolderError(f'{name} is a file; a whole-model folder is a directory with {CONFIG_NAME}, '
                          f'{VAR_WEIGHTS_NAME} and {VAE_WEIGHTS_NAME} (load a .pth with models.load_checkpoint_models)')
    if not is_repo_id(name):
        raise FolderError(f'{name} is neither a folder nor a Hugging Face Hub repo id (owner/name)')
    from .loading import HubDownloadError
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id=name, revision=revision, cache_dir=cache_dir, token=token,
                                 local_files_only=local_files_only, allow_patterns=list(FOLDER_FILES))
    except Exception as e:
        raise HubDownloadError(
            f'{name} is no local file or folder, and as a Hugging Face Hub repo id it could not be fetched '
            f'({type(e).__name__}: {e}).\n'
            f'Offline, download the folder elsewhere (huggingface-cli download {name} --local-dir DIR) and pass '
            f'DIR, or warm the Hub cache and set HF_HUB_OFFLINE=1.') from e


def read_config(folder: str) -> Dict[str, Any]:
    """config.json of a local folder, checked for the keys needed to build the models."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FolderError(f'{folder} has no {CONFIG_NAME}: not a model folder (or an interrupted download)')
    try:
        with open(path, encoding='utf-8') as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FolderError(f'{path} is not valid JSON ({e}); the file is corrupt') from e
    if not isinstance(cfg, dict):
        raise FolderError(f'{path} holds {type(cfg).__name__}, not a JSON object')
    missing = [k for k in ('vae_kwargs', 'depth', 'embed_dim', 'num_heads', 'patch_nums', 'num_classes')
               if k not in cfg]
    if missing:
        raise FolderError(f'{path} lacks {", ".join(missing)}: it does not describe a VAR model')
    if cfg.get('format_version', FORMAT_VERSION) > FORMAT_VERSION:
        raise FolderError(f'{path} has format_version {cfg["format_version"]}; this code reads up to '
                          f'{FORMAT_VERSION}: update the library')
    return cfg


def _tensor_file_header(path: str) -> Dict[str, Tuple[str, List[int]]]:
    """{key: (dtype, shape)} of a safetensors file, read from its header only."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework='pt') as f:
            return {k: (str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:
        raise FolderError(f'{path} is not a readable safetensors file ({type(e).__name__}: {e}); '
                          'it is corrupt or truncated: download or save it again') from e


def _load_tensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FolderError(f'{path} is missing: the folder is partial (an interrupted save or download)')
    try:
        return load_file(path, device='cpu')
    except Exception as e:
        raise FolderError(f'{path} is not a readable safetensors file ({type(e).__name__}: {e}); '
                          'it is corrupt or truncated: download or save it again') from e


def _build_vae(cfg: Mapping[str, Any], device) -> VQVAE:
    vae_kwargs = {**cfg['vae_kwargs'], 'v_patch_nums': list(cfg['patch_nums']), 'test_mode': True}
    with torch.device(device):
        return VQVAE(**vae_kwargs)


def _build_var(cfg: Mapping[str, Any], vae: VQVAE, device) -> VAR:
    with torch.device(device):
        return VAR(vae_local=vae, **{k: cfg[k] for k in VAR_ARG_KEYS if k in cfg})


def _build(cfg: Mapping[str, Any], device) -> Tuple[VQVAE, VAR]:
    vae = _build_vae(cfg, device)
    return vae, _build_var(cfg, vae, device)


def _strict_load(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str, device) -> None:
    msg = describe_mismatch(module, sd, what)
    if msg:
        raise FolderError(msg)
    module.to_empty(device=device)
    torch.nn.Module.load_state_dict(module, dict(sd), strict=True)


def check_folder(folder: str) -> Dict[str, Any]:
    """Check a local folder without reading its weights (config, file headers, every key and shape against the
    configuration) and return its config; raises FolderError naming what is wrong."""
    cfg = read_config(folder)
    vae, var = _build(cfg, 'meta')
    pairs = [(var, VAR_WEIGHTS_NAME, 'VAR')]
    if os.path.exists(os.path.join(folder, cfg.get('vae_weights') or VAE_WEIGHTS_NAME)):
        pairs.append((vae, cfg.get('vae_weights') or VAE_WEIGHTS_NAME, 'VQVAE'))
    elif cfg.get('vae_weights'):
        raise FolderError(f'{folder} lacks {cfg["vae_weights"]}: the folder is partial')
    for module, name, what in pairs:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FolderError(f'{path} is missing: the folder is partial (an interrupted save or download)')
        header = _tensor_file_header(path)
        shapes = {k: torch.empty(shape, device='meta') for k, (_, shape) in header.items()}
        msg = describe_mismatch(module, shapes, f'{what} weights in {path}')
        if msg:
            raise FolderError(msg)
    return cfg


def from_pretrained(name_or_path: Union[str, os.PathLike], device: Union[str, torch.device] = 'cpu', *,
                    vae_path: Optional[str] = None, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                    local_files_only: bool = False, token: Optional[str] = None) -> Tuple[VQVAE, VAR]:
    """(vae, var) in eval mode from a folder or a Hub repo id; loading is strict (a missing, unexpected or wrongly
    shaped key is a FolderError that names it). A folder without tokenizer weights (one written by the official
    `VARHF.save_pretrained`) needs `vae_path`: an official VQVAE file or one of this project's checkpoints."""
    folder = resolve_folder(name_or_path, revision=revision, cache_dir=cache_dir,
                            local_files_only=local_files_only, token=token)
    cfg = read_config(folder)
    if vae_path is not None:
        from .loading import load_vae_checkpoint
        vae = load_vae_checkpoint(vae_path, device=device, patch_nums=cfg['patch_nums'])
    else:
        vae_file = os.path.join(folder, cfg.get('vae_weights') or VAE_WEIGHTS_NAME)
        if not os.path.isfile(vae_file):
            raise FolderError(f'{folder} holds no tokenizer weights ({os.path.basename(vae_file)}), as folders '
                              'written by the official VARHF.save_pretrained; pass the tokenizer (vae_path=, '
                              '--vae_ckpt) or save the folder with models.model_folder.save_pretrained')
        vae = _build_vae(cfg, 'meta')
        _strict_load(vae, _load_tensors(vae_file), f'VQVAE weights in {vae_file}', device)  # materialised in place
    var = _build_var(cfg, vae, 'meta')
    _strict_load(var, _load_tensors(os.path.join(folder, VAR_WEIGHTS_NAME)),
                 f'VAR weights in {os.path.join(folder, VAR_WEIGHTS_NAME)}', device)
    return vae.eval(), var.eval()


def export_pth(name_or_path: Union[str, os.PathLike], out_dir: Union[str, os.PathLike], **resolve_kw) -> List[str]:
    """A folder (or repo id) back to .pth files; returns their paths. Writes the official single-file formats
    (`vae_ch{ch}v{V}z{Cvae}.pth` and `var_d{depth}.pth`: plain state dicts, as released) and this project's
    checkpoint format (`var_d{depth}-model.pth`: both models with their configurations and class names, no training
    state; what `sample.py --ckpt` reads). Tensors are bit-identical to the folder's."""
    folder = resolve_folder(name_or_path, **resolve_kw)
    cfg = check_folder(folder)
    vae_meta, var_meta = _build(cfg, 'meta')  # safetensors sorts keys by name: restore the modules' order
    var_sd = _load_tensors(os.path.join(folder, VAR_WEIGHTS_NAME))
    var_sd = {k: var_sd[k] for k in var_meta.state_dict()}
    vae_sd = _load_tensors(os.path.join(folder, cfg.get('vae_weights') or VAE_WEIGHTS_NAME))
    vae_sd = {k: vae_sd[k] for k in vae_meta.state_dict()}
    vk = cfg['vae_kwargs']
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    vae_path = os.path.join(out_dir, f'vae_ch{vk["ch"]}v{vk["vocab_size"]}z{vk["z_channels"]}.pth')
    var_path = os.path.join(out_dir, f'var_d{cfg["depth"]}.pth')
    ckpt_path = os.path.join(out_dir, f'var_d{cfg["depth"]}-model.pth')
    model_config = {k: cfg[k] for k in VAR_ARG_KEYS if k in cfg}
    model_config.update(patch_nums=tuple(cfg['patch_nums']), V=vk['vocab_size'], Cvae=vk['z_channels'],
                        ch=vk['ch'], share_quant_resi=vk.get('share_quant_resi', 4),
                        ch_mult=tuple(vk.get('ch_mult', OFFICIAL_CH_MULT)))
    vae_config = {k: v for k, v in vk.items() if k != 'test_mode'}
    vae_config['v_patch_nums'] = list(cfg['patch_nums'])
    project = {'trainer': {'var_wo_ddp': var_sd, 'vae_local': vae_sd}, 'model_config': model_config,
               'vae_config': vae_config, 'class_names': cfg.get('class_names')}
    for path, obj in ((vae_path, vae_sd), (var_path, var_sd), (ckpt_path, project)):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        _atomic_write_bytes(path, buffer.getvalue())
    return [vae_path, var_path, ckpt_path]


def model_card(cfg: Mapping[str, Any], *, title: Optional[str] = None, source: Optional[str] = None,
               training_command: Optional[str] = None, metrics: Optional[Mapping[str, Any]] = None,
               repo_id: Optional[str] = None, license: str = 'mit') -> str:
    """README.md text in the Hub's model-card format: YAML metadata, then what the model is, how to load and
    sample it (with the folder's sampling settings), how it was trained, and the measured metrics."""
    from huggingface_hub import ModelCardData
    depth, n_cls = cfg['depth'], cfg['num_classes']
    side = cfg['patch_nums'][-1] * downsample_factor(cfg['vae_kwargs'].get('ch_mult', OFFICIAL_CH_MULT))
    title = title or f'VAR-d{depth} ({side}x{side}, {n_cls} classes)'
    data = ModelCardData(license=license, library_name='pytorch',
                         tags=['var', 'visual-autoregressive', 'next-scale-prediction', 'image-generation',
                               'class-conditional', 'safetensors'])
    where = repo_id or 'path/to/this/folder'
    s = dict(cfg.get('sampling') or {})
    names = cfg.get('class_names') or []
    lines = [
        '---', data.to_yaml(), '---', '', f'# {title}', '',
        'A class-conditional VAR (Visual Autoregressive Modeling: next-scale prediction, Tian et al., NeurIPS 2024, '
        'arXiv 2404.02905): the transformer predicts the token maps of the scales '
        f'{"x".join(map(str, cfg["patch_nums"]))} one after another, and the multi-scale VQVAE decodes them.',
        '', '| | |', '|---|---|',
        f'| transformer | depth {depth}, width {cfg["embed_dim"]}, {cfg["num_heads"]} heads, '
        f'shared AdaLN {"yes" if cfg.get("shared_aln") else "no"}, L2-norm attention '
        f'{"yes" if cfg.get("attn_l2_norm") else "no"} |',
        f'| tokenizer | {cfg["vae_kwargs"].get("vocab_size")} codes of width {cfg["vae_kwargs"].get("z_channels")}, '
        f'{cfg["vae_kwargs"].get("ch")} base channels |',
        f'| images | {side}x{side} px |',
        f'| classes | {n_cls}' + (f' ({", ".join(names[:5])}{", ..." if len(names) > 5 else ""})' if names else '')
        + ' |',
        f'| files | `{CONFIG_NAME}`, `{VAR_WEIGHTS_NAME}` (VAR), `{VAE_WEIGHTS_NAME}` (VQVAE), official keys |',
    ]
    if source:
        lines += ['', f'Source: {source}']
    lines += ['', '## Use', '', '```python', 'import torch', 'from models.model_folder import from_pretrained', '',
              f"vae, var = from_pretrained('{where}', device='cuda')",
              'with torch.inference_mode():',
              f"    images_B3HW = var.autoregressive_infer_cfg(B=4, label_B=torch.tensor([0, 1, 2, 3], device='cuda') "
              f"% {n_cls}, g_seed=0, cfg={s.get('cfg', 1.5)}, top_k={s.get('top_k', 900)}, "
              f"top_p={s.get('top_p', 0.96)}, more_smooth={bool(s.get('more_smooth', False))})  # in [0, 1]",
              '```', '',
              f'or from the command line of this project\'s checkout: `python sample.py --ckpt {where} --classes '
              f'{",".join(str(i % n_cls) for i in range(4))} --out grid.png`. The official `VARHF` class reads this '
              'folder too (its tokenizer stays untrained, as officially).']
    if s:
        lines += ['', '## Sampling settings', '', '| setting | value |', '|---|---|']
        lines += [f'| {k} | {v} |' for k, v in s.items()]
    if training_command:
        lines += ['', '## Training', '', '```bash', training_command, '```']
    if metrics:
        lines += ['', '## Metrics', '', '| metric | value |', '|---|---|']
        lines += [f'| {k} | {v:.4g} |' if isinstance(v, float) else f'| {k} | {v} |' for k, v in metrics.items()]
    return '\n'.join(lines) + '\n'


def push_to_hub(folder: Union[str, os.PathLike], repo_id: str, *, token: Optional[str] = None,
                private: bool = False, revision: Optional[str] = None, commit_message: Optional[str] = None) -> Any:
    """Check `folder` (every key and shape, no weights read), create the model repo if needed and upload the
    folder's model files in one commit; returns huggingface_hub's commit info."""
    from huggingface_hub import HfApi
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FolderError(f'{folder} is not a folder')
    if not _REPO_ID.match(repo_id):
        raise FolderError(f'{repo_id!r} is not a Hub repo id (owner/name)')
    cfg = check_folder(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type='model', private=private, exist_ok=True)
    return api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type='model', revision=revision,
                             allow_patterns=list(FOLDER_FILES),
                             commit_message=commit_message or f'Upload VAR-d{cfg["depth"]} (VQVAE + VAR, safetensors)')
