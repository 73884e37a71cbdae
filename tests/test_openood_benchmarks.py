"""OpenOOD benchmarks (`--benchmark`): labelled ID lists, OpenOOD's resize-then-crop transform, benchmark-only OOD
lookup, and where the validation split comes from. Images are written with Pillow and compared with Pillow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fakes import random_images, write_ood_folder, write_openood_cifar10_root, write_openood_imglist
from PIL import Image

from hrp_ood.data.benchmarks import BENCHMARKS, check_checkpoint_fits, get_benchmark, load_benchmark_id_data
from hrp_ood.data.image_lists import load_image_list, load_labelled_image_list
from hrp_ood.errors import UserError
from hrp_ood.eval.ood_data import load_ood_images
from hrp_ood.eval.validation import find_validation, load_validation, require_tuning_split


def test_tables_are_openood_v15s():
    """openood/evaluation_api/preprocessor.py default_preprocessing_dict and datasets.py DATA_INFO."""
    cifar10, cifar100, imagenet200 = (BENCHMARKS[n] for n in ("cifar10", "cifar100", "imagenet200"))
    assert (cifar10.pre_size, cifar10.img_size, cifar10.mean, cifar10.std) == (
        32,
        32,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    )
    assert (cifar100.mean, cifar100.std, cifar100.num_classes) == (
        (0.5071, 0.4867, 0.4408),
        (0.2675, 0.2565, 0.2761),
        100,
    )
    assert (imagenet200.pre_size, imagenet200.img_size, imagenet200.num_classes) == (256, 224, 200)
    assert list(cifar10.far) == ["mnist", "svhn", "textures", "places365"] and list(cifar10.near) == ["cifar100", "tin"]
    assert cifar10.far["textures"][0] == "test_texture.txt" and imagenet200.far["textures"] == (
        "test_textures.txt",
        "images_classic",
    )
    assert cifar10.ood_val == ("val_tin.txt", "images_classic")
    assert imagenet200.ood_val == ("val_openimage_o.txt", "images_largescale")
    with pytest.raises(UserError, match="unknown OpenOOD benchmark 'cifar'"):
        get_benchmark("cifar")


def test_labelled_list_keeps_labels_aligned_with_images_and_checks_them(tmp_path):
    images, labels = random_images(6, seed=1), np.array([3, 0, 9, 9, 1, 2])
    list_file = write_openood_imglist(tmp_path, "cifar10", "cifar10", images, "train_cifar10.txt", labels, "train")
    loaded, loaded_labels = load_labelled_image_list(list_file, tmp_path / "images_classic", 32, 10)
    assert torch.equal(loaded, torch.from_numpy(images)) and loaded_labels.tolist() == labels.tolist()
    with pytest.raises(UserError, match=r"line 3: label '9' is not a class index 0-4"):
        load_labelled_image_list(list_file, tmp_path / "images_classic", 32, 5)
    (tmp_path / "images_classic" / "cifar10" / "train" / "0002.png").write_bytes(b"not a png")
    kept, kept_labels = load_labelled_image_list(list_file, tmp_path / "images_classic", 32, 10, skip_corrupt=True)
    assert kept_labels.tolist() == [3, 0, 9, 1, 2] and torch.equal(kept[2], torch.from_numpy(images[3]))


def test_resize_then_centre_crop_is_openoods_transform(tmp_path):
    """Resize(pre_size) on the shorter side (bilinear), then CenterCrop(size): ImageNet's 256 → 224, scaled down."""
    array = np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    write_ood_folder(tmp_path / "imgs", array.transpose(2, 0, 1)[None])
    list_file = tmp_path / "list.txt"
    list_file.write_text("0000.png -1\n")
    images = load_image_list(list_file, tmp_path / "imgs", 28, pre_size=32)
    resized = np.asarray(Image.fromarray(array).resize((42, 32), Image.BILINEAR))  # 48 → 32, 64 → int(42.7)
    top, left = 2, 7  # torchvision's CenterCrop: round((32 − 28) / 2), round((42 − 28) / 2)
    expected = resized[top : top + 28, left : left + 28]
    assert images.shape == (1, 3, 28, 28)
    assert (images[0].int() - torch.from_numpy(expected.transpose(2, 0, 1).copy()).int()).abs().max() <= 1


