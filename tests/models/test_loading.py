"""Loading official-format files and this project's checkpoints; clear errors otherwise."""
import pytest
import torch

from support import assert_equal_up_to_rounding, rounding_chain, shared_path
from models import hub_download, infer_vae_config, infer_var_config, load_checkpoint_models, \
    load_pretrained, load_vae_checkpoint


def test_infer_configs_from_state_dicts(tiny_models):
    vae, var = tiny_models
    c = infer_var_config(var.state_dict())
    assert (c['depth'], c['embed_dim'], c['num_heads'], c['patch_nums'], c['num_classes'], c['V'], c['Cvae']) == \
        (2, 128, 2, (1, 2, 3, 4), 10, 64, 8)
    v = infer_vae_config(vae.state_dict())
    assert (v['ch'], v['ch_mult'], v['vocab_size'], v['z_channels'], v['share_quant_resi']) \
        == (32, [1, 1, 2, 2, 4], 64, 8, 4)


def test_trainer_checkpoint_round_trip(tiny_models, tmp_path):
    vae, var = tiny_models
    ckpt = {'epoch': 1, 'iter': 0, 'trainer': {'var_wo_ddp': var.state_dict(), 'vae_local': vae.state_dict()},
            'args': {'depth': 2}, 'model_config': var.build_config, 'vae_config': vae.config}
    p = tmp_path / 'ar-ckpt-last.pth'
    torch.save(ckpt, p)
    vae2, var2 = load_checkpoint_models(p)
    x = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(torch.zeros(1, 3, 64, 64)))
    var2.cond_drop_rate = 0.0
    # the same weights through the same forward: the same computation, exact
    torch.testing.assert_close(var2(torch.tensor([3]), x), var(torch.tensor([3]), x), rtol=0, atol=0)
    # without any config the shapes are enough
    del ckpt['model_config'], ckpt['vae_config']
    torch.save(ckpt, p)
    _, var3 = load_checkpoint_models(p)
    assert var3.patch_nums == (1, 2, 3, 4) and var3.depth == 2


def test_official_golden_files_load_through_the_loaders(tmp_path):
    g = torch.load(shared_path('golden', 'tiny_pn4.pt'), map_location='cpu', weights_only=False)
    torch.save(g['vae_state_dict'], tmp_path / 'vae.pth')
    torch.save(g['var_state_dict'], tmp_path / 'var.pth')
    vae = load_vae_checkpoint(tmp_path / 'vae.pth', patch_nums=(1, 2, 3, 4))
    _, var = load_checkpoint_models(tmp_path / 'var.pth', vae_path=str(tmp_path / 'vae.pth'))
    var.cond_drop_rate = 0.0
    out = var(g['inputs']['label_B'], g['outputs']['idxBl_to_var_input'])
    # the official code's float32 logits on another machine: the same math, other kernels
    assert_equal_up_to_rounding(out, g['outputs']['var_forward_logits'], **rounding_chain(var, longest_sum=var.L))
    assert vae.config['ch'] == 32


def test_offline_hub_gives_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match=r'local path \(--var_ckpt /path/to/var_d16.pth\)'):
        hub_download('var_d16.pth', cache_dir=str(tmp_path), local_files_only=True)
    with pytest.raises(RuntimeError, match=r'local path \(--vae_ckpt /path/to/vae_ch160v4096z32.pth\)'):
        hub_download('vae_ch160v4096z32.pth', cache_dir=str(tmp_path), local_files_only=True)
    with pytest.raises(ValueError, match='released depths'):
        load_pretrained(17)


def test_wrapped_keys_and_other_scales_load_cleanly(tiny_models, tmp_path):
    """DDP(torch.compile(m)) saves 'module._orig_mod.' keys; a tokenizer saved for other scales carries usage
    statistics of another shape, which start from zero instead of whatever memory the buffer had."""
    vae, _ = tiny_models
    sd = {f'module._orig_mod.{k}': v for k, v in vae.state_dict().items()}
    sd['module._orig_mod.quantize.ema_vocab_hit_SV'] = torch.ones(7, vae.vocab_size)  # 7 scales, not 4
    torch.save(sd, tmp_path / 'wrapped.pth')
    loaded = load_vae_checkpoint(tmp_path / 'wrapped.pth', patch_nums=(1, 2, 3, 4))
    assert torch.equal(loaded.quantize.embedding.weight, vae.quantize.embedding.weight)
    assert loaded.quantize.ema_vocab_hit_SV.shape == (4, vae.vocab_size)
    assert not loaded.quantize.ema_vocab_hit_SV.any()


def test_compiled_submodule_keys_load(tiny_models, tmp_path):
    """torch.compile on a submodule saves '<name>._orig_mod.<rest>' keys; they are unwrapped like the outer prefixes."""
    vae, _ = tiny_models
    sd = {k.replace('decoder.', 'decoder._orig_mod.', 1): v for k, v in vae.state_dict().items()}
    assert any('._orig_mod.' in k for k in sd)
    torch.save(sd, tmp_path / 'compiled.pth')
    loaded = load_vae_checkpoint(tmp_path / 'compiled.pth', patch_nums=(1, 2, 3, 4))
    assert torch.equal(loaded.decoder.conv_in.weight, vae.decoder.conv_in.weight)
    # the submodule that holds the file's marker key (encoder.conv_in.weight) compiled on its own
    sd = {k.replace('encoder.', 'encoder._orig_mod.', 1): v for k, v in vae.state_dict().items()}
    torch.save(sd, tmp_path / 'compiled_encoder.pth')
    loaded = load_vae_checkpoint(tmp_path / 'compiled_encoder.pth', patch_nums=(1, 2, 3, 4))
    assert torch.equal(loaded.encoder.conv_in.weight, vae.encoder.conv_in.weight)


