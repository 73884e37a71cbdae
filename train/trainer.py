"""The training loop: run folder, epochs, evaluation, metrics.csv, checkpoints and resume.

A run folder `runs/<name>/` holds config.yaml, noise.npz, meta_indices.npz, metrics.csv, train.log,
last.pt (everything needed to resume) and best.pt (best ensemble test accuracy).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from hrp_ood.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from hrp_ood.config import TrainConfig, save_config
from hrp_ood.data.augment import BatchAugment
from hrp_ood.errors import Interrupted, UserError
from hrp_ood.io import atomic_write_text
from hrp_ood.models import ProjectionHead, create_model
from hrp_ood.train.data import TrainingData, prepare_training_data
from hrp_ood.train.steps import STEPS, Member, NonFiniteLoss, StepContext, StepInputs

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def build_members(cfg: TrainConfig, num_classes: int, device: torch.device) -> list[Member]:
    """One or two networks (SPEC §3.4: HRP co-trains two), each with its optimiser and lr schedule."""
    members = []
    for _ in range(2 if cfg.spec.dual else 1):
        net = create_model(cfg.model, num_classes=num_classes).to(device)
        if cfg.channels_last:
            net = net.to(memory_format=torch.channels_last)
        head = None
        if cfg.spec.loss == "hrp" and cfg.spec.cdcl:
            head = ProjectionHead(net.num_features, cfg.proj_hidden_dim, cfg.proj_dim).to(device)
        params = list(net.parameters()) + (list(head.parameters()) if head is not None else [])
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.lr_milestones, gamma=cfg.lr_gamma)
        members.append(Member(net, head, optimizer, scheduler, forward=torch.compile(net) if cfg.compile else net))
    return members


@torch.no_grad()
def test_accuracies(members: list[Member], data: TrainingData, augment: BatchAugment,
                    batch_size: int) -> dict[str, float]:
    """Test accuracy (%) of each network and, for two, of their ensemble (averaged logits)."""
    nets = [m.net for m in members]
    for net in nets:
        net.eval()
    correct = torch.zeros(len(nets) + 1, device=data.test_labels.device)
    for start in range(0, len(data.test_labels), batch_size):
        x = augment.normalize(data.test_images[start:start + batch_size])
        y = data.test_labels[start:start + batch_size]
        logits = [net(x).float() for net in nets]
        logits.append(torch.stack(logits).mean(dim=0))
        correct += torch.stack([(out.argmax(dim=1) == y).sum() for out in logits])
    for net in nets:
        net.train()
    acc = (100.0 * correct / len(data.test_labels)).tolist()
    names = [f"acc_net{k + 1}" for k in range(len(nets))] + ["acc_ensemble"]
    return dict(zip(names, acc))


def _auroc(scores: torch.Tensor, is_clean: torch.Tensor) -> float:
    seen = ~torch.isnan(scores)
    clean = is_clean[seen].cpu().numpy()
    if seen.sum() == 0 or clean.all() or not clean.any():
        return float("nan")
    return 100.0 * roc_auc_score(clean, scores[seen].cpu().numpy())


class MetricsLog:
    """metrics.csv, one row per epoch; the header grows if a later epoch logs a new column."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists():
            with path.open(newline="") as f:
                self.rows = list(csv.DictReader(f))

    def append(self, row: dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if int(r["epoch"]) < int(row["epoch"])] + [row]
        columns: list[str] = []
        for r in self.rows:
            columns += [c for c in r if c not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())


