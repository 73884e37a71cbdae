"""The training loop: run folder, epochs, evaluation, metrics.csv, checkpoints and resume.

A run folder `runs/<name>/` holds config.yaml, noise.npz, meta_indices.npz, metrics.csv, train.log,
signals/epoch_NNNN.npz (per-sample diagnostics, trainers/signals.py), tb/ (TensorBoard events, train/tensorboard.py),
last.pt (everything needed to resume) and best.pt: the epoch whose ensemble is most accurate on the clean meta
set, never chosen on the test set: the last epoch when nothing clean is held out (a method that trains on the meta
set, or meta_size 0, where metrics.csv leaves meta_acc empty).

Data-parallel under torchrun (`hrp-ood train --nproc N`): `batch_size` and `meta_batch_size` stay the
GLOBAL batch sizes, split evenly over the ranks, so N ranks compute the same maths as one process. Rank 0
draws the epoch's order and broadcasts it; each rank trains on its slice of every global batch, with its
own generator seeded from (seed, rank) for augmentation and mixup. Rank 0 alone writes files, logs and
progress bars; the others read the noise and meta files it created. Checkpoints hold the unwrapped
networks (no `module.`) and every rank's RNG state, so a run resumes on any number of ranks.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import inspect
import io
import logging
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hrp_ood.train.data import prepare_training_data
from hrp_ood.train.tensorboard import TensorBoardLog, tensorboard_log

from hrp_ood import distributed
from hrp_ood.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from hrp_ood.config import LOGGING_KEYS, TrainConfig, read_yaml, save_config, saved_config
from hrp_ood.data.augment import BatchAugment
from hrp_ood.devices import device_type, resolve_device
from hrp_ood.errors import Interrupted, UserError
from hrp_ood.io import atomic_write_text, read_metrics_rows
from hrp_ood.method import ReliabilityMemory
from hrp_ood.models import create_model
from hrp_ood.progress import progress_steps
from hrp_ood.run_dir import RunFolder
from hrp_ood.trainers.base import EpochPlan, Member, NonFiniteLoss, StepContext, StepInputs, shuffled_plan
from hrp_ood.trainers.signals import EpochSignals, class_share_max

log = logging.getLogger(__name__)


def build_members(cfg: TrainConfig, num_classes: int, device: torch.device) -> list[Member]:
    """One or two networks (SPEC §3.4: HRP co-trains two), each with its optimiser and lr schedule."""
    members = []
    projection_head = getattr(cfg.spec.implementation(), "projection_head", lambda cfg, net: None)
    for _ in range(cfg.spec.networks):
        net = create_model(cfg.model, num_classes=num_classes).to(device)
        if cfg.sync_bn:  # before the optimiser: the conversion makes new BN parameters
            distributed.convert_to_global_batch_norm(net)
        if cfg.channels_last:
            net = net.to(memory_format=torch.channels_last)
        head = projection_head(cfg, net)
        if head is not None:
            head = head.to(device)
        params = list(net.parameters()) + (list(head.parameters()) if head is not None else [])
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        scheduler = lr_scheduler(cfg, optimizer)
        members.append(Member(net, head, optimizer, scheduler, forward=torch.compile(net) if cfg.compile else net))
    return members


def lr_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of `cfg.lr_schedule`, stepped once per epoch."""
    schedulers = torch.optim.lr_scheduler
    if cfg.lr_schedule == "cosine":
        return schedulers.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=cfg.lr_min)
    if cfg.lr_schedule == "constant":
        return schedulers.LambdaLR(optimizer, lambda epoch: 1.0)
    return schedulers.MultiStepLR(optimizer, milestones=cfg.lr_milestones, gamma=cfg.lr_gamma)


def wrap_data_parallel(members: list[Member], cfg: TrainConfig, device: torch.device) -> None:
    """DDP-wrap each network and head for the training passes (a no-op in one process).

    `Member.net` / `Member.head` stay the plain modules (the meta step, evaluation and checkpoints use
    them); DDP broadcasts rank 0's initial weights. With sync_bn the BN statistics are global, so the
    running statistics agree on every rank and need no broadcast before each forward.
    """
    if distributed.world_size() == 1:
        return
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    # the per-forward buffer broadcast (rank 0's BN running statistics); newer torch renamed the option
    buffers_option = (
        "forward_sync_buffers"
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else "broadcast_buffers"
    )

    def ddp(module: torch.nn.Module) -> DistributedDataParallel:
        return DistributedDataParallel(module, device_ids=device_ids, **{buffers_option: not cfg.sync_bn})

    for m in members:
        wrapped = ddp(m.net)
        m.forward = torch.compile(wrapped) if cfg.compile else wrapped
        if m.head is not None:
            m.head_forward = ddp(m.head)


