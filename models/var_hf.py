"""The official Hugging Face class `VARHF`, made when `models.var.VARHF` is first read (its base class comes from
huggingface_hub, which importing `models` does not load)."""
from typing import Sequence

from .var import VAR
from .vqvae import VQVAE


def make_varhf() -> type:
    """-> the VARHF class (built once: `models.var` keeps it)."""
    from huggingface_hub import PyTorchModelHubMixin

    class VARHF(VAR, PyTorchModelHubMixin):
        """The official Hugging Face class: a VAR that builds its own VQVAE from `vae_kwargs`, with the Hub mixin's
        `save_pretrained` / `from_pretrained` / `push_to_hub` (config.json: `vae_kwargs` and the VAR arguments).

        Kept as officially, flaw included: the VQVAE is held outside VAR's modules, so `save_pretrained` saves no
        tokenizer weights and `from_pretrained` returns an untrained tokenizer. `models.model_folder.save_pretrained`
        / `models.model_folder.from_pretrained` save and load both models; their folders are also readable by this
        class.
        """

        def __init__(self, vae_kwargs, num_classes: int = 1000, depth: int = 16, embed_dim: int = 1024,
                     num_heads: int = 16, mlp_ratio: float = 4.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                     drop_path_rate: float = 0.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                     cond_drop_rate: float = 0.1, attn_l2_norm: bool = False,
                     patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                     flash_if_available: bool = True, fused_if_available: bool = True):
            vae_local = VQVAE(**vae_kwargs)
            super().__init__(vae_local=vae_local, num_classes=num_classes, depth=depth, embed_dim=embed_dim,
                             num_heads=num_heads, mlp_ratio=mlp_ratio, drop_rate=drop_rate,
                             attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, norm_eps=norm_eps,
                             shared_aln=shared_aln,
                             cond_drop_rate=cond_drop_rate, attn_l2_norm=attn_l2_norm, patch_nums=patch_nums,
                             flash_if_available=flash_if_available, fused_if_available=fused_if_available)

    VARHF.__module__, VARHF.__qualname__ = 'models.var', 'VARHF'  # found by pickle and the mixin as models.var.VARHF
    return VARHF
