"""Build OpenOOD v1.5's *own* postprocessors (when ``openood`` is installed), to cross-check ours.

OpenOOD's ``evaluation_api.postprocessor.get_postprocessor`` reads (or downloads) a YAML file per
method; we build the same ``Config`` in memory from the defaults of those files instead, so
nothing is fetched at run time.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from hrp_ood.errors import UserError

# hrp-ood registry name -> (OpenOOD name, postprocessor_args of configs/postprocessors/<name>.yml)
OPENOOD_DEFAULTS: dict[str, tuple[str, dict[str, Any]]] = {
    "msp": ("msp", {}),
    "ebo": ("ebo", {"temperature": 1}),
    "maxlogit": ("mls", {}),
    "mds": ("mds", {}),
    "odin": ("odin", {"temperature": 1000, "noise": 0.0014}),
    "react": ("react", {"percentile": 90}),
    "knn": ("knn", {"K": 50}),
    "vim": ("vim", {"dim": 256}),
}


def openood_available() -> bool:
    """True when the ``openood`` package can be imported."""
    return importlib.util.find_spec("openood") is not None


def openood_config(name: str, overrides: Mapping[str, Any] | None = None,
                   dataset: str = "cifar10") -> dict[str, Any]:
    """The nested config dict OpenOOD's postprocessor `name` (hrp-ood name) is built from."""
    if name not in OPENOOD_DEFAULTS:
        raise UserError(f"no OpenOOD counterpart for {name!r}; choose one of: {', '.join(OPENOOD_DEFAULTS)}")
    openood_name, defaults = OPENOOD_DEFAULTS[name]
    unknown = sorted(set(overrides or {}) - set(defaults))
    if unknown:
        raise UserError(f"OpenOOD's {openood_name} does not take {', '.join(unknown)}; "
                        f"it accepts: {', '.join(defaults) or 'no arguments'}")
    args = {**defaults, **(overrides or {})}
    return {
        "dataset": {"name": dataset},
        "postprocessor": {
            "name": openood_name,
            "APS_mode": False,
            "postprocessor_args": args,
            # OpenOOD's constructors read the sweep lists even when APS is off.
            "postprocessor_sweep": {f"{key}_list": [value] for key, value in args.items()},
        },
    }


def create_openood_postprocessor(name: str, config: Mapping[str, Any] | None = None, *,
                                 dataset: str = "cifar10") -> Any:
    """OpenOOD's postprocessor for hrp-ood method `name`; `config` overrides its ``postprocessor_args``.

    Raises UserError when OpenOOD is not installed.
    """
    if not openood_available():
        raise UserError("OpenOOD is not installed: pip install 'git+https://github.com/Jingkang50/OpenOOD' "
                        "(or pip install 'hrp-ood[openood]') to build its postprocessors")
    from openood.evaluation_api.postprocessor import postprocessors
    from openood.utils.config import Config

    nested = openood_config(name, config, dataset)
    postprocessor = postprocessors[nested["postprocessor"]["name"]](Config(**nested))
    postprocessor.APS_mode = False
    postprocessor.hyperparam_search_done = False
    return postprocessor
