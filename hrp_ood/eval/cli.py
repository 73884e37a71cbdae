"""`hrp-ood evaluate`: checkpoint → network → OOD sets → postprocessors → eval.json / CSV / Markdown."""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hrp_ood.data import load_dataset
from hrp_ood.data.noise import load_noise
from hrp_ood.errors import UserError
from hrp_ood.eval.evaluate import format_markdown_table, run_evaluation, write_eval_outputs
from hrp_ood.eval.features import file_sha256
from hrp_ood.eval.network import NET_CHOICES, checkpoint_config, load_network
from hrp_ood.eval.ood_data import FAR_OOD_SETS, NEAR_OOD_SETS, load_ood_images
from hrp_ood.postprocessors import list_postprocessors

log = logging.getLogger(__name__)

DEFAULT_POSTPROCESSORS = ("msp", "ebo", "mds")
FIT_LABELS = ("clean", "noisy", "pred")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, type=Path, help="last.pt / best.pt written by hrp-ood train")
    p.add_argument("--net", default="ensemble", choices=NET_CHOICES)
    p.add_argument("--ood", default="all",
                   help=f"comma list of OOD sets or 'all' (= {','.join(FAR_OOD_SETS)}); near-OOD: "
                        f"{','.join(NEAR_OOD_SETS)}; names given with --ood-dir count too")
    p.add_argument("--ood-dir", action="append", default=[], metavar="NAME=PATH",
                   help="an image folder to use as OOD set NAME (repeatable)")
    p.add_argument("--data-root", type=Path, default=Path("./data"),
                   help="root of the OOD data (OpenOOD layout or plain formats)")
    p.add_argument("--id-data-root", type=Path, default=None,
                   help="root of the ID dataset (default: the data_root the checkpoint was trained with)")
    p.add_argument("--postprocessor", default=",".join(DEFAULT_POSTPROCESSORS),
                   help="comma list of postprocessors or 'all'")
    p.add_argument("--fit-labels", default="clean", choices=FIT_LABELS,
                   help="labels MDS & co. are fitted with: clean (OpenOOD), noisy (what a practitioner has), pred")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <ckpt folder>/eval_<net>)")
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache (default: <ckpt folder>/cache)")
    p.add_argument("--skip-missing", action="store_true", help="skip OOD sets that are not on disk (with a warning)")
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images (counted) instead of failing")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bars (default: only on a terminal)")


def _split_names(value: str, valid: list[str] | tuple[str, ...], what: str, all_means: tuple[str, ...]) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["all"]:
        return list(all_means)
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise UserError(f"unknown {what} {', '.join(unknown) or '(none given)'}; valid: {', '.join(valid)}, all")
    return names


def _parse_ood_dirs(items: list[str]) -> dict[str, Path]:
    dirs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--ood-dir expects NAME=PATH, got {item!r}")
        dirs[name.strip()] = Path(path)
    return dirs


def load_ood_sets(names: list[str], data_root: Path, *, id_dataset: str, image_size: int, ood_dirs: dict[str, Path],
                  skip_missing: bool, skip_corrupt: bool) -> dict[str, torch.Tensor]:
    sets = {}
    for name in names:
        try:
            sets[name] = load_ood_images(name, data_root, id_dataset=id_dataset, image_size=image_size,
                                         ood_dirs=ood_dirs, skip_corrupt=skip_corrupt)
        except UserError as err:
            if not skip_missing:
                raise
            log.warning("skipping OOD set %s: %s", name, err)
    if not sets:
        raise UserError("no OOD set could be loaded; check --data-root / --ood-dir (see README, 'OOD data')")
    return sets


def _versions() -> dict[str, str]:
    import sklearn
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "sklearn": sklearn.__version__}


def _noisy_train_labels(ckpt: Path) -> np.ndarray:
    noise_file = ckpt.parent / "noise.npz"
    if not noise_file.exists():
        raise UserError(f"--fit-labels noisy needs the run's {noise_file}; keep the checkpoint in its run folder")
    return load_noise(noise_file)[0]


def evaluate_checkpoint(ckpt: Path, ood_images: dict[str, torch.Tensor], postprocessors: list[str], *,
                        net: str = "ensemble", out_dir: Path | None = None, cache_dir: Path | None = None,
                        id_data_root: Path | None = None, fit_labels: str = "clean", device: str = "auto",
                        batch_size: int = 256, progress: bool = False) -> dict[str, Any]:
    """Evaluate one checkpoint against already-loaded OOD images; write and return eval.json's content."""
    from hrp_ood.train.trainer import resolve_device

    torch_device = resolve_device(device)
    model, state = load_network(ckpt, net, torch_device)
    cfg = checkpoint_config(state, ckpt)
    bundle = load_dataset(cfg.dataset, id_data_root or cfg.data_root, image_size=cfg.image_size)
    if len(bundle.classes) != len(state["dataset"]["classes"]):
        raise UserError(f"{ckpt} was trained on {len(state['dataset']['classes'])} classes but the ID dataset "
                        f"{cfg.dataset} at {id_data_root or cfg.data_root} has {len(bundle.classes)}")
    sha = file_sha256(ckpt)
    result = run_evaluation(
        model, bundle, ood_images, postprocessors, cache_dir=cache_dir or ckpt.parent / "cache",
        cache_key=f"{sha[:16]}-net{net}", fit_labels=fit_labels,
        noisy_train_labels=_noisy_train_labels(ckpt) if fit_labels == "noisy" else None,
        device=torch_device, batch_size=batch_size, amp=torch_device.type == "cuda", progress=progress,
    )
    meta = {"checkpoint": str(ckpt), "checkpoint_sha256": sha, "method": cfg.method, "dataset": cfg.dataset,
            "noise": "file" if cfg.noisy_labels else cfg.noise, "seed": cfg.seed, "net": net, "model": cfg.model,
            "epoch": state["epoch"], "fit_labels": fit_labels, "versions": _versions(),
            "postprocessors": postprocessors, "ood_sets": list(ood_images)}
    report = write_eval_outputs(result, out_dir or ckpt.parent / f"eval_{net}", meta)
    log.info("ID accuracy %.2f%%\n%s", result.id_accuracy, format_markdown_table(result.rows))
    return report


def evaluate_from_args(args: argparse.Namespace) -> dict[str, Any]:
    postprocessors = _split_names(args.postprocessor, list_postprocessors(), "postprocessor",
                                  tuple(list_postprocessors()))
    ood_dirs = _parse_ood_dirs(args.ood_dir)
    names = _split_names(args.ood, [*FAR_OOD_SETS, *NEAR_OOD_SETS, *ood_dirs], "OOD set",
                         FAR_OOD_SETS + tuple(n for n in ood_dirs if n not in FAR_OOD_SETS))
    from hrp_ood.checkpoint import load_checkpoint

    state = load_checkpoint(args.ckpt)  # fail on a bad checkpoint before reading any OOD data
    cfg = checkpoint_config(state, args.ckpt)
    ood = load_ood_sets(names, args.data_root, id_dataset=cfg.dataset, image_size=state["dataset"]["image_size"],
                        ood_dirs=ood_dirs, skip_missing=args.skip_missing, skip_corrupt=args.skip_corrupt)
    return evaluate_checkpoint(args.ckpt, ood, postprocessors, net=args.net, out_dir=args.out,
                               cache_dir=args.cache_dir, id_data_root=args.id_data_root, fit_labels=args.fit_labels,
                               device=args.device, batch_size=args.batch_size,
                               progress=sys.stderr.isatty() if args.progress is None else args.progress)
