"""Build and run a Ray Tune sweep from a declarative :class:`SweepSpec`.

This is the one place in cxrtune that imports Ray. A sweep has a stable name; its folder
``<storage>/<name>/`` holds its identity (``sweep.json``, :mod:`cxrtune.sweepstate`), the Tune
experiment (trial folders, checkpoints, searcher state) and the Optuna study (``optuna.db``, which
optuna-dashboard opens). One driver holds the folder's lock while it runs. ``resume=True``
continues a sweep that was interrupted (Ctrl-C) or whose driver died, through ``Tuner.restore``:
finished trials are not rerun, unfinished ones continue from their last checkpoint, the Optuna
study is kept (the seed point is not enqueued again) and each trial keeps its one MLflow run.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
import ray
from ray import tune
from ray.tune.search import ConcurrencyLimiter

from cxrtune import sweepstate
from cxrtune.errors import ConfigError, CxrtuneError
from cxrtune.sweep import interrupt
from cxrtune.sweep.budget import CostModel
from cxrtune.sweep.callbacks import TRACKING_OVERRIDES, MlflowSweepCallback
from cxrtune.sweep.console import ConsoleCallback, RayConsole
from cxrtune.sweep.scheduler import SweepASHA
from cxrtune.sweepfolder import AUDIT_FILE, CONSOLE_LOG
from cxrtune.sweep.optuna_state import ResumableOptunaSearch, fail_stale_running_trials

DEFAULT_STORAGE = "./cxrtune-runs"


def check_sweep_name(name: str, what: str = "sweep name ") -> None:
    """A sweep's name is its folder under the storage: non-empty, no slashes or spaces."""
    if not name or any(c in name for c in "/\\ "):
        raise ConfigError(f"{what}{name!r}: use a non-empty name without slashes or spaces")


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
    #: pruning audit: the share of the trials ASHA stops that run on to max_t (cxrtune.sweep.scheduler)
    audit_fraction: float = 0.0
    #: the budget in wall seconds (``--budget-hours``) and a trial's cost (cxrtune.sweep.budget):
    #: no trial starts and none is promoted that the remaining budget cannot carry to its next rung
    budget_s: float | None = None
    cost: CostModel | None = None
    time_budget_s: float | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    #: "optuna" (TPE over the space) or "grid" (every combination of tune.grid_search entries)
    search: str = "optuna"
    #: MLflow params of the sweep's parent run (e.g. the data sources)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: result entries shown on the console line of each finished epoch (with the metric)
    console_keys: tuple[str, ...] = ("ssl_loss", "feature_std")
    #: the GPU share was asked for explicitly (``--gpu``): refuse a cluster without GPUs instead
    #: of running on CPU (a profile's GPU share is dropped there with a warning)
    require_gpu: bool = False
    #: retries of a failed trial from its last checkpoint (Tune's FailureConfig; -1: no limit). Tune
    #: counts a lost node or killed worker like an exception raised by the trial, so 2 rides out a
    #: lost node or an OOM kill while a deterministic bug is rerun at most twice from its checkpoint.
    max_failures: int = 2

    def __post_init__(self) -> None:
        check_sweep_name(self.name, "SweepSpec.name = ")
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


def _searched_keys(spec: SweepSpec) -> tuple[str, ...]:
    """The param-space keys that are searched (Tune domains or grids), for readable run names."""
    from ray.tune.search.sample import Domain

    return tuple(k for k, v in spec.param_space.items()
                 if isinstance(v, Domain) or (isinstance(v, dict) and "grid_search" in v))


