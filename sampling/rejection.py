# Classifier rejection sampling, as behind VAR's "d30-re" result (arXiv 2404.02905, Table 1): draw several candidates
# per image and keep the one an ImageNet classifier finds most likely to show the requested class.
"""Classifier rejection sampling with a local torchvision ImageNet classifier.

The classifier is any torchvision architecture (`--classifier_arch`, e.g. resnet50) with its weights in a local state
dict (`--classifier_ckpt`, e.g. torchvision's resnet50 file); nothing is downloaded. Candidates are scored on the uint8
images that would be saved, with the standard ImageNet evaluation transform: resize the shorter side to 256
(bilinear, antialiased), centre-crop 224, normalise with the ImageNet mean and std.
"""
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetClassifier(torch.nn.Module):
    """uint8 images (B, H, W, 3) -> class probabilities (B, K), with the ImageNet evaluation transform."""

    def __init__(self, net: torch.nn.Module, resize: int = 256, crop: int = 224):
        super().__init__()
        self.net, self.resize, self.crop = net, resize, crop
        self.register_buffer('mean_1311', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std_1311', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.inference_mode()
    def forward(self, img_BHW3: np.ndarray) -> torch.Tensor:
        x_B3HW = torch.from_numpy(np.ascontiguousarray(img_BHW3)).to(self.mean_1311.device)
        x_B3HW = x_B3HW.permute(0, 3, 1, 2).float().div_(255)
        H, W = x_B3HW.shape[-2:]
        scale = self.resize / min(H, W)
        x_B3HW = F.interpolate(x_B3HW, size=(round(H * scale), round(W * scale)), mode='bilinear',
                               align_corners=False, antialias=True)
        top, left = (x_B3HW.shape[-2] - self.crop) // 2, (x_B3HW.shape[-1] - self.crop) // 2
        x_B3HW = x_B3HW[..., top:top + self.crop, left:left + self.crop]
        return self.net((x_B3HW - self.mean_1311) / self.std_1311).float().softmax(-1)


def load_classifier(arch: str, ckpt_path: str, device: torch.device) -> ImageNetClassifier:
    """A torchvision `arch` with the weights of the state dict at `ckpt_path`; raises ValueError with the reason."""
    import torchvision
    if arch not in torchvision.models.list_models():
        raise ValueError(f'--classifier_arch {arch!r} is not a torchvision model (e.g. resnet50, vit_b_16)')
    try:
        sd = torch.load(ckpt_path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f'cannot read the classifier checkpoint {ckpt_path}: {type(e).__name__}: {e}') from e
    if not isinstance(sd, dict):
        raise ValueError(f'{ckpt_path} is not a state dict (found {type(sd).__name__})')
    net = torchvision.models.get_model(arch, weights=None)  # the 1000 ImageNet classes
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f'{ckpt_path} does not fit torchvision {arch}: {str(e)[:300]}') from e
    return ImageNetClassifier(net.eval()).to(device)


def sample_best_of(draw: Callable[[int], np.ndarray], classifier: ImageNetClassifier, labels: Sequence[int],
                   candidates: int) -> np.ndarray:
    """Call `draw(candidate)` for candidate 0..candidates-1 (each uint8 (B, H, W, 3) for `labels`) and keep, per row,
    the image with the highest probability of its label (the earliest candidate on ties)."""
    label_B1 = torch.tensor(list(labels)).view(-1, 1)
    best_BHW3, best_B = None, None
    for cand in range(candidates):
        img_BHW3 = draw(cand)
        prob_BK = classifier(img_BHW3).cpu()
        if int(label_B1.max()) >= prob_BK.shape[1]:
            raise ValueError(f'the classifier has {prob_BK.shape[1]} classes; label {int(label_B1.max())} is beyond')
        score_B = prob_BK.gather(1, label_B1)[:, 0]
        if best_BHW3 is None:
            best_BHW3, best_B = img_BHW3.copy(), score_B
            continue
        better_B = (score_B > best_B).numpy()
        best_BHW3[better_B] = img_BHW3[better_B]
        best_B = torch.maximum(best_B, score_B)
    return best_BHW3
