"""Parquet shards in the Hub's layout as a data source (utils/parquet_data.py): the same items, training losses and
token files as the same images in class folders; bounded, per-process reading; every bad shard named before training.
(Exact resume after a SIGKILL of a torchrun job on parquet shards: tests/training/test_train_torchrun.py.)"""
import pickle
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from support import intra_op_threads
from train_support import (TINY_PN, X4, folder_to_parquet, make_image_folder, make_tiny_vae_ckpt, read_steps,
                           train_args)
from utils.data import build_dataset
from utils.parquet_data import CACHE_GROUPS, ParquetImages


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
    """(class folders, the same images as 3 Hub-layout shards per split with 2-row groups)."""
    root = tmp_path_factory.mktemp('parquet')
    folder = make_image_folder(root / 'folder', n_classes=3, n_train=5, n_val=2)
    return folder, folder_to_parquet(folder, root / 'hub')


def test_items_equal_the_folder_items_bit_for_bit(sets):
    folder, hub = sets
    n_f, train_f, val_f = build_dataset(str(folder), 64, hflip=True)
    n_p, train_p, val_p = build_dataset(str(hub), 64, hflip=True)
    assert isinstance(train_p, ParquetImages) and (n_p, len(train_p), len(val_p)) == (n_f, 15, 6) == (3, 15, 6)
    assert train_p.classes == train_f.classes == val_p.classes == ['class_00', 'class_01', 'class_02']
    for i in range(len(train_f)):  # the same index -> image mapping, flip and crop drawn from the per-sample seed
        (img_f, label_f), (img_p, label_p) = train_f[(i, 100 + i)], train_p[(i, 100 + i)]
        assert torch.equal(img_f, img_p) and label_f == label_p, i
    for i in range(len(val_f)):
        assert torch.equal(val_f[i][0], val_p[i][0]) and val_f[i][1] == val_p[i][1]
    assert len(train_p._groups) == CACHE_GROUPS  # 8 row groups read, the last CACHE_GROUPS kept
    assert train_p.relative_names([0, 14]) == train_f.relative_names([0, 14]) == ['class_00/img_000.png',
                                                                                  'class_02/img_004.png']
    assert train_p.image_name(7).endswith('data/train-00001-of-00003.parquet row 2')


def test_loader_workers_open_their_own_files(sets):
    """The parent holds open files and cached row groups; a worker (forked, or spawned from the pickled state) starts
    without them and reads the same batches."""
    from utils.data_sampler import DistInfiniteBatchSampler
    _, hub = sets
    _, train, _ = build_dataset(str(hub), 64, hflip=True)
    train[0]
    assert train._files and train._groups
    state = train.__getstate__()
    assert not state['_files'] and not state['_groups'] and state['_pid'] is None
    state.pop('_num_skipped')  # a shared counter: pickled only while a worker is spawned
    assert len(pickle.dumps(state)) < 4096
    sampler = iter(DistInfiniteBatchSampler(1, 0, len(train), 5, fill_last=True, shuffle=True, aug_seed=3))
    keys = [next(sampler) for _ in range(3)]  # (index, seed) batches; a finite list lets the worker exit cleanly
    batches = {workers: list(DataLoader(train, batch_sampler=keys, num_workers=workers)) for workers in (0, 1)}
    for (img_a, lab_a), (img_b, lab_b) in zip(batches[0], batches[1]):
        assert torch.equal(img_a, img_b) and torch.equal(lab_a, lab_b)


def test_class_names_come_from_the_metadata_else_ids(sets, tmp_path):
    folder, _ = sets
    n, train, val = build_dataset(str(folder_to_parquet(folder, tmp_path / 'plain', names=False)), 64)
    assert n == 3 and train.classes == val.classes == ['0', '1', '2']


def _rewrite(path, table: pa.Table) -> None:
    pq.write_table(table, path, row_group_size=2)


def test_an_undecodable_image_is_skipped_and_counted_as_in_folders(sets, tmp_path):
    folder, hub = sets
    bad = tmp_path / 'hub'
    shutil.copytree(hub, bad)
    shard = bad / 'data' / 'train-00000-of-00003.parquet'
    table = pq.read_table(shard)
    images = table.column('image').to_pylist()
    images[0]['bytes'] = b'not an image at all'
    images[3]['bytes'] = images[3]['bytes'][:200]  # a truncated PNG
    _rewrite(shard, table.set_column(0, 'image', pa.array(images, table.schema.field('image').type)))
    _, train, _ = build_dataset(str(bad), 64)
    _, train_f, _ = build_dataset(str(folder), 64)
    with pytest.warns(UserWarning) as record:
        got = [train[(i, 7)] for i in (0, 0, 3)]
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and 'train-00000-of-00003.parquet row 0' in messages[0]
    assert 'train-00000-of-00003.parquet row 3' in messages[1]
    assert train.num_skipped == 3  # every failed read counts, each image warns once
    assert torch.equal(got[0][0], train_f[(1, 7)][0]) and torch.equal(got[2][0], train_f[(4, 7)][0])  # the next one


