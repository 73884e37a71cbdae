"""TensorBoard logs of a training run: every metrics.csv column as a scalar and the per-sample signals (α, β, T,
loss; hrp_ood/trainers/signals.py) as histograms, once per epoch, when the `tensorboard` package is installed
(`pip install 'hrp-ood[tensorboard]'`).

The events go to `<run>/tb/`, or to the config's `tensorboard_dir` (`hrp-ood sweep` puts every run of a grid
under `<out>/tb/<run name>/`, one TensorBoard for the whole table). The global step is the epoch, as in
metrics.csv's `epoch` column (1 = after the first epoch). A writer opens with `purge_step` at the first epoch it
will log: a resumed run hides the events a crashed run wrote after its checkpoint, and a run started afresh in a
folder that holds older events hides all of them. Only the main process of a data-parallel run writes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hrp_ood.errors import UserError, shown

if TYPE_CHECKING:
    from hrp_ood.config import TrainConfig
    from hrp_ood.trainers.signals import EpochSignals

log = logging.getLogger(__name__)

LOG_DIR = "tb"  # <run>/tb/ unless the config's tensorboard_dir says otherwise
HISTOGRAMS = ("alpha", "beta", "T", "loss")  # per-sample signals drawn as histograms (EpochSignals.values)
# metrics.csv column → TensorBoard section (the first pattern that matches; every other column is train/)
SCALAR_GROUPS = (
    ("reliability", re.compile(r".*auroc.*|alpha|beta|T|pseudo_acc|targets_S_class_max|cdcl_.*|ram_.*|high_conf")),
    ("test", re.compile(r"acc_.*|test_.*")),
    ("meta", re.compile(r"meta_.*")),
)


def scalar_tag(column: str) -> str:
    """The TensorBoard tag of a metrics.csv column: `<section>/<column>`."""
    group = next((name for name, pattern in SCALAR_GROUPS if pattern.fullmatch(column)), "train")
    return f"{group}/{column}"


def log_dir(cfg: TrainConfig, run_dir: Path) -> Path:
    return Path(cfg.tensorboard_dir) if cfg.tensorboard_dir else run_dir / LOG_DIR


class TensorBoardLog:
    """One SummaryWriter for the epochs a training process runs."""

    def __init__(self, path: Path, first_epoch: int):
        from torch.utils.tensorboard import SummaryWriter

        try:
            self.writer = SummaryWriter(log_dir=str(path), purge_step=first_epoch)
        except OSError as err:
            raise UserError(
                f"cannot write TensorBoard logs to {shown(path)} ({err.strerror or err}); choose another folder "
                "with --set tensorboard_dir=..., or --set tensorboard=false"
            ) from None
        self.path = path

    def log_epoch(self, epoch: int, row: dict[str, Any], signals: EpochSignals, is_clean: torch.Tensor) -> None:
        """The epoch's metrics.csv row (NaN, a column that does not apply this epoch and an empty cell in metrics.csv,
        is left out) and the histograms of its per-sample signals, whole and split by whether the given label is
        clean; then flush."""
        for column, value in row.items():
            if column != "epoch" and isinstance(value, (int, float)) and not math.isnan(value):
                self.writer.add_scalar(scalar_tag(column), value, epoch)
        for name in HISTOGRAMS:
            values = signals.values[name]
            seen = torch.isfinite(values)  # NaN: a signal the method does not compute, or a sample not visited
            for suffix, keep in (("", seen), ("_clean", seen & is_clean), ("_noisy", seen & ~is_clean)):
                if keep.any():
                    self.writer.add_histogram(f"signals/{name}{suffix}", values[keep].float().cpu(), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def available() -> bool:
    """Whether the `tensorboard` package, which torch.utils.tensorboard writes with, is installed."""
    return importlib.util.find_spec("tensorboard") is not None


@contextlib.contextmanager
def tensorboard_log(cfg: TrainConfig, run_dir: Path, first_epoch: int, main: bool) -> Iterator[TensorBoardLog | None]:
    """The run's TensorBoardLog, closed on the way out (finish, interrupt or error); None when the config turns
    logging off, on a process other than the main one, or without the tensorboard package (said in one info line)."""
    if not (cfg.tensorboard and main):
        yield None
        return
    if not available():
        log.info("no TensorBoard logs: the tensorboard package is not installed (pip install 'hrp-ood[tensorboard]')")
        yield None
        return
    board = TensorBoardLog(log_dir(cfg, run_dir), first_epoch)
    log.info("TensorBoard logs in %s", board.path)
    try:
        yield board
    finally:
        board.close()