@torch.no_grad()
def ensemble_predictions(
    members: list[Member], images: torch.Tensor, augment: BatchAugment, batch_size: int
) -> torch.Tensor:
    """Predicted classes of each network and of the ensemble (averaged logits): (nets + 1, N), this rank's
    batches only (every W-th; the others stay -1)."""
    nets = [m.net for m in members]
    for net in nets:
        net.eval()
    predictions = torch.full((len(nets) + 1, len(images)), -1, dtype=torch.long, device=images.device)
    ranks, first = distributed.world_size(), distributed.rank() * batch_size  # each rank scores every W-th batch
    for start in range(first, len(images), ranks * batch_size):
        x = augment.normalize(images[start : start + batch_size])
        logits = [net(x).float() for net in nets]
        logits.append(torch.stack(logits).mean(dim=0))
        predictions[:, start : start + batch_size] = torch.stack([out.argmax(dim=1) for out in logits])
    for net in nets:
        net.train()
    return predictions


def accuracies(predictions: torch.Tensor, labels: torch.Tensor, prefix: str = "acc") -> dict[str, float]:
    """Accuracy (%) of each row of `ensemble_predictions`: {prefix}_net1, ..., {prefix}_ensemble."""
    correct = distributed.global_sum((predictions == labels[None, :]).sum(dim=1).double())
    acc = (100.0 * correct / len(labels)).tolist()
    names = [f"{prefix}_net{k + 1}" for k in range(len(predictions) - 1)] + [f"{prefix}_ensemble"]
    return dict(zip(names, acc))


