"""Noisy-label benchmark on real CIFAR-10 images: test accuracy and reliability AUROCs per method.

    python benchmarks/noisy_cifar.py                                  # CPU budget: 10k/2k subset, small_cnn
    python benchmarks/noisy_cifar.py --methods ce coteach hrp hrp_no_ram --noise sym50 sym80 --seeds 0 1 2
    python benchmarks/noisy_cifar.py --methods hrp hrp_ema=hrp,reliability_momentum=0.9   # a labelled variant
    python benchmarks/noisy_cifar.py --full --device cuda --jobs 4    # PreAct ResNet-18 on all 50k images
    python benchmarks/noisy_cifar.py --memorization --noise sym80      # CPU, a regime where CE memorises the noise
    python benchmarks/noisy_cifar.py --quick --data DIR               # the tested smoke mode

Data: the CIFAR-10 JPEG copy of the project's shared folder (`cifar10-jpeg.tar.gz`, or an already extracted
folder holding train/<class>/ and test/<class>/). A class-balanced subset (default 1,000 train / 200 test
images per class, seed 0) is linked into `--work` and trained on as an image folder; `--full` uses every image.
On the default subset small_cnn does not memorise the noise within the CPU budget (CE's test accuracy and loss
AUROC do not fall), so CE is the bar there. `--memorization` trains on 300 images per class (200 of them the
meta set) for 100 epochs, where CE fits the corrupted labels and its test accuracy falls after an early peak, the
regime the paper's methods are built for.

Each (method, noise, seed) is one `hrp-ood train` run under `--out` (skipped when its metrics.csv already
holds every epoch, so an interrupted benchmark continues where it stopped). The schedule is the paper's
scaled to `--epochs`: lr 0.05, ×0.1 at 250/450 and 400/450 of the epochs, HRP's CE warm-up and ramp as given.
Every method gets the same data, noise file (same seed), epochs and lr schedule.

Printed per method and noise (mean ± std over the seeds whose runs finished; unfinished ones are counted apart):
final ensemble test accuracy, test accuracy of the checkpoint the clean meta set selects (`best.pt`; none for
ce_meta, which trains on the meta set), and after warm-up (mean over the HRP epochs) the AUROC (×100) of α,
T = α + β and of the per-sample CE loss for telling clean from corrupted labels, and of β for telling correct from
wrong pseudo-labels.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hrp_ood.config import METHODS
from hrp_ood.io import csv_number, read_csv_rows

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
# columns of metrics.csv summarised over the epochs after warm-up
SIGNALS = {"alpha": "alpha_auroc", "T": "T_auroc", "loss": "loss_auroc", "beta": "beta_pseudo_auroc"}


def extracted_root(data: Path, work: Path) -> Path:
    """The folder holding train/ and test/: `data` itself, or the tarball extracted once into `work`."""
    if data.is_dir():
        return data
    if not data.is_file():
        sys.exit(f"noisy_cifar: {data} not found; pass --data pointing at cifar10-jpeg.tar.gz or its extracted folder")
    target = work / "cifar10-jpeg"
    if not (target / "test").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(data) as tar:
            tar.extractall(target, filter="data")
    return target


def balanced_subset(source: Path, work: Path, train_per_class: int | None, test_per_class: int | None,
                    seed: int = 0) -> Path:
    """Symlinks to `per_class` images of every class and split (all of them for None), the same for every seed."""
    if train_per_class is None and test_per_class is None:
        return source
    name = f"subset_{train_per_class}_{test_per_class}_s{seed}"
    target = work / name
    if (target / ".complete").exists():
        return target
    rng = random.Random(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for class_dir in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            files = sorted(p.name for p in class_dir.iterdir())
            if count is not None and count > len(files):
                sys.exit(f"noisy_cifar: {class_dir} has {len(files)} images, fewer than the {count} asked for")
            chosen = sorted(rng.sample(files, count)) if count is not None else files
            out = target / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                link = out / f
                if not link.exists():
                    link.symlink_to((class_dir / f).resolve())
    (target / ".complete").touch()
    return target


def scaled_schedule(epochs: int) -> list[int]:
    """The paper's lr milestones (250 and 400 of 450 epochs) scaled to `epochs`."""
    return sorted({max(1, round(epochs * 250 / 450)), max(1, round(epochs * 400 / 450))})


