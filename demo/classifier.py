"""The demo's quality yardstick: a small CNN trained on the real Fashion-MNIST training set in well under a minute.

It gives two numbers for any set of 32x32 images with intended labels: the class accuracy (does a sample show its
class?) and a Fréchet distance between its 128-d penultimate features and those of the real training set (do the
samples look like the data, and vary like it?). Both are also measured on real validation images, the reference that
generated samples are compared with. The Fréchet math is evaluate.py's (sampling/metrics.py).

Legend: N images, D feature width (128), K classes (10).
"""
import os
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sampling.metrics import feature_statistics, frechet_distance
from utils.ckpt import atomic_save

FEATURE_DIM = 128


class SmallCNN(nn.Module):
    """Grey 32x32 images in [-1, 1] (B, 1, 32, 32) -> (features (B, 128), logits (B, K))."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.convs = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),          # 16x16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(4 * w * 16, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, x_B1HW: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feat_BD = self.fc(self.convs(x_B1HW))
        return feat_BD, self.head(feat_BD)


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, 32, 32) grey or (N, 32, 32, 3) RGB -> float (N, 1, 32, 32) in [-1, 1] (RGB: channel mean)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    if x.ndim == 4:
        x = x.mean(dim=-1)
    return x.div(127.5).sub(1).unsqueeze(1)


def train_classifier(images_NHW: np.ndarray, labels_N: np.ndarray, epochs: int = 2, bs: int = 128, lr: float = 3e-3,
                     seed: int = 0, log: Callable[[str], None] = print) -> SmallCNN:
    """Adam with a linear decay and random translations; deterministic for a seed. Channels-last memory: oneDNN's
    CPU convolutions are about 1.5x faster in that layout."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x_all, y_all = to_input(images_NHW), torch.from_numpy(labels_N).long()
    N = x_all.shape[0]
    steps = epochs * (N // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    model.train()
    t0, step = time.time(), 0
    for ep in range(epochs):
        perm = torch.randperm(N, generator=g)
        correct = 0
        for s in range(N // bs):
            idx = perm[s * bs:(s + 1) * bs]
            x, y = x_all[idx], y_all[idx]
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))  # the 2-pixel black border makes a roll a translation
            x = x.contiguous(memory_format=torch.channels_last)
            _, logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            correct += (logits.argmax(1) == y).sum().item()
        log(f'[classifier] epoch {ep + 1}/{epochs}: train accuracy {100 * correct / (N // bs * bs):.2f}% '
            f'({time.time() - t0:.0f}s)')
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def features_logits(model: SmallCNN, images: np.ndarray, bs: int = 500) -> Tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float64, logits (N, K) float64) of uint8 images (grey or RGB)."""
    model.eval()
    feats, logits = [], []
    for s in range(0, images.shape[0], bs):
        f, lg = model(to_input(images[s:s + bs]))
        feats.append(f.double().numpy())
        logits.append(lg.double().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def load_or_train(path: str, train_images: np.ndarray, train_labels: np.ndarray, epochs: int, seed: int,
                  log: Callable[[str], None] = print) -> Tuple[SmallCNN, Dict[str, np.ndarray]]:
    """The classifier and the training set's feature statistics {'mu', 'sigma'}; cached in `path`."""
    if os.path.isfile(path):
        state = torch.load(path, map_location='cpu', weights_only=True)
        model = SmallCNN()
        model.load_state_dict(state['model'])
        log(f'[classifier] reusing {path}')
        return model.eval(), {'mu': state['mu'].numpy(), 'sigma': state['sigma'].numpy()}
    model = train_classifier(train_images, train_labels, epochs=epochs, seed=seed, log=log)
    feats, _ = features_logits(model, train_images)
    mu, sigma = feature_statistics(feats)
    atomic_save({'model': model.state_dict(), 'mu': torch.from_numpy(mu), 'sigma': torch.from_numpy(sigma)}, path)
    return model, {'mu': mu, 'sigma': sigma}


def quality(model: SmallCNN, images: np.ndarray, labels: np.ndarray, ref: Dict[str, np.ndarray],
            feats_logits: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> Dict[str, float]:
    """Class accuracy (%) against the intended labels, and the Fréchet distance to the reference statistics."""
    feats, logits = feats_logits if feats_logits is not None else features_logits(model, images)
    mu, sigma = feature_statistics(feats)
    acc = float((logits.argmax(1) == labels).mean() * 100)
    return {'accuracy': acc, 'frechet': frechet_distance(mu, sigma, ref['mu'], ref['sigma']), 'n': int(len(labels))}
