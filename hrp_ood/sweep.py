"""`hrp-ood sweep EXPERIMENT.yaml`: train, evaluate and report a grid of runs (one paper table per command).

An experiment file names a base config, a grid over config keys, the evaluation and the report:

    base: ../cifar10_hrp.yaml           # relative to the experiment file (optional)
    config: {epochs: 200}               # overrides for every run (optional)
    grid: {noise: [sym20, sym50], method: [ce, hrp], seed: [0, 1, 2]}   # or a list of grids: their union
    out: runs/sweeps/table5             # relative to the working directory (default runs/sweeps/<file stem>)
    retries: 1                          # a failing run is tried 1 + retries times per sweep command
    nproc: 1                            # processes per run: data-parallel training (hrp-ood train --nproc)
    evaluation: {ood: [svhn, textures], postprocessors: [msp, ebo], net: ensemble, data_root: ./data}
    report: {by: noise, metrics: [auroc, fpr95], ood: mean}
    slurm: {partition: gpu, time_min: 2880, gpus_per_job: 1, array_parallelism: 16, cpus_per_task: 8}

Every grid point is the run folder `<out>/runs/<key>-<value>__...`; the sweep's own files (a log, the last
error and a lock per run) are in `<out>/sweep/`, the report in `<out>/report/`. A run is done when its
metrics.csv reached the final epoch and its eval.json exists; a sweep command skips done runs, resumes
interrupted ones from last.pt, re-evaluates a run whose eval.json is missing, and never lets one failing run
stop the others.
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import logging
import math
import os
import re
import shutil
import signal
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from hrp_ood.config import LOGGING_KEYS, TrainConfig, build_config, field_names, read_yaml
from hrp_ood.errors import Interrupted, UserError, cut, one_line, shown
from hrp_ood.io import csv_number, read_metrics_rows
from hrp_ood.run_dir import check_run_name

log = logging.getLogger(__name__)

EXPERIMENT_KEYS = ("base", "config", "grid", "out", "retries", "nproc", "evaluation", "report", "slurm")
MAX_GRID_POINTS = 10_000
RESERVED_KEYS = ("name", "out_dir", "tensorboard_dir")  # the sweep names and places every run itself
CONFIG_GRID_KEY = "config"  # grid: {config: [a.yaml, b.yaml]}: each grid point starts from its own config file
SLURM_DEFAULTS = {
    "partition": None,
    "time_min": 60 * 24,
    "gpus_per_job": 1,
    "array_parallelism": 16,
    "cpus_per_task": 8,
    "mem_gb": 32,
}


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """An experiment file's `evaluation:`: the options of `hrp-ood evaluate` (hrp_ood.eval.session.EvaluationRequest)
    for every run; the default OOD sets are the generated ones (no download)."""

    ood: tuple[str, ...] = ("photo_patches", "uniform_noise")
    postprocessors: tuple[str, ...] = ("msp", "ebo", "mds")
    net: str = "ensemble"
    data_root: str = "./data"
    ood_dirs: tuple[tuple[str, str], ...] = ()
    fit_labels: str = "clean"
    batch_size: int = 256
    skip_missing: bool = False
    skip_corrupt: bool = False
    benchmark: str | None = None
    tune: bool = False
    val_id_dir: str | None = None
    val_ood_dir: str | None = None
    backend: str = "ours"


@dataclasses.dataclass(frozen=True)
class Report:
    by: str = "noise"
    metrics: tuple[str, ...] = ("auroc", "fpr95")
    ood: str = "mean"
    plots: bool = True


@dataclasses.dataclass(frozen=True)
class Experiment:
    path: Path
    out: Path
    runs: dict[str, dict[str, Any]]  # run name → the config overrides of its grid point
    base: Path | None
    config: dict[str, Any]
    retries: int
    nproc: int  # processes per run (data-parallel training; one GPU each on CUDA)
    evaluation: Evaluation
    report: Report
    slurm: dict[str, Any]

    def run_config(self, name: str) -> TrainConfig:
        point = dict(self.runs[name])
        # a grid over `config` gives each point its own config file (a method's reference schedule), relative to
        # the experiment file; `base` otherwise
        base = self.path.parent / point.pop(CONFIG_GRID_KEY) if CONFIG_GRID_KEY in point else self.base
        overrides = {**self.config, **point, "out_dir": str(self.out / "runs"), "name": name}
        # every run's TensorBoard events under one root, named by its grid point: `tensorboard --logdir <out>/tb`
        overrides["tensorboard_dir"] = str(self.out / "tb" / name)
        return build_config(base, overrides)

    def run_dir(self, name: str) -> Path:
        return self.out / "runs" / name

    def eval_json(self, name: str) -> Path:
        from hrp_ood.eval.session import default_eval_dir

        return default_eval_dir(self.run_dir(name) / "last.pt", self.evaluation.net) / "eval.json"

    def sweep_file(self, name: str, suffix: str) -> Path:
        return self.out / "sweep" / f"{name}{suffix}"


# --------------------------------------------------------------------------- the experiment file


def _mapping(value: Any, what: str, path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"experiment {shown(path)}: {what} must be a mapping, got {type(value).__name__}")
    return value


def _names(value: Any, what: str, path: Path) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"experiment {shown(path)}: {what} must be a non-empty list of names, got {cut(value)}")
    return tuple(names)


def _known_keys(data: dict[str, Any], valid: tuple[str, ...] | list[str], what: str, path: Path) -> None:
    unknown = [key for key in data if key not in valid]
    if unknown:
        raise UserError(f"experiment {shown(path)}: unknown {what} key {unknown[0]!r}; valid keys: {', '.join(valid)}")


def _point_text(key: str, value: Any) -> str:
    """A grid value in a run name: a config file by its stem (cifar10_dividemix), any other value as text."""
    return _value_text(Path(value).stem if key == CONFIG_GRID_KEY else value)


def _value_text(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value)).strip("_") or "_"


def grid_runs(grid: Any, path: Path) -> dict[str, dict[str, Any]]:
    """Run name → overrides for every point of the grid, in the grid's order (the last key varies fastest). A list
    of grids is their union, in the list's order: one experiment for rows that vary different keys (a candidate at
    sym80 over six seeds and at sym50 over three)."""
    grids = grid if isinstance(grid, list) and grid else [grid or {}]
    runs: dict[str, dict[str, Any]] = {}
    for one in grids:
        if not isinstance(one, dict):
            raise UserError(
                f"experiment {shown(path)}: grid must map config keys to lists of values, or be a list of such "
                f"mappings, got {cut(one)}"
            )
        for name, overrides in _product_runs(one, path).items():
            if name in runs:
                raise UserError(
                    f"experiment {shown(path)}: two grids of the list share the run {name!r}; list every point once"
                )
            runs[name] = overrides
    if len(runs) > MAX_GRID_POINTS:
        raise UserError(
            f"experiment {shown(path)}: the grids have {len(runs):,} points, over {MAX_GRID_POINTS:,}; split them "
            "into several experiment files"
        )
    return runs


def _product_runs(grid: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    if not grid:
        raise UserError(
            f"experiment {shown(path)}: grid must name at least one config key with a list of values, "
            "e.g. grid: {noise: [sym20, sym50]}"
        )
    valid = [*field_names(), CONFIG_GRID_KEY]
    for key, values in grid.items():
        if key not in valid or key in RESERVED_KEYS:
            raise UserError(
                f"experiment {shown(path)}: grid key {key!r} is not a config key the sweep may vary; "
                f"valid keys: {', '.join(k for k in valid if k not in RESERVED_KEYS)}"
            )
        if not isinstance(values, list) or not values:
            raise UserError(
                f"experiment {shown(path)}: grid key {key!r} needs a non-empty list of values, got {cut(values)}"
            )
        if key == CONFIG_GRID_KEY and not all(isinstance(value, str) for value in values):
            raise UserError(
                f"experiment {shown(path)}: grid key {key!r} lists config files (paths relative to the experiment "
                f"file), got {cut(values)}"
            )
    points = math.prod(len(values) for values in grid.values())
    if points > MAX_GRID_POINTS:
        raise UserError(
            f"experiment {shown(path)}: the grid has {points:,} points, over {MAX_GRID_POINTS:,}; split it into "
            "several experiment files"
        )
    runs: dict[str, dict[str, Any]] = {}
    for point in itertools.product(*grid.values()):
        overrides = dict(zip(grid, point))
        name = "__".join(f"{key}-{_point_text(key, value)}" for key, value in overrides.items())
        if name in runs:
            raise UserError(
                f"experiment {shown(path)}: two grid points share the run name {name!r}; "
                "give every grid value a distinct name"
            )
        try:
            check_run_name(name, shorten="shorten the grid values that name it")
        except UserError as err:
            raise UserError(f"experiment {shown(path)}: {err}") from None
        runs[name] = overrides
    return runs


def _evaluation(data: dict[str, Any], path: Path) -> Evaluation:
    from hrp_ood.data.benchmarks import BENCHMARKS
    from hrp_ood.eval.evaluate import check_ood_set_names
    from hrp_ood.eval.generated import GENERATED_OOD_SETS
    from hrp_ood.eval.network import NET_CHOICES
    from hrp_ood.eval.ood_data import FAR_OOD_SETS, NEAR_OOD_SETS
    from hrp_ood.eval.session import FIT_LABELS
    from hrp_ood.postprocessors import list_postprocessors

    _known_keys(data, [f.name for f in dataclasses.fields(Evaluation)], "evaluation", path)
    ood_dirs = _mapping(data.get("ood_dirs"), "evaluation.ood_dirs", path)
    check_ood_set_names(map(str, ood_dirs), f"experiment {shown(path)}: evaluation.ood_dirs")
    evaluation = Evaluation(**{**data, "ood_dirs": tuple((str(k), str(v)) for k, v in ood_dirs.items())})
    ood = _names(evaluation.ood, "evaluation.ood", path)
    postprocessors = _names(evaluation.postprocessors, "evaluation.postprocessors", path)
    choices = {
        "ood set": (ood, [*FAR_OOD_SETS, *NEAR_OOD_SETS, *GENERATED_OOD_SETS, *ood_dirs, "all"]),
        "postprocessor": (postprocessors, [*list_postprocessors(), "all"]),
        "net": ((evaluation.net,), NET_CHOICES),
        "fit_labels": ((evaluation.fit_labels,), FIT_LABELS),
        "benchmark": (() if evaluation.benchmark is None else (evaluation.benchmark,), list(BENCHMARKS)),
        "backend": ((evaluation.backend,), ["ours", "openood"]),
    }
    for what, (given, valid) in choices.items():
        bad = [name for name in given if name not in valid]
        if bad:
            raise UserError(
                f"experiment {shown(path)}: unknown evaluation {what} {bad[0]!r}; valid: {', '.join(valid)}"
            )
    for key in ("skip_missing", "skip_corrupt", "tune"):
        if not isinstance(getattr(evaluation, key), bool):
            raise UserError(
                f"experiment {shown(path)}: evaluation.{key} must be true or false, got {cut(getattr(evaluation, key))}"
            )
    for key in ("data_root", "val_id_dir", "val_ood_dir"):
        if not isinstance(getattr(evaluation, key), str | None) or getattr(evaluation, key) == "":
            raise UserError(
                f"experiment {shown(path)}: evaluation.{key} must be a path, got {cut(getattr(evaluation, key))}"
            )
    if (
        isinstance(evaluation.batch_size, bool)
        or not isinstance(evaluation.batch_size, int)
        or evaluation.batch_size < 1
    ):
        raise UserError(
            f"experiment {shown(path)}: evaluation.batch_size must be a positive integer, "
            f"got {cut(evaluation.batch_size)}"
        )
    return dataclasses.replace(evaluation, ood=ood, postprocessors=postprocessors)


def _report(data: dict[str, Any], path: Path) -> Report:
    from hrp_ood.report.evaluations import BY_CHOICES, METRICS

    _known_keys(data, [f.name for f in dataclasses.fields(Report)], "report", path)
    report = Report(**data)
    metrics = _names(report.metrics, "report.metrics", path)
    if report.by not in BY_CHOICES:
        raise UserError(
            f"experiment {shown(path)}: report.by must be one of {', '.join(BY_CHOICES)}, got {cut(report.by)}"
        )
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise UserError(f"experiment {shown(path)}: unknown report metric {bad[0]!r}; valid: {', '.join(METRICS)}")
    return dataclasses.replace(report, metrics=metrics)


def _check_report_ood(experiment: Experiment) -> None:
    """report.ood names a set the evaluation scores (or the mean): found now, not after every run has trained."""
    from hrp_ood.data.benchmarks import get_benchmark
    from hrp_ood.eval.session import ood_set_names
    from hrp_ood.report.evaluations import MEAN_OOD

    evaluation, wanted = experiment.evaluation, experiment.report.ood
    if wanted == MEAN_OOD:
        return
    benchmark = get_benchmark(evaluation.benchmark) if evaluation.benchmark else None
    try:
        names, added = ood_set_names(
            evaluation.ood, {name: Path(path) for name, path in evaluation.ood_dirs}, benchmark
        )
    except UserError as err:
        raise UserError(f"experiment {shown(experiment.path)}: evaluation.ood: {err}") from None
    if wanted not in names + added:
        raise UserError(
            f"experiment {shown(experiment.path)}: report.ood {cut(wanted)} is not an OOD set the evaluation scores "
            f"({', '.join(names + added)}); set report.ood to one of them or to {MEAN_OOD}"
        )


def _path_value(value: Any, what: str, path: Path) -> str | None:
    if value is None or (isinstance(value, str) and value.strip()):
        return value
    raise UserError(f"experiment {shown(path)}: {what} must be a path (text), got {cut(value)}")


def _slurm(values: dict[str, Any], path: Path) -> dict[str, Any]:
    """`slurm:` over SLURM_DEFAULTS, typed: partition text (or null), the rest whole numbers (gpus_per_job 0 = none)."""
    _known_keys(values, list(SLURM_DEFAULTS), "slurm", path)
    slurm = {**SLURM_DEFAULTS, **values}
    if slurm["partition"] is not None and not isinstance(slurm["partition"], str):
        raise UserError(
            f"experiment {shown(path)}: slurm.partition must be a name or null, got {cut(slurm['partition'])}"
        )
    for key in SLURM_DEFAULTS:
        if key != "partition":
            slurm[key] = _count(slurm[key], f"slurm.{key}", path, 0 if key == "gpus_per_job" else 1)
    return slurm


def _count(value: Any, what: str, path: Path, least: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise UserError(f"experiment {shown(path)}: {what} must be an integer of at least {least}, got {cut(value)}")
    return value


def load_experiment(path: str | Path, out: str | Path | None = None, nproc: int | None = None) -> Experiment:
    """Read and validate an experiment file completely, every grid point's config included (UserError on the first
    problem, before anything is started). `out` and `nproc` override the file's."""
    path = Path(path)
    data = read_yaml(path)
    _known_keys(data, EXPERIMENT_KEYS, "top-level", path)
    base = _path_value(data.get("base"), "base", path)
    retries = _count(data.get("retries", 1), "retries", path, 0)
    nproc = _count(nproc if nproc is not None else data.get("nproc", 1), "nproc", path, 1)
    slurm_given = _mapping(data.get("slurm"), "slurm", path)
    slurm = _slurm(slurm_given, path)
    if "gpus_per_job" in slurm_given and 0 < slurm["gpus_per_job"] < nproc:
        raise UserError(
            f"experiment {shown(path)}: slurm.gpus_per_job is {slurm['gpus_per_job']} but nproc is "
            f"{nproc}: every process of a run trains on a GPU of its own"
        )
    experiment = Experiment(
        path=path,
        out=Path(os.path.abspath(out or _path_value(data.get("out"), "out", path) or Path("runs/sweeps") / path.stem)),
        runs=grid_runs(data.get("grid"), path),
        base=path.parent / base if base is not None else None,
        config=_mapping(data.get("config"), "config", path),
        retries=retries,
        nproc=nproc,
        evaluation=_evaluation(_mapping(data.get("evaluation"), "evaluation", path), path),
        report=_report(_mapping(data.get("report"), "report", path), path),
        slurm=slurm,
    )
    _check_report_ood(experiment)
    for name in experiment.runs:
        try:
            experiment.run_config(name).check_schedule()
        except UserError as err:
            raise UserError(f"experiment {shown(path)}, run {name}: {err}") from None
    return experiment


