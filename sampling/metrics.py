# Implements the ImageNet sample metrics of VAR (arXiv 2404.02905), section 5, as OpenAI's guided-diffusion evaluator
# defines them: FID, Inception Score, and the precision/recall of Kynkaanniemi et al. (arXiv 1904.06991).
"""The metrics of evaluate.py: Inception features of an image set, feature statistics, the Fréchet distance, the
Inception Score and improved precision/recall, with the conventions of OpenAI's evaluator (see evaluate.py).

Legend: N images, D feature width, K classifier logits; arrays are numpy unless the name says tensor.
"""
import os
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from sampling.image_sets import ImageSetError, open_image_set

# torch-fidelity's converted TF Inception weights (what it downloads on first use).
INCEPTION_URL = ('https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/'
                 'weights-inception-2015-12-05-6726825d.pth')
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURHOOD = 3

# A feature network maps uint8 images (B, 3, H, W) to (pool features (B, D), logits (B, K)), both float.
FeatureNet = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


class InceptionFeatures(torch.nn.Module):
    """torch-fidelity's TF-compatible Inception-v3 → (pool_3 features (B, 2048), bias-free logits (B, 1008))."""

    def __init__(self, weights_path: Optional[str] = None):
        super().__init__()
        try:
            from torch_fidelity import FeatureExtractorInceptionV3
        except ImportError as e:
            raise RuntimeError('the Inception features need torch-fidelity for the Inception features: '
                               'pip install torch-fidelity') from e
        if weights_path is not None and not os.path.isfile(weights_path):
            raise FileNotFoundError(f'--inception_weights {weights_path} does not exist')
        try:
            self.net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048', 'logits_unbiased'],
                                                   feature_extractor_weights_path=weights_path)
        except Exception as e:  # a download or a load failure: both leave the user without a network
            if weights_path is not None:
                raise RuntimeError(f'cannot load the Inception weights from {weights_path}: {e}') from e
            cached = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(INCEPTION_URL))
            raise RuntimeError(
                f'could not get the Inception weights ({type(e).__name__}: {e}). Without network access, download '
                f'{INCEPTION_URL} elsewhere and pass --inception_weights PATH (or put it at {cached}).') from e

    def forward(self, img_B3HW: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        pool_BD, logits_BK = self.net(img_B3HW)
        return pool_BD, logits_BK


@torch.no_grad()
def extract_features(path: str, net: FeatureNet, batch_size: int = 100, device: str = 'cpu',
                     progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Run every image of an `.npz` or PNG folder through `net` → (features (N, D), logits (N, K)), float64."""
    shape, batches = open_image_set(path, batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=-(-shape[0] // batch_size), desc=os.path.basename(path.rstrip('/')),
                       unit='batch', file=sys.stdout)
    feats, logits = [], []
    for img_BHW3 in batches:
        img_B3HW = torch.from_numpy(img_BHW3).to(device).permute(0, 3, 1, 2)
        f_BD, l_BK = net(img_B3HW)
        feats.append(f_BD.double().cpu().numpy())
        logits.append(l_BK.double().cpu().numpy())
    return np.concatenate(feats), np.concatenate(logits)


def feature_statistics(feats_ND: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) with the N-1 normalisation (as numpy.cov)."""
    if feats_ND.shape[0] < 2:
        raise ValueError('FID needs at least 2 images on each side')
    return feats_ND.mean(0), np.cov(feats_ND, rowvar=False)


def _clean_eigvals(eigval_D: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix, with those below round-off (numpy's matrix_rank threshold) set to 0:
    a square root would otherwise turn a 1e-16 of noise into a 1e-8 of error."""
    tol = max(eigval_D.max(initial=0.0), 0.0) * eigval_D.shape[0] * np.finfo(np.float64).eps
    return np.where(eigval_D > tol, eigval_D, 0.0)


def _sqrt_psd(mat_DD: np.ndarray) -> np.ndarray:
    eigval_D, eigvec_DD = np.linalg.eigh(mat_DD)
    return (eigvec_DD * np.sqrt(_clean_eigvals(eigval_D))) @ eigvec_DD.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) between two Gaussians.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which are those of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2): one symmetric eigensolve, no complex round-off and no regulariser even for
    singular covariances.
    """
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f'mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs '
                         f'{sigma2.shape}')
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eigval = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(_clean_eigvals(eigval)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits_NK: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over consecutive splits of exp(E_x KL(p(y|x) || p(y))), p(y) being the split's mean prediction."""
    logits_NK = np.asarray(logits_NK, dtype=np.float64)
    logp_NK = logits_NK - logits_NK.max(1, keepdims=True)
    logp_NK -= np.log(np.exp(logp_NK).sum(1, keepdims=True))
    scores = []
    for start in range(0, len(logp_NK), split_size):
        logp = logp_NK[start:start + split_size]
        p = np.exp(logp)
        log_marginal = np.log(p.mean(0, keepdims=True))
        scores.append(np.exp((p * (logp - log_marginal)).sum(1).mean()))
    return float(np.mean(scores))


def _sq_dists(a_ND: torch.Tensor, b_MD: torch.Tensor) -> torch.Tensor:
    # float64 keeps ||a||^2 + ||b||^2 - 2ab exact enough for 2048-d features of magnitude ~1e1
    return (a_ND.square().sum(1, keepdim=True) + b_MD.square().sum(1)[None] - 2 * a_ND @ b_MD.T).clamp_(min=0)


def _knn_radii(feats_ND: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour, the point itself not counted."""
    return torch.cat([_sq_dists(feats_ND[s:s + batch], feats_ND).kthvalue(k + 1, dim=1).values
                      for s in range(0, len(feats_ND), batch)])


def _coverage(points_ND: torch.Tensor, centres_MD: torch.Tensor, radii_M: torch.Tensor, batch: int) -> float:
    """Fraction of points inside at least one ball (centre, k-NN radius)."""
    inside = [(_sq_dists(points_ND[s:s + batch], centres_MD) <= radii_M[None]).any(1)
              for s in range(0, len(points_ND), batch)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real_ND: np.ndarray, fake_ND: np.ndarray, k: int = PR_NEIGHBOURHOOD, batch: int = 1000,
                     device: str = 'cpu') -> Tuple[float, float]:
    """Improved precision and recall (k-NN manifolds): the share of fakes inside the real manifold, and vice versa."""
    if min(len(real_ND), len(fake_ND)) <= k:
        raise ValueError(f'precision/recall with k={k} needs more than {k} images on each side')
    real = torch.as_tensor(real_ND, dtype=torch.float64, device=device)
    fake = torch.as_tensor(fake_ND, dtype=torch.float64, device=device)
    precision = _coverage(fake, real, _knn_radii(real, k, batch), batch)
    recall = _coverage(real, fake, _knn_radii(fake, k, batch), batch)
    return precision, recall


def check_image_sets(samples: str, ref: str) -> None:
    """Raise ImageSetError unless both sets are readable uint8 (N, H, W, 3) images of one resolution, each with enough
    images for precision/recall; from the headers only, before any feature is extracted."""
    ref_shape, _ = open_image_set(ref, 1)
    sample_shape, _ = open_image_set(samples, 1)
    if sample_shape[1:3] != ref_shape[1:3]:
        raise ImageSetError(f'{samples} holds {sample_shape[1]}x{sample_shape[2]} images but {ref} holds '
                            f'{ref_shape[1]}x{ref_shape[2]}: compare samples with the reference of their resolution')
    for path, shape in ((samples, sample_shape), (ref, ref_shape)):
        if shape[0] <= PR_NEIGHBOURHOOD:
            raise ImageSetError(f'{path} holds {shape[0]} image(s); precision/recall with k={PR_NEIGHBOURHOOD} needs '
                                f'at least {PR_NEIGHBOURHOOD + 1} on each side (the published numbers use 50,000 '
                                f'samples)')


def stored_statistics(ref: str) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The `mu` (D,) and `sigma` (D, D) stored in an OpenAI reference `.npz`, or None (a folder, or none stored)."""
    if os.path.isdir(ref):
        return None
    with np.load(ref) as z:
        if 'mu' not in z.files or 'sigma' not in z.files:
            return None
        return z['mu'].astype(np.float64), z['sigma'].astype(np.float64)


def evaluate(samples: str, ref: str, net: FeatureNet, batch_size: int = 100, device: str = 'cpu',
             progress: bool = False, recompute_ref_stats: bool = False) -> Dict[str, Any]:
    """All four metrics of a sample set against a reference batch; both sets of images are read with `net`."""
    check_image_sets(samples, ref)
    ref_feats, _ = extract_features(ref, net, batch_size, device, progress)
    fake_feats, fake_logits = extract_features(samples, net, batch_size, device, progress)
    ref_stats = None if recompute_ref_stats else stored_statistics(ref)
    if ref_stats is not None and ref_stats[0].shape != (fake_feats.shape[1],):
        raise ValueError(f'{ref} stores mu of shape {ref_stats[0].shape}, but the features have '
                         f'{fake_feats.shape[1]} dimensions: pass --recompute_ref_stats')
    fid_ref = 'stored' if ref_stats is not None else 'recomputed'
    ref_stats = ref_stats if ref_stats is not None else feature_statistics(ref_feats)
    fid = frechet_distance(*feature_statistics(fake_feats), *ref_stats)
    precision, recall = precision_recall(ref_feats, fake_feats, device=device)
    return {'fid': fid, 'inception_score': inception_score(fake_logits), 'precision': precision, 'recall': recall,
            'num_samples': len(fake_feats), 'num_ref': len(ref_feats), 'fid_reference_statistics': fid_ref}
