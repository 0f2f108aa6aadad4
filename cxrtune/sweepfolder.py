"""Where everything of a sweep lives, and the one definition of its best checkpoint.

::

    <storage>/<sweep>/
        sweep.json, .driver.lock, driver.json  identity and driver lock (cxrtune.sweepstate)
        inputs.json                            the data every trial reads (caches, episodes)
        episodes.parquet                       the validation episodes, sampled once
        optuna.db                              the Optuna study (pretraining sweeps)
        ray-console.log                        Ray's own output
        trials.csv                             the driver's table of trials, at the end
        audit.json                             trials ASHA stopped that ran on (--audit-fraction)
        plan.json, budget.json                 the budget's plan and its clock (--budget-hours)
        packing.json                           trials per device and what they were sized from
                                               (few-shot sweeps, cxrtune.packing)
        results.parquet                        the tidy few-shot table (few-shot sweeps)
        export/                                the exported best backbone (cxrtune.export)
        report/                                the HTML report (cxrtune.analysis)
        <trainable>_<trial id>/                a trial folder, as Tune writes it (cxrtune.tune_files)
            params.json, result.json, trial.log
            work/run/                          the engine's run (checkpoints/, metrics.jsonl)
            work/initial_probe_results.parquet random init's probe table
            checkpoint_NNNNNN/                 a Tune checkpoint: checkpoint.pt (engine),
                                               backbone.pt, probe_results.parquet, trial_state.json,
                                               and the carried metrics.jsonl and random-init table

The best checkpoint for an objective is the best report whose checkpoint is still on disk (Tune's
``num_to_keep`` deletes older ones, so the best report ever made may have lost its checkpoint);
ties go to the first trial folder by name, then to the earlier report. Audited trials (ASHA stopped
them, the audit let them run on: :mod:`cxrtune.sweep.scheduler`) are left out unless asked. The
summary, ``cxrtune export``, the report, ``cxrtune compare`` and the analysis all ask
:meth:`SweepFolder.best_checkpoint`.
No Ray import.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrtune import tune_files
from cxrtune.errors import CxrtuneError

# -- the sweep folder
SWEEP_FILE = "sweep.json"
LOCK_FILE = ".driver.lock"
HOLDER_FILE = "driver.json"
INPUTS_FILE = "inputs.json"
EPISODES_FILE = "episodes.parquet"
#: episodes whose test images are patient-disjoint from the validation ones: the winner is reported there
REPORT_EPISODES_FILE = "report_episodes.parquet"
#: the winner and random init on the report episodes (the driver's end-of-sweep evaluation)
REPORT_RESULTS = "report_results.parquet"
#: both comparisons of the winner with random init: on the validation and on the report episodes
REPORT_COMPARISON = "report_comparison.json"
OPTUNA_FILE = "optuna.db"
CONSOLE_LOG = "ray-console.log"
TRIALS_TABLE = "trials.csv"
AUDIT_FILE = "audit.json"
PLAN_FILE = "plan.json"
BUDGET_FILE = "budget.json"
PACKING_FILE = "packing.json"
RESULTS_TABLE = "results.parquet"
EXPORT_DIR = "export"
REPORT_DIR = "report"
# -- a trial folder
TRIAL_LOG = "trial.log"
WORK_DIR = "work"
RUN_DIR = "run"
# -- a Tune checkpoint of a pretraining trial
ENGINE_CHECKPOINT = "checkpoint.pt"
BACKBONE_FILE = "backbone.pt"
PROBE_RESULTS = "probe_results.parquet"
STATE_FILE = "trial_state.json"
INITIAL_RESULTS = "initial_probe_results.parquet"
#: prefix of the folders a trial stages its Tune checkpoints in (under its work folder)
STAGING_PREFIX = "ckpt-"


@dataclass(frozen=True)
class Checkpoint:
    """One report of a trial together with the checkpoint folder it saved."""

    trial_id: str
    trial_dir: Path
    folder: Path
    config: dict[str, Any]
    report: dict[str, Any]

    @property
    def backbone(self) -> Path:
        return self.folder / BACKBONE_FILE

    @property
    def probe_results(self) -> Path:
        return self.folder / PROBE_RESULTS

    @property
    def initial_results(self) -> Path:
        return initial_results(self.folder)

    @property
    def epoch(self) -> int | None:
        """The epoch whose probes the checkpoint carries (from the state saved with it)."""
        state = self.folder / STATE_FILE
        if state.is_file():
            return json.loads(state.read_text()).get("objective_epoch")
        return self.report.get("epoch")


def initial_results(checkpoint_folder: Path) -> Path:
    """Random init's probe table of a trial: carried in the checkpoint (on a cluster, work/ stays on
    the node that ran it), else in the trial's work folder."""
    carried = Path(checkpoint_folder) / INITIAL_RESULTS
    return carried if carried.is_file() else Path(checkpoint_folder).parent / WORK_DIR / INITIAL_RESULTS


