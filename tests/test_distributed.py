"""Data-parallel training (torchrun, DDP, gloo on CPU): the reduction helpers, the equivalence of one HRP step on
2 ranks × b samples with one process on the same 2b samples, and a 2-process `hrp-ood train` that resumes."""

from __future__ import annotations

import csv
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_train_args
from fakes import write_cifar10
from hrp_ood.train.tensorboard import available as tensorboard_available
from hrp_ood.train.trainer import build_members, wrap_data_parallel

import hrp_ood.trainers.hrp as steps_module
from hrp_ood import distributed
from hrp_ood.checkpoint import load_checkpoint
from hrp_ood.cli import main
from hrp_ood.config import build_config
from hrp_ood.data.augment import BatchAugment
from hrp_ood.eval.network import load_network
from hrp_ood.method import reliability_mixup
from hrp_ood.trainers.base import StepContext, StepInputs
from hrp_ood.trainers.hrp import step as hrp_step
from hrp_ood.trainers.signals import EpochSignals

pytestmark = pytest.mark.slow  # end-to-end: left out by `pytest -m "not slow"`

RANKS, LOCAL_BATCH, META = 2, 12, 8
CLASSES = 10


# ---- the helpers are identities in one process --------------------------------------------------------
def test_helpers_are_identities_in_one_process():
    assert not dist.is_initialized()
    t = torch.randn(5, 3, requires_grad=True)
    for reduce in (
        distributed.global_sum,
        distributed.global_min,
        distributed.global_max,
        distributed.all_gather_with_grad,
        distributed.all_gather,
        distributed.broadcast_from_main,
    ):
        assert reduce(t) is t
    grads = {"w": torch.randn(3, 3)}
    assert distributed.global_mean_of_grads(grads) is grads
    assert distributed.global_count(7) == 7
    assert torch.equal(distributed.per_rank_count(torch.tensor(0.0)), torch.tensor(1.0))
    assert torch.equal(distributed.per_rank_count(torch.tensor(4.0)), torch.tensor(4.0))
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.rank_seed(3, 0) == 3 and distributed.rank_seed(3, 1) != distributed.rank_seed(3, 2)
    assert distributed.on_main(lambda: 42) == 42 and distributed.main_first(lambda: "x") == "x"
    assert distributed.init_from_env() is False


def test_global_batch_norm_is_batch_norm_in_one_process():
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    converted = distributed.convert_to_global_batch_norm(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    )
    converted.load_state_dict(plain.state_dict())
    assert isinstance(converted[1], distributed.GlobalBatchNorm)
    x = torch.randn(6, 3, 8, 8)
    assert torch.equal(plain(x), converted(x))
    assert plain.state_dict().keys() == converted.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, converted.state_dict()[key]), key


# ---- one HRP step: 2 ranks × b == 1 process × 2b --------------------------------------------------------
class FixedViews(BatchAugment):
    """Deterministic float64 views, identical in every process: weak = the image, strong = its mirror image."""

    def weak(self, images):
        return self.normalize(images).double()

    def strong(self, images):
        return self.normalize(images.flip(-1)).double()


def step_inputs():
    g = torch.Generator().manual_seed(1)
    n = RANKS * LOCAL_BATCH
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    meta_images = torch.randint(0, 256, (META, 3, 32, 32), dtype=torch.uint8, generator=g)
    meta_labels = torch.arange(META) % CLASSES
    # per (member, rank): a partner permutation within the rank's slice and the λ of every pair
    perms = [[torch.randperm(LOCAL_BATCH, generator=g) for _ in range(RANKS)] for _ in range(2)]
    lams = [[torch.rand(LOCAL_BATCH, generator=g) for _ in range(RANKS)] for _ in range(2)]
    return images, labels, meta_images, meta_labels, perms, lams


# name -> config overrides: the calibrated meta loss fits (s, b) on the whole meta batch; the meta-weighted CE
# trains on every sample with globally normalised α, β
VARIANTS = {
    "jvp": {"meta_method": "jvp"},
    "double_backward": {"meta_method": "double_backward"},
    "jvp_calibrated": {"meta_method": "jvp", "meta_calibration": True},
    "jvp_meta_weighted": {"meta_method": "jvp", "ce_loss": "meta_weighted"},
}


