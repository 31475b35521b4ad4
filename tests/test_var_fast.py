"""Fast paths agree with the plain (official-equivalent) paths they replace."""
import pytest
import torch

from conftest import requires_cuda
from models.basic_var import SelfAttention, optional_kernels
from models.helpers import filter_top_k_top_p_, filter_top_k_top_p_partial_


def test_prealloc_kv_cache_equals_concat(tiny_models):
    _, var = tiny_models
    kw = dict(B=3, label_B=torch.tensor([0, 4, 9]), g_seed=5, cfg=3.0, top_k=1)
    ref = var.autoregressive_infer_cfg(**kw, kv_cache='concat')
    fast = var.autoregressive_infer_cfg(**kw, kv_cache='prealloc')
    assert torch.equal(ref, fast)
    kw = dict(B=2, label_B=torch.tensor([1, 2]), g_seed=0, cfg=1.5, top_k=20, top_p=0.9, more_smooth=True)
    torch.testing.assert_close(var.autoregressive_infer_cfg(**kw), var.autoregressive_infer_cfg(**kw, kv_cache='prealloc'))


@pytest.mark.parametrize('top_k,top_p', [(5, 0.0), (50, 0.9), (200, 0.96), (900, 0.5)])
def test_partial_sort_filter_equals_full_sort(top_k, top_p):
    g = torch.Generator().manual_seed(top_k)
    logits = torch.randn(4, 7, 4096, generator=g) * 3
    ref = filter_top_k_top_p_(logits.clone(), top_k, top_p)
    fast = filter_top_k_top_p_partial_(logits.clone(), top_k, top_p)
    assert torch.equal(torch.isinf(ref), torch.isinf(fast))
    assert torch.equal(ref[torch.isfinite(ref)], fast[torch.isfinite(fast)])


def test_partial_sort_sampling_matches(tiny_models):
    _, var = tiny_models
    kw = dict(B=2, label_B=torch.tensor([3, 7]), g_seed=11, cfg=2.0, top_k=8, top_p=0.9)
    assert torch.equal(var.autoregressive_infer_cfg(**kw), var.autoregressive_infer_cfg(**kw, partial_sort=True))


def _plain_attention(attn: SelfAttention, x, bias):
    """Reference: the attention written out with an explicit softmax."""
    B, L, C = x.shape
    qkv = x @ attn.mat_qkv.weight.T + torch.cat((attn.q_bias, attn.zero_k_bias, attn.v_bias))
    q, k, v = qkv.view(B, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    if attn.attn_l2_norm:
        q = torch.nn.functional.normalize(q, dim=-1) * attn.scale_mul_1H11.clamp_max(attn.max_scale_mul).exp()
        k = torch.nn.functional.normalize(k, dim=-1)
    w = (q @ k.transpose(-1, -2)) * attn.scale + (0 if bias is None else bias)
    out = (w.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
    return attn.proj(out)


@pytest.mark.parametrize('l2', [True, False])
def test_sdpa_equals_plain_attention(tiny_models, l2):
    _, var = tiny_models
    torch.manual_seed(0)
    attn = SelfAttention(0, embed_dim=128, num_heads=4, attn_l2_norm=l2, flash_if_available=False)
    x = torch.randn(2, var.L, 128)
    bias = var.attn_bias_for_masking
    with torch.no_grad():
        torch.testing.assert_close(attn(x, bias), _plain_attention(attn, x, bias), rtol=1e-5, atol=1e-5)
    assert 'kernel=sdpa' in repr(attn)


@requires_cuda()
@pytest.mark.parametrize('kernel', ['flash_attn_func', 'xformers_attn'])
def test_fused_attention_kernels_match_sdpa(kernel):
    if optional_kernels()[kernel] is None:
        pytest.skip(f'{kernel} is not installed')
    torch.manual_seed(0)
    attn = SelfAttention(0, embed_dim=256, num_heads=4, attn_l2_norm=True, flash_if_available=True).cuda()
    plain = SelfAttention(0, embed_dim=256, num_heads=4, attn_l2_norm=True, flash_if_available=False).cuda()
    plain.load_state_dict(attn.state_dict())
    if kernel == 'xformers_attn':
        attn.flash_attn_func = None
    else:
        attn.xformers_attn = None
    x = torch.randn(4, 680, 256, device='cuda')
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        torch.testing.assert_close(attn(x, None).float(), plain(x, None).float(), rtol=2e-2, atol=2e-2)
