"""The tables a report shows of one sweep folder: trials, per-epoch history, search and cost.

Where each file lives is :mod:`cxrtune.sweepfolder`; Tune's own files are read through
:mod:`cxrtune.tune_files` (no Ray import).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrtune.errors import DataError
from cxrtune.sweepfolder import AUDIT_FILE, OPTUNA_FILE, RESULTS_TABLE, TRIALS_TABLE, read_audit
from cxrtune.tune_files import (experiment_state, orphan_trial_dirs, read_params, read_results, trial_dirs,
                                trial_id as _trial_id)

TERMINAL = ("completed", "pruned", "collapsed", "diverged", "errored")
#: Per-epoch keys a pretraining trial reports (``cxrtune.engine``); kept in the history table.
HISTORY_KEYS = ("ssl_loss", "feature_std", "feature_std_batch", "effective_rank", "mean_cosine", "images_per_s",
                "seconds", "time_total_s", "lr", "objective_epoch")


class SweepFolderError(DataError):
    """A sweep folder is missing, or lacks a file the report needs."""


@dataclasses.dataclass
class SweepFolder:
    """Everything the report reads from one sweep folder."""

    name: str
    folder: Path
    objective: str | None
    trials: pd.DataFrame  # one row per trial: trial, status, objective, random_init, params, cost
    history: pd.DataFrame  # one row per trial x report: trial, epoch and the HISTORY_KEYS
    searched: dict[str, dict[str, Any]]  # parameter -> {"log": bool, "low":, "high":}
    running: bool
    notes: list[str]
    results: pd.DataFrame | None = None
    results_paths: tuple[Path, ...] = ()
    study: Any = None  # optuna.Study or None


# -- trials -----------------------------------------------------------------------------------------
def infer_status(last: dict[str, Any] | None, tune_status: str | None) -> str:
    """A trial's cxrtune status (architecture.md) from its last report and Tune's status;
    ``running`` while Tune has not finished it."""
    from cxrtune.health import trial_status

    last = last or {}
    finished = trial_status(last, failed=tune_status == "ERROR")
    if finished != "pruned":
        return finished
    if tune_status in ("RUNNING", "PENDING", "PAUSED") or (tune_status is None and not last.get("done")):
        return "running"
    return "pruned"


def guess_objective(history: pd.DataFrame, trials_csv: pd.DataFrame | None) -> str | None:
    """The sweep's objective: the metric column of trials.csv, ``mean_auroc`` for a few-shot sweep,
    else the largest-shot probe AUROC."""
    if trials_csv is not None and len(trials_csv.columns) > 3 and trials_csv.columns[2] == "epochs":
        return str(trials_csv.columns[3])
    if "mean_auroc" in history.columns and history["mean_auroc"].notna().any():
        return "mean_auroc"
    candidates = [c for c in history.columns if c.startswith("probe_auroc_") and c.endswith("shot")]
    if not candidates:
        return None
    return max(candidates, key=lambda c: int(c[len("probe_auroc_"):-len("shot")]))


def load_sweep(name: str, storage: str | Path = "./cxrtune-runs", results: list[str | Path] | None = None,
               objective: str | None = None) -> SweepFolder:
    """Read ``<storage>/<name>``; raises :class:`SweepFolderError` naming what is missing."""
    storage = Path(storage)
    folder = storage / name
    if not storage.is_dir():
        raise SweepFolderError(f"--storage {storage} does not exist: pass the folder the sweep was run with "
                               "(its --storage, default ./cxrtune-runs)")
    if not folder.is_dir():
        known = sorted(p.name for p in storage.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise SweepFolderError(f"sweep {name!r}: folder {folder} does not exist; sweeps in {storage}: "
                               f"{', '.join(known) or 'none'}")
    dirs = trial_dirs(folder)
    orphans = orphan_trial_dirs(folder)
    if orphans:
        raise SweepFolderError(f"sweep folder {folder}: trial folder {orphans[0]} (and {len(orphans) - 1} more) has "
                               "result.json but no params.json; Tune writes both, so the folder was copied only in part")
    state = experiment_state(folder)
    results_paths = [Path(p) for p in (results or [])]
    for path in results_paths:
        if not path.is_file():
            raise SweepFolderError(f"--results {path} does not exist")
    if (folder / RESULTS_TABLE).is_file():
        results_paths.insert(0, folder / RESULTS_TABLE)
    if not dirs and not state and not results_paths:
        raise SweepFolderError(
            f"sweep folder {folder} holds no trial folder (*/params.json), no Tune state "
            "(experiment_state-*.json) and no results.parquet: it is not a sweep folder, or the sweep was "
            "interrupted before it started a trial")
    trials_csv = pd.read_csv(folder / TRIALS_TABLE, dtype={"trial": str}) if (folder / TRIALS_TABLE).is_file() else None
    if trials_csv is not None:
        present = {_trial_id(d, read_results(d)[-1:]) for d in dirs}
        lost = [t for t in trials_csv["trial"].astype(str) if t not in present]
        if lost:
            raise SweepFolderError(f"sweep folder {folder}: trials.csv lists trial {lost[0]!r} (and {len(lost) - 1} "
                                   f"more) whose folder (*_{lost[0]}/params.json) is missing; was the folder copied "
                                   "only in part?")

    rows, history_rows, notes = [], [], []
    audited = read_audit(folder / AUDIT_FILE)
    for trial_dir in dirs:
        reports = read_results(trial_dir)
        trial_id = _trial_id(trial_dir, reports)
        params = read_params(trial_dir)
        info = state.get(trial_id, {})
        last = reports[-1] if reports else None
        status = infer_status(last, info.get("tune_status"))
        if trials_csv is not None and trial_id in set(trials_csv["trial"]):
            status = str(trials_csv.loc[trials_csv["trial"] == trial_id, "status"].iloc[0])
        for k, report in enumerate(reports):
            entry = {"trial": trial_id, "epoch": report.get("epoch", report.get("training_iteration", k + 1))}
            entry.update({key: report.get(key, math.nan) for key in HISTORY_KEYS})
            entry.update({key: v for key, v in report.items()
                          if (key.startswith("probe_auroc_") or key.startswith("initial_probe_auroc_")
                              or key.startswith("knn_auroc_") or key in ("mean_auroc", objective))
                          and isinstance(v, (int, float))})
            history_rows.append(entry)
        speeds = [r["images_per_s"] for r in reports if isinstance(r.get("images_per_s"), (int, float))]
        rows.append({"trial": trial_id, "folder": trial_dir.name, "status": status, "audit": trial_id in audited,
                     "epochs": last.get("epoch", last.get("training_iteration")) if last else 0,
                     "wall_time_s": float(last.get("time_total_s", math.nan)) if last else math.nan,
                     "images_per_s": float(np.mean(speeds)) if speeds else math.nan,
                     "cpu": info.get("cpu", math.nan), "gpu": info.get("gpu", 0.0),
                     "started": reports[0].get("timestamp", math.nan) - reports[0].get("time_total_s", 0.0)
                     if reports else math.nan,
                     "_last": last or {}, "_params": params, "_dir": trial_dir})
    history = pd.DataFrame(history_rows)
    if history.empty:
        history = pd.DataFrame(columns=["trial", "epoch", *HISTORY_KEYS])
    objective = objective or guess_objective(history, trials_csv)

    study, searched = _optuna(folder, name)
    trials = pd.DataFrame(rows)
    if not trials.empty:
        trials = trials.sort_values(["started", "trial"], na_position="last").reset_index(drop=True)
        trials["objective"] = [r.get(objective, math.nan) if objective else math.nan for r in trials["_last"]]
        trials["random_init"] = [r.get(f"initial_{objective}", math.nan) if objective else math.nan
                                 for r in trials["_last"]]
        for key in searched:
            trials[key] = [p.get(key, math.nan) for p in trials["_params"]]
    else:
        trials = pd.DataFrame(columns=["trial", "folder", "status", "audit", "epochs", "wall_time_s", "images_per_s",
                                       "cpu",
                                       "gpu", "objective", "random_init", "_last", "_params", "_dir"])
    unfinished = sorted(set(trials["trial"][trials["status"] == "running"])) if not trials.empty else []
    pending = [t for t, i in state.items() if i.get("tune_status") in ("PENDING", "RUNNING", "PAUSED")
               and t not in set(trials["trial"])]
    running = bool(unfinished or pending) or (trials_csv is None and not results_paths)
    if running:
        notes.append(
            "This sweep is still running (or was interrupted): "
            + (f"{len(unfinished)} trial(s) have no final status yet ({', '.join(unfinished[:6])})"
               if unfinished else "the driver has not written trials.csv yet")
            + (f", {len(pending)} more not started" if pending else "")
            + ". The report shows what exists now; numbers will change.")

    table = None
    if results_paths:
        table = pd.concat([pd.read_parquet(p) for p in results_paths], ignore_index=True)
        missing = [c for c in ("backbone", "evaluator", "disease", "shots", "trial", "auroc") if c not in table.columns]
        if missing:
            raise SweepFolderError(f"results table {results_paths[0]} lacks column(s) {missing}: expected the tidy "
                                   "table of compare_methods / fewshot_grid / cxrtune evaluate")
    return SweepFolder(name=name, folder=folder, objective=objective, trials=trials, history=history,
                       searched=searched, running=running, notes=notes, results=table,
                       results_paths=tuple(results_paths), study=study)


def _optuna(folder: Path, name: str):
    """The sweep's Optuna study (or None) and the searched parameters with their ranges."""
    path = folder / OPTUNA_FILE
    if not path.is_file():
        return None, {}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{path.resolve()}"
    try:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        study = optuna.load_study(study_name=name if name in names else names[0], storage=storage)
    except Exception:
        return None, {}
    searched: dict[str, dict[str, Any]] = {}
    for trial in study.trials:
        for key, dist in trial.distributions.items():
            searched.setdefault(key, {"log": bool(getattr(dist, "log", False)), "low": getattr(dist, "low", None),
                                      "high": getattr(dist, "high", None)})
    return study, dict(sorted(searched.items()))
