"""Ray Tune callbacks of a sweep: MLflow tracking that survives ``Tuner.restore``.

The callback runs on the driver only (the one process that writes the SQLite store). Trial runs
are looked up by the sweep's id and the ``cxrtune.trial_id`` tag (see :mod:`cxrtune.tracking`), so
a restored sweep re-attaches to the runs it already had instead of opening duplicates, and never
touches another sweep's runs. Trials a Ctrl-C cut off are closed ``interrupted`` (MLflow KILLED)
and the parent run stays open until the resumed sweep finishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray.tune.logger import LoggerCallback

from cxrtune.health import trial_status
from cxrtune.sweepfolder import INITIAL_RESULTS, PROBE_RESULTS, RESULTS_TABLE, RUN_DIR, WORK_DIR, read_audit
from cxrtune.tune_files import PARAMS_FILE, RESULTS_FILE
from cxrtune.tracking import SweepTracker

#: keys of Tune's result dict that are bookkeeping, not metrics
#: sweep id -> tracking URI that replaces the one pickled with a restored sweep's callback
#: (``--resume --tracking-uri``); set by the runner before ``Tuner.restore``
TRACKING_OVERRIDES: dict[str, str] = {}

_SKIP = {"trial_id", "experiment_id", "date", "timestamp", "pid", "hostname", "node_ip", "config",
         "done", "should_checkpoint", "checkpoint_dir_name", "experiment_tag", "time_this_iter_s",
         "iterations_since_restore", "timesteps_since_restore", "time_since_restore"}


class MlflowSweepCallback(LoggerCallback):
    def __init__(self, sweep_name: str, tracking_uri: str | None = None, experiment: str | None = None,
                 tags: dict[str, str] | None = None, params: dict[str, Any] | None = None,
                 sweep_id: str | None = None, label_keys: tuple[str, ...] = (),
                 audit_file: str | Path | None = None) -> None:
        self.sweep_name = sweep_name
        self.audit_file = str(audit_file) if audit_file else None
        self.label_keys = tuple(label_keys)
        self.sweep_id = sweep_id
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.tags = dict(tags or {})
        self.params = dict(params or {})
        self._tracker: SweepTracker | None = None
        self._last: dict[str, dict[str, Any]] = {}
        self._live: set[str] = set()  # trials that ran in this process
        self._ended: set[str] = set()  # ... and whose end a callback heard of

    # Tune pickles callbacks with the experiment state; the MLflow client is rebuilt on demand.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tracker"] = None
        state["_ended"] = set()
        state["_live"] = set()
        return state

    @property
    def tracker(self) -> SweepTracker:
        if self._tracker is None:
            sweep_id = getattr(self, "sweep_id", None)
            uri = TRACKING_OVERRIDES.get(sweep_id or "", self.tracking_uri)
            self._tracker = SweepTracker(self.sweep_name, experiment=self.experiment, uri=uri, sweep_id=sweep_id)
            if self.tags:
                self._tracker.set_tags(self._tracker.parent_run_id, self.tags)
            if getattr(self, "params", None):  # absent in callbacks pickled by older sweeps
                self._tracker.log_params(self._tracker.parent_run_id, self.params)
        return self._tracker

    def setup(self, *args, **kwargs) -> None:
        super().setup(*args, **kwargs)
        _ = self.tracker

    def log_trial_start(self, trial) -> None:
        run_id = self.tracker.child_run(trial.trial_id, run_name=run_name(self.sweep_name, trial.trial_id, trial.config,
                                                                          getattr(self, "label_keys", ())),
                                        tags={k: str(v) for k, v in self.tags.items()})
        self.tracker.log_params(run_id, trial.config)
        self._live.add(trial.trial_id)

    def log_trial_result(self, iteration: int, trial, result: dict[str, Any]) -> None:
        run_id = self.tracker.child_run(trial.trial_id)
        metrics = {k: v for k, v in result.items() if k not in _SKIP}
        step = int(result.get("training_iteration", iteration))
        self.tracker.log_metrics(run_id, metrics, step=step)
        self._tag_audit(trial.trial_id, run_id)
        self._last[trial.trial_id] = result
        self._live.add(trial.trial_id)

    def _tag_audit(self, trial_id: str, run_id: str) -> None:
        """Tag the run of a trial the pruning audit let run on (once; the scheduler lists it in
        ``audit.json`` when ASHA would have stopped it)."""
        path = getattr(self, "audit_file", None)  # absent in callbacks pickled by older sweeps
        tagged = self.__dict__.setdefault("_audit_tagged", set())
        if not path or trial_id in tagged or trial_id not in read_audit(path):
            return
        self.tracker.client.set_tag(run_id, "cxrtune.audit", "true")
        tagged.add(trial_id)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        result = self._last.get(trial.trial_id) or getattr(trial, "last_result", None)
        status = trial_status(result, failed)
        run_id = self.tracker.child_run(trial.trial_id)
        self._tag_audit(trial.trial_id, run_id)
        folders = trial_folders(trial)
        if folders:
            self._log_trial_files(run_id, folders)
        # Staged checkpoint copies left by the trial's last report (or by a killed run): in the
        # driver's staging folder and in the storage folder Tune has already synced it to.
        from cxrtune.trial import remove_staging

        for folder in folders:
            remove_staging(folder / WORK_DIR)
        self.tracker.end_trial(trial.trial_id, status)
        self._ended.add(trial.trial_id)

    def _log_trial_files(self, run_id: str, folders: list[Path]) -> None:
        """The trial's config, results tables and a training-curve plot as run artifacts."""
        from cxrtune.engine.train import METRICS_FILE  # torch: not at import, the driver's --help stays fast

        checkpoints = sorted((c for f in folders for c in f.glob("checkpoint_*") if c.is_dir()),
                             key=lambda c: c.name)
        for name, fallback in ((PARAMS_FILE, None), (RESULTS_FILE, None), (RESULTS_TABLE, None),
                               (f"{WORK_DIR}/{RUN_DIR}/{METRICS_FILE}", METRICS_FILE),
                               (f"{WORK_DIR}/{INITIAL_RESULTS}", INITIAL_RESULTS)):
            found = [f / name for f in folders if (f / name).is_file()]
            # a trial that ran on another node left its work folder there: its checkpoint carries a copy
            if not found and fallback and checkpoints and (checkpoints[-1] / fallback).is_file():
                found = [checkpoints[-1] / fallback]
            if found:
                self.tracker.log_artifacts(run_id, found[0])
        if checkpoints and (checkpoints[-1] / PROBE_RESULTS).is_file():
            self.tracker.log_artifacts(run_id, checkpoints[-1] / PROBE_RESULTS, "last_checkpoint")
        trial_dir = next((f for f in folders if (f / "result.json").is_file()), folders[0])
        try:
            plot = plot_trial(trial_dir)
        except Exception:  # a plot must never fail a sweep
            plot = None
        if plot is not None:
            self.tracker.log_artifacts(run_id, plot, "plots")

    def on_experiment_end(self, trials, **info) -> None:
        from cxrtune.sweep.interrupt import interrupted, record_cut

        # A trial that started but whose end no callback heard of was cut off with the loop (Ctrl-C):
        # Tune saved it RUNNING and a resume continues it; close its run as interrupted until then.
        live = getattr(self, "_live", set())
        ended = getattr(self, "_ended", set())
        cut = [t for t in trials if t.trial_id in live and t.trial_id not in ended]
        for trial in cut:
            self.tracker.end_trial(trial.trial_id, "interrupted")
        cut_ids = {t.trial_id for t in cut}
        record_cut(cut_ids)
        counts: dict[str, int] = {}
        for trial in trials:
            status = ("interrupted" if trial.trial_id in cut_ids else
                      trial_status(getattr(trial, "last_result", None), trial.status == "ERROR"))
            counts[status] = counts.get(status, 0) + 1
        self.tracker.set_tags(self.tracker.parent_run_id, {f"cxrtune.trials_{k}": v for k, v in counts.items()})
        # A trial created just before a driver crash, after Tune's last experiment checkpoint, is
        # unknown to the restored sweep (Tune starts another in its place): close its run as lost.
        current = {t.trial_id for t in trials}
        for trial_id, run_id in self.tracker.trial_runs().items():
            if trial_id not in current:
                self.tracker.client.set_tag(run_id, "cxrtune.status", "lost")
                self.tracker.client.set_terminated(run_id, status="KILLED")
        unfinished = cut or interrupted() or any(t.status in ("PENDING", "RUNNING", "PAUSED") for t in trials)
        if unfinished:
            self.tracker.set_tags(self.tracker.parent_run_id, {"cxrtune.status": "interrupted"})
            self.tracker.end_sweep("KILLED")
        else:
            self.tracker.set_tags(self.tracker.parent_run_id, {"cxrtune.status": "finished"})
            self.tracker.end_sweep("FINISHED")


