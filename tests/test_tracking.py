"""MLflow bookkeeping on a real SQLite store: nesting, re-attachment after a restart, no secrets."""

from __future__ import annotations

import pytest

mlflow = pytest.importorskip("mlflow")

from cxrtune.tracking import PARENT_TAG, SweepTracker, loggable_metrics, loggable_params


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_child_runs_nest_under_one_parent_and_survive_a_restart(uri):
    first = SweepTracker("moco_variance", uri=uri)
    run_a = first.child_run("trial_a")
    first.log_params(run_a, {"moco.temperature": 0.07, "optim.lr": 0.045})
    first.log_metrics(run_a, {"probe_auroc_5shot": 0.61, "ssl_loss": 7.9}, step=1)

    # a new driver process (a resumed sweep) finds the same parent and the same child run
    second = SweepTracker("moco_variance", uri=uri)
    assert second.parent_run_id == first.parent_run_id
    assert second.child_run("trial_a") == run_a
    second.log_params(run_a, {"moco.temperature": 0.07, "optim.lr": 0.045})  # no error on re-log
    second.log_metrics(run_a, {"probe_auroc_5shot": 0.64}, step=2)
    run_b = second.child_run("trial_b")
    second.end_trial("trial_a", "completed")
    second.end_trial("trial_b", "diverged")

    runs = mlflow.tracking.MlflowClient(uri).search_runs([second.experiment_id])
    assert len(runs) == 3  # one parent, two trials: no duplicate after the restart
    children = {r.info.run_id: r for r in runs if r.data.tags.get(PARENT_TAG)}
    assert set(children) == {run_a, run_b}
    assert all(r.data.tags[PARENT_TAG] == first.parent_run_id for r in children.values())
    history = mlflow.tracking.MlflowClient(uri).get_metric_history(run_a, "probe_auroc_5shot")
    assert [(m.step, m.value) for m in history] == [(1, 0.61), (2, 0.64)]
    assert children[run_b].data.tags["cxrtune.status"] == "diverged"
    assert second.trial_runs() == {"trial_a": run_a, "trial_b": run_b}


def test_params_leave_out_secrets_and_metrics_keep_finite_numbers():
    params = loggable_params({"optim.lr": 0.1, "storage.aws_secret_key": "x", "tracking.token": "y",
                              "storage.uri": "s3://user:pw@host/bucket", "data.source": "nih"})
    assert params == {"optim.lr": "0.1", "data.source": "nih"}
    metrics = loggable_metrics({"auroc@5": 0.5, "loss": float("nan"), "done": True, "epoch": 3, "note": "x"})
    assert metrics == {"auroc_5": 0.5, "epoch": 3.0}
