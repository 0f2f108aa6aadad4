"""One sweep trial in plain Python: what a Ray Tune trainable runs, without Ray.

:func:`run_pretrain_trial` pretrains one configuration and judges it the way the sweep's objective
asks: every time the engine writes a checkpoint, the backbone in it is frozen and probed on the
sweep's validation episodes (batched linear probes, the study's protocol), giving
``probe_auroc_{n}shot``. Before the first epoch the initial backbone is probed the same way, so
every report carries the objective (ASHA and Optuna need it at every step) and every trial measures
its own random-init baseline on the same episodes. Reports go through the ``report`` function the
caller passes (``ray.tune.report`` in ``trainables/pretrain.py``); checkpoints are folders holding
the engine checkpoint, a ``backbone.pt`` for export, the probe results table, and the engine's
metrics log and random-init table, so a trial restored in a fresh trial folder continues whole.
Pretraining reads the inputs' ``cache``; the probe reads their ``eval_cache`` (another source's cache
when the sweep validates elsewhere, e.g. pretrain on NIH and validate on PadChest as the study
did) or, when that is empty, the pretraining cache.

:func:`run_fewshot_trial` evaluates one given backbone (a checkpoint, ImageNet or random init) on
the episodes and reports the mean AUROC per shot count.

The flat trial config is resolved by :mod:`cxrtune.resolve`: the :class:`cxrtune.engine.PretrainConfig`
keys (``method``, ``moco.temperature``, ...) plus ``probe.*``, ``health.*`` and ``trial.*``. The
sweep's data (caches, episodes) comes beside it as :class:`TrialInputs`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch

from cxrtune.config import Config, param
from cxrtune.data.cache import ImageCache
from cxrtune.data.tasks import load_episodes
from cxrtune.device import resolve_device
from cxrtune.engine import PretrainConfig, pretrain
from cxrtune.engine.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from cxrtune.engine.train import METRICS_FILE
from cxrtune.errors import ConfigError, DivergenceError
from cxrtune.evaluate.features import BackboneSpec, ExtractConfig, cached_features, extract_features
from cxrtune.evaluate.preprocess import PreprocessConfig
from cxrtune.evaluate.probe import fit_probes
from cxrtune.evaluate.run import EvalConfig, run_evaluation
from cxrtune.health import collapse_reason
from cxrtune.models.backbone import Backbone, load_backbone, save_backbone
from cxrtune.resolve import InLoopProbeConfig, pretrain_trial
from cxrtune.sweepfolder import (BACKBONE_FILE, ENGINE_CHECKPOINT, INITIAL_RESULTS, PROBE_RESULTS, RUN_DIR,
                                 STAGING_PREFIX, STATE_FILE)

Report = Callable[[dict[str, Any], Path | None], None]


@dataclass
class TrialInputs(Config):
    """The sweep's data, given to every trial beside its config (``tune.with_parameters``): not a
    hyperparameter, never searched or logged as a trial's params. Keys in ``<sweep>/inputs.json``
    are these fields with a ``trial.`` prefix."""

    cache: str = param("", doc="image cache folder of the pretraining images (built once by the sweep driver)")
    episodes: str = param("", doc="validation episodes Parquet (sampled once by the sweep driver)")
    eval_cache: str = param("", doc="image cache folder the episodes' images live in; empty: the pretraining cache")
    source: str = param("", doc="name of the pretraining source, for the record")
    eval_source: str = param("", doc="name of the validation source, for the record")

    def validate(self) -> None:
        if not self.cache or not self.episodes:
            raise ConfigError("the trial's inputs must name the sweep's cache folder and episodes file "
                              "(trial.cache, trial.episodes; the sweep driver fills them in)")

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, Any]) -> "TrialInputs":
        return cls.from_flat({k[len("trial."):]: v for k, v in inputs.items()})


def pretrain_rows(cache: ImageCache, subset: str) -> np.ndarray:
    index = cache.index
    if "subset" in index.columns and subset:
        rows = index.loc[index["subset"] == subset, "cache_row"].to_numpy()
        if rows.size == 0:
            raise ConfigError(f"trial.pretrain_subset = {subset!r} selects no image of the cache; "
                              f"subsets there: {sorted(set(index['subset']))}")
        return rows
    return index["cache_row"].to_numpy()


class ProbeJudge:
    """Scores a backbone on the sweep's episodes with batched linear probes."""

    def __init__(self, cache: ImageCache, episodes: pd.DataFrame, probe: InLoopProbeConfig, device: str) -> None:
        self.cache = cache
        self.episodes = episodes
        row_of_id = dict(zip(cache.index["image_id"], cache.index["cache_row"].astype(int)))
        ids = sorted({i for col in ("train_ids", "test_ids") for ids in episodes[col] for i in ids})
        missing = [i for i in ids if i not in row_of_id]
        if missing:
            raise ConfigError(f"episodes refer to image {missing[0]!r}, which is not in the cache {cache.path}")
        self.ids = ids
        self.rows = np.array([row_of_id[i] for i in ids], dtype=np.int64)
        self.local = {image_id: k for k, image_id in enumerate(ids)}
        self.preprocessing = PreprocessConfig(input_size=probe.input_size, crop_fraction=probe.crop_fraction)
        self.extraction = ExtractConfig(device=device, batch_size=128)
        self.linear = probe.linear

    def __call__(self, backbone: Backbone) -> tuple[dict[str, float], pd.DataFrame]:
        features = extract_features(backbone, self.cache.images, self.rows, self.preprocessing, self.extraction,
                                    what="trial backbone")
        return self._score(features)

    def initial(self, config: PretrainConfig) -> tuple[dict[str, float], pd.DataFrame]:
        """Score the backbone the engine starts from. Every trial of a sweep with the same seed and
        init starts from the same weights, so its features come from the on-disk feature cache
        after the first trial has extracted them."""
        model = config.model
        spec = BackboneSpec(init=model.init, arch=model.arch, weights=model.weights, seed=config.train.seed,
                            in_chans=model.in_chans)
        unique, features, _ = cached_features(spec, self.cache, self.rows, self.preprocessing, self.extraction)
        position = {int(r): i for i, r in enumerate(unique)}
        return self._score(features[[position[int(r)] for r in self.rows]])

    def _score(self, features: np.ndarray) -> tuple[dict[str, float], pd.DataFrame]:
        table = fit_probes(features, self.episodes, self.local, self.linear)
        per_shots = table.groupby(["shots", "disease"])["auroc"].mean().groupby("shots").mean()
        metrics = {f"probe_auroc_{int(s)}shot": float(v) for s, v in per_shots.items()}
        return metrics, table


