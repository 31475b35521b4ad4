"""Zero-shot editing (sampling/editing.py, edit.py) on a tiny 64px model: the kept tokens at every scale, the
keep-everything round trip, per-variation seeds, the CLI on a real photo, and clear errors for bad input. CPU only."""
import contextlib
import functools
import io
import math
import os
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import edit
from models import PATCH_NUMS as PRESET_PATCH_NUMS, build_vae_var
from models.var import get_edit_mask
from sampling import editing
from sampling.editing import EDIT_SETTINGS
from sampling.settings import SamplingSettings
import support
from support import TINY, GUMBEL_GAIN, assert_equal_up_to_rounding, decoding, rounding_chain

PATCH_NUMS = TINY['patch_nums']
NO_FILTER = dict(top_k=0, top_p=0.0)


@pytest.fixture(scope='module')
def photo():
    """A real photo (scikit-image ships it; no download): the cat 'chelsea', 451x300 RGB uint8."""
    skdata = pytest.importorskip('skimage.data', reason='scikit-image provides the real test photos')
    return Image.fromarray(skdata.chelsea())


@pytest.fixture(scope='module')
def models_pair(sampling_models):
    """The (vae, var) saved in the `tiny_ckpt` fixture (tests/conftest.py)."""
    return sampling_models


def _fitted(photo, size=64):
    return editing.pil_to_tensor(editing.fit_to_model(photo, size))


# ------------------------------------------------------------------------------------------------ masks per scale
def _bilinear_1d(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a half-pixel bilinear resize with borders clamped (written from the definition)."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        w[i, i0] += 1 - frac
        w[i, i1] += frac
    return w


def _interpolated_keep(keep_hw: np.ndarray, pn: int) -> np.ndarray:
    """The keep mask resized to pn x pn (float64); the official rule keeps a token where this is > 0.5."""
    wy, wx = _bilinear_1d(keep_hw.shape[0], pn), _bilinear_1d(keep_hw.shape[1], pn)
    return wy @ keep_hw.astype(np.float64) @ wx.T


def _expected_kept(keep_hw: np.ndarray, pn: int) -> np.ndarray:
    """The official rule, independently: bilinear resize to pn x pn, > 0.5; scales of <= 3 tokens keep everything."""
    if pn * pn <= 3:
        return np.ones((pn, pn), dtype=bool)
    return _interpolated_keep(keep_hw, pn) > 0.5


def test_kept_tokens_by_hand():
    # keep the top-left quarter of a 4x4 grid; worked out on paper for scales 1, 2, 3, 4
    keep = editing.keep_mask_for(editing.box_region(PATCH_NUMS, (0, 0, 0.5, 0.5)), 'outpaint')
    kept = [m.int().tolist() for m in editing.kept_token_masks(keep, PATCH_NUMS)]
    assert kept[0] == [[1]]  # one token: always the input's (the <= 3-token rule)
    assert kept[1] == [[1, 0], [0, 0]]  # 4 tokens: the rule does not apply
    assert kept[2] == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]  # the middle row/column sit at 0.5, not > 0.5
    assert kept[3] == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize('patch_nums', [PATCH_NUMS, PRESET_PATCH_NUMS['256'], PRESET_PATCH_NUMS['512']])
def test_kept_tokens_follow_the_official_rule(patch_nums):
    gen = torch.Generator().manual_seed(0)
    pn = patch_nums[-1]
    masks = [get_edit_mask(patch_nums, 0.1, 0.1, 0.8, 0.8, inpainting=True),  # the official demo's mask
             get_edit_mask(patch_nums, 0.25, 0.3, 0.7, 0.9, inpainting=False),
             (torch.rand(pn, pn, generator=gen) > 0.5).float()]
    checked = total = 0
    for keep in masks:
        for kept, p in zip(editing.kept_token_masks(keep, patch_nums), patch_nums):
            expected = _expected_kept(keep.numpy(), p)
            # a value within round-off of 0.5 is decided by float32 rounding, as in the official code: skip it
            # (test_kept_tokens_by_hand covers exact halves)
            decided = (np.abs(_interpolated_keep(keep.numpy(), p) - 0.5) > 1e-5) | (p * p <= 3)
            assert np.array_equal(kept.numpy()[decided], expected[decided]), (p, keep)
            checked, total = checked + decided.sum(), total + decided.size
    assert checked > 0.7 * total


