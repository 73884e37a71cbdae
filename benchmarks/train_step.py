"""Cost of one HRP iteration (both networks) against its baselines and the comparison methods, side by side in one
process.

    python benchmarks/train_step.py [--quick] [--device cpu|cuda] [--models small_cnn,preact_resnet18]
        [--epoch-samples N]

Methods compared on the same backbone, batch and data: `hrp` (full, meta step on), `hrp_no_meta`
(α = β = 1: the same losses without the meta step), `base` (Table 4's Base), `coteach`, `ce`. The paper reports
HRP at ≈ 1.3× its baseline's training time and < 10% more GPU memory. Timings are interleaved round-robin
and the median per method is reported, so machine noise hits every method alike. Peak memory: CUDA max
allocated on a GPU; on CPU the peak RSS growth of a fresh subprocess per method.

Per epoch (`--epoch-samples N`, 0 to skip): one epoch after the warm-up of every method in EPOCH_METHODS through the
trainer itself, on N random training images (1,000 more as the meta set): the method's pass over the training set
before the epoch (DivideMix's evaluation pass and GMM, UNICON's JSD, ProMix's selection; none for the others),
its steps (ms per iteration: the steps' time over their count, which differs between methods: DivideMix trains
each network on its labeled rows), and the whole epoch against CE's; `hrp_double_backward` is HRP with the
meta-gradient by double backward instead of forward-mode AD (`meta_method`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from hrp_ood.train import trainer as trainer_module
from hrp_ood.train.data import TrainingData
from hrp_ood.train.trainer import Trainer, build_members

from hrp_ood.config import build_config
from hrp_ood.data.augment import BatchAugment
from hrp_ood.trainers.base import StepContext, StepInputs

METHODS = ("hrp", "hrp_no_meta", "base", "coteach", "ce")
# name → (method, extra config): the per-epoch comparison
EPOCH_METHODS = {
    "ce": ("ce", {}),
    "hrp": ("hrp", {}),
    "hrp_double_backward": ("hrp", {"meta_method": "double_backward"}),
    "dividemix": ("dividemix", {}),
    "l2b": ("l2b", {}),
    "unicon": ("unicon", {}),
    "promix": ("promix", {}),
}


def make_step(model: str, method: str, batch: int, device: torch.device, num_classes: int = 10):
    """A closure running one training iteration of `method` on a fixed random batch."""
    cfg = build_config(
        overrides={
            "model": model,
            "method": method,
            "batch_size": batch,
            "meta_batch_size": batch,
            "warmup_epochs": 0,
            "ramp_epochs": 0,
            "device": str(device),
            "on_nonfinite": "skip",
        }
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    meta_images = torch.randint(0, 256, (4 * batch, 3, 32, 32), dtype=torch.uint8, generator=generator).to(device)
    meta_labels = torch.randint(0, num_classes, (4 * batch,), generator=generator).to(device)
    members = build_members(cfg, num_classes, device)
    augment = BatchAugment((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32, strong_policy=cfg.strong_policy)
    amp = "cuda" if device.type == "cuda" else None
    ctx = StepContext(cfg, augment, meta_images, meta_labels, autocast_device=amp, forget_rate=0.5)
    step_fn = cfg.spec.implementation().step
    batch_inputs = StepInputs(images, labels, torch.arange(batch, device=device), epoch=5.0)

    def step() -> None:
        step_fn(ctx, members, batch_inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def time_methods(model: str, batch: int, device: torch.device, rounds: int) -> dict[str, float]:
    steps = {m: make_step(model, m, batch, device) for m in METHODS}
    for step in steps.values():  # warm-up: allocator, cudnn autotune, lazy init
        step()
        step()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(rounds):
        for method, step in steps.items():
            start = time.perf_counter()
            step()
            times[method].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def synthetic_data(samples: int, device: torch.device, num_classes: int = 10, meta: int = 1000) -> TrainingData:
    """Random 32x32 images with half their labels flipped, a meta set and a small test set, on the device."""
    generator = torch.Generator().manual_seed(0)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator).to(device)

    def labels(n: int) -> torch.Tensor:
        return torch.randint(0, num_classes, (n,), generator=generator).to(device)

    clean = labels(samples)
    noisy = torch.where(torch.rand(samples, generator=generator).to(device) < 0.5, labels(samples), clean)
    return TrainingData(
        "synthetic", [str(c) for c in range(num_classes)], (0.5,) * 3, (0.25,) * 3, 32,
        images(samples), noisy, clean, images(meta), labels(meta), images(512), labels(512), 0.5,
    )  # fmt: skip


def time_epoch(model: str, name: str, batch: int, data: TrainingData, device: torch.device) -> dict[str, float]:
    """One post-warm-up epoch of EPOCH_METHODS[name] through the trainer: its pass over the set, its steps."""
    method, extra = EPOCH_METHODS[name]
    overrides = {"model": model, "method": method, "batch_size": batch, "meta_batch_size": batch,
                 "warmup_epochs": 0, "ramp_epochs": 0, "device": str(device), "tensorboard": False,
                 "meta_size": len(data.meta_labels), "on_nonfinite": "skip", **extra}  # fmt: skip
    cfg = build_config(overrides=overrides)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with (
        tempfile.TemporaryDirectory() as run_dir,
        mock.patch.object(trainer_module, "prepare_training_data") as data_fn,
    ):
        data_fn.return_value = data
        trainer = Trainer(cfg, Path(run_dir), progress=False)
        start = time.perf_counter()
        trainer._begin_epoch()  # the method's pass over the training set and the epoch's plan
        _synchronize(device)
        planned = time.perf_counter()
        with mock.patch.object(trainer, "_begin_epoch"):
            trainer.train_epoch()
        _synchronize(device)
        done = time.perf_counter()
    steps = trainer.plan.steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"pass_s": planned - start, "steps": steps, "ms_per_iter": 1000 * (done - planned) / steps,
            "epoch_s": done - start, "peak_mb": peak}  # fmt: skip


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_epochs(model: str, batch: int, samples: int, device: torch.device) -> dict[str, dict[str, float]]:
    data = synthetic_data(samples, device)
    time_epoch(model, "ce", batch, data, device)  # warm-up: allocator, cudnn autotune, lazy init
    results = {name: time_epoch(model, name, batch, data, device) for name in EPOCH_METHODS}
    for row in results.values():
        row["epoch_over_ce"] = row["epoch_s"] / results["ce"]["epoch_s"]
    print(f"\n{model}, one epoch of {samples} images, batch {batch}")
    print(f"{'method':<22}{'pass s':>9}{'steps':>7}{'ms/iter':>10}{'epoch s':>10}{'x ce':>8}{'peak MB':>10}")
    for name, r in results.items():
        print(f"{name:<22}{r['pass_s']:>9.2f}{r['steps']:>7}{r['ms_per_iter']:>10.1f}{r['epoch_s']:>10.2f}"
              f"{r['epoch_over_ce']:>8.2f}{r['peak_mb']:>10.1f}")  # fmt: skip
    return results


def rss_kb(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset), in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def peak_memory_mb(model: str, method: str, batch: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
        step = make_step(model, method, batch, device)
        step()
        step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # CPU: a fresh process per method; the kernel's peak-RSS mark (VmHWM) is reset after the imports
    # (writing 5 to /proc/self/clear_refs), so the peak is the step's own
    code = (
        "import torch, sys; sys.argv=['x'];"
        "from benchmarks.train_step import make_step, rss_kb;"
        "open('/proc/self/clear_refs', 'w').write('5'); base = rss_kb('VmRSS');"
        f"s=make_step({model!r}, {method!r}, {batch}, torch.device('cpu')); s(); s();"
        "print((rss_kb('VmHWM') - base) / 1024)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CNN, small batch, few rounds (CI smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="small_cnn,preact_resnet18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    parser.add_argument("--epoch-samples", type=int, default=4096, help="images of the per-epoch comparison (0: skip)")
    args = parser.parse_args()
    if args.quick:
        args.models, args.batch, args.rounds, args.no_memory = "small_cnn", 32, 3, True
        args.epoch_samples = min(args.epoch_samples, 256)
    device = torch.device(args.device)
    print(
        f"# train_step: torch {torch.__version__}, device {device}, batch {args.batch}, "
        f"median of {args.rounds} interleaved rounds, threads {torch.get_num_threads()}"
    )
    results = {}
    for model in args.models.split(","):
        times = time_methods(model, args.batch, device, args.rounds)
        memory = {m: float("nan") if args.no_memory else peak_memory_mb(model, m, args.batch, device) for m in METHODS}
        print(f"\n{model}\n{'method':<14}{'ms/iter':>10}{'x ce':>8}{'peak MB':>10}")
        for m in METHODS:
            print(f"{m:<14}{1000 * times[m]:>10.1f}{times[m] / times['ce']:>8.2f}{memory[m]:>10.1f}")
        results[model] = {
            "time_s": times,
            "peak_mb": memory,
            **{f"hrp_over_{m}": times["hrp"] / times[m] for m in METHODS if m != "hrp"},
        }
        if args.epoch_samples:
            results[model]["epochs"] = time_epochs(model, args.batch, args.epoch_samples, device)
    print(
        "\nratios: "
        + "; ".join(
            f"{model}: hrp/base {r['hrp_over_base']:.2f}x, hrp/ce {r['hrp_over_ce']:.2f}x, "
            f"hrp/no-meta {r['hrp_over_hrp_no_meta']:.2f}x, hrp/coteach {r['hrp_over_coteach']:.2f}x"
            for model, r in results.items()
        )
    )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
