"""The image sets of the FID export and of evaluate.py (sampling/image_sets.py): PNG folders and `.npz` files in the
OpenAI evaluator's format, read and written in batches, and the fixed evaluation order. CPU only, under a second."""
import os

import numpy as np
import pytest
from PIL import Image

from sampling.image_sets import (ImageSetError, evaluation_order, iter_npz_images, iter_png_images, list_png_files,
                                 npz_image_shape, read_png, write_npz_images)


def _images(n, seed, size=16):
    return np.random.default_rng(seed).integers(0, 200, (n, size, size, 3)).astype(np.uint8)


def test_png_folder_lists_both_extension_cases(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    for name in ('a.png', 'B.PNG', 'c.jpg'):
        Image.fromarray(img).save(tmp_path / name, format='PNG')
    assert sorted(p.split('/')[-1] for p in list_png_files(str(tmp_path))) == ['B.PNG', 'a.png']


def test_read_png_gives_rgb_for_grey_and_rgba(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey, 'L').save(tmp_path / 'g.png')
    rgba = np.random.default_rng(0).integers(0, 256, size=(3, 4, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    Image.fromarray(rgba, 'RGBA').save(tmp_path / 'a.png')
    g = read_png(str(tmp_path / 'g.png'))
    assert g.shape == (3, 4, 3) and g.dtype == np.uint8 and all(np.array_equal(g[..., i], grey) for i in range(3))
    assert np.array_equal(read_png(str(tmp_path / 'a.png')), rgba[..., :3])


def test_png_batches_refuse_mixed_sizes(tmp_path):
    Image.new('RGB', (4, 4)).save(tmp_path / 'a.png')
    Image.new('RGB', (5, 4)).save(tmp_path / 'b.png')
    with pytest.raises(ImageSetError, match='b.png has size'):
        list(iter_png_images([str(tmp_path / 'a.png'), str(tmp_path / 'b.png')], batch_size=1))


def test_npz_writer_refuses_a_short_set(tmp_path):
    imgs = np.zeros((3, 4, 4, 3), np.uint8)
    with pytest.raises(ImageSetError, match='got 3 images, expected 4'):
        write_npz_images(str(tmp_path / 'x.npz'), [imgs], (4, 4, 4, 3))
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left behind


def test_evaluation_order_mixes_the_classes_of_every_is_split():
    """sample.py's names sort by class; the evaluation order must give every 5,000-image split most classes."""
    names = [f'/s/{c:04d}_{i:05d}.png' for c in range(1000) for i in range(50)]
    order = evaluation_order(reversed(names))
    assert order == evaluation_order(names) and sorted(order) == names  # a fixed order of the same files
    for s in range(0, 50000, 5000):
        classes = {n.split('/')[-1][:4] for n in order[s:s + 5000]}
        assert len(classes) > 950, len(classes)  # sorted by name, each split would hold 100




def test_npz_writer_round_trip_and_deterministic_bytes(tmp_path):
    imgs = _images(11, 5, size=8)
    for name in ('a.npz', 'b.npz'):
        write_npz_images(str(tmp_path / name), (imgs[i:i + 4] for i in range(0, 11, 4)), imgs.shape)
    assert (tmp_path / 'a.npz').read_bytes() == (tmp_path / 'b.npz').read_bytes()
    assert np.array_equal(np.load(tmp_path / 'a.npz')['arr_0'], imgs)
    assert npz_image_shape(str(tmp_path / 'a.npz')) == imgs.shape
    assert np.array_equal(np.concatenate(list(iter_npz_images(str(tmp_path / 'a.npz'), 3))), imgs)
    with pytest.raises(ImageSetError, match='expected 12'):
        write_npz_images(str(tmp_path / 'c.npz'), [imgs], (12, 8, 8, 3))
    assert sorted(os.listdir(tmp_path)) == ['a.npz', 'b.npz']  # the failed write left nothing behind