@pytest.mark.parametrize('mode,region,more_smooth', [
    ('inpaint', dict(box=editing.DEFAULT_BOX), True),
    ('outpaint', dict(box=(0.25, 0.0, 1.0, 0.5)), False),
    ('class-edit', dict(box=(0.0, 0.5, 0.5, 1.0)), True),
])
def test_edit_keeps_exactly_the_kept_tokens(models_pair, photo, mode, region, more_smooth):
    """The edited image equals the decoding of 'input token where kept, generated token elsewhere' at every scale.

    The generated token is made certain: the head outputs a constant logit vector whose maximum (1e4 above the
    rest) is an id `s` that the photo's tokens never use, so sampling and the Gumbel soft codes both give exactly
    code s. The expected image is decoded by the tokenizer's own embed_to_fhat / fhat_to_img from per-scale code
    maps built with the independent rule above; a single token more or less kept at any scale must break equality.
    """
    vae = models_pair[0]
    var = build_vae_var(device='cpu', **TINY)[1].eval()
    var.vae_proxy, var.vae_quant_proxy = (vae,), (vae.quantize,)  # share the module's tokenizer
    x_13HW = _fitted(photo)
    gt = vae.img_to_idxBl(x_13HW * 2 - 1, PATCH_NUMS)
    s = min(set(range(TINY['V'])) - set(torch.cat(gt, 1).flatten().tolist()))
    with torch.no_grad():
        var.head.weight.zero_()
        var.head.bias.zero_()
        var.head.bias[s] = 1e4

    label = 3 if mode == 'class-edit' else None
    res = editing.zero_shot_edit(vae, var, photo, mode=mode, class_label=label, **region,
                                 settings=replace(EDIT_SETTINGS, more_smooth=more_smooth, seed=0))
    assert res.label == (3 if mode == 'class-edit' else TINY['num_classes'])
    emb = vae.quantize.embedding.weight

    def decode(kept_per_scale):
        ms_h = []
        for gt_1l, kept, pn in zip(gt, kept_per_scale, PATCH_NUMS):
            ids = torch.where(torch.from_numpy(kept).flatten(), gt_1l[0], torch.full_like(gt_1l[0], s))
            ms_h.append(emb[ids].T.reshape(1, -1, pn, pn))
        with torch.no_grad():
            return (vae.fhat_to_img(vae.quantize.embed_to_fhat(ms_h, all_to_max_scale=True, last_one=True)) + 1) / 2

    kept = [_expected_kept(res.keep_mask_hw.numpy(), pn) for pn in PATCH_NUMS]
    assert 0 < kept[-1].sum() < kept[-1].size  # both kept and generated tokens at the last scale
    expected = decode(kept)
    # two computations: f_hat summed by the sampling loop vs by embed_to_fhat, then decoded
    decode_chain = rounding_chain(*decoding(vae))
    assert_equal_up_to_rounding(res.images_n3HW, expected, **decode_chain)
    for si in range(len(PATCH_NUMS)):  # power of the check: flipping any one token is visible
        flipped = [k.copy() for k in kept]
        flipped[si].flat[0] = not flipped[si].flat[0]
        assert (decode(flipped) - expected).abs().max() > 1e-3, si


@pytest.mark.parametrize('more_smooth', [False, True])
def test_keeping_everything_reproduces_the_reconstruction(models_pair, photo, more_smooth):
    vae, var = models_pair
    x_13HW = _fitted(photo)
    keep = torch.ones(PATCH_NUMS[-1], PATCH_NUMS[-1])
    out = editing.edit_image(vae, var, x_13HW, keep, label=TINY['num_classes'], num_samples=2,
                             settings=replace(EDIT_SETTINGS, more_smooth=more_smooth, **NO_FILTER))
    with torch.no_grad():
        recon_13HW = (vae.img_to_reconstructed_img(x_13HW * 2 - 1, last_one=True) + 1) / 2
    # two computations: f_hat summed by the quantiser vs by the sampling loop, decoded as a batch of 1 vs of 2
    assert_equal_up_to_rounding(out, recon_13HW.expand(2, -1, -1, -1),
                                **rounding_chain(*decoding(vae)))


