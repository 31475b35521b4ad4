"""Classifier rejection sampling (sampling/rejection.py), against its definitions: the classifier's transform (short
side to 256, centre crop 224, antialiased, ImageNet normalisation) and the best-of rule. CPU only, under a second."""
import numpy as np
import torch
import torch.nn as nn

from sampling.rejection import IMAGENET_MEAN, IMAGENET_STD, ImageNetClassifier, sample_best_of
from support import assert_equal_up_to_rounding


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
    # the same pixels; (x/255 - mean)/std in the classifier's order vs here: a few roundings apart
    assert_equal_up_to_rounding(net.seen, (crop - mean) / std, reduction=1, depth=3)
    ImageNetClassifier(net)(np.ascontiguousarray(img.transpose(0, 2, 1, 3)))  # portrait: the crop moves down
    assert_equal_up_to_rounding(net.seen, ((crop - mean) / std).transpose(2, 3), reduction=1, depth=3)


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


def test_sample_best_of_keeps_the_most_likely_candidate():
    imgs = [np.full((3, 2, 2, 3), cand, np.uint8) for cand in range(3)]
    # Candidate c gives row r the probability table[c][r] of its label.
    table = torch.tensor([[0.2, 0.5, 0.1], [0.6, 0.5, 0.0], [0.4, 0.1, 0.3]])

    def classifier(img_BHW3):
        prob_BK = torch.zeros(3, 4)
        prob_BK[torch.arange(3), torch.tensor([0, 3, 2])] = table[int(img_BHW3[0, 0, 0, 0])]
        return prob_BK
    best = sample_best_of(lambda cand: imgs[cand], classifier, [0, 3, 2], candidates=3)
    assert best[:, 0, 0, 0].tolist() == [1, 0, 2]  # row 1 ties 0.5/0.5: the earlier candidate stays
