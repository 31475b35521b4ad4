"""The demo's data preparation (real Fashion-MNIST -> RGB 32x32 ImageFolder) and its quality yardstick."""
import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from demo import classifier as clf
from demo import fashion_mnist as fm
from support import assert_equal_up_to_rounding


def write_idx(path: Path, arr: np.ndarray) -> None:
    """An IDX file of unsigned bytes: magic 0x0000 08 <ndim>, the big-endian dimensions, the data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in arr.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_reader_padding_and_folder_layout(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / 'raw'
    raw.mkdir()
    for split, n in (('train', 40), ('val', 20)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        write_idx(raw / fm.FILES[split][0], images)
        write_idx(raw / fm.FILES[split][1], labels)
    x, y = fm.load_split(str(raw), 'train')
    assert x.shape == (40, 28, 28) and y.tolist() == (np.arange(40) % 10).tolist()
    rgb = fm.to_rgb32(x)
    assert rgb.shape == (40, 32, 32, 3) and (rgb[:, :2] == 0).all() and (rgb[:, :, -2:] == 0).all()
    assert np.array_equal(rgb[:, 2:30, 2:30, 1], x)
    counts = fm.write_image_folder(str(tmp_path / 'folder'), str(raw), {'train': 3, 'val': None}, log=lambda m: None)
    assert counts == {'train': 30, 'val': 20}
    assert sorted(os.listdir(tmp_path / 'folder' / 'train')) == [fm.class_folder(c) for c in range(10)]
    with pytest.raises(ValueError, match='truncated'):
        (raw / 'bad.gz').write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + (5).to_bytes(4, 'big') + b'ab'))
        fm.read_idx(str(raw / 'bad.gz'))


@pytest.mark.skipif(not fm.has_raw_files(fm.DEBIAN_DIR),
                    reason=f'{fm.DEBIAN_DIR} is absent (apt-get install {fm.DEBIAN_PACKAGE})')
def test_debian_files_become_an_image_folder_that_train_py_reads(tmp_path):
    from utils.data import build_dataset
    out = tmp_path / 'fmnist'
    settings = {'train': 4, 'val': 2}
    counts = fm.write_image_folder(str(out), fm.DEBIAN_DIR, settings, limit=300, log=lambda m: None)
    assert counts == {'train': 40, 'val': 20}
    stamp = os.path.getmtime(out / fm.MANIFEST)
    assert fm.write_image_folder(str(out), fm.DEBIAN_DIR, settings, limit=300) == counts  # reused, not rewritten
    assert os.path.getmtime(out / fm.MANIFEST) == stamp

    num_classes, train_set, val_set = build_dataset(str(out), final_reso=32, mid_reso=1.0)
    assert num_classes == 10 and len(train_set) == 40 and len(val_set) == 20
    assert train_set.classes[0] == '0_tshirt_top' and train_set.classes[9] == '9_ankle_boot'
    x, y = fm.load_split(fm.DEBIAN_DIR, 'val')
    img, label = val_set[0]  # the first val file is the first test image of class 0, unchanged
    first = int(np.flatnonzero(y == 0)[0])
    assert label == 0 and img.shape == (3, 32, 32)
    expected = torch.from_numpy(fm.to_rgb32(x[first:first + 1])[0]).permute(2, 0, 1).float() / 127.5 - 1
    assert_equal_up_to_rounding(img, expected, reduction=1, depth=3)  # the same pixels, x/255*2-1 vs x/127.5-1


def test_classifier_metrics_on_a_tiny_problem():
    rng = np.random.default_rng(0)
    # two easy "classes": a bright top half or a bright bottom half
    labels = rng.integers(0, 2, 512)
    images = rng.integers(0, 40, (512, 32, 32))
    images[labels == 0, :16] += 150
    images[labels == 1, 16:] += 150
    images = images.astype(np.uint8)
    model = clf.train_classifier(images, labels, epochs=2, bs=64, seed=0, log=lambda m: None)
    feats, _ = clf.features_logits(model, images)
    ref = dict(zip(('mu', 'sigma'), clf.feature_statistics(feats)))
    same = clf.quality(model, np.repeat(images[..., None], 3, -1), labels, ref)  # RGB input is averaged to grey
    assert same['accuracy'] > 95 and abs(same['frechet']) < 1e-4
    flipped = clf.quality(model, images, 1 - labels, ref)
    assert flipped['accuracy'] < 5
    noise = clf.quality(model, rng.integers(0, 255, (512, 32, 32)).astype(np.uint8), labels, ref)
    assert noise['frechet'] > 1.0