# --------------------------------------------------------------------------- the state of a run


def last_metrics(run_dir: Path) -> dict[str, str]:
    """metrics.csv's last row ({} before the first epoch)."""
    rows = read_metrics_rows(run_dir / "metrics.csv")
    return rows[-1] if rows else {}


def trained_epochs(run_dir: Path) -> int:
    return int(last_metrics(run_dir).get("epoch") or 0)


def _is_running(lock_path: Path) -> bool:
    if not lock_path.exists():
        return False
    with lock_path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def run_state(experiment: Experiment, name: str) -> dict[str, Any]:
    """One line of `--status`: state (pending/running/done/failed), epoch, test accuracy, last error."""
    row = last_metrics(experiment.run_dir(name))
    epochs = experiment.run_config(name).epochs
    error_file = experiment.sweep_file(name, ".error")
    error = error_file.read_text().strip() if error_file.exists() else ""
    if _is_running(experiment.sweep_file(name, ".lock")):
        state = "running"
    elif int(row.get("epoch") or 0) >= epochs and experiment.eval_json(name).exists():
        state = "done"
    else:
        state = "failed" if error else "pending"
    accuracy = csv_number(row, "acc_ensemble")
    return {
        "run": name,
        "state": state,
        "epoch": f"{row.get('epoch') or 0}/{epochs}",
        "test_acc": accuracy,
        "error": error if state == "failed" else "",
    }


