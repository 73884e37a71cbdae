"""Every dataset format loads back exactly what was written, and every missing or bad input is a UserError."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from fakes import (
    CIFAR100_COARSE_OF_FINE,
    save_image,
    write_animal10n,
    write_cifar10,
    write_cifar100,
    write_image_folder,
)

from hrp_ood.data import DATASETS, load_dataset
from hrp_ood.data.bundle import channel_stats
from hrp_ood.data.cifar import CIFAR10_MEAN, CIFAR10_STD
from hrp_ood.data.folder import ANIMAL10N_CLASSES
from hrp_ood.errors import UserError


def numpy_channel_stats(images: np.ndarray):
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


def assert_stats_match(bundle, images: np.ndarray):
    mean, std = numpy_channel_stats(images)
    np.testing.assert_allclose(bundle.mean, mean, atol=1e-9)
    np.testing.assert_allclose(bundle.std, std, atol=1e-9)


def test_registry_names():
    assert DATASETS == ("cifar10", "cifar100", "animal10n", "folder", "digits")


def test_cifar10_pickles_load_back_exactly(tmp_path):
    fake = write_cifar10(tmp_path, n_train=103, n_test=21, seed=3)
    bundle = load_dataset("cifar10", tmp_path)
    assert bundle.name == "cifar10" and bundle.classes == fake.classes and bundle.num_classes == 10
    assert bundle.image_size == 32 and bundle.train_images.dtype == torch.uint8
    assert tuple(bundle.train_images.shape) == (103, 3, 32, 32) and tuple(bundle.test_images.shape) == (21, 3, 32, 32)
    np.testing.assert_array_equal(bundle.train_images.numpy(), fake.train_images)
    np.testing.assert_array_equal(bundle.test_images.numpy(), fake.test_images)
    assert bundle.train_labels.dtype == np.int64
    np.testing.assert_array_equal(bundle.train_labels, fake.train_labels)
    np.testing.assert_array_equal(bundle.test_labels, fake.test_labels)
    assert bundle.mean == CIFAR10_MEAN and bundle.std == CIFAR10_STD and bundle.train_coarse_labels is None


def test_cifar100_keeps_fine_and_coarse_labels(tmp_path):
    fake = write_cifar100(tmp_path, n_train=250, n_test=40, seed=1)
    bundle = load_dataset("cifar100", tmp_path)
    assert bundle.num_classes == 100 and bundle.classes[:2] == ["fine_00", "fine_01"]
    np.testing.assert_array_equal(bundle.train_images.numpy(), fake.train_images)
    np.testing.assert_array_equal(bundle.train_labels, fake.train_labels)
    np.testing.assert_array_equal(bundle.test_labels, fake.test_labels)
    np.testing.assert_array_equal(bundle.train_coarse_labels, CIFAR100_COARSE_OF_FINE[fake.train_labels])


def test_missing_cifar_names_the_files_and_suggests_download(tmp_path):
    with pytest.raises(UserError, match=r"cifar-10-batches-py.*data_batch_1.*--download"):
        load_dataset("cifar10", tmp_path)
    write_cifar10(tmp_path, n_train=20, n_test=10)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(UserError, match=r"missing: data_batch_3\)"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(UserError, match=r"cifar-100-python.*missing: train, test, meta"):
        load_dataset("cifar100", tmp_path)


def test_cifar_pickles_naming_numpy_1_modules_load(tmp_path):
    """The real release pickles arrays via numpy.core.multiarray._reconstruct (numpy 1 naming)."""
    fake = write_cifar10(tmp_path, n_train=20, n_test=10)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    content = path.read_bytes()
    assert b"numpy._core.multiarray" in content  # protocol 2 GLOBAL opcodes are plain text lines
    path.write_bytes(content.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    np.testing.assert_array_equal(load_dataset("cifar10", tmp_path).test_images.numpy(), fake.test_images)


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    write_cifar10(tmp_path, n_train=20, n_test=10)
    with (tmp_path / "cifar-10-batches-py" / "test_batch").open("wb") as f:
        pickle.dump({b"data": _RunsCode()}, f)
    with pytest.raises(UserError, match=r"refusing to load posix\.getcwd|refusing to load nt\.getcwd"):
        load_dataset("cifar10", tmp_path)


def test_truncated_cifar_pickle_is_a_user_error(tmp_path):
    write_cifar10(tmp_path, n_train=20, n_test=10)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(UserError, match="data_batch_2"):
        load_dataset("cifar10", tmp_path)


def test_image_folder_loads_pngs_exactly_with_sorted_classes(tmp_path):
    written = write_image_folder(tmp_path, classes=("zebra", "ant", "moth"), n_per_class=4, size=20)
    bundle = load_dataset("folder", tmp_path)
    assert bundle.classes == ["ant", "moth", "zebra"] and bundle.image_size == 20
    train_x, train_y = written["train"]
    np.testing.assert_array_equal(bundle.train_images.numpy(), train_x)
    np.testing.assert_array_equal(bundle.train_labels, train_y)
    np.testing.assert_array_equal(bundle.test_images.numpy(), written["test"][0])
    assert_stats_match(bundle, train_x)


def test_image_folder_resizes_to_image_size_and_odd_images_to_the_first_size(tmp_path):
    write_image_folder(tmp_path, classes=("a", "b"), n_per_class=3, size=24, ext=".jpg")
    odd = np.full((3, 40, 60), 200, dtype=np.uint8)  # non-square, larger: shorter side → 24, centre crop
    save_image(tmp_path / "train" / "b" / "zz_odd.png", odd)
    bundle = load_dataset("folder", tmp_path)
    assert tuple(bundle.train_images.shape) == (7, 3, 24, 24)
    assert (bundle.train_images[-1] == 200).all()  # a constant image stays constant through resize + crop
    small = load_dataset("folder", tmp_path, image_size=16)
    assert small.image_size == 16 and tuple(small.test_images.shape) == (6, 3, 16, 16)


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match=r"train/<class>"):
        load_dataset("folder", tmp_path)
    write_image_folder(tmp_path, classes=("a", "b"), n_per_class=2, size=8)
    (tmp_path / "test" / "c").mkdir()
    with pytest.raises(UserError, match=r"no training folder: c"):
        load_dataset("folder", tmp_path)
    (tmp_path / "test" / "c").rmdir()
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(UserError, match=r"no images .* training class folder.*empty"):
        load_dataset("folder", tmp_path)
    (tmp_path / "train" / "empty").rmdir()
    (tmp_path / "train" / "a" / "0000.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"cannot decode image .*0000\.png"):
        load_dataset("folder", tmp_path)


@pytest.mark.parametrize("dirs", [("training", "testing"), ("train", "test")])
def test_animal10n_reads_labels_from_file_names(tmp_path, dirs):
    fake = write_animal10n(tmp_path, n_train=23, n_test=12, size=64, dirs=dirs, seed=2)
    bundle = load_dataset("animal10n", tmp_path)
    assert bundle.classes == ANIMAL10N_CLASSES and bundle.classes[9] == "guinea pig" and bundle.image_size == 64
    # the loader orders files by name, "<label>_<id>": label first, then id
    order = np.lexsort((np.arange(23), fake.train_labels))
    np.testing.assert_array_equal(bundle.train_labels, fake.train_labels[order])
    np.testing.assert_array_equal(np.sort(bundle.test_labels), np.sort(fake.test_labels))
    # JPEG blurs the noise but keeps each image's mean colour: same images, same order
    loaded_colour = bundle.train_images.numpy().mean(axis=(2, 3))
    np.testing.assert_allclose(loaded_colour, fake.train_images[order].mean(axis=(2, 3)), atol=3)
    assert_stats_match(bundle, bundle.train_images.numpy())


def test_animal10n_errors(tmp_path):
    with pytest.raises(UserError, match=r"training.* or .*train"):
        load_dataset("animal10n", tmp_path)
    write_animal10n(tmp_path, n_train=10, n_test=5, size=16)
    (tmp_path / "training" / "cat_001.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"'cat_001\.jpg' does not start with a label"):
        load_dataset("animal10n", tmp_path)


def test_digits_split_and_pixels():
    from sklearn.datasets import load_digits

    digits = load_digits()
    bundle = load_dataset("digits")
    assert (len(bundle.train_labels), len(bundle.test_labels)) == (1297, 500)
    assert tuple(bundle.train_images.shape[1:]) == (3, 32, 32) and bundle.train_images.dtype == torch.uint8
    assert torch.equal(bundle.train_images[:, 0], bundle.train_images[:, 2])  # grey replicated to RGB
    expected_test = np.bincount(digits.target) * 500 / len(digits.target)
    assert np.abs(np.bincount(bundle.test_labels, minlength=10) - expected_test).max() <= 1  # stratified
    # 4×4 average pooling undoes the 4× bilinear upsampling up to blur: every image must match an 8×8
    # original of its own label, rescaled from 0–16 to 0–255
    pooled = torch.nn.functional.avg_pool2d(bundle.test_images[:50, :1].float(), 4).flatten(1).numpy()
    originals = digits.images.reshape(len(digits.images), -1) * 255 / 16
    closest = np.abs(pooled[:, None, :] - originals[None]).mean(axis=2).argmin(axis=1)
    np.testing.assert_array_equal(digits.target[closest], bundle.test_labels[:50])
    assert np.abs(pooled - originals[closest]).mean() < 25
    again = load_dataset("digits")
    assert torch.equal(again.train_images, bundle.train_images)
    np.testing.assert_array_equal(again.test_labels, bundle.test_labels)


def test_load_dataset_rejects_bad_requests(tmp_path):
    with pytest.raises(UserError, match=r"unknown dataset 'svhn'; choose one of cifar10"):
        load_dataset("svhn", tmp_path)
    with pytest.raises(UserError, match=r"--download is only available for cifar10/cifar100"):
        load_dataset("folder", tmp_path, download=True)
    write_cifar10(tmp_path, n_train=20, n_test=10)
    with pytest.raises(UserError, match=r"fixed image size of 32"):
        load_dataset("cifar10", tmp_path, image_size=64)
    assert load_dataset("cifar10", tmp_path, image_size=32).image_size == 32


def test_channel_stats_match_numpy():
    images = torch.randint(0, 256, (37, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(images)
    ref_mean, ref_std = numpy_channel_stats(images.numpy())
    np.testing.assert_allclose(mean, ref_mean, atol=1e-12)
    np.testing.assert_allclose(std, ref_std, atol=1e-12)
