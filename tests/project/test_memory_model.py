"""benchmarks/analytic/memory_model.py against what it models: parameter counts of the released models, and the
activations autograd saves in a tiny VAR's training forward on the CPU (fp32; with and without activation
checkpointing)."""
import pytest
import torch

from benchmarks.analytic.memory_model import activation_bytes, count_saved_bytes, estimate, model_shape, state_bytes
from models import build_vae_var
from models.presets import PRESETS
from utils.fsdp import checkpoint_blocks

TINY_PN = (1, 2, 3, 4, 5)


def measured_activation_bytes(depth: int, C: int, B: int, act_ckpt: bool) -> int:
    """Bytes autograd saves in one fp32 training forward and loss of a tiny VAR (V = 64)."""
    torch.manual_seed(0)
    _, var = build_vae_var(device='cpu', patch_nums=TINY_PN, V=64, Cvae=8, ch=32, share_quant_resi=4, depth=depth,
                           num_classes=10, embed_dim=C)
    var.train()
    if act_ckpt:
        checkpoint_blocks(var.blocks)
    label_B = torch.zeros(B, dtype=torch.long)
    x_BLCv = torch.randn(B, var.L - var.first_l, 8)
    with count_saved_bytes(exclude=[*var.parameters(), *var.buffers()]) as saved:
        logits_BLV = var(label_B, x_BLCv)
        torch.nn.functional.cross_entropy(logits_BLV.view(-1, 64), torch.zeros(B * var.L, dtype=torch.long))
        return saved()


def test_activation_model_matches_the_counted_saved_tensors():
    """Without checkpointing. With it, the blocks' inputs are held by the checkpoints rather than saved through
    autograd's hooks, so they escape this count: the checkpointed case is a hand count (one input per block); here
    only its drop is checked."""
    depth, C, B = 4, 128, 2
    shape = model_shape(depth, TINY_PN, shared_aln=False, V=64, num_classes=10, embed_dim=C)
    model = activation_bytes(shape, B, act_ckpt=False, act_bytes=4, attn_scores=True)  # the CPU keeps L x L scores
    full = measured_activation_bytes(depth, C, B, act_ckpt=False)
    assert full == pytest.approx(model, rel=0.15)
    assert measured_activation_bytes(depth, C, B, act_ckpt=True) < full / 4


def test_act_ckpt_saves_most_activation_memory_of_a_deep_model():
    d30 = model_shape(30, PRESETS['d30']['patch_nums'], shared_aln=False)
    assert activation_bytes(d30, 16, act_ckpt=True) < 0.1 * activation_bytes(d30, 16, act_ckpt=False)


def test_parameter_counts_and_state_terms_of_the_released_models():
    d30 = model_shape(30, PRESETS['d30']['patch_nums'], shared_aln=False)
    d36 = model_shape(36, PRESETS['d36']['patch_nums'], shared_aln=True)
    assert 2.0e9 < d30['P'] < 2.1e9 and 2.3e9 < d36['P'] < 2.4e9  # the released d30 (2.0B) and d36 (2.3B)
    assert d30['L'] == 680 and d36['L'] == 2240
    assert state_bytes(d30, world=1, fsdp=False, half=False) == 20 * d30['P']  # weights, grads, buckets, AdamW
    assert state_bytes(d30, world=8, fsdp=True) < state_bytes(d30, world=8, fsdp=False) / 4
    ddp, fsdp = (estimate(30, PRESETS['d30']['patch_nums'], False, batch=16, world=8, fsdp=f, act_ckpt=True)
                 for f in (False, True))
    assert fsdp['total_GiB'] < ddp['total_GiB'] and ddp['activations_GiB'] == fsdp['activations_GiB']
