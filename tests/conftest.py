"""Shared test arguments and fixtures.

`tiny_train_args`: the `hrp-ood train` flags of a run that takes seconds on CPU (small_cnn, small batches, a small
meta set); `hrp=True` adds a schedule on which HRP's meta step, RAM and CDCL all run within two epochs.
`make_cifar_root`: CIFAR-10 pickle batches of generated images, made once per session for each size asked for.
Tests marked `slow` (over ~5 s) are left out by `pytest -m "not slow"`; CI runs them all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import write_cifar10


def tiny_train_args(
    *, batch_size: int = 32, meta_size: int = 20, hrp: bool = False, small_head: bool = False, method: str | None = None
) -> list[str]:
    args = [
        "--model",
        "small_cnn",
        "--batch-size",
        str(batch_size),
        "--meta-size",
        str(meta_size),
        "--set",
        "meta_batch_size=16",
        "--no-progress",
    ]
    if method is not None:
        args += ["--method", method]
    if hrp:
        args += [
            "--set",
            "warmup_epochs=1",
            "--set",
            "ramp_epochs=1",
            "--set",
            "lr_milestones=[1]",
            "--set",
            "tau_conf=0.3",
        ]
        small_head = True
    else:
        args += ["--set", "lr_milestones=[]"]
    if small_head:
        args += ["--set", "proj_hidden_dim=32", "--set", "proj_dim=16"]
    return args


@pytest.fixture(scope="session")
def make_cifar_root(tmp_path_factory):
    """make_cifar_root(n_train, n_test, seed) → a folder holding cifar-10-batches-py of generated images."""
    made: dict[tuple[int, int, int], Path] = {}

    def make(n_train: int = 200, n_test: int = 60, seed: int = 0) -> Path:
        key = (n_train, n_test, seed)
        if key not in made:
            made[key] = tmp_path_factory.mktemp(f"cifar_{n_train}_{n_test}_s{seed}")
            write_cifar10(made[key], n_train=n_train, n_test=n_test, seed=seed)
        return made[key]

    return make
