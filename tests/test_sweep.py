"""`hrp-ood sweep`: a digits grid end to end (local worker processes and submitit's LocalExecutor), idempotent
re-runs, a failing run that does not stop the others, and experiment files refused before anything starts."""

from pathlib import Path

import pandas as pd
import pytest
import yaml

from hrp_ood.cli import main
from hrp_ood.sweep import load_experiment, run_sweep
from hrp_ood.sweep_report import accuracy_table

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = {"dataset": "digits", "model": "small_cnn", "device": "cpu", "meta_size": 50, "epochs": 1,
               "batch_size": 64, "meta_batch_size": 50, "lr_milestones": [], "warmup_epochs": 1, "ramp_epochs": 0,
               "proj_hidden_dim": 32, "proj_dim": 16, "strong_policy": "none"}
RUNS = ["noise-sym20__method-ce__seed-0", "noise-sym20__method-hrp__seed-0",
        "noise-sym50__method-ce__seed-0", "noise-sym50__method-hrp__seed-0"]


def write_experiment(folder: Path, **changes) -> Path:
    experiment = {"config": TINY_CONFIG, "grid": {"noise": ["sym20", "sym50"], "method": ["ce", "hrp"], "seed": [0]},
                  "out": str(folder / "out"), "retries": 0,
                  "evaluation": {"ood": ["uniform_noise"], "postprocessors": ["msp", "ebo"]},
                  "report": {"by": "noise", "metrics": ["auroc", "fpr95"]}, **changes}
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The tiny grid swept once with two local worker processes."""
    folder = tmp_path_factory.mktemp("sweep")
    path = write_experiment(folder, evaluation={"ood": ["uniform_noise"], "postprocessors": ["msp", "ebo", "react"]})
    assert main(["sweep", str(path), "--jobs", "2"]) == 0
    return path, folder / "out"


def test_sweep_trains_evaluates_and_reports_every_grid_point(swept):
    _, out = swept
    assert sorted(p.name for p in (out / "runs").iterdir()) == RUNS
    for name in RUNS:
        assert (out / "runs" / name / "last.pt").is_file()
        assert (out / "runs" / name / "eval_ensemble" / "eval.json").is_file()
    report = (out / "report" / "report.md").read_text()
    assert "sym20" in report and "sym50" in report and "hrp" in report
    accuracy = (out / "report" / "accuracy.md").read_text().splitlines()
    assert accuracy[2] == "| method | sym20 | sym50 |" and accuracy[4].startswith("| ce | ")
    for figure in ("noise_curves.png", "accuracy_vs_noise.png"):
        assert (out / "report" / "plots" / figure).stat().st_size > 10_000


def test_accuracy_table_is_mean_and_std_over_seeds():
    frame = pd.DataFrame({"noise": ["sym20", "sym20", "sym80", "sym20"], "method": ["ce", "ce", "ce", "hrp"],
                          "seed": ["0", "1", "0", "0"], "test_acc": [90.0, 92.0, 40.0, 95.0]})
    table = accuracy_table(frame, by="noise")["cell"]
    assert list(table.columns) == ["sym20", "sym80"]
    assert table.loc[("ce",)].tolist() == ["91.00 ± 1.41", "40.00"]
    assert table.loc[("hrp",)].tolist() == ["95.00", "–"]


def test_rerun_trains_nothing_and_a_missing_eval_is_redone_alone(swept, capsys):
    path, out = swept
    checkpoints = {name: (out / "runs" / name / "last.pt").stat().st_mtime_ns for name in RUNS}
    capsys.readouterr()
    assert main(["sweep", str(path)]) == 0
    assert "4 runs, 4 done before" in capsys.readouterr().out
    (out / "runs" / RUNS[1] / "eval_ensemble" / "eval.json").unlink()
    assert main(["sweep", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "4 runs, 3 done before" in printed and f"{RUNS[1]}: evaluated" in printed
    assert checkpoints == {name: (out / "runs" / name / "last.pt").stat().st_mtime_ns for name in RUNS}


def test_status_table(swept, capsys):
    path, _ = swept
    assert main(["sweep", str(path), "--status"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:4] == ["run", "state", "epoch", "test"]
    assert all(" done " in line and "1/1" in line for line in lines[1:5])
    assert lines[-1] == "4 done, 0 running, 0 pending, 0 failed"


def test_an_unfinished_run_resumes_from_its_checkpoint_and_is_evaluated_again(tmp_path, capsys):
    grid = {"noise": ["sym50"], "method": ["ce"], "seed": [0]}
    assert main(["sweep", str(write_experiment(tmp_path, grid=grid))]) == 0
    run = tmp_path / "out" / "runs" / "noise-sym50__method-ce__seed-0"
    first_eval = (run / "eval_ensemble" / "eval.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["sweep", str(write_experiment(tmp_path, grid=grid, config={**TINY_CONFIG, "epochs": 2}))]) == 0
    assert f"{run.name}: trained and evaluated" in capsys.readouterr().out
    assert "resumed" in (tmp_path / "out" / "sweep" / f"{run.name}.log").read_text()
    assert (run / "metrics.csv").read_text().count("\n") == 3  # header and epochs 1, 2
    assert (run / "eval_ensemble" / "eval.json").stat().st_mtime_ns > first_eval


def test_a_failing_run_does_not_stop_the_others(tmp_path, capsys):
    path = write_experiment(tmp_path, grid={"noise": ["sym20", "sym50"], "method": ["ce"], "seed": [0]})
    blocked = tmp_path / "out" / "runs" / "noise-sym20__method-ce__seed-0"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the run folder goes")
    assert main(["sweep", str(path)]) == 1
    assert (tmp_path / "out" / "runs" / "noise-sym50__method-ce__seed-0" / "eval_ensemble" / "eval.json").is_file()
    capsys.readouterr()
    assert main(["sweep", str(path), "--status"]) == 0
    failed = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(blocked.name))
    assert " failed " in failed and "is a file" in failed


def test_the_slurm_path_through_submitits_local_executor(tmp_path):
    path = write_experiment(tmp_path, grid={"noise": ["sym50"], "method": ["hrp"], "seed": [0]})
    experiment = load_experiment(path)
    assert run_sweep(experiment, executor="slurm", submitit_cluster="local") == {}
    assert experiment.eval_json("noise-sym50__method-hrp__seed-0").is_file()
    assert (tmp_path / "out" / "report" / "report.md").is_file()
    assert any((tmp_path / "out" / "sweep" / "submitit").iterdir())


def test_a_local_worker_takes_one_gpu_and_its_share_of_the_threads(monkeypatch):
    import os
    import queue

    import torch

    from hrp_ood.sweep import _init_worker

    slots = queue.Queue()
    slots.put(3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    threads = torch.get_num_threads()
    try:
        _init_worker(1, slots)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3" and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_a_slurm_job_stopped_by_its_time_limit_is_requeued_with_the_same_run():
    from hrp_ood.sweep import SweepJob

    job = SweepJob()
    again = job.checkpoint("experiment.yaml", "out", "noise-sym50__method-hrp__seed-0")
    assert again.function is job and again.args == ("experiment.yaml", "out", "noise-sym50__method-hrp__seed-0")


@pytest.mark.parametrize("changes, words", [
    ({"grids": {}}, "unknown top-level key 'grids'"),
    ({"grid": {"noise": ["sym20", "sym999"]}}, "run noise-sym999"),
    ({"grid": {"methd": ["ce"]}}, "grid key 'methd'"),
    ({"grid": {"name": ["a"]}}, "grid key 'name'"),
    ({"grid": {"seed": []}}, "non-empty list"),
    ({"grid": {"method": ["ce", "nope"]}}, "unknown method 'nope'"),
    ({"config": {"epochs": 0}}, "epochs must be"),
    ({"evaluation": {"ood": ["nowhere"]}}, "unknown evaluation ood set 'nowhere'"),
    ({"evaluation": {"postprocessors": ["msp", "magic"]}}, "postprocessor 'magic'"),
    ({"evaluation": {"ood_dirs": {"mine": "/no/such/folder"}}}, "not found"),
    ({"report": {"by": "colour"}}, "report.by"),
    ({"report": {"metrics": ["auroc", "speed"]}}, "report metric 'speed'"),
    ({"slurm": {"partitions": "gpu"}}, "unknown slurm key"),
    ({"retries": -1}, "retries"),
    ({"base": "missing.yaml"}, "not found"),
])
def test_bad_experiment_files_are_one_line_errors_and_start_nothing(changes, words, tmp_path, capsys):
    path = write_experiment(tmp_path, **changes)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "out").exists()


def test_shipped_experiment_files_are_valid():
    for path in sorted((ROOT / "configs" / "experiments").glob("*.yaml")):
        experiment = load_experiment(path)
        assert experiment.runs, path
