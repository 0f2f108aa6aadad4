"""Gradient finetuning per episode, with the study's recipe, seeded end to end.

Recipe (defaults of :class:`FinetuneConfig`): stages from ``unfreeze_from`` (``layer2``; the study
used ``layer3`` for SparK) to ``layer4`` train, earlier ones stay frozen; every BatchNorm is frozen
(running statistics and affine parameters: a batch of 2 to 32 X-rays would wreck them); the head
is ``Linear(feature_dim, 2)`` on L2-normalised features, initialised from the class prototypes
(weights = class means of the normalised training features, bias = -|mean|^2 / 2, i.e. the
nearest-class-mean classifier), so training starts from a sensible decision rule; AdamW with
backbone lr 1e-4 / head lr 1e-3, weight decay 0.01, a per-step cosine schedule over 100 epochs,
batches of min(32, 2n), and the pretraining augmentations (``cxrtune.augment``, normalised as
the evaluation's preprocessing).

Repeatability: the episode's seed (from the config seed and the episode's identity) seeds one
generator for the batch order and one on the training device for every augmentation draw, and
the model is copied fresh for each episode, so two runs on the CPU give identical numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import zlib
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from cxrtune.augment import AugmentConfig, BatchAugment
from cxrtune.config import Config, param
from cxrtune.device import resolve_device
from cxrtune.evaluate.episodes import episode_arrays
from cxrtune.evaluate.features import image_array
from cxrtune.evaluate.metrics import accuracy, auroc, f1
from cxrtune.evaluate.preprocess import PreprocessConfig, preprocess
from cxrtune.models.backbone import Backbone

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "head")


@dataclasses.dataclass
class FinetuneConfig(Config):
    """The study's finetuning recipe; every default is the study's."""

    unfreeze_from: str = param("layer2", choices=STAGES,
                               doc="first trained stage (layer3 for SparK; head = only the head trains)")
    backbone_lr: float = param(1e-4, low=0, doc="AdamW learning rate of the unfrozen backbone stages")
    head_lr: float = param(1e-3, low=0, low_open=True, doc="AdamW learning rate of the head")
    weight_decay: float = param(0.01, low=0, doc="AdamW weight decay (both groups)")
    epochs: int = param(100, low=1, doc="epochs over the 2n training images, cosine-annealed per step")
    batch_size: int = param(32, low=1, doc="batch = min(batch_size, 2n)")
    seed: int = param(0, doc="seeds batch order and augmentation, combined with the episode's identity")
    augment: bool = param(True, doc="apply the pretraining augmentations to training batches")
    eval_batch_size: int = param(128, low=1, doc="images per forward pass when scoring the test set")
    device: str = param("auto", doc="torch device: auto, cpu, cuda")
    augmentation: AugmentConfig = param(default_factory=AugmentConfig)


def episode_seed(base: int, disease: str, shots: int, trial: int) -> int:
    """A seed unique to (config seed, disease, shots, trial), stable across processes."""
    return int(np.random.SeedSequence([base, zlib.crc32(disease.encode()), int(shots), int(trial)]).generate_state(1)[0])


class _Classifier(nn.Module):
    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.backbone(x), dim=1))


def _stage_modules(backbone: Backbone) -> dict[str, list[nn.Module]]:
    t = backbone.trunk
    return {"stem": [t.conv1, t.bn1], "layer1": [t.layer1], "layer2": [t.layer2],
            "layer3": [t.layer3], "layer4": [t.layer4]}


def _freeze(model: _Classifier, unfreeze_from: str) -> list[nn.Parameter]:
    """Set requires_grad by stage; BatchNorm never trains. Returns the trainable backbone params."""
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    start = STAGES.index(unfreeze_from)
    for name, modules in _stage_modules(model.backbone).items():
        if STAGES.index(name) >= start:
            for module in modules:
                for p in module.parameters():
                    p.requires_grad_(True)
    for module in model.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for p in module.parameters():
                p.requires_grad_(False)
    return [p for p in model.backbone.parameters() if p.requires_grad]


def _train_mode(model: _Classifier) -> None:
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()  # frozen statistics


@torch.no_grad()
def _features(model: _Classifier, array: np.ndarray, rows: np.ndarray, preprocessing: PreprocessConfig,
              device: torch.device, batch_size: int) -> torch.Tensor:
    out = []
    for start in range(0, len(rows), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(array[rows[start: start + batch_size]])).to(device)
        out.append(model.backbone(preprocess(batch, preprocessing, model.backbone.in_chans)))
    return torch.cat(out)


def finetune_episode(backbone: Backbone, images: Any, train_rows, train_labels, test_rows, test_labels,
                     config: FinetuneConfig | None = None, preprocessing: PreprocessConfig | None = None,
                     seed: int = 0) -> dict[str, float]:
    """Finetune a fresh copy of ``backbone`` on one episode; AUROC, accuracy and F1 on its test set."""
    config = config or FinetuneConfig()
    preprocessing = preprocessing or PreprocessConfig()
    device = resolve_device(config.device)
    array = image_array(images)
    train_rows, test_rows = np.asarray(train_rows, dtype=np.int64), np.asarray(test_rows, dtype=np.int64)
    y_train = torch.as_tensor(np.asarray(train_labels, dtype=np.int64), device=device)
    model = _Classifier(copy.deepcopy(backbone)).to(device)
    trainable = _freeze(model, config.unfreeze_from)

    # Prototype head on L2-normalised features of the (unaugmented) training images.
    model.eval()
    feats = F.normalize(_features(model, array, train_rows, preprocessing, device, config.eval_batch_size), dim=1)
    with torch.no_grad():
        for c in (0, 1):
            prototype = feats[y_train == c].mean(0)
            model.head.weight[c] = prototype
            model.head.bias[c] = -0.5 * prototype.pow(2).sum()

    groups = [{"params": list(model.head.parameters()), "lr": config.head_lr}]
    if trainable and config.backbone_lr > 0:
        groups.append({"params": trainable, "lr": config.backbone_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    batch = min(config.batch_size, len(train_rows))
    steps_per_epoch = math.ceil(len(train_rows) / batch)
    total = config.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)  # batch order
    augmenter = BatchAugment(config.augmentation, preprocessing.input_size,
                             torch.Generator(device=device).manual_seed(seed + 1),
                             mean=preprocessing.mean, std=preprocessing.std)
    step = 0
    _train_mode(model)
    for _epoch in range(config.epochs):
        order = torch.randperm(len(train_rows), generator=generator).numpy()
        for start in range(0, len(order), batch):
            pick = order[start: start + batch]
            images_batch = torch.from_numpy(np.ascontiguousarray(array[train_rows[pick]])).to(device)
            if config.augment:
                x = augmenter(images_batch)
                if model.backbone.in_chans == 3:
                    x = x.expand(-1, 3, -1, -1).contiguous()
            else:
                x = preprocess(images_batch, preprocessing, model.backbone.in_chans)
            factor = 0.5 * (1 + math.cos(math.pi * step / total))
            for group, lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = lr * factor
            loss = F.cross_entropy(model(x), y_train[torch.from_numpy(pick).to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1

    model.eval()
    with torch.no_grad():
        logits = model.head(F.normalize(_features(model, array, test_rows, preprocessing, device,
                                                  config.eval_batch_size), dim=1))
    score = (logits[:, 1] - logits[:, 0]).double().cpu().numpy()
    predicted = score > 0
    return {"auroc": auroc(test_labels, score, what="finetune test set"), "accuracy": accuracy(test_labels, predicted),
            "f1": f1(test_labels, predicted), "final_loss": float(loss.detach())}


def finetune_episodes(backbone: Backbone, images: Any, episodes: pd.DataFrame, row_of_id: Mapping[str, int],
                      config: FinetuneConfig | None = None, preprocessing: PreprocessConfig | None = None,
                      progress: bool = False) -> pd.DataFrame:
    """Finetune every episode (one fresh copy of the backbone each); one row per episode."""
    config = config or FinetuneConfig()
    arrays = episode_arrays(episodes, row_of_id)
    rows = []
    iterator = zip(episodes.itertuples(index=False), arrays)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, total=len(arrays), desc="finetune", unit="episode")
    for rec, (train, y_train, test, y_test) in iterator:
        seed = episode_seed(config.seed, rec.disease, rec.shots, rec.trial)
        rows.append(finetune_episode(backbone, images, train, y_train, test, y_test, config, preprocessing, seed))
    frame = episodes[["disease", "shots", "n", "trial"]].reset_index(drop=True).copy()
    return pd.concat([frame, pd.DataFrame(rows)], axis=1)
