"""The web demo's functions on their own (webapp/backend.py) and app.py's start-up errors, on the tiny 64 px model:
the same images as sample.py for a seed, one image per scale ending in the sample, edits that keep the unpainted
tokens, the editor's mask dict, and clear messages for bad input. CPU only."""
import contextlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

import app
import sample
from models import build_vae_var
from sampling import editing
from sampling.class_names import class_names_for, imagenet_class_names
from sampling.draw import to_uint8_BHW3
from support import TINY, assert_equal_up_to_rounding, decoding, rounding_chain
from webapp import backend

SETTINGS = dict(cfg=2.0, top_k=20, top_p=0.9, more_smooth=False)


@pytest.fixture(scope='module')
def model(tiny_ckpt):
    """The tiny checkpoint loaded as app.py loads it."""
    from sampling.model_flags import load_models
    vae, var = load_models(ckpt=tiny_ckpt)
    return backend.DemoModel(vae, var, class_names_for(var.num_classes, tiny_ckpt), fp16=1)


@pytest.fixture(scope='module')
def photo():
    skdata = pytest.importorskip('skimage.data', reason='scikit-image provides the real test photos')
    return Image.fromarray(skdata.chelsea())


def _run(main, *argv):
    """A script's main in this process -> (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def test_generate_gives_the_images_of_sample_py(model, tiny_ckpt, tmp_path):
    imgs = backend.generate(model, '3: class 3', 3, seed=5, **SETTINGS)
    assert imgs.shape == (3, 64, 64, 3) and imgs.dtype == np.uint8
    code, err = _run(sample.main, '--ckpt', tiny_ckpt, '--classes', '3,3,3', '--seed', 5, '--cfg', 2, '--top_k', 20,
                     '--top_p', 0.9, '--more_smooth', 0, '--out', tmp_path / 'grid.png')
    assert code == 0, err
    grid = np.asarray(Image.open(tmp_path / 'grid.png').convert('RGB'))
    tiles = [grid[2:66, 2 + k * 66:66 + k * 66] for k in range(3)]  # make_grid: padding 2 around every tile
    for k in range(3):  # the same computation (sample_uint8, one batch of the same 3 seeds): exact
        np.testing.assert_array_equal(imgs[k], tiles[k], err_msg=f'image {k}')
    assert not np.array_equal(imgs[0], imgs[1])  # each image has its own seed


def test_scales_end_in_the_sample(model):
    calls = []
    strip = backend.scales(model, 7, 3, index=2, seed=11, on_scale=lambda si, f: calls.append(si), **SETTINGS)
    assert calls == list(range(len(TINY['patch_nums'])))
    assert len(strip) == len(TINY['patch_nums']) and all(s.shape == (64, 64, 3) for s in strip)
    final = backend.generate(model, 7, 3, seed=11, **SETTINGS)[2]
    np.testing.assert_array_equal(strip[-1], final)  # the same computation (the same batch of 3): exact
    assert not np.array_equal(strip[0], strip[-1])  # one token is a coarse picture, not the final one
    # decoding the cumulative latent after the last scale gives the sample too (the hook sees what is decoded; the
    # same fhat_to_img on the same batch of 1: exact)
    last = []
    backend.scales(model, 7, 1, 0, seed=11, on_scale=lambda si, f: last.append(model.vae.fhat_to_img(f)), **SETTINGS)
    alone = backend.generate(model, 7, 1, seed=11, **SETTINGS)[0]
    np.testing.assert_array_equal(to_uint8_BHW3(last[-1].add(1).mul(0.5))[0], alone)
    with pytest.raises(ValueError, match='not among the 3'):
        backend.scales(model, 7, 3, index=3, seed=11, **SETTINGS)


def test_class_names(tmp_path, tiny_ckpt, model):
    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == 'tench' and names[980] == 'volcano'
    assert class_names_for(1000) == names
    assert class_names_for(10, tiny_ckpt) == [f'class {i}' for i in range(10)]  # it stores no names
    ckpt = torch.load(tiny_ckpt, weights_only=False)
    ckpt['class_names'] = [f'folder_{i}' for i in range(10)]  # what train.py stores
    torch.save(ckpt, tmp_path / 'named.pth')
    assert class_names_for(10, str(tmp_path / 'named.pth'))[4] == 'folder_4'
    from models import load_checkpoint_models, model_folder  # a model folder (so a Hub repo) keeps them in config.json
    vae, var = load_checkpoint_models(tmp_path / 'named.pth')
    model_folder.save_pretrained(vae, var, tmp_path / 'folder', class_names=ckpt['class_names'])
    assert class_names_for(10, str(tmp_path / 'folder'))[7] == 'folder_7'
    vae, var = model.vae, model.var
    assert backend.parse_class('4: folder_4', 10) == 4 and backend.parse_class(4.0, 10) == 4
    assert backend.parse_class(backend.UNCONDITIONAL, 10, allow_none=True) is None
    for bad, msg in (('10', 'out of range'), (-1, 'out of range'), ('lion', 'expected a class id'), (None, 'pick'),
                     ('3.7', 'whole number'), (3.7, 'whole number'), ('inf', 'whole number'), ('1e400', 'whole number'),
                     (float('nan'), 'whole number')):
        with pytest.raises(ValueError, match=msg):
            backend.parse_class(bad, 10)
    # the lists show a class's id once
    assert [backend.display_name(i, n) for i, n in ((0, '0_tshirt_top'), (3, 'class 3'), (12, '012.boot'),
                                                    (1, 'tench'), (2, '21_x'))] == \
        ['0: tshirt_top', '3', '12: boot', '1: tench', '2: 21_x']
    for bad in (2.5, 'inf', None, '1e400'):
        with pytest.raises(ValueError, match='seed must be a whole number'):
            backend.sampling_settings(backend.DemoModel(vae, var, ["a"] * 10), bad, 1.0, 0, 0.0, False)


def test_uploads_are_checked_from_their_header_and_the_tokenizer_shows_its_ceiling(model, photo, tmp_path):
    """An upload larger than the demo takes is refused from its header (no pixel decoded: PIL's lazy open); one that
    is not an image is named; the Edit tab's reconstruction is the tokenizer's encode-decode of the fitted photo."""
    huge = tmp_path / 'huge.png'
    Image.new('1', (12000, 12000)).save(huge)
    with pytest.raises(ValueError, match='huge.png is 12000x12000 pixels, more than this demo takes'):
        backend.read_upload(str(huge))
    with pytest.raises(ValueError, match='12000x12000 pixels'):
        backend.check_upload_header(str(huge))
    (tmp_path / 'notes.png').write_text('not an image')
    with pytest.raises(ValueError, match='notes.png is not an image'):
        backend.read_upload(str(tmp_path / 'notes.png'))
    photo.save(tmp_path / 'cat.jpg')
    assert backend.read_upload(str(tmp_path / 'cat.jpg')).shape == (photo.height, photo.width, 3)
    recon = backend.reconstruction(model, photo)
    x_13HW = editing.pil_to_tensor(editing.fit_to_model(photo, 64))
    with torch.no_grad():  # the same computation on the same input: exact
        expected = model.vae.img_to_reconstructed_img(x_13HW * 2 - 1, last_one=True)
    np.testing.assert_array_equal(recon, to_uint8_BHW3(expected.add(1).mul(0.5))[0])
    assert 'learned only 10 classes' in model.domain_note()


def _editor(photo: Image.Image, stroke=None, layer_size=None) -> dict:
    """The value an image editor sends: the photo, one RGBA brush layer (transparent but for the stroke box)."""
    w, h = layer_size or photo.size
    layer = np.zeros((h, w, 4), np.uint8)
    if stroke is not None:
        y0, x0, y1, x1 = stroke
        layer[y0:y1, x0:x1] = (255, 0, 255, 255)
    bg = np.asarray(photo.convert('RGBA'))
    return {'background': bg, 'layers': [layer], 'composite': bg}


def test_editor_region(photo):
    img, region = backend.editor_region(_editor(photo, stroke=(50, 100, 150, 300)))
    assert img.size == photo.size and img.mode == 'RGB'
    assert region.shape == (photo.height, photo.width) and region.dtype == np.uint8
    assert region[50:150, 100:300].min() == 255 and region.sum() == 255 * 100 * 200
    # a layer at a fifth of the photo's size, painted on its top-left quarter: resized to the photo
    _, region = backend.editor_region(_editor(photo, stroke=(0, 0, 30, 45), layer_size=(90, 60)))
    assert region.shape == (photo.height, photo.width)
    assert region.mean() == pytest.approx(255 / 4, rel=0.02)  # a 5x upscale blends the stroke's edge: not rounding
    assert backend.editor_region(_editor(photo))[1] is None  # nothing painted
    with pytest.raises(ValueError, match='no photo'):
        backend.editor_region({'background': None, 'layers': [], 'composite': None})
    with pytest.raises(ValueError, match='megapixels'):
        backend.check_photo(Image.new('1', (8000, 6000)))


def test_edit_keeps_the_unpainted_tokens(model, photo):
    """A head that always picks token s makes the generated part certain: the edit must equal the decoding of
    'the photo's token where kept, s elsewhere' at every scale, with the keep map of the painted region."""
    vae = model.vae
    var = build_vae_var(device='cpu', **TINY)[1].eval()
    var.vae_proxy, var.vae_quant_proxy = (vae,), (vae.quantize,)
    x_13HW = editing.pil_to_tensor(editing.fit_to_model(photo, 64))
    gt = vae.img_to_idxBl(x_13HW * 2 - 1, TINY['patch_nums'])
    s = min(set(range(TINY['V'])) - set(torch.cat(gt, 1).flatten().tolist()))
    with torch.no_grad():
        var.head.weight.zero_()
        var.head.bias.zero_()
        var.head.bias[s] = 1e4
    certain = backend.DemoModel(vae, var, model.class_names)
    img, region = backend.editor_region(_editor(photo, stroke=(0, 0, 150, 451)))  # the top half
    res = backend.edit(certain, img, region, None, 'inpaint', None, 2, seed=0, **SETTINGS)
    assert res.keep_mask_hw[:2].sum() == 0 and res.keep_mask_hw[2:].min() == 1  # the painted rows regenerate
    emb = vae.quantize.embedding.weight
    ms_h = []
    for gt_1l, kept, pn in zip(gt, editing.kept_token_masks(res.keep_mask_hw, TINY['patch_nums']), TINY['patch_nums']):
        ids = torch.where(kept.flatten(), gt_1l[0], torch.full_like(gt_1l[0], s))
        ms_h.append(emb[ids].T.reshape(1, -1, pn, pn))
    with torch.no_grad():
        expected = (vae.fhat_to_img(vae.quantize.embed_to_fhat(ms_h, all_to_max_scale=True, last_one=True)) + 1) / 2
    # two computations: f_hat summed by the sampling loop vs by embed_to_fhat, decoded as a batch of 2 vs of 1
    assert_equal_up_to_rounding(res.images_n3HW, expected.expand(2, -1, -1, -1),
                                **rounding_chain(*decoding(vae)))
    variations, strip = backend.edit_images(res)
    assert [v.shape for v in variations] == [(64, 64, 3)] * 2 and strip.shape == (64, 4 * 64 + 3 * 4, 3)


def test_edit_errors(model, photo):
    img, _ = backend.editor_region(_editor(photo))
    everything = np.full((photo.height, photo.width), 255, np.uint8)
    # the token's side in the message is the model's: 16 px for this 64 px model of 4x4 tokens, 4 px for a 16 px one
    with pytest.raises(ValueError, match='4x4 token grid \\(each token covers 16x16 pixels\\)'):
        backend.edit(model, img, everything, None, 'inpaint', None, 1, seed=0, **SETTINGS)
    small = backend.DemoModel(*build_vae_var(device='cpu', ch_mult=(1, 1, 2), **TINY), model.class_names)
    with pytest.raises(ValueError, match='4x4 token grid \\(each token covers 4x4 pixels\\)'):
        backend.edit(small, img, everything, None, 'inpaint', None, 1, seed=0, **SETTINGS)
    for region, box, mode, cls, msg in ((None, None, 'inpaint', None, 'no region'),
                                        (everything, None, 'inpaint', None, 'covers the whole image'),
                                        (None, (0.1, 0.1, 0.5, 0.5), 'class-edit', None, 'class-edit needs'),
                                        (None, (0.1, 0.1, 0.5, 0.5), 'repaint', None, 'mode must be')):
        with pytest.raises(ValueError, match=msg):
            backend.edit(model, img, region, box, mode, cls, 1, seed=0, **SETTINGS)
    with pytest.raises(ValueError, match='y0,x0,y1,x1'):
        backend.parse_box('0.1,0.2')
    assert backend.parse_box(' ') is None and backend.parse_box('0.1, 0.1, 0.5, 0.6') == (0.1, 0.1, 0.5, 0.6)
    with pytest.raises(ValueError, match='number of images'):
        backend.generate(model, 1, 0, seed=0, **SETTINGS)
    with pytest.raises(ValueError, match='top_p'):
        backend.generate(model, 1, 1, seed=0, cfg=1, top_k=0, top_p=2, more_smooth=False)


def test_app_refuses_a_model_it_cannot_load(tmp_path, tiny_ckpt):
    code, err = _run(app.main, '--ckpt', tmp_path / 'missing.pth')
    assert code == 2 and 'error: --ckpt' in err and 'Traceback' not in err
    (tmp_path / 'broken.pth').write_bytes(open(tiny_ckpt, 'rb').read()[:1000])
    code, err = _run(app.main, '--ckpt', tmp_path / 'broken.pth', '--device', 'cpu')
    assert code == 2 and 'cannot load' in err and 'Traceback' not in err
    code, err = _run(app.main, '--ckpt', tiny_ckpt, '--port', 70000)
    assert code == 2 and '--port' in err
    # no model flag, no demo output, no network: say what to run
    code, err = _run(app.main, '--demo_dir', tmp_path / 'none', '--local_files_only', '--cache_dir', tmp_path / 'hf',
                     '--device', 'cpu')
    assert code == 2 and 'make demo' in err and '--ckpt' in err, err


def test_app_takes_the_offline_demo_model_by_default(tmp_path):
    (tmp_path / 'var').mkdir()
    (tmp_path / 'tokenizer').mkdir()
    (tmp_path / 'var' / 'ar-ckpt-last.pth').write_bytes(b'')
    args = app.get_parser().parse_args(['--demo_dir', str(tmp_path)])
    assert app.choose_default_model(args) is not None
    assert args.ckpt == str(tmp_path / 'var' / 'ar-ckpt-last.pth') and args.vae_ckpt is None
    (tmp_path / 'tokenizer' / 'vae-ckpt-last.pth').write_bytes(b'')
    args = app.get_parser().parse_args(['--demo_dir', str(tmp_path)])
    app.choose_default_model(args)
    assert args.vae_ckpt == str(tmp_path / 'tokenizer' / 'vae-ckpt-last.pth')
    args = app.get_parser().parse_args(['--demo_dir', str(tmp_path), '--depth', '20'])
    assert app.choose_default_model(args) is None and args.ckpt is None and args.depth == 20
    args = app.get_parser().parse_args(['--demo_dir', str(tmp_path / 'none')])
    assert 'make demo' in app.choose_default_model(args) and args.depth == 16 and args.ckpt is None
