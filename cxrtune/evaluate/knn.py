"""A weighted k-nearest-neighbour probe on cosine similarity: the cheap in-loop monitor.

No fitting at all: a test image's score is the similarity-weighted vote of its k most similar
training images, weights ``exp(cosine / temperature)`` (the weighted kNN of the DINO and
InstDisc evaluations). It tracks the linear probe's ranking of backbones at a fraction of the
cost, so a pretraining loop can afford it every few epochs.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import pandas as pd
import torch

from cxrtune.config import Config, param
from cxrtune.device import resolve_device
from cxrtune.evaluate.episodes import episode_arrays
from cxrtune.evaluate.metrics import batched_accuracy, batched_auroc, batched_f1
from cxrtune.evaluate.probe import normalize_features


@dataclasses.dataclass
class KnnConfig(Config):
    k: int = param(20, low=1, doc="neighbours voting (capped at the training-set size)")
    temperature: float = param(0.07, low=0, low_open=True, doc="vote weight exp(cosine / temperature)")
    device: str = param("cpu", doc="torch device: cpu, cuda or auto")


def knn_scores(features, episodes: pd.DataFrame, row_of_id: Mapping[str, int],
               config: KnnConfig | None = None) -> pd.DataFrame:
    """Score every episode by weighted kNN; one row per episode (``disease, shots, n, trial, k,
    auroc, accuracy, f1``), accuracy and F1 at a vote share of one half."""
    config = config or KnnConfig()
    device = resolve_device(config.device)
    x = normalize_features(features).to(device)
    arrays = episode_arrays(episodes, row_of_id)
    out: list[dict | None] = [None] * len(arrays)
    by_size: dict[int, list[int]] = {}
    for e, a in enumerate(arrays):
        by_size.setdefault(len(a[0]), []).append(e)
    for T, members in by_size.items():
        M = max(len(arrays[e][2]) for e in members)
        G = len(members)
        train_idx = torch.as_tensor(np.stack([arrays[e][0] for e in members]), device=device)
        y_train = torch.as_tensor(np.stack([arrays[e][1] for e in members]), device=device).to(torch.float64)
        test_idx = torch.zeros(G, M, dtype=torch.long, device=device)
        y_test = torch.zeros(G, M, dtype=torch.long, device=device)
        mask = torch.zeros(G, M, dtype=torch.bool, device=device)
        for g, e in enumerate(members):
            m = len(arrays[e][2])
            test_idx[g, :m] = torch.as_tensor(arrays[e][2])
            y_test[g, :m] = torch.as_tensor(arrays[e][3])
            mask[g, :m] = True
        similarity = x[test_idx] @ x[train_idx].transpose(1, 2)  # (G, M, T) cosine
        k = min(config.k, T)
        top, which = similarity.topk(k, dim=2)
        votes = torch.exp((top - top[..., :1]) / config.temperature)  # exp(s/t), shifted for range
        neighbour_labels = torch.gather(y_train[:, None, :].expand(-1, M, -1), 2, which)
        # unanimous neighbours give exactly 0 or 1, so such images tie as they should
        score = (votes * neighbour_labels).sum(2) / votes.sum(2)
        predicted = score > 0.5
        auc = batched_auroc(score, y_test, mask)
        acc = batched_accuracy(predicted, y_test, mask)
        f1 = batched_f1(predicted, y_test, mask)
        for g, e in enumerate(members):
            out[e] = {"k": k, "auroc": float(auc[g]), "accuracy": float(acc[g]), "f1": float(f1[g])}
    frame = episodes[["disease", "shots", "n", "trial"]].reset_index(drop=True).copy()
    return pd.concat([frame, pd.DataFrame(out)], axis=1)
