"""metrics.py and sampling/metrics.py: metric math against closed forms, the pipeline with a stand-in feature network,
and clear errors for bad input. Offline: the real Inception network is never loaded.

The metric math runs in float64 and the closed forms keep their documented tolerances: the Frechet distance goes
through an eigen decomposition (its error grows with the covariances' conditioning, not only with their size), the
scores through logs and exponentials of shifted logits. Float32 features of two batchings are compared up to their
rounding (support.assert_equal_up_to_rounding)."""
import contextlib
import io
import json
import os
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
from sampling import metrics
from sampling.image_sets import ImageSetError, save_png
from support import assert_equal_up_to_rounding


# ----------------------------------------------------------------------------------------------------- Frechet distance
def _random_rotation(D: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((D, D)))
    return q * np.sign(np.diag(r))


def test_frechet_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    sigma = a @ a.T
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    assert metrics.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(((mu1 - mu2) ** 2).sum(), abs=1e-9)
    assert metrics.frechet_distance(mu1, sigma, mu1, sigma) == pytest.approx(0, abs=1e-9)


def test_frechet_commuting_covariances():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T  =>  tr S1 + tr S2 - 2 tr sqrt(S1 S2) = sum (sqrt a - sqrt b)^2
    a, b = np.array([4.0, 1.0, 0.25, 9.0, 0.0]), np.array([1.0, 1.0, 4.0, 0.5, 2.0])
    q = _random_rotation(5, 1)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = np.zeros(5), np.full(5, 0.5)
    expected = 5 * 0.25 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-9)


def test_frechet_non_commuting_2x2_closed_form():
    # For 2x2, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) with M = S1 S2 (eigenvalues real and non-negative).
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[1.0, -0.4], [-0.4, 3.0]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.0, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, abs=1e-9)
    assert metrics.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, abs=1e-9)


def test_frechet_of_sample_statistics_singular_covariance():
    # Fewer samples than dimensions: singular covariances must not produce NaN or complex values.
    feats = np.random.default_rng(2).standard_normal((5, 16))
    d = metrics.frechet_distance(*metrics.feature_statistics(feats), *metrics.feature_statistics(feats + 1.0))
    assert d == pytest.approx(16.0, abs=1e-6)


def test_frechet_diagonal_closed_form_down_to_tiny_variances():
    # Diagonal covariances: ||mu1 - mu2||^2 + sum(s1 + s2 - 2 sqrt(s1 s2)), variances from 10 down to 1e-6 (the
    # products s1 s2 stay well above the round-off cut-off, 10 * 8 * eps, below which their roots are dropped).
    s1 = np.array([10.0, 2.0, 0.3, 4e-2, 1e-4, 3e-6, 1e-6, 0.0])
    s2 = np.array([1.0, 2.0, 1.2, 1e-2, 4e-4, 1e-6, 9e-6, 5e-5])
    mu1, mu2 = np.linspace(-1.0, 1.0, 8), np.linspace(0.5, -0.5, 8)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)
    # The same in a rotated basis, and in units 1000x smaller (variances 1e-6 smaller): FID scales by 1e-6.
    q = _random_rotation(8, 6)
    rotated = metrics.frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)
    c = 1e-3
    small = metrics.frechet_distance(c * mu1, c ** 2 * np.diag(s1), c * mu2, c ** 2 * np.diag(s2))
    assert small == pytest.approx(c ** 2 * expected, rel=1e-9)
    # Every product c^4 s1 s2 is below 1e-3: a fixed cut-off of 1e-3 would drop all of tr (S1 S2)^(1/2) here.
    assert c ** 2 * (((mu1 - mu2) ** 2).sum() + (s1 + s2).sum()) > 1.5 * small


