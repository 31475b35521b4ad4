"""The helpers around sampling, against their definitions: the rejection classifier's transform (short side to 256,
centre crop 224, antialiased, ImageNet normalisation) and its best-of rule, and the PNG / npz image-set readers and
writers of the FID export (VAR_SPEC.md section 10). CPU only, under a second."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from image_batches import ImageSetError, iter_png_images, list_png_files, read_png, write_npz_images
from rejection import IMAGENET_MEAN, IMAGENET_STD, ImageNetClassifier, sample_best_of


# ------------------------------------------------------------------------------------------------ rejection sampling
class _Recorder(nn.Module):
    """A stand-in network: records its input and gives class 0 a logit from the image mean."""

    def forward(self, x):
        self.seen = x.clone()
        return torch.stack([x.mean((1, 2, 3)), torch.zeros(x.shape[0])], 1)


def test_classifier_transform_resizes_the_short_side_centre_crops_and_normalises():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(1, 256, 400, 3), dtype=np.uint8)  # short side already 256: no resampling
    net = _Recorder()
    ImageNetClassifier(net)(img)
    x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255
    top, left = (256 - 224) // 2, (400 - 224) // 2  # 16, 88
    crop = x[:, :, top:top + 224, left:left + 224]
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(net.seen, (crop - mean) / std, atol=1e-5, rtol=1e-5)
    ImageNetClassifier(net)(np.ascontiguousarray(img.transpose(0, 2, 1, 3)))  # portrait: the crop moves down
    torch.testing.assert_close(net.seen, ((crop - mean) / std).transpose(2, 3), atol=1e-5, rtol=1e-5)


def test_classifier_downscale_is_antialiased():
    # one bright column in every 4: a 4x downscale with antialiasing averages it to ~1/4 everywhere, whereas plain
    # bilinear sampling (at 4i + 1.5) lands between two dark columns and sees 0
    img = np.zeros((1, 1024, 1024, 3), np.uint8)
    img[:, :, 0::4] = 255
    net = _Recorder()
    ImageNetClassifier(net)(img)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = net.seen * std + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert net.seen.shape == (1, 3, 224, 224)
    assert abs(x.mean().item() - 0.25) < 0.02 and x.std().item() < 0.05


def test_sample_best_of_compares_with_the_best_so_far():
    # row score per candidate: 0.5, 0.2, 0.3 -> candidate 0 stays best (0.3 beats 0.2 but not the best 0.5)
    imgs = [np.full((1, 2, 2, 3), cand, np.uint8) for cand in range(3)]
    scores = [0.5, 0.2, 0.3]

    def classifier(img_BHW3):
        p = scores[int(img_BHW3[0, 0, 0, 0])]
        return torch.tensor([[p, 1 - p]])
    assert sample_best_of(lambda cand: imgs[cand], classifier, [0], candidates=3)[0, 0, 0, 0] == 0


# ------------------------------------------------------------------------------------------------ image sets (§10)
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
