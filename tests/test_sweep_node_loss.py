"""`python sweeps/moco_variance.py` on a two-node Ray cluster that loses its worker node mid-trial.

Two raylets run on this machine (``ray.cluster_utils.Cluster``), one CPU each, so the sweep's two
trials run one per node. Once the trial on the worker node has a checkpoint Tune knows of, the
worker node is removed without a graceful shutdown (its raylet and the trial's worker die, as on a
lost machine). Tune's ``FailureConfig(max_failures=2)`` retries that trial from its checkpoint on
the surviving head node when the other trial frees its CPU; the sweep finishes with both trials
completed, one MLflow run per trial, the retried trial's run the one it had before the loss.

Which node a trial runs on: both raylets share the machine's IP, so ``node_ip``/``hostname`` in
Tune's results cannot tell them apart; the result's ``pid`` can, since Ray's workers are child
processes of their node's raylet.
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

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from _sweep_fixtures import (ROOT, engine_metrics, remove_ray_tmpdir, results_of, short_ray_tmpdir,  # noqa: E402
                             subprocess_env, tune_knows_checkpoint, write_eval_archive)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads process parents from /proc")]

#: the smoke sweep of test_sweep_kill_real: 96 phantom pretraining images, validation on a csv archive
PHANTOM_OPTIONS = ("-o", "n_pretrain=96", "-o", "train_pos=1", "-o", "val_pos=1", "-o", "train_neg=2",
                   "-o", "val_neg=2")
#: GCS declares a silent node dead after period x threshold (Ray's defaults: 3 s x 5)
FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                   "health_check_timeout_ms": 500}


def _parent(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _runs_under(pid: int, ancestor: int) -> bool:
    """Whether process ``pid`` (alive) descends from ``ancestor``."""
    seen = 0
    while pid and pid > 1 and seen < 32:
        if pid == ancestor:
            return True
        pid = _parent(pid)
        seen += 1
    return False


def _raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


@pytest.fixture(scope="module")
def node_lost(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nodeloss")
    archive = write_eval_archive(tmp / "padchest-like")
    ray_tmp = short_ray_tmpdir()
    saved_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = ray_tmp  # both raylets' session files, removed below
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": 128 * 1024**2,
        "_system_config": FAST_NODE_DEATH})
    folder = tmp / "runs" / "moco_variance"
    log = tmp / "console.txt"
    try:
        worker = cluster.add_node(num_cpus=1, object_store_memory=128 * 1024**2)
        cluster.wait_for_nodes()
        worker_raylet = _raylet_pid(worker)
        env = subprocess_env(tmp / "cache", ray_tmp, TUNE_GLOBAL_CHECKPOINT_S="1")
        command = [sys.executable, str(ROOT / "sweeps" / "moco_variance.py"), "--profile", "smoke", "--no-report",
                   "--num-samples", "2", "--max-concurrent", "2", "--address", cluster.address,
                   "--storage", str(tmp / "runs"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                   "--eval-source", "csv", "--eval-root", str(archive["root"]), *PHANTOM_OPTIONS]
        started = time.time()
        with open(log, "w") as out:
            proc = subprocess.Popen(command, env=env, cwd=tmp, start_new_session=True, stdout=out,
                                    stderr=subprocess.STDOUT, text=True)
            lost = placement = None
            deadline = time.time() + 240
            try:
                while time.time() < deadline and lost is None:
                    if proc.poll() is not None:
                        pytest.fail("the sweep ended before the worker node was lost:\n" + log.read_text()[-3000:])
                    trials = sorted(folder.glob("pretrain_trainable_*")) if folder.is_dir() else []
                    placement = {}
                    for trial in trials:
                        results = results_of(trial)
                        if not results or results[-1].get("final"):
                            continue
                        pid = int(results[-1]["pid"])
                        placement[trial.name] = "worker" if _runs_under(pid, worker_raylet) else "head"
                        if (placement[trial.name] == "worker"
                                and tune_knows_checkpoint(folder, trial.name.rsplit("_", 1)[1])):
                            lost = trial
                    if lost is None:
                        time.sleep(0.2)
                if lost is None:
                    pytest.fail(f"no trial on the worker node reached a checkpoint in time ({placement}):\n"
                                + log.read_text()[-3000:])
                before = {"results": results_of(lost), "engine": engine_metrics(lost)}
                lost_at = time.time()
                cluster.remove_node(worker, allow_graceful=False)
                returncode = proc.wait(timeout=300)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        times = {"to_loss_s": round(lost_at - started, 1), "total_s": round(time.time() - started, 1)}
        print(f"node-loss sweep: worker node removed after {times['to_loss_s']} s, sweep done after {times['total_s']} s")
        yield {"tmp": tmp, "folder": folder, "lost": lost, "before": before, "returncode": returncode,
               "console": log.read_text(), "placement": placement, "times": times}
    finally:
        cluster.shutdown()
        if saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmpdir
        remove_ray_tmpdir(ray_tmp)


def test_the_sweep_finishes_with_every_trial_completed(node_lost):
    console = node_lost["console"]
    assert node_lost["returncode"] == 0, console[-3000:]
    assert "trials:" in console and "exported the best checkpoint to" in console, console[-3000:]
    table = pd.read_csv(node_lost["folder"] / "trials.csv")
    assert sorted(table["status"]) == ["completed", "completed"], table
    assert sorted(table["epochs"]) == [2, 2], table
    lost_id = node_lost["lost"].name.rsplit("_", 1)[1]
    assert f"trial {lost_id} completed after epoch 2" in console
    # the lost trial ran on the worker node; any other trial seen running then was on the head
    # (the other may not have reported yet when the worker's trial reached its checkpoint)
    placement = node_lost["placement"]
    assert placement[node_lost["lost"].name] == "worker", placement
    assert all(where == "head" for name, where in placement.items() if name != node_lost["lost"].name), placement


def test_the_lost_trial_was_retried_from_its_checkpoint(node_lost):
    lost, before = node_lost["lost"], node_lost["before"]
    assert [r["epoch"] for r in before["results"]] == [1]
    # Tune recorded one failure of the trial, the loss of its node, and retried it
    failures = (lost / "error.txt").read_text()
    # Ray words the loss as the node's death or, when the actor's socket closes first, as the actor
    # being unavailable (seen in a CI run): either way one failure, the lost node's
    assert failures.count("Failure #") == 1, failures
    assert "node has died" in failures or ("is unavailable" in failures and "Socket closed" in failures), failures
    results = results_of(lost)
    # Tune's record goes on from epoch 1 in a new worker process: no second epoch 1
    assert [r["epoch"] for r in results] == [1, 2], results
    assert results[1]["pid"] != results[0]["pid"]
    assert results[1]["iterations_since_restore"] == 1
    # the engine resumed from its epoch-1 checkpoint: the epoch-1 line is the one written before
    # the loss, and epoch 2 carries the step counter and the schedule on
    engine = [json.loads(line) for line in engine_metrics(lost)]
    assert engine_metrics(lost)[0] == before["engine"][0]
    assert [int(e["epoch"]) for e in engine] == [1, 2]
    assert int(engine[1]["step"]) == 2 * int(engine[0]["step"])
    assert float(engine[1]["lr"]) < float(engine[0]["lr"])
    assert "continuing from" in (lost / "trial.log").read_text()


def test_each_trial_keeps_one_mlflow_run_through_the_retry(node_lost):
    tmp = node_lost["tmp"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cxrtune/moco_variance")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("cxrtune.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("cxrtune.role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trial_ids = sorted(c.data.tags["cxrtune.trial_id"] for c in children)
    folders = sorted(p.name.rsplit("_", 1)[1] for p in node_lost["folder"].glob("pretrain_trainable_*"))
    assert trial_ids == folders and len(set(trial_ids)) == 2, (trial_ids, folders)
    lost_id = node_lost["lost"].name.rsplit("_", 1)[1]
    for child in children:
        assert child.data.tags["cxrtune.status"] == "completed" and child.info.status == "FINISHED", child.data.tags
        # one metric point per epoch, the retried trial's epoch 1 not logged twice
        assert [m.step for m in client.get_metric_history(child.info.run_id, "ssl_loss")] == [1, 2]
    lost_run = next(c for c in children if c.data.tags["cxrtune.trial_id"] == lost_id)
    names = {a.path for a in client.list_artifacts(lost_run.info.run_id)}
    assert {"metrics.jsonl", "last_checkpoint"} <= names, names