def test_benchmark_sets_come_from_its_lists_only(tmp_path):
    cifar10 = BENCHMARKS["cifar10"]
    write_openood_imglist(tmp_path, "cifar10", "textures", random_images(3, seed=3))
    write_ood_folder(tmp_path / "dtd" / "images", random_images(5, seed=4))  # found without --benchmark only
    assert len(load_ood_images("textures", tmp_path, id_dataset="folder", benchmark=cifar10)) == 3
    assert len(load_ood_images("textures", tmp_path, id_dataset="folder")) == 5
    with pytest.raises(UserError, match="'lsun' is not part of OpenOOD's cifar10 benchmark"):
        load_ood_images("lsun", tmp_path, id_dataset="folder", benchmark=cifar10)
    with pytest.raises(UserError, match="is the ID dataset itself"):
        load_ood_images("cifar10", tmp_path, id_dataset="folder", benchmark=cifar10)
    with pytest.raises(UserError, match="benchmark_imglist/folder/test_svhn.txt.*give --benchmark NAME"):
        load_ood_images("svhn", tmp_path, id_dataset="folder")  # a folder checkpoint on an OpenOOD root
    mine = tmp_path / "mine"
    write_ood_folder(mine, random_images(2, seed=5))
    assert len(load_ood_images("lsun", tmp_path, id_dataset="folder", benchmark=cifar10, ood_dirs={"lsun": mine})) == 2


def test_benchmark_id_data_and_the_checkpoint_checks(tmp_path):
    written = write_openood_cifar10_root(tmp_path, n_train=30, n_val=10, n_test=20, n_ood=5)
    classes = [f"c{k}" for k in range(10)]
    bundle = load_benchmark_id_data(BENCHMARKS["cifar10"], tmp_path, classes)
    assert bundle.name == "openood-cifar10" and bundle.classes == classes and bundle.image_size == 32
    assert (bundle.mean, bundle.std) == (BENCHMARKS["cifar10"].mean, BENCHMARKS["cifar10"].std)
    for split in ("train", "test"):
        images, labels = written[split]
        assert torch.equal(getattr(bundle, f"{split}_images"), torch.from_numpy(images))
        assert getattr(bundle, f"{split}_labels").tolist() == labels.tolist()
    with pytest.raises(UserError, match="cifar100 train list .* not found"):
        load_benchmark_id_data(BENCHMARKS["cifar100"], tmp_path, [str(k) for k in range(100)])
    check_checkpoint_fits(BENCHMARKS["cifar10"], classes, 32, tmp_path / "last.pt")
    with pytest.raises(UserError, match="trained on 64x64 images but OpenOOD's cifar10 benchmark feeds 32x32"):
        check_checkpoint_fits(BENCHMARKS["cifar10"], classes, 64, tmp_path / "last.pt")


def test_validation_from_lists_or_folders_and_what_tune_needs(tmp_path):
    cifar10 = BENCHMARKS["cifar10"]
    written = write_openood_cifar10_root(tmp_path, n_train=10, n_val=12, n_test=10, n_ood=7)
    found = find_validation(tmp_path, cifar10)
    assert {part: source.path.name for part, source in found.items()} == {"id": "val_cifar10.txt", "ood": "val_tin.txt"}
    validation = load_validation(found, 32)
    assert torch.equal(validation.id_images, torch.from_numpy(written["val"][0]))
    assert torch.equal(validation.ood_images, torch.from_numpy(written["val_tin"][0]))

    folder = tmp_path / "my_ood_val"
    write_ood_folder(folder, random_images(4, seed=6), subfolders=("a", "b"))
    found = find_validation(tmp_path, cifar10, ood_dir=folder)  # a folder given explicitly wins over the list
    assert found["ood"].path == folder and load_validation(found, 32).describe()["ood"] == {
        "source": str(folder),
        "images": 4,
    }
    assert find_validation(tmp_path, None) == {} and load_validation({}, 32) is None
    with pytest.raises(UserError, match=r"missing ID-val: --val-id-dir; OOD-val: --val-ood-dir"):
        require_tuning_split({}, tmp_path, None)
    with pytest.raises(UserError, match=r"missing OOD-val: .*imagenet200/val_openimage_o.txt or --val-ood-dir"):
        require_tuning_split({"id": found["id"]}, tmp_path, BENCHMARKS["imagenet200"])
    with pytest.raises(UserError, match="not a folder"):
        find_validation(tmp_path, None, id_dir=tmp_path / "nowhere")
