"""Postprocessors: scores vs independent numpy/scipy/sklearn references, the registry, and OpenOOD's interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hrp_ood.postprocessors import (
    Postprocessor,
    create_openood_postprocessor,
    create_postprocessor,
    list_postprocessors,
    openood_available,
    register_postprocessor,
)
from hrp_ood.postprocessors.featureset import FeatureSet
from hrp_ood.postprocessors.openood_adapter import OPENOOD_DEFAULTS, openood_config
from scipy.spatial.distance import cdist, mahalanobis
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hrp_ood.errors import UserError
from hrp_ood.eval.metrics import ood_metrics

ALL = ["ebo", "knn", "maxlogit", "mds", "msp", "odin", "react", "vim"]


# ---- synthetic problems --------------------------------------------------------------------------------


def random_problem(seed: int = 0, n_train: int = 400, n_test: int = 60, dim: int = 24, classes: int = 4):
    """Non-negative (post-ReLU-like) random features, a random fc head, logits consistent with both."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(classes, dim)).astype(np.float32)
    bias = rng.normal(size=classes).astype(np.float32)

    def featureset(n: int, shift: float = 0.0, labelled: bool = True) -> FeatureSet:
        labels = rng.integers(0, classes, n)
        features = np.maximum(rng.normal(size=(n, dim)) + 0.5 * labels[:, None] + shift, 0).astype(np.float32)
        return FeatureSet(features @ weight.T + bias, features, labels if labelled else None)

    return featureset(n_train), featureset(n_test, labelled=False), (weight, bias)


def separable_problem(seed: int = 0, n_train: int = 1500, n_test: int = 300, dim: int = 300, classes: int = 5):
    """ID: class means of norm 10 along orthonormal directions + N(0, I); OOD: the same noise shifted by 10
    along a direction orthogonal to every class mean. fc rows = unit class directions, b = 0."""
    rng = np.random.default_rng(seed)
    directions, _ = np.linalg.qr(rng.normal(size=(dim, classes + 1)))
    weight = directions[:, :classes].T.astype(np.float32)
    means, shift = 10 * weight, 10 * directions[:, classes]

    def featureset(n: int, ood: bool = False) -> FeatureSet:
        labels = rng.integers(0, classes, n)
        centre = shift if ood else means[labels]
        features = (centre + rng.normal(size=(n, dim))).astype(np.float32)
        return FeatureSet(features @ weight.T, features, None if ood else labels)

    return (
        featureset(n_train),
        featureset(n_test),
        featureset(n_test, ood=True),
        (weight, np.zeros(classes, np.float32)),
    )


class LinearHead(nn.Module):
    """forward(x) -> logits = W · flatten(x) + b: lets the network path see exactly the cached features."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(weight))
            self.fc.bias.copy_(torch.from_numpy(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def seeded(module: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter from N(0, 0.5²) with a private generator (no global seeding)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=g))
    return module


def as_images(features: np.ndarray) -> torch.Tensor:
    """(N, 3·H·W) features as (N, 3, H, W) images whose flattening gives the features back."""
    side = int(np.sqrt(features.shape[1] // 3))
    return torch.from_numpy(features).view(-1, 3, side, side)


def fitted(name: str, train: FeatureSet, fc, **kwargs) -> Postprocessor:
    return create_postprocessor(name, **kwargs).fit(train, fc)


# ---- every registered postprocessor --------------------------------------------------------------------


def test_registry_lists_every_method():
    assert list_postprocessors() == ALL


@pytest.mark.parametrize("name", ALL)
def test_every_postprocessor_separates_shifted_ood_with_its_defaults(name):
    train, id_test, ood_test, fc = separable_problem()
    postprocessor = create_postprocessor(name).fit(train, fc)
    if postprocessor.needs_network:  # ODIN's default perturbs the input through the network
        net = LinearHead(*fc).eval()
        id_scores = postprocessor.score_batch(net, as_images(id_test.features)).numpy()
        ood_scores = postprocessor.score_batch(net, as_images(ood_test.features)).numpy()
    else:
        id_scores, ood_scores = postprocessor.score(id_test), postprocessor.score(ood_test)
    for scores in (id_scores, ood_scores):
        assert scores.shape == (300,) and np.isfinite(scores).all()
    assert ood_metrics(id_scores, ood_scores)["auroc"] > 90


SMALL = {"knn": {"K": 5}, "vim": {"dim": 8}, "odin": {"noise": 0.0}}


@pytest.mark.parametrize("name", ALL)
def test_every_postprocessor_runs_on_random_featuresets(name):
    train, test, fc = random_problem(seed=ALL.index(name))
    postprocessor = create_postprocessor(name, **SMALL.get(name, {}))
    assert postprocessor.name == name
    scores = postprocessor.fit(train, fc).score(test)
    assert scores.shape == (len(test),) and np.isfinite(scores).all()
    assert np.unique(scores).size > len(test) // 2  # a real score, not a constant


# ---- scores vs independent references -------------------------------------------------------------------


def test_msp_maxlogit_and_energy_match_scipy():
    _, test, fc = random_problem()
    z = test.logits.astype(np.float64)
    np.testing.assert_allclose(create_postprocessor("msp").score(test), softmax(z, axis=1).max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(create_postprocessor("maxlogit").score(test), z.max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(create_postprocessor("ebo").score(test), logsumexp(z, axis=1), rtol=1e-5)
    np.testing.assert_allclose(
        create_postprocessor("ebo", temperature=2.5).score(test), 2.5 * logsumexp(z / 2.5, axis=1), rtol=1e-5
    )


def reference_mds(train: FeatureSet, queries: np.ndarray) -> np.ndarray:
    """sklearn precision on class-centred features + scipy's Mahalanobis distance, one row at a time."""
    features = train.features.astype(np.float64)
    classes = np.unique(train.labels)
    means = {c: features[train.labels == c].mean(axis=0) for c in classes}
    centred = np.concatenate([features[train.labels == c] - means[c] for c in classes])
    precision = EmpiricalCovariance(assume_centered=False).fit(centred).precision_
    return np.array([max(-(mahalanobis(f, means[c], precision) ** 2) for c in classes) for f in queries])