def parse_variant(spec: str) -> tuple[str, str, list[str]]:
    """`hrp` → ("hrp", "hrp", []); `LABEL=METHOD,key=value,...` → (LABEL, METHOD, [key=value, ...])."""
    if "=" not in spec:
        return spec, spec, []
    label, _, rest = spec.partition("=")
    method, *sets = rest.split(",")
    return label, method, sets


def train_command(args: argparse.Namespace, data_root: Path, variant: str, noise: str, seed: int) -> list[str]:
    label, method, sets = parse_variant(variant)
    command = [sys.executable, "-m", "hrp_ood", "train", "--dataset", "folder", "--data-root", str(data_root),
               "--method", method, "--noise", noise, "--seed", str(seed), "--model", args.model,
               "--epochs", str(args.epochs), "--device", args.device, "--out-dir", str(args.out),
               "--name", run_name(label, noise, seed), "--batch-size", str(args.batch_size),
               "--set", f"warmup_epochs={args.warmup}", "--set", f"ramp_epochs={args.ramp}",
               "--set", f"lr_milestones={scaled_schedule(args.epochs)}", "--overwrite", "--no-progress"]
    for item in [*args.set, *sets]:
        command += ["--set", item]
    return command


def run_name(method: str, noise: str, seed: int) -> str:
    return f"{method}_{noise}_s{seed}"


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    return read_csv_rows(run_dir / "metrics.csv")


def complete(rows: list[dict[str, str]], epochs: int) -> bool:
    return bool(rows) and int(rows[-1]["epoch"]) >= epochs


def finished(run_dir: Path, epochs: int) -> bool:
    return complete(read_metrics(run_dir), epochs)


def run_one(args: argparse.Namespace, data_root: Path, method: str, noise: str, seed: int, threads: int) -> str:
    run_dir = args.out / run_name(parse_variant(method)[0], noise, seed)
    if finished(run_dir, args.epochs):
        return f"{run_dir.name}: done before, skipped"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / f"{run_dir.name}.log").open("w") as log:
        # cwd is the output folder, not the repository: `python -m` puts cwd first on sys.path, and the source
        # tree's hrp_ood/ lacks the installed hrp_ood.train / hrp_ood.postprocessors mapping of a non-editable install
        code = subprocess.call(train_command(args, data_root, method, noise, seed), stdout=log,
                               stderr=subprocess.STDOUT, env=env, cwd=args.out)
    status = "ok" if code == 0 else f"FAILED (exit {code}, see {args.out / (run_dir.name + '.log')})"
    return f"{run_dir.name}: {status} in {time.perf_counter() - started:.0f} s"


