"""`python sweeps/moco_variance.py` with the real pretraining trainable, killed and resumed.

One smoke-size sweep serves three checks: it pretrains on the phantom's ``pretrain`` subset and
validates on a second source (a ``csv`` archive of real PNGs); its driver is killed with SIGKILL
once one trial has finished and the next has a checkpoint Tune knows of; ``--resume`` then
finishes it. The console of both runs must hold our lines and the summary, not Ray's tables.
Trials run one at a time so that the kill lands between a finished and a running trial.
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
import pandas as pd
import pytest

from _sweep_fixtures import (EVAL_FINDINGS, ROOT, engine_metrics, remove_ray_tmpdir, results_of, short_ray_tmpdir,
                             subprocess_env, tune_knows_checkpoint, write_eval_archive)

pytestmark = pytest.mark.slow

#: what Ray prints to a console left to itself (its tables, banners and forwarded worker lines)
RAY_NOISE = ("Configuration for experiment", "╭", "Trial status", "View detailed results here",
             "Started a local Ray instance", "(pretrain_trainable pid=", "Checkpoint successfully created",
             "Token authentication")


#: the phantom renders only its pretraining images (and the fewest few-shot ones it allows: validation
#: uses the csv archive): 96 images, 6 steps of 16 per epoch
PHANTOM_OPTIONS = ("-o", "n_pretrain=96", "-o", "train_pos=1", "-o", "val_pos=1", "-o", "train_neg=2",
                   "-o", "val_neg=2")
PRETRAIN_STEPS = 96 // 16


def _command(tmp: Path, eval_root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "sweeps" / "moco_variance.py"), "--profile", "smoke", "--no-report",
            "--num-samples", "2", "--max-concurrent", "1", "--cpus", "2",
            "--storage", str(tmp / "runs"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            "--eval-source", "csv", "--eval-root", str(eval_root), *PHANTOM_OPTIONS, *extra]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("killreal")
    archive = write_eval_archive(tmp / "padchest-like")
    ray_tmp = short_ray_tmpdir()
    # Tune snapshots its experiment state every 10 s at first; a 1 s period lets the test reach
    # the kill point (a checkpoint Tune has recorded) within the second trial's two epochs.
    env = subprocess_env(tmp / "cache", ray_tmp, TUNE_GLOBAL_CHECKPOINT_S="1")
    folder = tmp / "runs" / "moco_variance"
    first_log = tmp / "first-console.txt"
    try:
        with open(first_log, "w") as out:
            proc = subprocess.Popen(_command(tmp, archive["root"]), env=env, cwd=tmp, start_new_session=True,
                                    stdout=out, stderr=subprocess.STDOUT, text=True)
            deadline = time.time() + 180
            finished = running = None
            while time.time() < deadline:
                trials = sorted(folder.glob("pretrain_trainable_*")) if folder.is_dir() else []
                done = [t for t in trials if (r := results_of(t)) and r[-1].get("final")]
                busy = [t for t in trials if t not in done and results_of(t)
                        and tune_knows_checkpoint(folder, t.name.rsplit("_", 1)[1])]
                if done and busy:
                    finished, running = done[0], busy[0]
                    break
                if proc.poll() is not None:
                    pytest.fail("the driver ended before the kill point:\n" + first_log.read_text()[-3000:])
                time.sleep(0.2)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("the sweep did not reach the kill point in time:\n" + first_log.read_text()[-3000:])
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        before = {"finished_results": (finished / "result.json").read_text(),
                  "finished_engine": engine_metrics(finished),
                  "running_results": results_of(running), "running_engine": engine_metrics(running),
                  "episodes": [(folder / name).read_bytes() for name in ("episodes.parquet", "report_episodes.parquet")]}
        resumed = subprocess.run(_command(tmp, archive["root"], "--resume"), env=env, cwd=tmp,
                                 capture_output=True, text=True, timeout=240)
        in_ray_tmp = sorted(str(p.relative_to(ray_tmp)) for p in Path(ray_tmp).rglob("*.pt"))
        yield {"tmp": tmp, "folder": folder, "archive": archive, "first": first_log.read_text(),
               "resumed": resumed, "finished": finished, "running": running, "before": before,
               "in_ray_tmp": in_ray_tmp}
    finally:
        remove_ray_tmpdir(ray_tmp)


def test_the_resumed_sweep_finishes_and_prints_its_summary(killed_and_resumed):
    resumed = killed_and_resumed["resumed"]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out = resumed.stdout
    assert "trials:" in out and "exported the best checkpoint to" in out
    table = pd.read_csv(killed_and_resumed["folder"] / "trials.csv")
    assert sorted(table["status"]) == ["completed", "completed"]
    assert sorted(table["epochs"]) == [2, 2]
    # staged copies of Tune checkpoints (one was half-written at the kill) do not stay behind,
    # and trials write their files into the sweep folder, not into Ray's session folders
    assert not list(killed_and_resumed["folder"].glob("pretrain_trainable_*/work/ckpt-*"))
    assert killed_and_resumed["in_ray_tmp"] == []
    assert all((t / "trial.log").is_file() for t in (killed_and_resumed["finished"], killed_and_resumed["running"]))


def test_the_resume_reads_back_the_validation_and_report_episodes_it_sampled(killed_and_resumed):
    folder, before = killed_and_resumed["folder"], killed_and_resumed["before"]
    after = [(folder / name).read_bytes() for name in ("episodes.parquet", "report_episodes.parquet")]
    assert after == before["episodes"]
    assert "report episodes (test images of other patients" in killed_and_resumed["resumed"].stdout


def test_the_interrupted_trial_continues_from_its_checkpoint(killed_and_resumed):
    running, before = killed_and_resumed["running"], killed_and_resumed["before"]
    epochs_before = [r["epoch"] for r in before["running_results"]]
    assert epochs_before == [1]
    epochs = [r["epoch"] for r in results_of(running)]
    # Tune's record goes on from epoch 1: no second epoch 1, no restart from scratch
    assert epochs == [1, 2], epochs
    # the engine resumed from its epoch-1 checkpoint: its log keeps the epoch-1 line written
    # before the kill and adds epoch 2 with the step counter and schedule carried on
    engine = [json.loads(line) for line in engine_metrics(running)]
    assert engine_metrics(running)[0] == before["running_engine"][0]
    assert [int(e["epoch"]) for e in engine] == [1, 2]
    assert int(engine[1]["step"]) == 2 * int(engine[0]["step"])
    assert float(engine[1]["lr"]) < float(engine[0]["lr"])  # cosine decay went on, no new warmup


def test_no_finished_trial_is_retrained(killed_and_resumed):
    finished, before = killed_and_resumed["finished"], killed_and_resumed["before"]
    assert (finished / "result.json").read_text() == before["finished_results"]
    assert engine_metrics(finished) == before["finished_engine"]


def test_each_trial_has_exactly_one_mlflow_run_with_both_sources(killed_and_resumed):
    tmp = killed_and_resumed["tmp"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cxrtune/moco_variance")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("cxrtune.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("cxrtune.role") == "trial"]
    assert len(parents) == 1
    trial_ids = [c.data.tags["cxrtune.trial_id"] for c in children]
    assert len(trial_ids) == 2 and len(set(trial_ids)) == 2
    expected = {killed_and_resumed["finished"].name.rsplit("_", 1)[1], killed_and_resumed["running"].name.rsplit("_", 1)[1]}
    assert set(trial_ids) == expected
    parent = parents[0]
    assert parent.data.tags["cxrtune.source"] == "phantom" and parent.data.tags["cxrtune.eval_source"] == "csv"
    assert parent.data.params["data.source"] == "phantom" and parent.data.params["data.eval_source"] == "csv"
    assert parent.data.params["data.eval_root"] == str(killed_and_resumed["archive"]["root"])
    inputs = json.loads((killed_and_resumed["folder"] / "inputs.json").read_text())  # what the trainable was given
    assert (inputs["trial.source"], inputs["trial.eval_source"]) == ("phantom", "csv")
    assert inputs["trial.eval_cache"] == parent.data.params["data.eval_cache"] != inputs["trial.cache"]
    for child in children:
        assert child.data.tags["cxrtune.status"] == "completed" and child.info.status == "FINISHED"
        # the data is the parent's description, not a trial's params (nor a searched value)
        assert not [k for k in child.data.params if k.startswith(("trial.cache", "trial.episodes", "trial.eval_",
                                                                   "trial.source", "data."))]
        assert [m.step for m in client.get_metric_history(child.info.run_id, "ssl_loss")] == [1, 2]
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"metrics.jsonl", "initial_probe_results.parquet", "last_checkpoint"} <= names, names


def test_pretraining_reads_the_phantom_and_the_probe_the_eval_source(killed_and_resumed):
    folder, archive = killed_and_resumed["folder"], killed_and_resumed["archive"]
    episodes = pd.read_parquet(folder / "episodes.parquet")
    ids = {i for col in ("train_ids", "test_ids") for row in episodes[col] for i in row}
    assert ids and ids <= archive["ids"]
    for trial in (killed_and_resumed["finished"], killed_and_resumed["running"]):
        # the probe of every checkpoint scored the eval source's findings, nothing of the phantom's
        for checkpoint in sorted(trial.glob("checkpoint_*")):
            probe = pd.read_parquet(checkpoint / "probe_results.parquet")
            assert set(probe["disease"]) == set(EVAL_FINDINGS)
        # pretraining batches came from the phantom's pretraining images, not the evaluation archive
        first = json.loads(engine_metrics(trial)[0])
        assert int(first["step"]) == PRETRAIN_STEPS
    assert "pretrained on phantom, validated on csv" in killed_and_resumed["resumed"].stdout


def test_the_console_shows_our_lines_and_ray_output_goes_to_the_log(killed_and_resumed):
    first, resumed = killed_and_resumed["first"], killed_and_resumed["resumed"]
    for console in (first, resumed.stdout + resumed.stderr):
        noise = [n for n in RAY_NOISE if n in console]
        assert not noise, (noise, console[-3000:])
    running_id = killed_and_resumed["running"].name.rsplit("_", 1)[1]
    assert f"trial {running_id} epoch 1:" in first
    assert f"trial {running_id} epoch 2:" in resumed.stdout
    assert f"trial {running_id} completed after epoch 2" in resumed.stdout
    log = (killed_and_resumed["folder"] / "ray-console.log").read_text()
    assert "Configuration for experiment" in log and "Started a local Ray instance" in log
