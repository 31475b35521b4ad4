# Model size N and training compute C of VAR models (arXiv 2404.02905, section 4).
"""What a finished (or interrupted) train.py run folder says about one member of a model family.

- N, the parameters, counted on the meta device from the checkpoint's `model_config`: 'all', 'no_class_emb' (all but
  the class embedding), and 'blocks' (the transformer blocks alone: attention 4w^2, FFN 8w^2 and AdaLN 6w^2 per block,
  the paper's N = 18*d*w^2, plus biases and the few norm weights).
- C, the training compute: the FLOPs of one training step per image (forward and backward of the transformer, the
  count of models/flops.py; the frozen tokenizer's encode is left out) times the images seen, which are the iteration
  count of each log.txt record times the images per iteration (`glb_batch_size` of the checkpoint's derived values).
- The validation history: every log.txt record with validation metrics (train.py writes one per validated epoch,
  after that epoch's checkpoint): vL_mean, vL_tail (cross-entropy over all tokens / the last scale), vacc_mean,
  vacc_tail (top-1 accuracy in %), and from them the token error rates 1 - acc/100.
"""
import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from models import build_vae_var
from models.flops import training_flops
from utils.ckpt import LAST_NAME, load_checkpoint

VAL_KEYS = ('vL_mean', 'vL_tail', 'vacc_mean', 'vacc_tail')
PARAM_KINDS = ('all', 'no_class_emb', 'blocks')


def meta_models(model_config: Dict[str, Any]) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(vae, var) of a checkpoint's `model_config` on the meta device: shapes only, no memory, no init cost."""
    return build_vae_var(device='meta', flash_if_available=False, fused_if_available=False, **model_config)


def param_counts(var: torch.nn.Module) -> Dict[str, int]:
    """N of a VAR three ways: 'all' parameters, 'no_class_emb' (without the class embedding, which grows with the
    classes, not the model), 'blocks' (the transformer blocks: the paper's 18*d*w^2 and their biases and norms)."""
    total = sum(p.numel() for p in var.parameters())
    return {'all': total, 'no_class_emb': total - var.class_emb.weight.numel(),
            'blocks': sum(p.numel() for p in var.blocks.parameters())}


def train_flops_per_image(vae: torch.nn.Module, var: torch.nn.Module) -> float:
    """FLOPs of one training step per image: the transformer's forward and backward (models/flops.py)."""
    return training_flops(vae, var, with_encode=False)['total']


def config_with_size(model_config: Dict[str, Any], depth: int, width: int) -> Dict[str, Any]:
    """Another member of the same family: the same tokenizer, scales and classes, this depth and width (heads =
    depth and drop path 0.1*depth/24 as train.py builds it)."""
    return {**model_config, 'depth': depth, 'embed_dim': width, 'num_heads': depth,
            'drop_path_rate': 0.1 * depth / 24}


def model_counts(model_config: Dict[str, Any]) -> Tuple[Dict[str, int], float]:
    """(N three ways, training FLOPs per image) of a model configuration."""
    vae, var = meta_models(model_config)
    return param_counts(var), train_flops_per_image(vae, var)


@dataclasses.dataclass
class Member:
    """One trained member of a family, read from its run folder.

    `history`: one dict per validated epoch (ep, it, images, compute, vL_mean, vL_tail, vacc_mean, vacc_tail,
    err_mean, err_tail), by epoch."""
    name: str
    folder: str
    depth: int
    width: int
    epoch: int          # where the last checkpoint stands (epochs done)
    target_ep: int      # the run's --ep
    n_params: Dict[str, int]
    flops_per_image: float
    images_per_iter: int
    history: List[Dict[str, float]]

    @property
    def finished(self) -> bool:
        return self.epoch >= self.target_ep

    @property
    def final(self) -> Optional[Dict[str, float]]:
        """The validation at the last epoch of a finished run, else None."""
        last = self.history[-1] if self.history else None
        return last if self.finished and last is not None and last['ep'] == self.target_ep else None

    def as_dict(self) -> Dict[str, Any]:
        """For scaling.json: the member's folder is left out (its name under the sweep folder says it, and a report
        stays the same wherever the sweep lives)."""
        d = dataclasses.asdict(self)
        del d['folder']
        return {**d, 'finished': self.finished}


def checkpoint_position(folder: str) -> Optional[Tuple[int, int]]:
    """(epoch, iteration) of a run folder's last checkpoint, or None when there is none yet."""
    path = os.path.join(folder, LAST_NAME)
    if not os.path.isfile(path):
        return None
    ckpt = load_checkpoint(path)
    return int(ckpt['epoch']), int(ckpt['iter'])


def is_finished(folder: str, target_ep: int) -> bool:
    """True when the folder's last checkpoint is at the end of epoch `target_ep` (train.py would do nothing)."""
    pos = checkpoint_position(folder)
    return pos is not None and pos[0] >= target_ep and pos[1] == 0


def read_validation_records(log_txt: str) -> List[Dict[str, Any]]:
    """The log.txt records with validation metrics, by epoch; a rerun's record of an epoch replaces the older one."""
    by_ep: Dict[int, Dict[str, Any]] = {}
    with open(log_txt) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if isinstance(rec, dict) and 'ep' in rec and all(k in rec for k in VAL_KEYS):
                by_ep[int(rec['ep'])] = rec
    return [by_ep[ep] for ep in sorted(by_ep)]


def read_member(folder: str) -> Member:
    """A run folder of train.py -> Member. Raises FileNotFoundError when it holds no checkpoint yet."""
    path = os.path.join(folder, LAST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{folder} holds no {LAST_NAME} (a run that has not finished an epoch)')
    ckpt = load_checkpoint(path)
    config = dict(ckpt['model_config'])
    n_params, flops = model_counts(config)
    images_per_iter = int(ckpt['derived']['glb_batch_size'])
    log_txt = os.path.join(folder, 'log.txt')
    records = read_validation_records(log_txt) if os.path.isfile(log_txt) else []
    history = []
    for rec in records:
        images = int(rec['it']) * images_per_iter
        history.append({'ep': int(rec['ep']), 'it': int(rec['it']), 'images': images, 'compute': flops * images,
                        **{k: float(rec[k]) for k in VAL_KEYS},
                        'err_mean': 1 - float(rec['vacc_mean']) / 100, 'err_tail': 1 - float(rec['vacc_tail']) / 100})
    return Member(name=os.path.basename(os.path.normpath(folder)), folder=folder, depth=int(config['depth']),
                  width=int(config['embed_dim']), epoch=int(ckpt['epoch']), target_ep=int(ckpt['args']['ep']),
                  n_params=n_params, flops_per_image=flops, images_per_iter=images_per_iter, history=history)


def find_members(sweep_dir: str) -> Tuple[List[Member], List[str]]:
    """The members of a sweep folder (its sub-folders with a checkpoint), smallest first, and notes on the
    sub-folders that were skipped."""
    if not os.path.isdir(sweep_dir):
        raise FileNotFoundError(f'no sweep folder {sweep_dir}')
    members, notes = [], []
    for name in sorted(os.listdir(sweep_dir)):
        folder = os.path.join(sweep_dir, name)
        if not os.path.isdir(folder):
            continue
        if not os.path.isfile(os.path.join(folder, LAST_NAME)):
            if os.path.isfile(os.path.join(folder, 'log.txt')):
                notes.append(f'{name}: no checkpoint yet (started, not one epoch done)')
            continue
        members.append(read_member(folder))
    members.sort(key=lambda m: (m.n_params['all'], m.name))
    return members, notes