def status_table(experiment: Experiment) -> str:
    states = [run_state(experiment, name) for name in experiment.runs]
    width = max(len(s["run"]) for s in states)
    lines = [f"{'run':<{width}}  {'state':<7}  {'epoch':>9}  {'test acc':>8}  last error"]
    for s in states:
        acc = "–" if math.isnan(s["test_acc"]) else f"{s['test_acc']:.2f}"
        lines.append(f"{s['run']:<{width}}  {s['state']:<7}  {s['epoch']:>9}  {acc:>8}  {s['error']}".rstrip())
    counts = {state: sum(s["state"] == state for s in states) for state in ("done", "running", "pending", "failed")}
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------- one job: train, then evaluate


def evaluate_run(experiment: Experiment, name: str) -> None:
    """The run's last.pt through the evaluation session, as `hrp-ood evaluate` with the experiment's options."""
    from hrp_ood.eval.session import EvaluationRequest, evaluate

    e = experiment.evaluation
    optional = {key: Path(getattr(e, key)) if getattr(e, key) else None for key in ("val_id_dir", "val_ood_dir")}
    request = EvaluationRequest(
        experiment.run_dir(name) / "last.pt",
        ood=e.ood,
        ood_dirs=tuple((set_name, Path(folder)) for set_name, folder in e.ood_dirs),
        postprocessors=e.postprocessors,
        net=e.net,
        data_root=Path(e.data_root),
        benchmark=e.benchmark,
        tune=e.tune,
        fit_labels=e.fit_labels,
        skip_missing=e.skip_missing,
        skip_corrupt=e.skip_corrupt,
        backend=e.backend,
        device=experiment.run_config(name).device,
        batch_size=e.batch_size,
        **optional,
    )
    evaluate(request)


