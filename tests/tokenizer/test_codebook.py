"""Codebook upkeep (tokenizer/codebook.py): the dead-code mask and the replacement code vectors."""
import torch

from tokenizer.codebook import dead_code_mask, replacement_codes


def test_dead_codes_are_those_rarely_hit_over_all_scales():
    hits_SV = torch.tensor([[0.0, 2.0, 0.5, 0.0], [0.0, 0.0, 0.6, 3.0]])
    assert dead_code_mask(hits_SV, threshold=1.0).tolist() == [True, False, False, False]  # 0.5 + 0.6 >= 1


def test_replacement_codes_are_jittered_latents_drawn_with_the_given_generator():
    f_NC = torch.randn(5, 8)
    new = replacement_codes(f_NC, 7, torch.Generator().manual_seed(0), noise=0.01)
    assert new.shape == (7, 8)  # more codes than latents: drawn with replacement
    # the same computation with the same generator seed: exact
    assert torch.equal(new, replacement_codes(f_NC, 7, torch.Generator().manual_seed(0), noise=0.01))
    nearest = torch.cdist(new, f_NC).min(1).values
    assert (nearest > 0).all() and (nearest < 0.1 * f_NC.std() * 8 ** 0.5).all()  # near one latent, not on it
