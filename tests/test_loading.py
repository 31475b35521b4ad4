"""Loading official-format files and this project's checkpoints; clear errors otherwise."""
import pytest
import torch

from conftest import shared_path
from models import hub_download, infer_vae_config, infer_var_config, load_checkpoint_models, \
    load_pretrained, load_vae_checkpoint


def test_infer_configs_from_state_dicts(tiny_models):
    vae, var = tiny_models
    c = infer_var_config(var.state_dict())
    assert (c['depth'], c['embed_dim'], c['num_heads'], c['patch_nums'], c['num_classes'], c['V'], c['Cvae']) == \
        (2, 128, 2, (1, 2, 3, 4), 10, 64, 8)
    v = infer_vae_config(vae.state_dict())
    assert (v['ch'], v['ch_mult'], v['vocab_size'], v['z_channels'], v['share_quant_resi']) == (32, [1, 1, 2, 2, 4], 64, 8, 4)


def test_trainer_checkpoint_round_trip(tiny_models, tmp_path):
    vae, var = tiny_models
    ckpt = {'epoch': 1, 'iter': 0, 'trainer': {'var_wo_ddp': var.state_dict(), 'vae_local': vae.state_dict()},
            'args': {'depth': 2}, 'model_config': var.build_config, 'vae_config': vae.config}
    p = tmp_path / 'ar-ckpt-last.pth'
    torch.save(ckpt, p)
    vae2, var2 = load_checkpoint_models(p)
    x = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(torch.zeros(1, 3, 64, 64)))
    var2.cond_drop_rate = 0.0
    torch.testing.assert_close(var2(torch.tensor([3]), x), var(torch.tensor([3]), x))
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
    torch.testing.assert_close(out, g['outputs']['var_forward_logits'])
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
