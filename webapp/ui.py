"""The web demo's page: a Gradio Blocks app over `webapp.backend` (Generate and Edit tabs).

Every event that does work has an api_name (`generate`, `scales`, `edit`, `example_photo`), so the page and
`gradio_client` call the same functions. All model work shares one concurrency group of size one (the model's KV
cache is switched on and off per call, so two samplings must never overlap); the queue in front of it is bounded
(`launch_kwargs`). A user mistake comes back as a message in the page (gr.Error), never as a traceback.
"""
import functools
import itertools
import random
import traceback
from typing import Any, Callable, Optional, Tuple

import gradio as gr
import numpy as np
from PIL import Image

from sampling import editing
from webapp import backend
from webapp.backend import DemoModel

MODEL_GROUP = 'model'  # the concurrency id of every event that runs the model
# small models (the offline demo's 32 px) are shown enlarged with hard pixel edges instead of a blur
CSS = '''
.pixelated img { image-rendering: pixelated; }
#edit_strip button, #edit_strip .image-frame { width: 100%; }
#edit_strip img { width: 100% !important; height: auto !important; max-height: none !important;
                 object-fit: contain !important; }
'''  # the strip of a small model spans the page
# the defaults of the README's sample.py example and of the official editing notebook
GENERATE_DEFAULTS = dict(cfg=4.0, top_k=900, top_p=0.95, more_smooth=False)
# Gradio's cache of this page's uploads and outputs: every 10 minutes, files older than an hour are deleted, and all of
# them when the server stops (app.py also gives each server a cache folder of its own)
DELETE_CACHE = (600, 3600)


def _user_errors(fn: Callable) -> Callable:
    """Run an event handler; a ValueError (the backend's user mistakes) becomes gr.Error with its message, anything
    else gr.Error naming it, with the traceback on the server's console only. The server stays up either way."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:
            traceback.print_exc()
            raise gr.Error(f'{type(e).__name__}: {e}', print_exception=False) from None
    return wrapper


def _refuse_unreadable_uploads(editor: gr.ImageEditor) -> gr.ImageEditor:
    """Make an upload that is not a readable image fail with a sentence (Gradio's own message quotes its internal data
    model). Wraps this one component's preprocess: a subclass would make Gradio write a .pyi stub beside this file."""
    preprocess = editor.preprocess

    def checked(payload):
        try:
            for part in [getattr(payload, 'background', None), *(getattr(payload, 'layers', None) or [])]:
                if getattr(part, 'path', None):  # the size from the header, before a pixel is decoded
                    backend.check_upload_header(part.path)
            return preprocess(payload)
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Image.UnidentifiedImageError:
            raise gr.Error('the upload is not an image (PNG, JPEG, WebP, ...)', print_exception=False) from None
        except Image.DecompressionBombError as e:
            raise gr.Error(f'the upload is too large: {e}', print_exception=False) from None
        except (OSError, ValueError) as e:  # truncated or otherwise broken
            raise gr.Error(f'the upload cannot be read as an image ({type(e).__name__}: {e})',
                           print_exception=False) from None
    editor.preprocess = checked
    return editor


def _scale_progress(progress: gr.Progress, num_scales: int, what: str) -> backend.ScaleHook:
    def hook(si: int, f_hat_BChw: Any) -> None:
        progress((si + 1, num_scales), desc=f'{what}: scale {si + 1} of {num_scales}', unit='scales')
    return hook


class OutputFiles:
    """Every image the page shows becomes its own file in Gradio's cache. Gradio names a file by the hash of its
    bytes and writes it again when the same bytes come back (the same seed twice, the scale strip's last image, which
    is a gallery image): a browser still downloading the first copy then gets a file that changes under it, which the
    server's HTTP layer reports as h11's 'Too much data for declared Content-Length'. A running number in a PNG text
    chunk makes the bytes of each output differ; the pixels are untouched."""

    def __init__(self):
        self._count = itertools.count()

    def __call__(self, img_HW3: np.ndarray) -> Image.Image:
        img = Image.fromarray(img_HW3)
        img.info['Comment'] = f'VAR web demo output {next(self._count)}'
        return img


