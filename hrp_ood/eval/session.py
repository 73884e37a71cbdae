"""One evaluation session, for `hrp-ood evaluate`, `hrp-ood sweep` and the demo alike: an `EvaluationRequest`
(what evaluate's flags or an experiment file's `evaluation:` say) → checks → the network and its ID data →
validation split → OOD sets (found on disk, or generated) → postprocessors → eval.json / CSV / Markdown.

The network is an `hrp-ood train` checkpoint's (its config names the backbone and the ID dataset), or, with
`arch`, one trained elsewhere (`hrp_ood.eval.foreign`): a weights file, the architecture and class count given,
its ID data named by `benchmark` or `dataset`."""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hrp_ood import __version__
from hrp_ood.checkpoint import read_checkpoint
from hrp_ood.config import TrainConfig
from hrp_ood.data.benchmarks import BENCHMARKS, Benchmark, check_checkpoint_fits, get_benchmark, load_benchmark_id_data
from hrp_ood.data.bundle import DataBundle
from hrp_ood.data.datasets import DATASETS, load_dataset_lazily
from hrp_ood.data.noise import load_noise
from hrp_ood.data.sources import ImageSource
from hrp_ood.devices import device_type, resolve_device
from hrp_ood.errors import UserError
from hrp_ood.eval.evaluate import check_ood_set_names, run_evaluation, write_eval_outputs
from hrp_ood.eval.foreign import MAX_IMAGE_SIZE, ForeignNetwork, load_foreign_network, with_network_contract
from hrp_ood.eval.generated import GENERATED_OOD_SETS, generated_ood_sets
from hrp_ood.eval.network import checkpoint_config, network_from_state
from hrp_ood.eval.ood_data import FAR_OOD_SETS, NEAR_OOD_SETS, ood_source
from hrp_ood.eval.validation import ValidationImages, find_validation, load_validation, require_tuning_split
from hrp_ood.io import check_output_folder
from hrp_ood.postprocessors import create_postprocessor, list_postprocessors
from hrp_ood.postprocessors.openood_adapter import check_openood_backend

log = logging.getLogger(__name__)

DEFAULT_POSTPROCESSORS = ("msp", "ebo", "mds")
FIT_LABELS = ("clean", "noisy", "pred")


def _checked_names(
    values: Sequence[str], valid: list[str] | tuple[str, ...], what: str, all_means: tuple[str, ...], hint: str = ""
) -> list[str]:
    """The names asked for ('all' = `all_means`), each one of `valid`."""
    names = [v.strip() for v in values if v.strip()]
    if names == ["all"]:
        return list(all_means)
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise UserError(
            f"unknown {what} {', '.join(unknown) or '(none given)'}; valid: {', '.join(valid)}, all"
            + (f"; {hint}" if hint else "")
        )
    return names


def ood_set_names(
    values: Sequence[str], ood_dirs: Mapping[str, Path], benchmark: Benchmark | None
) -> tuple[list[str], list[str]]:
    """The OOD sets an evaluation scores, as (the names, 'all' = the far-OOD sets, the benchmark's own with a
    benchmark; the sets given as folders that the names do not list): a set the user named is scored, never
    dropped."""
    far = tuple(benchmark.far) if benchmark else FAR_OOD_SETS
    valid = [*far, *(benchmark.near if benchmark else NEAR_OOD_SETS), *GENERATED_OOD_SETS]
    names = _checked_names(
        values, [*valid, *ood_dirs], "OOD set", far, hint="or give an image folder as --ood-dir NAME=PATH"
    )
    return names, [name for name in ood_dirs if name not in names]


def load_ood_sets(
    names: list[str],
    data_root: Path,
    *,
    id_dataset: str,
    image_size: int,
    ood_dirs: dict[str, Path],
    skip_missing: bool,
    skip_corrupt: bool,
    benchmark: Benchmark | None = None,
) -> dict[str, ImageSource]:
    """The OOD sets found on disk, not decoded yet (a warm feature cache decodes none of them), and the generated
    ones (`hrp_ood.eval.generated`) at the network's image size."""
    sets: dict[str, ImageSource | torch.Tensor] = {}
    generated = [name for name in names if name in GENERATED_OOD_SETS and name not in ood_dirs]
    if generated:
        made = generated_ood_sets(size=image_size)
        sets.update({name: made[name] for name in generated})
    for name in names:
        if name in sets:
            continue
        try:
            sets[name] = ood_source(
                name,
                data_root,
                id_dataset=id_dataset,
                image_size=image_size,
                ood_dirs=ood_dirs,
                skip_corrupt=skip_corrupt,
                benchmark=benchmark,
            )
        except UserError as err:
            if not skip_missing or name in ood_dirs:  # a folder given with --ood-dir is never skipped
                raise
            log.warning("skipping OOD set %s: %s", name, err)
    if not sets:
        raise UserError(
            "no OOD set could be loaded; check --data-root / --ood-dir (see docs/evaluation.md, 'OOD data')"
        )
    return sets