def test_labels_are_checked_from_the_footer_or_else_the_column(sets, tmp_path):
    """A label outside the classes (-1: the Hub's unlabelled test rows) or a missing one is named, from the footer's
    statistics or, in a shard written without them, from the `label` column."""
    _, hub = sets
    for statistics in (True, False):
        root = tmp_path / f'statistics_{statistics}'
        shutil.copytree(hub, root)
        shard = root / 'data' / 'validation-00001-of-00003.parquet'
        table = pq.read_table(shard)
        labels = table.column('label').to_pylist()

        def rewrite(new_labels):
            pq.write_table(table.set_column(1, 'label', pa.array(new_labels, pa.int64())), shard,
                           write_statistics=statistics)
        rewrite(labels)
        assert build_dataset(str(root), 64)[0] == 3
        rewrite([-1] + labels[1:])
        with pytest.raises(ValueError, match=r'validation-00001-of-00003.parquet has labels from -1 to 1, outside '
                                             r"0..2 \(3 classes\) \(-1 marks an unlabelled row, as in the Hub's test"):
            build_dataset(str(root), 64)
        rewrite([None] + labels[1:])
        with pytest.raises(ValueError, match=r'validation-00001-of-00003.parquet: 1 row\(s\) without a label'):
            build_dataset(str(root), 64)


def test_each_bad_shard_is_named_before_training(sets, tmp_path, capsys):
    """A missing, empty or truncated shard, one without a `label` column, a split without shards, a folder with
    neither layout: each raises the error the folder layout raises for a bad layout, with the shard's path; train.py
    turns it into a message and exit code 2 before any model is built."""
    _, hub = sets

    def broken(name, damage):
        root = tmp_path / name
        shutil.copytree(hub, root)
        damage(root / 'data')
        return root

    def shard(data):
        return data / 'train-00001-of-00003.parquet'

    cases = [
        (broken('missing', lambda d: shard(d).unlink()), FileNotFoundError,
         r'shard .*/data/train-00001-of-00003.parquet is missing \(1 of the 3 train shards that the names announce\)'),
        (broken('empty', lambda d: shard(d).write_bytes(b'')), ValueError,
         r'shard .*/data/train-00001-of-00003.parquet is empty \(0 bytes\): download it again'),
        (broken('truncated', lambda d: shard(d).write_bytes(shard(d).read_bytes()[:5000])), ValueError,
         r'shard .*/train-00001-of-00003.parquet is not a readable parquet file \(5,000 bytes; .*\): it is truncated '
         r'or corrupt'),
        (broken('no_label', lambda d: _rewrite(shard(d), pq.read_table(shard(d)).drop_columns(['label']))), ValueError,
         r"shard .*/train-00001-of-00003.parquet has no 'label' column \(columns: image\): expected an 'image' column"),
        (broken('no_val', lambda d: [p.unlink() for p in d.glob('validation-*')]), FileNotFoundError,
         r'has data/train-\*.parquet shards but no data/validation-\*.parquet'),
    ]
    (tmp_path / 'neither' / 'images').mkdir(parents=True)
    cases.append((tmp_path / 'neither', FileNotFoundError, r'holds neither accepted layout: expected train/ and val/ '
                  r'with one sub-folder of images per class, or parquet shards \(data/train-\*.parquet'))
    for root, error, message in cases:
        with pytest.raises(error, match=message):
            build_dataset(str(root), 64)

    import train
    vae = make_tiny_vae_ckpt(tmp_path / 'vae.pth', X4)
    for root, _, message in (cases[2], cases[-1]):
        assert train.main(train_args(root, vae, tmp_path / f'run_{root.name}', patch_size=4, ep=1)) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and 'Traceback' not in err, err[-2000:]


@pytest.mark.slow
def test_training_and_pretokenize_on_parquet_equal_the_folders(sets, tmp_path):
    """train.py's per-step losses and class names, and pretokenize.py's token files, from the shards equal those
    from the folders (all runs in this process, with one thread: the same arithmetic)."""
    import pretokenize
    import train
    folder, hub = sets
    vae = make_tiny_vae_ckpt(tmp_path / 'vae.pth', X4)
    flags = dict(patch_size=4, bs=5, ep=2, hflip=1, log_steps=1, tblr=0.5)
    runs = {'folder': folder, 'hub': hub}
    with intra_op_threads(1):
        for name, data in runs.items():
            assert train.main(train_args(data, vae, tmp_path / f'train_{name}', **flags)) == 0
            argv = [f'--data_path={data}', f'--vae_ckpt={vae}', f'--out={tmp_path / f"tok_{name}"}', f'--pn={TINY_PN}',
                    '--patch_size=4', '--hflip=1', '--bs=4', '--chunk=5', '--workers=0', '--tf32=0', '--device=cpu']
            assert pretokenize.main(argv) == 0
    losses = {name: read_steps(tmp_path / f'train_{name}') for name in runs}
    assert len(losses['hub']) == 6 and losses['hub'] == losses['folder']
    ckpts = {name: torch.load(tmp_path / f'train_{name}' / 'ar-ckpt-last.pth', weights_only=False) for name in runs}
    assert ckpts['hub']['class_names'] == ckpts['folder']['class_names'] == ['class_00', 'class_01', 'class_02']
    assert "ids in the shards' label column (0: class_00" in (tmp_path / 'train_hub' / 'stdout.txt').read_text()
    for split in ('train', 'val'):  # tokens, labels and provenance lines alike
        for kind in ('tokens.npy', 'labels.npy', 'files.txt'):
            a, b = (tmp_path / f'tok_{name}' / f'{split}_{kind}' for name in runs)
            assert a.read_bytes() == b.read_bytes(), (split, kind)