def _sampling_controls(defaults: dict, vocabulary: int) -> Tuple[gr.Number, gr.Slider, gr.Slider, gr.Slider,
                                                                 gr.Checkbox]:
    with gr.Row():
        cfg = gr.Slider(0, 10, value=defaults['cfg'], step=0.5, label='CFG (classifier-free guidance)')
        top_k = gr.Slider(0, vocabulary, value=min(defaults['top_k'], vocabulary), step=1,
                          label=f'top-k (0 = all {vocabulary} tokens)')
        top_p = gr.Slider(0, 1, value=defaults['top_p'], step=0.01, label='top-p (0 = off)')
        more_smooth = gr.Checkbox(value=defaults['more_smooth'], label='more_smooth (Gumbel soft codes)')
    return cfg, top_k, top_p, more_smooth


def build(model: DemoModel) -> gr.Blocks:
    """The page for one loaded model."""
    names = model.choices
    var = model.var
    num_scales = len(var.patch_nums)
    sides = ' → '.join(f'{pn}x{pn}' for pn in var.patch_nums)
    output = OutputFiles()

    @_user_errors
    def run_generate(cls, num_images, seed, cfg, top_k, top_p, more_smooth, progress=gr.Progress()):
        imgs = backend.generate(model, cls, num_images, seed, cfg, top_k, top_p, more_smooth,
                                on_scale=_scale_progress(progress, num_scales, 'sampling'))
        c = backend.parse_class(cls, var.num_classes)
        info = (f'class {names[c]}, seed {int(seed)}: `python sample.py {model.source} --classes '
                f'{",".join([str(c)] * len(imgs))} --seed {int(seed)} --cfg {cfg:g} --top_k {int(top_k)} '
                f'--top_p {top_p:g} --more_smooth {int(more_smooth)} --out grid.png` draws the same images')
        return [(output(img), f'image {k}') for k, img in enumerate(imgs)], info

    @_user_errors
    def run_scales(cls, num_images, index, seed, cfg, top_k, top_p, more_smooth, progress=gr.Progress()):
        imgs = backend.scales(model, cls, num_images, index, seed, cfg, top_k, top_p, more_smooth,
                              on_scale=_scale_progress(progress, num_scales, 'decoding every scale'))
        return [(output(img), f'{pn}x{pn}') for pn, img in zip(var.patch_nums, imgs)]

    @_user_errors
    def run_edit(editor, box, mode, cls, num_samples, seed, cfg, top_k, top_p, more_smooth, progress=gr.Progress()):
        progress(None, desc=f'{mode}: sampling {int(num_samples)} variation(s)')
        photo, region = backend.editor_region(editor)
        c = backend.parse_class(cls, var.num_classes, allow_none=True)
        if mode == 'class-edit' and c is None:
            raise gr.Error('class-edit needs a target class: pick one in "class"', print_exception=False)
        result = backend.edit(model, photo, region, backend.parse_box(box), mode, c, num_samples, seed, cfg, top_k,
                              top_p, more_smooth)
        variations, strip = backend.edit_images(result)
        kept = int(result.keep_mask_hw.gt(0.5).sum())
        pn = var.patch_nums[-1]
        info = (f'{mode}: kept {kept} of {pn * pn} tokens of the last scale '
                f'({"the brush stroke" if region is not None else "the box"}); variation i uses seed {int(seed)} + i')
        return ([(output(img), f'variation {i}') for i, img in enumerate(variations)], output(strip), info,
                output(backend.reconstruction(model, photo)))

    def as_editor_value(photo):
        return {'background': photo, 'layers': [], 'composite': photo}

    @_user_errors
    def load_example(name):
        photo = backend.example_photo(name)
        return as_editor_value(photo), output(backend.reconstruction(model, Image.fromarray(photo)))

    @_user_errors
    def load_upload(path):
        if not path:
            raise gr.Error('no file came with the upload', print_exception=False)
        photo = backend.read_upload(path)
        return as_editor_value(photo), output(backend.reconstruction(model, Image.fromarray(photo)))

    def new_seed() -> int:
        return random.randrange(2 ** 31)

    def pick_image(evt: gr.SelectData) -> int:
        return evt.index

    with gr.Blocks(title='VAR: next-scale prediction', delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(f'## VAR: visual autoregressive modeling (next-scale prediction)\n'
                    f'Model: {model.source or "loaded"} · {var.num_classes} classes · {model.image_size} px · '
                    f'scales {sides} · on {model.device.type.upper()}')
        with gr.Tab('Generate', id='generate'):
            with gr.Row():
                cls = gr.Dropdown(names, value=names[min(len(names) - 1, 980 if len(names) == 1000 else 0)],
                                  label='class', allow_custom_value=True, scale=3,
                                  info='type to search; an id works too')
                num_images = gr.Slider(1, backend.MAX_IMAGES, value=4, step=1, label='images', scale=1)
                # precision None: a fraction reaches the backend, which refuses it instead of rounding it silently
                seed = gr.Number(0, precision=None, minimum=0, label='seed', scale=1)
                random_seed = gr.Button('random seed', scale=0, min_width=120)
            cfg, top_k, top_p, more_smooth = _sampling_controls(GENERATE_DEFAULTS, model.vocabulary)
            generate_btn = gr.Button('Generate', variant='primary')
            gallery = gr.Gallery(label='samples', columns=4, height='auto', object_fit='contain',
                                 elem_id='samples', elem_classes='pixelated', format='png')
            info = gr.Markdown(elem_id='generate_info')
            gr.Markdown('### Next-scale view\nOne image decoded after every scale: from one token to the full token '
                        'map. Click an image above, or choose its number.')
            with gr.Row():
                index = gr.Number(0, precision=None, minimum=0, maximum=backend.MAX_IMAGES - 1, label='image',
                                  scale=0, min_width=120)
                scales_btn = gr.Button('Show the scales', scale=0, min_width=160)
            strip = gr.Gallery(label='coarse to fine', columns=num_scales, rows=1, height='auto',
                               object_fit='contain', elem_id='scales', elem_classes='pixelated', format='png')

        with gr.Tab('Edit', id='edit'):
            gr.Markdown(model.domain_note(), elem_id='domain_note')
            with gr.Row():
                with gr.Column(scale=3):
                    brush = gr.Brush(default_size=32, colors=['#ff00ff'], color_mode='fixed')
                    # uploads go through `photo_file` (checked on the server, with a message); the editor itself
                    # takes a pasted image only: a file it cannot decode would fail silently in the browser
                    editor = _refuse_unreadable_uploads(gr.ImageEditor(
                        label='photo: paint over the region with the brush', type='numpy', sources=('clipboard',),
                        transforms=(), layers=False, brush=brush, eraser=gr.Eraser(default_size=32),
                        elem_id='editor', height=460))
                with gr.Column(scale=2):
                    photo_file = gr.File(label='upload a photo', file_types=['image'], file_count='single',
                                         elem_id='photo_file', height=90)
                    example = gr.Dropdown(list(backend.EXAMPLE_PHOTOS), value=None, label='or an example photo',
                                          info="scikit-image's bundled photos")
                    mode = gr.Radio(list(editing.MODES), value='inpaint', label='mode',
                                    info='inpaint: regenerate the painted region; outpaint: keep it, regenerate '
                                         'around it; class-edit: regenerate it as the class')
                    edit_cls = gr.Dropdown([backend.UNCONDITIONAL] + names, value=backend.UNCONDITIONAL,
                                           label='class', allow_custom_value=True)
                    box = gr.Textbox(label='or a box y0,x0,y1,x1 (used when nothing is painted)',
                                     placeholder='0.1,0.1,0.8,0.8')
                    with gr.Row():
                        num_samples = gr.Slider(1, backend.MAX_VARIATIONS, value=3, step=1, label='variations')
                        edit_seed = gr.Number(editing.EDIT_SETTINGS.seed, precision=None, minimum=0, label='seed')
                    edit_btn = gr.Button('Edit', variant='primary')
            e = editing.EDIT_SETTINGS
            edit_defaults = dict(cfg=e.cfg, top_k=e.top_k, top_p=e.top_p, more_smooth=e.more_smooth)
            with gr.Accordion('sampling settings', open=False):
                e_cfg, e_top_k, e_top_p, e_smooth = _sampling_controls(edit_defaults, model.vocabulary)
            with gr.Row():
                recon = gr.Image(label="the tokenizer's reconstruction: the closest an edit can come to the photo",
                                 elem_id='reconstruction', elem_classes='pixelated', format='png', interactive=False,
                                 scale=1)
                edits = gr.Gallery(label='edits', columns=4, height='auto', object_fit='contain', elem_id='edits',
                                   elem_classes='pixelated', format='png', scale=3)
            edit_strip = gr.Image(label='input | mask (white = generated) | edits', elem_id='edit_strip',
                                  elem_classes='pixelated', format='png', interactive=False)
            edit_info = gr.Markdown(elem_id='edit_info')

        work = dict(concurrency_id=MODEL_GROUP, concurrency_limit=1)
        quick = dict(api_visibility='private', queue=False)
        sampling_inputs = [seed, cfg, top_k, top_p, more_smooth]
        # a run's outputs are cleared when it starts, so that after an error nothing of the previous run stays on
        # screen as if it were this one's; the scale strip goes whenever the images it came from change
        for trigger in (generate_btn, random_seed):
            trigger.click(lambda: ('', None), None, [info, strip], **quick)
        gallery.change(lambda: None, None, strip, **quick)
        generate_btn.click(run_generate, [cls, num_images] + sampling_inputs, [gallery, info], api_name='generate',
                           **work)
        random_seed.click(new_seed, None, seed, api_name='random_seed', queue=False).then(
            run_generate, [cls, num_images] + sampling_inputs, [gallery, info], api_visibility='private', **work)
        scales_btn.click(run_scales, [cls, num_images, index] + sampling_inputs, strip, api_name='scales', **work)
        gallery.select(pick_image, None, index, **quick).then(
            run_scales, [cls, num_images, index] + sampling_inputs, strip, api_visibility='private', **work)
        example.input(load_example, example, [editor, recon], api_name='example_photo')
        photo_file.upload(load_upload, photo_file, [editor, recon], api_name='upload_photo', **work)
        edit_btn.click(lambda: ('', None), None, [edit_info, edit_strip], **quick)
        edit_btn.click(run_edit, [editor, box, mode, edit_cls, num_samples, edit_seed, e_cfg, e_top_k, e_top_p,
                                  e_smooth], [edits, edit_strip, edit_info, recon], api_name='edit', **work)
    return demo


def launch_kwargs(host: str, port: int, share: bool) -> dict:
    """What `Blocks.launch` gets besides the page (Gradio 6 takes the stylesheet there)."""
    return dict(server_name=host, server_port=port, share=share, css=CSS, show_error=True, quiet=True,
                max_file_size='50mb', prevent_thread_lock=True)


def run_app(demo: gr.Blocks, host: str, port: int, share: bool, max_queue: int,
            on_ready: Optional[Callable[[str], None]] = None) -> None:
    """Queue (at most `max_queue` waiting requests), serve, call `on_ready(url)`, and block until interrupted."""
    demo.queue(max_size=max_queue)
    _, local_url, share_url = demo.launch(**launch_kwargs(host, port, share))
    if on_ready is not None:
        on_ready(share_url or local_url)
    try:
        demo.block_thread()
    finally:
        demo.close()