def test_variations_have_their_own_seeds(models_pair, photo):
    vae, var = models_pair
    x_13HW = _fitted(photo)
    keep = editing.keep_mask_for(editing.box_region(PATCH_NUMS, editing.DEFAULT_BOX), 'inpaint')
    three = editing.edit_image(vae, var, x_13HW, keep, label=2, num_samples=3, settings=replace(EDIT_SETTINGS, seed=7))
    for i in range(3):
        one = editing.edit_image(vae, var, x_13HW, keep, label=2, settings=replace(EDIT_SETTINGS, seed=7 + i))
        # a batch of 3 vs of 1 (two computations); the edit's soft codes (more_smooth) pass the logits' rounding on
        # through the Gumbel softmax, amplified
        assert_equal_up_to_rounding(three[i:i + 1], one, gain=GUMBEL_GAIN, msg=f'variation {i}',
                                    **rounding_chain(var, *decoding(vae),
                                                     longest_sum=var.L))
    assert (three[0] - three[1]).abs().max() > 1e-3  # different seeds, different edits


# ------------------------------------------------------------------------------------------------ regions and images
def test_box_region_rounds_like_the_official_notebook():
    region = editing.box_region(PRESET_PATCH_NUMS['512'], editing.DEFAULT_BOX)
    rows = region.sum(1).nonzero().flatten()
    assert (rows.min().item(), rows.max().item()) == (3, 25)  # pn=32: round(3.2)=3 .. round(25.6)-1=25
    assert editing.keep_mask_for(region, 'inpaint').sum() == 32 * 32 - 23 * 23
    assert editing.keep_mask_for(region, 'outpaint').sum() == 23 * 23


def test_mask_image_follows_the_resize_and_crop():
    # a 96x64 (w x h) input is resized to 96x64 -> 64 px high, then its centre 64 columns (16..79) are kept
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[0:32, 16:48] = 255  # the top-left quarter of the cropped square
    region = editing.mask_region(mask, PATCH_NUMS, image_size=(96, 64), model_size=64)
    assert region.int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    # a mask already at the model's resolution; a token is in the region when >= threshold of it is
    square = np.zeros((64, 64), dtype=bool)
    square[:, :24] = True  # token column 1 is half covered
    assert editing.mask_region(square, PATCH_NUMS, (96, 64), 64).sum(0).tolist() == [4, 4, 0, 0]
    assert editing.mask_region(square, PATCH_NUMS, (96, 64), 64, threshold=0.75).sum(0).tolist() == [4, 0, 0, 0]


