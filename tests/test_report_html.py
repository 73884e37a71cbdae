"""report.html (`hrp-ood report --html`, every sweep): one self-contained page with the tables, the figures inline
and links to the run folders; rendered in a headless Chromium when one is installed."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from test_report import POSTPROCESSORS, _mean_std, _metric, _write_evaluation

from hrp_ood import __version__
from hrp_ood.cli import main
from hrp_ood.report.evaluations import load_evaluations
from hrp_ood.report.html import write_html_report
from hrp_ood.report.sweep import noise_curve_figures

SCRIPT_NAME = "<script>alert(1)</script>"
METHODS = ("hrp", SCRIPT_NAME)
NOISES = ("sym20", "sym80")
SEEDS = (0, 1)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MATPLOTLIB_BLUE = (31, 119, 180)  # the first curve of every ROC panel


class Page(HTMLParser):
    """The parts of a page the tests read: tables as rows of cell texts, links, image sources, element ids."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.ids: set[str] = set()
        self.tags: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append(tag)
        if "id" in attributes:
            self.ids.add(attributes["id"] or "")
        if tag == "a":
            self.hrefs.append(attributes.get("href") or "")
        if "src" in attributes:
            self.srcs.append(attributes["src"] or "")
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _table(page: Page, first_header: list[str]) -> list[dict[str, str]]:
    """The rows (header → text) of the page's table whose header starts with `first_header`."""
    table = next(t for t in page.tables if t[0][: len(first_header)] == first_header)
    return [dict(zip(table[0], row)) for row in table[1:]]


@pytest.fixture(scope="module")
def reported(tmp_path_factory) -> tuple[Path, dict, list[Path]]:
    """Run folders as `hrp-ood evaluate` lays them out (runs/<run>/last.pt, runs/<run>/eval_ensemble/eval.json),
    one of them named with HTML's and URLs' special characters, reported by `hrp-ood report --html`."""
    root = tmp_path_factory.mktemp("html")
    rng = np.random.default_rng(7)
    data, paths = {}, []
    for m, method in enumerate(METHODS):
        for noise in NOISES:
            for seed in SEEDS:
                name = f"run #{m} & <b>{noise}" if (m, noise, seed) == (1, "sym80", 1) else f"m{m}_{noise}_s{seed}"
                run = root / "runs" / name
                evaluation = _write_evaluation(run / "eval_ensemble", method, noise, seed, rng)
                (run / "last.pt").write_bytes(b"checkpoint")
                evaluation["checkpoint"] = str(run / "last.pt")
                (run / "eval_ensemble" / "eval.json").write_text(json.dumps(evaluation))
                data[method, noise, seed] = evaluation
                paths.append(run / "eval_ensemble" / "eval.json")
    out = root / "report"
    assert main(["report", *map(str, paths), "--out", str(out), "--html"]) == 0
    return out, data, paths


def test_report_html_only_with_the_flag(reported, tmp_path):
    out, _, paths = reported
    assert (out / "report.html").is_file()
    assert main(["report", *map(str, paths), "--out", str(tmp_path / "plain"), "--no-plots"]) == 0
    assert not (tmp_path / "plain" / "report.html").exists()
    footer = (out / "report.html").read_text(encoding="utf-8").split("<footer>")[1]
    assert "hrp_ood 0.1.0, torch 2.14.1" in footer and f"Report written by hrp-ood {__version__}." in footer


