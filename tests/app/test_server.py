"""The web demo as users meet it: `python app.py --ckpt tiny.pth` started as a real server on a free port, driven by
gradio_client (every event by its api_name, the editor's mask dict, bad input answered with a message) and by a real
browser (Playwright driving Debian's chromium: pick a class, generate, paint a brush stroke, in-paint).

One server serves the whole module. Screenshots of both tabs land in the test's tmp folder; with
VAR_APP_SCREENSHOTS=DIR they are also copied there. The README's come from the offline demo's model and one of its
validation images, enlarged 8x (the photo to upload: VAR_APP_TEST_PHOTO):
    VAR_APP_SCREENSHOTS=docs/img VAR_APP_TEST_CKPT=demo_output/var/ar-ckpt-last.pth VAR_APP_TEST_PHOTO=boot.png \
        pytest tests/app/test_server.py -k browser
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import ROOT
from train_support import cpu_env, free_port, kill_tree

pytestmark = pytest.mark.slow
CHROMIUM = '/usr/bin/chromium'
GEN = dict(seed=3, cfg=2.0, top_k=20, top_p=0.9, more_smooth=False)
EDIT = dict(mode='inpaint', cls='none (unconditional)', num_samples=2, seed=0, cfg=3.0, top_k=50, top_p=0.95,
            more_smooth=True)


@pytest.fixture(scope='module')
def server(tiny_ckpt, tmp_path_factory):
    """(url, image side) of `python app.py` serving the tiny checkpoint (or VAR_APP_TEST_CKPT) on 127.0.0.1."""
    ckpt = os.environ.get('VAR_APP_TEST_CKPT', tiny_ckpt)
    log_path = tmp_path_factory.mktemp('app') / 'server.log'
    port = free_port()
    with open(log_path, 'w') as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / 'app.py'), '--ckpt', ckpt, '--port', str(port),
                                 '--device', 'cpu'], cwd=ROOT, env=cpu_env(threads=2), stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while 'running on http://127.0.0.1' not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()
            time.sleep(0.2)
        log = log_path.read_text()
        side = int(log.split(' px, ')[0].rsplit(' ', 1)[1])  # 'model: ... (10 classes, 64 px, cpu)'
        cache = Path(log.split('uploads and outputs: ', 1)[1].split(' (deleted', 1)[0])
        assert cache.is_dir()
        yield f'http://127.0.0.1:{port}/', side, proc.pid
        # as a service manager stops it (app.py handles SIGTERM as Ctrl-C; a SIGINT may be ignored by a process
        # that a non-interactive shell started in the background): it deletes its uploads and outputs
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait(timeout=30)
    log = log_path.read_text()
    errors = server_errors(log)
    assert not errors, '\n\n'.join(errors)  # every bad input was answered by the app's handlers, cleanly
    assert 'stopped' in log and not cache.exists(), 'the server left its uploads and outputs behind'



def server_errors(log: str) -> list:
    """The tracebacks in a server log that pass through this project's code. Those of the web stack alone (uvicorn,
    starlette, h11, gradio's file serving) are transport noise of a loaded machine or a closing browser -- a client
    that went away mid-upload, a file response cut short -- and leave the app's handlers untouched."""
    own = f'File "{ROOT}{os.sep}'
    venv = f'File "{ROOT}{os.sep}.venv{os.sep}'
    return [block for block in log.split('Traceback (most recent call last):')[1:]
            if any(own in line and venv not in line for line in block.splitlines())]


def test_server_errors_are_the_tracebacks_through_the_apps_code():
    def frame(path):
        return f'\n  File "{path}", line 1, in f\n    f()\n'
    web = frame(ROOT / '.venv' / 'lib' / 'starlette' / 'requests.py') + frame('/usr/lib/python3/h11/_writers.py')
    log = ('running\nERROR:    Exception in ASGI application\nTraceback (most recent call last):' + web +
           'starlette.requests.ClientDisconnect\nINFO: next request\nTraceback (most recent call last):' + web +
           frame(ROOT / 'webapp' / 'backend.py') + 'ValueError: a real failure\n')
    errors = server_errors(log)
    assert len(errors) == 1 and 'ValueError: a real failure' in errors[0]
    assert server_errors('model: ... running on http://127.0.0.1:1/\n') == []


