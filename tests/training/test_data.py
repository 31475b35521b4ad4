"""ImageFolder datasets (spec section 7): classes from folders, official transforms, unreadable files, clear errors."""
import shutil

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode, transforms

from support import assert_equal_up_to_rounding
from train_support import make_image_folder, write_image
from utils.data import TrainTransform, build_dataset


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), n_classes=3, n_train=4, n_val=2)


def test_classes_shapes_and_range(folder):
    num_classes, train_set, val_set = build_dataset(str(folder), 64)
    assert num_classes == 3 and train_set.classes == ['class_00', 'class_01', 'class_02'] == val_set.classes
    assert (len(train_set), len(val_set)) == (12, 6)
    img, label = train_set[5]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and label == 1
    assert -1 <= img.min() < 0 < img.max() <= 1
    assert torch.equal(val_set[0][0], val_set[0][0])  # deterministic validation transform


def test_seeded_augmentation_is_reproducible(folder):
    _, train_set, _ = build_dataset(str(folder), 64, hflip=True)
    a, b, c = train_set[(3, 123)][0], train_set[(3, 123)][0], train_set[(3, 124)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize('hflip', [False, True])
def test_train_transform_equals_the_torchvision_pipeline(folder, hflip):
    img = Image.open(next((folder / 'train' / 'class_00').glob('*.png'))).convert('RGB')
    ref_tf = transforms.Compose(([transforms.RandomHorizontalFlip()] if hflip else []) + [
        transforms.Resize(72, interpolation=InterpolationMode.LANCZOS), transforms.RandomCrop(64),
        transforms.ToTensor()])
    for seed in range(4):
        torch.manual_seed(seed)
        ref = ref_tf(img) * 2 - 1
        torch.manual_seed(seed)
        # the same PIL resize and crop; x/255*2-1 written two ways: a few roundings apart
        assert_equal_up_to_rounding(TrainTransform(64, 72, hflip)(img), ref, reduction=1, depth=3)


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    root = make_image_folder(tmp_path / 'd', n_classes=2, n_train=3, n_val=1)
    (root / 'train' / 'class_00' / 'broken.png').write_bytes(b'not an image at all')
    good = root / 'train' / 'class_01' / 'img_000.png'
    data = good.read_bytes()
    (root / 'train' / 'class_01' / 'truncated.png').write_bytes(data[:len(data) // 3])
    _, train_set, _ = build_dataset(str(root), 64)
    assert len(train_set) == 8
    with pytest.warns(UserWarning) as record:
        batches = list(DataLoader(train_set, batch_size=4, num_workers=0))
    messages = ' '.join(str(w.message) for w in record)
    assert 'broken.png' in messages and 'truncated.png' in messages
    assert sum(b[0].shape[0] for b in batches) == 8  # substitutes keep the batch full
    # reads are counted: broken.png (index 0) fails again as the substitute of truncated.png (the last index)
    assert train_set.num_skipped == 3
    assert sorted(p.rsplit('/', 1)[1] for p in train_set.skipped_files) == ['broken.png', 'truncated.png']


def test_skip_counter_is_shared_with_loader_workers(tmp_path):
    root = make_image_folder(tmp_path / 'd', n_classes=2, n_train=2, n_val=1)
    (root / 'train' / 'class_00' / 'zz_broken.jpg').write_bytes(b'\xff\xd8garbage')
    _, train_set, _ = build_dataset(str(root), 64)
    list(DataLoader(train_set, batch_size=1, num_workers=2))
    assert train_set.num_skipped == 1


def test_missing_folders_and_empty_classes_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        build_dataset(str(tmp_path / 'nowhere'), 64)
    root = make_image_folder(tmp_path / 'd', n_classes=2, n_train=1, n_val=1)
    shutil.rmtree(root / 'val')
    with pytest.raises(FileNotFoundError, match=r'missing folder .*val'):
        build_dataset(str(root), 64)
    make_image_folder(root, n_classes=2, n_train=1, n_val=1)
    (root / 'train' / 'class_99').mkdir()
    (root / 'val' / 'class_99').mkdir()
    (root / 'train' / 'class_99' / 'notes.txt').write_text('no images here')
    with pytest.raises(FileNotFoundError, match=r'class_99 contains no image'):
        build_dataset(str(root), 64)
    shutil.rmtree(root / 'val' / 'class_99')
    write_image(root / 'train' / 'class_99' / 'a.png', 0, 0)
    with pytest.raises(ValueError, match='missing in val'):
        build_dataset(str(root), 64)
    with pytest.raises(ValueError, match=r'--mid_reso 0.9 resizes to 58 px, less than the 64 px crop'):
        build_dataset(str(root), 64, mid_reso=0.9)


def test_val_transform_is_resize_then_center_crop(folder):
    """Spec §7 val: Resize(shorter edge -> round(1.125·reso), LANCZOS) -> CenterCrop(reso) -> ToTensor -> x·2−1,
    with mid_reso defaulting to 1.125 (64 px -> 72 px)."""
    _, _, val_set = build_dataset(str(folder), 64)
    path, label = val_set.samples[3]
    img = Image.open(path).convert('RGB')
    ref = transforms.Compose([transforms.Resize(72, interpolation=InterpolationMode.LANCZOS),
                              transforms.CenterCrop(64), transforms.ToTensor()])(img) * 2 - 1
    got, got_label = val_set[3]
    assert got_label == label
    assert_equal_up_to_rounding(got, ref, reduction=1, depth=3)  # the same pixels, x/255*2-1 written two ways
    assert torch.equal(val_set[(3, 1)][0], val_set[(3, 2)][0])  # no randomness, whatever the seed


def test_default_mid_reso_of_the_train_transform(folder):
    """The train resize targets round(1.125·reso) by default; a crop of 64 from a 72 px edge has 9 offsets."""
    _, train_set, _ = build_dataset(str(folder), 64)
    img = Image.open(train_set.samples[0][0]).convert('RGB')
    ref_tf = transforms.Compose([transforms.Resize(72, interpolation=InterpolationMode.LANCZOS),
                                 transforms.RandomCrop(64), transforms.ToTensor()])
    for seed in range(3):
        torch.manual_seed(seed)
        ref = ref_tf(img) * 2 - 1
        torch.manual_seed(seed)
        assert_equal_up_to_rounding(train_set[0][0], ref, reduction=1, depth=3)  # x/255*2-1 written two ways


def test_an_empty_validation_class_is_reported(tmp_path):
    root = make_image_folder(tmp_path / 'd', n_classes=2, n_train=1, n_val=1)
    (root / 'train' / 'class_02').mkdir()
    write_image(root / 'train' / 'class_02' / 'a.png', 2, 0)
    (root / 'val' / 'class_02').mkdir()  # present in val, but without any image
    with pytest.raises(FileNotFoundError, match=r'val/class_02 contains no image'):
        build_dataset(str(root), 64)


def test_an_unreadable_file_warns_once_but_every_failed_read_counts(tmp_path):
    root = make_image_folder(tmp_path / 'd', n_classes=1, n_train=2, n_val=1)
    (root / 'train' / 'class_00' / 'a_broken.png').write_bytes(b'nope')
    _, train_set, _ = build_dataset(str(root), 64)
    assert train_set.samples[0][0].endswith('a_broken.png')
    with pytest.warns(UserWarning) as record:
        a, b = train_set[(0, 7)], train_set[(0, 7)]
    assert len([w for w in record if 'a_broken.png' in str(w.message)]) == 1
    assert train_set.num_skipped == 2
    sub = train_set[(1, 7)]  # the substitute is the next sample, with the same per-sample seed
    assert torch.equal(a[0], sub[0]) and torch.equal(b[0], sub[0]) and a[1] == sub[1] == 0
