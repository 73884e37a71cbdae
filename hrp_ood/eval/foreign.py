"""Networks trained elsewhere (`hrp-ood evaluate --ckpt FILE --arch NAME`): a weights file → a network of our contract.

`--arch` names one of our backbones (`list_models()`), `torchvision:NAME` (any classification model of
`torchvision.models`) or `timm:NAME` (when timm is installed). The weights file is a state dict, read with the safe
(weights-only) unpickler, as the usual training codes save it:

* plain (`torch.save(net.state_dict())`: OpenOOD v1.5's model zoo, torchvision), or inside a dict under
  `state_dict`, `model_state_dict`, `model`, `net` (UNICON) or `network`;
* with DataParallel's `module.` (or torch.compile's `_orig_mod.`) in front of every name;
* in DivideMix's / UNICON's PreAct ResNet layout: their classifier `linear` is our `fc`; UNICON's contrastive
  projection (`projection_head`, `bnl`) is not part of the classifier and is left out.

OpenOOD's `ResNet18_32x32` has our `resnet18_32x32`'s names and shapes, DivideMix's `ResNet18` (PreResNet.py) our
`preact_resnet18`'s once `linear` reads as `fc`. Weights that fit no `--arch` are a one-line error naming the first
mismatching tensors and the `--arch` values they would fit.

Our backbones follow the network contract themselves. Any other network is wrapped in `LinearHeadNet`: its
penultimate feature is the input of its classifier, the last `nn.Linear` its forward calls, found once by a probe
forward that also checks that this layer's output is the network's output (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import importlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hrp_ood.checkpoint import FORMAT, read_torch_file, torch_error_detail
from hrp_ood.errors import UserError, shown
from hrp_ood.eval.network import weights_mismatch, weights_value_problem
from hrp_ood.models import ClassifierNet, create_model, list_models

log = logging.getLogger(__name__)

TORCHVISION, TIMM = "torchvision:", "timm:"
# timm's loader (timm.models.load_state_dict) prefers the EMA weights its CheckpointSaver stores beside `state_dict`
EMA_KEYS = ("state_dict_ema", "model_ema")
WRAPPER_KEYS = (*EMA_KEYS, "state_dict", "model_state_dict", "model", "net", "network")
# the one class a weights file may hold besides tensors and containers: timm's CheckpointSaver stores train.py's `args'
SAFE_CLASSES = (argparse.Namespace,)
MAX_IMAGE_SIZE = 4096  # --image-size: a 4096x4096 batch of 3 float32 channels is already 200 MB per image
PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
# (their name, our name, whose layout): a renamed layer, applied when the weights have their name and the network ours
RENAMES = (("linear.", "fc.", "DivideMix/UNICON's classifier"),)
# layers of a training code that the classifier does not use, left out when the network has no such layer
EXTRA_LAYERS = (("projection_head.", "UNICON's projection head"), ("bnl.", "UNICON's projection BatchNorm"))
MAX_CANDIDATES = 5


@dataclass
class ForeignNetwork:
    """A network trained elsewhere, its weights loaded (strictly, after `adapt_keys`), in eval mode on the CPU."""

    net: nn.Module
    arch: str
    num_classes: int
    path: Path
    sha256: str  # of the bytes the weights were loaded from
    layout: list[str] = field(default_factory=list)  # how the file's tensor names were read
    weights_key: str | None = None  # the key of the file's dict the state dict was read from (None: the file itself)

    def describe(self) -> dict[str, Any]:
        """What eval.json records as the network evaluated."""
        return {
            "source": "external",
            "arch": self.arch,
            "weights": str(self.path),
            "weights_sha256": self.sha256,
            "num_classes": self.num_classes,
            "weights_key": self.weights_key,
            "key_layout": self.layout or ["as saved"],
        }


def load_foreign_network(path: Path, arch: str, num_classes: int) -> ForeignNetwork:
    """`arch` for `num_classes` classes with the weights of `path`; every failure is a one-line UserError."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"--arch needs the network's class count: give --num-classes N, got {num_classes!r}")
    path = Path(path)
    weights, key, sha256 = read_weights(path)
    net = build_arch(arch, num_classes)
    expected = net.state_dict()
    adapted, layout = adapt_keys(weights, expected)
    problem = weights_mismatch(expected, adapted, num_classes, head=classifier_name(net))
    if problem:
        raise UserError(
            f"{shown(path)} does not fit --arch {arch} for {num_classes} classes: {problem}; "
            f"{_candidates_text(weights, num_classes)}"
        )
    problem = weights_value_problem(expected, adapted)
    if problem:
        raise UserError(f"cannot evaluate the weights of {shown(path)}: {problem}")
    net.load_state_dict(adapted)
    return ForeignNetwork(net.eval(), arch, num_classes, path, sha256, layout, key)


