"""A sweep whose driver is killed mid-run resumes without rerunning finished trials, without
duplicate MLflow runs, without evaluating the seed point twice and without orphaned Optuna trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from _sweep_fixtures import remove_ray_tmpdir, short_ray_tmpdir, subprocess_env

DRIVER = Path(__file__).with_name("_sweep_driver.py")


def _driver(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, str(DRIVER), "--storage", str(tmp_path / "runs"),
            "--uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--markers", str(tmp_path / "markers"), *extra]


@pytest.fixture
def ray_tmp():
    path = short_ray_tmpdir()
    yield path
    remove_ray_tmpdir(path)


@pytest.mark.slow
def test_killed_sweep_resumes_exactly(tmp_path, ray_tmp):
    def _env() -> dict[str, str]:
        return subprocess_env(tmp_path / "cache", ray_tmp, RAY_DEDUP_LOGS="0")

    markers = tmp_path / "markers"
    proc = subprocess.Popen(_driver(tmp_path), env=_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    # kill once two trials are done and a third has reported at least one checkpoint
    while time.time() < deadline:
        done = list((markers / "done").glob("*")) if (markers / "done").exists() else []
        trial_dirs = list((tmp_path / "runs" / "synthetic").glob("synthetic_trainable_*"))
        busy = [d for d in trial_dirs if d.name.split("_")[2] not in {p.name.split("_")[0] for p in done}
                and list(d.glob("checkpoint_*"))]
        if len(done) >= 2 and busy:
            break
        if proc.poll() is not None:
            pytest.fail("the driver finished before it could be killed:\n" + proc.stdout.read())
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the sweep did not reach the kill point in time")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    finished_before = {p.name for p in (markers / "done").glob("*")}

    resumed = subprocess.run(_driver(tmp_path, "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "TRIALS 4 ERRORS 0" in resumed.stdout

    starts = [p.name.rsplit("-", 1) for p in (markers / "starts").glob("*")]
    by_trial: dict[str, list[int]] = {}
    for trial, iteration in starts:
        by_trial.setdefault(trial, []).append(int(iteration))
    final_ids = set(json.loads(resumed.stdout.split("IDS", 1)[1].strip().splitlines()[0]))
    assert len(final_ids) == 4 and final_ids <= set(by_trial)
    # no trial ever trains from scratch twice; a trial that had finished before the kill (even if
    # Tune had not yet recorded it) restarts only at its final checkpoint and does no work again
    assert all(its.count(0) == 1 for its in by_trial.values()), by_trial
    for trial in finished_before:
        assert all(i in (0, 6) for i in by_trial[trial]), f"finished trial {trial} was rerun: {by_trial[trial]}"
    continued = [t for t in final_ids if len(by_trial[t]) > 1]
    # the trial interrupted mid-run continued from its checkpoint, not from iteration 0
    assert continued and all(sorted(by_trial[t])[1] > 0 for t in continued), by_trial

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cxrtune/synthetic")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags.get("cxrtune.role") == "trial"]
    parents = [r for r in runs if r.data.tags.get("cxrtune.role") == "sweep"]
    assert len(parents) == 1
    per_trial: dict[str, int] = {}
    for r in children:
        per_trial[r.data.tags["cxrtune.trial_id"]] = per_trial.get(r.data.tags["cxrtune.trial_id"], 0) + 1
    assert {t: per_trial.get(t) for t in final_ids} == {t: 1 for t in final_ids}
    for r in children:
        expected = "completed" if r.data.tags["cxrtune.trial_id"] in final_ids else "lost"
        assert r.data.tags["cxrtune.status"] == expected
        assert r.info.status != "RUNNING"

    study = optuna.load_study(study_name="synthetic", storage=f"sqlite:///{tmp_path / 'runs' / 'synthetic' / 'optuna.db'}")
    states = [t.state for t in study.get_trials()]
    assert optuna.trial.TrialState.RUNNING not in states
    seeded = [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)) if abs(t.params["x"] - 0.3) < 1e-12]
    assert len(seeded) == 1, [t.params for t in study.get_trials()]