def test_fit_to_model_resizes_and_centre_crops(photo):
    fitted = editing.fit_to_model(photo, 64)
    assert fitted.size == (64, 64)
    # the crop is centred: the middle of the photo stays in the middle
    wide = Image.new('RGB', (300, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (100, 0, 200, 100))
    assert editing.fit_to_model(wide, 64).getpixel((32, 32)) == (0, 0, 255)
    assert editing.fit_to_model(wide, 64).getpixel((0, 32))[2] > 200


def test_strip_layout(models_pair, photo):
    vae, var = models_pair
    res = editing.zero_shot_edit(vae, var, photo, mode='inpaint', box=(0.0, 0.0, 0.5, 0.5), num_samples=2,
                                 settings=replace(EDIT_SETTINGS, **NO_FILTER))
    strip = res.strip(gap=4)
    assert strip.size == (4 * 64 + 3 * 4, 64)
    arr = np.asarray(strip)
    assert np.array_equal(arr[:, :64], np.asarray(editing.to_pil(res.input_13HW[0])))
    mask_panel = arr[:, 68:132, 0]
    assert mask_panel[:32, :32].min() == 255 and mask_panel[32:, 32:].max() == 0  # white = regenerated
    assert np.array_equal(arr[:, 2 * 68:2 * 68 + 64], np.asarray(editing.to_pil(res.images_n3HW[0])))


def test_modes_map_the_region_to_the_keep_mask():
    """inpaint and class-edit regenerate the region (keep = 1 - region); outpaint keeps it (keep = region)."""
    region = editing.box_region(PATCH_NUMS, (0.0, 0.0, 0.5, 0.75))
    assert region.int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert torch.equal(editing.keep_mask_for(region, 'outpaint'), region)
    assert torch.equal(editing.keep_mask_for(region, 'inpaint'), 1 - region)
    assert torch.equal(editing.keep_mask_for(region, 'class-edit'), 1 - region)


def test_mask_pixels_from_128_are_in_the_region():
    mask = np.zeros((64, 64), np.uint8)
    mask[:16, :16] = 128  # token (0, 0): exactly the documented cut
    mask[:16, 16:32] = 127  # token (0, 1): just below it
    region = editing.mask_region(mask, PATCH_NUMS, image_size=(64, 64), model_size=64)
    assert region[0].tolist() == [1, 0, 0, 0] and region[1:].sum() == 0


def test_mask_coverage_is_measured_on_the_input_pixels():
    # a 128x128 mask (the input's size) with three columns in four in the region: every token is 3/4 covered,
    # whatever pixels the downscale to 64 px would pick
    mask = np.zeros((128, 128), np.uint8)
    mask[:, np.arange(128) % 4 != 3] = 255
    at = functools.partial(editing.mask_region, mask, PATCH_NUMS, (128, 128), 64)
    assert at(threshold=0.7).sum() == 16 and at(threshold=0.8).sum() == 0


def test_to_pil_clamps_and_truncates():
    img = torch.tensor([-0.5, 0.0, 0.999, 1.0, 1.7]).view(1, 1, 5).expand(3, 1, 5)
    assert np.asarray(editing.to_pil(img))[0, :, 0].tolist() == [0, 0, 254, 255, 255]  # x*255 truncated


def test_fit_to_model_centre_crops_portraits_too():
    tall = Image.new('RGB', (100, 300), (255, 0, 0))
    tall.paste((0, 0, 255), (0, 100, 100, 200))  # the middle third is blue
    fitted = editing.fit_to_model(tall, 64)
    assert fitted.size == (64, 64)
    assert fitted.getpixel((32, 32)) == (0, 0, 255) and fitted.getpixel((32, 0))[2] > 200


def test_strip_panels_exactly():
    """Panels at x = i * (W + gap); the mask panel is the keep mask, nearest-upscaled to W, white = regenerated."""
    H = W = 64
    keep = torch.tensor([[1., 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    inp = torch.rand(3, H, W, generator=torch.Generator().manual_seed(0))
    edits = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    arr = np.asarray(editing.comparison_strip(inp, keep, edits, gap=5))
    assert arr.shape == (H, 4 * W + 3 * 5, 3)
    mask_panel = np.kron(1 - keep.numpy(), np.ones((16, 16))) * 255
    panels = [np.asarray(editing.to_pil(inp)), np.repeat(mask_panel[..., None], 3, 2)] + \
        [np.asarray(editing.to_pil(e)) for e in edits]
    for i, panel in enumerate(panels):
        assert np.array_equal(arr[:, i * (W + 5):i * (W + 5) + W], panel), i
        if i:
            assert (arr[:, i * (W + 5) - 5:i * (W + 5)] == 255).all()  # the white gap


def test_zero_mask_threshold_is_refused(tmp_path, tiny_ckpt, photo):
    with pytest.raises(ValueError, match=r'mask_threshold must lie in \(0, 1\]'):
        editing.mask_region(np.zeros((64, 64), np.uint8), PATCH_NUMS, (64, 64), 64, threshold=0)
    image = tmp_path / 'cat.png'
    photo.save(image)
    with pytest.raises(SystemExit, match=r'--mask_threshold must lie in \(0, 1\]'):
        _cli('--ckpt', tiny_ckpt, '--image', image, '--mask_threshold', 0, '--out_dir', tmp_path / 'out')


def test_cli_passes_its_settings_to_the_library(tmp_path, tiny_ckpt, photo, monkeypatch):
    image, mask = tmp_path / 'cat.png', tmp_path / 'mask.png'
    photo.save(image)
    Image.new('L', photo.size, 0).save(mask)
    seen = {}

    def fake_edit(vae, var, img, **kwargs):
        seen.update(kwargs, image=img)
        raise ValueError('stop here')
    monkeypatch.setattr(editing, 'zero_shot_edit', fake_edit)
    with pytest.raises(SystemExit, match='stop here'):
        _cli('--ckpt', tiny_ckpt, '--image', image, '--mode', 'outpaint', '--mask', mask, '--mask_threshold', 0.3,
             '--class_label', 4, '-n', 2, '--seed', 5, '--cfg', 1.5, '--top_k', 7, '--top_p', 0.5,
             '--more_smooth', 0, '--out_dir', tmp_path / 'out')
    assert seen['image'] == str(image) and seen['mask'] == str(mask)
    expected = dict(mode='outpaint', mask_threshold=0.3, class_label=4, num_samples=2,
                    settings=SamplingSettings(cfg=1.5, top_k=7, top_p=0.5, more_smooth=False, seed=5, fp16=1))
    assert {k: seen[k] for k in expected} == expected


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors(tmp_path, models_pair, photo):
    vae, var = models_pair
    with pytest.raises(ValueError, match='missing.png: no such file'):
        editing.read_image(tmp_path / 'missing.png')
    junk = tmp_path / 'junk.png'
    junk.write_bytes(b'this is not an image')
    with pytest.raises(ValueError, match='junk.png is not an image file'):
        editing.read_image(junk)
    photo.save(tmp_path / 'full.png')
    truncated = tmp_path / 'truncated.png'
    truncated.write_bytes((tmp_path / 'full.png').read_bytes()[:2000])
    with pytest.raises(ValueError, match='truncated.png cannot be read'):
        editing.read_image(truncated)
    with pytest.raises(ValueError, match='mask is 10x10 pixels; it must match the input image'):
        editing.zero_shot_edit(vae, var, photo, mask=np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match='region is empty'):
        editing.zero_shot_edit(vae, var, photo, box=(0.0, 0.0, 0.1, 0.1))
    with pytest.raises(ValueError, match='region is empty'):
        editing.zero_shot_edit(vae, var, photo, mask=np.zeros((64, 64), np.uint8))
    for mode, effect in (('outpaint', 'keep every token and return the input unedited'),
                         ('inpaint', 'regenerate the whole image')):
        with pytest.raises(ValueError, match=f'region covers the whole image at .* 4x4 token grid .*{effect}'):
            editing.zero_shot_edit(vae, var, photo, mode=mode, mask=np.full((64, 64), 255, np.uint8))
    with pytest.raises(ValueError, match='box: expected 0 <= y0 < y1 <= 1'):
        editing.zero_shot_edit(vae, var, photo, box=(0.5, 0.1, 0.2, 0.9))
    with pytest.raises(ValueError, match=r'class_label 10 is out of range: this model has classes 0\.\.9'):
        editing.zero_shot_edit(vae, var, photo, mode='class-edit', class_label=10)
    with pytest.raises(ValueError, match='class-edit needs a target class_label'):
        editing.zero_shot_edit(vae, var, photo, mode='class-edit')
    with pytest.raises(ValueError, match='mode must be one of'):
        editing.zero_shot_edit(vae, var, photo, mode='erase')
    with pytest.raises(ValueError, match=r'keep mask: expected shape \(4, 4\)'):
        editing.edit_image(vae, var, _fitted(photo), torch.ones(64, 64), label=0)


# ------------------------------------------------------------------------------------------------ the command line
def test_cli_writes_the_variations_and_the_strip(tmp_path, tiny_ckpt, models_pair, photo):
    image = tmp_path / 'cat.png'
    photo.save(image)
    out_dir = tmp_path / 'out'
    argv = ['--ckpt', tiny_ckpt, '--image', str(image), '--mode', 'class-edit', '--class_label', '7',
            '--box', '0.1,0.2,0.9,0.8', '-n', '2', '--seed', '3', '--out_dir', str(out_dir)]
    assert edit.main(argv) == 0
    names = sorted(os.listdir(out_dir))
    assert names == ['cat_class-edit_0.png', 'cat_class-edit_1.png', 'cat_class-edit_strip.png']
    assert Image.open(out_dir / 'cat_class-edit_strip.png').size == (4 * 64 + 3 * 4, 64)
    # the CLI's variations are the library's (same seeds, same settings)
    vae, var = models_pair
    lib = editing.zero_shot_edit(vae, var, photo, mode='class-edit', class_label=7, box=(0.1, 0.2, 0.9, 0.8),
                                 num_samples=2, settings=replace(EDIT_SETTINGS, seed=3))
    for i in range(2):
        cli = np.asarray(Image.open(out_dir / f'cat_class-edit_{i}.png').convert('RGB')).astype(int)
        assert cli.shape == (64, 64, 3)
        assert np.abs(cli - np.asarray(editing.to_pil(lib.images_n3HW[i])).astype(int)).max() <= 1

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = edit.main(argv[:2] + ['--image', str(tmp_path / 'cat.txt')])
    assert code == 2 and 'error: --image' in err.getvalue() and 'cat.txt' in err.getvalue()
    assert 'Traceback' not in err.getvalue()


def _cli(*argv):
    """edit.main in this process; a user mistake (exit code 2) is raised as SystemExit with its stderr message."""
    support.main_in_process(edit.main, *argv)


def _edit_paths(*argv):
    """The paths that edit.py's library function writes for this command line."""
    return edit.run_edit(edit.get_parser().parse_args([str(a) for a in argv]))


def test_cli_bad_inputs_exit_with_a_message(tmp_path, tiny_ckpt, photo):
    image = tmp_path / 'cat.png'
    photo.save(image)
    base = ['--ckpt', tiny_ckpt, '--image', image, '--out_dir', tmp_path / 'out']
    junk = tmp_path / 'junk.jpg'
    junk.write_bytes(b'\xff\xd8 not really a jpeg')
    small_mask = tmp_path / 'small_mask.png'
    Image.new('L', (10, 10), 255).save(small_mask)
    cases = [
        (['--image', junk], 'junk.jpg is not an image file'),
        (['--mask', small_mask], 'small_mask.png is 10x10 pixels; it must match the input image (451x300)'),
        (['--box', '0.1,0.1,0.12,0.12'], 'region is empty'),
        (['--box', '0.1,0.1,0.8'], None),  # argparse: four numbers
        (['--mode', 'class-edit'], '--mode class-edit needs --class_label'),
        (['--mode', 'class-edit', '--class_label', '10'], 'class_label 10 is out of range'),
        (['--ckpt', tmp_path / 'nope.pth'], '--ckpt'),
        (['-n', '0'], '--num_samples must be at least 1'),
        (['--top_p', '1.5'], '--top_p must lie in [0, 1] (0 = no top-p filter), got 1.5'),
        (['--top_k', '-1'], '--top_k must be >= 0 (0 = no top-k filter), got -1'),
        (['--cfg', '-1'], '--cfg must be >= 0 (0 = no guidance), got -1'),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            _cli(*base, *extra)
        if message is not None:
            assert message in str(exc.value), (extra, str(exc.value))
    assert not (tmp_path / 'out').exists()  # nothing is written on failure


def test_cli_refuses_a_region_that_keeps_every_token_or_none(tmp_path, tiny_ckpt, photo):
    image = tmp_path / 'cat.png'
    photo.save(image)
    for mode, effect in (('outpaint', 'outpaint would keep every token and return the input unedited'),
                         ('inpaint', 'inpaint would regenerate the whole image instead of editing it'),
                         ('class-edit', 'class-edit would regenerate the whole image')):
        with pytest.raises(SystemExit, match=f'^error: the region covers the whole image .*{effect}'):
            _cli('--ckpt', tiny_ckpt, '--image', image, '--mode', mode, '--class_label', 1, '--box', '0,0,1,1',
                 '--out_dir', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_cli_says_which_files_it_replaces(tmp_path, tiny_ckpt, photo, capsys):
    image = tmp_path / 'cat.png'
    photo.save(image)
    argv = ['--ckpt', tiny_ckpt, '--image', image, '--out_dir', tmp_path / 'out', '--prefix', 'x']
    paths = _edit_paths(*argv, '-n', 2)
    assert 'replacing' not in capsys.readouterr().out
    _cli(*argv, '-n', 1)
    replaced = re.findall(r'^replacing (.*)$', capsys.readouterr().out, re.M)
    assert replaced == [paths[0], paths[2]]  # x_0.png and the strip; x_1.png is left as it was


def test_help_shows_the_defaults():
    from train_support import assert_help_shows_defaults
    assert_help_shows_defaults(edit.get_parser(), {'--cfg': 3.0, '--top_k': 900, '--top_p': 0.95, '--more_smooth': 1,
                                                   '--depth': 36})