def test_the_page_is_self_contained_with_every_figure_inline(reported):
    out, _, paths = reported
    text = (out / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    assert "http://" not in text and "https://" not in text and "url(" not in text and "@import" not in text
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert page.srcs and all(src.startswith("data:image/png;base64,") for src in page.srcs)
    inline = sorted(base64.b64decode(src.split(",", 1)[1]) for src in page.srcs)
    on_disk = sorted(png.read_bytes() for png in (out / "plots").glob("*.png"))
    assert len(on_disk) == 2 * len(paths)  # a ROC figure and a histogram figure per evaluation
    assert inline == on_disk and all(png.startswith(PNG_SIGNATURE) for png in inline)


def test_the_ood_table_holds_the_numbers_of_the_eval_files(reported):
    out, data, _ = reported
    rows = _table(Page((out / "report.html").read_text(encoding="utf-8")), ["method", "postprocessor"])
    assert len(rows) == len(METHODS) * (len(POSTPROCESSORS) + 1)
    for method in METHODS:
        for noise in NOISES:
            runs = [data[method, noise, seed] for seed in SEEDS]
            for pp in POSTPROCESSORS:
                (row,) = [r for r in rows if r["method"] == method and r["postprocessor"] == pp]
                auroc = _mean_std([_metric(run, pp, "mean", "auroc") for run in runs])
                fpr95 = _mean_std([_metric(run, pp, "mean", "fpr95") for run in runs])
                assert row[noise] == f"{auroc} / {fpr95}"
            (row,) = [r for r in rows if r["method"] == method and r["postprocessor"] == "ID acc."]
            assert row[noise] == _mean_std([run["id_accuracy"] for run in runs])


def test_names_from_files_are_escaped(reported):
    out, _, _ = reported
    text = (out / "report.html").read_text(encoding="utf-8")
    assert SCRIPT_NAME not in text and "<b>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "run #1 &amp; &lt;b&gt;sym80" in text
    page = Page(text)
    runs = _table(page, ["method", "dataset"])
    assert sorted(r["method"] for r in runs) == sorted(m for m in METHODS for _ in NOISES for _ in SEEDS)
    assert "run #1 & <b>sym80" in [r["run folder"] for r in runs]  # the text survives, escaped


def test_links_open_the_run_and_evaluation_folders(reported):
    out, _, paths = reported
    page = Page((out / "report.html").read_text(encoding="utf-8"))
    anchors = [href[1:] for href in page.hrefs if href.startswith("#")]
    assert anchors and set(anchors) <= page.ids
    folders = [href for href in page.hrefs if not href.startswith("#")]
    assert all("#" not in href and " " not in href for href in folders)  # quoted: "#" would cut the path
    targets = {(out / unquote(href)).resolve() for href in folders}
    expected = {p.parent.resolve() for p in paths} | {p.parent.parent.resolve() for p in paths}
    assert targets == expected and all(target.is_dir() for target in targets)


def test_a_sweeps_page_adds_the_accuracy_tables_and_the_noise_curves(reported, tmp_path):
    out, data, paths = reported
    accuracy = pd.DataFrame(
        [
            {"noise": noise, "method": method, "seed": str(seed), "test_acc": 50.0 + 10 * seed + m}
            for m, method in enumerate(METHODS)
            for noise in NOISES
            for seed in SEEDS
        ]
    )
    figures = noise_curve_figures(load_evaluations(paths), accuracy, ("auroc", "fpr95"), "mean", tmp_path)
    page_path = write_html_report(
        tmp_path, load_evaluations(paths), figures=figures, accuracy=accuracy, title="sweep <x>.yaml"
    )
    text = page_path.read_text(encoding="utf-8")
    page = Page(text)
    assert "<title>sweep &lt;x&gt;.yaml</title>" in text
    rows = _table(page, ["method", "sym20"])
    assert {r["method"]: r["sym20"] for r in rows} == {"hrp": "55.00 ± 7.07", SCRIPT_NAME: "56.00 ± 7.07"}
    assert _table(page, ["noise", "method", "test_acc"])  # the training summary
    inline = sorted(base64.b64decode(src.split(",", 1)[1]) for src in page.srcs)
    assert inline == sorted(png.read_bytes() for png in figures.values())


@pytest.mark.slow
def test_every_sweep_writes_report_html(tmp_path):
    from test_sweep import TINY_CONFIG, write_experiment

    path = write_experiment(
        tmp_path, config={**TINY_CONFIG, "meta_size": 30}, grid={"noise": ["sym20", "sym50"], "method": ["ce"]}
    )
    assert main(["sweep", str(path), "--jobs", "1"]) == 0
    page = Page((tmp_path / "out" / "report" / "report.html").read_text(encoding="utf-8"))
    assert _table(page, ["method", "sym20", "sym50"])  # the accuracy table
    assert len(page.srcs) == 2 * 2 + 2  # ROC + histograms per run, noise curves, accuracy against noise
    runs = _table(page, ["method", "dataset"])
    assert [r["noise"] for r in runs] == ["sym20", "sym50"]


# --------------------------------------------------------------------------- in a real browser

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([BROWSER, *flags, *args], capture_output=True, text=True, timeout=180, check=True)


def _page_requests(net_log: Path) -> list[str]:
    """URLs of the network requests the page made (the browser's own background requests are not the page's:
    their network isolation key is not the file:// page's)."""
    log = json.loads(net_log.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        event["params"]["url"]
        for event in log["events"]
        if event["type"] == start_job and "file://" in event["params"].get("network_isolation_key", "")
    ]


@pytest.mark.skipif(BROWSER is None, reason="no chromium / google-chrome installed")
def test_chromium_renders_the_page_offline(reported, tmp_path):
    from PIL import Image

    out, data, _ = reported
    url = (out / "report.html").resolve().as_uri()
    shot = tmp_path / "report.png"
    _chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", url)
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape == (2000, 1280, 3)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100  # not blank: text, tables, figures
    near_blue = (np.abs(image - MATPLOTLIB_BLUE) <= 8).all(axis=-1)
    assert near_blue.sum() > 200  # an inline ROC figure was decoded and drawn

    dom = _chromium(tmp_path / "profile", "--dump-dom", f"--log-net-log={tmp_path / 'net.json'}", url).stdout
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and "<script" not in dom  # a name, never an element
    auroc = _mean_std([_metric(data["hrp", "sym80", seed], "msp", "mean", "auroc") for seed in SEEDS])
    assert f"{auroc} / " in dom and dom.count("<img ") == 2 * len(data)
    assert _page_requests(tmp_path / "net.json") == []

    # the check sees a page that fetches something: the same page with one external image
    fetching = tmp_path / "fetching.html"
    fetching.write_text(
        (out / "report.html").read_text().replace("<h1>", '<img src="https://example.invalid/x.png"><h1>')
    )
    _chromium(tmp_path / "profile", "--dump-dom", f"--log-net-log={tmp_path / 'net2.json'}", fetching.as_uri())
    assert _page_requests(tmp_path / "net2.json") == ["https://example.invalid/x.png"]