def run_name(sweep_name: str, trial_id: str, config: dict[str, Any], keys: tuple[str, ...]) -> str:
    """A child run's name a person can read: the sweep, the trial and its searched values,
    e.g. ``moco_variance 1a2b3c4d temperature=0.07 lr=0.045``."""
    def short(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    values = [f"{key.rsplit('.', 1)[-1]}={short(config[key])}" for key in keys if key in config]
    return " ".join([sweep_name, trial_id, *values])[:250]


def trial_folders(trial) -> list[Path]:
    """The trial's folders the driver can read: Tune's staging copy on the driver (``local_path``,
    where the driver's loggers write) and the sweep folder in storage (``path``, where checkpoints
    are persisted and the staging copy is synced to)."""
    folders: list[Path] = []
    for value in (getattr(trial, "local_path", None), getattr(trial, "path", None)):
        if value and Path(value).is_dir() and Path(value) not in folders:
            folders.append(Path(value))
    return folders


def plot_trial(trial_dir: Path) -> Path | None:
    """Per-epoch SSL loss, feature std and objective of one trial, as a PNG in the trial folder."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(l) for l in (trial_dir / "result.json").read_text().splitlines() if l.strip()]
    if not lines:
        return None
    epochs = [r.get("epoch", r.get("training_iteration")) for r in lines]
    panels = [("ssl_loss", "SSL loss"), ("feature_std_batch", "feature std (train-mode BN)"),
              ("effective_rank", "effective rank")]
    objectives = sorted(k for k in lines[-1] if k.startswith("probe_auroc_") and k.endswith("shot"))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.2))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(epochs, [r.get(key, float("nan")) for r in lines], marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
    for key in objectives:
        axes[-1].plot(epochs, [r.get(key, float("nan")) for r in lines], marker="o", label=key.replace("probe_auroc_", ""))
    axes[-1].set_title("probe AUROC")
    axes[-1].set_xlabel("epoch")
    if objectives:
        axes[-1].legend(title="shots")
    fig.tight_layout()
    out = trial_dir / "training_curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
