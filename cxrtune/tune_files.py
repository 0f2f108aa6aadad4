"""The one reader of the files Ray Tune writes in a sweep folder, without importing Ray.

Tune's layout (Ray 2.x): a trial folder per trial with ``params.json`` (the trial's config) and
``result.json`` (one JSON report per line, naming the checkpoint folder it saved in
``checkpoint_dir_name``), the experiment's state in ``experiment_state-*.json`` and ``tuner.pkl``
(what makes a folder restorable). A change of Tune's layout is absorbed here.

Tune pickles each trial's resource request inside the experiment state; it is read with an
unpickler that builds inert stand-ins instead of Ray's classes (and so can run no code from the file).
"""

from __future__ import annotations

import io
import json
import math
import pickle
from pathlib import Path
from typing import Any

PARAMS_FILE = "params.json"
RESULTS_FILE = "result.json"
TUNER_FILE = "tuner.pkl"
STATE_GLOB = "experiment_state-*.json"


def trial_dirs(sweep_folder: Path) -> list[Path]:
    """Every trial folder (a folder holding ``params.json``), sorted by name."""
    sweep_folder = Path(sweep_folder)
    if not sweep_folder.is_dir():
        return []
    return sorted(p for p in sweep_folder.iterdir() if p.is_dir() and (p / PARAMS_FILE).is_file())


def orphan_trial_dirs(sweep_folder: Path) -> list[str]:
    """Folders with a ``result.json`` but no ``params.json``: a folder copied only in part."""
    return sorted(p.name for p in Path(sweep_folder).iterdir()
                  if p.is_dir() and (p / RESULTS_FILE).is_file() and not (p / PARAMS_FILE).is_file())


def read_params(trial_dir: Path) -> dict[str, Any]:
    return json.loads((Path(trial_dir) / PARAMS_FILE).read_text())


def read_results(trial_dir: Path) -> list[dict[str, Any]]:
    """A trial's reports, oldest first; a line cut off by a crash is skipped."""
    path = Path(trial_dir) / RESULTS_FILE
    if not path.is_file():
        return []
    results = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return results


def trial_id(trial_dir: Path, results: list[dict[str, Any]] | None = None) -> str:
    """The id Tune gave the trial: from its last report, else the folder name's last part."""
    results = read_results(trial_dir)[-1:] if results is None else results
    if results and results[-1].get("trial_id"):
        return str(results[-1]["trial_id"])
    return Path(trial_dir).name.rsplit("_", 1)[-1]


def checkpoint_of(trial_dir: Path, report: dict[str, Any]) -> Path | None:
    """The checkpoint folder a report saved (it may since have been deleted), or None."""
    name = report.get("checkpoint_dir_name")
    return Path(trial_dir) / name if name else None


def is_restorable(sweep_folder: Path) -> bool:
    return (Path(sweep_folder) / TUNER_FILE).is_file()


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


def experiment_state(sweep_folder: Path) -> dict[str, dict[str, Any]]:
    """trial id -> {"tune_status": RUNNING | TERMINATED | ERROR | PENDING ..., "cpu":, "gpu":}."""
    files = sorted(Path(sweep_folder).glob(STATE_GLOB), key=lambda p: p.stat().st_mtime)
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


def has_state(sweep_folder: Path) -> bool:
    return any(Path(sweep_folder).glob(STATE_GLOB))
