"""Building blocks against their definitions (the official code), each written out independently here:
the VQVAE's ResnetBlock / AttnBlock / Upsample2x / Downsample2x, VAR's SelfAttention (L2-norm scale and its clamp,
the plain 0.25/sqrt(c) scale, the k-bias layout, the KV cache), AdaLNSelfAttn and FFN. CPU only, a few seconds in
all.

Each block is checked against its definition written out with other ops (two computations equal in exact arithmetic):
equal up to float32 rounding (support.assert_equal_up_to_rounding)."""
import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.basic_vae import AttnBlock, Downsample2x, ResnetBlock, Upsample2x
from models.basic_var import FFN, AdaLNSelfAttn, SelfAttention
from support import assert_equal_up_to_rounding, rounding_chain


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter (zero-initialised biases included) set to random values, so that no term can hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module


# ------------------------------------------------------------------------------------------------------- VQVAE (§2.1)
def _gn(x, c):
    return F.group_norm(x, 32, eps=1e-6) if c is None else F.group_norm(x, 32, c.weight, c.bias, eps=1e-6)


def test_resnet_block_is_two_norm_silu_convs_plus_the_shortcut():
    torch.manual_seed(0)
    for cin, cout in ((32, 32), (32, 64)):
        blk = _randomise(ResnetBlock(in_channels=cin, out_channels=cout)).eval()
        x = torch.randn(2, cin, 5, 6)
        h = F.conv2d(F.silu(_gn(x, blk.norm1)), blk.conv1.weight, blk.conv1.bias, padding=1)
        h = F.conv2d(F.silu(_gn(h, blk.norm2)), blk.conv2.weight, blk.conv2.bias, padding=1)
        short = x if cin == cout else F.conv2d(x, blk.nin_shortcut.weight, blk.nin_shortcut.bias)
        assert_equal_up_to_rounding(blk(x), short + h, **rounding_chain(blk))
        assert ('nin_shortcut.weight' in blk.state_dict()) == (cin != cout)  # identity shortcut: no keys


def test_attn_block_is_single_head_attention_with_scale_c_to_the_minus_half():
    torch.manual_seed(0)
    c = 32
    blk = _randomise(AttnBlock(c)).eval()
    x = torch.randn(2, c, 3, 4)
    qkv = F.conv2d(_gn(x, blk.norm), blk.qkv.weight, blk.qkv.bias).flatten(2)  # B,3c,hw
    q, k, v = qkv[:, :c], qkv[:, c:2 * c], qkv[:, 2 * c:]  # channels [0,c) q, [c,2c) k, [2c,3c) v
    A = torch.softmax(torch.einsum('bci,bcj->bij', q, k) / math.sqrt(c), dim=-1)  # A[i,j], softmax over j
    out = torch.einsum('bcj,bij->bci', v, A).reshape(2, c, 3, 4)
    assert_equal_up_to_rounding(blk(x), x + F.conv2d(out, blk.proj_out.weight, blk.proj_out.bias),
                                **rounding_chain(blk, longest_sum=3 * 4))


def test_downsample_pads_right_and_bottom_only():
    torch.manual_seed(0)
    down = _randomise(Downsample2x(4))
    x = torch.randn(1, 4, 6, 6)
    padded = torch.zeros(1, 4, 7, 7)
    padded[:, :, :6, :6] = x  # one zero row at the bottom, one zero column on the right
    assert_equal_up_to_rounding(down(x), F.conv2d(padded, down.conv.weight, down.conv.bias, stride=2),
                                **rounding_chain(down))
    assert down(x).shape == (1, 4, 3, 3)


def test_upsample_is_nearest_then_a_padded_conv():
    torch.manual_seed(0)
    up = _randomise(Upsample2x(4))
    x = torch.randn(1, 4, 3, 5)
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # each pixel becomes a 2x2 block
    assert_equal_up_to_rounding(up(x), F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1),
                                **rounding_chain(up))


# ------------------------------------------------------------------------------------------------ VAR blocks (§3.2-3.3)
# the attention logits of L2-normalised q and k reach exp(ln 100) = 100 (the clamp): a relative rounding error of q or
# k moves them, and the softmax's output, by up to 100 times as much
ATTN_GAIN = 100.0


def _attention_by_definition(attn: SelfAttention, x, bias=None, x_kv=None):
    """§3.3 written out: qkv with concat(q_bias, 0, v_bias), per-head q/k normalised with q times
    exp(min(s, ln 100)) and softmax scale 1 (or plain q/k with scale 0.25/sqrt(c)); keys/values from x_kv if given."""
    C, H = x.shape[-1], attn.num_heads
    c = C // H
    W, bq, bv = attn.mat_qkv.weight, attn.q_bias, attn.v_bias

    def heads(t):  # B,L,C -> B,H,L,c
        return t.view(t.shape[0], t.shape[1], H, c).transpose(1, 2)
    x_kv = x if x_kv is None else x_kv
    q = heads(x @ W[:C].T + bq)
    k = heads(x_kv @ W[C:2 * C].T)  # the k bias is the zero buffer
    v = heads(x_kv @ W[2 * C:].T + bv)
    if attn.attn_l2_norm:
        m = torch.exp(torch.minimum(attn.scale_mul_1H11, torch.tensor(math.log(100.0))))  # (1,H,1,1)
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12) * m
        k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scale = 1.0
    else:
        scale = 0.25 / math.sqrt(c)
    logits = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        logits = logits + bias
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], C)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize('l2_norm', [True, False])
def test_self_attention_matches_its_definition(l2_norm):
    torch.manual_seed(0)
    attn = _randomise(SelfAttention(0, embed_dim=32, num_heads=2, attn_l2_norm=l2_norm, flash_if_available=False))
    if l2_norm:
        with torch.no_grad():  # head 0 above the clamp (ln 100 ~ 4.61), head 1 below it
            attn.scale_mul_1H11.copy_(torch.tensor([6.0, 1.2]).view(1, 2, 1, 1))
    attn.eval()
    x = torch.randn(2, 7, 32)
    causal = torch.full((7, 7), -torch.inf).triu(1).view(1, 1, 7, 7)
    chain = rounding_chain(attn, longest_sum=7)
    with torch.no_grad():
        assert_equal_up_to_rounding(attn(x, attn_bias=None), _attention_by_definition(attn, x), **chain, gain=ATTN_GAIN)
        assert_equal_up_to_rounding(attn(x, attn_bias=causal), _attention_by_definition(attn, x, causal), **chain,
                                    gain=ATTN_GAIN)