def test_mds_matches_sklearn_and_scipy_mahalanobis():
    train, test, fc = random_problem()
    scores = fitted("mds", train, fc).score(test)
    np.testing.assert_allclose(scores[:6], reference_mds(train, test.features[:6].astype(np.float64)), rtol=2e-4)


def test_mds_uses_the_labels_it_is_given_and_skips_empty_classes():
    train, test, fc = random_problem()
    relabelled = FeatureSet(train.logits, train.features, np.where(train.labels == 3, 0, train.labels))
    scores = fitted("mds", relabelled, fc).score(test)  # class 3 has no sample now
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores[:4], reference_mds(relabelled, test.features[:4].astype(np.float64)), rtol=2e-4)
    assert not np.allclose(scores, fitted("mds", train, fc).score(test))


def test_mds_needs_valid_labels():
    train, _, fc = random_problem()
    with pytest.raises(ValueError, match="labels"):
        fitted("mds", FeatureSet(train.logits, train.features, None), fc)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        fitted("mds", FeatureSet(train.logits, train.features, train.labels + 1), fc)


def test_react_matches_numpy_clip_then_energy():
    train, test, (weight, bias) = random_problem()
    react = fitted("react", train, (weight, bias))
    threshold = np.percentile(train.features, 90)
    assert react.threshold == pytest.approx(threshold)
    clipped_logits = np.minimum(test.features, threshold).astype(np.float64) @ weight.T + bias
    np.testing.assert_allclose(react.score(test), logsumexp(clipped_logits, axis=1), rtol=1e-5)
    pred, _ = react.postprocess(LinearFeatureNet(weight, bias), torch.from_numpy(test.features))
    np.testing.assert_array_equal(pred.numpy(), clipped_logits.argmax(axis=1))


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_knn_matches_scipy_cdist(chunk_size):
    train, test, fc = random_problem()
    normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    distances = cdist(
        normalise(test.features.astype(np.float64)), normalise(train.features.astype(np.float64)), "sqeuclidean"
    )
    expected = -np.sort(distances, axis=1)[:, 9]
    np.testing.assert_allclose(fitted("knn", train, fc, K=10, chunk_size=chunk_size).score(test), expected, atol=1e-5)


def reference_vim(train: FeatureSet, test: FeatureSet, weight: np.ndarray, bias: np.ndarray, dim: int) -> np.ndarray:
    """OpenOOD v1.5's VIMPostprocessor transcribed in numpy (np.linalg.eig, argsort(-eig)[dim:])."""
    u = -np.matmul(np.linalg.pinv(weight), bias)
    covariance = EmpiricalCovariance(assume_centered=True).fit(train.features - u).covariance_
    eig_vals, eigen_vectors = np.linalg.eig(covariance)
    ns = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[dim:]]).T)
    logit_train = train.features @ weight.T + bias
    alpha = logit_train.max(axis=-1).mean() / np.linalg.norm((train.features - u) @ ns, axis=-1).mean()
    vlogit = np.linalg.norm((test.features - u) @ ns, axis=-1) * alpha
    return -vlogit + logsumexp(test.features @ weight.T + bias, axis=-1)


