"""Cost and exactness of the meta-reliability step (SPEC §3.1) for each way of computing it.

    python benchmarks/meta_grad.py [--quick] [--device cpu|cuda] [--batch 128] [--repeats 5]

Methods: ``jvp`` (one reverse pass for ∇L_meta, one forward-mode pass of the logits), ``double_backward``
(L2B-style differentiation through the virtual SGD step) and ``reference``: a brute-force loop of 2n
per-sample backward passes, α̃_i = (η/n)⟨∇L_meta, ∇ℓ_i(ỹ_i)⟩ (and β̃ with ŷ), clamped at 0. Each method
is timed (median of --repeats after two warm-up calls) and compared with one plain training step
(zero_grad, forward, CE backward, SGD step) on the same batch; errors are max|got − ref| / max|ref| over
α̃ and β̃. Models: a small conv-BN CNN, and (without --quick) PreAct ResNet-18 from the package registry,
or a local ResNet-ish stand-in when the registry is not importable.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hrp_ood.method import meta_reliabilities

NUM_CLASSES = 10
LR = 0.05


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks and a linear head (~0.1 M parameters)."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.body = nn.Sequential(
            block(3, width), block(width, 2 * width), block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class LocalResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: the stand-in when hrp_ood.models is not available."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
        c_in = 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [ResidualBlock(c_in, c_out, stride), ResidualBlock(c_out, c_out, 1)]
            c_in = c_out
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def resnet18() -> tuple[str, nn.Module]:
    try:
        from hrp_ood.models import create_model

        return "preact_resnet18", create_model("preact_resnet18", num_classes=NUM_CLASSES)
    except (ImportError, KeyError, ValueError):
        return "local_resnet18", LocalResNet18()


def reference_raw(model: nn.Module, x, noisy, pseudo, meta_x, meta_y, lr: float) -> tuple[torch.Tensor, ...]:
    """Brute force: one backward per sample and label, inner product with ∇L_meta (SPEC §3.1 identity)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    meta_grad = torch.autograd.grad(F.cross_entropy(model(meta_x), meta_y), params, allow_unused=True)
    model.train()
    logits = functional_call(model, {k: b.clone() for k, b in model.named_buffers()}, (x,))
    n = x.shape[0]
    raws = []
    for labels in (noisy, pseudo):
        losses = F.cross_entropy(logits, labels, reduction="none")
        values = torch.zeros(n, device=x.device)
        for i in range(n):
            grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
            values[i] = sum((a * b).sum() for a, b in zip(meta_grad, grads) if a is not None and b is not None)
        raws.append((lr / n * values).clamp_min(0))
    return tuple(raws)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per function, timed round-robin so machine noise hits every function alike."""
    for fn in fns.values():  # warm-up: allocator, cudnn autotune, lazy init
        fn(), fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def benchmark(name: str, model: nn.Module, batch: int, device: torch.device, repeats: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    x, meta_x = (torch.randn(batch, 3, 32, 32, generator=gen).to(device) for _ in range(2))
    noisy, pseudo, meta_y = (torch.randint(NUM_CLASSES, (batch,), generator=gen).to(device) for _ in range(3))
    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def plain_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), noisy).backward()
        optimizer.step()

    def reliabilities(method: str):
        return meta_reliabilities(model, x, noisy, pseudo, meta_x, meta_y, LR, method=method)

    methods = ("jvp", "double_backward")
    medians = interleaved_medians(
        {"plain": plain_step, **{m: partial(reliabilities, m) for m in methods}}, repeats, device
    )
    optimizer.zero_grad(set_to_none=True)
    base = medians.pop("plain")
    # The reference is 2n backward passes: one timed run (warm-up is negligible next to that).
    references: list[tuple[torch.Tensor, ...]] = []
    medians["reference"] = seconds(
        lambda: references.append(reference_raw(model, x, noisy, pseudo, meta_x, meta_y, LR)), device
    )
    ref_alpha, ref_beta = references[0]

    print(
        f"{name}: batch {batch}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
        f"plain train step {1e3 * base:.1f} ms"
    )
    for method, took in medians.items():
        error = ""
        if method != "reference":
            rel = reliabilities(method)
            worst = max(
                ((rel.alpha_raw - ref_alpha).abs().max() / ref_alpha.abs().max()).item(),
                ((rel.beta_raw - ref_beta).abs().max() / ref_beta.abs().max()).item(),
            )
            error = f"  max rel err {worst:.2e}"
        print(f"  {method:16s} {1e3 * took:9.1f} ms  {took / base:6.2f}x plain step{error}")
    ratios = {method: took / base for method, took in medians.items()}
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CNN only, small batch (a few seconds on CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="batch and meta-batch size (default 16 quick, 128)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    batch = args.batch or (16 if args.quick else 128)
    torch.manual_seed(0)  # model initialisation; this is a script, not library code

    print(
        f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
        f"{torch.get_num_threads()} threads"
    )
    models = [("small_cnn", SmallCNN(width=16 if args.quick else 32))]
    if not args.quick:
        models.append(resnet18())
    summary = []
    for name, model in models:
        ratios = benchmark(name, model, batch, device, args.repeats)
        summary.append(f"{name} " + " ".join(f"{m}={r:.2f}x" for m, r in ratios.items()))
    print("time / plain train step: " + "; ".join(summary))


if __name__ == "__main__":
    main()