def run_summary(rows: list[dict[str, str]], warmup: int, meta_held_out: bool = True) -> dict[str, float]:
    """Final and meta-selected test accuracy (none when the method trains on the meta set), and the mean
    reliability AUROCs over the epochs after warm-up (a run's metrics.csv rows)."""
    after = [r for r in rows if int(r["epoch"]) > warmup] or rows
    summary = {"acc": csv_number(rows[-1], "acc_ensemble"), "best_warmup_acc": max(
        (csv_number(r, "acc_ensemble") for r in rows if int(r["epoch"]) <= warmup), default=math.nan)}
    selected = [r for r in rows if csv_number(r, "meta_acc") == max(csv_number(q, "meta_acc") for q in rows)]
    held_out = selected and meta_held_out
    summary["acc_meta_selected"] = csv_number(selected[-1], "acc_ensemble") if held_out else math.nan
    for name, column in SIGNALS.items():
        values = [v for v in (csv_number(r, column) for r in after) if not math.isnan(v)]
        summary[name] = statistics.fmean(values) if values else math.nan
    return summary


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def summary_table(args: argparse.Namespace) -> str:
    keys = ["acc", "acc_meta_selected", *SIGNALS]
    header = ["noise", "method", "seeds", "test acc (last)", "test acc (meta-selected)",
              "α AUROC", "T AUROC", "loss AUROC", "β AUROC (pseudo)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for noise in args.noise:
        for variant in args.methods:
            label, method, _ = parse_variant(variant)
            held_out = method not in METHODS or not METHODS[method].trains_on_meta_set
            histories = [read_metrics(args.out / run_name(label, noise, s)) for s in args.seeds]
            runs = [run_summary(rows, args.warmup, held_out) for rows in histories if complete(rows, args.epochs)]
            cells = [_mean_std([r[k] for r in runs]) for k in keys]
            unfinished = sum(1 for rows in histories if rows and not complete(rows, args.epochs))
            seeds = f"{len(runs)} (+{unfinished} unfinished)" if unfinished else str(len(runs))
            lines.append("| " + " | ".join([noise, label, seeds, *cells]) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cifar10-jpeg.tar.gz or its extracted folder")
    p.add_argument("--work", type=Path, default=Path("runs/noisy_cifar_data"), help="extracted images and subsets")
    p.add_argument("--out", type=Path, default=None, help="run folders (default runs/noisy_cifar[_full|_quick])")
    p.add_argument("--methods", nargs="+", default=None, help="methods or LABEL=METHOD,key=value,... variants "
                   "(default ce coteach hrp)")
    p.add_argument("--noise", nargs="+", default=None, help="default sym50 sym80")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1")
    p.add_argument("--epochs", type=int, default=None,
                   help="default 30 (CPU budget), 100 with --full or --memorization")
    p.add_argument("--warmup", type=int, default=None, help="HRP's CE warm-up epochs (default 10, 10 with --full)")
    p.add_argument("--ramp", type=int, default=None, help="HRP's ramp epochs (default 5, 16 with --full)")
    p.add_argument("--train-per-class", type=int, default=None, help="default 1000, 300 with --memorization")
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--model", default=None, help="default small_cnn, preact_resnet18 with --full")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (CPU threads are split between them)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--full", action="store_true", help="the paper's protocol: all 50k images, PreAct ResNet-18")
    p.add_argument("--memorization", action="store_true", help="CPU regime where CE memorises the noise: "
                   "300 train images per class, meta set 200, 100 epochs")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 methods, 1 noise, 1 seed, 2 epochs, tiny subset")
    p.add_argument("--table-only", action="store_true", help="print the table of the runs already in --out")
    args = p.parse_args(argv)
    if args.full and args.memorization:
        p.error("--full and --memorization are two different protocols: give one of them")
    full_defaults = dict(epochs=100, warmup=10, ramp=16, model="preact_resnet18")
    cpu_defaults = dict(epochs=30, warmup=10, ramp=5, model="small_cnn", train_per_class=1000)
    if args.memorization:
        cpu_defaults.update(epochs=100, train_per_class=300)
        args.set = ["meta_size=200", *args.set]
    for key, value in (full_defaults if args.full else cpu_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.full:
        args.train_per_class = args.test_per_class = None
    quick = dict(methods=["ce", "hrp"], noise=["sym50"], seeds=[0])
    for key, value in (quick if args.quick else dict(methods=["ce", "coteach", "hrp"], noise=["sym50", "sym80"],
                                                     seeds=[0, 1])).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.epochs, args.warmup, args.ramp = 2, 1, 1
        args.train_per_class, args.test_per_class, args.batch_size = 16, 4, 32
        args.set = ["meta_size=20", "meta_batch_size=20", *args.set]
    if args.out is None:
        mode = "_quick" if args.quick else "_full" if args.full else "_memorization" if args.memorization else ""
        args.out = Path("runs") / f"noisy_cifar{mode}"
    args.out, args.work, args.data = args.out.resolve(), args.work.resolve(), args.data.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.table_only:
        source = extracted_root(args.data, args.work)
        data_root = balanced_subset(source, args.work, args.train_per_class, args.test_per_class)
        grid = [(m, n, s) for n in args.noise for s in args.seeds for m in args.methods]
        threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.device == "cpu" else 2
        print(f"{len(grid)} runs ({args.model}, {args.epochs} epochs, data {data_root}) -> {args.out}", flush=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for line in pool.map(lambda job: run_one(args, data_root, *job, threads), grid):
                print(line, flush=True)
    print(f"\n{args.model}, {args.epochs} epochs (warm-up {args.warmup}, ramp {args.ramp}), "
          f"mean ± std over seeds {args.seeds}:\n")
    print(summary_table(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