def judge_on_episodes(flat: Mapping[str, Any], backbone_file: str | Path, cache: ImageCache,
                      episodes: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A trial's backbone and the random init it started from, probed as the trial's in-loop judge
    does (its ``probe.*`` settings) on other ``episodes``: the sweep's report episodes, on which
    the winner chosen on the validation episodes is reported. Returns (backbone, random init)."""
    resolved = pretrain_trial(flat)
    judge = ProbeJudge(cache, episodes, resolved.probe, _device(resolved.pretrain))
    _, trained = judge(load_backbone(backbone_file))
    _, initial = judge.initial(resolved.pretrain)
    return trained, initial


def _device(config: PretrainConfig) -> str:
    return str(resolve_device(config.train.device, "train.device"))


def _write_checkpoint_dir(folder: Path, engine_checkpoint: Path, backbone: Backbone | None,
                          results: pd.DataFrame | None, state: dict[str, Any], carried: tuple[Path, ...] = ()) -> Path:
    """A Tune checkpoint folder. ``carried`` files (the engine's metrics log, the random-init
    probe table) travel with it: a restored trial may run in a fresh trial folder (a new Ray
    session stages trial folders anew, another node has none), and gets them back from here.
    Without ``backbone`` (a checkpoint the engine did not judge) it is for resuming only: no
    backbone file, so no selection or export picks it."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in carried:
        if path.is_file():
            shutil.copy2(path, folder / path.name)
    try:  # the engine keeps its own file: a hard link stages it without a second copy on disk
        os.link(engine_checkpoint, folder / ENGINE_CHECKPOINT)
    except OSError:
        shutil.copy2(engine_checkpoint, folder / ENGINE_CHECKPOINT)
    if backbone is not None:
        save_backbone(backbone, folder / BACKBONE_FILE, meta={"epoch": state.get("epoch", 0)})
        results.to_parquet(folder / PROBE_RESULTS, index=False)
    (folder / STATE_FILE).write_text(json.dumps(state))
    return folder


def remove_staging(work_dir: str | Path) -> None:
    """Remove a trial's staged checkpoint folders. Tune has copied each into the trial folder by
    the time its report returns; the last one stays until the trial ends (Tune stops a finished
    trial without returning from its final report), so the driver calls this again then."""
    for folder in Path(work_dir).glob(STAGING_PREFIX + "*"):
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def restore_into(run_dir: Path, checkpoint_folder: Path) -> dict[str, Any]:
    """Put a trial checkpoint's engine checkpoint where the engine resumes from; return the
    trial state (last objective values) saved beside it.

    Engine checkpoints of later epochs are removed: a process killed after the engine saved an
    epoch but before Tune recorded it leaves one behind, and the engine would otherwise resume
    from it while Tune's results and the trial state stand at the restored epoch.
    """
    payload = load_checkpoint(checkpoint_folder / ENGINE_CHECKPOINT)
    epoch = int(payload["epoch"])
    del payload
    for later, path in list_checkpoints(run_dir):
        if later > epoch:
            path.unlink(missing_ok=True)
    target = checkpoint_path(run_dir, epoch)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(checkpoint_folder / ENGINE_CHECKPOINT, target)
    # the engine's log up to this epoch (it drops any later lines itself) and the random-init table
    if (checkpoint_folder / METRICS_FILE).is_file():
        shutil.copy2(checkpoint_folder / METRICS_FILE, run_dir / METRICS_FILE)
    if (checkpoint_folder / INITIAL_RESULTS).is_file() and not (run_dir.parent / INITIAL_RESULTS).is_file():
        shutil.copy2(checkpoint_folder / INITIAL_RESULTS, run_dir.parent / INITIAL_RESULTS)
    state_file = checkpoint_folder / STATE_FILE
    return json.loads(state_file.read_text()) if state_file.is_file() else {}


def run_pretrain_trial(flat: Mapping[str, Any], inputs: Mapping[str, Any], work_dir: str | Path, report: Report,
                       restore_from: str | Path | None = None) -> dict[str, Any]:
    """Run one pretraining trial, reporting after every epoch; returns the last report.
    ``flat``: the trial's config (:func:`cxrtune.resolve.pretrain_trial`); ``inputs``: the sweep's data."""
    resolved = pretrain_trial(flat)
    config, trial, health = resolved.pretrain, resolved.trial, resolved.health
    data = TrialInputs.from_inputs(inputs)
    if trial.threads:
        torch.set_num_threads(trial.threads)
    work_dir = Path(work_dir)
    run_dir = work_dir / RUN_DIR
    cache = ImageCache.open(data.cache)
    rows = pretrain_rows(cache, trial.pretrain_subset)
    eval_cache = cache if data.eval_cache in ("", data.cache) else ImageCache.open(data.eval_cache)
    judge = ProbeJudge(eval_cache, load_episodes(data.episodes), resolved.probe, _device(config))
    state: dict[str, Any] = {}
    remove_staging(work_dir)  # left by a killed run of this trial
    if restore_from is not None:
        state = restore_into(run_dir, Path(restore_from))
    if "objective" not in state:
        initial_metrics, initial_table = judge.initial(config)
        work_dir.mkdir(parents=True, exist_ok=True)
        initial_table.to_parquet(work_dir / INITIAL_RESULTS, index=False)
        state = {"objective": initial_metrics, "objective_epoch": 0,
                 "initial": {f"initial_{k}": v for k, v in initial_metrics.items()}}
    last: dict[str, Any] = {}

    def on_epoch(metrics: dict[str, Any]) -> str | None:
        nonlocal last
        checkpoint = metrics.pop("checkpoint", None)
        folder = None
        if checkpoint is not None:
            backbone = table = None
            if metrics.get("judged", True):
                backbone = load_backbone(checkpoint)
                objective, table = judge(backbone)
                state.update(objective=objective, objective_epoch=metrics["epoch"])
            state.update(epoch=metrics["epoch"])
            remove_staging(work_dir)  # the previous report has returned: Tune holds its copy
            folder = _write_checkpoint_dir(Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=work_dir)),
                                           Path(checkpoint), backbone, table, dict(state),
                                           carried=(run_dir / METRICS_FILE, work_dir / INITIAL_RESULTS))
        reason = collapse_reason(metrics, health, metrics["epoch"])
        out = {**metrics, **state["objective"], **state["initial"], "objective_epoch": state["objective_epoch"],
               "final": metrics["epoch"] >= config.train.epochs}
        if reason is not None:
            out.update(trial_status="collapsed", collapse_reason=reason, final=True)
        last = out
        report(out, folder)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        return "stop" if reason is not None else None

    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        # Without a Tune checkpoint the trial starts afresh, even if its folder holds engine
        # checkpoints of an earlier attempt (Tune restarts a trial whose checkpoint it had not
        # recorded when the driver died): they belong to a run Tune has forgotten.
        result = pretrain(config, cache.images, run_dir, rows=rows, callback=on_epoch,
                          resume=restore_from is not None)
    except DivergenceError as err:
        out = {**last, **state["objective"], **state["initial"], "trial_status": "diverged",
               "divergence": str(err), "final": True}
        out.setdefault("epoch", err.epoch)
        report(out, None)
        return out
    if result.status == "time_limit" and last:
        last = {**last, "final": True, "stopped_by": "time_limit"}
        report(last, None)
    return last