class MetricsLog:
    """metrics.csv, one row per epoch; the header grows if a later epoch logs a new column."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = read_metrics_rows(path)

    def append(self, row: dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if int(r["epoch"]) < int(row["epoch"])] + [row]
        self._write()

    def catch_up(self, epoch: int, row: dict[str, Any]) -> None:
        """Agree with a checkpoint after `epoch` epochs whose own row is `row`: rows of later epochs go (left by
        versions that wrote metrics.csv before last.pt), and `row` comes back if a crash between the two lost it."""
        kept = [r for r in self.rows if int(r["epoch"]) <= epoch]
        if row and int(row["epoch"]) == epoch and not any(int(r["epoch"]) == epoch for r in kept):
            kept.append(row)
        if kept != self.rows:
            self.rows = kept
            self._write()

    def _write(self) -> None:
        columns: list[str] = []
        for r in self.rows:
            columns += [c for c in r if c not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())


def _format(value: float) -> str:
    """metrics.csv cell: a column that does not apply this epoch (NaN) is left empty."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def _shown(value: float) -> str:
    """An epoch-line number; '–' where it does not apply."""
    return "–" if value is None or math.isnan(value) else f"{value:.1f}"


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, *, progress: bool | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = resolve_device(cfg.device)
        self.ranks = distributed.world_size()
        _check_divisible(cfg, self.ranks)
        if self.ranks > 1 and not cfg.spec.data_parallel:
            raise UserError(f"{cfg.method} trains in one process (its epoch pass spans the whole set); drop --nproc")
        self.progress = (sys.stderr.isatty() if progress is None else progress) and distributed.is_main()
        self.data = distributed.main_first(lambda: prepare_training_data(cfg, run_dir, self.device))
        self.augment = BatchAugment(
            self.data.mean,
            self.data.std,
            self.data.image_size,
            padding=cfg.crop_padding,
            strong_policy=cfg.strong_policy,
            flip=cfg.flip,
        )
        self.members = build_members(cfg, self.data.num_classes, self.device)
        wrap_data_parallel(self.members, cfg, self.device)
        amp = cfg.amp and self.device.type == "cuda"
        self.ctx = StepContext(
            cfg,
            self.augment,
            self.data.meta_images,
            self.data.meta_labels,
            autocast_device="cuda" if amp else None,
            forget_rate=cfg.forget_rate if cfg.forget_rate is not None else self.data.noise_rate,
        )
        self.ctx.train_images = self.data.images
        self.implementation = cfg.spec.implementation()
        if cfg.spec.meta and cfg.reliability_momentum > 0:
            self.ctx.memories = [
                ReliabilityMemory(len(self.data.noisy_labels), cfg.reliability_momentum, self.device)
                for _ in self.members
            ]
        self.metrics = MetricsLog(run_dir / "metrics.csv")
        self.epoch = 0  # epochs completed
        self.step = 0  # steps completed in the current epoch
        self.plan = EpochPlan(torch.empty(0, 0, dtype=torch.long))
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}  # steps whose value of each log was finite
        self.best_acc = -math.inf  # meta-set accuracy of best.pt
        self.best_test_acc = math.nan  # its test accuracy (reported, never used to choose)
        self.metrics_row: dict[str, str] = {}  # the last finished epoch's metrics.csv row, also kept in last.pt
        self.epoch_signals: EpochSignals | None = None  # the last finished epoch's signals, merged over ranks
        self.stop_requested = False  # set by SIGINT/SIGTERM: checkpoint after the current step and stop

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "step": self.step,  # > 0 only in a checkpoint written mid-epoch (interrupt)
            "epoch_state": self._epoch_state() if self.step else {},
            "best_acc": self.best_acc,
            "best_test_acc": self.best_test_acc,
            "metrics_row": self.metrics_row,
            "dataset": {
                "name": self.data.dataset,
                "classes": self.data.classes,
                "mean": list(self.data.mean),
                "std": list(self.data.std),
                "image_size": self.data.image_size,
                "noise_rate": self.data.noise_rate,
            },
            "world_size": self.ranks,
            "nets": [m.net.state_dict() for m in self.members],
            "heads": [m.head.state_dict() if m.head is not None else {} for m in self.members],
            "optimizers": [m.optimizer.state_dict() for m in self.members],
            "schedulers": [m.scheduler.state_dict() for m in self.members],
            "reliability_memories": [memory.state_dict() for memory in self.ctx.memories],
            "method_state": {key: value.cpu() for key, value in self.ctx.method_state.items()},
            "rng": rng_state(),  # rank 0's (what a one-process resume uses)
            "rank_rng": distributed.all_gather_objects(rng_state()) if self.ranks > 1 else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m, net, head, opt, sched in zip(
            self.members, state["nets"], state["heads"], state["optimizers"], state["schedulers"]
        ):
            m.net.load_state_dict(net)
            if m.head is not None:
                m.head.load_state_dict(head)
            m.optimizer.load_state_dict(opt)
            m.scheduler.load_state_dict(sched)
        for memory, saved in zip(self.ctx.memories, state.get("reliability_memories", [])):
            memory.load_state_dict(saved)
        self.ctx.method_state = {key: value.to(self.device) for key, value in state.get("method_state", {}).items()}
        self.epoch = state["epoch"]
        self.step = state["step"]
        self.best_acc = state["best_acc"]
        self.best_test_acc = state.get("best_test_acc", math.nan)
        self.metrics_row = state.get("metrics_row") or {}
        if distributed.is_main():
            self.metrics.catch_up(self.epoch, self.metrics_row)
        if self.step:
            epoch_state = state["epoch_state"]
            self.plan = _saved_plan(epoch_state, self._batch_size(), self.device)
            # the saved partial sums are over every rank: rank 0 carries them, the others restart from 0
            keep = distributed.is_main()
            self.sums = {k: v.to(self.device) * keep for k, v in epoch_state["sums"].items()}
            self.counts = {k: v.to(self.device) * keep for k, v in epoch_state["counts"].items()}
            self.ctx.signals = self._new_signals()
            self.ctx.signals.load_state_dict(epoch_state["signals"], keep=keep)
            self.ctx.skipped_steps = epoch_state["skipped_steps"]
        self._restore_rng(state)

    def _restore_rng(self, state: dict[str, Any]) -> None:
        """Each rank's generators as saved; a rank the saved run did not have starts a stream of (seed, rank, epoch)."""
        rank = distributed.rank()
        rank_rng = state.get("rank_rng") or []
        if len(rank_rng) == self.ranks:
            set_rng_state(rank_rng[rank])
        elif rank == 0:
            set_rng_state(state["rng"])
        else:
            seed_everything(distributed.rank_seed(self.cfg.seed * 100_003 + self.epoch, rank), self.cfg.deterministic)

    def _epoch_state(self) -> dict[str, Any]:
        """The epoch in flight, merged over ranks (partial sums added, per-sample reliabilities combined)."""
        return {
            "plan": self.plan.state_dict(),
            "sums": {k: distributed.global_sum(torch.as_tensor(v)).cpu() for k, v in self.sums.items()},
            "counts": {k: distributed.global_sum(torch.as_tensor(v)).cpu() for k, v in self.counts.items()},
            "signals": self.ctx.signals.state_dict(),
            "skipped_steps": self.ctx.skipped_steps,
        }

    # ---- the loop ----------------------------------------------------------------------------------
    def _batch_size(self) -> int:
        """The global batch: every rank takes an equal slice of it."""
        return min(self.cfg.batch_size, len(self.data.noisy_labels)) // self.ranks * self.ranks

    def _begin_epoch(self) -> None:
        epoch_plan = getattr(self.implementation, "epoch_plan", None)
        if epoch_plan is not None:  # the method's pass over the training set (one process: spec.data_parallel)
            self.plan = epoch_plan(self.ctx, self.members, self.data, self.epoch)
        else:
            # CPU generator: the same order on every device; rank 0's, so every rank slices the same order
            plan = shuffled_plan(len(self.data.noisy_labels), self._batch_size())
            self.plan = EpochPlan(distributed.broadcast_from_main(plan.index.to(self.device)).cpu())
        self.sums, self.counts = {}, {}
        self.ctx.signals = self._new_signals()
        self.ctx.skipped_steps = 0

    def _new_signals(self) -> EpochSignals:
        return EpochSignals(len(self.data.noisy_labels), self.data.num_classes, self.device)

    def train_epoch(self) -> dict[str, float]:
        """Run (the rest of) the current epoch; returns the epoch's mean logs. Resumes mid-epoch if needed."""
        if self.step == 0:
            self._begin_epoch()
        steps, batch_size = self.plan.index.shape
        local_size = batch_size // self.ranks
        first = distributed.rank() * local_size  # this rank's slice of each global batch
        for m in self.members:
            m.net.train()
        bar = progress_steps(
            range(self.step, steps),
            bar=self.progress,
            total=steps,
            initial=self.step,
            desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
            steps_after=(self.cfg.epochs - self.epoch - 1) * steps,
        )
        for step in bar:
            if self._stop_agreed():
                raise TrainingInterrupted(self.epoch, step)
            index = self.plan.index[step, first : first + local_size].to(self.device)
            batch = StepInputs(
                self.data.images[index],
                self.data.noisy_labels[index],
                index,
                epoch=self.epoch + step / steps,
                clean_labels=self.data.clean_labels[index],
                extras=self.plan.step_extras(step),
            )
            try:
                logs = self.implementation.step(self.ctx, self.members, batch)
            except NonFiniteLoss as err:
                raise UserError(
                    f"non-finite loss at epoch {self.epoch + 1}, step {step + 1} (terms: {err}); "
                    f"the last good checkpoint is {self.run_dir / 'last.pt'}; lower --lr, or "
                    "--set on_nonfinite=skip to skip such steps"
                ) from None
            for key, value in logs.items():
                finite = torch.isfinite(value)
                self.sums[key] = self.sums.get(key, 0) + torch.where(finite, value, torch.zeros_like(value))
                self.counts[key] = self.counts.get(key, 0) + finite.to(value.dtype)
            self.step = step + 1
        self.step = 0
        # rank-local logs → their mean over ranks (equal local batches: the global batch's values)
        # the mean over the steps (and ranks) where the value was finite: NaN marks "no such pair in this batch"
        row = {
            key: (distributed.global_sum(value) / distributed.global_sum(torch.as_tensor(self.counts[key]))).item()
            for key, value in self.sums.items()
        }
        self.epoch_signals = self.ctx.signals.merged()  # every rank takes part
        row.update(self.epoch_signals.summary(self.data.is_clean))
        row["skipped_steps"] = self.ctx.skipped_steps
        return row

    def _check_weights(self) -> None:
        for k, m in enumerate(self.members):
            if not all(torch.isfinite(p).all() for p in m.net.parameters()):
                raise UserError(
                    f"net {k + 1} has non-finite weights after epoch {self.epoch}; not saving them: "
                    f"the last good checkpoint is {self.run_dir / 'last.pt'}"
                )

    def _stop_agreed(self) -> bool:
        """A stop signal seen by any rank stops every rank at the same step (one tiny all-reduce per step)."""
        if self.ranks == 1:
            return self.stop_requested
        flag = torch.tensor(float(self.stop_requested), device=self.device)
        return bool(distributed.global_max(flag).item())

    def save(self) -> None:
        """Every rank takes part (the state gathers RNG states and epoch sums); rank 0 writes."""
        state = self.state_dict()
        if distributed.is_main():
            save_checkpoint(state, self.run_dir / "last.pt")

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        log.info(
            "training %s (%s, %s) for %d epochs on %s", cfg.method, cfg.model, cfg.dataset, cfg.epochs, self.device
        )
        with tensorboard_log(cfg, self.run_dir, self.epoch + 1, distributed.is_main()) as board:
            self._fit_epochs(board)
        return {
            "epochs": self.epoch,
            "best_meta_acc": self.best_acc,
            "best_test_acc": self.best_test_acc,
            "last_test_acc": self._last_test_acc(),
            "run_dir": str(self.run_dir),
        }

    def _fit_epochs(self, board: TensorBoardLog | None) -> None:
        """The epochs from the current one to cfg.epochs; `board`: the TensorBoard log (main process, if on)."""
        cfg = self.cfg
        while self.epoch < cfg.epochs:
            started = time.perf_counter()
            lr = self.members[0].lr
            try:
                row = self.train_epoch()
            except TrainingInterrupted:
                self.save()
                raise
            for m in self.members:
                m.scheduler.step()
            self.epoch += 1
            self._check_weights()
            row.update(self._evaluate())
            row = {"epoch": self.epoch, "lr": lr, **row, "epoch_time_s": time.perf_counter() - started}
            self.metrics_row = {k: _format(v) for k, v in row.items()}
            # best.pt: selected on the clean meta set (held out from the noisy training data), never on the test set;
            # the last epoch when nothing clean is held out (the method trains on the meta set, or meta_size 0)
            is_best = not selects_on_meta_set(cfg) or row["meta_acc"] > self.best_acc
            if is_best:
                self.best_acc, self.best_test_acc = row["meta_acc"], row["acc_ensemble"]
            self.save()
            if distributed.is_main():  # after last.pt (which holds the row): metrics.csv is never ahead of it
                self.metrics.append(self.metrics_row)
            if board is not None:  # after last.pt too: a resumed run starts logging at the epoch after it
                board.log_epoch(self.epoch, row, self.epoch_signals, self.data.is_clean)
            self._save_signals()
            if is_best and distributed.is_main():
                shutil.copyfile(self.run_dir / "last.pt", self.run_dir / ".best.pt.tmp")
                (self.run_dir / ".best.pt.tmp").replace(self.run_dir / "best.pt")
            log.info(
                "epoch %d/%d  loss %.4f  acc %.2f (net1 %.2f, meta %.1f)  AUROC alpha %s T %s loss %s  %.1fs",
                self.epoch,
                cfg.epochs,
                row["loss"],
                row["acc_ensemble"],
                row["acc_net1"],
                row["meta_acc"],
                _shown(row["alpha_auroc"]),
                _shown(row["T_auroc"]),
                _shown(row["loss_auroc"]),
                row["epoch_time_s"],
            )

    def _evaluate(self) -> dict[str, float]:
        """Test accuracies, the ensemble's accuracy on the clean meta set (model selection) and the share of the
        most predicted test class."""
        cfg, data = self.cfg, self.data
        predictions = ensemble_predictions(self.members, data.test_images, self.augment, cfg.eval_batch_size)
        row = accuracies(predictions, data.test_labels)
        if len(data.meta_labels):
            meta_predictions = ensemble_predictions(self.members, data.meta_images, self.augment, cfg.eval_batch_size)
            row["meta_acc"] = accuracies(meta_predictions, data.meta_labels, "meta")["meta_ensemble"]
        else:  # no meta set: no meta accuracy (the test accuracy is never one)
            row["meta_acc"] = math.nan
        ensemble = predictions[-1]
        counts = distributed.global_sum(torch.bincount(ensemble[ensemble >= 0], minlength=data.num_classes).double())
        row["test_pred_class_max"] = class_share_max(counts)
        self.test_prediction_counts = counts
        return row

    def _save_signals(self) -> None:
        """signals/epoch_NNNN.npz every signals_every epochs and at the last; after last.pt, like metrics.csv."""
        if self.epoch % self.cfg.signals_every and self.epoch != self.cfg.epochs:
            return
        signals = self.epoch_signals  # merged by train_epoch
        if distributed.is_main():
            signals.save(
                self.run_dir / "signals" / f"epoch_{self.epoch:04d}.npz",
                self.data.is_clean,
                self.test_prediction_counts,
            )

    def _last_test_acc(self) -> float:
        rows = self.metrics.rows
        return float(rows[-1]["acc_ensemble"]) if rows else math.nan


