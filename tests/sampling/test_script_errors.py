"""The four scripts of this area (sample.py, edit.py, evaluate.py, pretokenize.py) have one entry point,
`main(argv=None) -> int`, and report a user's mistake one way: a message on stderr and exit code 2, no traceback."""
import contextlib
import io

import pytest

import edit
import evaluate
import pretokenize
import sample


def _run(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def _bad_paths(tmp_path):
    missing = tmp_path / 'missing'
    return {
        'sample': (sample.main, ['--ckpt', f'{missing}.pth', '--classes', '1', '--out', tmp_path / 'g.png'],
                   f'--ckpt {missing}.pth does not exist'),
        'edit': (edit.main, ['--image', f'{missing}.png', '--out_dir', tmp_path / 'edits'],
                 f'--image {missing}.png: no such file'),
        'evaluate': (evaluate.main, ['--samples', f'{missing}.npz', '--ref', f'{missing}_ref.npz', '--device', 'cpu'],
                     f'{missing}_ref.npz does not exist'),
        'pretokenize': (pretokenize.main, ['--data_path', missing, '--out', tmp_path / 'tok', '--vae_ckpt',
                                           f'{missing}.pth', '--device', 'cpu', '--workers', '0'], f'{missing}.pth'),
    }


@pytest.mark.parametrize('script', ['sample', 'edit', 'evaluate', 'pretokenize'])
def test_a_bad_path_is_a_message_and_exit_code_2(script, tmp_path):
    main, argv, message = _bad_paths(tmp_path)[script]
    code, err = _run(main, argv)
    assert code == 2, err
    assert err.startswith('error: ') and message in err, err
    assert 'Traceback' not in err and err.count('\n') == 1, err  # one line, the message alone
    assert not (tmp_path / 'g.png').exists() and not (tmp_path / 'edits').exists()


@pytest.mark.parametrize('main, argv', [
    (sample.main, ['--out', 'g.png', '--fp16', '3']),
    (edit.main, ['--image', 'x.png', '--mode', 'erase']),
    (evaluate.main, ['--samples', 'a.npz', '--ref', 'b.npz', '--batch_size', 'many']),
    (pretokenize.main, ['--data_path', 'd', '--out', 'o', '--tf32', 'maybe']),
])
def test_a_bad_flag_value_is_exit_code_2(main, argv):
    code, err = _run(main, argv)
    assert code == 2 and 'Traceback' not in err and 'error: argument' in err, err


@pytest.mark.parametrize('main', [sample.main, edit.main, evaluate.main, pretokenize.main])
def test_help_exits_with_0(main):
    code, _ = _run(main, ['--help'])
    assert code == 0