def trial_resources(requested: dict[str, float], require_gpu: bool = False) -> dict[str, float]:
    """Requested fractions. On a cluster without GPUs a GPU share is refused when it was asked for
    explicitly (``require_gpu``); a profile's share is dropped with a warning on the console (the
    same sweep then runs on CPU fractions) and the sweep's parent run is tagged so."""
    resources = {k: float(v) for k, v in requested.items() if v}
    if resources.get("gpu") and not ray.cluster_resources().get("GPU"):
        if require_gpu:
            raise CxrtuneError(
                f"--gpu {resources['gpu']:g}: this Ray cluster has no GPU (resources: "
                f"{int(ray.cluster_resources().get('CPU', 0))} CPUs); leave --gpu out to run on CPU, or pass "
                "--address of a cluster with GPUs")
        from cxrtune.sweep.console import console_err

        print(f"warning: the profile asks for {resources['gpu']:g} GPU per trial but this Ray cluster has no "
              "GPU: the trials run on CPU", file=console_err(), flush=True)
        resources.pop("gpu")
    resources.setdefault("cpu", 1.0)
    return resources


from cxrtune.sweep.ray_session import ensure_ray  # noqa: E402  (re-exported: runner.ensure_ray)


def _trial_dirname(trial) -> str:
    # Short, stable names: Tune's default puts every parameter value in the folder name.
    return f"{trial.trainable_name}_{trial.trial_id}"


@dataclasses.dataclass
class OpenSweep:
    """A sweep folder this driver holds: its identity, the tracking URI in force and the
    arguments it runs with (for a resume, the recorded ones)."""

    name: str
    folder: Path
    resume: bool
    identity: dict[str, Any]
    tracking_uri: str
    record: dict[str, Any]

    @property
    def sweep_id(self) -> str:
        return self.identity["sweep_id"]


def _check_restorable(name: str, folder: Path, resume: bool) -> None:
    if resume and not tune.Tuner.can_restore(str(folder)):
        raise CxrtuneError(f"sweep {name!r}: nothing to resume in {folder}; run it without --resume first")
    if not resume and tune.Tuner.can_restore(str(folder)):
        raise CxrtuneError(
            f"sweep {name!r} already exists in {folder}: pass --resume to continue it, "
            "or choose another --name"
        )


@contextmanager
def open_sweep(name: str, storage: str | os.PathLike | None = None, *, resume: bool = False,
               tracking_uri: str | None = None, record: dict[str, Any] | None = None,
               resume_hint: str = "") -> Iterator[OpenSweep]:
    """Check the storage and the tracking store (before anything is written), take the sweep
    folder's driver lock for the block, and create or check the sweep's identity.

    A new sweep records ``record`` (its data and other arguments) and the tracking URI. A resume
    uses the recorded URI unless ``tracking_uri`` names a new one (which is then recorded), and
    refuses a ``record`` entry that differs from the recorded one (``None`` entries are filled
    from the record).
    """
    from cxrtune.tracking import tracking_uri as uri_in_force

    check_sweep_name(name)
    sweepstate.check_storage(storage or DEFAULT_STORAGE)
    folder = sweep_dir(name, storage)
    if resume:  # refused before anything is written (a mistyped --name leaves no folder behind)
        _check_restorable(name, folder, resume)
    identity = sweepstate.read_identity(folder) if folder.is_dir() else None
    if resume and identity is None:
        raise CxrtuneError(
            f"sweep {name!r} in {folder} has no {sweepstate.SWEEP_FILE}: it was made by an earlier version of "
            "cxrtune, whose sweeps cannot be resumed; start a new sweep with --name (its trials and export stay "
            "readable where they are)")
    if resume:
        sweepstate.check_resumable(folder, identity)
    uri = uri_in_force(tracking_uri) if (not resume or tracking_uri) else identity["tracking_uri"]
    sweepstate.check_tracking(uri)
    with sweepstate.hold_driver_lock(folder):
        # under the lock: a second driver of a running sweep is refused by the lock, naming the
        # holder, before it could be told "already exists"
        _check_restorable(name, folder, resume)
        if resume:
            identity = sweepstate.read_identity(folder)
            merged = sweepstate.resume_record(identity.get("record", {}), record or {}, resume_hint)
            if uri != identity.get("tracking_uri"):
                identity = {**identity, "tracking_uri": uri,
                            "tracking_uri_history": [*identity.get("tracking_uri_history", []),
                                                     identity.get("tracking_uri")]}
                sweepstate.update_identity(folder, identity)
        else:
            merged = {k: v for k, v in (record or {}).items()}
            identity = sweepstate.create_identity(folder, name, merged, uri)
        yield OpenSweep(name, folder, resume, identity, uri, merged)