def _saved_plan(epoch_state: dict[str, Any], batch_size: int, device: torch.device) -> EpochPlan:
    """The plan of a mid-epoch checkpoint; one written before plans existed holds the epoch's order instead."""
    if "plan" in epoch_state:
        return EpochPlan.from_state_dict(epoch_state["plan"], device)
    order = epoch_state["order"]
    steps = len(order) // batch_size
    return EpochPlan(order[: steps * batch_size].view(steps, batch_size))


def selects_on_meta_set(cfg: TrainConfig) -> bool:
    """best.pt is chosen on the clean meta set: one is held out (meta_size > 0) and the method does not train on it;
    otherwise best.pt is the last epoch (never chosen on the test set)."""
    return cfg.meta_size > 0 and not cfg.spec.trains_on_meta_set


def best_selection(cfg: TrainConfig) -> str:
    """How best.pt was chosen, as `hrp-ood train`'s result line says it."""
    if selects_on_meta_set(cfg):
        return "selected on the clean meta set"
    if cfg.spec.trains_on_meta_set:
        return "the last epoch: it trains on the meta set"
    return "the last epoch: no clean meta set (meta_size 0), and never selected on the test set"


def _check_divisible(cfg: TrainConfig, ranks: int) -> None:
    """The global batch and meta batch are split evenly over the ranks."""
    for key in ("batch_size", "meta_batch_size"):
        if getattr(cfg, key) % ranks:
            raise UserError(
                f"{key} {getattr(cfg, key)} is not divisible by the {ranks} processes; batch sizes are "
                f"global: use a multiple of {ranks} (--set {key}=...)"
            )