def _versions() -> dict[str, str]:
    import sklearn
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "hrp_ood": __version__,
    }


def _noisy_train_labels(ckpt: Path) -> np.ndarray:
    noise_file = ckpt.parent / "noise.npz"
    if not noise_file.exists():
        raise UserError(f"--fit-labels noisy needs the run's {noise_file}; keep the checkpoint in its run folder")
    return load_noise(noise_file)[0]


@dataclasses.dataclass
class LoadedCheckpoint:
    """What an evaluation needs from a checkpoint: the network, its saved state and config, the ID data
    (the checkpoint's own dataset, or an OpenOOD benchmark's lists with its preprocessing). For a network trained
    elsewhere `foreign` describes it, and `state` and `cfg` are empty."""

    path: Path
    model: torch.nn.Module
    state: dict[str, Any]
    sha256: str  # of the bytes `state` was loaded from
    cfg: TrainConfig | None
    bundle: DataBundle
    device: torch.device
    benchmark: Benchmark | None = None
    remember_id_data: Callable[[], None] = lambda: None  # keeps the ID dataset's labels once evaluated (_id_data)
    foreign: ForeignNetwork | None = None
    normalization_source: str = "checkpoint"  # where bundle.mean/std come from (without a benchmark)

    @property
    def dataset(self) -> str:
        """The ID dataset's name: the training config's; for a network trained elsewhere the benchmark's or the
        dataset given."""
        if self.cfg is not None:
            return self.cfg.dataset
        return self.benchmark.name if self.benchmark is not None else self.bundle.name

    def cache_key(self, net: str) -> str:
        """The feature cache's key for network `net` of the checkpoint: the weights' hash and the net choice (the
        architecture for a network trained elsewhere)."""
        return f"{self.sha256[:16]}-" + (self.foreign.arch if self.foreign is not None else f"net{net}")

    @property
    def preprocessing(self) -> dict[str, Any]:
        if self.benchmark is not None:
            return self.benchmark.preprocessing
        size = self.bundle.image_size
        return {
            "source": self.normalization_source,
            "resize": size,
            "crop": size,
            "mean": list(self.bundle.mean),
            "std": list(self.bundle.std),
        }


def default_eval_dir(ckpt: Path, net: str) -> Path:
    """`<run>/eval_<net>` for last.pt, `<run>/eval_<net>_<stem>` for any other checkpoint (best.pt → eval_<net>_best),
    so evaluating two checkpoints of one run never replaces one's results with the other's."""
    return ckpt.parent / (f"eval_{net}" if ckpt.stem == "last" else f"eval_{net}_{ckpt.stem}")


def default_cache_dir(ckpt: Path) -> Path:
    return ckpt.parent / "cache"


def _load_id_dataset(
    state: dict[str, Any], cfg: TrainConfig, ckpt: Path, id_data_root: Path | None, cache_dir: Path
) -> tuple[DataBundle, Callable[[], None]]:
    """The ID dataset named in the checkpoint, at the checkpoint's image size and with its saved mean/std, and
    the call that remembers it in `cache_dir` (`load_dataset_lazily`: with the memo and the features cached, a
    later evaluation decodes none of its images).

    The flags choose only where the files are (`--id-data-root`); what they must be, and how they are
    normalised, is what the network was trained on.
    """
    saved = state["dataset"]
    root = id_data_root or cfg.data_root
    try:
        bundle, remember = load_dataset_lazily(cfg.dataset, root, image_size=saved["image_size"], memo_dir=cache_dir)
    except UserError as err:
        raise UserError(
            f"cannot load the ID dataset of {ckpt}, which was trained on {cfg.dataset}: {err}; "
            f"or point --id-data-root at the {cfg.dataset} files"
        ) from None
    if list(bundle.classes) != list(saved["classes"]):
        raise UserError(
            f"{ckpt} was trained on {cfg.dataset} with {len(saved['classes'])} classes, but the "
            f"{cfg.dataset} files at {root} hold {len(bundle.classes)} different ones; point "
            "--id-data-root at the dataset the checkpoint was trained on"
        )
    return dataclasses.replace(bundle, mean=tuple(saved["mean"]), std=tuple(saved["std"])), remember


