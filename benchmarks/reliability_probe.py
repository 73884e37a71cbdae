"""Which signal tells a run's clean labels from its corrupted ones, at one checkpoint? (issue #9's α probe)

    python benchmarks/reliability_probe.py RUN_DIR                   # last.pt, network 1, every training sample
    python benchmarks/reliability_probe.py RUN_DIR --checkpoint best.pt --net 2 --limit 2000

For every training sample of the run (its own noise file and meta set) it computes, at the checkpoint's
parameters, the meta-gradient alignment ⟨∇_θ L_meta, ∇_θ ℓ(x_i, ỹ_i)⟩ (= −∂L_meta/∂ε^α_i up to η/n, Eq. 4
before the clamp) in three forms, and the per-sample CE loss of the same network:

* `alpha_batch`: as in training — weak view, train-mode BN, a fresh random meta batch per training batch;
* `alpha_meta_set`: the whole meta set (un-augmented) gives the meta gradient, so meta-batch noise is gone;
* `alpha_calibrated`: the same, with the meta loss taken at the temperature T* and class biases b* that
  minimise it on the meta set (CE(z/T* + b*, y); what training does with `meta_calibration=true`, there per
  meta batch). At that optimum the meta gradient has no component that
  only rescales the logits or shifts the class marginals, so what remains is class-specific information;
* `small_loss`: −ℓ(x_i, ỹ_i), the signal the co-teaching baselines select with.

Printed: the AUROC (×100) of each signal for "label clean" (higher = clean), over all samples, after Eq. 4's
clamp at 0, and averaged within each given-label class (class offsets removed), and the meta-set T*; and the
anatomy of each meta-gradient signal: the share of the clamped reliability mass that lands on clean labels, how
often its sign is positive for clean and for corrupted labels, and how well its magnitude alone separates them.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hrp_ood.train.trainer import Trainer, seed_everything
from sklearn.metrics import roc_auc_score

from hrp_ood.config import read_yaml, saved_config
from hrp_ood.method.reliability import fit_calibration, logit_changes, meta_gradient, signed_alignment

SIGNALS = ("alpha_batch", "alpha_meta_set", "alpha_calibrated", "small_loss")


def load_run(run_dir: Path, checkpoint: str, device: str) -> Trainer:
    """The run's trainer (its data, noise file and meta set, read from the folder) at ``checkpoint``."""
    config = {
        **read_yaml(run_dir / "config.yaml"),
        "device": device,
        "out_dir": str(run_dir.parent),
        "name": run_dir.name,
    }
    trainer = Trainer(saved_config(config, run_dir), run_dir, progress=False)
    state = torch.load(run_dir / checkpoint, map_location=trainer.device, weights_only=False)
    for member, net in zip(trainer.members, state["nets"]):
        member.net.load_state_dict(net)
    print(
        f"{run_dir.name}: {checkpoint} (epoch {state['epoch']}), noise {trainer.cfg.noise}, "
        f"{trainer.data.is_clean.float().mean():.1%} of labels clean"
    )
    return trainer


