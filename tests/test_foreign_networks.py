"""`hrp-ood evaluate --ckpt FILE --arch NAME`: networks trained elsewhere, saved as their own code saves them.

The reference networks are transcribed here from their sources, independently of hrp_ood.models: OpenOOD v1.5's
`ResNet18_32x32` (openood/networks/resnet18_32x32.py) and DivideMix's PreAct `ResNet18` (PreResNet.py of
LiJunnan1992/DivideMix; UNICON's PreResNet_cifar.py adds `projection_head` and `bnl`). Each is given random weights
and BatchNorm statistics, saved as its training code saves it, loaded through `hrp_ood.eval.foreign`, and must give
the same logits and penultimate features.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from fakes import write_cifar10, write_far_ood_sets, write_openood_cifar10_root
from scipy.special import softmax
from torch import nn

from hrp_ood.cli import main
from hrp_ood.data.benchmarks import BENCHMARKS
from hrp_ood.data.cifar import CIFAR10_MEAN, CIFAR10_STD
from hrp_ood.errors import UserError
from hrp_ood.eval.foreign import LinearHeadNet, build_arch, load_foreign_network, with_network_contract
from hrp_ood.eval.session import EvaluationRequest, evaluate
from hrp_ood.report.evaluations import load_evaluations

# ----------------------------------------------------------------- OpenOOD v1.5's ResNet18_32x32, transcribed


class OpenOODBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class OpenOODResNet18_32x32(nn.Module):  # noqa: N801
    def __init__(self, block=OpenOODBasicBlock, num_blocks=(2, 2, 2, 2), num_classes=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x, return_feature=False):
        feature1 = F.relu(self.bn1(self.conv1(x)))
        feature5 = self.avgpool(self.layer4(self.layer3(self.layer2(self.layer1(feature1)))))
        feature = feature5.view(feature5.size(0), -1)
        logits = self.fc(feature)
        return (logits, feature) if return_feature else logits


# ------------------------------------------------ DivideMix's PreAct ResNet18 (UNICON: + its projection), transcribed


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class DivideMixPreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class DivideMixResNet(nn.Module):
    def __init__(self, block=DivideMixPreActBlock, num_blocks=(2, 2, 2, 2), num_classes=10, unicon=False):
        super().__init__()
        self.in_planes = 64
        self.conv1 = conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        if unicon:  # UNICON's PreResNet_cifar.py
            self.projection_head = nn.Linear(512 * block.expansion, 128)
            self.bnl = nn.BatchNorm1d(128)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def feature(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.avg_pool2d(out, 4).view(x.shape[0], -1)

    def forward(self, x):
        return self.linear(self.feature(x))


# ------------------------------------------------------------------------------------------------- helpers


def randomised(net: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics (a freshly initialised BN is the identity in eval mode)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return net.eval()


def inputs(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def loaded(path: Path, arch: str, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    return with_network_contract(load_foreign_network(path, arch, num_classes), image_size).eval()


def assert_same_outputs(ours: nn.Module, logits: torch.Tensor, features: torch.Tensor, x: torch.Tensor) -> None:
    with torch.no_grad():
        got_logits, got_features = ours(x, return_feature=True)
        plain = ours(x)
    torch.testing.assert_close(got_logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_features, features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain, logits, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("saved_as", ["plain", "module.", "state_dict+module."])
def test_openood_resnet18_32x32_as_its_model_zoo_saves_it_gives_the_same_logits_and_features(tmp_path, saved_as):
    torch.manual_seed(0)
    theirs = randomised(OpenOODResNet18_32x32(num_classes=10), seed=1)
    state = theirs.state_dict()
    if saved_as != "plain":  # DataParallel's names
        state = {f"module.{k}": v for k, v in state.items()}
    if saved_as.startswith("state_dict"):
        state = {"state_dict": state, "epoch": 100}
    torch.save(state, tmp_path / "best.ckpt")

    x = inputs()
    with torch.no_grad():
        logits, features = theirs(x, return_feature=True)
    ours = loaded(tmp_path / "best.ckpt", "resnet18_32x32")
    assert_same_outputs(ours, logits, features, x)
    weight, bias = ours.get_fc()
    np.testing.assert_array_equal(weight, theirs.fc.weight.detach().numpy())
    np.testing.assert_array_equal(bias, theirs.fc.bias.detach().numpy())


@pytest.mark.parametrize("code", ["dividemix", "unicon"])
def test_dividemix_and_unicon_preact_resnet18_read_as_preact_resnet18(tmp_path, code):
    torch.manual_seed(0)
    theirs = randomised(DivideMixResNet(num_classes=10, unicon=code == "unicon"), seed=2)
    if code == "dividemix":  # Train_clothing1M.py: torch.save(net.state_dict(), ...)
        torch.save(theirs.state_dict(), tmp_path / "net1.pth.tar")
    else:  # UNICON's Train_cifar.py: a dict with the weights under 'net' and the run's facts beside them
        torch.save(
            {"net": theirs.state_dict(), "Noise_Ratio": 0.5, "Accuracy": 91.0, "epoch": 3}, tmp_path / "net1.pth.tar"
        )

    x = inputs(seed=1)
    with torch.no_grad():
        features = theirs.feature(x)
        logits = theirs(x)
    foreign = load_foreign_network(tmp_path / "net1.pth.tar", "preact_resnet18", 10)
    assert any("linear." in note for note in foreign.layout)
    assert any("projection_head." in note for note in foreign.layout) == (code == "unicon")
    assert_same_outputs(with_network_contract(foreign, 32), logits, features, x)


def test_torchvision_model_by_name_gives_its_logits_and_the_input_of_its_fc_as_features(tmp_path):
    torch.manual_seed(0)
    theirs = randomised(torchvision.models.resnet18(num_classes=10), seed=3)
    torch.save(theirs.state_dict(), tmp_path / "resnet18.pth")

    x = inputs(size=32, seed=2)
    with torch.no_grad():  # the penultimate feature computed layer by layer, without hooks
        h = theirs.maxpool(theirs.relu(theirs.bn1(theirs.conv1(x))))
        h = theirs.layer4(theirs.layer3(theirs.layer2(theirs.layer1(h))))
        features = torch.flatten(theirs.avgpool(h), 1)
        logits = theirs(x)
    ours = loaded(tmp_path / "resnet18.pth", "torchvision:resnet18")
    assert isinstance(ours, LinearHeadNet) and ours.head_name == "fc"
    assert (ours.num_classes, ours.num_features) == (10, 512)
    assert_same_outputs(ours, logits, features, x)
    with torch.no_grad():  # ReAct: the classifier on the clipped feature
        torch.testing.assert_close(ours.forward_threshold(x, 0.1), theirs.fc(features.clip(max=0.1)))


def test_torchvision_classifier_inside_a_sequential_is_found_by_the_forward():
    net = torchvision.models.mobilenet_v3_small(num_classes=7)
    ours = LinearHeadNet(net.eval(), image_size=32, name="torchvision:mobilenet_v3_small")
    assert ours.head_name == "classifier.3" and ours.num_classes == 7


def test_a_network_whose_logits_are_not_an_nn_linear_output_is_a_one_line_error():
    conv_head = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(UserError, match="not the output of an nn.Linear"):
        LinearHeadNet(conv_head, image_size=8, name="conv")
    scaled = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5), nn.Tanh())  # something after the last Linear
    with pytest.raises(UserError, match="not the output of an nn.Linear"):
        LinearHeadNet(scaled, image_size=8, name="scaled")


def test_weights_that_fit_no_arch_name_the_first_mismatching_tensors_and_the_archs_they_fit(tmp_path):
    torch.save(DivideMixResNet(num_classes=10).state_dict(), tmp_path / "preact.pth")
    with pytest.raises(UserError) as err:
        load_foreign_network(tmp_path / "preact.pth", "resnet18_32x32", 10)
    message = str(err.value)
    assert "\n" not in message
    assert "does not fit --arch resnet18_32x32" in message
    assert "no layer2.0.shortcut.1.weight" in message  # the first tensor OpenOOD's layout has and these lack
    assert message.endswith("they fit --arch preact_resnet18")

    torch.save(OpenOODResNet18_32x32(num_classes=100).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError) as err:
        load_foreign_network(tmp_path / "r18.pth", "resnet18_32x32", 10)
    assert "another class count (the classifier fc has 100 outputs)" in str(err.value)
    assert str(err.value).endswith("they fit --arch resnet18_32x32 --num-classes 100")

    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "tv.pth")
    with pytest.raises(UserError) as err:
        load_foreign_network(tmp_path / "tv.pth", "resnet18_32x32", 10)
    assert "extra layer2.0.downsample.0.weight" in str(err.value)  # torchvision's name for the shortcut
    assert str(err.value).endswith("they fit --arch torchvision:resnet18")


def test_timm_arch_without_timm_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError, installed or not
    with pytest.raises(UserError, match=r"^--arch timm:resnet18 needs timm, which is not installed; pip install timm$"):
        build_arch("timm:resnet18", 10)


def test_unknown_arch_names_and_hrp_checkpoint_flags_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="torchvision:resnet50"):
        build_arch("torchvision:resnet5O", 10)
    with pytest.raises(UserError, match="unknown --arch 'resnet99'"):
        build_arch("resnet99", 10)
    with pytest.raises(UserError, match="--num-classes describe a network trained elsewhere: add --arch"):
        evaluate(EvaluationRequest(ckpt=tmp_path / "last.pt", num_classes=10))
    with pytest.raises(UserError, match="needs its ID data: give --benchmark NAME"):
        evaluate(EvaluationRequest(ckpt=tmp_path / "w.pth", arch="resnet18_32x32", num_classes=10))


def test_weights_files_that_hold_no_state_dict_are_one_line_errors(tmp_path):
    torch.save(nn.Linear(3, 2), tmp_path / "pickled_module.pt")  # the network object: unpickling it could run code
    with pytest.raises(UserError, match=r"refusing to load .* save the network's state dict"):
        load_foreign_network(tmp_path / "pickled_module.pt", "resnet18_32x32", 10)
    torch.save({"acc": 91.0, "nets": [nn.Linear(3, 2).state_dict()]}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"holds no state dict .*; its keys: acc, nets; save torch.save"):
        load_foreign_network(tmp_path / "other.pt", "resnet18_32x32", 10)
    with pytest.raises(UserError, match="weights file .* not found"):
        load_foreign_network(tmp_path / "absent.pt", "resnet18_32x32", 10)


ID_DATA = {  # how the ID data is named → (flags, the normalisation eval.json must record and the pass must use)
    "dataset": ([], CIFAR10_MEAN, CIFAR10_STD),
    "dataset+mean/std": (["--mean", "0.5,0.4,0.3", "--std", "0.2,0.25,0.3"], (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
    "benchmark": (["--benchmark", "cifar10"], BENCHMARKS["cifar10"].mean, BENCHMARKS["cifar10"].std),
}


@pytest.mark.parametrize("id_data", list(ID_DATA))
def test_evaluate_cli_scores_an_openood_checkpoint_and_records_what_was_evaluated(tmp_path, id_data):
    flags, mean, std = ID_DATA[id_data]
    if id_data == "benchmark":  # OpenOOD's lists (ID and OOD) under one root; --num-classes from the benchmark
        written = write_openood_cifar10_root(tmp_path / "openood", n_train=50, n_test=20, n_ood=20)
        test_images, test_labels = written["test"]
        flags = [*flags, "--data-root", str(tmp_path / "openood")]
    else:
        split = write_cifar10(tmp_path / "cifar", n_train=50, n_test=20, seed=0)
        write_far_ood_sets(tmp_path / "ood", n=20, seed=0)
        test_images, test_labels = split.test_images, split.test_labels
        flags = [*flags, "--num-classes", "10", "--dataset", "cifar10", "--id-data-root", str(tmp_path / "cifar")]
        flags += ["--data-root", str(tmp_path / "ood")]
    torch.manual_seed(0)
    theirs = randomised(OpenOODResNet18_32x32(num_classes=10), seed=4)
    weights = tmp_path / "s0" / "best.ckpt"
    weights.parent.mkdir()
    torch.save({f"module.{k}": v for k, v in theirs.state_dict().items()}, weights)

    args = ["evaluate", "--ckpt", str(weights), "--arch", "resnet18_32x32", *flags, "--ood", "svhn,textures"]
    assert main([*args, "--postprocessor", "msp,mds,knn,vim", "--device", "cpu", "--no-progress"]) == 0

    out = tmp_path / "s0" / "eval_best"
    report = json.loads((out / "eval.json").read_text())
    assert report["network"] == {
        "source": "external",
        "arch": "resnet18_32x32",
        "weights": str(weights),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "num_classes": 10,
        "weights_key": None,
        "key_layout": ["module. prefix removed"],
    }
    # 50 ID training images, 512-d features: the shared covariance is singular, said once and recorded
    (warning,) = report["warnings"]["mds"]
    assert "rank 49 of 512; fitted on 50 ID training samples in 10 classes" in warning
    assert report["method"] == "resnet18_32x32" and report["dataset"] == "cifar10"
    assert report["preprocessing"]["mean"] == pytest.approx(mean)
    assert report["preprocessing"]["std"] == pytest.approx(std)
    assert {(row["postprocessor"], row["ood"]) for row in report["results"]} >= {
        (m, s) for m in ("msp", "mds", "knn", "vim") for s in ("svhn", "textures", "mean")
    }

    # ID accuracy and MSP scores from OpenOOD's network itself, on the test images normalised as recorded
    x = torch.as_tensor(test_images).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = theirs(x).numpy()
    assert report["id_accuracy"] == pytest.approx(100 * np.mean(logits.argmax(1) == test_labels))
    with np.load(out / "scores.npz") as scores:
        np.testing.assert_allclose(scores["msp/id"], softmax(logits, axis=1).max(1), rtol=1e-4, atol=1e-6)
    frame = load_evaluations([out / "eval.json"])  # what `hrp-ood report` reads
    assert set(frame["method"]) == {"resnet18_32x32"} and set(frame["noise"]) == {"unknown"}


# ----------------------------------------------------------------- timm's CheckpointSaver, values that cannot be


def timm_checkpoint(state_dict: dict, ema: dict | None = None) -> dict:
    """What timm's CheckpointSaver (timm/utils/checkpoint_saver.py, `_save`) writes: the weights under state_dict,
    the optimizer's state, train.py's argparse.Namespace under args, the EMA weights under state_dict_ema."""
    saved = {
        "epoch": 3,
        "arch": "resnet18_32x32",
        "state_dict": state_dict,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "args": argparse.Namespace(model="resnet18_32x32", lr=0.1, epochs=100, mean=None, smoothing=0.1),
        "version": 2,
        "metric": 91.5,
    }
    if ema is not None:
        saved["state_dict_ema"] = ema
    return saved


@pytest.mark.parametrize("with_ema", [True, False])
def test_a_timm_checkpoint_saver_file_loads_weights_only_preferring_the_ema_weights(tmp_path, with_ema, caplog):
    trained = randomised(OpenOODResNet18_32x32(num_classes=10), seed=5)
    ema = randomised(OpenOODResNet18_32x32(num_classes=10), seed=6)
    torch.save(timm_checkpoint(trained.state_dict(), ema.state_dict() if with_ema else None), tmp_path / "last.pth.tar")
    expected = ema if with_ema else trained
    caplog.set_level("INFO")
    x = inputs()
    with torch.no_grad():
        logits, features = expected(x, return_feature=True)
    foreign = load_foreign_network(tmp_path / "last.pth.tar", "resnet18_32x32", 10)
    assert foreign.describe()["weights_key"] == ("state_dict_ema" if with_ema else "state_dict")
    assert_same_outputs(with_network_contract(foreign, 32), logits, features, x)
    assert f"weights read from {tmp_path / 'last.pth.tar'}[{foreign.weights_key!r}]" in caplog.text


def test_a_timm_checkpoint_with_another_class_than_argparse_namespace_is_still_refused(tmp_path):
    saved = timm_checkpoint(OpenOODResNet18_32x32(num_classes=10).state_dict())
    saved["args"] = argparse._StoreAction(["--lr"], "lr")  # any other class: unpickling calls it
    torch.save(saved, tmp_path / "last.pth.tar")
    with pytest.raises(UserError, match=r"refusing to load .*argparse._StoreAction, so it could run code"):
        load_foreign_network(tmp_path / "last.pth.tar", "resnet18_32x32", 10)


def test_timms_own_checkpoint_saver_file_loads(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.utils import CheckpointSaver, ModelEmaV2

    net = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    ema = ModelEmaV2(net, decay=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    ema.update(net)  # the EMA now differs from the network
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    args = argparse.Namespace(model="resnet10t", lr=0.1, num_classes=10)
    saver = CheckpointSaver(net, optimizer, args=args, model_ema=ema, checkpoint_dir=str(tmp_path), max_history=1)
    saver.save_checkpoint(epoch=0, metric=1.0)
    (path,) = tmp_path.glob("checkpoint-0.pth.tar")
    foreign = load_foreign_network(path, "timm:resnet10t", 10)
    assert foreign.weights_key == "state_dict_ema"
    x = inputs(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(foreign.net.eval()(x), ema.module.eval()(x))


def _sparse(state: dict) -> dict:
    return {**state, "fc.weight": state["fc.weight"].to_sparse()}


def _meta(state: dict) -> dict:
    return {**state, "fc.weight": torch.empty(state["fc.weight"].shape, device="meta")}


def _set(name: str, value: float | None = None, dtype: torch.dtype | None = None):
    def edit(state: dict) -> dict:
        tensor = state[name].clone() if dtype is None else state[name].to(dtype)
        if value is not None:
            tensor.view(-1)[0] = value
        return {**state, name: tensor}

    return edit


BAD_VALUES = {
    "nan weight": (_set("conv1.weight", math.nan), r"conv1.weight holds 1 NaN/inf value\(s\) of 1728"),
    "inf weight": (_set("fc.bias", math.inf), r"fc.bias holds 1 NaN/inf value"),
    "negative BN variance": (_set("bn1.running_var", -1.0), r"bn1.running_var \(BatchNorm statistics\) holds 1 neg"),
    "integer weights": (_set("fc.weight", dtype=torch.int64), r"fc.weight holds torch.int64 values where the network"),
    "complex weights": (_set("fc.weight", dtype=torch.complex64), r"fc.weight holds torch.complex64 values"),
    "sparse tensor": (_sparse, r"fc.weight is a sparse tensor \(torch.sparse_coo\); save dense weights"),
    "meta tensor": (_meta, r"fc.weight is a meta tensor, which holds no values"),
}


@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_weights_that_cannot_be_evaluated_are_one_line_errors(tmp_path, bad):
    edit, message = BAD_VALUES[bad]
    torch.save(edit(randomised(OpenOODResNet18_32x32(num_classes=10), seed=1).state_dict()), tmp_path / "w.pt")
    with pytest.raises(UserError, match=rf"^cannot evaluate the weights of .*w.pt: {message}"):
        load_foreign_network(tmp_path / "w.pt", "resnet18_32x32", 10)


BAD_FLAGS = {
    "std 0": (["--mean", "0.5,0.5,0.5", "--std", "0.2,0,0.2"], "--std needs three finite values (R,G,B), all positive"),
    "std nan": (["--mean", "0.5,0.5,0.5", "--std", "nan,0.2,0.2"], "--std needs three finite values"),
    "std inf": (["--mean", "0.5,0.5,0.5", "--std", "inf,0.2,0.2"], "--std needs three finite values"),
    "mean nan": (["--mean", "0.5,nan,0.5", "--std", "0.2,0.2,0.2"], "--mean needs three finite values"),
    "mean inf": (["--mean", "0.5,-inf,0.5", "--std", "0.2,0.2,0.2"], "--mean needs three finite values"),
    "image size": (["--image-size", "100000"], "--image-size must be a number of pixels from 1 to 4096, got 100000"),
}


@pytest.mark.parametrize("bad", list(BAD_FLAGS))
def test_bad_normalisation_and_image_size_are_one_line_errors(tmp_path, capsys, bad):
    flags, message = BAD_FLAGS[bad]
    torch.save(OpenOODResNet18_32x32(num_classes=10).state_dict(), tmp_path / "w.pt")
    args = ["evaluate", "--ckpt", str(tmp_path / "w.pt"), "--arch", "resnet18_32x32", "--num-classes", "10"]
    assert main([*args, "--dataset", "cifar10", "--data-root", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_non_finite_outputs_are_one_line_naming_the_normalisation(tmp_path, capsys):
    write_cifar10(tmp_path / "cifar", n_train=20, n_test=10, seed=0)
    write_far_ood_sets(tmp_path / "ood", n=10, seed=0)
    torch.save(randomised(OpenOODResNet18_32x32(num_classes=10), seed=1).state_dict(), tmp_path / "w.pt")
    args = ["evaluate", "--ckpt", str(tmp_path / "w.pt"), "--arch", "resnet18_32x32", "--num-classes", "10"]
    args += ["--dataset", "cifar10", "--id-data-root", str(tmp_path / "cifar"), "--data-root", str(tmp_path / "ood")]
    args += ["--ood", "svhn", "--no-progress", "--device", "cpu", "--mean", "0.5,0.5,0.5"]
    for postprocessors, where, values in (("msp", "ID test", 100), ("msp,mds", "ID train", 200)):  # mds: fit first
        tiny = ["--std", "1e-300,1e-300,1e-300", "--postprocessor", postprocessors]  # 0 in float32: x / 0
        assert main([*args, *tiny]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("error:") == 1, err  # the log lines before it, then one error line
        error = err.splitlines()[-1]
        assert f"the network's logits on {where} hold {values} NaN/inf value(s) of {values}" in error  # 10 classes
        assert "--mean/--std: a tiny --std overflows" in error and not (tmp_path / "eval_w" / "eval.json").exists()
