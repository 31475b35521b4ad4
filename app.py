# A local web demo of VAR (arXiv 2404.02905): class-conditional sampling (section 3.2), the image after every scale,
# and zero-shot editing (section 5), over the same code as sample.py and edit.py.
"""Serve a local web page: generate images by class, watch the scales appear, edit a photo with a brush.

    python app.py                      # the offline demo's model (demo_output/, after `make demo`), else d16
    python app.py --depth 16           # released weights from the Hub (or its cache: --local_files_only)
    python app.py --ckpt local_output/ar-ckpt-best.pth --port 7861

Serves on http://127.0.0.1:7860 by default (--host 0.0.0.0 to listen on every interface; --share asks Gradio for a
public link, off by default). Models: the flags of sample.py; with none, the checkpoint `make demo` trained (read
with its tokenizer) when demo_output/ holds one, else the released d16. Runs on the GPU when there is one (fp16
autocast by default, --fp16), else on the CPU. Seeds give the same images as sample.py with the same settings.
"""
import argparse
import importlib.util
import os
import signal
import sys
from typing import List, Optional, Tuple

from sampling.cli import run_script
from sampling.model_flags import add_model_flags, check_model_flags, load_models_from_args, model_device
from utils.runtime import ConfigError

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DEPTH = 16  # without any model flag and without the offline demo's model


def demo_model_paths(demo_dir: str) -> Tuple[str, str]:
    """(VAR checkpoint, tokenizer checkpoint) where `make demo` (demo/run_demo.py) writes them under `demo_dir`."""
    return (os.path.join(demo_dir, 'var', 'ar-ckpt-last.pth'),
            os.path.join(demo_dir, 'tokenizer', 'vae-ckpt-last.pth'))


def choose_default_model(args: argparse.Namespace) -> Optional[str]:
    """With no model flag: the offline demo's checkpoint (with the tokenizer it was trained on, in case the checkpoint
    holds none) when `--demo_dir` has one, else --depth 16. Returns the hint for a model that then fails to load."""
    if args.ckpt or args.var_ckpt or args.depth is not None:
        if args.depth is None:
            args.depth = DEFAULT_DEPTH
        return None
    var_ckpt, vae_ckpt = demo_model_paths(args.demo_dir)
    if os.path.isfile(var_ckpt):
        args.ckpt = var_ckpt
        if args.vae_ckpt is None and os.path.isfile(vae_ckpt):
            args.vae_ckpt = vae_ckpt
        return f'the offline demo\'s checkpoint in {args.demo_dir} did not load; run `make demo` again'
    args.depth = DEFAULT_DEPTH
    return (f'no model given and none in {args.demo_dir}: run `make demo` for an offline model (then `make app`), '
            'or pass --ckpt PATH, or --depth 16 with --vae_ckpt/--var_ckpt local files or a network')


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--host', default='127.0.0.1', help='interface to listen on (default: %(default)s)')
    p.add_argument('--port', type=int, default=7860, help='port to listen on (default: %(default)s)')
    p.add_argument('--share', action='store_true', help="also ask Gradio for a public share link (off by default)")
    p.add_argument('--max_queue', type=int, default=16,
                   help='requests that may wait for the model; more are refused (default: %(default)s)')
    p.add_argument('--demo_dir', default=os.path.join(ROOT, 'demo_output'),
                   help='where `make demo` wrote its model, used without a model flag (default: %(default)s)')
    add_model_flags(p, default_depth=None)  # None: no model flag given (see choose_default_model)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Checks that need no model; they fail before any download. Raises ConfigError."""
    if not 0 <= args.port <= 65535:
        raise ConfigError(f'--port must lie in 0..65535, got {args.port}')
    if args.max_queue < 1:
        raise ConfigError(f'--max_queue must be at least 1, got {args.max_queue}')
    check_model_flags(args)


def run(args: argparse.Namespace) -> int:
    hint = choose_default_model(args)
    check_args(args)
    if importlib.util.find_spec('gradio') is None:  # before a model is loaded (or downloaded) in vain
        raise ConfigError('the web demo needs gradio: pip install -r requirements.txt')
    device = model_device(args)
    try:
        vae, var = load_models_from_args(args, device)
    except ConfigError as e:
        raise ConfigError(f'{e}\n{hint}' if hint else str(e)) from e
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # no calls home from a local demo
    from sampling.class_names import class_names_for
    from webapp.cache import server_cache_dir
    source = f'--ckpt {args.ckpt}' if args.ckpt else f'--depth {args.depth}'
    if args.vae_ckpt:
        source += f' --vae_ckpt {args.vae_ckpt}'
    names = class_names_for(var.num_classes, args.ckpt, args.cache_dir, args.local_files_only)
    print(f'model: {source} ({var.num_classes} classes, {vae.image_size} px, {device})', flush=True)
    with server_cache_dir() as cache:  # before gradio is imported: it reads the folder then
        from webapp import backend, ui
        model = backend.DemoModel(vae, var, names, fp16=args.fp16, source=source)
        print(f'uploads and outputs: {cache} (deleted when the server stops)', flush=True)
        signal.signal(signal.SIGTERM, _interrupt)  # `kill`, a service manager: stop as on Ctrl-C, cleaning up
        try:
            ui.run_app(ui.build(model), args.host, args.port, args.share, args.max_queue,
                       on_ready=lambda url: print(f'VAR web demo running on {url}  (Ctrl-C stops it)', flush=True))
        except OSError as e:  # the port is taken, or the host is not an interface of this machine
            raise ConfigError(f'cannot serve on {args.host}:{args.port}: {e}') from e
        except KeyboardInterrupt:  # Gradio catches the first one while it serves; a second one lands here
            pass
    print('stopped', flush=True)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    return run_script(get_parser(), run, argv)


if __name__ == '__main__':
    sys.exit(main())
