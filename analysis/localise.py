"""Grad-CAM heatmaps and localisation scores for the backbones of a sweep, per finding.

Backbones: the sweep's best SSL checkpoint (its export, else the best checkpoint on disk), random
init of the same architecture and seed, and ImageNet only when a local weights file is given
(nothing is downloaded; the panel says it is absent otherwise). Per finding, a logistic head is
fitted on all training positives and negatives of the task pool (features extracted once per
backbone), Grad-CAM runs on up to ``max_images`` evaluation positives that have a ground-truth
region, and each heatmap is scored by :mod:`cxrtune.analysis.localisation`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrtune.analysis.gradcam import GradcamConfig, HeadedBackbone, fit_head, gradcam_maps
from cxrtune.analysis.ground_truth import GroundTruth
from cxrtune.analysis.localisation import score_images, summarise_scores
from cxrtune.errors import CxrtuneError
from cxrtune.evaluate.features import ExtractConfig, extract_features
from cxrtune.sweepfolder import BACKBONE_FILE, SweepFolder, initial_results  # noqa: F401  (initial_results re-exported)


@dataclasses.dataclass
class BackboneEntry:
    label: str
    backbone: Any = None  # cxrtune Backbone, or None when absent
    note: str = ""


@dataclasses.dataclass
class Localisation:
    scores: pd.DataFrame  # per image: finding, backbone, image_id, hit, energy, area
    summary: pd.DataFrame  # per finding x backbone (cxrtune.analysis.localisation.summarise_scores)
    examples: dict[str, dict[str, Any]]  # finding -> {image, mask, maps: {label: heatmap}}
    backbones: list[BackboneEntry]
    ground_truth: str
    notes: list[str]


def best_checkpoint_dir(folder: Path, objective: str | None) -> Path | None:
    """The checkpoint folder the sweep's report shows (:meth:`SweepFolder.chosen_checkpoint`)."""
    return SweepFolder(folder).chosen_checkpoint(objective)


def best_checkpoint(folder: Path, objective: str | None) -> Path | None:
    """The best checkpoint's backbone file, when it is on disk."""
    found = best_checkpoint_dir(folder, objective)
    return found / BACKBONE_FILE if found is not None and (found / BACKBONE_FILE).is_file() else None


def sweep_backbones(folder: Path, objective: str | None, params: dict[str, Any],
                    imagenet_weights: str | Path | None = None) -> list[BackboneEntry]:
    from cxrtune.models.backbone import build_backbone, load_backbone

    arch = str(params.get("model.arch", "resnet18"))
    seed = int(params.get("train.seed", 0))
    entries = []
    best = best_checkpoint(folder, objective)
    if best is not None:
        entries.append(BackboneEntry(folder.name, load_backbone(best), "best SSL checkpoint"))
        arch = entries[0].backbone.arch
    else:
        entries.append(BackboneEntry(folder.name, None, "absent: no checkpoint of this sweep on disk"))
    if imagenet_weights is not None:
        entries.append(BackboneEntry(f"imagenet-{arch}", build_backbone(arch, "imagenet", weights=imagenet_weights)))
    else:
        entries.append(BackboneEntry(f"imagenet-{arch}", None,
                                     "absent: no local weights file given (--imagenet-weights PATH)"))
    entries.append(BackboneEntry(f"random-{arch}", build_backbone(arch, "random", seed=seed)))
    return entries


def localise(entries: list[BackboneEntry], cache, diseases: list[str], truth: GroundTruth,
             config: GradcamConfig | None = None) -> Localisation:
    """Heatmaps and scores of every available backbone on every finding with ground truth."""
    from cxrtune.data.tasks import build_task_pool

    config = config or GradcamConfig()
    if config.findings is not None:
        unknown = sorted(set(config.findings) - set(diseases))
        if unknown:
            raise CxrtuneError(f"Grad-CAM finding {unknown[0]!r} is not among the sweep's findings: {', '.join(diseases)}")
        diseases = [d for d in diseases if d in set(config.findings)]
    index = cache.index
    few = index[index["subset"] == "fewshot"] if "subset" in index.columns else index
    pool = build_task_pool(few, diseases=diseases, min_train=1, min_val=1, max_train_neg=config.max_train_negatives,
                           max_val_neg=None, eval_splits=("val", "test"))
    rows_of = dict(zip(index["image_id"].astype(str), index["cache_row"].astype(int)))
    images = cache.images
    notes, targets = [], {}
    for disease, task in pool.tasks.items():
        chosen = []
        for image_id in task.test_pos:
            mask = truth.mask(image_id, disease)
            if mask is not None:
                chosen.append((image_id, mask))
            if len(chosen) == config.max_images:
                break
        if chosen:
            targets[disease] = chosen
        else:
            notes.append(f"{disease}: no evaluation positive has a ground-truth region")
    train_ids = sorted({i for t in pool.tasks.values() for i in t.train_pos + t.train_neg})
    train_rows = np.array([rows_of[i] for i in train_ids], dtype=np.int64)
    position = {image_id: k for k, image_id in enumerate(train_ids)}
    score_frames, examples = [], {}
    for entry in entries:
        if entry.backbone is None:
            continue
        feats = extract_features(entry.backbone, images, train_rows, config.preprocessing(),
                                 ExtractConfig(batch_size=config.batch_size, device=config.device), what=entry.label)
        for disease, chosen in targets.items():
            task = pool.tasks[disease]
            pick = [position[i] for i in task.train_pos + task.train_neg]
            labels = np.r_[np.ones(len(task.train_pos)), np.zeros(len(task.train_neg))]
            weight, bias = fit_head(feats[pick], labels, config.C)
            import torch

            model = HeadedBackbone(entry.backbone, torch.from_numpy(weight), bias)
            rows = [rows_of[i] for i, _ in chosen]
            maps = gradcam_maps(model, images, rows, config)
            masks = np.stack([m for _, m in chosen])
            frame = score_images(maps, masks)
            frame.insert(0, "image_id", [i for i, _ in chosen])
            frame.insert(0, "backbone", entry.label)
            frame.insert(0, "finding", disease)
            score_frames.append(frame)
            example = examples.setdefault(disease, {"image_id": chosen[0][0], "image": np.asarray(images[rows[0]]),
                                                    "mask": masks[0], "maps": {}})
            example["maps"][entry.label] = maps[0]
    scores = pd.concat(score_frames, ignore_index=True) if score_frames else pd.DataFrame(
        columns=["finding", "backbone", "image_id", "hit", "energy", "area"])
    summary = summarise_scores(scores) if not scores.empty else pd.DataFrame()
    return Localisation(scores=scores, summary=summary, examples=examples, backbones=entries,
                        ground_truth=truth.kind, notes=notes)