@pytest.fixture(scope='module')
def client(server):
    from gradio_client import Client
    return Client(server[0], verbose=False)


def _png(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def _editor(tmp_path: Path, painted=None, size=(96, 128)):
    """The image editor's value as a client sends it: photo, one RGBA brush layer, composite."""
    from gradio_client import handle_file
    h, w = size
    photo = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    layer = np.zeros((h, w, 4), np.uint8)
    if painted is not None:
        layer[painted] = (255, 0, 255, 255)
    bg = handle_file(_png(tmp_path / 'photo.png', photo))
    return {'background': bg, 'layers': [handle_file(_png(tmp_path / 'layer.png', layer))], 'composite': bg}


def _error(client, *args, api_name):
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError) as e:
        client.predict(*args, api_name=api_name)
    return str(e.value)


def test_generate_scales_and_edit_through_the_api(client, server, tmp_path):
    side = server[1]
    gallery, info = client.predict('1', 2, *GEN.values(), api_name='/generate')
    imgs = [np.asarray(Image.open(item['image'])) for item in gallery]
    assert [im.shape for im in imgs] == [(side, side, 3)] * 2 and '--seed 3' in info
    strip = client.predict('1', 2, 1, *GEN.values(), api_name='/scales')
    assert len(strip) >= 2 and strip[0]['caption'] == '1x1'
    np.testing.assert_array_equal(np.asarray(Image.open(strip[-1]['image'])), imgs[1])  # the strip ends in the image

    edits, strip_path, info, recon = client.predict(_editor(tmp_path, painted=(slice(0, 48), slice(None))), '',
                                                    *EDIT.values(), api_name='/edit')
    assert [Image.open(e['image']).size for e in edits] == [(side, side)] * 2 and 'brush stroke' in info
    assert Image.open(strip_path).size == (4 * side + 3 * 4, side)  # input | mask | 2 edits
    assert Image.open(recon).size == (side, side)  # the tokenizer's reconstruction of the photo
    edits, _, info, _ = client.predict(_editor(tmp_path), '0.1,0.1,0.6,0.6', *EDIT.values(), api_name='/edit')
    assert len(edits) == 2 and 'the box' in info
    photo, recon = client.predict('coffee', api_name='/example_photo')
    assert Image.open(photo['background']).size == (600, 400) and Image.open(recon).size == (side, side)
    from gradio_client import handle_file
    photo, _ = client.predict(handle_file(_png(tmp_path / 'up.png', np.full((40, 50, 3), 90, np.uint8))),
                              api_name='/upload_photo')
    assert Image.open(photo['background']).size == (50, 40)


def test_bad_input_gets_a_message(client, tmp_path):
    assert 'out of range' in _error(client, '12', 1, *GEN.values(), api_name='/generate')
    for cls in ('inf', '1e400', '3.7'):  # not truncated, no OverflowError
        assert 'expected a class id (a whole number)' in _error(client, cls, 1, *GEN.values(), api_name='/generate')
    assert 'seed must be a whole number, got 2.5' in _error(client, '1', 1, *dict(GEN, seed=2.5).values(),
                                                            api_name='/generate')
    # the top-k slider ends at the model's vocabulary (64 codes here)
    assert 'greater than maximum value 64' in _error(client, '1', 1, *dict(GEN, top_k=65).values(),
                                                     api_name='/generate')
    from gradio_client import handle_file
    (tmp_path / 'notes.png').write_text('not an image')
    assert 'notes.png is not an image' in _error(client, handle_file(str(tmp_path / 'notes.png')),
                                                 api_name='/upload_photo')
    assert 'no region' in _error(client, _editor(tmp_path), '', *EDIT.values(), api_name='/edit')
    everything = _editor(tmp_path, painted=(slice(None), slice(None)))
    assert 'covers the whole image' in _error(client, everything, '', *EDIT.values(), api_name='/edit')
    not_an_image = _editor(tmp_path)
    not_an_image['background'] = handle_file(str(tmp_path / 'notes.png'))
    assert 'not an image' in _error(client, not_an_image, '', *EDIT.values(), api_name='/edit')
    class_edit = dict(EDIT, mode='class-edit')
    assert 'needs a target class' in _error(client, _editor(tmp_path), '0.1,0.1,0.6,0.6', *class_edit.values(),
                                            api_name='/edit')
    gallery, _ = client.predict('1', 1, *GEN.values(), api_name='/generate')  # still serving
    assert len(gallery) == 1


