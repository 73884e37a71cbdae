"""OOD sets written small in their real on-disk formats load to the right images; every bad input is a UserError."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import (
    random_images,
    write_cifar100,
    write_idx_images,
    write_mnist_idx,
    write_ood_folder,
    write_openood_imglist,
    write_svhn_mat,
)
from PIL import Image

from hrp_ood.errors import UserError
from hrp_ood.eval.ood_data import FAR_OOD_SETS, NEAR_OOD_SETS, load_ood_images


def _rgb(rng: np.random.Generator, h: int = 32, w: int = 32) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _chw(array_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array_hwc.transpose(2, 0, 1).copy())


def _chw_batch(arrays_hwc: list[np.ndarray]) -> np.ndarray:
    return np.stack(arrays_hwc).transpose(0, 3, 1, 2)


def test_set_names_are_the_papers_five_plus_near_ood():
    assert FAR_OOD_SETS == ("svhn", "lsun", "places365", "textures", "mnist")
    assert NEAR_OOD_SETS == ("cifar10", "cifar100", "tin")


@pytest.mark.parametrize(
    ("name", "list_name"),
    [
        ("svhn", "test_svhn.txt"),
        ("textures", "test_texture.txt"),
        ("lsun", "test_lsun.txt"),
        ("places365", "test_places365.txt"),
    ],
)
def test_openood_image_list_loads_images_in_list_order(tmp_path, name, list_name):
    rng = np.random.default_rng(0)
    arrays = [_rgb(rng) for _ in range(5)]
    write_openood_imglist(tmp_path, "cifar10", name, _chw_batch(arrays), list_name=list_name)
    images = load_ood_images(name, tmp_path, id_dataset="cifar10")
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 32, 32)
    assert torch.equal(images, torch.stack([_chw(a) for a in arrays]))  # 32×32 in → transform is the identity


def test_svhn_mat_with_the_real_key_layout(tmp_path):
    written = write_svhn_mat(tmp_path, 7, seed=1)  # the file holds X as (H, W, C, N)
    images = load_ood_images("svhn", tmp_path, id_dataset="cifar10")
    assert images.shape == (7, 3, 32, 32)
    for i in (0, 3, 6):
        assert torch.equal(images[i], torch.from_numpy(written[i]))


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_grey_to_rgb_and_resized(tmp_path, compress):
    digits = write_mnist_idx(tmp_path, 6, compress, seed=2)

    native = load_ood_images("mnist", tmp_path, id_dataset="cifar10", image_size=28)
    assert native.shape == (6, 3, 28, 28)
    assert all(torch.equal(native[:, c], torch.from_numpy(digits)) for c in range(3))

    upsized = load_ood_images("mnist", tmp_path, id_dataset="cifar10", image_size=32)
    reference = (
        F.interpolate(torch.from_numpy(digits).float()[:, None], size=(32, 32), mode="bilinear", align_corners=False)
        .round()
        .clamp(0, 255)
    )  # upsampling: antialias plays no part
    assert upsized.shape == (6, 3, 32, 32)
    assert (upsized[:, 1:2].float() - reference).abs().max() <= 1


def test_mnist_bad_magic_is_a_user_error(tmp_path):
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    write_idx_images(path, np.zeros((1, 28, 28), dtype=np.uint8), magic=2049)  # 2049 = a *label* file
    with pytest.raises(UserError, match="magic"):
        load_ood_images("mnist", tmp_path, id_dataset="cifar10")


def test_image_folder_recursive_with_grey_rgba_and_non_square(tmp_path):
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, size=(32, 32), dtype=np.uint8)
    rgba = rng.integers(0, 256, size=(32, 32, 4), dtype=np.uint8)
    wide = _rgb(rng, 32, 64)  # shorter side already 32: only the centre crop acts
    large = _rgb(rng, 64, 96)  # resize 64×96 → 32×48, then crop columns 8..40
    root = tmp_path / "dtd" / "images"
    for rel, array, mode in [
        ("a/grey.png", grey, "L"),
        ("b/c/rgba.png", rgba, "RGBA"),
        ("b/wide.jpg", wide, "RGB"),
        ("d/large.bmp", large, "RGB"),
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array, mode).save(root / rel, **({"quality": 100} if rel.endswith(".jpg") else {}))
    (root / "a" / "notes.txt").write_text("not an image")

    images = load_ood_images("textures", tmp_path, id_dataset="cifar10")
    assert images.shape == (4, 3, 32, 32)  # sorted paths: a/grey, b/c/rgba, b/wide, d/large
    assert all(torch.equal(images[0, c], torch.from_numpy(grey)) for c in range(3))
    assert torch.equal(images[1], _chw(rgba[:, :, :3]))
    wide_decoded = np.asarray(Image.open(root / "b" / "wide.jpg").convert("RGB"))
    assert torch.equal(images[2], _chw(wide_decoded[:, 16:48]))
    expected = np.asarray(Image.fromarray(large).resize((48, 32), Image.BILINEAR))[:, 8:40]
    assert (images[3].int() - _chw(expected).int()).abs().max() <= 1


def test_ood_dir_takes_precedence_over_the_openood_list(tmp_path):
    write_openood_imglist(tmp_path / "data", "cifar10", "svhn", random_images(3, seed=4))
    mine = tmp_path / "my_svhn"
    write_ood_folder(mine, random_images(1, seed=5))
    images = load_ood_images("svhn", tmp_path / "data", id_dataset="cifar10", ood_dirs={"svhn": mine})
    assert len(images) == 1


def test_lsun_resize_folder_alias(tmp_path):
    write_ood_folder(tmp_path / "LSUN_resize", random_images(1, seed=5))
    assert load_ood_images("lsun", tmp_path, id_dataset="cifar10").shape == (1, 3, 32, 32)


def test_cifar100_as_near_ood_reads_the_test_split(tmp_path):
    test_images = write_cifar100(tmp_path, n_train=4, n_test=4, seed=6).test_images
    images = load_ood_images("cifar100", tmp_path, id_dataset="cifar10")
    assert torch.equal(images, torch.from_numpy(test_images))


def test_ood_set_equal_to_the_id_dataset_is_refused(tmp_path):
    with pytest.raises(UserError, match="ID dataset"):
        load_ood_images("cifar10", tmp_path, id_dataset="cifar10")


# ------------------------------------------------------------------------------------------------ errors


def test_missing_set_names_every_path_and_skip_missing(tmp_path):
    with pytest.raises(UserError) as err:
        load_ood_images("textures", tmp_path, id_dataset="cifar10")
    message = str(err.value)
    assert "\n" not in message and "--skip-missing" in message
    for looked in ("benchmark_imglist/cifar10/test_texture.txt", "dtd/images", str(tmp_path / "textures")):
        assert looked in message


def test_list_pointing_at_missing_images_names_first_and_count(tmp_path):
    write_openood_imglist(tmp_path, "cifar10", "svhn", random_images(1, seed=7))
    list_file = tmp_path / "benchmark_imglist" / "cifar10" / "test_svhn.txt"
    list_file.write_text(list_file.read_text() + "svhn/test/gone_a.png -1\nsvhn/test/gone_b.png -1\n")
    with pytest.raises(UserError, match=r"2 image\(s\) missing.*gone_a\.png"):
        load_ood_images("svhn", tmp_path, id_dataset="cifar10")


@pytest.mark.parametrize("entry", ["../../etc/passwd", "svhn/../../secret.png", "/etc/passwd"])
def test_list_path_escaping_the_data_root_is_rejected(tmp_path, entry):
    list_file = tmp_path / "data" / "benchmark_imglist" / "cifar10" / "test_svhn.txt"
    list_file.parent.mkdir(parents=True)
    (tmp_path / "data" / "images_classic").mkdir()
    Image.fromarray(_rgb(np.random.default_rng(8))).save(tmp_path / "secret.png")  # exists, outside the root
    list_file.write_text(f"{entry} 0\n")
    with pytest.raises(UserError, match="outside"):
        load_ood_images("svhn", tmp_path / "data", id_dataset="cifar10")


def test_corrupt_image_is_an_error_unless_skipped(tmp_path, caplog):
    folder = tmp_path / "places365"
    write_ood_folder(folder, random_images(3, seed=9))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(UserError, match="broken.jpg.*--skip-corrupt"):
        load_ood_images("places365", tmp_path, id_dataset="cifar10")
    with caplog.at_level(logging.WARNING):
        images = load_ood_images("places365", tmp_path, id_dataset="cifar10", skip_corrupt=True)
    assert len(images) == 3
    assert "skipped 1 unreadable" in caplog.text


@pytest.mark.parametrize("make_empty", ["folder", "list"])
def test_empty_set_is_an_error(tmp_path, make_empty):
    if make_empty == "folder":
        (tmp_path / "places365" / "sub").mkdir(parents=True)
    else:
        list_file = tmp_path / "benchmark_imglist" / "cifar10" / "test_places365.txt"
        list_file.parent.mkdir(parents=True)
        list_file.write_text("\n")
    with pytest.raises(UserError, match="holds no images"):
        load_ood_images("places365", tmp_path, id_dataset="cifar10")


def test_ood_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(UserError, match="not a folder"):
        load_ood_images("mine", tmp_path, id_dataset="cifar10", ood_dirs={"mine": tmp_path / "file.png"})


def test_a_folder_trained_network_scores_its_own_test_images_alike_as_id_and_as_an_ood_folder(tmp_path):
    """ID and OOD images go through one decoder and one resize: the test split of a network trained at a size other
    than its images' (40 px images, image_size 32) given back as an OOD folder gets the ID scores, image for image."""
    from fakes import write_image_folder

    from hrp_ood.cli import main

    write_image_folder(tmp_path / "data", classes=("a", "b", "c"), n_per_class=8, size=40, ext=".jpg")
    run = ["--out-dir", str(tmp_path / "runs"), "--name", "r", "--no-progress", "--device", "cpu"]
    assert (
        main(
            [
                "train",
                "--dataset",
                "folder",
                "--data-root",
                str(tmp_path / "data"),
                "--set",
                "image_size=32",
                "--model",
                "small_cnn",
                "--method",
                "ce",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--meta-size",
                "0",
                "--noise",
                "none",
                *run[:-2],
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "evaluate",
                "--ckpt",
                str(tmp_path / "runs" / "r" / "last.pt"),
                "--ood-dir",
                f"own={tmp_path / 'data' / 'test'}",
                "--ood",
                "own",
                "--postprocessor",
                "msp",
                "--out",
                str(tmp_path / "eval"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    scores = np.load(tmp_path / "eval" / "scores.npz")
    assert len(scores["msp/id"]) == 24
    np.testing.assert_array_equal(scores["msp/own"], scores["msp/id"])
    # the default output folders of two checkpoints of one run are two folders (best.pt's used to replace last.pt's)
    for ckpt in ("last.pt", "best.pt"):
        assert (
            main(
                [
                    "evaluate",
                    "--ckpt",
                    str(tmp_path / "runs" / "r" / ckpt),
                    "--ood",
                    "own",
                    "--ood-dir",
                    f"own={tmp_path / 'data' / 'test'}",
                    "--postprocessor",
                    "msp",
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
    evals = {
        p.parent.name: json.loads(p.read_text())["checkpoint"] for p in (tmp_path / "runs" / "r").glob("*/eval.json")
    }
    assert {name: Path(ckpt).name for name, ckpt in evals.items()} == {
        "eval_ensemble": "last.pt",
        "eval_ensemble_best": "best.pt",
    }


def test_an_ood_folder_follows_symlinked_sub_folders_once_and_survives_a_loop(tmp_path):
    """Symbolic links to folders are read (they were skipped silently: 1 of 201 images scored), each real folder
    once, and a link back up the tree ends the walk instead of looping."""
    from hrp_ood.data.images import folder_images

    elsewhere, ood = tmp_path / "elsewhere", tmp_path / "ood"
    for folder, count in ((elsewhere, 3), (ood / "own", 2)):
        folder.mkdir(parents=True)
        for k in range(count):
            Image.new("RGB", (8, 8), (k, 0, 0)).save(folder / f"{k}.png")
    (ood / "linked").symlink_to(elsewhere, target_is_directory=True)
    (ood / "own" / "loop").symlink_to(ood, target_is_directory=True)
    found = folder_images(ood)
    assert [p.relative_to(ood).as_posix() for p in found] == [
        "linked/0.png",
        "linked/1.png",
        "linked/2.png",
        "own/0.png",
        "own/1.png",
    ]


def test_a_training_class_folder_says_when_it_holds_sub_folders(tmp_path, caplog):
    from hrp_ood.data.images import list_images

    (tmp_path / "cat" / "more").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "0.png")
    with caplog.at_level("WARNING"):
        assert [p.name for p in list_images(tmp_path / "cat")] == ["0.png"]
    assert "1 sub-folder(s) not read (e.g. more)" in caplog.text