def run_sweep(spec: SweepSpec, *, resume: bool = False, storage: str | os.PathLike | None = None,
              tracking_uri: str | None = None, address: str | None = None, num_cpus: int | None = None,
              verbose: int = 0, opened: OpenSweep | None = None) -> tune.ResultGrid:
    """Run (or with ``resume`` continue) a sweep; returns Tune's ResultGrid.

    ``opened`` is the sweep as :func:`open_sweep` holds it (a driver that prepares data in the
    folder first takes the lock itself); without it the sweep is opened here. After a Ctrl-C,
    :func:`cxrtune.sweep.interrupt.interrupted` is true, the cut-off trials are ``interrupted``
    in MLflow and RUNNING in Optuna, and ``resume`` continues them.

    With ``verbose=0`` everything Ray, Optuna and MLflow print while the sweep runs goes to
    ``<sweep>/ray-console.log`` and the console shows one line per finished epoch and trial (and
    any trial's error); ``verbose >= 1`` leaves Ray's own progress output on the console.
    """
    if opened is None:
        with open_sweep(spec.name, storage, resume=resume, tracking_uri=tracking_uri) as opened:
            return run_sweep(spec, storage=storage, address=address, num_cpus=num_cpus, verbose=verbose,
                             opened=opened)
    if opened.name != spec.name:
        raise CxrtuneError(f"SweepSpec.name = {spec.name!r} but the open sweep is {opened.name!r}")
    folder = opened.folder
    log_path = None if verbose else folder / CONSOLE_LOG
    interrupt.reset()
    with RayConsole(log_path):
        return _run(spec, opened, storage, address, num_cpus, verbose, log_path)


def _run(spec: SweepSpec, opened: OpenSweep, storage, address, num_cpus, verbose,
         log_path: Path | None) -> tune.ResultGrid:
    folder, resume = opened.folder, opened.resume
    ensure_ray(address, num_cpus, log_to_driver=bool(verbose))
    resources = trial_resources(spec.resources, spec.require_gpu)
    if spec.resources.get("gpu") and "gpu" not in resources:
        spec.tags = {**spec.tags, "cxrtune.gpu_dropped": f"{spec.resources['gpu']:g} GPU asked, none in the cluster"}
    trainable = tune.with_resources(spec.trainable, resources)
    study_url = optuna_url(spec.name, storage)

    if resume:
        TRACKING_OVERRIDES[opened.sweep_id] = opened.tracking_uri
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
            if spec.budget_s is not None:
                searcher.budget = (str(folder), spec.budget_s, spec.cost.to_dict(), min(spec.grace_period, spec.max_t))
            search_alg = ConcurrencyLimiter(searcher, max_concurrent=spec.max_concurrent)
        scheduler = (SweepASHA(time_attr="training_iteration", max_t=spec.max_t, grace_period=spec.grace_period,
                               reduction_factor=spec.reduction_factor, folder=folder,
                               audit_fraction=spec.audit_fraction, audit_seed=spec.seed,
                               budget_s=spec.budget_s, cost=spec.cost)
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
                callbacks=[interrupt.InterruptWatch(),
                           MlflowSweepCallback(spec.name, opened.tracking_uri, tags=spec.tags, params=spec.params,
                                               sweep_id=opened.sweep_id, label_keys=_searched_keys(spec),
                                               audit_file=folder / AUDIT_FILE),
                           ConsoleCallback(spec.console_keys, spec.metric, str(log_path) if log_path else None)],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            ),
        )
    results = interrupt.fit_restoring_sigint(tuner)
    # After a Ctrl-C the cut-off trials stay RUNNING in Optuna: the restored searcher tells the
    # study their results when they finish (failing them now makes that resume fail).
    if spec.search == "optuna" and not interrupt.interrupted():
        fail_stale_running_trials(study_url, spec.name)
    return results