def read_weights(path: Path) -> tuple[dict[str, Tensor], str | None, str]:
    """(state dict, the key it was read from or None, sha256 of the file's bytes): the file read once, with the
    weights-only unpickler, which may also rebuild `argparse.Namespace` (SAFE_CLASSES: timm's `args`), nothing else."""
    with torch.serialization.safe_globals(list(SAFE_CLASSES)):
        content, sha256 = read_torch_file(
            path,
            "weights file",
            missing="give --ckpt the state dict of the network to evaluate",
            fix="give the file torch.save(net.state_dict(), path) wrote",
            safe_source="save the network's state dict (torch.save(net.state_dict(), path)), not the network object",
        )
    if isinstance(content, dict) and content.get("format") == FORMAT:
        raise UserError(f"{shown(path)} is a checkpoint of `hrp-ood train`: drop --arch, it names its own network")
    weights, key = state_dict_of(content, path)
    if key is not None:
        log.info(
            "weights read from %s[%r]%s", shown(path), key, " (EMA, as timm loads them)" if key in EMA_KEYS else ""
        )
    return weights, key, sha256


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, Tensor) for v in value.values())


def state_dict_of(content: Any, path: Path) -> tuple[dict[str, Tensor], str | None]:
    """(the state dict in a loaded weights file, the key it is under): the file itself (None), or the value of the
    first of WRAPPER_KEYS that holds one (the EMA weights first, as timm's loader)."""
    if _is_state_dict(content):
        return dict(content), None
    if isinstance(content, dict):
        for key in WRAPPER_KEYS:
            if _is_state_dict(content.get(key)):
                return dict(content[key]), key
        keys = ", ".join(map(str, list(content)[:6]))
        raise UserError(
            f"{shown(path)} holds no state dict (a dict of tensors, plain or under {', '.join(WRAPPER_KEYS)}); its "
            f"keys: {keys}; save torch.save(net.state_dict(), path)"
        )
    raise UserError(
        f"{shown(path)} holds a {type(content).__name__}, not a state dict; save torch.save(net.state_dict(), path)"
    )


def adapt_keys(weights: dict[str, Tensor], expected: dict[str, Any]) -> tuple[dict[str, Tensor], list[str]]:
    """The weights with their names as the network `expected` (its state dict) has them, and how they were read:
    wrapper prefixes (PREFIXES) removed, layers renamed (RENAMES), training-only layers left out (EXTRA_LAYERS).
    Each rule applies only where the network's names call for it, so weights already in its layout pass as is."""
    layout = []

    def has(names: Any, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in names)

    for prefix in PREFIXES:
        while weights and all(k.startswith(prefix) for k in weights) and not has(expected, prefix):
            weights = {k[len(prefix) :]: v for k, v in weights.items()}
            if f"{prefix} prefix removed" not in layout:
                layout.append(f"{prefix} prefix removed")
    for theirs, ours, whose in RENAMES:
        if has(weights, theirs) and not has(weights, ours) and has(expected, ours) and not has(expected, theirs):
            weights = {(ours + k[len(theirs) :] if k.startswith(theirs) else k): v for k, v in weights.items()}
            layout.append(f"{theirs}* read as {ours}* ({whose})")
    for prefix, whose in EXTRA_LAYERS:
        if has(weights, prefix) and not has(expected, prefix):
            weights = {k: v for k, v in weights.items() if not k.startswith(prefix)}
            layout.append(f"{prefix}* left out ({whose})")
    return weights, layout


