"""Table 5 in one command: the shipped experiment file (HRP and the comparison methods, each from its own config
file) swept end to end on generated CIFAR-10 and the five far-OOD sets, and its report laid out as the paper's
table (mean AUROC / FPR95 over the sets per method and noise level, with the ID accuracy)."""

from pathlib import Path

import pandas as pd
import pytest
import yaml
from fakes import write_cifar10, write_far_ood_sets

from hrp_ood.cli import main
from hrp_ood.sweep import load_experiment

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model": "small_cnn",
    "device": "cpu",
    "epochs": 2,
    "lr_schedule": "multistep",
    "lr_milestones": [],
    "batch_size": 16,
    "meta_size": 20,
    "meta_batch_size": 16,
    "warmup_epochs": 1,
    "ramp_epochs": 1,
    "proj_hidden_dim": 16,
    "proj_dim": 8,
    "strong_policy": "none",
    "longremix_stage1_epochs": 1,
    "hcs_epochs": 1,
    "tensorboard": False,
}


def test_table5_cifar10_sweeps_every_method_from_its_own_config_and_reports_the_papers_layout(tmp_path):
    shipped = yaml.safe_load((ROOT / "configs" / "experiments" / "table5_cifar10.yaml").read_text())
    write_cifar10(tmp_path / "data", n_train=120, n_test=40)
    write_far_ood_sets(tmp_path / "data", n=24)
    experiment = {
        **shipped,
        "config": {**TINY, "data_root": str(tmp_path / "data")},
        "grid": {**shipped["grid"], "noise": ["sym50"], "seed": [0]},
        "out": str(tmp_path / "out"),
        "evaluation": {**shipped["evaluation"], "postprocessors": ["msp", "ebo"], "data_root": str(tmp_path / "data")},
        # config files are named relative to the experiment file: keep them pointing at the shipped ones
        "slurm": shipped["slurm"],
    }
    experiment["grid"]["config"] = [str(ROOT / "configs" / "experiments" / c) for c in shipped["grid"]["config"]]
    path = tmp_path / "table5.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))

    loaded = load_experiment(path)
    methods = {loaded.run_config(name).method for name in loaded.runs}
    assert methods == {"hrp", "dividemix", "promix", "longremix", "l2b", "unicon", "ce"}
    for name in loaded.runs:  # each point's own schedule, with the experiment's overrides on top
        cfg = loaded.run_config(name)
        assert cfg.epochs == 2 and cfg.model == "small_cnn"
        if cfg.method == "dividemix":
            assert (cfg.lambda_u, cfg.p_threshold, cfg.lr) == (25.0, 0.5, 0.02)  # sym50, from its config file
    hrp_points = [cfg for cfg in map(loaded.run_config, loaded.runs) if cfg.method == "hrp"]
    # HRP (κ 4, T_max 3.0) and its two named variants
    assert sorted((cfg.kappa, cfg.t_max) for cfg in hrp_points) == [(1.0, 1.25), (4.0, 1.5), (4.0, 3.0)]

    assert main(["sweep", str(path), "--jobs", "1"]) == 0
    for name in loaded.runs:
        report = yaml.safe_load((tmp_path / "out" / "runs" / name / "eval_ensemble" / "eval.json").read_text())
        assert report["ood_sets"] == ["svhn", "lsun", "places365", "textures", "mnist"]
        assert report["test_rule"] == ("sum" if report["method"] in ("dividemix", "unicon", "longremix") else
                                       "mean" if report["method"] in ("hrp", "promix") else None)  # fmt: skip
    table = (tmp_path / "out" / "report" / "report.md").read_text()
    for method in methods:
        assert f"| {method}" in table or f"{method} |" in table, method
    summary = pd.read_csv(tmp_path / "out" / "report" / "report_summary.csv")
    # HRP and its two variants train the same method: their rows carry the file's name, the others the method's
    variants = ("cifar10_hrp", "cifar10_hrp_t_max1.5", "cifar10_hrp_kappa1_t_max1.25")
    rows = (methods - {"hrp"}) | {f"hrp (config={name})" for name in variants}
    assert set(summary["method"]) == rows and set(summary["noise"]) == {"sym50"}


def test_a_grid_over_config_files_labels_rows_by_method_unless_two_files_train_the_same_method(tmp_path):
    from hrp_ood.sweep import grid_variants

    configs = ROOT / "configs"

    def variants(files):
        path = tmp_path / "experiment.yaml"
        path.write_text(yaml.safe_dump({"grid": {"config": [str(configs / f) for f in files]}, "out": str(tmp_path)}))
        return sorted(grid_variants(load_experiment(path)).values())

    assert variants(["cifar10_hrp.yaml", "cifar10_dividemix.yaml"]) == []  # the method names the row
    assert variants(["cifar10_hrp.yaml", "cifar100_hrp.yaml"]) == ["config=cifar100_hrp", "config=cifar10_hrp"]
    # only the files that share a method carry their name; the others stay named by their method
    shared = ["cifar10_hrp.yaml", "cifar10_hrp_t_max1.5.yaml", "cifar10_dividemix.yaml"]
    assert variants(shared) == ["config=cifar10_hrp", "config=cifar10_hrp_t_max1.5"]