def _format(value: float) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, *, progress: bool | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = resolve_device(cfg.device)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.data = prepare_training_data(cfg, run_dir, self.device)
        self.augment = BatchAugment(self.data.mean, self.data.std, self.data.image_size,
                                    strong_policy=cfg.strong_policy)
        self.members = build_members(cfg, self.data.num_classes, self.device)
        amp = cfg.amp and self.device.type == "cuda"
        self.ctx = StepContext(cfg, self.augment, self.data.meta_images, self.data.meta_labels,
                               autocast_device="cuda" if amp else None,
                               forget_rate=cfg.forget_rate if cfg.forget_rate is not None else self.data.noise_rate)
        self.step_fn = STEPS[cfg.spec.loss]
        self.metrics = MetricsLog(run_dir / "metrics.csv")
        self.epoch = 0  # epochs completed
        self.step = 0  # steps completed in the current epoch
        self.order = torch.empty(0, dtype=torch.long)
        self.sums: dict[str, torch.Tensor] = {}
        self.best_acc = -math.inf
        self.stop_requested = False  # set by SIGINT/SIGTERM: checkpoint after the current step and stop

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "step": self.step,  # > 0 only in a checkpoint written mid-epoch (interrupt)
            "epoch_state": self._epoch_state() if self.step else {},
            "best_acc": self.best_acc,
            "dataset": {"name": self.data.dataset, "classes": self.data.classes, "mean": list(self.data.mean),
                        "std": list(self.data.std), "image_size": self.data.image_size,
                        "noise_rate": self.data.noise_rate},
            "nets": [m.net.state_dict() for m in self.members],
            "heads": [m.head.state_dict() if m.head is not None else {} for m in self.members],
            "optimizers": [m.optimizer.state_dict() for m in self.members],
            "schedulers": [m.scheduler.state_dict() for m in self.members],
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m, net, head, opt, sched in zip(self.members, state["nets"], state["heads"], state["optimizers"],
                                            state["schedulers"]):
            m.net.load_state_dict(net)
            if m.head is not None:
                m.head.load_state_dict(head)
            m.optimizer.load_state_dict(opt)
            m.scheduler.load_state_dict(sched)
        self.epoch = state["epoch"]
        self.step = state["step"]
        self.best_acc = state["best_acc"]
        if self.step:
            epoch_state = state["epoch_state"]
            self.order = epoch_state["order"]
            self.sums = {k: v.to(self.device) for k, v in epoch_state["sums"].items()}
            self.ctx.alpha_seen = epoch_state["alpha_seen"].to(self.device)
            self.ctx.total_seen = epoch_state["total_seen"].to(self.device)
            self.ctx.skipped_steps = epoch_state["skipped_steps"]
        set_rng_state(state["rng"])

    def _epoch_state(self) -> dict[str, Any]:
        return {"order": self.order, "sums": {k: torch.as_tensor(v).cpu() for k, v in self.sums.items()},
                "alpha_seen": self.ctx.alpha_seen.cpu(), "total_seen": self.ctx.total_seen.cpu(),
                "skipped_steps": self.ctx.skipped_steps}

    # ---- the loop ----------------------------------------------------------------------------------
    def _begin_epoch(self) -> None:
        n = len(self.data.noisy_labels)
        self.order = torch.randperm(n)  # CPU generator: the same order on every device
        self.sums = {}
        self.ctx.alpha_seen = torch.full((n,), float("nan"), device=self.device)
        self.ctx.total_seen = torch.full((n,), float("nan"), device=self.device)
        self.ctx.skipped_steps = 0

    def train_epoch(self) -> dict[str, float]:
        """Run (the rest of) the current epoch; returns the epoch's mean logs. Resumes mid-epoch if needed."""
        batch_size = min(self.cfg.batch_size, len(self.data.noisy_labels))
        # the last partial batch is dropped: BN and the batch-level normalisations want full batches
        steps = len(self.data.noisy_labels) // batch_size
        if self.step == 0:
            self._begin_epoch()
        for m in self.members:
            m.net.train()
        bar = tqdm(range(self.step, steps), desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                   disable=not self.progress, leave=False, dynamic_ncols=True, initial=self.step, total=steps)
        for step in bar:
            if self.stop_requested:
                raise TrainingInterrupted(self.epoch, step)
            index = self.order[step * batch_size:(step + 1) * batch_size].to(self.device)
            batch = StepInputs(self.data.images[index], self.data.noisy_labels[index], index,
                               epoch=self.epoch + step / steps)
            try:
                logs = self.step_fn(self.ctx, self.members, batch)
            except NonFiniteLoss as err:
                raise UserError(f"non-finite loss at epoch {self.epoch + 1}, step {step + 1} (terms: {err}); "
                                f"the last good checkpoint is {self.run_dir / 'last.pt'}; lower --lr, or "
                                "--set on_nonfinite=skip to skip such steps") from None
            for key, value in logs.items():
                self.sums[key] = self.sums.get(key, 0) + value
            self.step = step + 1
        self.step = 0
        row = {key: (value / steps).item() for key, value in self.sums.items()}
        row["alpha_auroc"] = _auroc(self.ctx.alpha_seen, self.data.is_clean)
        row["T_auroc"] = _auroc(self.ctx.total_seen, self.data.is_clean)
        row["skipped_steps"] = self.ctx.skipped_steps
        return row

    def _check_weights(self) -> None:
        for k, m in enumerate(self.members):
            if not all(torch.isfinite(p).all() for p in m.net.parameters()):
                raise UserError(f"net {k + 1} has non-finite weights after epoch {self.epoch}; not saving them: "
                                f"the last good checkpoint is {self.run_dir / 'last.pt'}")

    def save(self) -> None:
        save_checkpoint(self.state_dict(), self.run_dir / "last.pt")

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        log.info("training %s (%s, %s) for %d epochs on %s", cfg.method, cfg.model, cfg.dataset, cfg.epochs,
                 self.device)
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
            row.update(test_accuracies(self.members, self.data, self.augment, cfg.eval_batch_size))
            row = {"epoch": self.epoch, "lr": lr, **row, "epoch_time_s": time.perf_counter() - started}
            self.metrics.append({k: _format(v) for k, v in row.items()})
            is_best = row["acc_ensemble"] > self.best_acc
            self.best_acc = max(self.best_acc, row["acc_ensemble"])
            self.save()
            if is_best:
                shutil.copyfile(self.run_dir / "last.pt", self.run_dir / ".best.pt.tmp")
                (self.run_dir / ".best.pt.tmp").replace(self.run_dir / "best.pt")
            log.info("epoch %d/%d  loss %.4f  acc %.2f (net1 %.2f)  alpha-AUROC %.1f  %.1fs", self.epoch, cfg.epochs,
                     row["loss"], row["acc_ensemble"], row["acc_net1"], row["alpha_auroc"], row["epoch_time_s"])
        return {"epochs": self.epoch, "best_acc": self.best_acc, "run_dir": str(self.run_dir)}