def run_step(variant, ranks_slice, perms, lams):
    """One hrp_step; returns per-parameter gradients and new values, logs, per-sample α/T and the RAM draws."""
    images, labels, meta_images, meta_labels, _, _ = step_inputs()
    cfg = build_config(
        overrides={
            "model": "small_cnn",
            "batch_size": RANKS * LOCAL_BATCH,
            "meta_batch_size": META,
            "warmup_epochs": 0,
            "ramp_epochs": 0,
            "proj_hidden_dim": 32,
            "proj_dim": 16,
            "tau_conf": 0.13,
            "tau_match": 0.5,
            "strong_policy": "none",
            "sync_bn": True,
            "device": "cpu",
            **VARIANTS[variant],
        }
    )
    torch.manual_seed(0)  # the same initial weights in every process (DDP would broadcast rank 0's anyway)
    members = build_members(cfg, CLASSES, torch.device("cpu"))
    for m in members:  # float64, so that the comparison sees the maths, not float32 summation order
        m.net.double(), m.head.double()
    wrap_data_parallel(members, cfg, torch.device("cpu"))
    augment = FixedViews((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32, strong_policy="none")
    ctx = StepContext(cfg, augment, meta_images, meta_labels, autocast_device=None)
    ctx.signals = EpochSignals(len(labels), CLASSES, dtype=torch.float64)
    draws = []

    def replayed_mixup(inputs, targets, T, kappa, **kw):
        member = len(draws)
        mixed = reliability_mixup(inputs, targets, T, kappa, perm=perms[member], lam=lams[member], **kw)
        draws.append({"T": T, "gate": mixed.gate})
        return mixed

    original, steps_module.reliability_mixup = steps_module.reliability_mixup, replayed_mixup
    try:
        index = ranks_slice
        logs = hrp_step(ctx, members, StepInputs(images[index], labels[index], index, epoch=1.0))
    finally:
        steps_module.reliability_mixup = original
    params = [
        (f"{k}.{name}", p)
        for k, m in enumerate(members)
        for name, p in [*m.net.named_parameters(), *m.head.named_parameters()]
    ]
    return {
        "grads": {name: p.grad.clone() for name, p in params},
        "params": {name: p.detach().clone() for name, p in params},
        "logs": {k: v.item() for k, v in logs.items()},
        "alpha": ctx.signals.values["alpha"][index],
        "T": ctx.signals.values["T"][index],
        "draws": draws,
        "buffers": {f"{k}.{name}": b.clone() for k, m in enumerate(members) for name, b in m.net.named_buffers()},
    }


def rank_worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    try:
        _, _, _, _, perms, lams = step_inputs()
        local = torch.arange(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {
            method: run_step(method, local, [perms[0][rank], perms[1][rank]], [lams[0][rank], lams[1][rank]])
            for method in VARIANTS
        }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(rank_worker, args=(free_port(), str(out)), nprocs=RANKS, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(RANKS)]


@pytest.mark.parametrize("meta_method", list(VARIANTS))
def test_two_ranks_make_the_one_process_update(meta_method, two_rank_results):
    _, _, _, _, perms, lams = step_inputs()
    block_perm = [torch.cat([p + r * LOCAL_BATCH for r, p in enumerate(perms[k])]) for k in range(2)]
    single = run_step(
        meta_method, torch.arange(RANKS * LOCAL_BATCH), block_perm, [torch.cat(lams[k]) for k in range(2)]
    )
    ranks = [r[meta_method] for r in two_rank_results]
    close = {"rtol": 1e-7, "atol": 1e-10}

    for name, grad in single["grads"].items():
        for r in ranks:  # DDP's averaged gradient is the one-process gradient, on every rank
            torch.testing.assert_close(r["grads"][name], grad, **close, msg=name)
            torch.testing.assert_close(r["params"][name], single["params"][name], **close, msg=name)
    for name, buffer in single["buffers"].items():  # synchronised BN: the same running statistics
        torch.testing.assert_close(ranks[0]["buffers"][name], buffer, **close, msg=name)
    torch.testing.assert_close(torch.cat([r["alpha"] for r in ranks]), single["alpha"], **close)
    torch.testing.assert_close(torch.cat([r["T"] for r in ranks]), single["T"], **close)
    for k in range(2):
        for key in ("T", "gate"):
            torch.testing.assert_close(torch.cat([r["draws"][k][key] for r in ranks]), single["draws"][k][key], **close)
    for key, value in single["logs"].items():  # rank-local logs average to the global batch's value
        mean = sum(r["logs"][key] for r in ranks) / RANKS
        assert mean == pytest.approx(value, rel=1e-7, abs=1e-10), key
    # the step exercised every term (a vacuous equality would prove nothing)
    assert single["logs"]["loss_cdcl"] != 0 and 0 < single["logs"]["high_conf"] < 1
    assert single["logs"]["loss_ram"] > 0 and single["logs"]["loss_cons"] > 0
    assert single["alpha"].std() > 0


# ---- `hrp-ood train --nproc 2`, resume, load into one process ------------------------------------------
TINY = tiny_train_args(hrp=True)


def read_metrics(run):
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_two_process_training_resumes_and_loads_into_one_process(tmp_path, capsys):
    split = write_cifar10(tmp_path / "data", n_train=200, n_test=60, seed=0)
    args = [
        "train",
        "--data-root",
        str(tmp_path / "data"),
        "--noise",
        "sym50",
        "--epochs",
        "2",
        "--out-dir",
        str(tmp_path / "runs"),
        "--name",
        "run",
        "--nproc",
        "2",
        "--sync-bn",
        *TINY,
    ]
    assert main(args) == 0
    run = tmp_path / "runs" / "run"
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [
            ".lock",
            "config.yaml",
            "noise.npz",
            "meta_indices.npz",
            "metrics.csv",
            "train.log",
            "last.pt",
            "best.pt",
            "signals",
            *(["tb"] if tensorboard_available() else []),
        ]
    )
    if tensorboard_available():
        assert len(list((run / "tb").iterdir())) == 1, "rank 0 alone writes TensorBoard events"
    assert [p.name for p in (run / "signals").iterdir()] == ["epoch_0002.npz"]  # written once, by rank 0
    assert [r["epoch"] for r in read_metrics(run)] == ["1", "2"]  # one writer: no duplicated rows
    assert (run / "train.log").read_text().count("epoch 2/2") == 1

    assert (
        main(
            [
                "train",
                "--out-dir",
                str(tmp_path / "runs"),
                "--name",
                "run",
                "--resume",
                "--epochs",
                "3",
                "--nproc",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 3 and state["world_size"] == 2 and len(state["rank_rng"]) == 2
    assert not any(key.startswith("module.") for net in state["nets"] for key in net)

    # the 2-process checkpoint in a one-process network reproduces the accuracy the 2 ranks measured together
    net, state = load_network(run / "last.pt", "ensemble")
    x = BatchAugment(state["dataset"]["mean"], state["dataset"]["std"], 32).normalize(
        torch.as_tensor(split.test_images)
    )
    with torch.no_grad():
        accuracy = 100.0 * (net(x).argmax(dim=1) == torch.as_tensor(split.test_labels)).float().mean().item()
    assert accuracy == pytest.approx(float(rows[-1]["acc_ensemble"]), abs=1e-3)


def test_a_failing_process_of_a_launched_run_is_one_error_line(tmp_path, capsys):
    """`train --nproc 2` goes through distributed.launch (as `sweep --nproc`): a child's UserError comes back as
    the command's one error line, its text intact, without elastic's multi-line report."""
    args = ["train", "--data-root", str(tmp_path / "nothing"), "--epochs", "1", "--out-dir", str(tmp_path / "runs")]
    assert main([*args, "--nproc", "2", *TINY]) == 2
    err = capsys.readouterr().err
    # both processes fail on the missing data (rank 0 finds it, then tells rank 1); which one the launcher reports
    # first depends on the scheduler
    assert re.match(
        r"hrp-ood train: error: process [01] of 2 failed \(exit code 1\): cifar10 not found", err.splitlines()[-1]
    )
    assert "Traceback" not in err and "py_callstack" not in err