def build_arch(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised `arch` for `num_classes` classes: ours, torchvision's or timm's."""
    if arch.startswith(TORCHVISION):
        import torchvision

        name = arch[len(TORCHVISION) :]
        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"did you mean {', '.join(TORCHVISION + c for c in close)}? " if close else ""
            raise UserError(
                f"torchvision {torchvision.__version__} has no classification model {name!r}; {hint}"
                "see torchvision.models.list_models(module=torchvision.models)"
            )
        with warnings.catch_warnings():  # GoogLeNet / Inception warn about their default initialisation
            warnings.simplefilter("ignore", FutureWarning)
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if arch.startswith(TIMM):
        try:
            timm = importlib.import_module("timm")
        except ImportError:
            raise UserError(f"--arch {arch} needs timm, which is not installed; pip install timm") from None
        name = arch[len(TIMM) :]
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes)
        except RuntimeError as err:  # timm: "Unknown model (...)"
            raise UserError(f"--arch {arch}: {err}; see timm.list_models()") from None
    if arch in list_models():
        return create_model(arch, num_classes=num_classes)
    raise UserError(
        f"unknown --arch {arch!r}; give one of {', '.join(list_models())}, torchvision:NAME (e.g. "
        "torchvision:resnet50) or timm:NAME"
    )


def classifier_name(net: nn.Module) -> str:
    """The name of the last `nn.Linear` module (registration order): the classifier of the usual architectures; it
    only words the class-count message of `weights_mismatch` (LinearHeadNet finds the head by a forward)."""
    names = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else "fc"


def _torchvision_archs() -> list[str]:
    import torchvision

    return [TORCHVISION + name for name in torchvision.models.list_models(module=torchvision.models)]


@contextlib.contextmanager
def _initialisation_skipped() -> Iterator[None]:
    """torch.nn.init's functions as no-ops inside the block: on the meta device there are no values to initialise,
    and torch's meta implementations of the random initialisers take ~70% of building torchvision's 80 networks."""
    initialisers = {name: getattr(nn.init, name) for name in dir(nn.init) if name.endswith("_") and name[0] != "_"}
    for name in initialisers:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in initialisers.items():
            setattr(nn.init, name, function)


@functools.cache
def _meta_state(arch: str, num_classes: int) -> tuple[dict[str, Tensor], str] | None:
    """(state dict, classifier name) of `arch` built on the meta device (no memory, no initialisation), kept for
    the process; None for an architecture that cannot be built there (torchvision's RegNets)."""
    try:
        with torch.device("meta"), _initialisation_skipped(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = build_arch(arch, num_classes)
    except Exception:  # noqa: BLE001 - such an architecture is not proposed
        return None
    return net.state_dict(), classifier_name(net)


def fitting_archs(weights: dict[str, Tensor], num_classes: int) -> list[str]:
    """The `--arch` values whose network the weights fit, with `--num-classes K` added where they fit it for another
    class count: ours, and only when none of ours fits, torchvision's (whose tensor names never are ours)."""
    return _fitting(list_models(), weights, num_classes) or _fitting(_torchvision_archs(), weights, num_classes)


def _fitting(archs: list[str], weights: dict[str, Tensor], num_classes: int) -> list[str]:
    fits = []
    for arch in archs:
        built = _meta_state(arch, num_classes)
        if built is None:
            continue
        expected, head = built
        adapted, _ = adapt_keys(weights, expected)
        if weights_mismatch(expected, adapted, num_classes, head=head) is None:
            fits.append(arch)
            continue
        other = adapted.get(f"{head}.weight")
        if set(adapted) == set(expected) and isinstance(other, Tensor) and other.ndim == 2:
            count = int(other.shape[0])
            again = _meta_state(arch, count) if count != num_classes else None
            if again is not None and weights_mismatch(again[0], adapted, count, head=head) is None:
                fits.append(f"{arch} --num-classes {count}")
    return fits


def _candidates_text(weights: dict[str, Tensor], num_classes: int) -> str:
    fits = fitting_archs(weights, num_classes)
    if not fits:
        return (
            "no --arch known here fits them (ours, torchvision's): give the architecture they were trained as, "
            "with timm:NAME for a timm model"
        )
    more = f" (and {len(fits) - MAX_CANDIDATES} more)" if len(fits) > MAX_CANDIDATES else ""
    return f"they fit --arch {' | --arch '.join(fits[:MAX_CANDIDATES])}{more}"


class LinearHeadNet(nn.Module):
    """A network trained elsewhere behind the network contract of `ClassifierNet` (what the postprocessors call):
    `net(x)` → logits, `net(x, return_feature=True)` → (logits, penultimate feature), `get_fc()`,
    `forward_threshold(x, c)` (ReAct).

    The penultimate feature is the input of the classifier `head`: the last `nn.Linear` the wrapped network's
    forward calls, captured by a forward pre-hook during each forward (torchvision: `fc`, `classifier[-1]`,
    `heads.head`). A probe forward at construction finds the head and checks that its output is the network's
    output, so logits = head(feature) holds and ReAct's clipped logits head(min(feature, c)) are defined.
    """

    forward_threshold = ClassifierNet.forward_threshold
    get_fc = ClassifierNet.get_fc
    num_classes = ClassifierNet.num_classes

    def __init__(self, net: nn.Module, *, image_size: int, name: str) -> None:
        super().__init__()
        self.net = net.eval()
        self.head_name = _find_linear_head(self.net, image_size, name)
        self.num_features = self.head.in_features

    @property
    def head(self) -> nn.Linear:
        """The classifier, looked up inside the wrapped network (not registered twice: one state dict entry)."""
        return self.net.get_submodule(self.head_name)

    def forward(self, x: Tensor, return_feature: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """logits, or (logits, feature) with `return_feature` (OpenOOD's `return_feature=True`)."""
        if not return_feature:
            return self.net(x)
        captured: list[Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0]))
        try:
            logits = self.net(x)
        finally:
            handle.remove()
        return logits, captured[-1].flatten(1)

    def forward_features(self, x: Tensor) -> Tensor:
        return self(x, return_feature=True)[1]

    def classify(self, features: Tensor) -> Tensor:
        return self.head(features)

    def get_fc_layer(self) -> nn.Linear:
        return self.head


def _find_linear_head(net: nn.Module, image_size: int, name: str) -> str:
    """The module name of the last nn.Linear called in a forward of two blank images, whose output must be the
    network's output."""
    calls: list[tuple[str, Any]] = []
    hooks = [
        module.register_forward_hook(lambda _m, _inputs, out, n=n: calls.append((n, out)))
        for n, module in net.named_modules()
        if isinstance(module, nn.Linear)
    ]
    parameter = next(net.parameters(), None)
    probe = torch.zeros(2, 3, image_size, image_size, device=parameter.device if parameter is not None else "cpu")
    try:
        with torch.no_grad():
            out = net(probe)
    except Exception as err:  # noqa: BLE001 - any failure of a foreign forward is reported in one line
        raise UserError(
            f"--arch {name} cannot classify {image_size}x{image_size} images ({torch_error_detail(err)}); give "
            "--image-size at which it was trained (or the --benchmark it was trained for)"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()
    if not isinstance(out, Tensor) or out.ndim != 2:
        kind = type(out).__name__ if not isinstance(out, Tensor) else f"a tensor of shape {tuple(out.shape)}"
        raise UserError(f"--arch {name} returns {kind}, not logits (N, classes); evaluate a classifier")
    if not calls or not (calls[-1][1] is out or torch.equal(calls[-1][1], out)):
        raise UserError(
            f"--arch {name}'s logits are not the output of an nn.Linear layer, so it has no penultimate feature "
            "(mds, knn, vim, react need one); evaluate a network whose last layer is nn.Linear"
        )
    return calls[-1][0]


def with_network_contract(foreign: ForeignNetwork, image_size: int) -> nn.Module:
    """The network as the evaluation calls it: our backbones as they are, any other wrapped in `LinearHeadNet`."""
    if isinstance(foreign.net, ClassifierNet):
        return foreign.net
    return LinearHeadNet(foreign.net, image_size=image_size, name=foreign.arch)
