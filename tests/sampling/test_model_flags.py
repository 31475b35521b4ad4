"""The model-loading flags shared by sample.py and edit.py (sampling/model_flags.py): one definition, the same defaults
and help in both scripts, checks before any download, and loading errors that name the file."""
import argparse

import pytest
import torch

import edit
import models
import sample
from sampling import model_flags
from utils.runtime import ConfigError

MODEL_FLAGS = ('--depth', '--vae_ckpt', '--var_ckpt', '--ckpt', '--cache_dir', '--local_files_only', '--device',
               '--fp16', '--tf32')


def _actions(parser: argparse.ArgumentParser, group: str = 'model'):
    """{option: (dest, default, type, choices, help, nargs)} of one argument group."""
    (g,) = [g for g in parser._action_groups if g.title == group]
    return {a.option_strings[0]: (a.dest, a.default, a.type, a.choices, a.help, a.nargs) for a in g._group_actions}


@pytest.mark.parametrize('script, depth', [(sample, 16), (edit, 36)])
def test_scripts_take_the_model_flags_from_one_function(script, depth):
    """Every script that loads a model has exactly the flags of add_model_flags, with its defaults and help; only the
    default --depth is the script's own (16 for sampling, 36 = 512 px for editing, as before)."""
    reference = argparse.ArgumentParser()
    model_flags.add_model_flags(reference, default_depth=depth)
    assert _actions(script.get_parser()) == _actions(reference)
    assert tuple(_actions(reference)) == MODEL_FLAGS


def test_sample_and_edit_share_every_default_but_the_depth():
    defaults = [{k: v[1] for k, v in _actions(s.get_parser()).items()} for s in (sample, edit)]
    assert defaults[0].pop('--depth') == 16 and defaults[1].pop('--depth') == 36
    assert defaults[0] == defaults[1] == {'--vae_ckpt': None, '--var_ckpt': None, '--ckpt': None, '--cache_dir': None,
                           '--local_files_only': False, '--device': None, '--fp16': 1, '--tf32': 1}


def test_released_depths_come_from_the_preset_registry():
    text = model_flags.released_depths_help()
    assert text == '16, 20, 24, 30 (256 px) or 36 (512 px)'
    for name in models.PRESETS:
        assert str(models.preset_config(name)['depth']) in text


def _args(**kw):
    args = dict(depth=16, vae_ckpt=None, var_ckpt=None, ckpt=None, cache_dir=None, local_files_only=True,
                device=None, fp16=1, tf32=1)
    args.update(kw)
    return argparse.Namespace(**args)


def test_model_flags_are_checked_before_any_download(tmp_path):
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'this is not a checkpoint')
    cases = [(dict(depth=17), "--depth: unknown model 17"),
             (dict(ckpt=str(junk), var_ckpt=str(junk)), 'do not combine it with --var_ckpt'),
             (dict(vae_ckpt=str(tmp_path / 'missing.pth')), 'missing.pth does not exist'),
             (dict(device='gpu:x'), "--device 'gpu:x'")]
    for kw, match in cases:
        with pytest.raises(ConfigError, match=match):
            model_flags.check_model_flags(_args(**kw))
    model_flags.check_model_flags(_args(ckpt=str(junk), vae_ckpt=str(junk)))  # a checkpoint without a tokenizer


def test_a_file_that_does_not_load_is_named(tmp_path):
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'this is not a checkpoint')
    with pytest.raises(ConfigError, match=r'^cannot load .*junk.pth: '):
        model_flags.load_models_from_args(_args(ckpt=str(junk)), torch.device('cpu'))
    with pytest.raises(ConfigError, match='cannot load the d16 model'):  # offline, nothing cached
        model_flags.load_models_from_args(_args(cache_dir=str(tmp_path / 'hf')), torch.device('cpu'))


def test_loading_a_checkpoint_gives_eval_models(tiny_ckpt, sampling_models):
    vae, var = model_flags.load_models_from_args(_args(ckpt=tiny_ckpt), torch.device('cpu'))
    assert not vae.training and not var.training
    for a, b in zip(var.state_dict().values(), sampling_models[1].state_dict().values()):
        assert torch.equal(a, b)


def test_the_cpu_keeps_its_float32_matmul_precision():
    """--tf32 is a CUDA switch: on the CPU the process-wide float32 precision stays as it was."""
    before = torch.get_float32_matmul_precision()
    for tf32 in (0, 1):
        assert model_flags.model_device(_args(device='cpu', tf32=tf32)) == torch.device('cpu')
        assert torch.get_float32_matmul_precision() == before
