"""Read a sweep folder as Tune, the driver and Optuna left it: trials, per-epoch history, cost.

Layout (see :mod:`cxrtune.sweep.cli` and :mod:`cxrtune.export`)::

    <storage>/<sweep>/
        <trainable>_<trial id>/params.json, result.json (one JSON per report),
                               checkpoint_*/probe_results.parquet, work/initial_probe_results.parquet
        experiment_state-*.json   Tune's state: each trial's status and resources
        optuna.db                 the Optuna study (pretraining sweeps)
        episodes.parquet          the validation episodes every trial saw
        trials.csv                written by the driver when the sweep ends
        results.parquet           the tidy few-shot table (few-shot sweeps)

Nothing here imports Ray: Tune's pickled resource requests are read with an unpickler that builds
inert stand-ins instead of Ray's classes (and so can run no code from the file).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrtune.errors import DataError
from cxrtune.export import read_results, trial_dirs

TERMINAL = ("completed", "pruned", "collapsed", "diverged", "errored")
#: Per-epoch keys a pretraining trial reports (``cxrtune.engine``); kept in the history table.
HISTORY_KEYS = ("ssl_loss", "feature_std", "feature_std_batch", "effective_rank", "mean_cosine", "images_per_s",
                "seconds", "time_total_s", "lr")


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


# -- Tune's experiment state ----------------------------------------------------------------------
class _Inert:
    """Stand-in for any class named in a pickle: keeps the state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if module == "builtins" and name in ("dict", "list", "tuple", "set", "frozenset"):
            return getattr(__import__("builtins"), name)
        return type(name, (_Inert,), {"__module__": module})


def _resources(hex_pickle: str | None) -> dict[str, float]:
    """{"CPU": 1.0, "GPU": 0.25} from a trial's pickled placement-group factory, {} if unreadable."""
    if not hex_pickle:
        return {}
    try:
        obj = _InertUnpickler(io.BytesIO(bytes.fromhex(hex_pickle))).load()
        bundles = obj.state.get("_bundles") or []
    except Exception:
        return {}
    total: dict[str, float] = {}
    for bundle in bundles:
        for key, value in dict(bundle).items():
            total[key] = total.get(key, 0.0) + float(value)
    return total


def experiment_state(folder: Path) -> dict[str, dict[str, Any]]:
    """trial id -> {"tune_status": RUNNING | TERMINATED | ERROR | PENDING ..., "cpu":, "gpu":}."""
    files = sorted(folder.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}
    try:
        data = json.loads(files[-1].read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    for entry in data.get("trial_data", []):
        raw = entry[0] if isinstance(entry, list) else entry
        try:
            trial = json.loads(raw) if isinstance(raw, str) else dict(raw)
        except (TypeError, json.JSONDecodeError):
            continue
        resources = _resources(trial.get("placement_group_factory"))
        out[str(trial.get("trial_id"))] = {"tune_status": trial.get("status"), "cpu": resources.get("CPU", math.nan),
                                           "gpu": resources.get("GPU", 0.0)}
    return out


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


def _trial_id(trial_dir: Path, results: list[dict[str, Any]]) -> str:
    if results and results[-1].get("trial_id"):
        return str(results[-1]["trial_id"])
    return trial_dir.name.rsplit("_", 1)[-1]


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
    orphans = sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "result.json").is_file()
                     and not (p / "params.json").is_file())
    if orphans:
        raise SweepFolderError(f"sweep folder {folder}: trial folder {orphans[0]} (and {len(orphans) - 1} more) has "
                               "result.json but no params.json; Tune writes both, so the folder was copied only in part")
    state = experiment_state(folder)
    results_paths = [Path(p) for p in (results or [])]
    for path in results_paths:
        if not path.is_file():
            raise SweepFolderError(f"--results {path} does not exist")
    if (folder / "results.parquet").is_file():
        results_paths.insert(0, folder / "results.parquet")
    if not dirs and not state and not results_paths:
        raise SweepFolderError(
            f"sweep folder {folder} holds no trial folder (*/params.json), no Tune state "
            "(experiment_state-*.json) and no results.parquet: it is not a sweep folder, or the sweep was "
            "interrupted before it started a trial")
    trials_csv = pd.read_csv(folder / "trials.csv", dtype={"trial": str}) if (folder / "trials.csv").is_file() else None
    if trials_csv is not None:
        present = {_trial_id(d, read_results(d)[-1:]) for d in dirs}
        lost = [t for t in trials_csv["trial"].astype(str) if t not in present]
        if lost:
            raise SweepFolderError(f"sweep folder {folder}: trials.csv lists trial {lost[0]!r} (and {len(lost) - 1} "
                                   f"more) whose folder (*_{lost[0]}/params.json) is missing; was the folder copied "
                                   "only in part?")

    rows, history_rows, notes = [], [], []
    for trial_dir in dirs:
        reports = read_results(trial_dir)
        trial_id = _trial_id(trial_dir, reports)
        params = json.loads((trial_dir / "params.json").read_text())
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
                              or key.startswith("knn_auroc_") or key == "mean_auroc") and isinstance(v, (int, float))})
            history_rows.append(entry)
        speeds = [r["images_per_s"] for r in reports if isinstance(r.get("images_per_s"), (int, float))]
        rows.append({"trial": trial_id, "folder": trial_dir.name, "status": status,
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
        trials = pd.DataFrame(columns=["trial", "folder", "status", "epochs", "wall_time_s", "images_per_s", "cpu",
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
    path = folder / "optuna.db"
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
