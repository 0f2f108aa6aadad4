"""One evaluation: a backbone, a set of images, the episodes, the evaluators -> a tidy table.

``run_evaluation`` is the public entry point (the CLI and the sweep trainables call it);
``study_table`` prints results the
way the study reported them (mean over diseases of per-disease mean AUROC, by shots, with paired
p-values against a baseline).

The results table has one row per backbone x evaluator x disease x shots x trial with columns
``backbone, evaluator, disease, shots, n, trial, auroc, accuracy, f1, C, k`` (C for the probe, k
for kNN, NaN otherwise) and metadata columns ``backbone_identity, arch, init, images,
input_size, crop_fraction, cxrtune_version``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from cxrtune import __version__
from cxrtune.config import Config, param
from cxrtune.data.tasks import DEFAULT_SHOTS, DEFAULT_TRIALS
from cxrtune.errors import TaskError
from cxrtune.evaluate.features import (
    BackboneSpec, ExtractConfig, cached_features, images_identity,
)
from cxrtune.evaluate.finetune import FinetuneConfig, finetune_episodes
from cxrtune.evaluate.knn import KnnConfig, knn_scores
from cxrtune.evaluate.preprocess import XRAY_MEAN, XRAY_STD, PreprocessConfig
from cxrtune.evaluate.probe import ProbeConfig, fit_probes
from cxrtune.evaluate.stats import compare, disease_means
from cxrtune.models.backbone import Backbone

EVALUATORS = ("probe", "knn", "finetune")
RESULT_COLUMNS = ["backbone", "evaluator", "disease", "shots", "n", "trial", "auroc", "accuracy", "f1", "C", "k",
                  "backbone_identity", "arch", "init", "images", "input_size", "crop_fraction", "cxrtune_version"]


@dataclasses.dataclass
class EvalConfig(Config):
    """Everything an evaluation needs besides the backbone, images and episodes."""

    evaluators: tuple[str, ...] = param(("probe",), choices=EVALUATORS, doc="evaluators to run")
    shots: tuple[int, ...] = param(DEFAULT_SHOTS, low=1, doc="shot counts (when episodes are sampled here)")
    trials: int = param(DEFAULT_TRIALS, low=1, doc="trials per (disease, shots) (when sampled here)")
    input_size: int = param(224, low=16, high=4096, doc="backbone input side in pixels")
    crop_fraction: float = param(224 / 256, low=0, high=1, low_open=True, doc="centre crop of the cached side")
    mean: float = param(XRAY_MEAN, low=0, high=1, doc="X-ray intensity mean")
    std: float = param(XRAY_STD, low=0, low_open=True, doc="X-ray intensity std")
    batch_size: int = param(128, low=1, doc="images per forward pass during feature extraction")
    device: str = param("auto", doc="torch device for extraction and finetuning: auto, cpu, cuda")
    precision: str = param("fp32", choices=("fp32", "bf16"), doc="extraction precision (bf16 only on CUDA)")
    probe: ProbeConfig = param(default_factory=ProbeConfig)
    knn: KnnConfig = param(default_factory=KnnConfig)
    finetune: FinetuneConfig = param(default_factory=FinetuneConfig)

    def preprocessing(self) -> PreprocessConfig:
        return PreprocessConfig(input_size=self.input_size, crop_fraction=self.crop_fraction,
                                mean=self.mean, std=self.std)

    def extraction(self) -> ExtractConfig:
        return ExtractConfig(batch_size=self.batch_size, device=self.device, precision=self.precision)


def _local_rows(episodes: pd.DataFrame, row_of_id: Mapping[str, int]) -> tuple[np.ndarray, list[str]]:
    ids = sorted({i for col in ("train_ids", "test_ids") for ids in episodes[col] for i in ids})
    missing = [i for i in ids if i not in row_of_id]
    if missing:
        raise TaskError(f"episode image {missing[0]!r} (and {len(missing) - 1} more) is not in the image cache; "
                        "were the episodes drawn from another source or cache?")
    return np.asarray([row_of_id[i] for i in ids], dtype=np.int64), ids


def default_row_map(images: Any) -> dict[str, int]:
    index = getattr(images, "index", None)
    if index is None:
        raise TaskError("images is a plain array: pass row_of_id (image_id -> row of the array)")
    return dict(zip(index["image_id"].astype(str), index["cache_row"].astype(int)))


def run_evaluation(backbone: BackboneSpec | str, images: Any, episodes: pd.DataFrame,
                   row_of_id: Mapping[str, int] | None = None, config: EvalConfig | None = None,
                   cache_root: str | Path | None = None, out: str | Path | None = None,
                   model: Backbone | None = None, name: str | None = None, progress: bool = False) -> pd.DataFrame:
    """Evaluate one backbone on every episode with each configured evaluator.

    ``backbone`` is a :class:`BackboneSpec` (or a checkpoint path / ``imagenet`` / ``random``
    string with default arch); ``images`` an ImageCache or a uint8 (N, S, S) array, with
    ``row_of_id`` mapping episode image ids to its rows (built from the cache's index when
    omitted). Probe and kNN share one cached feature extraction. ``model`` reuses an already built
    backbone (the key still comes from the spec); ``name`` overrides the table's backbone label.
    Returns the tidy table, also written atomically to ``out`` (Parquet) when given.
    """
    config = config or EvalConfig()
    spec = backbone if isinstance(backbone, BackboneSpec) else BackboneSpec(init=str(backbone))
    row_of_id = row_of_id if row_of_id is not None else default_row_map(images)
    if episodes.empty:
        raise TaskError("episodes is empty: sample them with cxrtune.data.tasks.sample_episodes")
    rows, ids = _local_rows(episodes, row_of_id)
    frames = []
    features = None
    local = {image_id: i for i, image_id in enumerate(ids)}
    for evaluator in config.evaluators:
        if evaluator in ("probe", "knn"):
            if features is None:
                unique, feats, _ = cached_features(spec, images, rows, config.preprocessing(), config.extraction(),
                                                   root=cache_root, backbone=model)
                position = {int(r): i for i, r in enumerate(unique)}
                features = feats[[position[int(r)] for r in rows]]
            scored = (fit_probes(features, episodes, local, config.probe) if evaluator == "probe"
                      else knn_scores(features, episodes, local, config.knn))
        else:
            built = model if model is not None else spec.build()
            finetune = dataclasses.replace(config.finetune, device=config.device if config.finetune.device == "auto"
                                           else config.finetune.device)
            scored = finetune_episodes(built, images, episodes, row_of_id, finetune, config.preprocessing(), progress)
        scored.insert(0, "evaluator", evaluator)
        frames.append(scored)
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "backbone", name or spec.label())
    for column in ("C", "k"):
        if column not in table:
            table[column] = np.nan
    table["backbone_identity"] = spec.identity()
    table["arch"] = model.arch if model is not None else spec.arch  # a checkpoint of another arch fails to build
    table["init"] = spec.init
    table["images"] = images_identity(images)
    table["input_size"] = config.input_size
    table["crop_fraction"] = config.crop_fraction
    table["cxrtune_version"] = __version__
    extra = [c for c in table.columns if c not in RESULT_COLUMNS]
    table = table[RESULT_COLUMNS + extra]
    if out is not None:
        write_results(table, out)
    return table


def write_results(table: pd.DataFrame, path: str | Path) -> Path:
    """Write a results table as Parquet through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        table.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def study_table(results: pd.DataFrame, baseline: str | None = None, metric: str = "auroc") -> str:
    """Mean over diseases of per-disease mean ``metric`` by shots, one line per backbone and
    evaluator; with ``baseline`` (a backbone name), paired t-test and Wilcoxon p-values over the
    per-disease means of every other backbone against it, per evaluator."""
    lines = []
    shots = sorted(results["shots"].unique())
    header = f"{'backbone':<28} {'evaluator':<9} " + " ".join(f"{s:>7}" for s in shots)
    lines.append(header)
    lines.append("-" * len(header))
    for (backbone, evaluator), _ in results.groupby(["backbone", "evaluator"], sort=True):
        means = disease_means(results, backbone, evaluator, metric).mean(axis=0)
        cells = " ".join(f"{means.get(s, float('nan')):>7.3f}" for s in shots)
        lines.append(f"{backbone:<28} {evaluator:<9} {cells}")
    if baseline is not None:
        if baseline not in set(results["backbone"]):
            raise TaskError(f"baseline {baseline!r} is not among the backbones {sorted(set(results['backbone']))}")
        lines.append("")
        lines.append(f"paired over diseases vs {baseline} (t-test p / Wilcoxon p)")
        for (backbone, evaluator), _ in results.groupby(["backbone", "evaluator"], sort=True):
            if backbone == baseline or not ((results["backbone"] == baseline) & (results["evaluator"] == evaluator)).any():
                continue
            table = compare(results, backbone, baseline, evaluator, metric)
            table = table.set_index("shots") if not table.empty else pd.DataFrame(columns=["t_pvalue", "wilcoxon_pvalue"])
            cells = " ".join(
                f"{table.loc[s, 't_pvalue']:>5.3f}/{table.loc[s, 'wilcoxon_pvalue']:<5.3f}" if s in table.index else f"{'-':>11}"
                for s in shots
            )
            lines.append(f"{backbone:<28} {evaluator:<9} {cells}")
    return "\n".join(lines)
