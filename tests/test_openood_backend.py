"""`--backend openood`: our loaders in OpenOOD's batch format; OpenOOD's own postprocessors when installed."""

import numpy as np
import pytest
import torch

from hrp_ood.eval.openood_backend import OpenOODLoader


def test_loader_yields_openood_batches_normalised_with_the_id_statistics():
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).view(5, 3, 2, 2)
    loader = OpenOODLoader(images, np.array([0, 1, 2, 3, 4]), (0.5, 0.5, 0.5), (0.25, 0.5, 1.0), 2,
                           torch.device("cpu"))
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    assert [len(b["data"]) for b in batches] == [2, 2, 1]
    data = torch.cat([b["data"] for b in batches])
    expected = (images.float() / 255 - 0.5) / torch.tensor([0.25, 0.5, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(data, expected)
    assert torch.cat([b["label"] for b in batches]).tolist() == [0, 1, 2, 3, 4]
    assert next(iter(OpenOODLoader(images, None, (0,) * 3, (1,) * 3, 5, torch.device("cpu"))))["label"].tolist() == [-1] * 5


def test_openood_msp_equals_ours(tmp_path):
    pytest.importorskip("openood")
    from hrp_ood.data import DataBundle
    from hrp_ood.eval.evaluate import run_evaluation
    from hrp_ood.eval.openood_backend import evaluate_with_openood
    from hrp_ood.models import create_model

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = np.arange(40) % 10
    bundle = DataBundle(name="cifar10", classes=[str(c) for c in range(10)], image_size=32, train_images=images,
                        train_labels=labels, test_images=images, test_labels=labels, mean=(0.5,) * 3, std=(0.25,) * 3)
    net = create_model("small_cnn", num_classes=10).eval()
    ood = {"noise": torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g)}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    theirs = evaluate_with_openood(net, bundle, ood, ["msp"], device=device)
    ours = run_evaluation(net, bundle, ood, ["msp"], cache_dir=tmp_path, cache_key="t",
                          device=device)
    assert theirs.rows[0]["auroc"] == pytest.approx(ours.rows[0]["auroc"], abs=1e-3)
