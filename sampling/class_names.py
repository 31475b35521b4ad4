"""Names of a model's classes, for the pages and cards that show them: one place for every kind of model source.

- this project's train.py checkpoint: its `class_names` (class id i = the i-th training folder, sorted);
- a model folder or Hub repo id (models.model_folder): config.json's `class_names`;
- the released models (1000 classes): ImageNet-1k's names from torchvision's weights metadata (no download);
- anything else: 'class i'.
Reading never unpickles code (models.loading.read_checkpoint) and maps a checkpoint instead of reading its weights.
"""
import os
from typing import List, Optional

from models import model_folder
from models.loading import read_checkpoint
from models.presets import NUM_CLASSES


def imagenet_class_names() -> List[str]:
    """ImageNet-1k's 1000 class names in id order, from torchvision's weights metadata (no download)."""
    from torchvision.models import ResNet50_Weights
    return list(ResNet50_Weights.IMAGENET1K_V2.meta['categories'])


def stored_class_names(ckpt: Optional[str], cache_dir: Optional[str] = None,
                       local_files_only: bool = False) -> Optional[List[str]]:
    """The class names a checkpoint file, model folder or Hub repo id stores, or None when it stores none (or is
    unreadable: the model was loaded from it already, so a problem here only costs the names)."""
    if not ckpt:
        return None
    try:
        if os.path.isdir(ckpt) or model_folder.is_repo_id(ckpt):
            folder = model_folder.resolve_folder(ckpt, cache_dir=cache_dir, local_files_only=local_files_only)
            names = model_folder.read_config(folder).get('class_names')
        elif os.path.isfile(ckpt):
            data = read_checkpoint(ckpt, mmap=True)  # mmap: only the small pickle is read, not the weights
            names = data.get('class_names') if isinstance(data, dict) else None
        else:
            return None
    except Exception:
        return None
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else None


def class_names_for(num_classes: int, ckpt: Optional[str] = None, cache_dir: Optional[str] = None,
                    local_files_only: bool = False) -> List[str]:
    """Names for the model's classes: the stored ones, else ImageNet's for 1000 classes, else 'class i'."""
    names = stored_class_names(ckpt, cache_dir, local_files_only)
    if names is not None and len(names) == num_classes:
        return names
    if num_classes == NUM_CLASSES:
        return imagenet_class_names()
    return [f'class {i}' for i in range(num_classes)]
