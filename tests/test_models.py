"""The network contract (SPEC §4) over the whole registry, OpenOOD key compatibility, the ensemble identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from hrp_ood.errors import UserError
from hrp_ood.models import (
    EnsembleNet,
    ProjectionHead,
    create_model,
    export_state_dict,
    frozen_batchnorm_stats,
    list_models,
)

NUM_CLASSES = 7
# Hand counts with 10 classes: DivideMix's PreResNet.ResNet18, the CIFAR ResNet-18 of OpenOOD / kuangliu,
# torchvision vgg19_bn's conv stack (20,035,392) + a 512→10 linear layer.
PARAMETER_COUNTS = {"preact_resnet18": 11_171_274, "resnet18_32x32": 11_173_962, "vgg19_bn": 20_040_522}

# State-dict layout of OpenOOD v1.5's ResNet18_32x32 with num_classes=10, read from
# Jingkang50/OpenOOD openood/networks/resnet18_32x32.py (BasicBlock, _make_layer, fc). A BatchNorm2d line
# "name C" stands for its five entries weight, bias, running_mean, running_var (C,) and num_batches_tracked ().
OPENOOD_RESNET18_32X32_LAYOUT = """
conv1.weight                64,3,3,3
bn1                         64
layer1.0.conv1.weight       64,64,3,3
layer1.0.bn1                64
layer1.0.conv2.weight       64,64,3,3
layer1.0.bn2                64
layer1.1.conv1.weight       64,64,3,3
layer1.1.bn1                64
layer1.1.conv2.weight       64,64,3,3
layer1.1.bn2                64
layer2.0.conv1.weight       128,64,3,3
layer2.0.bn1                128
layer2.0.conv2.weight       128,128,3,3
layer2.0.bn2                128
layer2.0.shortcut.0.weight  128,64,1,1
layer2.0.shortcut.1         128
layer2.1.conv1.weight       128,128,3,3
layer2.1.bn1                128
layer2.1.conv2.weight       128,128,3,3
layer2.1.bn2                128
layer3.0.conv1.weight       256,128,3,3
layer3.0.bn1                256
layer3.0.conv2.weight       256,256,3,3
layer3.0.bn2                256
layer3.0.shortcut.0.weight  256,128,1,1
layer3.0.shortcut.1         256
layer3.1.conv1.weight       256,256,3,3
layer3.1.bn1                256
layer3.1.conv2.weight       256,256,3,3
layer3.1.bn2                256
layer4.0.conv1.weight       512,256,3,3
layer4.0.bn1                512
layer4.0.conv2.weight       512,512,3,3
layer4.0.bn2                512
layer4.0.shortcut.0.weight  512,256,1,1
layer4.0.shortcut.1         512
layer4.1.conv1.weight       512,512,3,3
layer4.1.bn1                512
layer4.1.conv2.weight       512,512,3,3
layer4.1.bn2                512
fc.weight                   10,512
fc.bias                     10
"""


def openood_expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for line in OPENOOD_RESNET18_32X32_LAYOUT.strip().splitlines():
        name, dims = line.split()
        shape = tuple(int(d) for d in dims.split(","))
        if name.endswith((".weight", ".bias")):
            shapes[name] = shape
        else:
            for entry in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{name}.{entry}"] = shape
            shapes[f"{name}.num_batches_tracked"] = ()
    return shapes


@pytest.fixture(scope="module")
def nets() -> dict[str, nn.Module]:
    """Every registered model, built once (with a fixed seed) for the module."""
    torch.manual_seed(0)
    return {name: create_model(name, num_classes=NUM_CLASSES) for name in list_models()}


def images(size: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- registry


def test_registry_names_and_errors():
    assert list_models() == ["preact_resnet18", "resnet18_32x32", "small_cnn", "vgg19_bn"]
    with pytest.raises(UserError, match="unknown model 'resnet50'.*preact_resnet18, resnet18_32x32, small_cnn"):
        create_model("resnet50", num_classes=10)
    with pytest.raises(UserError, match="num_classes must be a positive integer"):
        create_model("small_cnn", num_classes=0)
    with pytest.raises(UserError, match="does not accept"):
        create_model("small_cnn", num_classes=10, depth=3)
    assert create_model("small_cnn", num_classes=3, widths=(8, 16, 24)).num_features == 24


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_counts_match_the_reference_architectures(name):
    net = create_model(name, num_classes=10)
    assert sum(p.numel() for p in net.parameters()) == PARAMETER_COUNTS[name]


# ---------------------------------------------------------------- contract, every model


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", list_models())
def test_output_shapes_and_feature_semantics(nets, name, size):
    net = nets[name].eval()
    x = images(size)
    with torch.no_grad():
        logits = net(x)
        logits_f, feature = net(x, return_feature=True)
        logits_l, feature_list = net(x, return_feature_list=True)
        logits_both, feature_both = net(x, return_feature=True, return_feature_list=True)
    d = net.num_features
    assert logits.shape == (2, NUM_CLASSES) and feature.shape == (2, d)
    assert feature_list[-1].shape == (2, d, 1, 1), "OpenOOD: the last list entry is the pooled map"
    assert all(f.dim() == 4 and f.shape[0] == 2 for f in feature_list)
    torch.testing.assert_close(feature_list[-1].flatten(1), feature)
    torch.testing.assert_close(feature_both, feature, msg="return_feature wins, as in OpenOOD")
    torch.testing.assert_close(net.forward_features(x), feature)
    for other in (logits_f, logits_l, logits_both):
        torch.testing.assert_close(other, logits)
    w, b = net.get_fc()
    assert isinstance(w, np.ndarray) and w.shape == (NUM_CLASSES, d) and b.shape == (NUM_CLASSES,)
    np.testing.assert_allclose(feature.numpy() @ w.T + b, logits.numpy(), rtol=1e-4, atol=1e-4)
    assert net.get_fc_layer() is net.fc and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list_models())
def test_forward_threshold_is_react(nets, name):
    net = nets[name].eval()
    x = images(32)
    with torch.no_grad():
        logits, feature = net(x, return_feature=True)
        torch.testing.assert_close(net.forward_threshold(x, 1e30), logits)
        threshold = float(feature.median())
        clipped = net.forward_threshold(x, threshold)
    w, b = net.get_fc()
    expected = np.minimum(feature.numpy(), threshold) @ w.T + b
    np.testing.assert_allclose(clipped.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(clipped, logits), "a median threshold must change the logits"


@pytest.mark.parametrize("name", list_models())
def test_every_parameter_gets_a_finite_gradient(nets, name):
    net = nets[name].train()
    net.zero_grad()
    x = images(32, batch=4 if name == "small_cnn" else 2)
    loss = F.cross_entropy(net(x), torch.arange(x.shape[0]) % NUM_CLASSES)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert torch.isfinite(loss) and not missing, missing
    assert all(p.grad.abs().sum() > 0 for p in net.parameters()), "a zero gradient means a dead branch"
    net.zero_grad()


@pytest.mark.parametrize("name", list_models())
def test_state_dict_round_trip_and_functional_call(nets, name):
    net = nets[name].eval()
    state = export_state_dict(net)
    assert all(t.device.type == "cpu" and not k.startswith("module.") for k, t in state.items())
    clone = create_model(name, num_classes=NUM_CLASSES).eval()
    clone.load_state_dict(state, strict=True)
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), net(x), rtol=0, atol=0)
        doubled = {n: 2 * p for n, p in net.named_parameters() if n.startswith("fc.")}
        functional = functional_call(net, doubled, (x,))
        torch.testing.assert_close(functional, 2 * net(x))  # logits = 2W h + 2b = 2 (W h + b)


def test_export_unwraps_data_parallel():
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=3)
    state = export_state_dict(nn.DataParallel(net))
    assert list(state) == list(net.state_dict())
    assert list(export_state_dict(torch.compile(net))) == list(net.state_dict())  # compile is lazy: no work here
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


# ---------------------------------------------------------------- OpenOOD ResNet18_32x32


def test_resnet18_32x32_state_dict_is_openood_layout():
    net = create_model("resnet18_32x32", num_classes=10)
    got = {k: tuple(v.shape) for k, v in export_state_dict(net).items()}
    assert got == openood_expected_shapes()


def test_resnet18_32x32_feature_list_and_intermediate_forward(nets):
    net = nets["resnet18_32x32"].eval()
    x = images(32)
    with torch.no_grad():
        _, feature_list = net(x, return_feature_list=True)
        stem = F.relu(net.bn1(net.conv1(x)))
        layer4 = net.layer4(net.layer3(net.layer2(net.layer1(stem))))
        from_layer4 = net.intermediate_forward(x, 4)
    shapes = [tuple(f.shape) for f in feature_list]
    assert shapes == [(2, 64, 32, 32), (2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 1, 1)]
    torch.testing.assert_close(feature_list[0], stem)
    torch.testing.assert_close(from_layer4, layer4)
    torch.testing.assert_close(feature_list[-1], layer4.mean(dim=(2, 3), keepdim=True))
    with pytest.raises(ValueError, match="layer_index"):
        net.intermediate_forward(x, 5)


def test_vgg19_bn_conv_stack_is_torchvisions():
    from torchvision.models.vgg import cfgs, make_layers

    reference = make_layers(cfgs["E"], batch_norm=True).state_dict()
    ours = create_model("vgg19_bn", num_classes=10).features.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}


def test_preact_block_follows_dividemix():
    """DivideMix's PreActBlock: a = relu(bn1(x)); out = conv2(relu(bn2(conv1(a)))) + shortcut(a)."""
    torch.manual_seed(0)
    net = create_model("preact_resnet18", num_classes=10).eval()
    block = net.layer2[0]
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        activated = F.relu(block.bn1(x))
        expected = block.conv2(F.relu(block.bn2(block.conv1(activated)))) + block.shortcut[0](activated)
        torch.testing.assert_close(block(x), expected)
    assert len(block.shortcut) == 1, "DivideMix's pre-activation shortcut is a bare 1x1 conv"