def probe(trainer: Trainer, net_index: int, limit: int | None, seed: int) -> dict[str, np.ndarray]:
    """Every signal of SIGNALS for the first ``limit`` samples of a seeded permutation of the training set."""
    data, augment, cfg = trainer.data, trainer.augment, trainer.cfg
    net = trainer.members[net_index].net
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.noisy_labels), generator=generator)[:limit]
    meta_x = augment.normalize(data.meta_images)
    net.eval()
    with torch.no_grad():
        scale, bias = fit_calibration(net(meta_x).float(), data.meta_labels)
    print(f"meta-set calibration: T* = {1 / scale:.2f}, |b*| max = {bias.abs().max():.2f}")
    directions = {
        "alpha_meta_set": meta_gradient(net, meta_x, data.meta_labels),
        "alpha_calibrated": meta_gradient(net, meta_x, data.meta_labels, calibrated=True),
    }
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in SIGNALS}
    for batch in order.to(data.images.device).split(cfg.batch_size):
        x, labels = augment.weak(data.images[batch]), data.noisy_labels[batch]
        pick = torch.randperm(len(data.meta_labels), generator=generator)[: cfg.meta_batch_size].to(x.device)
        batch_directions = dict(
            directions, alpha_batch=meta_gradient(net, augment.weak(data.meta_images[pick]), data.meta_labels[pick])
        )
        for name, direction in batch_directions.items():
            columns[name].append(signed_alignment(*logit_changes(net, x, direction), labels))
        net.eval()
        with torch.no_grad():
            columns["small_loss"].append(-F.cross_entropy(net(x).float(), labels, reduction="none"))
    return {name: torch.cat(values).cpu().double().numpy() for name, values in columns.items()} | {
        "clean": data.is_clean[order].cpu().numpy(),
        "labels": data.noisy_labels[order].cpu().numpy(),
    }


def auroc(clean: np.ndarray, score: np.ndarray) -> float:
    return 100 * roc_auc_score(clean, score) if 0 < clean.mean() < 1 else math.nan


def class_mean_auroc(clean: np.ndarray, score: np.ndarray, labels: np.ndarray) -> float:
    return float(np.nanmean([auroc(clean[labels == c], score[labels == c]) for c in np.unique(labels)]))


def table(signals: dict[str, np.ndarray]) -> str:
    clean, labels = signals["clean"], signals["labels"]
    lines = [
        "| signal | AUROC | AUROC after the clamp | AUROC within each label class | clamped mass on clean labels "
        "| positive: clean / corrupted | AUROC of −|signal| |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in SIGNALS:
        score = signals[name]
        anatomy = "– | – | –" if name == "small_loss" else sign_and_magnitude(clean, score)
        clamped = auroc(clean, np.maximum(score, 0)) if name != "small_loss" else math.nan
        lines.append(
            f"| {name} | {auroc(clean, score):.1f} | {clamped:.1f} | "
            f"{class_mean_auroc(clean, score, labels):.1f} | {anatomy} |"
        )
    return "\n".join(lines) + f"\n\n{clean.mean():.0%} of the probed labels are clean."


def sign_and_magnitude(clean: np.ndarray, score: np.ndarray) -> str:
    """What Eq. 4's clamp does with a signed meta-gradient: the share of max(score, 0)'s total that lands on clean
    labels, the fraction of positive scores among clean and among corrupted labels (the sign's information), and
    the AUROC of −|score| for "clean" (the magnitude's: corrupted labels the nets do not fit have large gradients)."""
    clean = clean.astype(bool)
    positive = np.maximum(score, 0)
    mass = positive[clean].sum() / positive.sum() if positive.sum() > 0 else math.nan
    return (
        f"{mass:.2f} | {np.mean(score[clean] > 0):.2f} / {np.mean(score[~clean] > 0):.2f} | "
        f"{auroc(clean, -np.abs(score)):.1f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", default="last.pt")
    parser.add_argument("--net", type=int, default=1, help="which network of the run (1 or 2)")
    parser.add_argument("--limit", type=int, default=None, help="probe only this many training samples")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.run_dir / "config.yaml").is_file() or not (args.run_dir / args.checkpoint).is_file():
        sys.exit(
            f"reliability_probe: {args.run_dir} needs config.yaml and {args.checkpoint} (a run folder of hrp-ood train)"
        )
    seed_everything(args.seed, False)
    trainer = load_run(args.run_dir, args.checkpoint, args.device)
    if not 1 <= args.net <= len(trainer.members):
        sys.exit(f"reliability_probe: --net must be between 1 and {len(trainer.members)} for this run")
    print(table(probe(trainer, args.net - 1, args.limit, args.seed)))


if __name__ == "__main__":
    main()
