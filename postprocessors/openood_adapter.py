"""Build OpenOOD v1.5's *own* postprocessors (when ``openood`` is installed), to cross-check ours.

OpenOOD's ``evaluation_api.postprocessor.get_postprocessor`` reads (or downloads) a YAML file per
method; we build the same ``Config`` in memory from the defaults of those files instead, so
nothing is fetched at run time.

What runs where (OpenOOD v1.5's code): every postprocessor's ``postprocess`` works on whatever device
the network and the batch are on, but ``BasePostprocessor.inference`` moves each batch with
``.cuda()``, so ``--backend openood`` drives ``postprocess`` itself with batches already on the
network's device. That leaves the ``setup`` methods: msp, ebo, maxlogit (mls) and odin have none and
run on CPU; mds, knn, vim and react move every ID batch with ``.cuda()`` in theirs and need a GPU.
MDS takes its class count from OpenOOD's table by dataset name and ODIN its input std from OpenOOD's
normalisation table; both are set explicitly from our data after construction.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping, Sequence
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


# hrp-ood name -> why OpenOOD's postprocessor cannot run without CUDA
OPENOOD_NEEDS_CUDA: dict[str, str] = {
    "mds": "MDSPostprocessor.setup moves every ID-train batch with .cuda()",
    "knn": "KNNPostprocessor.setup moves every ID-train batch with .cuda()",
    "vim": "VIMPostprocessor.setup moves every ID-train batch with .cuda()",
    "react": "ReactPostprocessor.setup moves every ID-val batch with .cuda()",
}
# openood/postprocessors/info.py: MDSPostprocessor.__init__ looks its class count up here by dataset name
OPENOOD_CLASS_COUNTS = {"cifar10": 10, "cifar100": 100, "imagenet200": 200, "imagenet": 1000}

OPENOOD_BACKEND_HELP = (
    "openood: OpenOOD's own postprocessors (needs the openood package). On CPU: msp, ebo, maxlogit, odin; "
    "mds, knn, vim, react need a GPU (their setup calls .cuda()). mds needs a dataset OpenOOD knows "
    f"({', '.join(OPENOOD_CLASS_COUNTS)}): give --benchmark for other checkpoints"
)


def check_openood_backend(postprocessors: Iterable[str], device_type: str, dataset: str | None = None) -> None:
    """Refuse, in one line naming the method and the reason, what OpenOOD's code cannot run here.

    device_type: "cuda" or "cpu"; dataset: the name OpenOOD's tables will be asked about (None: not known yet).
    """
    if not openood_available():
        raise UserError(
            "--backend openood needs the openood package: pip install "
            "'git+https://github.com/Jingkang50/OpenOOD', or use --backend ours"
        )
    for name in postprocessors:
        if device_type != "cuda" and name in OPENOOD_NEEDS_CUDA:
            raise UserError(
                f"--backend openood cannot run {name} on CPU: OpenOOD's {OPENOOD_NEEDS_CUDA[name]}; "
                f"use a GPU, --backend ours, or leave {name} out"
            )
        if name == "mds" and dataset is not None and dataset not in OPENOOD_CLASS_COUNTS:
            raise UserError(
                f"--backend openood cannot run mds on {dataset}: OpenOOD's MDSPostprocessor looks its "
                f"class count up by dataset name ({', '.join(OPENOOD_CLASS_COUNTS)}); give --benchmark "
                "or use --backend ours"
            )


def openood_available() -> bool:
    """True when the ``openood`` package can be imported."""
    return importlib.util.find_spec("openood") is not None


def openood_config(
    name: str, overrides: Mapping[str, Any] | None = None, dataset: str = "cifar10", num_classes: int | None = None
) -> dict[str, Any]:
    """The nested config dict OpenOOD's postprocessor `name` (hrp-ood name) is built from."""
    if name not in OPENOOD_DEFAULTS:
        raise UserError(f"no OpenOOD counterpart for {name!r}; choose one of: {', '.join(OPENOOD_DEFAULTS)}")
    openood_name, defaults = OPENOOD_DEFAULTS[name]
    unknown = sorted(set(overrides or {}) - set(defaults))
    if unknown:
        raise UserError(
            f"OpenOOD's {openood_name} does not take {', '.join(unknown)}; "
            f"it accepts: {', '.join(defaults) or 'no arguments'}"
        )
    args = {**defaults, **(overrides or {})}
    return {
        "dataset": {"name": dataset, **({} if num_classes is None else {"num_classes": num_classes})},
        "postprocessor": {
            "name": openood_name,
            "APS_mode": False,
            "postprocessor_args": args,
            # OpenOOD's constructors read the sweep lists even when APS is off.
            "postprocessor_sweep": {f"{key}_list": [value] for key, value in args.items()},
        },
    }


def create_openood_postprocessor(
    name: str,
    config: Mapping[str, Any] | None = None,
    *,
    dataset: str = "cifar10",
    num_classes: int | None = None,
    input_std: Sequence[float] | None = None,
) -> Any:
    """OpenOOD's postprocessor for hrp-ood method `name`; `config` overrides its ``postprocessor_args``.

    num_classes / input_std replace what OpenOOD looks up by dataset name (MDS's class count, ODIN's
    input std), so the values come from the data actually evaluated. Raises UserError when OpenOOD is
    not installed.
    """
    if not openood_available():
        raise UserError(
            "OpenOOD is not installed: pip install 'git+https://github.com/Jingkang50/OpenOOD' "
            "(or pip install 'hrp-ood[openood]') to build its postprocessors"
        )
    from openood.evaluation_api.postprocessor import postprocessors
    from openood.utils.config import Config

    nested = openood_config(name, config, dataset, num_classes)
    postprocessor = postprocessors[nested["postprocessor"]["name"]](Config(**nested))
    postprocessor.APS_mode = False
    postprocessor.hyperparam_search_done = False
    if num_classes is not None and hasattr(postprocessor, "num_classes"):
        postprocessor.num_classes = num_classes
    if input_std is not None and hasattr(postprocessor, "input_std"):
        postprocessor.input_std = [float(s) for s in input_std]
    return postprocessor