def _frechet_of_samples(f1_ND: np.ndarray, f2_MD: np.ndarray) -> float:
    """FID of two sample sets computed without any matrix square root: with A, B the centred samples, S1 S2 has the
    non-zero eigenvalues of (A B^T)(A B^T)^T / ((N-1)(M-1)), so tr (S1 S2)^(1/2) = sum of the singular values of
    A B^T / sqrt((N-1)(M-1)). Exact for rank-deficient covariances."""
    a, b = f1_ND - f1_ND.mean(0), f2_MD - f2_MD.mean(0)
    tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((len(a) - 1) * (len(b) - 1))
    diff = f1_ND.mean(0) - f2_MD.mean(0)
    tr1, tr2 = (a ** 2).sum() / (len(a) - 1), (b ** 2).sum() / (len(b) - 1)
    return float(diff @ diff + tr1 + tr2 - 2 * tr_covmean)


@pytest.mark.parametrize('scale', [1.0, 1e-2])
def test_frechet_rank_deficient_covariances(scale):
    # 6 and 9 samples in 32 dimensions: covariances of rank 5 and 8, 24+ eigenvalues that are zero up to round-off.
    # With features in units 100x smaller (scale 1e-2) the real eigenvalues are ~1e-4: a fixed cut-off (1e-3, say)
    # would drop them, the relative one (largest eigenvalue * D * eps) keeps them.
    rng = np.random.default_rng(5)
    f1 = rng.standard_normal((6, 32)) * scale
    f2 = (rng.standard_normal((9, 32)) * 1.5 + 0.3) * scale
    stats1, stats2 = [(f.mean(0), np.cov(f, rowvar=False)) for f in (f1, f2)]
    assert np.linalg.matrix_rank(stats1[1]) == 5 and np.linalg.matrix_rank(stats2[1]) == 8
    expected = _frechet_of_samples(f1, f2)
    got = metrics.frechet_distance(*stats1, *stats2)
    assert np.isfinite(got) and got > 0
    assert got == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(*stats2, *stats1) == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(*stats1, *stats1) == pytest.approx(0, abs=1e-12 * expected)
    try:
        import scipy.linalg
    except ImportError:  # scipy is no requirement of the project; the SVD form above is the exact reference
        return
    with np.errstate(all='ignore'):
        covmean = scipy.linalg.sqrtm(stats1[1] @ stats2[1])  # the classic float64 route: complex, singular-warned
    (mu1, sigma1), (mu2, sigma2) = stats1, stats2
    classic = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real
    assert got == pytest.approx(classic, rel=1e-6)


def test_frechet_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match='mismatched'):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# -------------------------------------------------------------------------------------------------- precision / recall
def _line(values, D=4):
    x = np.zeros((len(values), D))
    x[:, 0] = values
    return x


def test_precision_recall_identical_and_disjoint():
    real = np.random.default_rng(3).standard_normal((40, 8))
    assert metrics.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_precision_recall_outliers_lower_precision_only():
    real = _line(np.arange(10.0))
    fake = _line(np.concatenate([np.arange(10.0), 1000.0 + np.arange(5.0)]))  # 10 good fakes, 5 far outliers
    precision, recall = metrics.precision_recall(real, fake)
    assert precision == pytest.approx(10 / 15)
    assert recall == 1.0


def test_precision_recall_dropped_mode_lowers_recall_only():
    # Real: two clusters {0..9} and {100..109}; fakes cover only the first -> precision 1, recall 1/2.
    real = _line(np.concatenate([np.arange(10.0), 100.0 + np.arange(10.0)]))
    fake = _line(0.5 + np.arange(9.0))
    assert metrics.precision_recall(real, fake) == (1.0, 0.5)


def test_precision_recall_batching_matches_brute_force():
    rng = np.random.default_rng(4)
    real, fake = rng.standard_normal((37, 5)), rng.standard_normal((29, 5)) * 1.3 + 0.3
    d_rr = ((real[:, None] - real[None]) ** 2).sum(-1)
    d_ff = ((fake[:, None] - fake[None]) ** 2).sum(-1)
    d_fr = ((fake[:, None] - real[None]) ** 2).sum(-1)
    r_real, r_fake = np.sort(d_rr, 1)[:, 3], np.sort(d_ff, 1)[:, 3]  # index 0 is the point itself
    precision = (d_fr <= r_real[None]).any(1).mean()
    recall = (d_fr.T <= r_fake[None]).any(1).mean()
    assert 0 < precision < 1 and 0 < recall < 1
    for batch in (7, 1000):
        assert metrics.precision_recall(real, fake, batch=batch) == (pytest.approx(precision), pytest.approx(recall))


