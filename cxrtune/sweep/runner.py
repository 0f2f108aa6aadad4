"""Build and run a Ray Tune sweep from a declarative :class:`SweepSpec`.

This is the one place in cxrtune that imports Ray. A sweep has a stable name; its folder
``<storage>/<name>/`` holds the Tune experiment (trial folders, checkpoints, searcher state) and
the Optuna study (``optuna.db``, which optuna-dashboard opens). ``resume=True`` continues an
interrupted sweep through ``Tuner.restore``: finished trials are not rerun, unfinished ones
continue from their last checkpoint, the Optuna study is kept (the seed point is not enqueued
again) and each trial keeps its one MLflow run.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter

from cxrtune.errors import ConfigError, CxrtuneError
from cxrtune.sweep.callbacks import MlflowSweepCallback
from cxrtune.sweep.console import CONSOLE_LOG, ConsoleCallback, RayConsole
from cxrtune.sweep.optuna_state import ResumableOptunaSearch, fail_stale_running_trials

DEFAULT_STORAGE = "./cxrtune-runs"


@dataclasses.dataclass
class SweepSpec:
    """Everything a sweep script declares; one call to :func:`run_sweep` runs it."""

    name: str
    trainable: Callable[[dict], None]
    param_space: dict[str, Any]
    metric: str
    mode: str = "max"
    num_samples: int = 8
    max_concurrent: int = 2
    resources: dict[str, float] = dataclasses.field(default_factory=lambda: {"cpu": 1.0})
    points_to_evaluate: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seed: int = 0
    asha: bool = True
    max_t: int = 10
    grace_period: int = 1
    reduction_factor: int = 2
    time_budget_s: float | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    #: "optuna" (TPE over the space) or "grid" (every combination of tune.grid_search entries)
    search: str = "optuna"
    #: MLflow params of the sweep's parent run (e.g. the data sources)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: result entries shown on the console line of each finished epoch (with the metric)
    console_keys: tuple[str, ...] = ("ssl_loss", "feature_std")

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ConfigError(f"SweepSpec.name = {self.name!r}: use a non-empty name without slashes or spaces")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"SweepSpec.mode = {self.mode!r}: use 'min' or 'max'")
        if self.search not in ("optuna", "grid"):
            raise ConfigError(f"SweepSpec.search = {self.search!r}: use 'optuna' or 'grid'")
        if self.num_samples < 1:
            raise ConfigError(f"SweepSpec.num_samples = {self.num_samples}: use at least 1")
        if self.max_concurrent < 1:
            raise ConfigError(f"SweepSpec.max_concurrent = {self.max_concurrent}: use at least 1")
        for key, value in self.resources.items():
            if key not in ("cpu", "gpu") or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"SweepSpec.resources[{key!r}] = {value!r}: use cpu/gpu fractions >= 0")


def sweep_dir(name: str, storage: str | os.PathLike | None = None) -> Path:
    return Path(storage or DEFAULT_STORAGE).expanduser().resolve() / name


def optuna_url(name: str, storage: str | os.PathLike | None = None) -> str:
    return f"sqlite:///{sweep_dir(name, storage) / 'optuna.db'}"


def trial_resources(requested: dict[str, float]) -> dict[str, float]:
    """Requested fractions, with the GPU share dropped on a cluster without GPUs (the same sweep
    then runs on CPU fractions)."""
    resources = {k: float(v) for k, v in requested.items() if v}
    if resources.get("gpu") and not ray.cluster_resources().get("GPU"):
        resources.pop("gpu")
    resources.setdefault("cpu", 1.0)
    return resources


def ensure_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Start (or join) Ray once per process. Without ``log_to_driver`` the workers' output stays
    out of the driver's console (each trial keeps its own in ``<trial>/trial.log``): Ray forwards
    it in batches, late enough to print after the sweep's summary otherwise."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=256 * 1024**2,
                 log_to_driver=log_to_driver)


def _trial_dirname(trial) -> str:
    # Short, stable names: Tune's default puts every parameter value in the folder name.
    return f"{trial.trainable_name}_{trial.trial_id}"


def run_sweep(spec: SweepSpec, *, resume: bool = False, storage: str | os.PathLike | None = None,
              tracking_uri: str | None = None, address: str | None = None, num_cpus: int | None = None,
              verbose: int = 0) -> tune.ResultGrid:
    """Run (or with ``resume`` continue) a sweep; returns Tune's ResultGrid.

    With ``verbose=0`` everything Ray, Optuna and MLflow print while the sweep runs goes to
    ``<sweep>/ray-console.log`` and the console shows one line per finished epoch and trial (and
    any trial's error); ``verbose >= 1`` leaves Ray's own progress output on the console.
    """
    folder = sweep_dir(spec.name, storage)
    # Refuse before starting Ray: resuming nothing, or silently mixing a new sweep into an old one.
    if resume and not tune.Tuner.can_restore(str(folder)):
        raise CxrtuneError(f"sweep {spec.name!r}: nothing to resume in {folder}; run it without --resume first")
    if not resume and tune.Tuner.can_restore(str(folder)):
        raise CxrtuneError(
            f"sweep {spec.name!r} already exists in {folder}: pass --resume to continue it, "
            "or choose another --name"
        )
    folder.mkdir(parents=True, exist_ok=True)
    log_path = None if verbose else folder / CONSOLE_LOG
    with RayConsole(log_path):
        return _run(spec, folder, resume, storage, tracking_uri, address, num_cpus, verbose, log_path)


def _run(spec: SweepSpec, folder: Path, resume: bool, storage, tracking_uri, address, num_cpus, verbose,
         log_path: Path | None) -> tune.ResultGrid:
    ensure_ray(address, num_cpus, log_to_driver=bool(verbose))
    trainable = tune.with_resources(spec.trainable, trial_resources(spec.resources))
    study_url = optuna_url(spec.name, storage)

    if resume:
        tuner = tune.Tuner.restore(str(folder), trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=spec.param_space)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        search_alg = None
        if spec.search == "optuna":
            searcher = ResumableOptunaSearch(
                metric=spec.metric, mode=spec.mode,
                points_to_evaluate=[dict(p) for p in spec.points_to_evaluate] or None,
                sampler=optuna.samplers.TPESampler(seed=spec.seed),
                study_name=spec.name, storage=optuna.storages.RDBStorage(study_url),
            )
            search_alg = ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent)
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=spec.max_t,
                                   grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)
                     if spec.asha else None)
        tuner = tune.Tuner(
            trainable,
            param_space=spec.param_space,
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                search_alg=search_alg,
                max_concurrent_trials=None if search_alg is not None else spec.max_concurrent,
                scheduler=scheduler, time_budget_s=spec.time_budget_s,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(folder.parent), verbose=verbose,
                callbacks=[MlflowSweepCallback(spec.name, tracking_uri, tags=spec.tags, params=spec.params),
                           ConsoleCallback(spec.console_keys, spec.metric, str(log_path) if log_path else None)],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
    results = tuner.fit()
    if spec.search == "optuna":
        fail_stale_running_trials(study_url, spec.name)
    return results