def _load_model(
    ckpt: Path, net: str, device: str
) -> tuple[torch.nn.Module, dict[str, Any], str, TrainConfig, torch.device]:
    """(network on the device, saved state, sha256 of the bytes read, its config, the device)."""
    torch_device = resolve_device(device)
    state, sha256 = read_checkpoint(ckpt)  # one read: the hash names exactly the weights loaded
    model = network_from_state(state, ckpt, net, torch_device)
    return model, state, sha256, checkpoint_config(state, ckpt), torch_device


def _id_data(
    ckpt: Path,
    state: dict[str, Any],
    cfg: TrainConfig,
    id_data_root: Path | None,
    benchmark: Benchmark | None,
    data_root: Path,
    skip_corrupt: bool,
    cache_dir: Path,
) -> tuple[DataBundle, Callable[[], None]]:
    if benchmark is None:
        return _load_id_dataset(state, cfg, ckpt, id_data_root, cache_dir)
    check_checkpoint_fits(benchmark, state["dataset"]["classes"], state["dataset"]["image_size"], ckpt)
    _warn_other_normalisation(benchmark, state["dataset"])
    bundle = load_benchmark_id_data(benchmark, data_root, state["dataset"]["classes"], skip_corrupt=skip_corrupt)
    return bundle, lambda: None


def _warn_other_normalisation(benchmark: Benchmark, saved: dict[str, Any]) -> None:
    trained = tuple(saved["mean"]) + tuple(saved["std"])
    if max(abs(a - b) for a, b in zip(trained, benchmark.mean + benchmark.std)) > 1e-3:
        log.warning(
            "the network was trained with mean %s / std %s; OpenOOD's %s preprocessing normalises with "
            "%s / %s, as OpenOOD's own evaluation would",
            _rounded(saved["mean"]),
            _rounded(saved["std"]),
            benchmark.name,
            list(benchmark.mean),
            list(benchmark.std),
        )


def _rounded(values: Any) -> list[float]:
    return [round(float(v), 4) for v in values]


def load_checkpoint_for_evaluation(
    ckpt: Path,
    net: str = "ensemble",
    device: str = "auto",
    id_data_root: Path | None = None,
    *,
    benchmark: Benchmark | None = None,
    data_root: Path = Path("./data"),
    skip_corrupt: bool = False,
    cache_dir: Path | None = None,
) -> LoadedCheckpoint:
    """Checkpoint → network on the device + its ID data (the checkpoint's dataset, or `benchmark`'s lists under
    `data_root`); every failure is a UserError. `cache_dir` is the feature cache (default beside `ckpt`)."""
    model, state, sha256, cfg, torch_device = _load_model(ckpt, net, device)
    bundle, remember = _id_data(
        ckpt, state, cfg, id_data_root, benchmark, data_root, skip_corrupt, cache_dir or default_cache_dir(ckpt)
    )
    return LoadedCheckpoint(ckpt, model, state, sha256, cfg, bundle, torch_device, benchmark, remember)


def evaluate_loaded(
    loaded: LoadedCheckpoint,
    ood_images: dict[str, torch.Tensor | ImageSource],
    postprocessors: list[str],
    *,
    net: str = "ensemble",
    out_dir: Path | None = None,
    cache_dir: Path | None = None,
    fit_labels: str = "clean",
    batch_size: int = 256,
    progress: bool = False,
    backend: str = "ours",
    validation: ValidationImages | None = None,
    tune: bool = False,
) -> dict[str, Any]:
    """Score a loaded checkpoint against already-loaded OOD images; write and return eval.json's content."""
    ckpt, device = loaded.path, loaded.device
    if backend == "openood":
        from hrp_ood.eval.openood_backend import evaluate_with_openood

        if fit_labels != "clean":
            raise UserError(
                "--backend openood fits on the clean ID labels only (OpenOOD's convention); drop --fit-labels"
            )
        result = evaluate_with_openood(
            loaded.model,
            loaded.bundle,
            ood_images,
            postprocessors,
            device=device,
            batch_size=batch_size,
            validation=validation,
            tune=tune,
            dataset=loaded.dataset,
        )
    else:
        result = run_evaluation(
            loaded.model,
            loaded.bundle,
            ood_images,
            postprocessors,
            cache_dir=cache_dir or default_cache_dir(ckpt),
            cache_key=loaded.cache_key(net),
            fit_labels=fit_labels,
            noisy_train_labels=_noisy_train_labels(ckpt) if fit_labels == "noisy" else None,
            device=device,
            batch_size=batch_size,
            amp=device.type == "cuda",
            progress=progress,
            validation=validation,
            tune=tune,
        )
    meta = {
        **_evaluated(loaded, net),
        "fit_labels": fit_labels,
        "versions": _versions(),
        "postprocessors": postprocessors,
        "ood_sets": list(ood_images),
        "backend": backend,
        "benchmark": loaded.benchmark.name if loaded.benchmark else None,
        "preprocessing": loaded.preprocessing,
        **result.settings,
    }
    out_dir = out_dir or default_eval_dir(ckpt, net)
    report = write_eval_outputs(result, out_dir, meta)
    loaded.remember_id_data()
    log.info("wrote %s", out_dir / "eval.json")
    return report


