"""Ctrl-C at several points of a real `python sweeps/moco_variance.py` run, then `--resume`.

SIGINT goes to the driver's whole process group, as a terminal's Ctrl-C does. Points:
mid-trial (then resume to the end), during the summary (then resume prints the summary and
exports), before the first trial (while the cache is built), and between the
trials of the synthetic sweep (no trial running).
"""

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

from _sweep_fixtures import ROOT, remove_ray_tmpdir, results_of, short_ray_tmpdir, subprocess_env, terminal_sigint

pytestmark = pytest.mark.slow

PHANTOM_OPTIONS = ("-o", "n_pretrain=96", "-o", "train_pos=4", "-o", "val_pos=4", "-o", "train_neg=8",
                   "-o", "val_neg=8")
EPOCHS = 4


def _command(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "sweeps" / "moco_variance.py"), "--profile", "smoke", "--no-report",
            "--num-samples", "2", "--max-concurrent", "2", "--cpus", "2", "--set", f"train.epochs={EPOCHS}",
            "--storage", str(tmp / "runs"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            *PHANTOM_OPTIONS, *extra]


def _interrupt_when(command, env, cwd, log: Path, ready, timeout: float = 240) -> tuple[int, str]:
    """Run ``command`` in its own process group, send SIGINT to the group once ``ready(output)``
    holds, and return (exit code, output)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, cwd=cwd, start_new_session=True, preexec_fn=terminal_sigint,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + timeout
        try:
            while time.time() < deadline:
                if ready(log.read_text()):
                    break
                if proc.poll() is not None:
                    pytest.fail("the driver ended before the interrupt point:\n" + log.read_text()[-3000:])
                time.sleep(0.1)
            else:
                pytest.fail("the interrupt point was not reached:\n" + log.read_text()[-3000:])
            os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return code, log.read_text()


def _runs(tmp: Path):
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cxrtune/moco_variance")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("cxrtune.role") == "sweep"]
    children = {r.data.tags["cxrtune.trial_id"]: r for r in runs if r.data.tags.get("cxrtune.role") == "trial"}
    return parents, children, [r for r in runs if r.data.tags.get("cxrtune.role") == "trial"]


def _optuna_states(folder: Path) -> list[str]:
    study = optuna.load_study(study_name="moco_variance", storage=f"sqlite:///{folder / 'optuna.db'}")
    return [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]


@pytest.fixture(scope="module")
def interrupted_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sigint")
    ray_tmp = short_ray_tmpdir()
    env = subprocess_env(tmp / "cache", ray_tmp, TUNE_GLOBAL_CHECKPOINT_S="1")
    folder = tmp / "runs" / "moco_variance"
    try:
        code, first = _interrupt_when(_command(tmp), env, tmp, tmp / "first.txt",
                                      lambda out: " epoch 1:" in out)
        after_first = {"parents": _runs(tmp)[0], "children": _runs(tmp)[1], "optuna": _optuna_states(folder),
                       "export": (folder / "export").exists(),
                       "results": {t.name.rsplit("_", 1)[1]: results_of(t)
                                   for t in folder.glob("pretrain_trainable_*")}}
        # resume, and interrupt it again in its summary: the table is printed, the comparison with
        # random init and the export of the best checkpoint are under way
        code2, second = _interrupt_when(_command(tmp, "--resume"), env, tmp, tmp / "second.txt",
                                        lambda out: "trials:" in out)
        third = subprocess.run(_command(tmp, "--resume"), env=env, cwd=tmp, capture_output=True, text=True,
                               timeout=240)
        yield {"tmp": tmp, "folder": folder, "code": code, "first": first, "after_first": after_first,
               "code2": code2, "second": second, "third": third}
    finally:
        remove_ray_tmpdir(ray_tmp)


def test_ctrl_c_mid_trial_stops_cleanly_and_marks_trials_interrupted(interrupted_sweep):
    first, state = interrupted_sweep["first"], interrupted_sweep["after_first"]
    assert interrupted_sweep["code"] == 130, first[-3000:]
    assert "interrupted" in first and "--resume" in first
    assert "exported the best checkpoint" not in first
    assert not state["export"]
    assert "Traceback" not in first, first[-3000:]
    # MLflow: every trial that ran is closed as interrupted (KILLED), none as pruned or completed;
    # the sweep's parent run is not FINISHED
    children = state["children"]
    assert children, "no trial run was opened before the interrupt"
    for run in children.values():
        assert run.data.tags["cxrtune.status"] == "interrupted", run.data.tags
        assert run.info.status == "KILLED"
    assert [p.info.status for p in state["parents"]] == ["KILLED"]
    # Optuna: the cut-off trials are still open (the resume reports them), none FAIL
    assert "FAIL" not in state["optuna"] and "RUNNING" in state["optuna"], state["optuna"]


def test_resume_after_ctrl_c_continues_every_trial_from_its_checkpoint(interrupted_sweep):
    before = interrupted_sweep["after_first"]["results"]
    folder = interrupted_sweep["folder"]
    assert any(before.values()), "no trial had reported before the interrupt"
    for trial in folder.glob("pretrain_trainable_*"):
        trial_id = trial.name.rsplit("_", 1)[1]
        epochs = [r["epoch"] for r in results_of(trial)]
        # the record goes on where it stopped: no epoch twice, no restart from epoch 1
        assert epochs == sorted(set(epochs)), (trial_id, epochs)
        assert epochs[: len(before.get(trial_id, []))] == [r["epoch"] for r in before.get(trial_id, [])]
    second = interrupted_sweep["second"]
    assert "UpdateFinishedTrialError" not in second and "Traceback" not in second, second[-3000:]


def test_ctrl_c_in_the_summary_then_resume_prints_the_summary_and_exports(interrupted_sweep):
    second = interrupted_sweep["second"]
    assert interrupted_sweep["code2"] == 130, second[-3000:]
    assert "Continue the sweep with:" in second and "Traceback" not in second, second[-3000:]
    third = interrupted_sweep["third"]
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "trials:" in third.stdout and "exported the best checkpoint to" in third.stdout
    assert (interrupted_sweep["folder"] / "export" / "backbone.pt").is_file()


def test_after_the_resume_mlflow_and_optuna_agree_one_run_per_trial(interrupted_sweep):
    tmp, folder = interrupted_sweep["tmp"], interrupted_sweep["folder"]
    parents, children, all_children = _runs(tmp)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(all_children) == len(children) == 2  # no duplicate run for a resumed trial
    for run in children.values():
        assert run.data.tags["cxrtune.status"] in ("completed", "pruned"), run.data.tags
        assert run.info.status == "FINISHED"
    # Optuna agrees with MLflow: a trial ASHA stopped is PRUNED there too, nothing is left RUNNING
    expected = sorted("PRUNED" if r.data.tags["cxrtune.status"] == "pruned" else "COMPLETE" for r in children.values())
    assert sorted(_optuna_states(folder)) == expected


def test_ctrl_c_before_the_first_trial_leaves_a_sweep_that_starts_again(tmp_path):
    ray_tmp = short_ray_tmpdir()
    env = subprocess_env(tmp_path / "cache", ray_tmp)
    try:
        # interrupted while the phantom's cache is being built, before Ray starts
        code, out = _interrupt_when(_command(tmp_path), env, tmp_path, tmp_path / "first.txt",
                                    lambda text: "sweep moco_variance: profile smoke" in text)
        assert code == 130, out[-3000:]
        assert "No trial had started" in out and "Traceback" not in out, out[-3000:]
        resumed = subprocess.run(_command(tmp_path, "--resume"), env=env, cwd=tmp_path, capture_output=True,
                                 text=True, timeout=120)
        assert resumed.returncode == 2 and "nothing to resume" in resumed.stderr, resumed.stderr[-2000:]
        # the same command starts the sweep (no "already exists"); stop it once it is training
        code, out = _interrupt_when(_command(tmp_path), env, tmp_path, tmp_path / "again.txt",
                                    lambda text: " epoch 1:" in text)
        assert code == 130 and "already exists" not in out, out[-3000:]
    finally:
        remove_ray_tmpdir(ray_tmp)


DRIVER = Path(__file__).with_name("_sweep_driver.py")


def test_ctrl_c_between_trials_then_resume_runs_the_rest(tmp_path):
    ray_tmp = short_ray_tmpdir()
    env = subprocess_env(tmp_path / "cache", ray_tmp, TUNE_GLOBAL_CHECKPOINT_S="1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, str(DRIVER), "--storage", str(tmp_path / "runs"), "--uri", uri,
               "--markers", str(tmp_path / "m"), "--samples", "3", "--sleep", "0.2", "--concurrent", "1"]
    done = tmp_path / "m" / "done"
    try:
        code, out = _interrupt_when(command, env, tmp_path, tmp_path / "first.txt",
                                    lambda text: done.is_dir() and len(list(done.iterdir())) == 1)
        assert code == 130 and "INTERRUPTED" in out and "Traceback" not in out, out[-3000:]
        resumed = subprocess.run([*command, "--resume"], env=env, cwd=tmp_path, capture_output=True, text=True,
                                 timeout=240)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "TRIALS 3 ERRORS 0" in resumed.stdout
        assert len(list(done.iterdir())) == 3
        client = mlflow.tracking.MlflowClient(uri)
        experiment = client.get_experiment_by_name("cxrtune/synthetic")
        children = [r for r in client.search_runs([experiment.experiment_id])
                    if r.data.tags.get("cxrtune.role") == "trial"]
        assert len(children) == 3 and {r.info.status for r in children} == {"FINISHED"}
        study = optuna.load_study(study_name="synthetic", storage=f"sqlite:///{tmp_path / 'runs' / 'synthetic' / 'optuna.db'}")
        assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 3
        # the seed point ran once, first
        assert json.loads(json.dumps(sorted(study.trials, key=lambda t: t.number)[0].params)) == {"x": 0.3}
    finally:
        remove_ray_tmpdir(ray_tmp)