def _knn_precision_recall(real_ND: np.ndarray, fake_MD: np.ndarray, k: int = 3):
    """Kynkaanniemi et al. by brute force, one point at a time: a fake counts toward precision if it lies within the
    k-NN radius (Euclidean, the centre itself not counted) of some real point; recall, roles swapped."""
    def radii(x):  # each sorted row starts with the point itself at distance 0
        return np.array([np.sort(np.linalg.norm(x - point, axis=1))[k] for point in x])

    def coverage(points, centres):
        r = radii(centres)
        return float(np.mean([(np.linalg.norm(centres - point, axis=1) <= r).any() for point in points]))
    return coverage(fake_MD, real_ND), coverage(real_ND, fake_MD)


def _pr_case(name: str):
    rng = np.random.default_rng(7)
    if name == 'disjoint':  # two clouds 20 apart in 3-d
        return rng.standard_normal((30, 3)), rng.standard_normal((25, 3)) + [20.0, 0.0, 0.0]
    if name == 'partial':  # unit squares overlapping in 40% of their area, the reals denser
        return rng.uniform(0, 1, (40, 2)), rng.uniform(0, 1, (24, 2)) + [0.6, 0.0]
    # nested: fakes in the central 1x1 of a 4x4 square of reals -> inside the real manifold, covering little of it
    return rng.uniform(-2, 2, (40, 2)), rng.uniform(-0.5, 0.5, (20, 2))


@pytest.mark.parametrize('name', ['disjoint', 'partial', 'nested'])
def test_precision_recall_against_brute_force(name):
    real, fake = _pr_case(name)
    precision, recall = _knn_precision_recall(real, fake)
    if name == 'disjoint':
        assert precision == recall == 0.0
    elif name == 'partial':
        assert 0.2 < precision < 0.8 and 0.2 < recall < 0.8 and abs(precision - recall) > 0.1
    else:
        assert precision == 1.0 and recall < 0.5
    assert metrics.precision_recall(real, fake) == (pytest.approx(precision), pytest.approx(recall))
    assert metrics.precision_recall(fake, real) == (pytest.approx(recall), pytest.approx(precision))


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(ValueError, match='more than 3'):
        metrics.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


