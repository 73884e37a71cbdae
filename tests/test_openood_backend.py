"""`--backend openood`: our loaders in OpenOOD's batch format; OpenOOD's own postprocessors when installed, and
OpenOOD v1.5's device and dataset-table code paths through a stand-in package otherwise: what runs on CPU scores
exactly like our backend, what cannot is refused in one line before anything is loaded."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hrp_ood.postprocessors import create_openood_postprocessor, openood_available
from hrp_ood.postprocessors.openood_adapter import check_openood_backend

from hrp_ood.errors import UserError
from hrp_ood.eval.evaluate import run_evaluation
from hrp_ood.eval.openood_backend import OpenOODLoader, evaluate_with_openood


def test_loader_yields_openood_batches_normalised_with_the_id_statistics():
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).view(5, 3, 2, 2)
    loader = OpenOODLoader(images, np.array([0, 1, 2, 3, 4]), (0.5, 0.5, 0.5), (0.25, 0.5, 1.0), 2, torch.device("cpu"))
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    assert [len(b["data"]) for b in batches] == [2, 2, 1]
    data = torch.cat([b["data"] for b in batches])
    expected = (images.float() / 255 - 0.5) / torch.tensor([0.25, 0.5, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(data, expected)
    assert torch.cat([b["label"] for b in batches]).tolist() == [0, 1, 2, 3, 4]
    assert (
        next(iter(OpenOODLoader(images, None, (0,) * 3, (1,) * 3, 5, torch.device("cpu"))))["label"].tolist()
        == [-1] * 5
    )


def test_openood_msp_equals_ours(tmp_path):
    pytest.importorskip("openood")
    from hrp_ood.data import DataBundle
    from hrp_ood.models import create_model

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = np.arange(40) % 10
    bundle = DataBundle(
        name="cifar10",
        classes=[str(c) for c in range(10)],
        image_size=32,
        train_images=images,
        train_labels=labels,
        test_images=images,
        test_labels=labels,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )
    net = create_model("small_cnn", num_classes=10).eval()
    ood = {"noise": torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g)}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    theirs = evaluate_with_openood(net, bundle, ood, ["msp"], device=device)
    ours = run_evaluation(net, bundle, ood, ["msp"], cache_dir=tmp_path, cache_key="t", device=device)
    assert theirs.rows[0]["auroc"] == pytest.approx(ours.rows[0]["auroc"], abs=1e-3)


# ---- OpenOOD's code paths through a stand-in package (tests/fake_openood: openood is not on the package index) --

FAKE_OPENOOD = Path(__file__).parent / "fake_openood"
CPU_METHODS = ["msp", "ebo", "maxlogit", "odin"]


@pytest.fixture
def fake_openood(monkeypatch):
    if openood_available():
        pytest.skip("the real openood is installed; these tests exercise the stand-in")
    monkeypatch.syspath_prepend(str(FAKE_OPENOOD))
    yield
    for name in [m for m in sys.modules if m == "openood" or m.startswith("openood.")]:
        del sys.modules[name]


def _toy():
    from test_evaluate import CountingNet, _bundle, _ood

    return CountingNet(), _bundle(), _ood()


def test_cpu_capable_methods_run_on_cpu_and_score_like_ours(fake_openood, tmp_path):
    net, bundle, ood = _toy()
    theirs = evaluate_with_openood(net, bundle, ood, CPU_METHODS, device=torch.device("cpu"), batch_size=16)
    ours = run_evaluation(net, bundle, ood, CPU_METHODS, cache_dir=tmp_path, cache_key="ck", batch_size=16)
    assert set(theirs.scores) == set(ours.scores)
    for key, values in ours.scores.items():  # odin too: its input std is passed explicitly, not looked up by name
        np.testing.assert_allclose(theirs.scores[key], values, rtol=1e-5, atol=1e-6, err_msg=key)
    for mine, other in zip(ours.rows, theirs.rows):
        assert (mine["postprocessor"], mine["ood"]) == (other["postprocessor"], other["ood"])
        assert mine["auroc"] == pytest.approx(other["auroc"], abs=1e-6)
    assert theirs.settings["tuning"] == {"enabled": False, "openood_would_tune": ["odin"]}


def test_openood_search_on_cpu_chooses_what_ours_chooses(fake_openood, tmp_path):
    from test_tuning import _validation

    net, bundle, ood = _toy()
    theirs = evaluate_with_openood(
        net, bundle, ood, ["odin"], device=torch.device("cpu"), validation=_validation(), tune=True
    )
    ours = run_evaluation(
        net, bundle, ood, ["odin"], cache_dir=tmp_path, cache_key="ck", validation=_validation(), tune=True
    )
    mine, other = ours.settings["tuning"]["searched"]["odin"], theirs.settings["tuning"]["searched"]["odin"]
    assert other["chosen"] == mine["chosen"]
    assert [c["val_auroc"] for c in other["candidates"]] == pytest.approx(
        [c["val_auroc"] for c in mine["candidates"]], abs=1e-6
    )
    np.testing.assert_allclose(theirs.scores["odin/id"], ours.scores["odin/id"], rtol=1e-5)
    assert theirs.settings["hyperparameters"]["odin"] == mine["chosen"]


@pytest.mark.parametrize("method", ["mds", "knn", "vim", "react"])
def test_methods_whose_setup_needs_cuda_are_refused_on_cpu_before_anything_is_loaded(
    fake_openood, tmp_path, capsys, method
):
    from hrp_ood.cli import main

    assert (
        main(
            [
                "evaluate",
                "--ckpt",
                str(tmp_path / "not_there.pt"),
                "--backend",
                "openood",
                "--device",
                "cpu",
                "--postprocessor",
                f"msp,{method}",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--backend openood cannot run {method} on CPU: OpenOOD's" in err[0]
    assert ".cuda()" in err[0] and not (tmp_path / "out").exists()


def test_mds_needs_a_dataset_openoods_class_table_knows(fake_openood):
    with pytest.raises(UserError, match="cannot run mds on folder: .*give --benchmark"):
        check_openood_backend(["msp", "mds"], "cuda", dataset="folder")
    check_openood_backend(["msp", "mds"], "cuda", dataset="cifar10")
    mds = create_openood_postprocessor("mds", dataset="cifar10", num_classes=10)
    assert mds.num_classes == 10 and mds.config.dataset.num_classes == 10
    odin = create_openood_postprocessor("odin", dataset="folder", input_std=(0.2, 0.3, 0.4))
    assert odin.input_std == [0.2, 0.3, 0.4]  # OpenOOD would fall back to 0.5 for an unknown dataset


def test_without_openood_the_backend_says_how_to_install_before_loading(tmp_path, capsys):
    if openood_available():
        pytest.skip("openood is installed")
    from hrp_ood.cli import main

    assert main(["evaluate", "--ckpt", str(tmp_path / "not_there.pt"), "--backend", "openood"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the openood package: pip install" in err[0]