def train_run(experiment: Experiment, name: str) -> bool:
    """Train (or resume) one run to its final epoch, in `experiment.nproc` processes; False when it was there."""
    from hrp_ood import distributed
    from hrp_ood.train.trainer import train_process

    cfg = experiment.run_config(name)
    run_dir = experiment.run_dir(name)
    if trained_epochs(run_dir) >= cfg.epochs:
        return False
    resume = (run_dir / "last.pt").exists()
    # a resumed run checks every key against its saved config: a changed experiment is an error, not a mix
    explicit = set(field_names()) if resume else set()
    if experiment.nproc > 1 and "WORLD_SIZE" not in os.environ:  # (under Slurm, submitit started the processes)
        import torch

        threads = max(1, torch.get_num_threads() // experiment.nproc)  # this worker's share, split between them
        distributed.launch(experiment.nproc, train_process, cfg, resume, explicit, threads)
    else:
        train_process(cfg, resume, explicit)
    return True


def train_and_evaluate(experiment: Experiment, name: str) -> str:
    """Bring one run to done: train (or resume) to the final epoch, then evaluate unless eval.json is there.
    Returns what it did."""
    trained = train_run(experiment, name)
    if trained or not experiment.eval_json(name).exists():
        evaluate_run(experiment, name)
        return "trained and evaluated" if trained else "evaluated"
    return "done before"


# A local worker's state: the lock is held while a run is set up, trained or evaluated; the event is set once the
# sweep is stopping (the worker saw a run interrupted, or its sweep process is gone), and no run starts after it.
_RUN_LOCK = threading.Lock()
_STOPPING = threading.Event()


def run_job(experiment_path: str, out: str, name: str, nproc: int | None = None) -> tuple[str, str | None]:
    """One grid point in a worker (a local process or a Slurm job): (what it did, None) or (name, error line).
    It holds `<out>/sweep/<name>.lock` while it works and logs to `<out>/sweep/<name>.log`."""
    with _RUN_LOCK:
        if _STOPPING.is_set():
            return f"{name}: not started (the sweep is stopping)", None
        return _run_job(experiment_path, out, name, nproc)


def _run_job(experiment_path: str, out: str, name: str, nproc: int | None) -> tuple[str, str | None]:
    experiment = load_experiment(experiment_path, out, nproc)
    experiment.sweep_file(name, "").parent.mkdir(parents=True, exist_ok=True)
    error_file = experiment.sweep_file(name, ".error")
    package_log = logging.getLogger("hrp_ood")
    handler = logging.FileHandler(experiment.sweep_file(name, ".log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    with experiment.sweep_file(name, ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            did = train_and_evaluate(experiment, name)
        except Interrupted as err:  # Ctrl-C, or its sweep killed: start nothing more in this worker
            _STOPPING.set()
            package_log.info("%s stopped: %s", name, err)
            error_file.unlink(missing_ok=True)  # not a failure: --status shows it pending at the epoch it saved
            return name, "interrupted after saving its state; the next sweep command resumes it"
        except Exception as err:  # one failing run never stops the others: its error line is kept for --status
            message = one_line(str(err)) if isinstance(err, UserError) else one_line(f"{type(err).__name__}: {err}")
            package_log.error("%s failed:\n%s", name, traceback.format_exc())
            error_file.write_text(message + "\n")
            return name, message
        finally:
            package_log.removeHandler(handler)
            handler.close()
    error_file.unlink(missing_ok=True)
    return f"{name}: {did}", None


# --------------------------------------------------------------------------- executors


def _init_worker(threads: int, gpu_slots: Any) -> None:
    """A local worker process: its share of the CPU threads, its own GPUs (one per process of a run) when there
    are GPUs, and a watch on the sweep process."""
    import torch

    if gpu_slots is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_slots.get())
    torch.set_num_threads(threads)
    threading.Thread(target=_stop_when_orphaned, args=(os.getppid(),), daemon=True).start()


def _stop_when_orphaned(sweep_pid: int, poll_s: float = 1.0) -> None:
    """A `kill` of the sweep process reaches it alone: its workers would train on unseen. Once the sweep is gone,
    the worker interrupts itself as Ctrl-C would (the run saves last.pt after the current step and stops; a run
    still being set up is abandoned), and the next sweep command resumes it."""
    while os.getppid() == sweep_pid:
        time.sleep(poll_s)
    _STOPPING.set()
    if _RUN_LOCK.locked():
        os.kill(os.getpid(), signal.SIGINT)
    with _RUN_LOCK:  # the run has saved its state and let go of its files
        os._exit(1)


def gpu_slots_of_jobs(gpus: int, nproc: int, jobs: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each local worker: `nproc` GPUs each; data-parallel runs (nproc > 1) never share a
    GPU (fewer workers then), single-process runs share them round-robin when there are more jobs than GPUs."""
    groups = gpus // nproc
    if nproc > 1:
        jobs = min(jobs, groups)
    return [",".join(str(job % groups * nproc + k) for k in range(nproc)) for job in range(jobs)]


def run_local(experiment: Experiment, names: list[str], jobs: int) -> dict[str, str]:
    """Run `names` in `jobs` worker processes; returns run → error. On GPUs each worker gets its own `nproc` GPUs
    while there are enough; with nproc 1, more jobs than GPUs share them round-robin (several small runs on one
    GPU keep it busier than one)."""
    import multiprocessing

    import torch

    context = multiprocessing.get_context("spawn")
    gpus = torch.cuda.device_count() if experiment.run_config(names[0]).device != "cpu" else 0
    nproc = experiment.nproc
    if 0 < gpus < nproc:
        raise UserError(f"nproc {nproc} trains every run on {nproc} GPUs; this machine has {gpus}")
    gpu_slots = None
    if gpus:
        slots = gpu_slots_of_jobs(gpus, nproc, jobs)
        jobs = len(slots)
        gpu_slots = context.Queue()
        for slot in slots:
            gpu_slots.put(slot)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads, gpu_slots)) as pool:
        futures = {pool.submit(run_job, str(experiment.path), str(experiment.out), name, nproc): name for name in names}
        try:
            errors = _collect(futures)
        except KeyboardInterrupt:  # Ctrl-C reached the workers too: their runs save their state; none starts after
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return errors


def _collect(futures: dict[Any, str]) -> dict[str, str]:
    """Print each run's line as it finishes; returns run → error."""
    errors = {}
    for future in as_completed(futures):
        try:
            line, error = future.result()
        except Exception as err:  # the worker process died (killed, out of memory)
            line, error = futures[future], one_line(f"worker process failed: {type(err).__name__}: {err}")
        if error is None:
            print(line, flush=True)
        else:
            print(f"{futures[future]}: FAILED: {error}", flush=True)
            errors[futures[future]] = error
    return errors


def run_submitit(experiment: Experiment, names: list[str], cluster: str = "slurm") -> dict[str, str]:
    """Submit `names` as one job array through submitit and wait for them (cluster "local" runs submitit's
    LocalExecutor, the tests' stand-in for Slurm); returns run → error."""
    import submitit

    slurm = experiment.slurm
    executor = submitit.AutoExecutor(folder=experiment.out / "sweep" / "submitit", cluster=cluster)
    executor.update_parameters(
        timeout_min=slurm["time_min"],
        gpus_per_node=slurm["gpus_per_job"],
        cpus_per_task=slurm["cpus_per_task"],
        mem_gb=slurm["mem_gb"],
        tasks_per_node=experiment.nproc,
        slurm_array_parallelism=slurm["array_parallelism"],
        **({"slurm_partition": slurm["partition"]} if slurm["partition"] else {}),
    )
    job = SweepJob()
    n = len(names)
    submitted = executor.map_array(
        job, [str(experiment.path)] * n, [str(experiment.out)] * n, names, [experiment.nproc] * n
    )
    print(f"submitted {len(submitted)} jobs (array {submitted[0].job_id.split('_')[0]})", flush=True)
    errors = {}
    for name, sub in zip(names, submitted):
        try:
            line, error = sub.result()
        except Exception as err:  # submitit's own failure (the job died, was cancelled)
            line, error = name, one_line(f"job {sub.job_id} failed: {str(err).strip().splitlines()[-1]}")
        print(line if error is None else f"{name}: FAILED: {error}", flush=True)
        if error is not None:
            errors[name] = error
    return errors


class SweepJob:
    """The callable submitit runs for one grid point, in each of the job's `nproc` tasks. On a time limit or
    pre-emption submitit calls `checkpoint`, which requeues the same call: `run_job` then resumes the run from its
    last.pt. In a data-parallel job every task joins the run's process group; task 0 alone keeps the sweep's files
    and evaluates."""

    def __call__(self, experiment_path: str, out: str, name: str, nproc: int | None = None) -> tuple[str, str | None]:
        experiment = load_experiment(experiment_path, out, nproc)
        if experiment.nproc > 1:
            import submitit

            if submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False).rank > 0:
                train_run(experiment, name)
                return name, None
        return run_job(experiment_path, out, name, experiment.nproc)

    def checkpoint(self, *args: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args)


# --------------------------------------------------------------------------- the sweep


# Keys a finished run may differ in from the experiment without being another run: more epochs resume it
EXTENDABLE_KEYS = ("epochs",)


def config_changes(experiment: Experiment, name: str) -> list[str]:
    """The config keys whose saved value (the run's config.yaml) differs from the experiment's; [] for a new run."""
    from hrp_ood.config import saved_config

    saved_file = experiment.run_dir(name) / "config.yaml"
    if not saved_file.is_file():
        return []
    saved = saved_config(read_yaml(saved_file), saved_file).to_dict()
    wanted = experiment.run_config(name).to_dict()
    kept = (*EXTENDABLE_KEYS, *LOGGING_KEYS)
    return sorted(key for key, value in wanted.items() if key not in kept and saved.get(key) != value)


def evaluation_changes(experiment: Experiment, name: str) -> list[str]:
    """The evaluation settings of the run's eval.json that differ from the experiment's `evaluation:`."""
    import json

    from hrp_ood.postprocessors import list_postprocessors

    path = experiment.eval_json(name)
    if not path.is_file():
        return []
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is unreadable ({err}); delete it to evaluate the run again") from None
    e = experiment.evaluation
    wanted = {
        "net": e.net,
        "postprocessors": list(list_postprocessors()) if e.postprocessors == ("all",) else list(e.postprocessors),
        "fit_labels": e.fit_labels,
        "backend": e.backend,
        "benchmark": e.benchmark,
    }
    if "all" not in e.ood:  # what "all" stands for depends on the benchmark: the saved list is its resolution
        wanted["ood_sets"] = [*e.ood, *(n for n, _ in e.ood_dirs if n not in e.ood)]
    changed = [key for key, value in wanted.items() if saved.get(key) != value]
    if e.tune != ("rule" in (saved.get("tuning") or {})):
        changed.append("tune")
    return changed


def changed_runs(experiment: Experiment) -> dict[str, str]:
    """Runs whose saved config or evaluation differs from the experiment: run → what differs."""
    changes = {}
    for name in experiment.runs:
        keys = config_changes(experiment, name)
        evaluation = [] if keys else evaluation_changes(experiment, name)
        if keys or evaluation:
            changes[name] = f"config {', '.join(keys)}" if keys else f"evaluation {', '.join(evaluation)}"
    return changes


def set_aside_changed(experiment: Experiment, changes: dict[str, str]) -> None:
    """--rerun-changed: move each changed run's folder (config changed) or evaluation folder aside into
    <out>/replaced/, so the sweep trains or evaluates it again; a retrained run's TensorBoard logs (<out>/tb/<run>) go
    with its folder, as its tb/; nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name, what in changes.items():
        source = experiment.run_dir(name) if what.startswith("config") else experiment.eval_json(name).parent
        target = experiment.out / "replaced" / f"{name}__{source.name}__{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
        board = experiment.out / "tb" / name  # the run's TensorBoard logs (tensorboard_dir): retrained, so replaced
        if what.startswith("config") and board.is_dir():
            board.rename(target / "tb")
        print(f"{name}: {what} changed; the old files are in {target}", flush=True)


def check_data(experiment: Experiment) -> None:
    """What must be on disk before a sweep starts (not to read the file: `--status` and the shipped experiments
    load without the data): every OOD folder the evaluation names."""
    for name, folder in experiment.evaluation.ood_dirs:
        if not Path(folder).is_dir():
            raise UserError(
                f"experiment {shown(experiment.path)}: evaluation.ood_dirs {name}: folder {shown(folder)} not found"
            )


def print_tensorboard_command(experiment: Experiment, training: bool) -> None:
    """How to watch every run of the grid in one TensorBoard: when runs are about to log to it or have logged."""
    from hrp_ood.train.tensorboard import available

    logs = (experiment.out / "tb").is_dir()
    if logs or (training and available() and any(experiment.run_config(name).tensorboard for name in experiment.runs)):
        print(f"TensorBoard of every run: tensorboard --logdir {experiment.out / 'tb'}", flush=True)


def pending_runs(experiment: Experiment) -> list[str]:
    return [name for name in experiment.runs if run_state(experiment, name)["state"] != "done"]


def run_sweep(
    experiment: Experiment,
    *,
    executor: str = "local",
    jobs: int = 1,
    submitit_cluster: str = "slurm",
    rerun_changed: bool = False,
) -> dict[str, str]:
    """Bring every run to done (1 + retries attempts each), then write the report; returns run → error of the
    runs that still fail. A run trained or evaluated with other settings than the experiment's is refused, or
    (`rerun_changed`) set aside and done again."""
    if executor != "local" and submitit_cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError(
            "--executor slurm: no Slurm here (sbatch is not on PATH); run the sweep from a Slurm login node, or drop "
            "--executor to train locally"
        )
    errors: dict[str, str] = {}
    changes = changed_runs(experiment)
    if changes and not rerun_changed:
        name, what = next(iter(changes.items()))
        raise UserError(
            f"{len(changes)} run(s) under {shown(experiment.out)} were made with other settings than the experiment "
            f"now says (first: {name}: {what}); pass --rerun-changed to set them aside and run them again, or give "
            "another out"
        )
    set_aside_changed(experiment, changes)
    names = pending_runs(experiment)
    print(
        f"{len(experiment.runs)} runs, {len(experiment.runs) - len(names)} done before -> {experiment.out}", flush=True
    )
    print_tensorboard_command(experiment, training=bool(names))
    for _ in range(1 + experiment.retries):
        if not names:
            break
        if executor == "local":
            errors = run_local(experiment, names, jobs)
        else:
            errors = run_submitit(experiment, names, submitit_cluster)
        names = list(errors)
    if report_is_current(experiment):
        print(f"report up to date: {experiment.out / 'report'}", flush=True)
    else:
        write_sweep_report(experiment)
    return errors


REPORT_FILES = ("report.md", "report.tex", "accuracy.md", "accuracy.tex", "accuracy.csv", "summary.md", "report.html")


def report_is_current(experiment: Experiment) -> bool:
    """Whether every report file is newer than the experiment file and every run's metrics.csv and eval.json
    (a sweep command that changed nothing then rewrites nothing)."""
    report = [experiment.out / "report" / name for name in REPORT_FILES]
    inputs = [
        experiment.path,
        *(
            path
            for name in experiment.runs
            for path in (experiment.run_dir(name) / "metrics.csv", experiment.eval_json(name))
        ),
    ]
    if not all(path.is_file() for path in report):
        return False
    newest_input = max(path.stat().st_mtime_ns for path in inputs if path.is_file())
    return min(path.stat().st_mtime_ns for path in report) > newest_input


def grid_variants(experiment: Experiment) -> dict[str, str]:
    """eval.json path → "key=value, ..." of the grid keys other than method, noise and seed, for the runs that have
    them: a grid over any config key reports each of its values apart."""
    labels = {}
    naming = _config_files_naming_their_method(experiment)
    for name, point in experiment.runs.items():
        hidden = {*REPORT_KEYS, CONFIG_GRID_KEY} if point.get(CONFIG_GRID_KEY) in naming else set(REPORT_KEYS)
        other = ", ".join(f"{key}={_point_text(key, value)}" for key, value in point.items() if key not in hidden)
        if other:
            labels[str(experiment.eval_json(name))] = other
    return labels


REPORT_KEYS = ("method", "noise", "seed")  # what eval.json records of a grid point itself


def _config_files_naming_their_method(experiment: Experiment) -> set[str]:
    """The grid's config files that alone train their method (Table 5): the method names their rows; files that
    share a method with another (HRP and its T_max variant) are told apart by their file's name."""
    methods: dict[str, set[str]] = {}
    for name, point in experiment.runs.items():
        if CONFIG_GRID_KEY in point:
            methods.setdefault(point[CONFIG_GRID_KEY], set()).add(experiment.run_config(name).method)
    sole_method = {file: next(iter(found)) for file, found in methods.items() if len(found) == 1}
    files_of = Counter(sole_method.values())
    return {file for file, method in sole_method.items() if files_of[method] == 1}


def write_sweep_report(experiment: Experiment) -> dict[str, Path]:
    """`hrp-ood report`'s OOD tables of the evaluated runs, the accuracy table of the fully trained ones and, when
    the grid varies the noise, the noise curves: all in `<out>/report/`."""
    from hrp_ood.report import write_report
    from hrp_ood.report.evaluations import load_evaluations
    from hrp_ood.report.html import write_html_report
    from hrp_ood.report.sweep import accuracy_frame, has_noise_curves, noise_curve_figures, write_accuracy_table

    out_dir, report, variants = experiment.out / "report", experiment.report, grid_variants(experiment)
    evals = [experiment.eval_json(name) for name in experiment.runs if experiment.eval_json(name).exists()]
    configs = {name: experiment.run_config(name) for name in experiment.runs}
    histories = {name: read_metrics_rows(experiment.run_dir(name) / "metrics.csv") for name in experiment.runs}
    finished = {
        name: rows
        for name, rows in histories.items()  # an unfinished run's accuracy is not the table's
        if rows and int(rows[-1].get("epoch") or 0) >= configs[name].epochs
    }
    accuracy = accuracy_frame(experiment.runs, finished, configs)
    if not evals or accuracy.empty:
        log.warning("no run is trained and evaluated yet: no report")
        return {}
    paths = write_report(
        evals,
        out_dir,
        by=report.by,
        ood=report.ood,
        metrics=report.metrics,
        plots=report.plots,
        variants=variants,
    )
    paths.update(write_accuracy_table(accuracy, report.by, out_dir))
    evaluations = load_evaluations(evals, variants)
    if report.plots and has_noise_curves(accuracy):
        paths.update(noise_curve_figures(evaluations, accuracy, report.metrics, report.ood, out_dir))
    paths["html"] = write_html_report(
        out_dir,
        evaluations,
        by=report.by,
        metrics=report.metrics,
        ood=report.ood,
        figures=paths,
        accuracy=accuracy,
        title=f"hrp-ood sweep {experiment.path.name}",
    )
    for kind in ("markdown", "accuracy_markdown", "noise_curves", "accuracy_vs_noise", "html"):
        if kind in paths:
            print(f"{kind}: {paths[kind]}")
    return paths
