"""Checkpoints: one dict per file, written atomically, read back with the safe (weights-only) unpickler."""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hrp_ood.errors import UserError, os_error_text, shown
from hrp_ood.io import atomic_write

FORMAT = "hrp-ood/1"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], str]:
    """(state, sha256 of the bytes it was loaded from): the file is read once, so the hash names exactly the
    content loaded, even while `hrp-ood train` replaces the file. Every failure is a one-line UserError."""
    path = Path(path)
    state, sha256 = read_torch_file(
        path,
        "checkpoint",
        missing="runs keep theirs in runs/<name>/last.pt and best.pt",
        fix="use the previous last.pt/best.pt or retrain",
        safe_source="load only last.pt/best.pt written by `hrp-ood train`",
        map_location=map_location,
    )
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(
            f"{shown(path)} is not an hrp-ood checkpoint (no '{FORMAT}' format marker); "
            "`hrp-ood evaluate` expects last.pt/best.pt written by `hrp-ood train` (another network: add --arch)"
        )
    return state, sha256


def read_torch_file(
    path: Path, what: str, *, missing: str, fix: str, safe_source: str, map_location: str | torch.device = "cpu"
) -> tuple[Any, str]:
    """(content, sha256 of the bytes it was loaded from) of a torch file, read once and unpickled weights-only;
    every failure is a one-line UserError: `what` names the file, `missing` / `fix` / `safe_source` say what to do
    when it is absent / torn / would run code (`torch_load_error`)."""
    if not path.is_file():
        raise UserError(f"{what} {shown(path)} not found; {missing}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {what} {shown(path)}: {os_error_text(err)}") from None
    try:
        with warnings.catch_warnings():  # torch warns about foreign files (pickle protocol); errors are reported below
            warnings.simplefilter("ignore")
            content = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a torn/foreign file fails anywhere inside the unpickler
        raise torch_load_error(path, err, what, fix, safe_source) from None
    return content, hashlib.sha256(data).hexdigest()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an hrp-ood checkpoint safely; every failure is a one-line UserError."""
    return read_checkpoint(path, map_location)[0]


# torch's weights-only unpickler names what it refused as "... GLOBAL module.name ..."
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def torch_load_error(path: Path, err: Exception, what: str, fix: str, safe_source: str) -> UserError:
    """The one-line error for a file torch.load(weights_only=True) refused: a refused import means the file could
    run code; anything else means it is torn or not a torch file. torch's own advice (load with weights_only=False,
    allow-list the class) is never repeated: following it would run the code the safe loader just refused."""
    message = str(err)
    refused = _REFUSED_GLOBAL.search(message) if isinstance(err, pickle.UnpicklingError) else None
    if refused:
        return UserError(
            f"refusing to load {shown(path)}: unpickling it would call {refused[1]}, so it could run "
            f"code; {safe_source}"
        )
    return UserError(f"{what} {shown(path)} is truncated or not a torch {what} ({torch_error_detail(err)}); {fix}")


def torch_error_detail(err: Exception) -> str:
    """The first line of torch's message that says what failed, without its boilerplate and advice."""
    lines = [line.strip() for line in str(err).splitlines()]
    useful = [
        line
        for line in lines
        if line
        and "weights_only" not in line
        and "safe_globals" not in line
        and not line.startswith(_TORCH_BOILERPLATE)
    ]
    return useful[0].split(". ")[0][:120] if useful else type(err).__name__


def rng_state() -> dict[str, Any]:
    """Every random generator a run touches, in weights-only-loadable form (tensors, ints, lists)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