def test_self_attention_fresh_init_values():
    attn = SelfAttention(0, embed_dim=32, num_heads=4, attn_l2_norm=True)
    # log of float32(4) vs the float64 log rounded to float32
    assert_equal_up_to_rounding(attn.scale_mul_1H11, torch.full((1, 4, 1, 1), math.log(4.0)), reduction=1)
    assert_equal_up_to_rounding(attn.max_scale_mul, math.log(100.0), reduction=1, dtype=torch.float32)  # float32 log
    assert attn.mat_qkv.bias is None and not attn.zero_k_bias.any()
    assert SelfAttention(0, embed_dim=32, num_heads=4, attn_l2_norm=False).scale == 0.25 / math.sqrt(8)  # same ops


def test_attention_dropout_is_off_in_eval():
    torch.manual_seed(0)
    attn = _randomise(SelfAttention(0, embed_dim=32, num_heads=2, attn_drop=0.5, attn_l2_norm=True)).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert_equal_up_to_rounding(attn(x, attn_bias=None), _attention_by_definition(attn, x), gain=ATTN_GAIN,
                                    **rounding_chain(attn, longest_sum=5))


@pytest.mark.parametrize('max_len', [0, 9])
def test_kv_cache_attends_to_every_earlier_token(max_len):
    """With the cache on, each call's queries see all keys/values cached so far plus their own (no mask)."""
    torch.manual_seed(0)
    attn = _randomise(SelfAttention(0, embed_dim=32, num_heads=2, attn_l2_norm=True)).eval()
    with torch.no_grad():
        attn.scale_mul_1H11.copy_(torch.tensor([6.0, 0.5]).view(1, 2, 1, 1))
    x = torch.randn(2, 9, 32)
    chunks = (x[:, :1], x[:, 1:5], x[:, 5:9])  # scales of 1, 4 and 4 tokens
    attn.kv_caching(True, max_len=max_len)
    try:
        with torch.no_grad():
            seen = 0
            for chunk in chunks:
                seen += chunk.shape[1]
                assert_equal_up_to_rounding(attn(chunk, attn_bias=None),
                                            _attention_by_definition(attn, chunk, x_kv=x[:, :seen]), gain=ATTN_GAIN,
                                            **rounding_chain(attn, longest_sum=9))
    finally:
        attn.kv_caching(False)
    assert attn.cached_k is None and not attn.caching


def test_ffn_uses_tanh_gelu():
    torch.manual_seed(0)
    ffn = _randomise(FFN(8, 32, fused_if_available=False))
    x = torch.randn(3, 8) * 3
    h = x @ ffn.fc1.weight.T + ffn.fc1.bias
    gelu_tanh = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    assert_equal_up_to_rounding(ffn(x), gelu_tanh @ ffn.fc2.weight.T + ffn.fc2.bias, **rounding_chain(ffn))


@pytest.mark.parametrize('shared_aln', [False, True])
def test_adaln_block_matches_its_definition(shared_aln):
    """x += Attn(LN(x)(1+scale1)+shift1)*gamma1; x += FFN(LN(x)(1+scale2)+shift2)*gamma2, with the six chunks in
    the order gamma1, gamma2, scale1, scale2, shift1, shift2."""
    torch.manual_seed(0)
    C, D, B, L = 32, 12, 2, 5
    blk = _randomise(AdaLNSelfAttn(block_idx=0, last_drop_p=0, embed_dim=C, cond_dim=D, shared_aln=shared_aln,
                                   norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), num_heads=2,
                                   attn_l2_norm=True, fused_if_available=False)).eval()
    x = torch.randn(B, L, C)
    if shared_aln:
        cond = torch.randn(B, 1, 6, C)
        six = blk.ada_gss + cond
    else:
        cond = torch.randn(B, D)
        six = (F.silu(cond) @ blk.ada_lin[1].weight.T + blk.ada_lin[1].bias).view(B, 1, 6, C)
    g1, g2, s1, s2, t1, t2 = (six[:, :, i] for i in range(6))
    ln = functools.partial(F.layer_norm, normalized_shape=(C,), eps=1e-6)
    causal = torch.full((L, L), -torch.inf).triu(1).view(1, 1, L, L)
    with torch.no_grad():
        y = x + _attention_by_definition(blk.attn, ln(x) * (1 + s1) + t1, causal) * g1
        y = y + blk.ffn(ln(y) * (1 + s2) + t2) * g2
        assert_equal_up_to_rounding(blk(x, cond, attn_bias=causal), y, gain=ATTN_GAIN,
                                    **rounding_chain(blk, longest_sum=L))