def read_audit(path: str | Path) -> set[str]:
    """The ids of the audited trials listed in ``path`` (an ``audit.json``); none when it is absent."""
    path = Path(path)
    if not path.is_file():
        return set()
    try:
        return {str(t) for t in json.loads(path.read_text()).get("trials", [])}
    except (OSError, ValueError, AttributeError) as exc:
        raise CxrtuneError(f"{path} is not a readable list of audited trials ({exc}); "
                           "it is written by the sweep driver: restore it or remove it") from exc


def write_audit(path: str | Path, trials: set[str], fraction: float, seed: int) -> None:
    """Replace ``path`` whole (a crash leaves the old list or the new one, never half of one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"fraction": fraction, "seed": seed, "trials": sorted(trials)}, indent=1))
    tmp.replace(path)


class SweepFolder:
    """A sweep folder: its files by name, its trials and its best checkpoint."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.export_dir = self.path / EXPORT_DIR
        self.episodes = self.path / EPISODES_FILE

    def __repr__(self) -> str:
        return f"SweepFolder({str(self.path)!r})"

    def trial_dirs(self) -> list[Path]:
        return tune_files.trial_dirs(self.path)

    def audited(self) -> set[str]:
        """Ids of the trials the pruning audit let run on after ASHA would have stopped them."""
        return read_audit(self.path / AUDIT_FILE)

    def checkpoints(self, metric: str, include_audit: bool = False) -> list[Checkpoint]:
        """Every report that has a finite ``metric`` and a checkpoint still on disk (of trials
        outside the audit unless ``include_audit``)."""
        found = []
        audited = set() if include_audit else self.audited()
        for trial_dir in self.trial_dirs():
            reports = tune_files.read_results(trial_dir)
            if tune_files.trial_id(trial_dir, reports) in audited:
                continue
            config = tune_files.read_params(trial_dir)
            for report in reports:
                value = report.get(metric)
                folder = tune_files.checkpoint_of(trial_dir, report)
                if not isinstance(value, (int, float)) or not math.isfinite(value) or folder is None:
                    continue
                if (folder / BACKBONE_FILE).is_file():
                    found.append(Checkpoint(str(report.get("trial_id", trial_dir.name)), trial_dir, folder, config,
                                            report))
        return found

    def best_checkpoint(self, metric: str, mode: str = "max", include_audit: bool = False) -> Checkpoint:
        """The best report by ``metric`` whose checkpoint is on disk (audited trials left out unless
        ``include_audit``); refused naming what was reported."""
        if not self.path.is_dir():
            raise CxrtuneError(f"sweep folder {self.path} does not exist; run the sweep first or pass --storage")
        if mode not in ("max", "min"):
            raise CxrtuneError(f"mode = {mode!r}: use max or min")
        found = self.checkpoints(metric, include_audit)
        if not found:
            available = sorted({k for d in self.trial_dirs() for r in tune_files.read_results(d)[-1:] for k in r
                                if isinstance(r.get(k), (int, float))})
            raise CxrtuneError(f"no checkpoint in {self.path} has a reported {metric!r}; "
                               f"metrics reported there: {', '.join(available) or 'none'}")
        pick = max if mode == "max" else min
        return pick(found, key=lambda c: c.report[metric])

    def exported_checkpoint(self, metric: str | None = None) -> Path | None:
        """The checkpoint folder the export was made from (when it exists and, if ``metric`` is
        given, was selected by it)."""
        path = self.export_dir / "metrics.json"
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if metric is not None and record.get("selected_by", {}).get("metric", metric) != metric:
            return None
        folder = Path(record.get("checkpoint", ""))
        return folder if record.get("checkpoint") and folder.is_dir() else None

    def chosen_checkpoint(self, metric: str | None) -> Path | None:
        """The checkpoint a report or comparison shows: the export's source when it was selected by
        ``metric`` (or no metric is known), else the best checkpoint by ``metric``; None when neither exists."""
        exported = self.exported_checkpoint(metric)
        if exported is not None or not metric:
            return exported
        try:
            return self.best_checkpoint(metric).folder
        except CxrtuneError:
            return None

    def read_inputs(self) -> dict[str, Any]:
        path = self.path / INPUTS_FILE
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            return {}
