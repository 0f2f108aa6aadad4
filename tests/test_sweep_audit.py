"""The pruning audit: a seeded share of the trials ASHA stops runs to the end, tagged and left out
of the selection, without changing ASHA's decisions on the others; the report's section on how far
early rungs predict the final objective, on a sweep with known correlations."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest

from _sweep_fixtures import remove_ray_tmpdir, short_ray_tmpdir, subprocess_env
from cxrtune.analysis.document import Table
from cxrtune.analysis.sections import fidelity_section
from cxrtune.analysis.sweep_folder import SweepFolder as ReportFolder
from _sweep_driver import synthetic_objective
from cxrtune.sweep.scheduler import SweepASHA, audit_draw
from ray.tune.schedulers import TrialScheduler
from cxrtune.sweepfolder import AUDIT_FILE, SweepFolder, read_audit
from cxrtune.tune_files import read_results, trial_dirs, trial_id

DRIVER = Path(__file__).with_name("_sweep_driver.py")
ITERATIONS = 6


def _sweep(tmp_path: Path, name: str, fraction: float) -> Path:
    """Three trials one after the other (the study's point x = 0.3 first), ASHA with grace 1 and
    reduction 2 over 6 iterations; returns the sweep folder."""
    ray_tmp = short_ray_tmpdir()
    storage = tmp_path / name
    try:
        done = subprocess.run(
            [sys.executable, str(DRIVER), "--storage", str(storage), "--uri", f"sqlite:///{tmp_path / name}.db",
             "--markers", str(tmp_path / f"{name}-markers"), "--samples", "3", "--concurrent", "1", "--sleep", "0.05",
             "--audit-fraction", str(fraction)],
            env=subprocess_env(tmp_path / "cache", ray_tmp), capture_output=True, text=True, timeout=300)
    finally:
        remove_ray_tmpdir(ray_tmp)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return storage / "synthetic"


def _runs(folder: Path) -> dict[str, list[dict]]:
    return {trial_id(d): read_results(d) for d in trial_dirs(folder)}


class _Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def _plain_asha_stops(xs: list[float]) -> set[float]:
    """The x of every trial plain ASHA (same grace, reduction and budget) stops, trials run one
    after the other as in the sweep: Tune's calls to the scheduler, replayed."""
    asha = SweepASHA(time_attr="training_iteration", metric="objective", mode="max", max_t=ITERATIONS,
                       grace_period=1, reduction_factor=2)
    stopped = set()
    for k, x in enumerate(xs):
        trial = _Trial(f"t{k}")
        asha.on_trial_add(None, trial)
        for iteration in range(1, ITERATIONS + 1):
            result = {"training_iteration": iteration, "objective": synthetic_objective(x, iteration, True)}
            if iteration < ITERATIONS and asha.on_trial_result(None, trial, result) == TrialScheduler.STOP:
                stopped.add(x)
                asha.on_trial_complete(None, trial, result)
                break
        else:
            asha.on_trial_complete(None, trial, result)
    return stopped


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    return {"audited": _sweep(tmp, "audited", 1.0), "tmp": tmp}


@pytest.mark.slow
def test_audited_trials_run_to_the_end_and_asha_decides_the_rest_as_without_the_audit(sweeps):
    audited = _runs(sweeps["audited"])
    started = sorted(audited, key=lambda t: audited[t][0]["timestamp"] - audited[t][0]["time_total_s"])
    x_of = {t: audited[t][0]["config"]["x"] for t in started}
    assert x_of[started[0]] == 0.3  # the study's point first, then TPE's seeded random points
    stopped = _plain_asha_stops([x_of[t] for t in started])
    assert stopped, "the crossing curves must make ASHA stop a trial"
    listed = read_audit(sweeps["audited"] / AUDIT_FILE)
    # with fraction 1 every trial ASHA stopped ran on, and only those: ASHA's decisions are unchanged
    assert sorted(x_of[t] for t in listed) == sorted(stopped)
    assert all(len(r) == ITERATIONS and r[-1]["final"] for r in audited.values())
    record = json.loads((sweeps["audited"] / AUDIT_FILE).read_text())
    assert record["fraction"] == 1.0 and record["seed"] == 0


@pytest.mark.slow
def test_audited_trials_are_tagged_in_mlflow_and_complete_in_optuna(sweeps):
    listed = read_audit(sweeps["audited"] / AUDIT_FILE)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{sweeps['tmp'] / 'audited'}.db")
    runs = [r for r in client.search_runs([client.get_experiment_by_name("cxrtune/synthetic").experiment_id])
            if "cxrtune.trial_id" in r.data.tags]
    tagged = {r.data.tags["cxrtune.trial_id"] for r in runs if r.data.tags.get("cxrtune.audit") == "true"}
    assert tagged == listed and len(runs) == 3
    study = optuna.load_study(study_name="synthetic", storage=f"sqlite:///{sweeps['audited'] / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3  # trained to the end: full-fidelity values


@pytest.mark.slow
def test_selection_leaves_audited_trials_out_unless_asked(sweeps):
    folder = SweepFolder(sweeps["audited"])
    listed = folder.audited()
    pick = folder.best_checkpoint("objective")
    everyone = folder.best_checkpoint("objective", include_audit=True)
    assert pick.trial_id not in listed
    best_kept = max(c.report["objective"] for c in folder.checkpoints("objective", include_audit=True)
                    if c.trial_id not in listed)
    assert pick.report["objective"] == best_kept
    assert everyone.report["objective"] >= pick.report["objective"]
    # the crossing curves: a trial ASHA stopped (x above 0.3) ends above the study's point
    assert everyone.trial_id in listed


@pytest.mark.slow
def test_the_report_measures_rung_fidelity_and_regret_from_the_audit(sweeps):
    from cxrtune.analysis.sweep_folder import load_sweep

    sweep = load_sweep("synthetic", sweeps["audited"].parent, objective="objective")
    assert sweep.trials["audit"].sum() == len(read_audit(sweeps["audited"] / AUDIT_FILE))
    section = fidelity_section(sweep)
    table = section.data["fidelity_full"]
    assert table["epoch"].tolist() == [1, 2, 3, 4, 5] and (table["trials"] == 3).all()
    text = " ".join(getattr(b, "text", "") for b in section.blocks)
    assert "Regret of ASHA's pick" in text and "a trial ASHA stopped would have ended better" in text


# -- the section on a sweep with known correlations (no Ray) -------------------------------------
def _report_folder(tmp_path: Path, by_epoch: dict[int, list[float]], audited: list[bool]) -> ReportFolder:
    n = len(audited)
    last = max(by_epoch)
    history = pd.DataFrame([{"trial": f"t{k}", "epoch": e, "objective_epoch": e, "probe_auroc_20shot": v[k]}
                            for e, v in by_epoch.items() for k in range(n)])
    trials = pd.DataFrame({"trial": [f"t{k}" for k in range(n)], "status": "completed", "audit": audited,
                           "epochs": last, "objective": by_epoch[last], "random_init": 0.5,
                           "_last": [{"final": True}] * n})
    return ReportFolder(name="s", folder=tmp_path, objective="probe_auroc_20shot", trials=trials, history=history,
                        searched={}, running=False, notes=[])


def test_fidelity_section_on_known_correlations(tmp_path):
    final = [0.60, 0.62, 0.64, 0.66, 0.68, 0.70]
    sweep = _report_folder(tmp_path, {1: final[::-1], 2: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 3: final},
                           audited=[False, False, False, True, True, True])
    section = fidelity_section(sweep)
    table = section.data["fidelity_full"]
    assert table["spearman"].tolist() == pytest.approx([-1.0, 1.0])
    assert table["trials"].tolist() == [6, 6]
    shown = next(b for b in section.blocks if isinstance(b, Table)).frame
    assert shown["95% CI"].tolist() == ["[-1.000, -1.000]", "[1.000, 1.000]"]
    text = " ".join(getattr(b, "text", "") for b in section.blocks)
    # best fully trained: t5 (0.70, audited); best ASHA kept: t2 (0.64)
    assert "Regret of ASHA's pick: 0.060" in text and "t5" in text and "t2" in text


def test_fidelity_section_without_an_audit_says_how_to_run_one(tmp_path):
    sweep = _report_folder(tmp_path, {1: [0.5, 0.6], 2: [0.55, 0.65]}, audited=[False, False])
    text = " ".join(getattr(b, "text", "") for b in fidelity_section(sweep).blocks)
    assert "--audit-fraction" in text and "needs at least 3" in text


def test_audit_draws_are_seeded_and_spread():
    ids = [f"{k:05d}" for k in range(2000)]
    draws = [audit_draw(0, t) for t in ids]
    assert draws == [audit_draw(0, t) for t in ids] and draws != [audit_draw(1, t) for t in ids]
    assert all(0 <= d < 1 for d in draws)
    assert abs(sum(d < 0.3 for d in draws) / len(draws) - 0.3) < 0.04
    assert not math.isnan(sum(draws))
