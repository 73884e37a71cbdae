"""`hrp-ood evaluate`'s flags → an `EvaluationRequest` of the evaluation session (`hrp_ood.eval.session`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hrp_ood.data.benchmarks import BENCHMARKS
from hrp_ood.data.datasets import DATASETS
from hrp_ood.errors import UserError
from hrp_ood.eval.evaluate import check_ood_set_names
from hrp_ood.eval.generated import GENERATED_OOD_SETS
from hrp_ood.eval.network import NET_CHOICES
from hrp_ood.eval.ood_data import FAR_OOD_SETS, NEAR_OOD_SETS
from hrp_ood.eval.session import DEFAULT_POSTPROCESSORS, FIT_LABELS, EvaluationRequest
from hrp_ood.models import list_models
from hrp_ood.postprocessors.openood_adapter import OPENOOD_BACKEND_HELP


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt",
        required=True,
        type=Path,
        help="last.pt / best.pt written by hrp-ood train, or with --arch the state dict of a network trained elsewhere",
    )
    p.add_argument("--net", default="ensemble", choices=NET_CHOICES)
    p.add_argument(
        "--arch",
        default=None,
        help="evaluate a network trained elsewhere: --ckpt is its state dict (OpenOOD's, DivideMix/UNICON's, "
        f"torchvision's), NAME its architecture: {', '.join(list_models())}, torchvision:NAME or timm:NAME; give "
        "its ID data with --benchmark or --dataset (docs/evaluation.md)",
    )
    p.add_argument(
        "--num-classes", type=int, default=None, help="with --arch: its class count (default: the benchmark's)"
    )
    p.add_argument(
        "--dataset",
        default=None,
        choices=DATASETS,
        help="with --arch and no --benchmark: its ID dataset, read from --id-data-root (default: --data-root)",
    )
    p.add_argument(
        "--mean",
        type=_three_floats,
        default=None,
        metavar="R,G,B",
        help="with --arch: the input normalisation it was trained with, in [0, 1] pixel scale (default: the "
        "benchmark's, or the dataset's as hrp-ood train uses it)",
    )
    p.add_argument("--std", type=_three_floats, default=None, metavar="R,G,B", help="with --arch: see --mean")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="with --arch and --dataset: its input size (image folders and animal10n are resized to it)",
    )
    p.add_argument(
        "--ood",
        default="all",
        help=f"comma list of OOD sets or 'all' (= {','.join(FAR_OOD_SETS)}); near-OOD: "
        f"{','.join(NEAR_OOD_SETS)}; generated (no download): {','.join(GENERATED_OOD_SETS)}; names given with "
        "--ood-dir count too",
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
        help="root of the ID dataset (default: the data_root the checkpoint was trained with; with --arch: "
        "--data-root)",
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
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: <ckpt folder>/eval_<net> for last.pt, eval_<net>_<name> for another)",
    )
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


def _three_floats(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers R,G,B, got {text!r}")
    return values


def _parse_ood_dirs(items: list[str]) -> dict[str, Path]:
    dirs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--ood-dir expects NAME=PATH, e.g. --ood-dir mine=/data/my_ood, got {item!r}")
        dirs[name.strip()] = Path(path)
    check_ood_set_names(dirs, "--ood-dir")
    return dirs


def request_from_args(args: argparse.Namespace) -> EvaluationRequest:
    def names(value: str) -> tuple[str, ...]:
        return tuple(v.strip() for v in value.split(",") if v.strip())

    return EvaluationRequest(
        ckpt=args.ckpt,
        ood=names(args.ood),
        ood_dirs=tuple(_parse_ood_dirs(args.ood_dir).items()),
        postprocessors=names(args.postprocessor),
        net=args.net,
        data_root=args.data_root,
        benchmark=args.benchmark,
        tune=args.tune,
        val_id_dir=args.val_id_dir,
        val_ood_dir=args.val_ood_dir,
        id_data_root=args.id_data_root,
        fit_labels=args.fit_labels,
        out=args.out,
        cache_dir=args.cache_dir,
        skip_missing=args.skip_missing,
        skip_corrupt=args.skip_corrupt,
        backend=args.backend,
        device=args.device,
        batch_size=args.batch_size,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
        arch=args.arch,
        num_classes=args.num_classes,
        dataset=args.dataset,
        mean=args.mean,
        std=args.std,
        image_size=args.image_size,
    )
