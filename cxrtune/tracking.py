"""MLflow bookkeeping for sweeps: one parent run per sweep, one child run per trial.

Runs are found again by tags rather than remembered in memory, so a sweep that is restored after
a crash re-attaches every trial to the run it already had (Ray's stock ``MLflowLoggerCallback``
keeps that map in memory and opens duplicates after ``Tuner.restore``):

- the parent run carries ``cxrtune.sweep = <name>``, ``cxrtune.sweep_id = <id>`` and
  ``cxrtune.role = sweep``;
- each child carries ``cxrtune.sweep``, ``cxrtune.sweep_id``, ``cxrtune.trial_id = <Tune trial id>``,
  ``cxrtune.role = trial`` and ``mlflow.parentRunId`` (which nests it under the parent in the UI).

Runs are looked up by the sweep's id (``sweep.json`` in its folder, :mod:`cxrtune.sweepstate`),
never by its name alone: two sweeps of one name in one store never share or touch each other's runs.

Only the sweep driver writes (SQLite allows one writer at a time). No Ray import here.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SWEEP_TAG = "cxrtune.sweep"
SWEEP_ID_TAG = "cxrtune.sweep_id"
ROLE_TAG = "cxrtune.role"
TRIAL_TAG = "cxrtune.trial_id"
STATUS_TAG = "cxrtune.status"
PARENT_TAG = "mlflow.parentRunId"
_NAME_OK = re.compile(r"[^0-9A-Za-z_\-. /]")
#: parameter names that must never reach MLflow (credentials sneak into configs as URIs or keys)
SECRET_PATTERN = re.compile(r"(password|passwd|secret|token|api[_-]?key|credential)", re.IGNORECASE)


def tracking_uri(uri: str | None = None) -> str:
    """The URI in force: explicit, then ``MLFLOW_TRACKING_URI``, then ``sqlite:///mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def metric_name(name: str) -> str:
    """MLflow accepts only alphanumerics, ``_ - . space /`` in names; replace anything else."""
    return _NAME_OK.sub("_", name)


def loggable_params(flat: Mapping[str, Any]) -> dict[str, str]:
    """Flat config -> MLflow params: values as strings (<= 6000 chars), secrets left out."""
    params: dict[str, str] = {}
    for key, value in flat.items():
        if SECRET_PATTERN.search(key):
            continue
        text = str(value)
        if "://" in text and "@" in text:  # a URI with credentials in it
            continue
        params[metric_name(key)] = text[:6000]
    return params


def loggable_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Numeric, finite entries of a result dict (booleans and bookkeeping dropped)."""
    metrics: dict[str, float] = {}
    for key, value in result.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(float(value)):
            continue
        metrics[metric_name(key)] = float(value)
    return metrics


class SweepTracker:
    """Parent and child runs of one sweep in one MLflow experiment."""

    def __init__(self, sweep_name: str, experiment: str | None = None, uri: str | None = None,
                 sweep_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.sweep_name = sweep_name
        self.sweep_id = sweep_id
        self.uri = tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_name = experiment or f"cxrtune/{sweep_name}"
        found = self.client.get_experiment_by_name(self.experiment_name)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment_name)
        self.parent_run_id = self._parent()
        self._children: dict[str, str] = {}

    # -- lookups --------------------------------------------------------------------------------
    def _search(self, filter_string: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1000)

    def _mine(self) -> str:
        """The filter that selects this sweep's runs: its id when it has one, else its name."""
        if self.sweep_id:
            return f"tags.`{SWEEP_ID_TAG}` = '{self.sweep_id}'"
        return f"tags.`{SWEEP_TAG}` = '{self.sweep_name}'"

    def _identity_tags(self) -> dict[str, str]:
        tags = {SWEEP_TAG: self.sweep_name}
        if self.sweep_id:
            tags[SWEEP_ID_TAG] = self.sweep_id
        return tags

    def _parent(self) -> str:
        runs = self._search(f"{self._mine()} and tags.`{ROLE_TAG}` = 'sweep'")
        if runs:
            run_id = runs[0].info.run_id
            if runs[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            self.experiment_id, run_name=self.sweep_name,
            tags={**self._identity_tags(), ROLE_TAG: "sweep"},
        )
        return run.info.run_id

    def child_run(self, trial_id: str, run_name: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        """The run of ``trial_id``: found by tag if it exists (a resumed sweep), else created."""
        if trial_id in self._children:
            return self._children[trial_id]
        runs = self._search(f"{self._mine()} and tags.`{TRIAL_TAG}` = '{trial_id}'")
        if runs:
            run_id = runs[0].info.run_id
            if runs[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            all_tags = {**self._identity_tags(), TRIAL_TAG: trial_id, ROLE_TAG: "trial",
                        PARENT_TAG: self.parent_run_id, **dict(tags or {})}
            run_id = self.client.create_run(self.experiment_id, run_name=run_name or trial_id,
                                            tags=all_tags).info.run_id
        self._children[trial_id] = run_id
        return run_id

    def trial_runs(self) -> dict[str, str]:
        """trial id -> run id for every child run of this sweep."""
        runs = self._search(f"{self._mine()} and tags.`{ROLE_TAG}` = 'trial'")
        return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs}

    # -- logging --------------------------------------------------------------------------------
    def log_params(self, run_id: str, flat: Mapping[str, Any]) -> None:
        """Log params once; on re-attach, params already present are not logged again
        (MLflow refuses to change a logged param)."""
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in loggable_params(flat).items() if k not in existing]
        for start in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[start : start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in loggable_metrics(metrics).items()]
        for start in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[start : start + 500])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def log_artifacts(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def end_trial(self, trial_id: str, status: str) -> None:
        """Close a child run with a cxrtune status (completed, pruned, collapsed, diverged,
        errored, or interrupted: cut off by Ctrl-C, KILLED until ``--resume`` re-opens it)."""
        run_id = self.child_run(trial_id)
        self.client.set_tag(run_id, STATUS_TAG, status)
        mlflow_status = {"errored": "FAILED", "interrupted": "KILLED"}.get(status, "FINISHED")
        self.client.set_terminated(run_id, status=mlflow_status)

    def end_sweep(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_run_id, status=status)
