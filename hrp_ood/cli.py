"""`hrp-ood` command line: a thin layer over the library (train, demo, evaluate, report, export, sweep, plot)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hrp_ood import __version__
from hrp_ood.config import METHODS, build_config, parse_set_option, read_yaml
from hrp_ood.errors import Interrupted, UserError, clipped, one_line, os_error_text, shown
from hrp_ood.io import check_output_file, check_output_folder
from hrp_ood.progress import configure_console_logging

log = logging.getLogger("hrp_ood")

# flag name → config key for the few training options worth a flag; everything else goes through --set key=value
TRAIN_FLAGS = {
    "dataset": str,
    "data_root": str,
    "noise": str,
    "noisy_labels": str,
    "noisy_labels_key": str,
    "method": str,
    "model": str,
    "epochs": int,
    "batch_size": int,
    "lr": float,
    "seed": int,
    "device": str,
    "out_dir": str,
    "name": str,
    "meta_size": int,
}


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="flat YAML config (see configs/); flags override it")
    for key, kind in TRAIN_FLAGS.items():
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None)
    p.add_argument("--download", action="store_true", default=None, help="download CIFAR into --data-root if missing")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set kappa=2 --set lr_milestones=[100,150]",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in <out-dir>/<name> from last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm progress bars (default: only on a terminal)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="data-parallel training in N processes (one per GPU) through torchrun",
    )
    p.add_argument(
        "--sync-bn",
        dest="sync_bn",
        action="store_true",
        default=None,
        help="with --nproc: batch-norm statistics over the global batch (same maths as one process)",
    )


def _train_overrides(args: argparse.Namespace) -> dict:
    overrides = {key: getattr(args, key) for key in [*TRAIN_FLAGS, "download", "sync_bn"]}
    for item in args.set:
        key, value = parse_set_option(item)
        overrides[key] = value
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from hrp_ood import distributed
    from hrp_ood.train.trainer import train_process

    overrides = _train_overrides(args)
    cfg = build_config(args.config, overrides)  # a bad config fails here, before any process is started
    explicit = {k for k, v in overrides.items() if v is not None}
    if args.config is not None:  # on --resume, a key the file sets is compared with the run's like the same flag
        explicit |= set(read_yaml(args.config))
    run = (cfg, args.resume, explicit, None, args.overwrite, args.progress, True)
    if args.nproc is not None:
        if args.nproc < 1:
            raise UserError(f"--nproc must be at least 1, got {args.nproc}")
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if "WORLD_SIZE" in os.environ and launched != args.nproc:
            raise UserError(
                f"--nproc {args.nproc} differs from torchrun's {launched} processes; drop --nproc "
                "when launching with torchrun yourself"
            )
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            log.info("launching %d processes", args.nproc)
            distributed.launch(args.nproc, train_process, *run)
            return 0
    train_process(*run)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from hrp_ood.demo import run_demo

    run_demo(Path(args.out_dir), epochs=args.epochs, overwrite=args.overwrite, progress=args.progress)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from hrp_ood.eval.cli import request_from_args
    from hrp_ood.eval.evaluate import format_markdown_table
    from hrp_ood.eval.session import evaluate, tuning_note

    report = evaluate(request_from_args(args))
    print(f"ID accuracy {report['id_accuracy']:.2f}%  ({report['net']} of {report['checkpoint']})")
    print(format_markdown_table(report["results"]))
    note = tuning_note(report)
    if note:
        print(note)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from hrp_ood.report import write_report

    check_output_folder(args.out, "--out")
    paths = write_report(
        [Path(p) for p in args.evals],
        Path(args.out),
        by=args.by,
        ood=args.ood,
        metrics=tuple(m.strip() for m in args.metrics.split(",")),
        plots=not args.no_plots,
        html=args.html,
    )
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from hrp_ood.sweep import check_data, load_experiment, run_sweep, status_table

    # the whole file is checked before anything starts
    experiment = load_experiment(args.experiment, args.out, args.nproc)
    if args.status:
        print(status_table(experiment))
        return 0
    if args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    check_output_folder(experiment.out, "the experiment's out")
    check_data(experiment)
    failed = run_sweep(experiment, executor=args.executor, jobs=args.jobs, rerun_changed=args.rerun_changed)
    if failed:
        print(
            f"{len(failed)} run(s) failed; see `hrp-ood sweep {args.experiment} --status` and "
            f"{experiment.out / 'sweep'}/<run>.log",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from hrp_ood.report.diagnostics import plot_run

    for name, path in plot_run(Path(args.run), Path(args.out) if args.out else None).items():
        print(f"{name}: {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hrp_ood.eval.network import export_checkpoint

    check_output_file(args.out, "--out")
    _check_not_a_run_file(Path(args.out), Path(args.ckpt))
    export = export_checkpoint(Path(args.ckpt), Path(args.out), net=args.net)
    print(f"wrote {export.weights} and its normalisation {export.normalization}")
    values = f"mean {_rounded(export.mean)}, std {_rounded(export.std)}"
    if export.matches_openood:
        print(f"normalisation: {values}, OpenOOD's {export.openood_benchmark} constants")
    else:
        print(
            f"normalisation: {values}; this differs from OpenOOD's {export.openood_benchmark} constants, which "
            "OpenOOD would feed the network: give OpenOOD's preprocessor these values (see the .json)"
        )
    return 0


def _check_not_a_run_file(out: Path, ckpt: Path) -> None:
    """export writes a new file: never the checkpoint it reads, nor a file of a run folder (a run's only
    last.pt replaced by a plain state dict could not be resumed)."""
    from hrp_ood.run_dir import CHECKPOINT, RUN_FILES

    same = out.exists() and ckpt.exists() and out.resolve() == ckpt.resolve()
    in_run = out.name in RUN_FILES and any((out.parent / name).exists() for name in ("config.yaml", CHECKPOINT))
    if same or in_run:
        raise UserError(
            f"--out {shown(out)} is {'the checkpoint being exported' if same else 'a file of a run folder'}; "
            "write the export elsewhere, e.g. --out net.pt"
        )


def _rounded(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hrp-ood",
        description="Train HRP (Holistic Reliability Propagation) on noisy labels and evaluate OOD detection.",
    )
    parser.add_argument("--version", action="version", version=f"hrp-ood {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train HRP, a baseline or an ablation on noisy labels",
        description=f"Methods: {', '.join(METHODS)}. Example: hrp-ood train --noise sym80",
    )
    _add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="offline end-to-end demo: noisy digits → HRP → OOD table (a few CPU minutes)")
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out-dir")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("evaluate", help="OOD evaluation of a checkpoint (OpenOOD conventions)")
    from hrp_ood.eval.cli import add_evaluate_arguments

    add_evaluate_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="comparison tables (CSV, Markdown, LaTeX) and plots from many eval.json")
    p.add_argument("evals", nargs="+", help="eval.json files (e.g. runs/*/eval_ensemble/eval.json)")
    p.add_argument("--by", default="noise", choices=["noise", "dataset", "method", "net", "ood"])
    p.add_argument("--ood", default="mean", help="which OOD column to tabulate: 'mean' (over sets) or a set name")
    p.add_argument("--metrics", default="auroc,fpr95", help="comma list of auroc, fpr95, aupr_in, aupr_out")
    p.add_argument("--out", default="report")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--html", action="store_true", help="also report.html: tables, figures and run links in one offline page"
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "sweep",
        help="train, evaluate and report a grid of runs from an experiment file "
        "(configs/experiments/), locally or on Slurm",
    )
    p.add_argument("experiment", help="experiment YAML: base config, grid, evaluation, report (see docs/sweeps.md)")
    p.add_argument(
        "--executor",
        default="local",
        choices=["local", "slurm"],
        help="local: worker processes on this machine; slurm: a job array through submitit",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="local runs in parallel (CPU threads are split between them; more runs than GPUs share "
        "the GPUs round-robin, except data-parallel ones)",
    )
    p.add_argument("--out", default=None, help="output folder (default: the experiment's out)")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="processes per run: data-parallel training as `hrp-ood train --nproc` (one GPU each on "
        "CUDA; a Slurm job gets N tasks); default: the experiment's nproc, else 1",
    )
    p.add_argument("--status", action="store_true", help="print every run's state and exit")
    p.add_argument(
        "--rerun-changed",
        action="store_true",
        help="train (or evaluate) again the runs whose saved config (or eval.json) differs from the experiment; "
        "their old files are moved to <out>/replaced/",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("plot", help="figures of a run's reliability diagnostics (the paper's Figs. 2 and 3)")
    p.add_argument("run", help="a run folder written by `hrp-ood train` (holds metrics.csv and signals/)")
    p.add_argument("--out", default=None, help="output folder (default RUN/plots)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("export", help="write a plain state dict of one network (OpenOOD-loadable for resnet18_32x32)")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--net", default="1", choices=["1", "2"])
    p.set_defaults(func=cmd_export)

    from hrp_ood.data.fetch import add_fetch_arguments, cmd_fetch

    p = sub.add_parser("data", help="datasets: `hrp-ood data fetch NAME... --root DIR` downloads and verifies them")
    p = p.add_subparsers(dest="data_command", required=True).add_parser("fetch", help="download, verify, install")
    add_fetch_arguments(p)
    p.set_defaults(func=cmd_fetch)
    return parser


def _out_of_memory(err: BaseException) -> bool:
    """A MemoryError (numpy, Python) or torch's allocation failure (a RuntimeError or its OutOfMemoryError)."""
    text = str(err)
    return isinstance(err, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_console_logging()
    try:
        return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"hrp-ood {args.command}: error: {clipped(one_line(str(err)))}", file=sys.stderr)
        return 2
    except OSError as err:  # the environment (disk, permissions) where no check turned it into a UserError
        if args.debug:
            raise
        where = f"{one_line(shown(err.filename))}: " if err.filename is not None else ""
        print(
            f"hrp-ood {args.command}: error: {where}{os_error_text(err)}; check the path, its permissions and "
            "the free space",
            file=sys.stderr,
        )
        return 2
    except (MemoryError, RuntimeError) as err:
        if args.debug or not _out_of_memory(err):
            raise
        print(
            f"hrp-ood {args.command}: error: out of memory ({one_line(str(err))[:120] or type(err).__name__}); lower "
            "--batch-size or --image-size, or give the command fewer images",
            file=sys.stderr,
        )
        return 2
    except Interrupted as err:
        print(f"hrp-ood {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"hrp-ood {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
