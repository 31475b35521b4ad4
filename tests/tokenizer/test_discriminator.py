"""The patch discriminator (tokenizer/discriminator.py): its size limits and its per-image logits."""
import pytest
import torch

from support import assert_equal_up_to_rounding, rounding_chain
from tokenizer.discriminator import PatchDiscriminator


def test_discriminator_minimum_image_size():
    for n_layers, side in ((2, 12), (3, 24)):
        disc = PatchDiscriminator(3, ch=8, n_layers=n_layers)
        assert disc.min_image_size == side
        assert disc(torch.zeros(1, 3, side, side)).shape[-1] == 1
        with pytest.raises((RuntimeError, ValueError)):  # a kernel larger than its input, or a 1-value GroupNorm
            disc(torch.zeros(1, 3, side - 1, side - 1))


def test_discriminator_logits_of_an_image_do_not_depend_on_the_rest_of_the_batch():
    """GroupNorm, not BatchNorm: each image's logits are the same alone or in a batch (so under DDP at any split)."""
    torch.manual_seed(0)
    disc = PatchDiscriminator(3, ch=16, n_layers=2).train()
    x = torch.randn(4, 3, 32, 32)
    # a batch of 1 vs of 4: two computations, equal up to the convolutions' rounding
    assert_equal_up_to_rounding(disc(x[1:2]), disc(x)[1:2], **rounding_chain(disc))