def _evaluated(loaded: LoadedCheckpoint, net: str) -> dict[str, Any]:
    """What was evaluated, as eval.json's first fields: the training run (its config) of an `hrp-ood train`
    checkpoint; for a network trained elsewhere its architecture (also as "method"), weights file and hash and class
    count under "network", its noise "unknown" and seed 0 (report groups evaluations by these fields)."""
    common = {"checkpoint": str(loaded.path), "checkpoint_sha256": loaded.sha256}
    if loaded.foreign is not None:
        arch = loaded.foreign.arch
        return {
            **common,
            "method": arch,
            "dataset": loaded.dataset,
            "noise": "unknown",
            "seed": 0,
            "net": "1",
            "model": arch,
            "epoch": None,
            "network": loaded.foreign.describe(),
        }
    cfg = loaded.cfg
    return {
        **common,
        "method": cfg.method,
        "dataset": cfg.dataset,
        "noise": "file" if cfg.noisy_labels else cfg.noise,
        "seed": cfg.seed,
        "net": net,
        # how the ensemble combines the networks' logits: the method's own test (mean or sum; MSP and energy differ)
        "test_rule": cfg.spec.test_rule if net == "ensemble" and cfg.spec.networks > 1 else None,
        "model": cfg.model,
        "epoch": loaded.state["epoch"],
    }


def tuning_note(report: dict[str, Any]) -> str | None:
    """One line on OpenOOD's parameter search: what it chose, or which rows would differ without it."""
    tuning = report.get("tuning") or {}
    if tuning.get("searched"):
        chosen = "; ".join(f"{name} {_params(search['chosen'])}" for name, search in tuning["searched"].items())
        return f"OpenOOD's parameter search chose: {chosen}"
    if tuning.get("openood_would_tune"):
        names = ", ".join(tuning["openood_would_tune"])
        return (
            f"note: OpenOOD would tune {names} on its validation split before scoring; these rows use fixed "
            "defaults (add --tune for OpenOOD's search)"
        )
    return None


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in params.items())


@dataclasses.dataclass(frozen=True)
class EvaluationRequest:
    """One evaluation: what `hrp-ood evaluate`'s flags or an experiment file's `evaluation:` say (evaluate --help)."""

    ckpt: Path
    ood: tuple[str, ...] = ("all",)
    ood_dirs: tuple[tuple[str, Path], ...] = ()  # (name, image folder)
    postprocessors: tuple[str, ...] = DEFAULT_POSTPROCESSORS
    net: str = "ensemble"
    data_root: Path = Path("./data")
    benchmark: str | None = None
    tune: bool = False
    val_id_dir: Path | None = None
    val_ood_dir: Path | None = None
    id_data_root: Path | None = None
    fit_labels: str = "clean"
    out: Path | None = None  # default <ckpt folder>/eval_<net>
    cache_dir: Path | None = None  # default <ckpt folder>/cache
    skip_missing: bool = False
    skip_corrupt: bool = False
    backend: str = "ours"
    device: str = "auto"
    batch_size: int = 256
    progress: bool = False
    # a network trained elsewhere (hrp_ood.eval.foreign): `ckpt` is its weights file
    arch: str | None = None  # one of list_models(), torchvision:NAME or timm:NAME
    num_classes: int | None = None  # default: the benchmark's
    dataset: str | None = None  # its ID dataset (hrp_ood.data.DATASETS) under id_data_root, without a benchmark
    mean: tuple[float, ...] | None = None  # its input normalisation (default: the benchmark's or the dataset's)
    std: tuple[float, ...] | None = None
    image_size: int | None = None  # its input size (default: the benchmark's or the dataset's)