class TrainingInterrupted(Exception):
    def __init__(self, epoch: int, step: int):
        super().__init__(f"epoch {epoch + 1}, step {step}")
        self.epoch, self.step = epoch, step


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("hrp_ood").addHandler(handler)
    return handler


RESUMABLE = ("epochs", "device", "on_nonfinite", "eval_batch_size", *LOGGING_KEYS)


def resume_config(run_dir: Path, requested: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The saved config of the run (last.pt's, or config.yaml's for a run stopped before its first checkpoint);
    only the run-time policies in RESUMABLE may change on resume."""
    if (run_dir / "last.pt").exists():
        saved = load_checkpoint(run_dir / "last.pt")["config"]
    elif (run_dir / "config.yaml").exists():
        saved = read_yaml(run_dir / "config.yaml")
    else:
        raise UserError(f"--resume: {run_dir} holds neither last.pt nor config.yaml; drop --resume to start the run")
    saved_cfg = saved_config(saved, run_dir)
    changed = sorted(
        k for k in explicit - {*RESUMABLE, "name", "out_dir"} if getattr(requested, k) != getattr(saved_cfg, k)
    )
    if changed:
        raise UserError(
            f"--resume continues {run_dir} with its saved config; {', '.join(changed)} differ(s) from it (as given "
            "by --config or a flag): start a new run (--name) to change them"
        )
    return dataclasses.replace(saved_cfg, **{k: getattr(requested, k) for k in RESUMABLE if k in explicit})


@contextlib.contextmanager
def _stop_on_signals(trainer: Trainer):
    """SIGINT/SIGTERM ask the trainer to checkpoint after the current step; a second signal acts at once."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def request_stop(signum, frame):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)
        trainer.stop_requested = True
        log.warning("%s received: saving a checkpoint after the current step", received[-1])

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed the global generators once, at the start of a run (an application decision, not a library one)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    explicit: set[str] = frozenset(),
    progress: bool | None = None,
) -> dict[str, Any]:
    """`hrp-ood train`: create or resume `cfg.out_dir/cfg.run_name` and train to `cfg.epochs`.

    Under torchrun (WORLD_SIZE > 1) every process calls this; it joins the process group and leaves it.
    """
    owns_group = distributed.init_from_env(device_type(cfg.device))
    try:
        with _without_torch_jit_deprecation():
            return _train(cfg, resume=resume, overwrite=overwrite, explicit=explicit, progress=progress)
    finally:
        if owns_group:
            distributed.shutdown()