def rss_mib(pid: int) -> float:
    """The resident memory of a process (Linux: /proc), MiB."""
    with open(f'/proc/{pid}/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmRSS:')) / 1024


def test_a_huge_upload_is_refused_from_its_header(client, server, tmp_path):
    """A 12000x12000 PNG (small on disk, 412 MiB as RGB pixels) is refused from its header, before a pixel is
    decoded, by the upload and by the editor's API path; the server's memory stays flat over ten of them."""
    from gradio_client import handle_file
    big = tmp_path / 'huge.png'
    Image.new('1', (12000, 12000)).save(big)
    rss_before = rss_mib(server[2])
    for _ in range(5):
        assert '12000x12000 pixels, more than this demo takes' in _error(client, handle_file(str(big)),
                                                                         api_name='/upload_photo')
        editor = dict(_editor(tmp_path), background=handle_file(str(big)), composite=handle_file(str(big)))
        assert '12000x12000 pixels' in _error(client, editor, '', *EDIT.values(), api_name='/edit')
    growth = rss_mib(server[2]) - rss_before
    assert growth < 100, f'the server grew by {growth:.0f} MiB over ten huge uploads (one decode: 412 MiB)'


def test_eight_clients_at_once_and_a_full_queue(server):
    """Eight clients send five generations (of two images) each at the same moment: 40 jobs for one model and a queue
    of 16. Every job ends with its images or with the queue's 'Queue is full' (some do), the server's memory stays
    within a bound, and no traceback passes through the app's code (the server fixture reads its log)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client
    start = threading.Barrier(8)

    def one_client(k: int) -> list:
        c = Client(server[0], verbose=False)
        start.wait(timeout=60)  # every client is connected: the 40 jobs come at once
        jobs = [c.submit(str(k % 3), 2, *dict(GEN, seed=5 * k + j).values(), api_name='/generate') for j in range(5)]
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(len(job.result(timeout=300)[0]))
            except Exception as e:  # the queue's refusal arrives as the job's error
                outcomes.append(str(e))
        return outcomes
    rss_before = rss_mib(server[2])
    with ThreadPoolExecutor(8) as pool:
        outcomes = [o for client_outcomes in pool.map(one_client, range(8)) for o in client_outcomes]
    refused = [o for o in outcomes if o != 2]
    assert len(refused) < len(outcomes) and refused, outcomes
    assert all('Queue is full' in o for o in refused), refused
    growth = rss_mib(server[2]) - rss_before
    assert growth < 300, f'the server grew by {growth:.0f} MiB over 40 jobs'


def _browser():
    sync_api = pytest.importorskip('playwright.sync_api', reason='the browser test needs the playwright package')
    if not os.path.exists(CHROMIUM):
        pytest.skip(f'the browser test drives Debian\'s chromium ({CHROMIUM} is missing: apt-get install chromium)')
    return sync_api


def _screenshot(page, name: str) -> None:
    """A full-page screenshot into $VAR_APP_SCREENSHOTS when set (to look at); none otherwise (each costs ~1 s)."""
    folder = os.environ.get('VAR_APP_SCREENSHOTS')
    if folder:
        os.makedirs(folder, exist_ok=True)
        page.screenshot(path=Path(folder) / name, full_page=True)


def _paint_and_edit(page) -> bool:
    """In the Edit tab: a photo, one brush stroke, Edit -> True when the three edits came back."""
    page.get_by_role('tab', name='Edit').click()
    if os.environ.get('VAR_APP_TEST_PHOTO'):
        page.locator('#photo_file input[type=file]').set_input_files(os.environ['VAR_APP_TEST_PHOTO'])
    else:
        page.get_by_label('example photo').click()
        page.get_by_role('option', name='chelsea').click()
    page.wait_for_selector('#editor button[aria-label="Brush"].highlight')  # a photo is in: the brush is on
    box = page.locator('#editor canvas').first.bounding_box()
    left, top = box['x'] + box['width'] * 0.3, box['y'] + box['height'] * 0.25
    page.mouse.move(left, top)
    page.mouse.down()  # one thick zig-zag stroke over a band of the canvas (each move redraws it: few moves)
    for i in range(4):
        page.mouse.move(left + box['width'] * (0.4 if i % 2 == 0 else 0), top + box['height'] * 0.06 * i)
    page.mouse.up()
    page.get_by_role('button', name='Edit', exact=True).click()
    page.wait_for_function("document.querySelectorAll('#edits img').length == 3"
                           " || document.querySelector('#edits').innerText.includes('Error')")
    return page.locator('#edits img').count() == 3


def test_in_a_browser(server, tmp_path):
    sync_api = _browser()
    with sync_api.sync_playwright() as p:
        # --disable-gpu: the editor's canvas then draws in software at once (chromium's emulated GL is far slower)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox', '--disable-gpu'])
        try:
            page = browser.new_page(viewport={'width': 1200, 'height': 900})
            page.set_default_timeout(60_000)
            page.goto(server[0])
            # Generate: pick a class by its name in the list, generate, watch the scales
            page.get_by_label('class', exact=True).first.click()
            options = page.get_by_role('option')
            options.nth(min(7, options.count() - 1)).click()
            page.get_by_role('button', name='Generate', exact=True).click()
            page.wait_for_function("document.querySelectorAll('#samples img').length == 4")
            page.get_by_role('button', name='Show the scales').click()
            page.wait_for_function("document.querySelectorAll('#scales img').length >= 2")
            assert 'seed 0' in page.locator('#generate_info').inner_text()
            _screenshot(page, 'app_generate.png')
            # new images (a random seed): the strip of the old ones goes at once, and comes back for the new ones
            page.get_by_role('button', name='random seed').click()
            page.wait_for_function("document.querySelectorAll('#scales img').length == 0")
            page.wait_for_function("!document.querySelector('#generate_info').innerText.includes('seed 0')"
                                   " && document.querySelector('#generate_info').innerText.includes('seed ')")
            page.locator('#samples img').nth(2).click()
            page.wait_for_function("document.querySelectorAll('#scales img').length >= 2")
            page.keyboard.press('Escape')  # the gallery's preview of image 2
            _screenshot(page, 'app_scales_redrawn.png')

            # a file that is not an image, uploaded as a photo: a message in the page
            page.get_by_role('tab', name='Edit').click()
            (tmp_path / 'notes.png').write_text('not an image')
            page.locator('#photo_file input[type=file]').set_input_files(str(tmp_path / 'notes.png'))
            page.get_by_text('notes.png is not an image').first.wait_for()
            _screenshot(page, 'app_bad_upload.png')

            # Edit: an example photo (or an upload), a brush stroke across its upper half, in-painting. On a loaded
            # machine the canvas can miss a stroke (the edit then answers 'Error'): the page is loaded again
            for attempt in range(3):
                if attempt:
                    page.reload()
                if _paint_and_edit(page):
                    break
            assert 'brush stroke' in page.locator('#edit_info').inner_text()
            _screenshot(page, 'app_edit.png')
        except Exception:
            page.screenshot(path=tmp_path / 'failure.png', full_page=True)
            raise
        finally:
            browser.close()