def run_fewshot_trial(flat: Mapping[str, Any], inputs: Mapping[str, Any], report: Report,
                      out_dir: str | Path) -> dict[str, Any]:
    """Evaluate one backbone on the episodes; keys ``backbone.*`` (BackboneSpec) and ``eval.*``
    (EvalConfig); a ``case`` dict (one grid cell) is merged in. ``inputs``: the sweep's data."""
    flat = {**{k: v for k, v in flat.items() if k != "case"}, **dict(flat.get("case") or {})}
    flat.pop("label", None)
    backbone_keys = {k[9:]: v for k, v in flat.items() if k.startswith("backbone.")}
    eval_keys = {k[5:]: v for k, v in flat.items() if k.startswith("eval.")}
    data = TrialInputs.from_inputs(inputs)
    cache = ImageCache.open(data.cache)
    episodes = load_episodes(data.episodes)
    spec = BackboneSpec.from_flat(backbone_keys)
    config = EvalConfig.from_flat(eval_keys)
    out_dir = Path(out_dir)
    table = run_evaluation(spec, cache, episodes, config=config, out=out_dir / "results.parquet")
    metrics: dict[str, Any] = {}
    for evaluator, group in table.groupby("evaluator"):
        per_shots = group.groupby(["shots", "disease"])["auroc"].mean().groupby("shots").mean()
        for shots, value in per_shots.items():
            metrics[f"{evaluator}_auroc_{int(shots)}shot"] = float(value)
    metrics["mean_auroc"] = float(np.mean([v for v in metrics.values() if math.isfinite(v)]))
    metrics["final"] = True
    report(metrics, None)
    return metrics
