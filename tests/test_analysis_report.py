"""The sweep report on folders built in the test: every section renders, the HTML's numbers are
the Parquet's, missing or partial folders fail clearly, a running sweep says so."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _analysis_fixtures import episodes_table, results_table, sweep_folder
from cxrtune.analysis.compare import CompareError, compare
from cxrtune.analysis.report import ReportConfig, build_report, main
from cxrtune.analysis.sweep_folder import SweepFolderError, load_sweep

SECTIONS = ("status", "study", "search", "health", "localisation", "cost")


class _Tables(HTMLParser):
    """table id -> rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._current = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._current = self.tables.setdefault(dict(attrs).get("id", ""), [])
        elif tag == "tr" and self._current is not None:
            self._current.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._current is not None:
            self._current[-1].append(self._cell)
            self._cell = None
        elif tag == "table":
            self._current = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _tables(html: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(html)
    return parser.tables


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent.db'}")
    monkeypatch.chdir(tmp_path)


CONFIG = ReportConfig(gradcam=False)


def test_every_section_renders_and_study_numbers_equal_the_parquet(tmp_path):
    folder = sweep_folder(tmp_path / "runs", optuna_trials=8)
    results = results_table()
    results.to_parquet(folder / "results.parquet", index=False)
    report = build_report("moco_variance", tmp_path / "runs", config=CONFIG, progress=lambda *_: None)
    html = report.html.read_text()
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in html
    assert "<script" not in html and "http" not in html.split("<body>")[1]  # nothing to fetch: opens offline
    assert html.count("data:image/png;base64,") >= 6  # shot curves, heatmap, search x2, importance, health, cost
    rows = _tables(html)["study_table"]
    header = rows[0]
    for row in rows[1:]:
        backbone, evaluator, kind = row[:3]
        if kind != "mean AUROC [95% CI]":
            continue
        for shots in (1, 5, 20):
            part = results[(results.backbone == backbone) & (results.evaluator == evaluator) & (results.shots == shots)]
            expected = np.mean([g["auroc"].mean() for _, g in part.groupby("disease")])
            cell = row[header.index(f"{shots}-shot")]
            assert cell.startswith(f"{expected:.3f} ["), (backbone, evaluator, shots, cell)
    # the CSV and Markdown copies hold the same table
    csv = pd.read_csv(report.folder / "tables" / "study_table.csv")
    assert csv.iloc[0].astype(str).tolist() == rows[1]
    markdown = (report.folder / "report.md").read_text()
    assert rows[1][3] in markdown and "## Study tables and shot curves" in markdown
    assert "\nBest trial 0002abcd: " in markdown  # the explanations too, not only the tables
    assert {p.stem for p in (report.folder / "figures").glob("*.png")} >= {"shot_curves", "disease_heatmap", "cost"}
    # importance ranks the parameter the objective depends on first
    importance = _tables(html)["importance"]
    assert importance[1][0] == "optim.lr"


def test_the_page_escapes_every_text_and_prints_each_cell_as_it_is():
    import re

    from cxrtune.analysis.document import Note, Paragraph, Section, Table
    from cxrtune.analysis.webpage import page

    frame = pd.DataFrame({"name <b>": ["moco_variance", "<script>x</script>"], "p": ["<0.001", "0.50 [0.4, 0.6]"]})
    sections = [Section("s", "S <i>", [Note("<script>alert(1)</script>", warn=True), Paragraph("x < y & z"),
                                       Table("t", frame, "T")])]
    html = page("a & b", "meta", sections, {"moco_variance": "#0072B2"})
    assert "<script" not in html and "<i>" not in html and "<b>" not in html
    assert "<title>a &amp; b</title>" in html and "<p>x &lt; y &amp; z</p>" in html
    assert _tables(html)["t"] == [["name <b>", "p"], ["moco_variance", "<0.001"],
                                  ["<script>x</script>", "0.50 [0.4, 0.6]"]]
    assert '<td class="text"><span class="swatch" style="background:#0072B2"></span>moco_variance</td>' in html
    assert re.search(r"<td>&lt;0\.001</td>", html) and '<div class="warn">' in html  # numbers right-aligned


def test_search_health_and_cost_show_each_trial_and_the_totals(tmp_path):
    folder = sweep_folder(tmp_path / "runs", statuses=("completed", "collapsed", "completed"))
    report = build_report("moco_variance", tmp_path / "runs", config=CONFIG, progress=lambda *_: None)
    tables = _tables(report.html.read_text())
    counts = {row[0]: row[1] for row in tables["status_counts"][1:]}
    assert counts["completed"] == "2" and counts["collapsed"] == "1"
    cost = tables["cost"]
    wall = {row[0]: row[cost[0].index("wall time (min)")] for row in cost[1:]}
    assert wall["0001abcd"] == f"{3 * 11.0 / 60:.2f}"  # three epochs of 11 s
    total = tables["cost_total"][1]
    assert total[1] == f"{(30 + 33 + 36) / 3600:.3f}"
    trials = tables["trials"]
    assert [r[1] for r in trials[1:]] == ["completed", "collapsed", "completed"]
    html = report.html.read_text()
    assert "No Optuna study (optuna.db) in the sweep folder" in html


def test_the_localisation_switch_leaves_the_section_out_and_gradcam_off_keeps_it_with_a_note(tmp_path):
    sweep_folder(tmp_path / "runs")
    report = build_report("moco_variance", tmp_path / "runs", config=ReportConfig(localisation=False),
                          progress=lambda *_: None)
    html = report.html.read_text()
    assert 'id="localisation"' not in html and "Localisation" not in (report.folder / "report.md").read_text()
    assert [a for a in SECTIONS if f'<section id="{a}">' in html] == [a for a in SECTIONS if a != "localisation"]
    report = build_report("moco_variance", tmp_path / "runs", config=CONFIG, progress=lambda *_: None)
    html = report.html.read_text()
    assert '<div class="note">Grad-CAM was switched off (--no-gradcam).</div>' in html
    assert "## Localisation (Grad-CAM)" in (report.folder / "report.md").read_text()


def test_too_few_trials_for_importance_get_a_note(tmp_path):
    sweep_folder(tmp_path / "runs", optuna_trials=2)
    report = build_report("moco_variance", tmp_path / "runs", config=CONFIG, progress=lambda *_: None)
    html = report.html.read_text()
    assert "Parameter importance needs at least 5 completed Optuna trials; this sweep has 2" in html
    assert 'id="importance"' not in html


def test_a_running_sweep_says_so_and_shows_what_exists(tmp_path):
    sweep_folder(tmp_path / "runs", running=True)
    report = build_report("moco_variance", tmp_path / "runs", config=CONFIG, progress=lambda *_: None)
    html = report.html.read_text()
    assert "This sweep is still running" in html and "0002abcd" in html
    statuses = {row[0]: row[1] for row in _tables(html)["trials"][1:]}
    assert statuses["0002abcd"] == "running" and statuses["0000abcd"] == "completed"


def test_missing_and_partial_folders_fail_naming_what_is_missing(tmp_path):
    with pytest.raises(SweepFolderError, match="--storage .*nowhere does not exist"):
        load_sweep("moco_variance", tmp_path / "nowhere")
    (tmp_path / "runs" / "other").mkdir(parents=True)
    with pytest.raises(SweepFolderError, match=r"folder .*moco_variance does not exist; sweeps in .*: other"):
        load_sweep("moco_variance", tmp_path / "runs")
    with pytest.raises(SweepFolderError, match=r"no trial folder \(\*/params.json\), no Tune state"):
        load_sweep("other", tmp_path / "runs")
    folder = sweep_folder(tmp_path / "runs")
    import shutil

    shutil.rmtree(folder / "pretrain_trainable_0001abcd")
    with pytest.raises(SweepFolderError, match="trials.csv lists trial '0001abcd'.*is missing"):
        load_sweep("moco_variance", tmp_path / "runs")
    assert main(["--sweep", "moco_variance", "--storage", str(tmp_path / "runs"), "--no-gradcam"]) == 2
    assert not (folder / "report").exists()  # nothing half-written
    (folder / "pretrain_trainable_0000abcd" / "params.json").unlink()
    with pytest.raises(SweepFolderError, match="pretrain_trainable_0000abcd .*has result.json but no params.json"):
        load_sweep("moco_variance", tmp_path / "runs")


def test_report_replaces_the_previous_one_and_logs_to_the_parent_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from cxrtune.tracking import SweepTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SweepTracker("moco_variance", uri=uri)
    folder = sweep_folder(tmp_path / "runs")
    (folder / "report").mkdir()
    (folder / "report" / "stale.txt").write_text("old")
    report = build_report("moco_variance", tmp_path / "runs", config=ReportConfig(gradcam=False, tracking_uri=uri),
                          progress=lambda *_: None)
    assert not (report.folder / "stale.txt").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".report")]
    assert report.mlflow_run == tracker.parent_run_id
    names = {a.path for a in MlflowClient(uri).list_artifacts(tracker.parent_run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/tables"} <= names


def test_compare_puts_sweeps_side_by_side_and_refuses_other_episodes(tmp_path):
    sweep_folder(tmp_path / "runs", name="moco_variance")
    sweep_folder(tmp_path / "runs", name="barlow_lambda", seed=1)
    table = compare(["moco_variance", "barlow_lambda"], tmp_path / "runs")
    assert list(table["run"]) == ["moco_variance", "moco_variance: random-resnet18", "barlow_lambda",
                                  "barlow_lambda: random-resnet18"]
    best = pd.read_parquet(tmp_path / "runs" / "moco_variance" / "pretrain_trainable_0002abcd" / "checkpoint_000002"
                           / "probe_results.parquet")
    expected = best[best.shots == 20].groupby("disease")["auroc"].mean().mean()
    assert table.loc[0, "20-shot AUROC [95% CI]"].startswith(f"{expected:.3f} [")
    episodes_table(salt="x").to_parquet(tmp_path / "runs" / "barlow_lambda" / "episodes.parquet", index=False)
    with pytest.raises(CompareError, match="episodes differ: moco_variance .* and barlow_lambda .* differ in train_ids"):
        compare(["moco_variance", "barlow_lambda"], tmp_path / "runs")
    with pytest.raises(CompareError, match="neither a sweep"):
        compare(["nothing_here"], tmp_path / "runs")


def test_the_script_and_the_cli_parsers_run_without_importing_analysis_up_front(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    sweep_folder(tmp_path / "runs")
    done = subprocess.run([sys.executable, str(root / "analysis" / "report.py"), "--sweep", "moco_variance",
                           "--storage", str(tmp_path / "runs"), "--no-gradcam"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs" / "moco_variance" / "report" / "report.html").is_file()
    probe = ("import argparse, sys\nfrom cxrtune.report_cli import add_report_parser, add_compare_parser\n"
             "p = argparse.ArgumentParser(); c = p.add_subparsers(dest='command')\n"
             "add_report_parser(c); add_compare_parser(c)\n"
             "a = p.parse_args(['report', '--sweep', 'x', '--gradcam-findings', 'mass,nodule'])\n"
             "print(sorted(m for m in sys.modules if m.startswith('analysis') or m == 'matplotlib'), a.gradcam_findings)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.stdout.strip() == "[] mass,nodule", done.stderr
