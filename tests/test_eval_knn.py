"""The weighted kNN monitor against a plain per-image loop."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from _eval_fixtures import make_episodes, synthetic_features
from cxrtune.errors import DataError
from cxrtune.evaluate.knn import KnnConfig, knn_scores


def _loop_knn(x, rec, row_of_id, k, temperature):
    train = x[[row_of_id[i] for i in rec.train_ids]]
    labels = np.asarray(rec.train_labels, dtype=float)
    scores = []
    for i in rec.test_ids:
        sims = train @ x[row_of_id[i]]
        nearest = np.argsort(-sims)[: min(k, len(train))]
        weights = np.exp(sims[nearest] / temperature)
        scores.append((weights * labels[nearest]).sum() / weights.sum())
    return np.asarray(scores)


@pytest.mark.parametrize("k", [1, 5, 200])
def test_knn_matches_a_plain_loop(k):
    index, episodes = make_episodes(n_diseases=3, shots=(1, 5, 10), trials=2)
    features, row_of_id = synthetic_features(index, dim=32, signal=0.5, nonnegative=False)
    x = features.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = knn_scores(features, episodes, row_of_id, KnnConfig(k=k, temperature=0.1))
    for rec, row in zip(episodes.itertuples(), got.itertuples()):
        scores = _loop_knn(x, rec, row_of_id, k, 0.1)
        assert row.auroc == pytest.approx(roc_auc_score(rec.test_labels, scores), abs=1e-9)
        assert row.accuracy == pytest.approx(np.mean((scores > 0.5) == np.asarray(rec.test_labels)))
        assert row.k == min(k, 2 * rec.n)
    assert got["auroc"].mean() > 0.6  # the features carry signal


def test_knn_refuses_nan_features():
    index, episodes = make_episodes(n_diseases=2, shots=(1,), trials=1)
    features, row_of_id = synthetic_features(index, dim=8)
    features[:] = np.nan
    with pytest.raises(DataError, match="NaN"):
        knn_scores(features, episodes, row_of_id)