def evaluate(request: EvaluationRequest) -> dict[str, Any]:
    """Run one evaluation; write and return eval.json's content. Everything that can be checked without the data
    is checked first; a bad checkpoint, a missing validation split or missing ID data fails before any (slow) OOD
    data is read."""
    r = request
    postprocessors = _checked_names(
        r.postprocessors, list_postprocessors(), "postprocessor", tuple(list_postprocessors())
    )
    ood_dirs = {name: Path(folder) for name, folder in r.ood_dirs}
    check_ood_set_names(ood_dirs, "OOD folders")
    if r.benchmark is not None and r.benchmark not in BENCHMARKS:
        raise UserError(f"unknown benchmark {r.benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    benchmark = get_benchmark(r.benchmark) if r.benchmark else None
    names, added = ood_set_names(r.ood, ood_dirs, benchmark)
    if added:
        log.info("scoring %s too: given with --ood-dir", ", ".join(added))
    names += added
    if r.fit_labels not in FIT_LABELS:
        raise UserError(f"fit_labels must be one of {', '.join(FIT_LABELS)}, got {r.fit_labels!r}")
    if r.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {r.batch_size}")
    num_classes = _check_foreign_request(r, benchmark)
    out_dir = r.out or _default_eval_dir(r)
    check_output_folder(out_dir, "--out")
    cache_dir = r.cache_dir or default_cache_dir(r.ckpt)
    check_output_folder(cache_dir, "--cache-dir")
    if r.backend == "openood":  # refused before anything is loaded
        check_openood_backend(postprocessors, device_type(r.device), dataset=benchmark.name if benchmark else None)
    if r.arch is None:
        model, state, sha256, cfg, device = _load_model(r.ckpt, r.net, r.device)
        dataset = cfg.dataset
    else:
        device = resolve_device(r.device)
        foreign = load_foreign_network(r.ckpt, r.arch, num_classes)
        dataset = benchmark.name if benchmark else r.dataset
    list_benchmark = benchmark or BENCHMARKS.get(dataset)
    found = find_validation(r.data_root, list_benchmark, r.val_id_dir, r.val_ood_dir)
    if r.tune:
        require_tuning_split(found, r.data_root, list_benchmark)
    if r.backend == "openood" and benchmark is None:
        check_openood_backend(postprocessors, device.type, dataset=dataset)
    if r.arch is None:
        bundle, remember = _id_data(
            r.ckpt, state, cfg, r.id_data_root, benchmark, r.data_root, r.skip_corrupt, cache_dir
        )
        loaded = LoadedCheckpoint(r.ckpt, model, state, sha256, cfg, bundle, device, benchmark, remember)
    else:
        bundle, remember, source = _foreign_id_data(r, benchmark, num_classes, cache_dir)
        model = with_network_contract(foreign, bundle.image_size).to(device).eval()
        loaded = LoadedCheckpoint(
            r.ckpt, model, {}, foreign.sha256, None, bundle, device, benchmark, remember, foreign, source
        )
    pre_size = benchmark.pre_size if benchmark else None
    ood = load_ood_sets(
        names,
        r.data_root,
        id_dataset=dataset,
        image_size=bundle.image_size,
        ood_dirs=ood_dirs,
        skip_missing=r.skip_missing,
        skip_corrupt=r.skip_corrupt,
        benchmark=benchmark,
    )
    needs_validation = r.tune or any(create_postprocessor(name).fit_split == "val" for name in postprocessors)
    validation = (
        load_validation(found, bundle.image_size, pre_size, skip_corrupt=r.skip_corrupt) if needs_validation else None
    )
    return evaluate_loaded(
        loaded,
        ood,
        postprocessors,
        net=r.net,
        out_dir=out_dir,
        cache_dir=cache_dir,
        fit_labels=r.fit_labels,
        batch_size=r.batch_size,
        backend=r.backend,
        progress=r.progress,
        validation=validation,
        tune=r.tune,
    )


FOREIGN_FLAGS = ("num_classes", "dataset", "mean", "std", "image_size")


def _check_foreign_request(r: EvaluationRequest, benchmark: Benchmark | None) -> int | None:
    """The class count of a network trained elsewhere (None for an `hrp-ood train` checkpoint), after checking that
    the request describes it fully and consistently; everything here needs no file."""
    given = [f"--{name.replace('_', '-')}" for name in FOREIGN_FLAGS if getattr(r, name) is not None]
    if r.arch is None:
        if given:
            raise UserError(
                f"{', '.join(given)} describe a network trained elsewhere: add --arch NAME, or drop them for a "
                "checkpoint of `hrp-ood train` (it names its own network and data)"
            )
        return None
    if r.net not in ("ensemble", "1"):
        raise UserError(f"--net {r.net}: a weights file given with --arch holds one network; drop --net")
    if r.fit_labels == "noisy":
        raise UserError(
            "--fit-labels noisy needs the noisy labels of an `hrp-ood train` run; a network trained elsewhere has "
            "none here: use clean or pred"
        )
    if benchmark is None and r.dataset is None:
        raise UserError(
            f"--arch {r.arch} needs its ID data: give --benchmark NAME (OpenOOD's lists under --data-root) or "
            f"--dataset NAME ({', '.join(DATASETS)}) with --id-data-root"
        )
    if benchmark is not None and r.dataset is not None:
        raise UserError(f"--benchmark {benchmark.name} reads the ID data from OpenOOD's lists: drop --dataset")
    if r.dataset is not None and r.dataset not in DATASETS:
        raise UserError(f"unknown --dataset {r.dataset!r}; choose one of {', '.join(DATASETS)}")
    if (r.mean is None) != (r.std is None):
        raise UserError("give --mean and --std together (three values each, in [0, 1] pixel scale)")
    for name, values in (("mean", r.mean), ("std", r.std)):
        finite = values is None or all(math.isfinite(v) for v in values)
        if values is not None and (len(values) != 3 or not finite or (name == "std" and min(values) <= 0)):
            positive = ", all positive" if name == "std" else ""
            raise UserError(f"--{name} needs three finite values (R,G,B){positive}, got {','.join(map(str, values))}")
    if r.image_size is not None and not 1 <= r.image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size must be a number of pixels from 1 to {MAX_IMAGE_SIZE}, got {r.image_size}")
    num_classes = r.num_classes if r.num_classes is not None else (benchmark.num_classes if benchmark else None)
    if num_classes is None or num_classes < 1:
        raise UserError(f"--arch {r.arch} needs the network's class count: give --num-classes N")
    return num_classes


def _default_eval_dir(r: EvaluationRequest) -> Path:
    """`default_eval_dir`; `<folder>/eval_<stem>` beside the weights file of a network trained elsewhere."""
    return default_eval_dir(r.ckpt, r.net) if r.arch is None else r.ckpt.parent / f"eval_{r.ckpt.stem}"


def _foreign_id_data(
    r: EvaluationRequest, benchmark: Benchmark | None, num_classes: int, cache_dir: Path
) -> tuple[DataBundle, Callable[[], None], str]:
    """(ID data, the call that remembers it, where its normalisation comes from) of a network trained elsewhere:
    the benchmark's lists and preprocessing, or the dataset's loader (the same as for a checkpoint's dataset) at
    `--image-size`, normalised with --mean/--std or else the dataset's own statistics."""
    if benchmark is not None:
        classes = [str(k) for k in range(num_classes)]
        check_checkpoint_fits(benchmark, classes, r.image_size or benchmark.img_size, r.ckpt)
        if r.mean is not None:
            _warn_other_normalisation(benchmark, {"mean": r.mean, "std": r.std})
        bundle = load_benchmark_id_data(benchmark, r.data_root, classes, skip_corrupt=r.skip_corrupt)
        return bundle, lambda: None, f"openood:{benchmark.name}"
    root = r.id_data_root or r.data_root
    try:
        bundle, remember = load_dataset_lazily(r.dataset, root, image_size=r.image_size, memo_dir=cache_dir)
    except UserError as err:
        raise UserError(
            f"cannot load the ID dataset {r.dataset} of {r.ckpt}: {err}; point --id-data-root at the {r.dataset} files"
        ) from None
    if bundle.num_classes != num_classes:
        raise UserError(
            f"the {r.dataset} files at {root} hold {bundle.num_classes} classes but --num-classes is {num_classes}; "
            "give the dataset the network was trained on"
        )
    if r.mean is None:
        log.info("normalising with %s's mean %s / std %s", r.dataset, _rounded(bundle.mean), _rounded(bundle.std))
        return bundle, remember, f"dataset:{r.dataset}"
    return dataclasses.replace(bundle, mean=tuple(r.mean), std=tuple(r.std)), remember, "--mean/--std"