# ---------------------------------------------------------------- torch.func in train mode


def test_jvp_of_per_sample_losses_in_train_mode_matches_autograd():
    """The meta step's identity (SPEC §3.1): jvp of ℓ_i along v = ⟨∇_θ ℓ_i, v⟩, with BN in train mode."""
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=4, widths=(4, 8, 8)).train()
    x, y = images(32, batch=6, seed=3), torch.tensor([0, 1, 2, 3, 0, 1])
    params = {n: p.detach() for n, p in net.named_parameters()}
    generator = torch.Generator().manual_seed(5)
    tangent = {n: torch.randn(p.shape, generator=generator) for n, p in params.items()}
    running_mean = net.block1[2].running_mean.clone()

    def per_sample_loss(p):
        return F.cross_entropy(functional_call(net, p, (x,)), y, reduction="none")

    with frozen_batchnorm_stats(net):
        _, directional = jvp(per_sample_loss, (params,), (tangent,))
    assert torch.equal(net.block1[2].running_mean, running_mean), "the jvp must not move BN running stats"
    assert all(m.track_running_stats for m in net.modules() if isinstance(m, nn.BatchNorm2d))

    with frozen_batchnorm_stats(net):
        losses = F.cross_entropy(net(x), y, reduction="none")
    reference = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
        reference.append(sum((g * tangent[n]).sum() for (n, _), g in zip(net.named_parameters(), grads)))
    torch.testing.assert_close(directional, torch.stack(reference), rtol=1e-4, atol=1e-5)
    net(x)
    assert not torch.equal(net.block1[2].running_mean, running_mean), "outside the block BN updates again"


