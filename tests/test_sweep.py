"""`hrp-ood sweep`: a digits grid end to end (local worker processes and submitit's LocalExecutor), idempotent
re-runs, a failing run that does not stop the others, and experiment files refused before anything starts."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from hrp_ood.cli import main
from hrp_ood.errors import UserError
from hrp_ood.report.sweep import accuracy_table, run_summary, summary_table, write_accuracy_table
from hrp_ood.sweep import gpu_slots_of_jobs, load_experiment, run_state, run_sweep

pytestmark = pytest.mark.slow  # end-to-end: left out by `pytest -m "not slow"`

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = {
    "dataset": "digits",
    "model": "small_cnn",
    "device": "cpu",
    "meta_size": 50,
    "epochs": 1,
    "batch_size": 64,
    "meta_batch_size": 50,
    "lr_milestones": [],
    "warmup_epochs": 1,
    "ramp_epochs": 0,
    "proj_hidden_dim": 32,
    "proj_dim": 16,
    "strong_policy": "none",
}
RUNS = [
    "noise-sym20__method-ce__seed-0",
    "noise-sym20__method-hrp__seed-0",
    "noise-sym50__method-ce__seed-0",
    "noise-sym50__method-hrp__seed-0",
]


def write_experiment(folder: Path, **changes) -> Path:
    experiment = {
        "config": TINY_CONFIG,
        "grid": {"noise": ["sym20", "sym50"], "method": ["ce", "hrp"], "seed": [0]},
        "out": str(folder / "out"),
        "retries": 0,
        "evaluation": {"ood": ["uniform_noise"], "postprocessors": ["msp", "ebo"]},
        "report": {"by": "noise", "metrics": ["auroc", "fpr95"]},
        **changes,
    }
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
    assert r"method & sym20 & sym50 \\" in (out / "report" / "accuracy.tex").read_text()
    for figure in ("noise_curves.png", "accuracy_vs_noise.png"):
        assert (out / "report" / "plots" / figure).stat().st_size > 10_000
    summary = (out / "report" / "summary.md").read_text().splitlines()
    assert summary[2].startswith(
        "| noise | method | test_acc | test_acc_min | test_acc_peak | test_acc_meta_selected |"
    )


ACCURACY_FRAME = pd.DataFrame(
    {
        "noise": ["sym20", "sym20", "sym80", "sym20"],
        "method": ["ce", "ce", "ce", "hrp"],
        "seed": ["0", "1", "0", "0"],
        "test_acc": [90.0, 92.0, 40.0, 95.0],
    }
)


def test_gpu_slots_share_gpus_round_robin_only_between_single_process_runs():
    assert gpu_slots_of_jobs(gpus=1, nproc=1, jobs=3) == ["0", "0", "0"]
    assert gpu_slots_of_jobs(gpus=2, nproc=1, jobs=3) == ["0", "1", "0"]
    assert gpu_slots_of_jobs(gpus=4, nproc=2, jobs=3) == ["0,1", "2,3"]
    assert gpu_slots_of_jobs(gpus=4, nproc=4, jobs=1) == ["0,1,2,3"]


def test_run_summary_takes_last_peak_meta_selected_and_post_warmup_means():
    """best.pt is the first epoch of highest meta accuracy (ce_meta: the last); AUROCs average the epochs after the
    warm-up that have a value."""
    rows = [
        {"epoch": "1", "acc_ensemble": "50", "meta_acc": "40", "alpha_auroc": "", "loss_auroc": "60"},
        {"epoch": "2", "acc_ensemble": "70", "meta_acc": "65", "alpha_auroc": "55", "loss_auroc": "70"},
        {"epoch": "3", "acc_ensemble": "60", "meta_acc": "65", "alpha_auroc": "", "loss_auroc": "80"},
        {"epoch": "4", "acc_ensemble": "45", "meta_acc": "50", "alpha_auroc": "61", "loss_auroc": "90"},
    ]
    instruments = {"T_auroc": ["20", "30", "", "40"], "ram_lambda_clean_noisy": ["0.5", "0.3", "0.2", "0.4"]}
    instruments["cdcl_purity_gated"] = ["1.0", "0.9", "0.8", ""]
    for column, values in instruments.items():
        for row, value in zip(rows, values):
            row[column] = value
    summary = run_summary(rows, warmup_epochs=1)
    assert (summary["test_acc"], summary["test_acc_peak"], summary["test_acc_meta_selected"]) == (45, 70, 70)
    assert summary["alpha_auroc"] == 58 and summary["loss_auroc"] == 80 and math.isnan(summary["beta_auroc"])
    assert summary["T_auroc"] == 35 and summary["ram_lambda_clean_noisy"] == pytest.approx(0.3)
    assert summary["cdcl_purity_gated"] == pytest.approx(85)  # a fraction in metrics.csv, % in the summary
    assert run_summary(rows, warmup_epochs=1, meta_held_out=False)["test_acc_meta_selected"] == 45
    no_meta_set = [{**row, "meta_acc": ""} for row in rows]  # meta_size 0: metrics.csv leaves meta_acc empty
    assert run_summary(no_meta_set, warmup_epochs=1)["test_acc_meta_selected"] == 45


def test_summary_table_shows_the_worst_seed_beside_mean_and_std():
    frame = ACCURACY_FRAME.assign(ram_lambda_clean_noisy=[0.31, 0.35, 0.5, 0.444])
    table = summary_table(frame)["cell"]
    assert list(table.columns) == ["test_acc", "test_acc_min", "ram_lambda_clean_noisy", "seeds"]
    assert table.loc[("sym20", "ce")].tolist() == ["91.0 ± 1.4", "90.0", "0.33 ± 0.03", "2"]
    assert table.loc[("sym20", "hrp")].tolist() == ["95.0", "95.0", "0.44", "1"]


def test_accuracy_table_is_mean_and_std_over_seeds():
    table = accuracy_table(ACCURACY_FRAME, by="noise")["cell"]
    assert list(table.columns) == ["sym20", "sym80"]
    assert table.loc[("ce",)].tolist() == ["91.00 ± 1.41", "40.00"]
    assert table.loc[("hrp",)].tolist() == ["95.00", "–"]


def test_accuracy_by_method_over_a_grid_of_methods_alone(tmp_path):
    frame = ACCURACY_FRAME[ACCURACY_FRAME["noise"] == "sym20"].drop(columns="noise")  # grid: method × seed
    table = accuracy_table(frame, by="method")["cell"]
    assert list(table.columns) == ["ce", "hrp"]
    assert table.iloc[0].tolist() == ["91.00 ± 1.41", "95.00"]
    assert (
        "| all | 91.00 ± 1.41 | 95.00 |"
        in write_accuracy_table(frame, "method", tmp_path)["accuracy_markdown"].read_text()
    )


def test_the_accuracy_table_is_written_as_latex_too(tmp_path):
    latex = write_accuracy_table(ACCURACY_FRAME, "noise", tmp_path)["accuracy_latex"].read_text().splitlines()
    assert latex[0].startswith("% Ensemble test accuracy (\\%)")
    assert latex[2:6] == [r"\begin{tabular}{lcc}", r"\toprule", r"method & sym20 & sym80 \\", r"\midrule"]
    assert latex[6:] == [r"ce & 91.00 $\pm$ 1.41 & 40.00 \\", r"hrp & 95.00 & -- \\", r"\bottomrule", r"\end{tabular}"]


def test_rerun_trains_nothing_and_a_missing_eval_is_redone_alone(swept, capsys):
    path, out = swept
    checkpoints = {name: (out / "runs" / name / "last.pt").stat().st_mtime_ns for name in RUNS}
    report = (out / "report" / "report.md").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["sweep", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "4 runs, 4 done before" in printed and "report up to date" in printed
    assert (out / "report" / "report.md").stat().st_mtime_ns == report
    (out / "runs" / RUNS[1] / "eval_ensemble" / "eval.json").unlink()
    assert main(["sweep", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "4 runs, 3 done before" in printed and f"{RUNS[1]}: evaluated" in printed
    assert "report up to date" not in printed and (out / "report" / "report.md").stat().st_mtime_ns > report
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


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"grids": {}}, "unknown top-level key 'grids'"),
        ({"grid": {"noise": ["sym20", "sym999"]}}, "run noise-sym999"),
        ({"grid": {"methd": ["ce"]}}, "grid key 'methd'"),
        ({"grid": {"name": ["a"]}}, "grid key 'name'"),
        ({"grid": {"seed": []}}, "non-empty list"),
        ({"grid": []}, "grid must name at least one config key"),
        ({"grid": [{"seed": [0]}, ["seed"]]}, "or be a list of such mappings, got ['seed']"),
        ({"grid": [{"seed": [0, 1]}, {"seed": [1]}]}, "two grids of the list share the run 'seed-1'"),
        ({"grid": [{"seed": [0]}, {"methd": ["ce"]}]}, "grid key 'methd'"),
        ({"grid": {"method": ["ce", "nope"]}}, "unknown method 'nope'"),
        ({"config": {"epochs": 0}}, "epochs must be"),
        ({"evaluation": {"ood": ["nowhere"]}}, "unknown evaluation ood set 'nowhere'"),
        ({"evaluation": {"postprocessors": ["msp", "magic"]}}, "postprocessor 'magic'"),
        ({"evaluation": {"ood_dirs": {"mine": "/no/such/folder"}}}, "not found"),
        ({"report": {"by": "colour"}}, "report.by"),
        ({"report": {"metrics": ["auroc", "speed"]}}, "report metric 'speed'"),
        ({"slurm": {"partitions": "gpu"}}, "unknown slurm key"),
        ({"retries": -1}, "retries"),
        ({"nproc": 0}, "nproc must be an integer of at least 1"),
        ({"nproc": 2, "slurm": {"gpus_per_job": 1}}, "gpus_per_job is 1 but nproc is 2"),
        ({"base": "missing.yaml"}, "not found"),
        ({"base": 5}, "base must be a path (text), got 5"),
        ({"out": ["a", "b"]}, "out must be a path (text), got ['a', 'b']"),
        ({"slurm": {"gpus_per_job": "two"}}, "slurm.gpus_per_job must be an integer of at least 0, got 'two'"),
        ({"slurm": {"gpus_per_job": None}}, "slurm.gpus_per_job must be an integer of at least 0, got None"),
        ({"slurm": {"gpus_per_job": True}}, "slurm.gpus_per_job must be an integer of at least 0, got True"),
        ({"slurm": {"partition": 5}}, "slurm.partition must be a name or null, got 5"),
        ({"report": {"ood": "svhn"}}, "report.ood 'svhn' is not an OOD set the evaluation scores (uniform_noise)"),
        ({"grid": {"noise": ["sym20"], "noisy_labels": ["x" * 300]}}, "over 200"),
        ({"config": {**TINY_CONFIG, "lr": "fast" * 100}}, "…(402 chars)"),
    ],
)
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


def final_weights(out: Path, names: list[str]) -> dict[str, list]:
    from hrp_ood.checkpoint import load_checkpoint

    return {name: load_checkpoint(out / "runs" / name / "last.pt")["nets"] for name in names}


def test_a_sweep_killed_mid_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    """The whole sweep (its workers too) is killed with SIGKILL once a run has saved its first epoch; running the
    command again gives every run the final weights of the same grid swept without a stop. (co-teaching: two
    networks and its own sample selection, at a third of HRP's epoch time after the warm-up.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    grid = {"noise": ["sym20", "sym50"], "method": ["ce", "coteach"], "seed": [0]}
    names = list(load_experiment(write_experiment(tmp_path, grid=grid)).runs)
    experiments = {}
    for folder in ("reference", "killed"):
        (tmp_path / folder).mkdir()
        experiments[folder] = write_experiment(
            tmp_path / folder, grid=grid, config={**TINY_CONFIG, "epochs": 2}, report={"plots": False}
        )
    assert main(["sweep", str(experiments["reference"]), "--jobs", "2"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    sweep = subprocess.Popen(
        [sys.executable, "-m", "hrp_ood", "sweep", str(experiments["killed"]), "--jobs", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    metrics = [tmp_path / "killed" / "out" / "runs" / name / "metrics.csv" for name in names]
    try:
        deadline = time.monotonic() + 120
        # the header and epoch 1 (written after its last.pt): that run is in its second epoch
        while not any(path.is_file() and path.read_text().count("\n") == 2 for path in metrics):
            assert sweep.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(sweep.pid, signal.SIGKILL)
        sweep.wait()
    assert main(["sweep", str(experiments["killed"]), "--jobs", "2"]) == 0
    logs = [(tmp_path / "killed" / "out" / "sweep" / f"{name}.log").read_text() for name in names]
    assert any("resumed" in log for log in logs)
    expected = final_weights(tmp_path / "reference" / "out", names)
    got = final_weights(tmp_path / "killed" / "out", names)
    for name in names:
        for net_expected, net_got in zip(expected[name], got[name], strict=True):
            assert net_expected.keys() == net_got.keys()
            assert all(torch.equal(net_expected[key], net_got[key]) for key in net_expected), name


def test_a_run_trains_data_parallel_in_nproc_processes_then_is_evaluated_once(tmp_path):
    from hrp_ood.checkpoint import load_checkpoint
    from hrp_ood.sweep import run_job

    path = write_experiment(tmp_path, grid={"noise": ["sym50"], "method": ["ce"], "seed": [0]}, nproc=2)
    assert run_job(str(path), str(tmp_path / "out"), "noise-sym50__method-ce__seed-0") == (
        "noise-sym50__method-ce__seed-0: trained and evaluated",
        None,
    )
    run = tmp_path / "out" / "runs" / "noise-sym50__method-ce__seed-0"
    assert load_checkpoint(run / "last.pt")["world_size"] == 2
    assert (run / "metrics.csv").read_text().count("\n") == 2  # one writer: the header and epoch 1
    assert (run / "eval_ensemble" / "eval.json").is_file()


def test_a_slurm_job_of_a_data_parallel_run_has_one_task_per_process(tmp_path, monkeypatch):
    import submitit

    from hrp_ood.sweep import run_submitit

    asked = {}

    class Job:
        job_id = "7_0"

        def result(self):
            return "done", None

    class Executor:
        def __init__(self, folder, cluster):
            pass

        def update_parameters(self, **parameters):
            asked.update(parameters)

        def map_array(self, function, *columns):
            asked["columns"] = columns
            return [Job() for _ in columns[0]]

    monkeypatch.setattr(submitit, "AutoExecutor", Executor)
    experiment = load_experiment(write_experiment(tmp_path, nproc=2, slurm={"gpus_per_job": 2}))
    assert experiment.nproc == 2 and load_experiment(experiment.path, nproc=1).nproc == 1  # --nproc wins
    assert run_submitit(experiment, list(experiment.runs)) == {}
    assert asked["tasks_per_node"] == 2 and asked["gpus_per_node"] == 2
    assert list(asked["columns"][2]) == RUNS and list(asked["columns"][3]) == [2] * len(RUNS)


def _child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


LONG_CONFIG = {**TINY_CONFIG, "epochs": 400}  # minutes a run: far longer than a test waits for a stop


def start_sweep_process(experiment: Path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "hrp_ood", "sweep", str(experiment)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )


def wait_for_first_epoch(sweep, run_dir: Path) -> None:
    import time

    deadline = time.monotonic() + 120
    metrics = run_dir / "metrics.csv"
    while not metrics.is_file() or metrics.read_text().count("\n") < 2:
        assert sweep.poll() is None and time.monotonic() < deadline, "the sweep ended before it could be stopped"
        time.sleep(0.05)


def assert_stopped_with_its_state_saved(out: Path, name: str) -> None:
    from hrp_ood.checkpoint import load_checkpoint

    epochs_logged = (out / "runs" / name / "metrics.csv").read_text().count("\n") - 1
    assert 1 <= epochs_logged < 400
    assert load_checkpoint(out / "runs" / name / "last.pt")["epoch"] >= epochs_logged
    assert "SIGINT received: saving a checkpoint after the current step" in (out / "sweep" / f"{name}.log").read_text()


def test_a_sweep_process_killed_alone_stops_its_workers(tmp_path):
    """`kill <sweep pid>` reaches the sweep process, not its workers: each worker sees its sweep gone, saves its
    run's last.pt after the current step and exits (it used to train to the end unseen)."""
    import fcntl
    import time

    grid = {"noise": ["sym50"], "method": ["ce"], "seed": [0]}
    experiment = write_experiment(tmp_path, grid=grid, config=LONG_CONFIG, report={"plots": False})
    name = next(iter(load_experiment(experiment).runs))
    sweep = start_sweep_process(experiment)
    wait_for_first_epoch(sweep, tmp_path / "out" / "runs" / name)
    sweep.terminate()  # SIGTERM to the sweep process alone
    sweep.wait()
    with (tmp_path / "out" / "sweep" / f"{name}.lock").open("a") as lock:  # its worker holds it while it works
        deadline = time.monotonic() + 60
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the worker trains on after its sweep was killed"
                time.sleep(0.1)
    assert_stopped_with_its_state_saved(tmp_path / "out", name)


def test_ctrl_c_stops_the_sweep_and_starts_no_further_run(tmp_path):
    """Ctrl-C (SIGINT to the process group): the run in progress saves its state and the sweep ends; no queued run
    starts (one already handed to the worker used to train to its end while the sweep waited)."""
    import os
    import signal

    grid = {"noise": ["sym50"], "method": ["ce"], "seed": [0, 1, 2]}
    experiment = write_experiment(tmp_path, grid=grid, config=LONG_CONFIG, report={"plots": False})
    first, *queued = load_experiment(experiment).runs
    sweep = start_sweep_process(experiment)
    wait_for_first_epoch(sweep, tmp_path / "out" / "runs" / first)
    os.killpg(sweep.pid, signal.SIGINT)
    try:
        assert sweep.wait(timeout=60) == 130, sweep.stderr.read()
    finally:
        os.killpg(sweep.pid, signal.SIGKILL) if sweep.poll() is None else None
    assert_stopped_with_its_state_saved(tmp_path / "out", first)
    assert not any((tmp_path / "out" / "runs" / name).exists() for name in queued)
    stopped = run_state(load_experiment(experiment), first)  # waiting to be resumed, not failed
    assert (stopped["state"], stopped["error"]) == ("pending", "") and stopped["epoch"] != "0/400"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the job's task process through /proc")
def test_a_submitit_job_signalled_before_its_time_limit_is_requeued_and_resumes_from_its_last_checkpoint(tmp_path):
    """End to end through submitit's LocalExecutor: the signal a Slurm job receives before its time limit or a
    pre-emption (USR2) arrives while the run trains; submitit calls SweepJob.checkpoint and requeues the job, and the
    new attempt resumes the run from last.pt (not from epoch 0) and brings it to trained and evaluated."""
    import os
    import signal
    import time

    import submitit

    from hrp_ood.checkpoint import load_checkpoint
    from hrp_ood.sweep import SweepJob

    epochs = 8
    path = write_experiment(
        tmp_path,
        config={**TINY_CONFIG, "method": "ce", "epochs": epochs, "batch_size": 128},
        grid={"noise": ["sym50"], "seed": [0]},
    )
    experiment = load_experiment(path)
    name = "noise-sym50__seed-0"
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(SweepJob(), str(path), str(experiment.out), name, 1)
    last, deadline = experiment.run_dir(name) / "last.pt", time.monotonic() + 300
    log_file = experiment.sweep_file(name, ".log")

    def first_epoch_logged() -> bool:  # after last.pt: a signal between the two would leave epoch 1 unlogged
        return last.is_file() and log_file.is_file() and f"epoch 1/{epochs} " in log_file.read_text()

    while not first_epoch_logged():  # the task is in the training loop once it has checkpointed and logged epoch 1
        assert time.monotonic() < deadline and not job.done(), "the job never wrote a checkpoint"
        time.sleep(0.1)
    (task,) = _child_pids(int(job.job_id))  # the local job's controller runs one task process
    os.kill(task, signal.SIGUSR2)
    assert job.result()[1] is None
    assert "Requeued" in job.stdout()
    assert load_checkpoint(last)["epoch"] == epochs and experiment.eval_json(name).is_file()
    log = log_file.read_text()
    assert sum(f"epoch 1/{epochs} " in line for line in log.splitlines()) == 1, "the second attempt restarted"
    assert sum(f"epoch {epochs}/{epochs} " in line for line in log.splitlines()) == 1


def test_an_experiment_evaluates_through_the_evaluation_session_with_every_evaluate_option(tmp_path, monkeypatch):
    """evaluation: accepts evaluate's options (benchmark, tune, validation folders, backend, skip_corrupt) and
    hands them to the one evaluation session; wrong types are one-line errors before anything runs."""
    import hrp_ood.eval.session as session
    from hrp_ood.sweep import evaluate_run

    (tmp_path / "val_id").mkdir()
    options = {
        "ood": ["uniform_noise", "svhn"],
        "benchmark": "cifar10",
        "tune": True,
        "skip_corrupt": True,
        "val_id_dir": str(tmp_path / "val_id"),
        "fit_labels": "noisy",
    }
    experiment = load_experiment(write_experiment(tmp_path, evaluation=options))
    requests = []
    monkeypatch.setattr(session, "evaluate", requests.append)
    evaluate_run(experiment, RUNS[0])
    (request,) = requests
    assert request.ckpt == experiment.run_dir(RUNS[0]) / "last.pt"
    assert (request.ood, request.benchmark, request.tune, request.skip_corrupt) == (
        ("uniform_noise", "svhn"),
        "cifar10",
        True,
        True,
    )
    assert (request.val_id_dir, request.val_ood_dir, request.fit_labels) == (tmp_path / "val_id", None, "noisy")
    for bad, words in [
        ({"tune": "yes"}, "evaluation.tune must be true or false"),
        ({"benchmark": "cifar11"}, "unknown evaluation benchmark 'cifar11'"),
        ({"batch_size": True}, "evaluation.batch_size must be a positive integer"),
    ]:
        with pytest.raises(UserError, match=words):
            load_experiment(write_experiment(tmp_path, evaluation={**options, **bad}))


def test_a_finished_run_made_with_other_settings_is_refused_or_rerun_on_request(tmp_path, capsys):
    """A sweep rerun into the same out compares each finished run's config.yaml and eval.json with the experiment:
    a difference is one error line naming the run and the keys; --rerun-changed moves the old files aside and
    trains (or evaluates) again."""
    one = {"grid": {"noise": ["sym20"], "method": ["ce"], "seed": [0]}}
    path = write_experiment(tmp_path, **one)
    assert main(["sweep", str(path)]) == 0
    run = tmp_path / "out" / "runs" / "noise-sym20__method-ce__seed-0"
    first = (run / "last.pt").read_bytes()

    path = write_experiment(tmp_path, **one, config={**TINY_CONFIG, "lr": 0.01})
    capsys.readouterr()
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert "1 run(s)" in err and "noise-sym20__method-ce__seed-0: config lr" in err and "--rerun-changed" in err
    assert (run / "last.pt").read_bytes() == first  # refused: nothing touched
    board = tmp_path / "out" / "tb" / run.name  # the run's TensorBoard events (written when tensorboard is installed)
    board.mkdir(parents=True, exist_ok=True)
    (board / "events.out.tfevents.old").write_bytes(b"first run")
    assert main(["sweep", str(path), "--rerun-changed"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 0.01
    (kept,) = (tmp_path / "out" / "replaced").iterdir()
    assert (kept / "last.pt").read_bytes() == first
    assert (kept / "tb" / "events.out.tfevents.old").read_bytes() == b"first run"  # moved with the replaced run
    assert not (board / "events.out.tfevents.old").exists()

    path = write_experiment(
        tmp_path,
        **one,
        config={**TINY_CONFIG, "lr": 0.01},
        evaluation={"ood": ["uniform_noise"], "postprocessors": ["msp"]},
    )
    assert main(["sweep", str(path)]) == 2
    assert "noise-sym20__method-ce__seed-0: evaluation postprocessors)" in capsys.readouterr().err
    assert main(["sweep", str(path), "--rerun-changed"]) == 0
    assert yaml.safe_load((run / "eval_ensemble" / "eval.json").read_text())["postprocessors"] == ["msp"]


def test_a_grid_over_any_config_key_reports_each_value_apart(tmp_path):
    """eval.json records method, noise and seed; a grid over another key (here lr) is told apart in the report by
    the grid point (it used to stop at "are the same evaluation"), and is a column of the summary."""
    path = write_experiment(tmp_path, grid={"lr": [0.05, 0.01], "method": ["ce"], "noise": ["sym20"], "seed": [0]})
    assert main(["sweep", str(path)]) == 0
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "| ce (lr=0.05) | msp |" in report and "| ce (lr=0.01) | msp |" in report
    summary = (tmp_path / "out" / "report" / "summary.md").read_text().splitlines()
    assert summary[2].startswith("| lr | method | noise | test_acc |")


def test_a_list_of_grids_is_their_union_and_reports_each_point(tmp_path):
    """A candidate at two noise levels with different seeds, beside the default: one experiment, each grid's keys
    naming its own runs, and the report telling the default (no lr in its point) from the variant."""
    grid = [
        {"method": ["ce"], "noise": ["sym20"], "seed": [0], "lr": [0.01]},
        {"method": ["ce"], "noise": ["sym20"], "seed": [0]},
    ]
    path = write_experiment(tmp_path, grid=grid)
    experiment = load_experiment(path)
    assert list(experiment.runs) == ["method-ce__noise-sym20__seed-0__lr-0.01", "method-ce__noise-sym20__seed-0"]
    assert [experiment.run_config(name).lr for name in experiment.runs] == [0.01, 0.05]
    assert main(["sweep", str(path)]) == 0
    report = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "| ce (lr=0.01) | msp |" in report and "| ce | msp |" in report


def test_the_slurm_executor_without_slurm_is_one_line_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch
    path = write_experiment(tmp_path)
    assert main(["sweep", str(path), "--executor", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no Slurm here (sbatch is not on PATH)" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"epoch,acc_ensemble\nabc,0.5\n", "metrics.csv line 2: epoch 'abc' is not a whole number"),
        (b"epoch,acc_ensemble\n1,\xff\xfe\n", "metrics.csv is not a readable CSV file"),
        (b"acc_ensemble\n0.5\n", "metrics.csv has no epoch column"),
    ],
)
def test_a_hand_edited_metrics_file_is_one_line_in_status_and_rerun(content, words, tmp_path, capsys):
    path = write_experiment(tmp_path)
    metrics = tmp_path / "out" / "runs" / RUNS[0] / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    metrics.write_bytes(content)
    for command in (["--status"], []):
        assert main(["sweep", str(path), *command]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert metrics.read_bytes() == content