# ----------------------------------------------------------------------------------------------------- Inception Score
def test_inception_score_bounds():
    assert metrics.inception_score(np.zeros((20, 7))) == pytest.approx(1.0)
    confident = 60.0 * np.eye(7)[np.arange(70) % 7]  # confident and evenly spread over the 7 classes -> IS = 7
    assert metrics.inception_score(confident) == pytest.approx(7.0, rel=1e-6)
    # Consecutive splits, no shuffling: each split of 7 sees a single class -> every split scores 1.
    assert metrics.inception_score(60.0 * np.eye(7)[np.arange(70) // 10], split_size=10) == pytest.approx(1.0)


def _inception_scores(probs_NK: np.ndarray, split_size: int) -> np.ndarray:
    """exp(mean_x KL(p(y|x) || p(y))) of each consecutive split (the last one may be shorter), p(y) its mean."""
    scores = []
    for start in range(0, len(probs_NK), split_size):
        p = probs_NK[start:start + split_size]
        p_y = p.mean(0)
        kl = [sum(pi * np.log(pi / qi) for pi, qi in zip(row, p_y) if pi > 0) for row in p]
        scores.append(np.exp(np.mean(kl)))
    return np.array(scores)


def test_inception_score_per_split_against_reference():
    rng = np.random.default_rng(8)
    probs = rng.dirichlet(np.full(6, 0.3), size=23)
    probs[10:] = rng.dirichlet(np.full(6, 3.0), size=13)  # splits of 5: the later ones are far less confident
    logits = np.log(probs) + rng.uniform(-1000, 1000, (23, 1))  # a per-row shift leaves the softmax unchanged
    for split_size in (5, 7, 23, 100):
        scores = _inception_scores(probs, split_size)
        assert metrics.inception_score(logits, split_size=split_size) == pytest.approx(scores.mean(), rel=1e-10)
    scores = _inception_scores(probs, 5)  # splits of 5, 5, 5, 5 and 3 images, each with its own marginal
    assert len(scores) == 5 and scores.std() > 0.2
    assert scores.mean() != pytest.approx(_inception_scores(probs, 23)[0], rel=1e-2)
    assert metrics.inception_score(logits[:1], split_size=5) == pytest.approx(1.0)  # one image: p(y) = p(y|x)


def test_inception_score_closed_forms():
    K, eps = 5, 0.2
    # Identical predictions: p(y|x) = p(y), every KL is 0.
    p = np.random.default_rng(9).dirichlet(np.ones(K))
    assert metrics.inception_score(np.tile(np.log(p), (12, 1)), split_size=5) == pytest.approx(1.0, abs=1e-12)
    # Soft predictions, 1 - eps on class i and eps / (K-1) elsewhere, spread evenly over the K classes: p(y) is
    # uniform, so IS = exp(log K - H(p(y|x))) = K exp(-H).
    soft = np.full((K, K), eps / (K - 1)) + (1 - eps - eps / (K - 1)) * np.eye(K)
    entropy = -(1 - eps) * np.log(1 - eps) - eps * np.log(eps / (K - 1))
    logits = np.log(soft[np.arange(3 * K) % K])
    assert metrics.inception_score(logits, split_size=K) == pytest.approx(K * np.exp(-entropy), rel=1e-12)
    assert metrics.inception_score(logits, split_size=3 * K) == pytest.approx(K * np.exp(-entropy), rel=1e-12)
    # Splits of 8, 8 and 3: confident predictions over 4 classes (IS 4), one class only (IS 1), and 3 different
    # classes (IS 3): the mean over splits, the short last split counting as a whole one, is 8/3.
    onehot = 50.0 * np.eye(4)
    logits = np.concatenate([onehot[np.arange(8) % 4], onehot[np.zeros(8, int)], onehot[[1, 2, 3]]])
    assert metrics.inception_score(logits, split_size=8) == pytest.approx(8 / 3, rel=1e-9)


# ------------------------------------------------------------------------------------------------------- the pipeline
class StandInFeatures(torch.nn.Module):
    """A fixed random network with the Inception interface: uint8 (B,3,H,W) -> (features (B,D), logits (B,K))."""

    def __init__(self, D: int = 6, K: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(48, D, generator=g), requires_grad=False)
        self.head = torch.nn.Parameter(torch.randn(D, K, generator=g), requires_grad=False)

    def forward(self, img_B3HW):
        assert img_B3HW.dtype == torch.uint8 and img_B3HW.shape[1] == 3
        x_B48 = F.adaptive_avg_pool2d(img_B3HW.float() / 255, 4).flatten(1)
        feat_BD = x_B48 @ self.proj
        return feat_BD, feat_BD @ self.head


def _images(n, seed, size=16, offset=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (n, size, size, 3)) + offset, 0, 255).astype(np.uint8)


def test_pipeline_npz_and_folder(tmp_path):
    ref, fake = _images(30, 0), _images(25, 1, offset=40)
    np.savez(tmp_path / 'ref.npz', arr_0=ref)
    np.savez(tmp_path / 'fake.npz', arr_0=fake)
    (tmp_path / 'fake').mkdir()
    for i, img in enumerate(fake):
        save_png(img, str(tmp_path / 'fake' / f'{i:03d}.png'))
    net = StandInFeatures()
    same = metrics.evaluate(str(tmp_path / 'ref.npz'), str(tmp_path / 'ref.npz'), net, batch_size=8)
    assert same['fid'] == pytest.approx(0, abs=1e-6)
    assert same['precision'] == same['recall'] == 1.0
    m_npz = metrics.evaluate(str(tmp_path / 'fake.npz'), str(tmp_path / 'ref.npz'), net, batch_size=8)
    m_dir = metrics.evaluate(str(tmp_path / 'fake'), str(tmp_path / 'ref.npz'), net, batch_size=7)
    assert m_npz['fid'] > 0.1 and 1.0 <= m_npz['inception_score'] <= 5.0
    assert m_npz['num_samples'] == 25 and m_npz['num_ref'] == 30
    assert m_npz['fid_reference_statistics'] == 'recomputed'  # np.savez(arr_0=...) stores no mu/sigma
    for key in ('precision', 'recall', 'num_samples', 'num_ref'):  # counts of the same neighbours: exact
        assert m_dir[key] == m_npz[key], key
    for key in ('fid', 'inception_score'):  # float32 features of batches of 7 vs 8 (pooling, projection, head), then
        # squared (FID) or exponentiated (IS): equal up to their rounding, amplified twice
        assert_equal_up_to_rounding(m_dir[key], m_npz[key], reduction=48, depth=4, gain=2, dtype=torch.float32,
                                    msg=key)


def test_pipeline_precision_is_of_the_samples_recall_of_the_reference(tmp_path):
    # A feature network that reads each image's top-left pixel: reals spread over the colour cube, samples in a small
    # part of it, so precision (samples inside the real manifold) is 1 and recall low, never the other way round.
    def pixel_features(img_B3HW):
        return img_B3HW[:, :, 0, 0].float(), torch.zeros(len(img_B3HW), 4)
    rng = np.random.default_rng(10)
    real = rng.integers(0, 256, (40, 3))
    fake = rng.integers(100, 140, (20, 3))
    for name, feats in (('ref.npz', real), ('fake.npz', fake)):
        imgs = _images(len(feats), 0, size=8)
        imgs[:, 0, 0] = feats
        np.savez(tmp_path / name, arr_0=imgs)
    precision, recall = _knn_precision_recall(real.astype(float), fake.astype(float))
    assert precision == 1.0 and recall < 0.5
    result = metrics.evaluate(str(tmp_path / 'fake.npz'), str(tmp_path / 'ref.npz'), pixel_features, batch_size=16)
    assert (result['precision'], result['recall']) == (pytest.approx(precision), pytest.approx(recall))


def test_fid_uses_the_stored_reference_statistics(tmp_path):
    """OpenAI's evaluator scores FID against the mu/sigma stored in the reference file, not against its 10k images."""
    ref, fake = _images(30, 0), _images(25, 1, offset=40)
    net = StandInFeatures()
    np.savez(tmp_path / 'fake.npz', arr_0=fake)
    rng = np.random.default_rng(0)
    mu, a = rng.normal(size=6), rng.normal(size=(6, 6))
    np.savez(tmp_path / 'ref.npz', arr_0=ref, mu=mu, sigma=a @ a.T, mu_s=mu[:2], sigma_s=np.eye(2))
    fake_feats, _ = metrics.extract_features(str(tmp_path / 'fake.npz'), net)
    ref_feats, _ = metrics.extract_features(str(tmp_path / 'ref.npz'), net)
    stored = metrics.evaluate(str(tmp_path / 'fake.npz'), str(tmp_path / 'ref.npz'), net)
    assert stored['fid_reference_statistics'] == 'stored'
    assert stored['fid'] == pytest.approx(metrics.frechet_distance(*metrics.feature_statistics(fake_feats), mu,
                                                                    a @ a.T), rel=1e-9)
    assert stored['precision'] == pytest.approx(metrics.precision_recall(ref_feats, fake_feats)[0])  # images
    again = metrics.evaluate(str(tmp_path / 'fake.npz'), str(tmp_path / 'ref.npz'), net, recompute_ref_stats=True)
    assert again['fid_reference_statistics'] == 'recomputed'
    assert again['fid'] == pytest.approx(metrics.frechet_distance(*metrics.feature_statistics(fake_feats),
                                                                   *metrics.feature_statistics(ref_feats)), rel=1e-9)
    assert again['fid'] != pytest.approx(stored['fid'])
    np.savez(tmp_path / 'ref2048.npz', arr_0=ref, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match='--recompute_ref_stats'):
        metrics.evaluate(str(tmp_path / 'fake.npz'), str(tmp_path / 'ref2048.npz'), net)


def test_feature_covariance_is_normalised_by_n_minus_1():
    feats = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    mu, sigma = metrics.feature_statistics(feats)
    centred = feats - feats.mean(0)
    assert np.allclose(mu, [2.0, 2.0]) and np.allclose(sigma, centred.T @ centred / 2)


def test_a_point_on_a_knn_radius_is_inside():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # 3rd-neighbour radii: 3, 2, 2, 3
    on_radius, outside = np.array([[-3.0], [-3.0], [6.0], [6.0]]), np.array([[-3.5], [-3.5], [6.5], [6.5]])
    assert metrics.precision_recall(real, on_radius)[0] == 1.0  # distance 3 to the point 0 (or 3): on its ball
    assert metrics.precision_recall(real, outside)[0] == 0.0


def test_inception_score_default_splits_of_5000():
    logits = np.random.default_rng(0).normal(size=(10001, 7)) * 3
    parts = (logits[:5000], logits[5000:10000], logits[10000:])
    expected = np.mean([metrics.inception_score(p, split_size=len(p)) for p in parts])
    assert metrics.inception_score(logits) == pytest.approx(expected, rel=1e-12)


def test_main_with_stand_in(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / 'ref.npz', arr_0=_images(12, 0))
    np.savez(tmp_path / 'fake.npz', arr_0=_images(12, 1))
    monkeypatch.setattr(metrics, 'InceptionFeatures', lambda weights_path: StandInFeatures())
    argv = ['--samples', str(tmp_path / 'fake.npz'), '--ref', str(tmp_path / 'ref.npz'), '--device', 'cpu', '--out',
            str(tmp_path / 'm.json')]
    assert evaluate.main(argv) == 0
    assert 'fid' in capsys.readouterr().out
    assert os.path.isfile(tmp_path / 'm.json') and json.loads((tmp_path / 'm.json').read_text())['num_samples'] == 12


# -------------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize('bad, match', [
    (dict(arr_0=np.zeros((4, 8, 8, 3), np.float32)), 'dtype float32'),
    (dict(arr_0=np.zeros((4, 8, 8), np.uint8)), r'shape \(4, 8, 8\)'),
    (dict(arr_0=np.zeros((4, 8, 8, 4), np.uint8)), r'shape \(4, 8, 8, 4\)'),
    (dict(images=np.zeros((4, 8, 8, 3), np.uint8)), 'no "arr_0"'),
])
def test_bad_reference_npz(tmp_path, bad, match):
    np.savez(tmp_path / 'ref.npz', **bad)
    np.savez(tmp_path / 'fake.npz', arr_0=_images(4, 0, size=8))
    with pytest.raises(ImageSetError, match=match):
        metrics.evaluate(str(tmp_path / 'fake.npz'), str(tmp_path / 'ref.npz'), StandInFeatures())
    with pytest.raises(SystemExit, match=match):
        _main(_main_args(tmp_path / 'fake.npz', tmp_path / 'ref.npz'))


