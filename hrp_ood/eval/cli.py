"""`hrp-ood evaluate`: checkpoint → network → OOD sets → postprocessors → eval.json / CSV / Markdown."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hrp_ood.checkpoint import read_checkpoint
from hrp_ood.config import TrainConfig
from hrp_ood.data.bundle import DataBundle
from hrp_ood.data.datasets import load_dataset_lazily
from hrp_ood.data.noise import load_noise
from hrp_ood.data.sources import ImageSource
from hrp_ood.errors import UserError
from hrp_ood.eval.benchmarks import BENCHMARKS, Benchmark, check_checkpoint_fits, get_benchmark, load_benchmark_id_data
from hrp_ood.eval.evaluate import check_ood_set_names, run_evaluation, write_eval_outputs
from hrp_ood.eval.network import NET_CHOICES, checkpoint_config, network_from_state
from hrp_ood.eval.ood_data import FAR_OOD_SETS, NEAR_OOD_SETS, ood_source
from hrp_ood.eval.validation import ValidationImages, find_validation, load_validation, require_tuning_split
from hrp_ood.io import check_output_folder
from hrp_ood.postprocessors import create_postprocessor, list_postprocessors
from hrp_ood.postprocessors.openood_adapter import OPENOOD_BACKEND_HELP, check_openood_backend

log = logging.getLogger(__name__)

DEFAULT_POSTPROCESSORS = ("msp", "ebo", "mds")
FIT_LABELS = ("clean", "noisy", "pred")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, type=Path, help="last.pt / best.pt written by hrp-ood train")
    p.add_argument("--net", default="ensemble", choices=NET_CHOICES)
    p.add_argument(
        "--ood",
        default="all",
        help=f"comma list of OOD sets or 'all' (= {','.join(FAR_OOD_SETS)}); near-OOD: "
        f"{','.join(NEAR_OOD_SETS)}; names given with --ood-dir count too",
    )
    p.add_argument(
        "--ood-dir",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an image folder to use as OOD set NAME (repeatable)",
    )
    p.add_argument(
        "--data-root", type=Path, default=Path("./data"), help="root of the OOD data (OpenOOD layout or plain formats)"
    )
    p.add_argument(
        "--benchmark",
        choices=list(BENCHMARKS),
        default=None,
        help="read --data-root as OpenOOD's benchmark NAME, whatever the checkpoint was trained on: its ID "
        "train/test lists, its OOD lists (--ood all = its far-OOD sets), its val lists, and "
        "OpenOOD's preprocessing for it (resize, crop, mean/std)",
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="OpenOOD v1.5's automatic parameter search before scoring (react percentile, knn K, odin "
        "temperature/noise; OpenOOD's grids and rule: best AUROC of ID-val vs OOD-val); the "
        "chosen values go to eval.json. Default: fixed defaults",
    )
    p.add_argument(
        "--val-id-dir",
        type=Path,
        default=None,
        help="image folder used as ID-val (default: OpenOOD's val_<id>.txt under --data-root)",
    )
    p.add_argument(
        "--val-ood-dir",
        type=Path,
        default=None,
        help="image folder used as OOD-val (default: OpenOOD's val_tin.txt / val_openimage_o.txt)",
    )
    p.add_argument(
        "--id-data-root",
        type=Path,
        default=None,
        help="root of the ID dataset (default: the data_root the checkpoint was trained with)",
    )
    p.add_argument(
        "--postprocessor", default=",".join(DEFAULT_POSTPROCESSORS), help="comma list of postprocessors or 'all'"
    )
    p.add_argument(
        "--fit-labels",
        default="clean",
        choices=FIT_LABELS,
        help="labels MDS & co. are fitted with: clean (OpenOOD), noisy (what a practitioner has), pred",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <ckpt folder>/eval_<net>)")
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: <ckpt folder>/cache)")
    p.add_argument("--skip-missing", action="store_true", help="skip OOD sets that are not on disk (with a warning)")
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images (counted) instead of failing")
    p.add_argument(
        "--backend",
        default="ours",
        choices=["ours", "openood"],
        help=f"ours: one cached pass for every postprocessor, CPU or GPU; {OPENOOD_BACKEND_HELP}",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm progress bars (default: only on a terminal)",
    )


def _split_names(
    value: str, valid: list[str] | tuple[str, ...], what: str, all_means: tuple[str, ...], hint: str = ""
) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["all"]:
        return list(all_means)
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise UserError(
            f"unknown {what} {', '.join(unknown) or '(none given)'}; valid: {', '.join(valid)}, all"
            + (f"; {hint}" if hint else "")
        )
    return names


def _parse_ood_dirs(items: list[str]) -> dict[str, Path]:
    dirs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--ood-dir expects NAME=PATH, e.g. --ood-dir mine=/data/my_ood, got {item!r}")
        dirs[name.strip()] = Path(path)
    check_ood_set_names(dirs, "--ood-dir")
    return dirs


def _ood_names(value: str, ood_dirs: dict[str, Path], benchmark: Benchmark | None) -> list[str]:
    """--ood as a list of set names ('all' = the far-OOD sets, the benchmark's own with --benchmark), then every
    set given with --ood-dir that --ood does not list: a set the user named is scored, never dropped."""
    far = tuple(benchmark.far) if benchmark else FAR_OOD_SETS
    valid = [*far, *(benchmark.near if benchmark else NEAR_OOD_SETS)]
    names = _split_names(
        value, [*valid, *ood_dirs], "OOD set", far, hint="or give an image folder as --ood-dir NAME=PATH"
    )
    added = [name for name in ood_dirs if name not in names]
    if added:
        log.info("scoring %s too: given with --ood-dir", ", ".join(added))
    return names + added


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
    """The OOD sets found on disk, not decoded yet (a warm feature cache decodes none of them)."""
    sets = {}
    for name in names:
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
        raise UserError("no OOD set could be loaded; check --data-root / --ood-dir (see README, 'OOD data')")
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
    }


def _noisy_train_labels(ckpt: Path) -> np.ndarray:
    noise_file = ckpt.parent / "noise.npz"
    if not noise_file.exists():
        raise UserError(f"--fit-labels noisy needs the run's {noise_file}; keep the checkpoint in its run folder")
    return load_noise(noise_file)[0]


@dataclasses.dataclass
class LoadedCheckpoint:
    """What an evaluation needs from a checkpoint: the network, its saved state and config, the ID data
    (the checkpoint's own dataset, or an OpenOOD benchmark's lists with its preprocessing)."""

    path: Path
    model: torch.nn.Module
    state: dict[str, Any]
    sha256: str  # of the bytes `state` was loaded from
    cfg: TrainConfig
    bundle: DataBundle
    device: torch.device
    benchmark: Benchmark | None = None
    remember_id_data: Callable[[], None] = lambda: None  # keeps the ID dataset's labels once evaluated (_id_data)

    @property
    def preprocessing(self) -> dict[str, Any]:
        if self.benchmark is not None:
            return self.benchmark.preprocessing
        size = self.bundle.image_size
        return {
            "source": "checkpoint",
            "resize": size,
            "crop": size,
            "mean": list(self.bundle.mean),
            "std": list(self.bundle.std),
        }


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
    from hrp_ood.train.trainer import resolve_device

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
    ckpt, cfg, device, sha = loaded.path, loaded.cfg, loaded.device, loaded.sha256
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
            dataset=loaded.benchmark.name if loaded.benchmark else cfg.dataset,
        )
    else:
        result = run_evaluation(
            loaded.model,
            loaded.bundle,
            ood_images,
            postprocessors,
            cache_dir=cache_dir or default_cache_dir(ckpt),
            cache_key=f"{sha[:16]}-net{net}",
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
        "checkpoint": str(ckpt),
        "checkpoint_sha256": sha,
        "method": cfg.method,
        "dataset": cfg.dataset,
        "noise": "file" if cfg.noisy_labels else cfg.noise,
        "seed": cfg.seed,
        "net": net,
        "model": cfg.model,
        "epoch": loaded.state["epoch"],
        "fit_labels": fit_labels,
        "versions": _versions(),
        "postprocessors": postprocessors,
        "ood_sets": list(ood_images),
        "backend": backend,
        "benchmark": loaded.benchmark.name if loaded.benchmark else None,
        "preprocessing": loaded.preprocessing,
        **result.settings,
    }
    out_dir = out_dir or ckpt.parent / f"eval_{net}"
    report = write_eval_outputs(result, out_dir, meta)
    loaded.remember_id_data()
    log.info("wrote %s", out_dir / "eval.json")
    return report


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


def evaluate_checkpoint(
    ckpt: Path,
    ood_images: dict[str, torch.Tensor],
    postprocessors: list[str],
    *,
    net: str = "ensemble",
    out_dir: Path | None = None,
    cache_dir: Path | None = None,
    id_data_root: Path | None = None,
    fit_labels: str = "clean",
    device: str = "auto",
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate one checkpoint against already-loaded OOD images; write and return eval.json's content."""
    loaded = load_checkpoint_for_evaluation(ckpt, net, device, id_data_root, cache_dir=cache_dir)
    return evaluate_loaded(
        loaded,
        ood_images,
        postprocessors,
        net=net,
        out_dir=out_dir,
        cache_dir=cache_dir,
        fit_labels=fit_labels,
        batch_size=batch_size,
        progress=progress,
    )


def evaluate_from_args(args: argparse.Namespace) -> dict[str, Any]:
    postprocessors = _split_names(
        args.postprocessor, list_postprocessors(), "postprocessor", tuple(list_postprocessors())
    )
    ood_dirs = _parse_ood_dirs(args.ood_dir)
    benchmark = get_benchmark(args.benchmark) if args.benchmark else None
    names = _ood_names(args.ood, ood_dirs, benchmark)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_output_folder(args.out or args.ckpt.parent / f"eval_{args.net}", "--out")
    cache_dir = args.cache_dir or default_cache_dir(args.ckpt)
    check_output_folder(cache_dir, "--cache-dir")
    if args.backend == "openood":  # refused before anything is loaded
        check_openood_backend(postprocessors, _device_type(args.device), dataset=benchmark.name if benchmark else None)
    # a bad checkpoint, a missing validation split or missing ID data fails before any (slow) OOD data is read
    model, state, sha256, cfg, device = _load_model(args.ckpt, args.net, args.device)
    list_benchmark = benchmark or BENCHMARKS.get(cfg.dataset)
    found = find_validation(args.data_root, list_benchmark, args.val_id_dir, args.val_ood_dir)
    if args.tune:
        require_tuning_split(found, args.data_root, list_benchmark)
    if args.backend == "openood" and benchmark is None:
        check_openood_backend(postprocessors, device.type, dataset=cfg.dataset)
    bundle, remember = _id_data(
        args.ckpt, state, cfg, args.id_data_root, benchmark, args.data_root, args.skip_corrupt, cache_dir
    )
    loaded = LoadedCheckpoint(args.ckpt, model, state, sha256, cfg, bundle, device, benchmark, remember)
    pre_size = benchmark.pre_size if benchmark else None
    ood = load_ood_sets(
        names,
        args.data_root,
        id_dataset=cfg.dataset,
        image_size=bundle.image_size,
        ood_dirs=ood_dirs,
        skip_missing=args.skip_missing,
        skip_corrupt=args.skip_corrupt,
        benchmark=benchmark,
    )
    needs_validation = args.tune or any(create_postprocessor(name).fit_split == "val" for name in postprocessors)
    validation = (
        load_validation(found, bundle.image_size, pre_size, skip_corrupt=args.skip_corrupt)
        if needs_validation
        else None
    )
    return evaluate_loaded(
        loaded,
        ood,
        postprocessors,
        net=args.net,
        out_dir=args.out,
        cache_dir=cache_dir,
        fit_labels=args.fit_labels,
        batch_size=args.batch_size,
        backend=args.backend,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
        validation=validation,
        tune=args.tune,
    )


def _device_type(device: str) -> str:
    """'cuda' or 'cpu' for --device, without touching the checkpoint."""
    from hrp_ood.train.trainer import device_type

    return device_type(device)