class TrainingInterrupted(Exception):
    def __init__(self, epoch: int, step: int):
        super().__init__(f"epoch {epoch + 1}, step {step}")
        self.epoch, self.step = epoch, step


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("hrp_ood").addHandler(handler)
    return handler


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (run_dir / "last.pt").exists():
            raise UserError(f"--resume: no checkpoint {run_dir / 'last.pt'} to resume from; drop --resume to start")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise UserError(f"run folder {run_dir} already holds a run; pass --resume to continue it or "
                            "--overwrite to replace it")
        shutil.rmtree(run_dir)


RESUMABLE = ("epochs", "device", "on_nonfinite", "eval_batch_size")


def resume_config(run_dir: Path, requested: TrainConfig, explicit: set[str]) -> TrainConfig:
    """The saved config of the run; only the run-time policies in RESUMABLE may change on resume."""
    state = load_checkpoint(run_dir / "last.pt")
    saved = state["config"]
    changed = sorted(k for k in explicit - {*RESUMABLE, "name", "out_dir"}
                     if getattr(requested, k) != saved.get(k))
    if changed:
        raise UserError(f"--resume continues {run_dir} with its saved config; {', '.join(changed)} differ(s) from it: "
                        "start a new run (--name) to change them")
    saved.update({k: getattr(requested, k) for k in RESUMABLE if k in explicit})
    return TrainConfig(**saved)


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


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, explicit: set[str] = frozenset(),
          progress: bool | None = None) -> dict[str, Any]:
    """`hrp-ood train`: create or resume `cfg.out_dir/cfg.run_name` and train to `cfg.epochs`."""
    run_dir = Path(cfg.out_dir) / cfg.run_name
    _check_run_dir(run_dir, resume, overwrite)
    if resume:
        cfg = resume_config(run_dir, cfg, set(explicit))
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _setup_logging(run_dir)
    try:
        seed_everything(cfg.seed, cfg.deterministic)
        save_config(cfg, run_dir / "config.yaml")
        try:
            trainer = Trainer(cfg, run_dir, progress=progress)
        except BaseException:
            if created:  # a run that never started leaves no folder behind to block the corrected retry
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if resume:
            trainer.load_state_dict(load_checkpoint(run_dir / "last.pt", map_location=trainer.device))
            log.info("resumed %s at epoch %d, step %d", run_dir, trainer.epoch, trainer.step)
        with _stop_on_signals(trainer) as received:
            try:
                return trainer.fit()
            except TrainingInterrupted as where:
                raise Interrupted(
                    f"{received[0]} at {where}: state saved to {run_dir / 'last.pt'}; resume with: "
                    f"hrp-ood train --out-dir {cfg.out_dir} --name {cfg.run_name} --resume",
                    exit_code=128 + getattr(signal, received[0]),
                ) from None
    finally:
        logging.getLogger("hrp_ood").removeHandler(handler)
        handler.close()
