"""Evaluation cost: every postprocessor from one cached pass vs one pass per postprocessor (OpenOOD's way).

    python benchmarks/evaluate.py [--quick] [--device cpu|cuda] [--model small_cnn]

Measured side by side in one process, on random images (the cost does not depend on the pixels):
  * bare `model(x)` loop over the same images (the floor),
  * `--postprocessor all` (one forward pass per dataset, cached; every postprocessor reads the cache),
  * a single postprocessor (msp),
  * one fresh pass per postprocessor (what OpenOOD does),
  * MDS fit time on 50,000 × 512 features,
  * feature extraction time at 1k / 10k / 50k images (should grow linearly).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hrp_ood.postprocessors import create_postprocessor, list_postprocessors
from hrp_ood.postprocessors.featureset import FeatureSet

from hrp_ood.data import DataBundle
from hrp_ood.eval.evaluate import run_evaluation
from hrp_ood.eval.features import extract_features
from hrp_ood.models import create_model

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def random_images(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def bare_forward(net, images: torch.Tensor, batch_size: int, device: torch.device) -> None:
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float().div_(255).sub_(mean).div_(std)
        net(x)
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    device = torch.device(args.device)
    n_train, n_test, n_ood = (600, 300, 300) if args.quick else (10_000, 5_000, 5_000)
    scaling = (250, 500, 1000) if args.quick else (1_000, 10_000, 50_000)
    mds_shape = (2_000, 128) if args.quick else (50_000, 512)

    generator = torch.Generator().manual_seed(0)
    net = create_model(args.model, num_classes=10).to(device).eval()
    bundle = DataBundle(
        name="random",
        classes=[str(c) for c in range(10)],
        image_size=32,
        train_images=random_images(n_train, generator),
        train_labels=torch.randint(0, 10, (n_train,), generator=generator).numpy(),
        test_images=random_images(n_test, generator),
        test_labels=torch.randint(0, 10, (n_test,), generator=generator).numpy(),
        mean=MEAN,
        std=STD,
    )
    ood = {"a": random_images(n_ood, generator), "b": random_images(n_ood, generator)}
    everything = torch.cat([bundle.train_images, bundle.test_images, *ood.values()])
    all_pps = [p for p in list_postprocessors() if not create_postprocessor(p).needs_network]
    network_pps = [p for p in list_postprocessors() if p not in all_pps]

    def evaluate(postprocessors: list[str]) -> None:
        with tempfile.TemporaryDirectory() as cache:  # a fresh cache: the pass is paid for
            run_evaluation(
                net,
                bundle,
                ood,
                postprocessors,
                cache_dir=Path(cache),
                cache_key="bench",
                device=device,
                batch_size=args.batch_size,
            )

    bare_forward(net, everything[: args.batch_size], args.batch_size, device)  # warm-up
    t_bare = timed(lambda: bare_forward(net, everything, args.batch_size, device))
    t_extract = timed(lambda: extract_features(net, everything, MEAN, STD, batch_size=args.batch_size, device=device))
    t_single = timed(lambda: evaluate(["msp"]))
    t_all = timed(lambda: evaluate(all_pps))
    t_each = sum(timed(lambda p=p: evaluate([p])) for p in all_pps)

    features = np.random.default_rng(0).standard_normal(mds_shape, dtype=np.float32)
    labels = np.arange(mds_shape[0]) % 10
    train = FeatureSet(logits=np.zeros((mds_shape[0], 10), np.float32), features=features, labels=labels)
    fc = (np.zeros((10, mds_shape[1]), np.float32), np.zeros(10, np.float32))
    t_mds = timed(lambda: create_postprocessor("mds").fit(train, fc))

    grow = {
        n: timed(
            lambda n=n: extract_features(
                net, random_images(n, generator), MEAN, STD, batch_size=args.batch_size, device=device
            )
        )
        for n in scaling
    }

    images = len(everything)
    print(
        f"# evaluate: torch {torch.__version__}, device {device}, model {args.model}, {images} images "
        f"({n_train} ID-train, {n_test} ID-test, 2 x {n_ood} OOD), threads {torch.get_num_threads()}"
    )
    print(f"{'what':<44}{'seconds':>9}{'images/s':>10}")
    rows = [
        ("bare model(x) loop", t_bare),
        ("extract_features (one pass, no cache)", t_extract),
        ("evaluate, msp only", t_single),
        (f"evaluate, all {len(all_pps)} cached postprocessors", t_all),
        (f"one pass per postprocessor ({len(all_pps)} passes)", t_each),
    ]
    for name, t in rows:
        print(f"{name:<44}{t:>9.2f}{images / t:>10.0f}")
    print(f"{'MDS fit on %d x %d features' % mds_shape:<44}{t_mds:>9.2f}")
    for n, t in grow.items():
        print(f"{'extract_features, %d images' % n:<44}{t:>9.2f}{n / t:>10.0f}")
    print(f"(not in 'all': {', '.join(network_pps) or 'none'} — input-gradient methods need their own pass)")
    first, last = scaling[0], scaling[-1]
    print(
        f"\nratios: all/single {t_all / t_single:.2f}x; all/one-pass-each {t_all / t_each:.2f}x; "
        f"all/bare-forward {t_all / t_bare:.2f}x; extract throughput/bare {t_bare / t_extract:.2f}; "
        f"time per image {last}/{first} images {(grow[last] / last) / (grow[first] / first):.2f}x"
    )


if __name__ == "__main__":
    main()