def test_vim_matches_openood_numpy_transcription():
    train, test, (weight, bias) = random_problem()
    scores = fitted("vim", train, (weight, bias), dim=10).score(test)
    np.testing.assert_allclose(scores, reference_vim(train, test, weight, bias, dim=10), rtol=1e-4, atol=1e-3)


def test_vim_dim_must_be_below_the_feature_dimension_and_defaults_to_half_of_it():
    train, _, fc = random_problem(dim=24)
    with pytest.raises(UserError, match="smaller"):
        fitted("vim", train, fc, dim=24)
    assert fitted("vim", train, fc).dim == 12  # OpenOOD's 256 for 512-d features


def reference_odin(net: nn.Module, data: torch.Tensor, temperature: float, noise: float, std) -> np.ndarray:
    """OpenOOD's ODINPostprocessor.postprocess, written out with loss.backward() on data.grad."""
    data = data.clone().requires_grad_(True)
    output = net(data)
    loss = nn.CrossEntropyLoss()(output / temperature, output.detach().argmax(axis=1))
    loss.backward()
    gradient = (torch.ge(data.grad.detach(), 0).float() - 0.5) * 2
    for channel in range(3):
        gradient[:, channel] = gradient[:, channel] / std[channel]
    perturbed = torch.add(data.detach(), gradient, alpha=-noise)
    output = net(perturbed).detach() / temperature
    return torch.softmax(output, dim=1).max(dim=1).values.numpy()


def test_odin_network_path_matches_openoods_procedure():
    net = seeded(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 5)), 0)
    net.eval()
    x = torch.randn(12, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    std = (0.2470, 0.2435, 0.2616)
    odin = create_postprocessor("odin", input_std=std)
    assert odin.needs_network
    scores = odin.score_batch(net, x).numpy()
    assert all(p.grad is None for p in net.parameters())  # gradients w.r.t. the input only
    np.testing.assert_allclose(scores, reference_odin(net, x, 1000.0, 0.0014, std), rtol=1e-6)
    plain = create_postprocessor("odin", noise=0.0)
    assert not plain.needs_network
    with torch.no_grad():
        unperturbed = plain.score(FeatureSet(net(x).numpy(), np.zeros((12, 0), np.float32)))
    assert not np.allclose(scores, unperturbed, rtol=1e-7, atol=0)  # the perturbation did something
    with pytest.raises(ValueError, match="needs the network"):
        odin.score(FeatureSet(np.zeros((2, 5), np.float32), np.zeros((2, 0), np.float32)))


def test_odin_without_noise_is_tempered_msp_of_cached_logits():
    _, test, _ = random_problem()
    scores = create_postprocessor("odin", temperature=7.0, noise=0.0).score(test)
    np.testing.assert_allclose(scores, softmax(test.logits.astype(np.float64) / 7.0, axis=1).max(axis=1), rtol=1e-5)


# ---- registry and argument checks ---------------------------------------------------------------------


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError, match="ebo, knn, maxlogit, mds, msp, odin, react, vim"):
        create_postprocessor("mahalanobis")


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("knn", {"k": 5}, "accepts: K"),
        ("knn", {"K": 0}, "K must be"),
        ("ebo", {"temperature": -1.0}, "temperature"),
        ("react", {"percentile": 0}, "percentile"),
        ("odin", {"noise": -0.1}, "noise"),
        ("vim", {"dim": 0}, "dim"),
    ],
)
def test_bad_arguments_raise_user_error(name, kwargs, match):
    with pytest.raises(UserError, match=match):
        create_postprocessor(name, **kwargs)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_postprocessor("msp")(type("Again", (Postprocessor,), {"score_tensors": lambda s, z, f: z}))


def test_scoring_before_fit_and_with_other_features_fails_clearly():
    train, test, fc = random_problem()
    with pytest.raises(RuntimeError, match="fitted"):
        create_postprocessor("mds").score(test)
    narrow = FeatureSet(test.logits, test.features[:, :10])
    with pytest.raises(ValueError, match="24-d"):
        fitted("knn", train, fc, K=5).score(narrow)
    with pytest.raises(ValueError, match="inputs"):
        create_postprocessor("vim", dim=4).fit(FeatureSet(train.logits, train.features[:, :10], train.labels), fc)


# ---- OpenOOD's postprocessor interface -------------------------------------------------------------------


class LinearFeatureNet(nn.Module):
    """forward(x, return_feature) with the identity as the feature extractor and a given fc."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.fc = LinearHead(weight, bias).fc

    def forward(self, x: torch.Tensor, return_feature: bool = False):
        logits = self.fc(x)
        return (logits, x) if return_feature else logits


class TinyNet(nn.Module):
    """The OpenOOD network contract on (N, 3, 2, 2) inputs: forward(x, return_feature) and get_fc()."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU())
        self.fc = nn.Linear(16, 3)
        seeded(self, seed)

    def forward(self, x: torch.Tensor, return_feature: bool = False):
        features = self.body(x)
        logits = self.fc(features)
        return (logits, features) if return_feature else logits

    def get_fc(self):
        return self.fc.weight.detach().numpy(), self.fc.bias.detach().numpy()


