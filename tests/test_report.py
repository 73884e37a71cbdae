"""`hrp-ood report`: tables, Markdown/LaTeX/CSV and plots from synthetic eval.json files with known numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from hrp_ood import __version__
from hrp_ood.errors import UserError, clipped, cut
from hrp_ood.report import write_report
from hrp_ood.report.evaluations import load_evaluations, noise_sort_key
from hrp_ood.report.plots import roc_points
from hrp_ood.report.tables import comparison_table, summarize, to_markdown

METHODS = ("hrp", "hrp_no_ram")
NOISES = ("sym80", "none", "sym20")  # deliberately not in table order
SEEDS = (0, 1)
POSTPROCESSORS = ("msp", "ebo")
OOD_SETS = ("svhn", "places365")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_evaluation(folder: Path, method: str, noise: str, seed: int, rng: np.random.Generator) -> dict:
    """One eval.json + scores.npz with random (recorded) numbers; returns the JSON written."""
    folder.mkdir(parents=True)
    results, scores = [], {}
    for pp in POSTPROCESSORS:
        scores[f"{pp}/id"] = rng.normal(1.0, 1.0, size=60).astype(np.float32)
        per_set = []
        for name in OOD_SETS:
            scores[f"{pp}/{name}"] = rng.normal(-1.0, 1.0, size=40).astype(np.float32)
            metrics = {
                "auroc": float(rng.uniform(60, 99)),
                "fpr95": float(rng.uniform(5, 90)),
                "aupr_in": float(rng.uniform(60, 99)),
                "aupr_out": float(rng.uniform(60, 99)),
                "fpr95_tpr_id": float(rng.uniform(5, 90)),
            }
            per_set.append(metrics)
            results.append({"postprocessor": pp, "ood": name, **metrics})
        mean = {k: float(np.mean([m[k] for m in per_set])) for k in per_set[0]}
        results.append({"postprocessor": pp, "ood": "mean", **mean})
    data = {
        "checkpoint": str(folder / "last.pt"),
        "checkpoint_sha256": "0" * 64,
        "method": method,
        "dataset": "cifar10",
        "noise": noise,
        "seed": seed,
        "net": "ensemble",
        "id_accuracy": float(rng.uniform(80, 96)),
        "versions": {"torch": "2.14.1", "hrp_ood": "0.1.0"},
        "postprocessors": list(POSTPROCESSORS),
        "ood_sets": list(OOD_SETS),
        "results": results,
    }
    (folder / "eval.json").write_text(json.dumps(data))
    np.savez(folder / "scores.npz", **scores)
    return data


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory) -> tuple[list[Path], dict[tuple[str, str, int], dict]]:
    """2 methods × 3 noise levels × 2 seeds; returns the eval.json paths and the data by (method, noise, seed)."""
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(1234)
    paths, data = [], {}
    for method in METHODS:
        for noise in NOISES:
            for seed in SEEDS:
                folder = root / f"{method}_{noise}_s{seed}"
                data[method, noise, seed] = _write_evaluation(folder, method, noise, seed, rng)
                paths.append(folder / "eval.json")
    return paths, data


def _metric(data: dict, pp: str, ood: str, metric: str) -> float:
    return next(r[metric] for r in data["results"] if r["postprocessor"] == pp and r["ood"] == ood)


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def test_load_evaluations_is_long_with_meta_columns(evaluations):
    paths, data = evaluations
    df = load_evaluations(paths)
    assert len(df) == len(paths) * len(POSTPROCESSORS) * (len(OOD_SETS) + 1)
    for column in (
        "path",
        "checkpoint",
        "method",
        "dataset",
        "noise",
        "seed",
        "net",
        "id_accuracy",
        "postprocessor",
        "ood",
        "auroc",
        "fpr95",
        "aupr_in",
        "aupr_out",
        "fpr95_tpr_id",
    ):
        assert column in df.columns
    row = df[
        (df.method == "hrp")
        & (df.noise == "sym20")
        & (df.seed == 1)
        & (df.postprocessor == "ebo")
        & (df.ood == "places365")
    ].iloc[0]
    source = data["hrp", "sym20", 1]
    assert row["auroc"] == pytest.approx(_metric(source, "ebo", "places365", "auroc"))
    assert row["id_accuracy"] == pytest.approx(source["id_accuracy"])


def test_noise_levels_sort_naturally():
    names = ["asym40", "sym80", "sym100", "none", "symflip20", "sym20", "real", "sym50"]
    assert sorted(names, key=noise_sort_key) == [
        "none",
        "sym20",
        "sym50",
        "sym80",
        "sym100",
        "symflip20",
        "asym40",
        "real",
    ]


def test_comparison_table_by_noise_shape_labels_and_cells(evaluations):
    paths, data = evaluations
    table = comparison_table(load_evaluations(paths), by="noise")
    cells = table["cell"]
    assert list(cells.columns) == ["none", "sym20", "sym80"]
    assert list(cells.index.names) == ["method", "postprocessor"]
    assert list(cells.index) == [
        ("hrp", "msp"),
        ("hrp", "ebo"),
        ("hrp_no_ram", "msp"),
        ("hrp_no_ram", "ebo"),
        ("hrp", "ID acc."),
        ("hrp_no_ram", "ID acc."),
    ]

    auroc = [_metric(data["hrp_no_ram", "sym80", s], "msp", "mean", "auroc") for s in SEEDS]
    fpr = [_metric(data["hrp_no_ram", "sym80", s], "msp", "mean", "fpr95") for s in SEEDS]
    assert cells.loc[("hrp_no_ram", "msp"), "sym80"] == f"{_mean_std(auroc)} / {_mean_std(fpr)}"
    assert table["auroc_mean"].loc[("hrp_no_ram", "msp"), "sym80"] == pytest.approx(np.mean(auroc))
    assert table["auroc_std"].loc[("hrp_no_ram", "msp"), "sym80"] == pytest.approx(np.std(auroc, ddof=1))
    assert table["fpr95_std"].loc[("hrp_no_ram", "msp"), "sym80"] == pytest.approx(np.std(fpr, ddof=1))
    assert table["n_seeds"].loc[("hrp_no_ram", "msp"), "sym80"] == 2

    accuracy = [data["hrp", "none", s]["id_accuracy"] for s in SEEDS]
    assert cells.loc[("hrp", "ID acc."), "none"] == _mean_std(accuracy)
    assert table["id_accuracy_mean"].loc[("hrp", "ID acc."), "none"] == pytest.approx(np.mean(accuracy))


def test_one_seed_shows_the_mean_alone(evaluations):
    paths, data = evaluations
    seed0 = [p for p, key in zip(paths, data) if key[2] == 0]
    cells = comparison_table(load_evaluations(seed0), metrics=("auroc",))["cell"]
    expected = _metric(data["hrp", "sym20", 0], "ebo", "mean", "auroc")
    assert cells.loc[("hrp", "ebo"), "sym20"] == f"{expected:.1f}"


def test_by_ood_keeps_mean_last_and_adds_the_varying_noise_as_a_row_level(evaluations):
    paths, data = evaluations
    table = comparison_table(load_evaluations(paths), by="ood", metrics=("fpr95",))
    cells = table["cell"]
    assert list(cells.columns) == ["svhn", "places365", "mean"]
    assert list(cells.index.names) == ["noise", "method", "postprocessor"]
    assert len(cells) == len(NOISES) * len(METHODS) * (len(POSTPROCESSORS) + 1)
    assert list(cells.index.get_level_values("noise").unique()) == ["none", "sym20", "sym80"]
    fpr = [_metric(data["hrp", "none", s], "msp", "svhn", "fpr95") for s in SEEDS]
    assert cells.loc[("none", "hrp", "msp"), "svhn"] == _mean_std(fpr)


def test_by_method_puts_methods_in_columns(evaluations):
    paths, data = evaluations
    summary = summarize(load_evaluations(paths), by="method", metrics=("auroc",))
    row = summary[(summary.noise == "sym20") & (summary.postprocessor == "msp") & (summary.method == "hrp_no_ram")]
    values = [_metric(data["hrp_no_ram", "sym20", s], "msp", "mean", "auroc") for s in SEEDS]
    assert row["mean"].item() == pytest.approx(np.mean(values))
    assert row["std"].item() == pytest.approx(np.std(values, ddof=1))
    cells = comparison_table(load_evaluations(paths), by="method")["cell"]
    assert list(cells.columns) == ["hrp", "hrp_no_ram"]
    assert list(cells.index.names) == ["noise", "postprocessor"]


def test_write_report_writes_csv_markdown_latex_and_pngs(evaluations, tmp_path):
    paths, data = evaluations
    chosen = [paths[0], paths[1]]  # plots are the slow part: two evaluations are enough
    written = write_report(chosen, tmp_path / "report")
    assert {"csv", "summary_csv", "markdown", "latex"} <= written.keys()

    csv = pd.read_csv(written["csv"])
    assert len(csv) == 2 * len(POSTPROCESSORS) * (len(OOD_SETS) + 1)
    assert csv["auroc"].sum() == pytest.approx(
        sum(r["auroc"] for p in chosen for r in json.loads(p.read_text())["results"])
    )

    markdown = written["markdown"].read_text()
    assert "| method | postprocessor | sym80 |" in markdown
    assert "- hrp_ood 0.1.0, torch 2.14.1" in markdown  # the evaluations' software
    assert f"Report written by hrp-ood {__version__}." in markdown

    latex = written["latex"].read_text()
    assert r"\begin{tabular}" in latex and r"\end{tabular}" in latex
    assert r"\toprule" in latex and r"\bottomrule" in latex
    assert r"hrp\_no\_ram" not in latex  # only hrp/sym80 was chosen
    assert r"$\pm$" in latex
    assert f"% hrp-ood {__version__};" in latex
    body = [line for line in latex.splitlines() if not line.startswith("%")]
    assert all("_" not in line.replace(r"\_", "") for line in body)

    pngs = [path for kind, path in written.items() if kind.startswith(("hist:", "roc:"))]
    assert len(pngs) == 4
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert not list((tmp_path / "report").rglob("*.tmp"))


def test_latex_escapes_underscores_in_labels(evaluations, tmp_path):
    paths, _ = evaluations
    written = write_report(paths, tmp_path / "report", plots=False)
    latex = written["latex"].read_text()
    assert r"hrp\_no\_ram & msp" in latex
    assert latex.count(r"\midrule") == 2  # after the header and before the ID-acc. block
    assert not any(kind.startswith("hist:") for kind in written)


def test_roc_points_use_ood_as_positive_with_negated_scores():
    id_scores, ood_scores = np.array([3.0, 2.0, 2.5]), np.array([-1.0, 0.0])
    fpr, tpr = roc_points(id_scores, ood_scores)
    # OOD samples score lowest, so negated they are detected first: TPR reaches 1 at FPR 0.
    assert tpr[fpr == 0].max() == 1.0
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(0.5, 1.0, size=20)
    fpr, tpr = roc_points(a, b)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(np.r_[np.zeros(30), np.ones(20)], -np.r_[a, b]))


def test_missing_and_corrupt_eval_files_are_user_errors(evaluations, tmp_path):
    paths, _ = evaluations
    missing = tmp_path / "nope" / "eval.json"
    with pytest.raises(UserError, match="nope"):
        load_evaluations([paths[0], missing])
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    with pytest.raises(UserError, match="corrupt.json"):
        load_evaluations([corrupt])
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(
        json.dumps(
            {
                "method": "hrp",
                "dataset": "cifar10",
                "noise": "sym20",
                "seed": 0,
                "net": "1",
                "id_accuracy": 90.0,
                "results": [{"postprocessor": "msp"}],
            }
        )
    )
    with pytest.raises(UserError, match="incomplete.json"):
        load_evaluations([incomplete])
    with pytest.raises(UserError, match="no eval.json"):
        load_evaluations([])


def test_the_same_evaluation_twice_is_a_user_error(evaluations, tmp_path):
    paths, _ = evaluations
    copy = tmp_path / "copy" / "eval.json"
    copy.parent.mkdir()
    copy.write_text(paths[0].read_text())
    with pytest.raises(UserError, match="same evaluation"):
        load_evaluations([paths[0], copy])


def test_missing_or_corrupt_scores_fail_before_writing(evaluations, tmp_path):
    paths, _ = evaluations
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "eval.json").write_text(paths[0].read_text())
    with pytest.raises(UserError, match="scores.npz"):
        write_report([folder / "eval.json"], tmp_path / "out")
    (folder / "scores.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="scores.npz"):
        write_report([folder / "eval.json"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert "markdown" in write_report([folder / "eval.json"], tmp_path / "out", plots=False)


def test_bad_table_options_are_user_errors(evaluations):
    paths, _ = evaluations
    df = load_evaluations(paths[:2])
    with pytest.raises(UserError, match="lsun"):
        comparison_table(df, ood="lsun")
    with pytest.raises(UserError, match="seed"):
        comparison_table(df, by="seed")
    with pytest.raises(UserError, match="accuracy"):
        comparison_table(df, metrics=("accuracy",))


def _edited_copy(source: Path, folder: Path, edit) -> Path:
    """eval.json (+ scores.npz) of `source` copied to `folder` after `edit(data)`."""
    folder.mkdir(parents=True)
    data = json.loads(source.read_text())
    edit(data)
    (folder / "eval.json").write_text(json.dumps(data))
    (folder / "scores.npz").write_bytes((source.parent / "scores.npz").read_bytes())
    return folder / "eval.json"


def _set_first_auroc(value):
    def edit(data):
        data["results"][0]["auroc"] = value

    return edit


@pytest.mark.parametrize("value", [float("nan"), 150.0, -20.0])
def test_nan_and_out_of_range_metrics_are_refused(evaluations, tmp_path, value):
    paths, _ = evaluations
    bad = _edited_copy(paths[0], tmp_path / "bad", _set_first_auroc(value))
    with pytest.raises(UserError, match=r"results\[0\]\.auroc .*not a percentage"):
        load_evaluations([bad])


def test_fractions_mixed_with_percentages_are_refused(evaluations, tmp_path):
    paths, _ = evaluations

    def to_fractions(data):
        data["id_accuracy"] /= 100
        for result in data["results"]:
            for metric in ("auroc", "fpr95", "aupr_in", "aupr_out", "fpr95_tpr_id"):
                result[metric] /= 100

    fractions = _edited_copy(paths[1], tmp_path / "fractions", to_fractions)
    with pytest.raises(UserError, match="fractions"):
        load_evaluations([paths[0], fractions])


@pytest.mark.parametrize(
    ("key", "first", "second"),
    [
        ("model", "preact_resnet18", "resnet18_32x32"),
        ("epoch", 300, 150),
        ("fit_labels", "clean", "noisy"),
        ("benchmark", None, "cifar10"),
        ("ood_sets", ["svhn", "places365"], ["svhn"]),
        ("hyperparameters", {"ebo": {"temperature": 1.0}}, {"ebo": {"temperature": 2.0}}),
    ],
)
def test_seeds_that_differ_in_a_setting_are_not_averaged(evaluations, tmp_path, key, first, second):
    paths, data = evaluations
    seed0, seed1 = paths[0], paths[1]  # hrp, sym80, seeds 0 and 1
    assert data["hrp", "sym80", 0]["seed"] != data["hrp", "sym80", 1]["seed"]
    a = _edited_copy(seed0, tmp_path / "a", lambda d: d.update({key: first}))
    b = _edited_copy(seed1, tmp_path / "b", lambda d: d.update({key: second}))
    with pytest.raises(UserError, match=rf"differ in {key} .*not seeds of one setting"):
        load_evaluations([a, b])
    same = _edited_copy(seed1, tmp_path / "same", lambda d: d.update({key: first}))
    assert load_evaluations([a, same])["path"].nunique() == 2


def test_tuned_hyperparameters_and_measured_normalisation_may_differ_between_seeds(evaluations, tmp_path):
    paths, _ = evaluations

    def setting(temperature, mean):
        def edit(data):
            data["tuning"] = {"enabled": True}
            data["hyperparameters"] = {"ebo": {"temperature": temperature}}
            data["preprocessing"] = {"source": "checkpoint", "resize": 32, "crop": 32, "mean": [mean], "std": [0.2]}

        return edit

    a = _edited_copy(paths[0], tmp_path / "a", setting(1.0, 0.49))
    b = _edited_copy(paths[1], tmp_path / "b", setting(10.0, 0.48))
    assert load_evaluations([a, b])["path"].nunique() == 2
    c = _edited_copy(paths[1], tmp_path / "c", lambda d: (setting(1.0, 0.49)(d), d["preprocessing"].update(crop=28)))
    with pytest.raises(UserError, match="preprocessing"):
        load_evaluations([a, c])


def test_long_values_and_messages_are_cut_to_one_readable_line():
    assert cut("x" * 10) == repr("x" * 10)
    long = cut(list(range(10_000)))
    assert len(long) < 80 and long.endswith(f"({len(repr(list(range(10_000))))} chars)")
    message = "start " + "y" * 5000 + " how to fix"
    shortened = clipped(message)
    assert len(shortened) < 1100 and shortened.startswith("start ") and shortened.endswith(" how to fix")
    assert "characters cut" in shortened and clipped("short") == "short"


def test_methods_as_columns_over_one_setting_leave_postprocessor_rows(evaluations):
    paths, data = evaluations
    sym80 = [p for p in paths if "sym80" in p.parent.name]  # both methods, one noise level: one row key left
    table = comparison_table(load_evaluations(sym80), by="method", metrics=("auroc",))
    assert list(table.index.names) == ["postprocessor"]
    assert list(table["cell"].columns) == list(METHODS)
    expected = np.mean([_metric(data["hrp_no_ram", "sym80", s], "ebo", "mean", "auroc") for s in SEEDS])
    assert table["auroc_mean"].loc[("ebo",), "hrp_no_ram"] == pytest.approx(expected)
    assert "| ebo |" in to_markdown(table)
