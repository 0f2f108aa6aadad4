"""An episode table's image ids and labels as feature-row indices and label arrays, checked.

Every evaluator (linear probe, kNN, fine-tuning) starts from these arrays, and each refuses the
same malformed episodes (unknown image ids, ids and labels of different lengths, a training or
test set without both classes) with the same message naming the episode.
"""

from __future__ import annotations

import itertools
from typing import Mapping

import numpy as np
import pandas as pd

from cxrtune.errors import DataError, TaskError

EpisodeArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def episode_arrays(episodes: pd.DataFrame, row_of_id: Mapping[str, int]) -> list[EpisodeArrays]:
    """``(train rows, train labels, test rows, test labels)`` of every episode, checked.

    The ids of all episodes are looked up at once (a hash join), not one dictionary access each.
    """
    columns = {name: episodes[name].tolist() for name in ("train_ids", "test_ids", "train_labels", "test_labels")}
    lengths = {name: np.fromiter(map(len, values), dtype=np.int64, count=len(values))
               for name, values in columns.items()}
    rows, labels = {}, {}
    for split in ("train", "test"):
        ids, y = columns[f"{split}_ids"], columns[f"{split}_labels"]
        try:
            found = np.fromiter(map(row_of_id.__getitem__, itertools.chain.from_iterable(ids)), dtype=np.int64,
                                count=int(lengths[f"{split}_ids"].sum()))
        except KeyError as exc:
            missing = exc.args[0]
            e = next(e for e, episode_ids in enumerate(ids) if any(i not in row_of_id for i in episode_ids))
            raise DataError(f"{_episode_name(episodes, e)}: image id {missing!r} has no extracted feature row") from None
        mismatch = np.flatnonzero(lengths[f"{split}_ids"] != lengths[f"{split}_labels"])
        if len(mismatch):
            e = int(mismatch[0])
            raise TaskError(f"{_episode_name(episodes, e)}: {lengths[f'{split}_ids'][e]} {split} ids but "
                            f"{lengths[f'{split}_labels'][e]} {split} labels")
        flat_y = np.fromiter(itertools.chain.from_iterable(y), dtype=np.int64, count=int(lengths[f"{split}_labels"].sum()))
        bounds = np.cumsum(lengths[f"{split}_ids"])[:-1]
        rows[split] = np.split(found, bounds)
        labels[split] = np.split(flat_y, bounds)
        positives, negatives = (_segment_sums(flat_y == value, lengths[f"{split}_ids"]) for value in (1, 0))
        bad = np.flatnonzero((positives == 0) | (negatives == 0))
        if len(bad):
            e = int(bad[0])
            word = "training" if split == "train" else "test"
            raise TaskError(f"{_episode_name(episodes, e)}: the {word} set has {positives[e]} positives and "
                            f"{negatives[e]} negatives; a binary probe needs at least one of each")
    return list(zip(rows["train"], labels["train"], rows["test"], labels["test"]))


def _segment_sums(flags: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sums of consecutive segments of ``flags`` with the given lengths (0 for an empty one)."""
    totals = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    ends = np.cumsum(lengths)
    return totals[ends] - totals[ends - lengths]


def _episode_name(episodes: pd.DataFrame, e: int) -> str:
    rec = episodes.iloc[e]
    return f"episode (disease {rec.disease!r}, shots {rec.shots}, trial {rec.trial})"
