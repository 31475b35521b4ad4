"""The tokenizer's LPIPS (tokenizer/lpips.py, built by tokenizer/build.py): calibrated by default with the learned
weights the `lpips` package ships, equal to the reference LPIPS on real photos, and the uncalibrated baseline behind
--lpips_lin=none."""
import sys

import numpy as np
import pytest
import torch

from support import assert_equal_up_to_rounding, rounding_chain
from tokenizer import lpips as tok_lpips
from tokenizer.args import parse_vae_args
from tokenizer.build import build_lpips, resolve_lpips_lin
from tokenizer.lpips import LPIPS, _unit_channels, _vgg16_features, shipped_lin_file

WIDTHS = (64, 128, 256, 512, 512)


@pytest.fixture(scope='module')
def vgg_file(tmp_path_factory):
    """A VGG16 trunk in torchvision's key layout (`features.N.*`), randomly initialised: the real ImageNet weights
    cannot be downloaded in the tests."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('vgg') / 'vgg16.pth'
    torch.save({f'features.{k}': v for k, v in _vgg16_features().state_dict().items()}, path)
    return str(path)


def _shipped() -> dict:
    return torch.load(shipped_lin_file(), map_location='cpu', weights_only=True)


def _photos(side: int = 96) -> torch.Tensor:
    """Crops of three scikit-image photos as a (3, 3, side, side) batch in [-1, 1]."""
    skdata = pytest.importorskip('skimage.data', reason='scikit-image provides the real test photos')
    crops = [skdata.astronaut()[40:40 + side, 180:180 + side], skdata.chelsea()[60:60 + side, 120:120 + side],
             skdata.coffee()[100:100 + side, 200:200 + side]]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_lpips_normalisation_has_a_finite_gradient_at_an_all_zero_feature():
    x = torch.zeros(1, 8, 2, 2)
    x[0, :, 0, 0] = 1.0  # one position with features, three where every channel of the ReLU output is 0
    x.requires_grad_(True)
    _unit_channels(torch.relu(x)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_default_lpips_weights_are_the_learned_ones_the_lpips_package_ships(vgg_file):
    args = parse_vae_args([f'--lpips_vgg={vgg_file}'])
    assert args.lpips_lin == 'auto'
    lp = build_lpips(args, torch.device('cpu'))
    shipped = _shipped()
    assert lp.has_learned_lin and 'learned' in repr(lp)
    for k, (w_C, c) in enumerate(zip(lp.lin, WIDTHS)):
        assert shipped[f'lin{k}.model.1.weight'].shape == (1, c, 1, 1)
        torch.testing.assert_close(w_C, shipped[f'lin{k}.model.1.weight'].reshape(-1), rtol=0, atol=0)
        assert not torch.equal(w_C, torch.ones(c))  # calibrated, not the baseline's ones
    assert not any(p.requires_grad for p in lp.parameters())


@pytest.mark.parametrize('spec', ['none', ''])
def test_lpips_lin_none_is_the_uncalibrated_baseline(vgg_file, spec):
    """--lpips_lin=none (and '', the flag's old default) keeps weight 1 per channel: the per-position cosine distance
    2 - 2 cos summed over the taps, as before the learned weights became the default."""
    lp = build_lpips(parse_vae_args([f'--lpips_vgg={vgg_file}', f'--lpips_lin={spec}']), torch.device('cpu'))
    assert not lp.has_learned_lin and 'uniform' in repr(lp)
    assert all(torch.equal(w_C, torch.ones(c)) for w_C, c in zip(lp.lin, WIDTHS))
    x = _photos(32)
    cos = torch.nn.functional.cosine_similarity
    baseline = sum((2 - 2 * cos(fa, fb, dim=1)).mean((1, 2)) for fa, fb in zip(lp.taps(x), lp.taps(x.flip(0))))
    # the same features; sum_c (a/|a| - b/|b|)^2 vs 2 - 2 cos: equal in exact arithmetic, rounded relative to the
    # terms (2 per position and tap, 5 taps) over 512 channels, then a mean and the sum over taps
    assert_equal_up_to_rounding(lp(x, x.flip(0)), baseline, reduction=512, depth=4, scale=2 * len(WIDTHS))


def test_lpips_lin_path_loads_that_file(vgg_file, tmp_path):
    lin = {f'lin{k}.model.1.weight': torch.full((1, c, 1, 1), 0.25 * (k + 1)) for k, c in enumerate(WIDTHS)}
    torch.save(lin, tmp_path / 'lin.pth')
    lp = build_lpips(parse_vae_args([f'--lpips_vgg={vgg_file}', f'--lpips_lin={tmp_path / "lin.pth"}']),
                     torch.device('cpu'))
    assert [w_C.unique().tolist() for w_C in lp.lin] == [[0.25 * (k + 1)] for k in range(5)]
    with pytest.raises(FileNotFoundError, match='--lpips_lin'):
        resolve_lpips_lin(str(tmp_path / 'nope.pth'))


def test_shipped_weights_are_found_without_importing_the_lpips_package(monkeypatch):
    for name in [m for m in sys.modules if m == 'lpips' or m.startswith('lpips.')]:
        monkeypatch.delitem(sys.modules, name)
    path = shipped_lin_file()
    assert path.replace('\\', '/').endswith('lpips/weights/v0.1/vgg.pth')
    assert 'lpips' not in sys.modules  # its network code (torchvision's deprecated API) stays unloaded


def test_a_missing_lpips_package_gives_a_clear_message(monkeypatch):
    monkeypatch.setattr(tok_lpips.importlib.util, 'find_spec', lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r'pip install.*--lpips_lin=PATH.*--lpips_lin=none'):
        resolve_lpips_lin('auto')
    assert resolve_lpips_lin('none') is None  # the baseline needs no package


@pytest.mark.filterwarnings('ignore:.*(pretrained|weight enum).*:UserWarning')  # the reference's VGG16 call
def test_lpips_with_the_shipped_weights_equals_the_reference_lpips_on_real_photos():
    """The `lpips` package's own LPIPS (net='vgg', v0.1) and ours, on the same VGG16 trunk (the reference's randomly
    initialised torchvision VGG16, as the ImageNet weights cannot be downloaded here), give the same distances."""
    lpips_pkg = pytest.importorskip('lpips')
    torch.manual_seed(0)
    ref = lpips_pkg.LPIPS(net='vgg', version='0.1', pretrained=True, pnet_rand=True, verbose=False).eval()
    trunk = {}  # the reference's slices keep torchvision's `features` indices: net.slice2.5.weight = features.5.weight
    for k in range(1, 6):
        trunk.update({f'features.{n}': v for n, v in getattr(ref.net, f'slice{k}').state_dict().items()})
    ours = LPIPS()
    ours.load_vgg16(trunk)
    ours.load_lin(_shipped())

    x = _photos()
    pairs = [(x, x.roll(1, 0)), (x, (x + 0.1 * torch.randn_like(x)).clamp(-1, 1))]  # other photos, a noisy copy
    with torch.no_grad():
        for a, b in pairs:
            d_ref = ref(a, b).reshape(-1)
            d_ours = ours(a, b)
            assert (d_ours > 1e-3).all()  # a real distance, far above the tolerance
            # the same VGG16 and weights in two implementations: equal up to rounding
            assert_equal_up_to_rounding(d_ours, d_ref, **rounding_chain(ours, longest_sum=96 * 96))  # 96 px mean