def test_official_vae_path_prefers_explicit_then_working_directory_then_hub(tmp_path, monkeypatch):
    from models import loading
    calls = []
    monkeypatch.setattr(loading, 'hub_download', lambda name, *a, **k: calls.append(name) or f'/hub/{name}')
    monkeypatch.chdir(tmp_path)
    assert loading.official_vae_path('/my/vae.pth') == '/my/vae.pth' and calls == []
    assert loading.official_vae_path() == '/hub/vae_ch160v4096z32.pth' and calls == ['vae_ch160v4096z32.pth']
    (tmp_path / 'vae_ch160v4096z32.pth').write_bytes(b'x')
    assert loading.official_vae_path() == 'vae_ch160v4096z32.pth' and len(calls) == 1


def test_empty_checkpoint_file_says_so(tmp_path):
    from models import read_checkpoint
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(RuntimeError, match=r'empty \(0 bytes\)'):
        read_checkpoint(tmp_path / 'empty.pth')


@pytest.mark.parametrize('depth', [16, 30, 36])
def test_load_pretrained_uses_the_official_configs(depth, tmp_path, monkeypatch):
    """As official: width 64·depth, heads = depth, dpr 0.1·depth/24, 1000 classes, attn_l2_norm; d36 alone uses
    the 512 px scales and shared AdaLN. The weights are stubbed: only the configuration is checked."""
    from models import loading
    from models.inspect_ckpt import PATCH_NUMS
    seen = {}
    monkeypatch.setattr(loading, 'load_vae_checkpoint',
                        lambda path, device='cpu', patch_nums=None: seen.setdefault('vae_pn', tuple(patch_nums)))
    monkeypatch.setattr(loading, 'read_checkpoint', lambda path: {'pos_1LC': torch.zeros(1)})
    monkeypatch.setattr(loading, 'load_var_weights',
                        lambda vae, sd, device='cpu', var_config=None: seen.setdefault('cfg', dict(var_config)))
    loading.load_pretrained(depth, vae_path='vae.pth', var_path='var.pth')
    cfg, pn = seen['cfg'], PATCH_NUMS['512' if depth == 36 else '256']
    assert seen['vae_pn'] == tuple(pn) and tuple(cfg['patch_nums']) == tuple(pn)
    assert (cfg['depth'], cfg['embed_dim'], cfg['num_heads'], cfg['num_classes']) == (depth, 64 * depth, depth, 1000)
    assert cfg['shared_aln'] == (depth == 36) and cfg['attn_l2_norm'] is True
    assert cfg['drop_path_rate'] == 0.1 * depth / 24  # the rule's own float64 ops: exact


def _fake_var_sd(C=64, depth=3, L=680, S=10, mlp=4, heads=2):
    """Key names and shapes of a VAR state dict, on the meta device (no lvl_1L values to count)."""
    e = lambda *s: torch.empty(*s, device='meta')  # noqa: E731
    sd = {'pos_1LC': e(1, L, C), 'lvl_embed.weight': e(S, C), 'class_emb.weight': e(1001, C), 'head.weight': e(4096, C),
          'word_embed.weight': e(C, 32), 'lvl_1L': e(1, L)}
    for n in range(depth):
        sd[f'blocks.{n}.attn.proj.weight'] = e(C, C)
        sd[f'blocks.{n}.attn.scale_mul_1H11'] = e(1, heads, 1, 1)
        sd[f'blocks.{n}.ffn.fc1.weight'] = e(mlp * C, C)
    return sd


def test_infer_var_config_from_names_and_shapes_only():
    c = infer_var_config(_fake_var_sd())
    assert (c['depth'], c['embed_dim'], c['num_heads'], c['num_classes'], c['V'], c['Cvae']) \
        == (3, 64, 2, 1000, 4096, 32)
    assert c['mlp_ratio'] == 4 and tuple(c['patch_nums']) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert infer_var_config(_fake_var_sd(mlp=2))['mlp_ratio'] == 2
    assert tuple(infer_var_config(_fake_var_sd(L=2240))['patch_nums']) == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    assert infer_var_config(_fake_var_sd(L=700))['patch_nums'] is None  # no preset has 700 tokens


def test_describe_mismatch_lists_missing_unexpected_and_truncates():
    from models.inspect_ckpt import describe_mismatch
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2, bias=False) for _ in range(15)])
    assert describe_mismatch(model, model.state_dict(), 'X') is None
    sd = {'extra.weight': torch.zeros(1), '0.weight': torch.zeros(3, 3)}
    msg = describe_mismatch(model, sd, 'VAR checkpoint', fits='depth=9')
    assert msg.startswith('VAR checkpoint does not match the model')
    assert '0.weight: checkpoint (3, 3) vs model (2, 2)' in msg
    missing = msg.split('missing keys (14):\n')[1].split('unexpected keys')[0]
    assert missing.count('.weight') == 12 and '... and 2 more' in missing and '14.weight' not in missing
    assert 'unexpected keys (1):\n    extra.weight' in msg and msg.endswith('The checkpoint fits: depth=9')
    assert 'more' not in describe_mismatch(model, {}, 'X', limit=15)
