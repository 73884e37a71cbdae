"""Synthetic label noise, real noisy-label files, and the noise file saved with every run (SPEC §2).

Spec strings (R = rate in percent, 0–100, decimals allowed):

    none        the labels as shipped
    symR        with probability R/100 the label is redrawn uniformly from ALL C classes (DivideMix
                convention: it may land on the true class, so the realised flip rate is R·(C−1)/C)
    symflipR    with probability R/100 the label is redrawn uniformly from the C−1 OTHER classes
                (realised flip rate ≈ R)
    asymR       class-dependent flips with probability R/100: CIFAR-10 truck→automobile,
                bird→airplane, deer→horse, cat↔dog; CIFAR-100 the next fine class of the same
                superclass (circular, fine ids ascending inside each superclass)
    file        labels read from a file (load_label_file), e.g. CIFAR-10N / CIFAR-100N
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hrp_ood.checkpoint import torch_load_error
from hrp_ood.errors import UserError, shown
from hrp_ood.io import atomic_write

MODES = ("none", "sym", "symflip", "asym", "file")
VALID_FORMS = "none, symR, symflipR, asymR (R = percent 0-100, e.g. sym80, symflip40, asym40, sym12.5) or file"
_SPEC_PATTERN = re.compile(r"(?P<mode>[a-z]+)(?P<rate>\d+(?:\.\d+)?)?")
_RATELESS_MODES = ("none", "file")

# CIFAR-10 class ids: 0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer, 5 dog, 6 frog, 7 horse, 8 ship, 9 truck.
CIFAR10_ASYM_MAP = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
ASYM_DATASETS = ("cifar10", "cifar100")  # the datasets asym_target_map has a class map for


@dataclass(frozen=True)
class NoiseSpec:
    """A noise mode and its rate r ∈ [0, 1] (the spec string carries r in percent)."""

    mode: str
    rate: float

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown noise mode {self.mode!r}; valid forms: {VALID_FORMS}")
        if not 0.0 <= self.rate <= 1.0:
            raise UserError(f"noise rate must be in [0, 1] (0-100 in a spec string), got {self.rate}")

    def __str__(self) -> str:
        if self.mode in _RATELESS_MODES:
            return self.mode
        percent = f"{self.rate * 100:.6f}".rstrip("0").rstrip(".")  # 0.8 → "80", 0.125 → "12.5"
        return f"{self.mode}{percent}"


def parse_noise(spec: str) -> NoiseSpec:
    """'sym80' → NoiseSpec('sym', 0.8); 'none' → NoiseSpec('none', 0.0). Anything else → UserError."""
    text = spec.strip().lower() if isinstance(spec, str) else ""
    match = _SPEC_PATTERN.fullmatch(text)
    if match is None or match["mode"] not in MODES:
        raise UserError(f"bad noise spec {spec!r}; valid forms: {VALID_FORMS}")
    mode, rate = match["mode"], match["rate"]
    if mode in _RATELESS_MODES:
        if rate is not None:
            raise UserError(f"noise mode {mode!r} takes no rate, got {spec!r}; valid forms: {VALID_FORMS}")
        return NoiseSpec(mode, 0.0)
    if rate is None:
        raise UserError(f"noise spec {spec!r} needs a rate in percent (e.g. {mode}40); valid forms: {VALID_FORMS}")
    if float(rate) > 100:
        raise UserError(f"noise rate {rate}% in {spec!r} is above 100; valid forms: {VALID_FORMS}")
    return NoiseSpec(mode, float(rate) / 100)


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64)


def cifar100_asym_map(fine: np.ndarray, coarse: np.ndarray, num_classes: int) -> np.ndarray:
    """target[f] = the next fine class after f inside f's superclass (circular; fine ids ascending).

    Built from the (coarse, fine) pairs present in the data: sorting the pairs lexicographically
    lines each superclass's fine ids up in ascending order, so "next" is the following pair, or the
    first pair of the same superclass for the last one. Classes that never occur map to themselves.
    """
    pairs = np.unique(np.stack([coarse, fine], axis=1), axis=0)  # sorted by coarse, then fine
    if len(np.unique(pairs[:, 1])) != len(pairs):
        raise UserError(
            "coarse labels are inconsistent: a fine class belongs to two superclasses; "
            "check the dataset's coarse_labels"
        )
    group_start = np.r_[True, pairs[1:, 0] != pairs[:-1, 0]]
    first_of_group = np.maximum.accumulate(np.where(group_start, np.arange(len(pairs)), 0))
    last_of_group = np.r_[group_start[1:], True]
    successor = np.where(last_of_group, first_of_group, np.arange(len(pairs)) + 1)
    target = np.arange(num_classes)
    target[pairs[:, 1]] = pairs[successor, 1]
    return target


def asym_target_map(dataset: str, num_classes: int, clean: np.ndarray, coarse_labels: np.ndarray | None) -> np.ndarray:
    """class → class it is flipped to under asymmetric noise (identity for classes that are never flipped)."""
    check_noise_for_dataset(NoiseSpec("asym", 0.0), dataset)
    if dataset == "cifar10":
        target = np.arange(num_classes)
        target[list(CIFAR10_ASYM_MAP)] = list(CIFAR10_ASYM_MAP.values())
        return target
    if coarse_labels is None or len(coarse_labels) != len(clean):  # cifar100
        raise UserError(
            "asymmetric CIFAR-100 noise needs the superclass (coarse) label of every training "
            "sample; load cifar100 from its python-pickle release"
        )
    return cifar100_asym_map(clean, np.asarray(coarse_labels, dtype=np.int64), num_classes)


def check_noise_for_dataset(spec: NoiseSpec, dataset: str) -> None:
    """Reject a noise mode the dataset does not define, from names alone (before any slow dataset load)."""
    if spec.mode == "asym" and dataset not in ASYM_DATASETS:
        raise UserError(
            f"asymmetric noise is defined for {' and '.join(ASYM_DATASETS)} only, not {dataset!r}; "
            "use symR or symflipR, or give a label file"
        )


def make_noisy_labels(
    clean_labels: np.ndarray,
    num_classes: int,
    spec: NoiseSpec,
    seed: int,
    *,
    dataset: str,
    coarse_labels: np.ndarray | None = None,
) -> np.ndarray:
    """Corrupt `clean_labels` according to `spec`, reproducibly from `seed` (np.random.default_rng).

    Every sample draws u_i ~ U[0, 1) and is corrupted iff u_i < r; the replacement is
    sym: uniform over {0..C−1}; symflip: (y_i + k_i) mod C with k_i uniform over {1..C−1};
    asym: the fixed class map of `asym_target_map`.
    """
    clean = _check_labels(clean_labels, num_classes)
    if spec.mode == "file":
        raise UserError(
            "noise mode 'file' reads the labels from a file: give the noisy-label file "
            "(noisy_labels) instead of generating noise"
        )
    if spec.mode == "none":
        return clean.copy()
    if num_classes < 2:
        raise UserError(f"label noise needs at least 2 classes, the dataset has {num_classes}")
    rng = np.random.default_rng(seed)
    corrupt = rng.random(len(clean)) < spec.rate
    if spec.mode == "sym":
        replacement = rng.integers(0, num_classes, len(clean))
    elif spec.mode == "symflip":
        replacement = (clean + rng.integers(1, num_classes, len(clean))) % num_classes
    else:
        replacement = asym_target_map(dataset, num_classes, clean, coarse_labels)[clean]
    return np.where(corrupt, replacement, clean).astype(np.int64)


def realised_noise_rate(noisy: np.ndarray, clean: np.ndarray) -> float:
    """Fraction of samples whose label differs from the clean one."""
    noisy, clean = np.asarray(noisy), np.asarray(clean)
    if noisy.shape != clean.shape:
        raise ValueError(f"noisy and clean labels differ in shape: {noisy.shape} vs {clean.shape}")
    return float(np.mean(noisy != clean)) if len(clean) else 0.0


# --- label files (CIFAR-10N / CIFAR-100N, or any .npy) -------------------------------------------------------

# Default key of a CIFAR-N dict when none is given: CIFAR-100N has exactly one human noisy fine label.
DEFAULT_LABEL_KEY = "noisy_label"
_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array-rebuilding function
# CIFAR-N files are dicts of numpy arrays pickled by torch.save; numpy 1 and 2 name the rebuild function differently.
_NUMPY_SAFE_GLOBALS = [
    (_NUMPY_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
    (_NUMPY_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    # numpy 2 pickles an array's dtype by its class (numpy.dtypes.Int64DType, …)
    *{
        type(np.dtype(t))
        for t in (
            np.int8,
            np.int16,
            np.int32,
            np.int64,
            np.uint8,
            np.uint16,
            np.uint32,
            np.uint64,
            np.float32,
            np.float64,
            np.bool_,
        )
    },
]


def _load_pt_dict(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise torch_load_error(
            path,
            err,
            "label file",
            "expected a CIFAR-10N/100N .pt dict of label arrays",
            "give a CIFAR-N .pt file of label arrays or a .npy array",
        ) from None


def _select_key(content: Any, path: Path, key: str | None) -> Any:
    if not isinstance(content, dict):
        if key is not None:
            raise UserError(f"label file {path} holds one array, not a dict; drop the key {key!r}")
        return content
    chosen = key if key is not None else DEFAULT_LABEL_KEY
    if chosen not in content:
        what = f"no key {key!r}" if key is not None else "several label sets and no key was given"
        raise UserError(f"label file {path} has {what}; choose one of: {', '.join(map(str, content))}")
    return content[chosen]


def _as_label_array(values: Any, path: Path) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.numpy()
    array = np.asarray(values)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise UserError(f"labels in {path} must be integers, got dtype {array.dtype}")
    if array.ndim != 1:
        raise UserError(f"labels in {path} must be a 1-D array, got shape {array.shape}")
    return array.astype(np.int64)


def load_label_file(path: str | Path, num_classes: int, expected_len: int, key: str | None = None) -> np.ndarray:
    """Noisy training labels from a .npy array of ints, or a CIFAR-10N/100N .pt dict (loaded with weights_only).

    key picks the label set in a dict (worse_label, aggre_label, random_label1, noisy_label, …);
    without it, 'noisy_label' is used when present. Validated: integer, 1-D, length, range.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"label file {shown(path)} does not exist; give a .npy array or a CIFAR-N .pt file")
    if path.suffix == ".npy":
        try:
            content: Any = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {path} as a .npy array of labels ({err})") from err
    else:
        content = _load_pt_dict(path)
    labels = _as_label_array(_select_key(content, path, key), path)
    if len(labels) != expected_len:
        raise UserError(
            f"label file {path} has {len(labels)} labels, the training set has {expected_len}; is it for this dataset?"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"labels in {path} span [{labels.min()}, {labels.max()}], outside the {num_classes} "
            f"classes [0, {num_classes - 1}]"
        )
    return labels