def train_process(
    cfg: TrainConfig,
    resume: bool,
    explicit: set[str],
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool | None = False,
    console: bool = False,
) -> None:
    """One process of a training run: `hrp-ood train` calls it, and every process `distributed.launch` starts for a
    data-parallel run (`train --nproc`, `sweep --nproc`). `console`: the package's log to stderr and, on rank 0,
    the result line of `hrp-ood train`."""
    if threads is not None:
        torch.set_num_threads(threads)
    if console:
        from hrp_ood.progress import configure_console_logging

        configure_console_logging()
    result = train(cfg, resume=resume, overwrite=overwrite, explicit=explicit, progress=progress)
    if console and int(os.environ.get("RANK", "0")) == 0:
        selection = best_selection(cfg)
        print(
            f"done: {result['epochs']} epochs, ensemble test accuracy {result['last_test_acc']:.2f}% (last), "
            f"{result['best_test_acc']:.2f}% (best.pt, {selection}) -> {result['run_dir']}"
        )


@contextlib.contextmanager
def _without_torch_jit_deprecation():
    """torch's forward-mode AD (the meta step) scripts its own decompositions with torch.jit.script on first use,
    and torch.jit.script warns that it is deprecated: a FutureWarning about torch's code, nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        yield


def _prepare_run_dir(
    cfg: TrainConfig, run: RunFolder, resume: bool, overwrite: bool, explicit: set[str]
) -> tuple[TrainConfig, bool]:
    """Claim the run folder (hrp_ood.run_dir) and write config.yaml; returns (the run's config, whether it
    continues from last.pt)."""
    if not resume:
        cfg.check_schedule()  # a new run's config is complete: checked before the folder is touched
    from_checkpoint = run.claim(resume=resume, overwrite=overwrite)
    if resume:
        cfg = resume_config(run.path, cfg, set(explicit))
        cfg.check_schedule()
    if not from_checkpoint:
        run.start_afresh()
    save_config(cfg, run.path / "config.yaml")
    return cfg, from_checkpoint


def _train(
    cfg: TrainConfig, *, resume: bool, overwrite: bool, explicit: set[str], progress: bool | None
) -> dict[str, Any]:
    run_dir = Path(cfg.out_dir) / cfg.run_name
    run = RunFolder(run_dir)  # rank 0 alone claims and touches the folder; the others get its config (or its error)
    main = distributed.is_main()
    try:
        cfg, resume = distributed.on_main(lambda: _prepare_run_dir(cfg, run, resume, overwrite, explicit))
    except BaseException:
        run.abandon()
        raise
    package_log = logging.getLogger("hrp_ood")
    previous_level = package_log.level
    handler = _setup_logging(run_dir) if main else None
    if not main:
        package_log.setLevel(logging.WARNING)  # one console log, rank 0's
    try:
        try:
            seed_everything(distributed.rank_seed(cfg.seed, distributed.rank()), cfg.deterministic)
            trainer = Trainer(cfg, run_dir, progress=progress)
        except BaseException:
            run.abandon()  # a run that never started leaves nothing behind to block the corrected retry
            raise
        run.keep()
        if resume:
            trainer.load_state_dict(load_checkpoint(run_dir / "last.pt", map_location=trainer.device))
            log.info(
                "resumed %s at epoch %d, step %d on %d process(es)", run_dir, trainer.epoch, trainer.step, trainer.ranks
            )
        with _stop_on_signals(trainer) as received:
            try:
                return trainer.fit()
            except TrainingInterrupted as where:
                signal_name = received[0] if received else "SIGTERM"  # a rank may stop on its peers' signal
                nproc = f" --nproc {trainer.ranks}" if trainer.ranks > 1 else ""
                raise Interrupted(
                    f"{signal_name} at {where}: state saved to {run_dir / 'last.pt'}; resume with: "
                    f"hrp-ood train --out-dir {cfg.out_dir} --name {cfg.run_name}{nproc} --resume",
                    exit_code=128 + getattr(signal, signal_name),
                ) from None
    finally:
        package_log.setLevel(previous_level)
        if handler is not None:
            package_log.removeHandler(handler)
            handler.close()
        run.release()
