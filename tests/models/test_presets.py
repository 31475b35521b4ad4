"""One source for the presets: the patch-number presets, the released models and their Hub files live in
models/presets.py, and every reader (models, loading, train.py's --pn, the benchmarks) takes them from there."""
import pytest
import torch

from models import presets


def test_every_reader_holds_the_one_registry():
    import benchmarks.timings.bench_data
    import models
    import models.inspect_ckpt
    import models.loading
    from utils import arg_util
    assert arg_util.PN_PRESETS is presets.PATCH_NUMS
    assert models.PATCH_NUMS is models.inspect_ckpt.PATCH_NUMS is presets.PATCH_NUMS
    assert models.PRESETS is presets.PRESETS and models.preset_config is presets.preset_config
    assert models.loading.VAE_FILENAME == presets.VAE_FILENAME and models.loading.HUB_REPO_ID == presets.HUB_REPO_ID
    assert models.loading.OFFICIAL_DEPTHS == (16, 20, 24, 30, 36)
    assert benchmarks.timings.bench_data.PATCH_NUMS is presets.PATCH_NUMS
    assert arg_util.parse_patch_nums('512') == presets.PATCH_NUMS['512']


def test_released_models():
    """d16-d30 at 256 px, d36 at 512 px with shared AdaLN; Hub names as released."""
    assert [presets.image_size(p['patch_nums']) for p in presets.PRESETS.values()] == [256] * 4 + [512]
    assert [name for name, p in presets.PRESETS.items() if p['shared_aln']] == ['d36']
    assert presets.var_filename(36) == presets.var_filename('d36') == 'var_d36.pth'
    # drop path 0.1 * depth / 24: the rule's own float64 ops, exact
    assert presets.width_heads_drop_path(24) == dict(embed_dim=1536, num_heads=24, drop_path_rate=0.1 * 24 / 24)
    assert presets.preset_config(16) == presets.PRESETS['d16']
    assert presets.preset_config(16) is not presets.PRESETS['d16']  # a copy to change freely
    with pytest.raises(ValueError, match='released models: d16, d20, d24, d30, d36'):
        presets.preset_config(17)


def test_load_pretrained_reads_the_registry(tmp_path, monkeypatch):
    """load_pretrained takes scales, shared AdaLN and the Hub file from the registry (it used to restate them as
    `depth == 36`); the weights and the download are stubbed, only the configuration is checked."""
    from models import loading
    seen = {}
    changed = dict(depth=20, patch_nums=(1, 2, 4, 8), shared_aln=True)
    monkeypatch.setitem(presets.PRESETS, 'd20', changed)
    monkeypatch.setattr(loading, 'hub_download', lambda filename, **kw: seen.setdefault('files', []).append(filename))
    monkeypatch.setattr(loading, 'load_vae_checkpoint',
                        lambda path, device='cpu', patch_nums=None: seen.setdefault('vae_pn', tuple(patch_nums)))
    monkeypatch.setattr(loading, 'read_checkpoint', lambda path: {'pos_1LC': torch.zeros(1)})
    monkeypatch.setattr(loading, 'load_var_weights',
                        lambda vae, sd, device='cpu', var_config=None: seen.setdefault('cfg', dict(var_config)))
    loading.load_pretrained(20)
    assert seen['files'] == ['vae_ch160v4096z32.pth', 'var_d20.pth']
    assert seen['vae_pn'] == (1, 2, 4, 8) and tuple(seen['cfg']['patch_nums']) == (1, 2, 4, 8)
    assert seen['cfg']['shared_aln'] is True and seen['cfg']['embed_dim'] == 1280