# --- the run's noise file ------------------------------------------------------------------------------------


def save_noise(path: str | Path, noisy: np.ndarray, clean: np.ndarray, *, spec: str, seed: int) -> None:
    """Write noisy_labels, clean_labels, spec and seed to an .npz, atomically."""
    path = Path(path)
    noisy, clean = np.asarray(noisy, dtype=np.int64), np.asarray(clean, dtype=np.int64)
    if noisy.shape != clean.shape:
        raise ValueError(f"noisy and clean labels differ in shape: {noisy.shape} vs {clean.shape}")
    atomic_write(
        path,
        lambda f: np.savez(
            f, noisy_labels=noisy, clean_labels=clean, spec=np.array(str(spec)), seed=np.array(int(seed))
        ),
    )


def load_noise(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(noisy, clean, {'spec', 'seed', 'noise_rate'}) exactly as save_noise wrote them."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            noisy, clean = npz["noisy_labels"].astype(np.int64), npz["clean_labels"].astype(np.int64)
            info = {"spec": str(npz["spec"]), "seed": int(npz["seed"])}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(
            f"noise file {path} is unreadable or incomplete ({err}); delete it to regenerate "
            "the noise (same spec and seed give the same labels)"
        ) from err
    if noisy.shape != clean.shape or noisy.ndim != 1:
        raise UserError(
            f"noise file {path} is corrupt (label arrays of shapes {noisy.shape} and {clean.shape}); "
            "delete it to regenerate the noise"
        )
    info["noise_rate"] = realised_noise_rate(noisy, clean)
    return noisy, clean, info