def test_bad_inputs_other(tmp_path):
    (tmp_path / 'junk.npz').write_bytes(b'not a zip')
    np.savez(tmp_path / 'ref.npz', arr_0=_images(4, 0, size=8))
    np.savez(tmp_path / 'big.npz', arr_0=_images(4, 0, size=16))
    (tmp_path / 'empty').mkdir()
    cases = [('junk.npz', 'cannot read'), ('missing.npz', 'does not exist'), ('empty', 'no .png'),
             ('big.npz', '16x16 images but')]
    for name, match in cases:
        with pytest.raises(ImageSetError, match=match):
            metrics.check_image_sets(str(tmp_path / name), str(tmp_path / 'ref.npz'))
    (tmp_path / 'mixed').mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / 'mixed' / 'a.png')
    Image.new('RGB', (9, 9)).save(tmp_path / 'mixed' / 'b.png')
    with pytest.raises(ImageSetError, match='has size'):
        metrics.extract_features(str(tmp_path / 'mixed'), StandInFeatures())


def _main_args(samples, ref):
    return ['--samples', str(samples), '--ref', str(ref), '--device', 'cpu']


def _main(argv):
    """evaluate.main in this process; a user mistake (exit code 2) is raised as SystemExit with its stderr message."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = evaluate.main(argv)
    if code != 0:
        assert code == 2 and 'Traceback' not in err.getvalue(), (code, err.getvalue())
        raise SystemExit(err.getvalue().strip())


def _no_network(weights_path):
    raise AssertionError('the feature network must not be built for inputs that cannot be evaluated')


@pytest.mark.parametrize('n_fake, n_ref, short', [(12, 3, 'ref.npz'), (3, 12, 'fake.npz'), (1, 12, 'fake.npz')])
def test_too_few_images_fail_before_any_feature_extraction(tmp_path, monkeypatch, n_fake, n_ref, short):
    np.savez(tmp_path / 'fake.npz', arr_0=_images(n_fake, 1))
    np.savez(tmp_path / 'ref.npz', arr_0=_images(n_ref, 0))
    monkeypatch.setattr(metrics, 'InceptionFeatures', _no_network)
    n = min(n_fake, n_ref)
    match = rf'^error: \S*{short} holds {n} image\(s\); precision/recall with k=3 needs at least 4 on each side'
    with pytest.raises(SystemExit, match=match):
        _main(_main_args(tmp_path / 'fake.npz', tmp_path / 'ref.npz'))

    def net(img_B3HW):
        raise AssertionError('no feature extraction for inputs that cannot be evaluated')
    with pytest.raises(ImageSetError, match=f'{short} holds {n} image'):
        metrics.evaluate(str(tmp_path / 'fake.npz'), str(tmp_path / 'ref.npz'), net)


def test_a_zip_that_is_no_npz_is_named_plainly(tmp_path, monkeypatch):
    torch.save({'weight': torch.zeros(3), 'bias': torch.zeros(3)}, tmp_path / 'ref.pt')  # a zip, not an .npz
    np.savez(tmp_path / 'fake.npz', arr_0=_images(12, 1))
    monkeypatch.setattr(metrics, 'InceptionFeatures', _no_network)
    with pytest.raises(SystemExit) as exc:
        _main(_main_args(tmp_path / 'fake.npz', tmp_path / 'ref.pt'))
    message = str(exc.value)
    assert message.startswith(f'error: {tmp_path / "ref.pt"} is not a .npz of images or of reference statistics')
    assert 'Expected an .npz whose "arr_0" holds uint8 images (N, H, W, 3)' in message
    assert 'archive/' not in message and 'data.pkl' not in message and '\n' not in message  # no zip internals


def test_help_shows_the_defaults():
    from train_support import assert_help_shows_defaults
    assert_help_shows_defaults(evaluate.get_parser(), {'--batch_size': 100})


def test_inception_offline_gives_clear_error(tmp_path, monkeypatch):
    tf_inception = pytest.importorskip('torch_fidelity.feature_extractor_inceptionv3')

    def no_network(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(tf_inception, 'load_state_dict_from_url', no_network)
    with pytest.raises(RuntimeError, match='--inception_weights PATH'):
        metrics.InceptionFeatures()
    with pytest.raises(FileNotFoundError, match='does not exist'):
        metrics.InceptionFeatures(str(tmp_path / 'missing.pth'))
    (tmp_path / 'bad.pth').write_bytes(b'garbage')
    with pytest.raises(RuntimeError, match='cannot load the Inception weights'):
        metrics.InceptionFeatures(str(tmp_path / 'bad.pth'))


def test_inception_adapter_with_random_weights(tmp_path, monkeypatch):
    # The real torch-fidelity network (random weights, nothing downloaded): the adapter's feature names and shapes.
    tf_inception = pytest.importorskip('torch_fidelity.feature_extractor_inceptionv3')
    monkeypatch.setattr(tf_inception, 'load_state_dict_from_url', lambda *args, **kwargs: {})
    monkeypatch.setattr(tf_inception.FeatureExtractorInceptionV3, 'load_state_dict', lambda self, sd: None)
    net = metrics.InceptionFeatures()
    pool_BD, logits_BK = net(torch.from_numpy(_images(2, 0, size=32)).permute(0, 3, 1, 2))
    assert pool_BD.shape == (2, 2048) and logits_BK.shape == (2, 1008)
    assert pool_BD.dtype == logits_BK.dtype == torch.float32
