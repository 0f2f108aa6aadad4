"""The report and compare on a real smoke sweep's output (one Ray session for the module; cache,
sweep and MLflow store under tmp_path)."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from _sweep_fixtures import load_sweep_script

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    path = tmp_path_factory.mktemp("analysis_smoke")
    mp = pytest.MonkeyPatch()
    mp.setenv("CXRTUNE_CACHE", str(path / "cache"))
    mp.chdir(path)
    sweep = load_sweep_script("moco_variance")
    from cxrtune.sweep.cli import main

    uri = f"sqlite:///{path / 'mlflow.db'}"
    # the end-of-sweep report is tested on the smoke sweep (test_sweep_smoke.py); here the report is built below
    assert main(sweep, ["--profile", "smoke", "--no-report", "--storage", str(path / "runs"), "--tracking-uri", uri,
                        "--cpus", "2"]) == 0
    yield path, uri
    mp.undo()
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
def test_report_and_compare_on_a_smoke_sweep(smoke, capsys):
    from cxrtune.analysis.compare import compare
    from cxrtune.analysis.gradcam import GradcamConfig
    from cxrtune.analysis.report import ReportConfig, build_report

    path, uri = smoke
    runs = path / "runs"
    findings = ("pulmonary mass", "interstitial pattern")
    config = ReportConfig(tracking_uri=uri, cam=GradcamConfig(input_size=64, max_images=2, max_train_negatives=40,
                                                              findings=findings))
    start = time.perf_counter()
    report = build_report("moco_variance", runs, config=config, progress=lambda *_: None)
    with capsys.disabled():
        print(f"\nbuild_report on the smoke sweep, with Grad-CAM: {time.perf_counter() - start:.1f} s")
    html = report.html.read_text()
    assert "still running" not in html
    for anchor in ("status", "study", "search", "health", "localisation", "cost"):
        assert f'<section id="{anchor}">' in html
    assert "No few-shot results table for this sweep" in html  # no compare_methods run here
    # the trials table shows the driver's own numbers
    trials_csv = pd.read_csv(runs / "moco_variance" / "trials.csv", dtype={"trial": str})
    trials = pd.read_csv(report.folder / "tables" / "trials.csv", dtype={"trial": str})
    merged = trials.merge(trials_csv, on="trial", suffixes=("_report", "_driver"))
    assert len(merged) == 2
    for _, row in merged.iterrows():
        assert float(row["probe_auroc_20shot_report"]) == pytest.approx(row["probe_auroc_20shot_driver"], abs=5e-4)
    # localisation: every finding, for the sweep's best and random init, scored against the phantom masks
    local = pd.read_csv(report.folder / "tables" / "localisation.csv")
    assert set(local["backbone"]) == {"moco_variance", "random-resnet18"}
    assert set(local["finding"]) == set(findings)
    scores = pd.read_csv(report.folder / "tables" / "localisation_scores.csv")
    assert scores["hit"].isin([True, False]).all() and scores["energy"].between(0, 1).all()
    assert "imagenet-resnet18: absent" in html
    assert report.mlflow_run is not None
    # compare: the exported best, probed here, reproduces the sweep's own in-loop scores
    table = compare(["moco_variance", str(runs / "moco_variance" / "export")], runs)
    assert list(table["kind"]) == ["sweep best", "random init", "checkpoint"]
    for column in [c for c in table.columns if c.endswith("AUROC [95% CI]")]:
        assert table.loc[2, column] == table.loc[0, column]


@pytest.mark.slow
def test_the_end_of_sweep_report_leaves_out_localisation_and_keeps_every_other_table(smoke, capsys):
    from cxrtune.analysis.report import ReportConfig, build_report

    path, uri = smoke
    runs = path / "runs"
    start = time.perf_counter()
    report = build_report("moco_variance", runs, config=ReportConfig(localisation=False, tracking_uri=uri),
                          progress=lambda *_: None)
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nbuild_report on the smoke sweep, without the localisation section: {seconds:.1f} s")
    html = report.html.read_text()
    assert 'id="localisation"' not in html and "Grad-CAM" not in html
    for anchor in ("status", "study", "search", "health", "cost"):
        assert f'<section id="{anchor}">' in html and f'<a href="#{anchor}">' in html
    tables = {p.stem for p in (report.folder / "tables").glob("*.csv")}
    assert tables == {"status_counts", "trials", "cost", "cost_total"}
    figures = {p.stem for p in (report.folder / "figures").glob("*.png")}
    assert figures == {"search_progress", "objective_vs_params", "training_health", "cost"}
    assert html.count("data:image/png;base64,") == len(figures)
    assert report.mlflow_run is not None