# ---------------------------------------------------------------- heads and ensemble


def test_projection_head_is_unit_norm_and_trainable():
    torch.manual_seed(0)
    head = ProjectionHead(16, hidden_dim=8, out_dim=4)
    h = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    z = head(h)
    assert z.shape == (5, 4)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    unnormalised = head.mlp[2](F.relu(head.mlp[0](h)))
    torch.testing.assert_close(z, unnormalised / unnormalised.norm(dim=1, keepdim=True))
    z[:, 0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.fixture()
def members() -> list[nn.Module]:
    torch.manual_seed(0)
    return [create_model("small_cnn", num_classes=5, widths=(4, 8, 12 + 4 * k)).double().eval() for k in range(2)]


def test_ensemble_is_mean_of_members_and_a_linear_head(members):
    ensemble = EnsembleNet(members).eval()
    x = images(32, batch=3).double()
    with torch.no_grad():
        member_logits = [m(x) for m in members]
        member_features = [m.forward_features(x) for m in members]
        logits, feature = ensemble(x, return_feature=True)
        _, feature_list = ensemble(x, return_feature_list=True)
        fc_logits = ensemble.fc(feature)
    torch.testing.assert_close(logits, torch.stack(member_logits).mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(feature, torch.cat(member_features, dim=1), rtol=0, atol=1e-12)
    torch.testing.assert_close(fc_logits, logits, rtol=0, atol=1e-12)
    assert ensemble.num_features == 12 + 16 and feature_list[-1].shape == (3, 28, 1, 1)
    w, b = ensemble.get_fc()
    np.testing.assert_allclose(w, np.concatenate([m.get_fc()[0] for m in members], axis=1) / 2)
    np.testing.assert_allclose(b, (members[0].get_fc()[1] + members[1].get_fc()[1]) / 2)


def test_summing_ensemble_is_the_sum_of_members_logits_and_a_linear_head(members):
    """DivideMix's, UNICON's and LongReMix's test: summed logits (MSP and energy differ from the mean's)."""
    ensemble = EnsembleNet(members, combine="sum").eval()
    x = images(32, batch=3).double()
    with torch.no_grad():
        logits, feature = ensemble(x, return_feature=True)
        expected = members[0](x) + members[1](x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ensemble.fc(feature), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ensemble.get_fc()[1], members[0].get_fc()[1] + members[1].get_fc()[1])
    with pytest.raises(UserError, match="mean or sum"):
        EnsembleNet(members, combine="max")


def test_ensemble_react_clips_each_member(members):
    ensemble = EnsembleNet(members)
    x = images(32, batch=3).double()
    with torch.no_grad():
        threshold = float(ensemble.forward_features(x).median())
        expected = torch.stack([m.forward_threshold(x, threshold) for m in members]).mean(0)
        torch.testing.assert_close(ensemble.forward_threshold(x, threshold), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(ensemble.forward_threshold(x, 1e30), ensemble(x), rtol=0, atol=1e-12)


def test_ensemble_head_follows_members_and_passes_gradients(members):
    ensemble = EnsembleNet(members)
    assert set(ensemble.state_dict()) == {f"members.{k}.{n}" for k, m in enumerate(members) for n in m.state_dict()}
    with torch.no_grad():
        members[1].fc.bias.add_(4.0)
    assert np.allclose(ensemble.get_fc()[1], (members[0].fc.bias + members[1].fc.bias).detach().numpy() / 2)
    ensemble(images(32).double()).sum().backward()
    assert all(m.fc.weight.grad is not None and m.block1[0].weight.grad is not None for m in members)


def test_ensemble_rejects_mismatched_members():
    torch.manual_seed(0)
    with pytest.raises(UserError, match="number of classes"):
        EnsembleNet([create_model("small_cnn", num_classes=3), create_model("small_cnn", num_classes=4)])
    with pytest.raises(UserError, match="at least one"):
        EnsembleNet([])
