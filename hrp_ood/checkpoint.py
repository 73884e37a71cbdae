"""Checkpoints: one dict per file, written atomically, read back with the safe (weights-only) unpickler."""

from __future__ import annotations

import io
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hrp_ood.errors import UserError
from hrp_ood.io import atomic_write

FORMAT = "hrp-ood/1"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load an hrp-ood checkpoint safely; every failure is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; runs keep theirs in runs/<name>/last.pt and best.pt")
    try:
        with warnings.catch_warnings():  # torch warns about foreign files (pickle protocol); errors are reported below
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise _unpickling_error(path, str(err)) from None
    except Exception as err:  # noqa: BLE001 - a torn/foreign file fails anywhere inside the unpickler
        text = str(err).strip()
        detail = text.split(". ")[0].splitlines()[0][:120] if text else type(err).__name__
        raise UserError(f"checkpoint {path} is truncated or not a torch checkpoint ({detail}); "
                        "use the previous last.pt/best.pt or retrain") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not an hrp-ood checkpoint (no '{FORMAT}' format marker); "
                        "`hrp-ood evaluate` expects last.pt/best.pt written by `hrp-ood train`")
    return state


# torch's weights-only unpickler names what it refused as "... GLOBAL module.name ..."
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _unpickling_error(path: Path, message: str) -> UserError:
    """A refused import is a file that could run code; anything else the safe unpickler rejects is not a checkpoint."""
    refused = _REFUSED_GLOBAL.search(message)
    if refused:
        return UserError(f"refusing to load {path}: unpickling it would call {refused[1]}, so it could run code; "
                         "load only last.pt/best.pt written by `hrp-ood train`")
    details = [line.strip() for line in message.splitlines()
               if line.strip() and not line.strip().startswith(_TORCH_BOILERPLATE)]
    detail = details[0][:120] if details else "unreadable pickle data"
    return UserError(f"checkpoint {path} is truncated or not a torch checkpoint ({detail}); "
                     "use the previous last.pt/best.pt or retrain")


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