class DictDataset(Dataset):
    """Yields {"data": x, "label": y}, as OpenOOD's ImglistDataset does."""

    def __init__(self, data: torch.Tensor, labels: torch.Tensor):
        self.data, self.labels = data, labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"data": self.data[i], "label": self.labels[i]}


OPENOOD_KWARGS = {"knn": {"K": 5}, "vim": {"dim": 6}}


@pytest.mark.parametrize("name", ALL)
def test_openood_interface_setup_postprocess_inference(name):
    net = TinyNet().eval()
    g = torch.Generator().manual_seed(2)
    x_train, y_train = torch.randn(200, 3, 2, 2, generator=g), torch.randint(0, 3, (200,), generator=g)
    x_test, y_test = torch.randn(50, 3, 2, 2, generator=g), torch.randint(0, 3, (50,), generator=g)
    train_loader = DataLoader(DictDataset(x_train, y_train), batch_size=32)
    test_loader = DataLoader(DictDataset(x_test, y_test), batch_size=16)

    postprocessor = create_postprocessor(name, **OPENOOD_KWARGS.get(name, {}))
    postprocessor.setup(net, {"train": train_loader, "test": test_loader}, {})
    pred, conf, label = postprocessor.inference(net, test_loader, progress=False)

    # the same method fitted and scored directly on cached outputs
    reference = create_postprocessor(name, **OPENOOD_KWARGS.get(name, {}))
    with torch.no_grad():
        train_logits, train_features = net(x_train, return_feature=True)
        test_logits, test_features = net(x_test, return_feature=True)
    reference.fit(FeatureSet(train_logits.numpy(), train_features.numpy(), y_train.numpy()), net.get_fc())
    if reference.needs_network:
        expected = reference.score_batch(net, x_test).numpy()
    else:
        expected = reference.score(FeatureSet(test_logits.numpy(), test_features.numpy()))

    assert pred.shape == conf.shape == label.shape == (50,)
    assert pred.dtype.kind == "i" and label.dtype.kind == "i"
    np.testing.assert_array_equal(label, y_test.numpy())
    np.testing.assert_allclose(conf, expected, rtol=1e-5, atol=1e-6)
    if name not in ("react", "odin"):  # those two predict from clipped / perturbed logits, like OpenOOD
        np.testing.assert_array_equal(pred, test_logits.argmax(dim=1).numpy())
    batch_pred, batch_conf = postprocessor.postprocess(net, x_test[:5])
    assert isinstance(batch_pred, torch.Tensor) and isinstance(batch_conf, torch.Tensor)
    np.testing.assert_allclose(batch_conf.numpy(), expected[:5], rtol=1e-5, atol=1e-6)


# ---- the OpenOOD adapter ------------------------------------------------------------------------------


def test_openood_config_mirrors_openoods_yaml_defaults():
    config = openood_config("odin", {"noise": 0.0})
    assert config["postprocessor"]["name"] == "odin"
    assert config["postprocessor"]["postprocessor_args"] == {"temperature": 1000, "noise": 0.0}
    assert config["postprocessor"]["postprocessor_sweep"] == {"temperature_list": [1000], "noise_list": [0.0]}
    assert openood_config("maxlogit")["postprocessor"]["name"] == "mls"
    assert set(OPENOOD_DEFAULTS) == set(ALL)
    with pytest.raises(UserError, match="accepts: K"):
        openood_config("knn", {"k": 3})


def test_building_openood_postprocessors_without_openood_says_how_to_install():
    if openood_available():
        pytest.skip("openood is installed")
    with pytest.raises(UserError, match="pip install"):
        create_openood_postprocessor("msp")


@pytest.mark.parametrize("name", ["msp", "ebo", "maxlogit", "odin"])
def test_our_scores_match_openoods_own_postprocessors(name):
    pytest.importorskip("openood")
    from openood.preprocessors.transform import normalization_dict

    net = TinyNet().eval()
    x = torch.randn(20, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    theirs = create_openood_postprocessor(name)
    ours = create_postprocessor(name, **({"input_std": normalization_dict["cifar10"][1]} if name == "odin" else {}))
    their_pred, their_conf = theirs.postprocess(net, x.clone())
    our_pred, our_conf = ours.postprocess(net, x.clone())
    np.testing.assert_allclose(our_conf.detach().numpy(), their_conf.detach().cpu().numpy(), rtol=1e-5)
    np.testing.assert_array_equal(our_pred.numpy(), their_pred.cpu().numpy())
