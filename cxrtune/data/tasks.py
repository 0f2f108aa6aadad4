"""Few-shot binary tasks: which diseases, which positives and negatives, and seeded episodes.

The protocol is the study's (seed-facts), written for any indexed source:

1. keep the requested projections (PA/AP by default for PadChest) and single-label images;
   labels in ``no_finding`` (:data:`DEFAULT_NO_FINDING`: "No Finding", "Normal", "normal",
   "NaN", "nan" and the empty label) do not count as labels: an image carrying only those (or,
   while "" is in ``no_finding``, no label at all) is a *no-finding* image;
2. candidate diseases are the labels not in the exclusion list (no-finding images are never a
   task, whatever the exclusion list says);
3. splits are patient-disjoint (the index guarantees it); few-shot training draws from ``train``,
   testing from the evaluation split (``val``);
4. keep a disease with at least ``min_train`` training and ``min_val`` evaluation positives, or
   any disease in ``force_include`` (which still needs one positive on each side);
5. negatives of a disease: single-label images of any *other* label (excluded labels such as
   "normal" included) and every no-finding image, capped at ``max_train_neg`` /
   ``max_val_neg`` by a seeded draw.

An *episode* is one (disease, shots n, trial t): n positives and n negatives drawn from the
training pool with ``numpy.random.default_rng(42 + t)`` (n capped at the pool size with a
warning), tested on all evaluation positives plus as many evaluation negatives drawn with the
same generator. Episodes are saved as Parquet so every evaluator in a sweep sees the same ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from cxrtune.errors import TaskError

DEFAULT_SHOTS = (1, 5, 10, 20, 50)
DEFAULT_TRIALS = 10
DEFAULT_SEED_BASE = 42
#: Labels that mean "no finding" (a negative for every task, never a task itself); "" stands for
#: an empty label, and for an image without any label. Sources pass their own list through
#: their ``no_finding`` option (see :mod:`cxrtune.data.sources.base`).
DEFAULT_NO_FINDING = ("No Finding", "Normal", "normal", "NaN", "nan", "")
#: The ``label`` value :func:`single_label_rows` gives no-finding images (never a label name).
NO_FINDING_ROW = ""
EPISODE_COLUMNS = (
    "disease", "shots", "n", "trial", "seed", "train_ids", "train_labels", "test_ids", "test_labels",
)


class ShotsCappedWarning(UserWarning):
    """Fewer positives (or negatives) exist than the requested shot count."""


@dataclasses.dataclass
class DiseaseTask:
    """The positive and negative pools of one binary task, as image ids."""

    disease: str
    train_pos: list[str]
    train_neg: list[str]
    test_pos: list[str]
    test_neg: list[str]


@dataclasses.dataclass
class TaskPool:
    tasks: dict[str, DiseaseTask]
    patient_of: dict[str, str]  # image_id -> patient_id, for the disjointness check

    @property
    def diseases(self) -> list[str]:
        return list(self.tasks)

    def summary(self) -> pd.DataFrame:
        rows = [
            {
                "disease": t.disease,
                "train_pos": len(t.train_pos),
                "val_pos": len(t.test_pos),
                "train_neg": len(t.train_neg),
                "val_neg": len(t.test_neg),
            }
            for t in self.tasks.values()
        ]
        return pd.DataFrame(rows, columns=["disease", "train_pos", "val_pos", "train_neg", "val_neg"])


def _sorted_sample(ids: Sequence[str], cap: int | None, seed: int) -> list[str]:
    ids = sorted(ids)
    if cap is None or len(ids) <= cap:
        return ids
    rng = np.random.default_rng(seed)
    keep = rng.choice(len(ids), size=cap, replace=False)
    return [ids[i] for i in sorted(keep)]


def single_label_rows(index: pd.DataFrame, views: Iterable[str] | None = None,
                      no_finding: Iterable[str] = ()) -> pd.DataFrame:
    """Rows with exactly one label (and one of ``views`` when given), plus no-finding rows.

    Labels in ``no_finding`` and empty labels are dropped from each row first; a row left with
    one label gets it in column ``label``; a row left with none is a no-finding row (``label``
    is :data:`NO_FINDING_ROW`, column ``no_finding`` True) when it carried a no-finding word,
    or when it carried nothing at all and ``""`` is in ``no_finding``; other rows are dropped.
    """
    df = index
    if views is not None:
        views = set(views)
        df = df[df["view"].isin(views)]
    words = {str(x).strip() for x in no_finding}
    empty_is_no_finding = "" in words
    words.discard("")
    decided: dict[tuple[str, ...], str | None] = {}  # labels -> label, NO_FINDING_ROW or None (drop)
    for labels in map(tuple, df["labels"]):
        if labels in decided:
            continue
        stripped = [str(x).strip() for x in labels]
        found = list(dict.fromkeys(x for x in stripped if x and x not in words))
        if len(found) == 1:
            decided[labels] = found[0]
        elif found:
            decided[labels] = None  # multi-label
        elif any(x in words for x in stripped) or empty_is_no_finding:
            decided[labels] = NO_FINDING_ROW
        else:
            decided[labels] = None
    label = df["labels"].map(lambda v: decided[tuple(v)])
    keep = label.notna().to_numpy()
    df = df[keep].copy()
    df["label"] = label[keep].astype(str)
    df["no_finding"] = (df["label"] == NO_FINDING_ROW).to_numpy()
    return df


def build_task_pool(
    index: pd.DataFrame,
    *,
    views: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    diseases: Iterable[str] | None = None,
    min_train: int = 15,
    min_val: int = 6,
    force_include: Iterable[str] = (),
    max_train_neg: int | None = 5000,
    max_val_neg: int | None = 2000,
    eval_splits: Iterable[str] = ("val",),
    seed: int = 0,
    no_finding: Iterable[str] = DEFAULT_NO_FINDING,
) -> TaskPool:
    """Build the binary tasks of an index by the protocol in the module docstring.

    ``diseases`` restricts the tasks to the named labels (each must exist and pass the minimum
    counts, unless forced); otherwise every non-excluded label that passes becomes a task.
    ``no_finding`` lists the labels that mean "no finding" ("" for an image without a label).
    """
    _check_pool_numbers(min_train=min_train, min_val=min_val, max_train_neg=max_train_neg,
                        max_val_neg=max_val_neg, seed=seed)
    if isinstance(no_finding, str):
        no_finding = (no_finding,)
    no_finding = tuple(str(x).strip() for x in no_finding)
    eval_splits = tuple(eval_splits)
    exclude = {str(x).strip() for x in exclude}
    force = {str(x).strip() for x in force_include}
    rows = single_label_rows(index, views, no_finding)
    if not (~rows["no_finding"]).any():
        raise TaskError(
            "no single-label images" + (f" with view in {sorted(set(views))}" if views is not None else "")
            + " in the index: few-shot tasks need images with exactly one label"
            + (f" other than the no-finding labels {list(no_finding)}" if len(rows) else "")
        )
    train = rows[rows["split"] == "train"]
    evaluation = rows[rows["split"].isin(eval_splits)]
    n_train = train.loc[~train["no_finding"], "label"].value_counts()
    n_val = evaluation.loc[~evaluation["no_finding"], "label"].value_counts()
    vocabulary = sorted(set(rows.loc[~rows["no_finding"], "label"]))
    words = set(no_finding)
    for what, names in (("diseases", diseases or ()), ("force_include", force)):
        said = sorted({str(d).strip() for d in names} & words)
        if said:
            raise TaskError(
                f"{what} names {said[0]!r}, a no-finding label (no_finding = {list(no_finding)}): its "
                "images are negatives for every task, never a task; drop it from no_finding to make it one"
            )

    if diseases is not None:
        requested = [str(d).strip() for d in diseases]
        unknown = [d for d in requested if d not in vocabulary]
        if unknown:
            raise TaskError(
                f"disease {unknown[0]!r} has no single-label image in the index; "
                f"known labels: {', '.join(vocabulary[:40])}{' ...' if len(vocabulary) > 40 else ''}"
            )
        candidates = requested
    else:
        candidates = [d for d in vocabulary if d not in exclude]

    chosen: list[str] = []
    for disease in candidates:
        tr, va = int(n_train.get(disease, 0)), int(n_val.get(disease, 0))
        if disease in force:
            ok = tr >= 1 and va >= 1
        else:
            ok = tr >= min_train and va >= min_val
        if ok:
            chosen.append(disease)
        elif disease in force and diseases is None:
            warnings.warn(f"force_include names {disease!r}, but it has {tr} training and {va} evaluation "
                          "positives; a task needs at least one of each, so it is left out", stacklevel=2)
        elif diseases is not None:
            need = "1 and 1" if disease in force else f"{min_train} and {min_val}"
            raise TaskError(
                f"disease {disease!r} has {tr} training and {va} evaluation positives; "
                f"a task needs at least {need} (lower min_train/min_val or force-include it)"
            )
    for disease in sorted(force - set(candidates)):
        if disease not in vocabulary:
            raise TaskError(f"force_include names {disease!r}, which no single-label image carries")

    tasks: dict[str, DiseaseTask] = {}
    for k, disease in enumerate(sorted(chosen)):
        salt = int(hashlib.md5(disease.encode()).hexdigest()[:8], 16)
        tasks[disease] = DiseaseTask(
            disease=disease,
            train_pos=sorted(train.loc[train["label"] == disease, "image_id"]),
            train_neg=_sorted_sample(train.loc[train["label"] != disease, "image_id"], max_train_neg, seed + salt),
            test_pos=sorted(evaluation.loc[evaluation["label"] == disease, "image_id"]),
            test_neg=_sorted_sample(
                evaluation.loc[evaluation["label"] != disease, "image_id"], max_val_neg, seed + salt + 1
            ),
        )
    patient_of = dict(zip(rows["image_id"], rows["patient_id"]))
    return TaskPool(tasks=tasks, patient_of=patient_of)


def _check_pool_numbers(**values) -> None:
    for name, value in values.items():
        nullable = name.startswith("max_")
        if value is None and nullable:
            continue
        low = 0 if name == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            valid = f"an integer >= {low}" + (" or None (no cap)" if nullable else "")
            raise TaskError(f"task pool option {name} = {value!r} is not valid: use {valid}")


def sample_episodes(
    pool: TaskPool,
    shots: Sequence[int] = DEFAULT_SHOTS,
    trials: int = DEFAULT_TRIALS,
    seed_base: int = DEFAULT_SEED_BASE,
    strict: bool = False,
    diseases: Iterable[str] | None = None,
    test_negatives: str = "matched",
) -> pd.DataFrame:
    """Draw every (disease, shots, trial) episode; returns a frame with :data:`EPISODE_COLUMNS`.

    The test set holds every evaluation positive and, with ``test_negatives="matched"`` (the
    study's protocol), as many sampled evaluation negatives; with ``"all"``, every evaluation
    negative (more test images resolve smaller differences between backbones).

    With ``strict`` a shot count larger than a disease's pool raises :class:`TaskError`;
    otherwise n is capped at the pool size and a :class:`ShotsCappedWarning` names the disease.
    """
    if trials < 1:
        raise TaskError(f"trials = {trials} is not valid: use at least 1")
    if test_negatives not in ("matched", "all"):
        raise TaskError(f"test_negatives = {test_negatives!r} is not valid: use 'matched' or 'all'")
    bad = [s for s in shots if int(s) < 1]
    if bad:
        raise TaskError(f"shots = {list(shots)} contains {bad[0]}: every shot count must be >= 1")
    names = list(pool.tasks) if diseases is None else list(diseases)
    records = []
    for disease in names:
        if disease not in pool.tasks:
            raise TaskError(f"disease {disease!r} is not in the task pool: known {', '.join(pool.tasks)}")
        task = pool.tasks[disease]
        if not task.test_pos:
            raise TaskError(f"task {disease!r} has no evaluation positives: AUROC would be undefined")
        if not task.test_neg:
            raise TaskError(f"task {disease!r} has no evaluation negatives: AUROC would be undefined")
        if not task.train_pos or not task.train_neg:
            raise TaskError(f"task {disease!r} has no training positives or negatives")
        for n_req in shots:
            n_req = int(n_req)
            n = min(n_req, len(task.train_pos), len(task.train_neg))
            if n < n_req:
                message = (
                    f"disease {disease!r}: {n_req} shots requested but the training pool holds "
                    f"{len(task.train_pos)} positives and {len(task.train_neg)} negatives"
                )
                if strict:
                    raise TaskError(message + "; lower the shot count or drop --strict to cap it")
                warnings.warn(message + f"; using n = {n}", ShotsCappedWarning, stacklevel=2)
            n_test_neg = len(task.test_neg) if test_negatives == "all" else min(len(task.test_pos), len(task.test_neg))
            for t in range(trials):
                seed = seed_base + t
                rng = np.random.default_rng(seed)
                pos = [task.train_pos[i] for i in rng.choice(len(task.train_pos), n, replace=False)]
                neg = [task.train_neg[i] for i in rng.choice(len(task.train_neg), n, replace=False)]
                test_neg = [task.test_neg[i] for i in rng.choice(len(task.test_neg), n_test_neg, replace=False)]
                train_ids, test_ids = pos + neg, list(task.test_pos) + test_neg
                _check_disjoint(pool, disease, train_ids, test_ids)
                records.append({
                    "disease": disease, "shots": n_req, "n": n, "trial": t, "seed": seed,
                    "train_ids": train_ids, "train_labels": [1] * n + [0] * n,
                    "test_ids": test_ids, "test_labels": [1] * len(task.test_pos) + [0] * n_test_neg,
                })
    return pd.DataFrame.from_records(records, columns=list(EPISODE_COLUMNS))


def _check_disjoint(pool: TaskPool, disease: str, train_ids: list[str], test_ids: list[str]) -> None:
    train_p = {pool.patient_of[i] for i in train_ids}
    test_p = {pool.patient_of[i] for i in test_ids}
    shared = train_p & test_p
    if shared:
        raise TaskError(
            f"task {disease!r}: patient {sorted(shared)[0]!r} is in both training and test images; "
            "the index's splits must be patient-disjoint"
        )


def save_episodes(episodes: pd.DataFrame, path: str | Path) -> Path:
    from cxrtune.data.index import write_index  # atomic Parquet writer

    path = Path(path)
    # write_index validates nothing about columns; it only writes atomically with metadata.
    return write_index(episodes, path, metadata={"kind": "episodes", "n": len(episodes)})


def load_episodes(path: str | Path) -> pd.DataFrame:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise TaskError(f"episodes file {path} does not exist; create it with `cxrtune data tasks`")
    df = pq.read_table(path).to_pandas()
    missing = [c for c in EPISODE_COLUMNS if c not in df.columns]
    if missing:
        raise TaskError(f"episodes file {path} lacks column(s) {missing}")
    for col in ("train_ids", "test_ids"):
        df[col] = df[col].map(lambda v: [str(x) for x in v])
    for col in ("train_labels", "test_labels"):
        df[col] = df[col].map(lambda v: [int(x) for x in v])
    return df


def split_for_report(pool: TaskPool, salt: str = "cxrtune-report") -> tuple[TaskPool, TaskPool, list[str]]:
    """Split the evaluation images of ``pool`` by patient into a validation half and a report half.

    A sweep chooses its best checkpoint on episodes whose test images come from the first pool
    and reports the winner against random init on episodes whose test images come from the
    second, so the reported difference carries no selection. Every patient's evaluation images go
    to one half only (the halves are patient-disjoint). Patients are taken in the order of an MD5
    hash of their id (salted, so the order is fixed for an archive but unrelated to its ids) and
    each goes to the half that holds fewer evaluation positives of that patient's findings (fewer
    evaluation images when it has none): each finding's positives split about evenly, which a
    plain hash does not ensure when a finding has a handful of patients. The training pools are
    shared: the two sets of episodes draw their few-shot training images with different seeds.

    The cost: each half's test sets hold about half the positives, so a difference is estimated
    on half the images and its CI widens by about sqrt(2) (more for a finding with few patients).
    A finding whose evaluation positives or negatives cannot fill both halves (one patient) stays
    in the validation pool only and is returned in the third value.
    """
    def order(patient: str) -> str:
        return hashlib.md5(f"{salt}:{patient}".encode()).hexdigest()

    images_of: dict[str, list[tuple[str, str, bool]]] = {}  # patient -> (image, disease, positive)
    for task in pool.tasks.values():
        for image in task.test_pos:
            images_of.setdefault(pool.patient_of[image], []).append((image, task.disease, True))
        for image in task.test_neg:
            images_of.setdefault(pool.patient_of[image], []).append((image, task.disease, False))
    positives = [dict.fromkeys(pool.tasks, 0), dict.fromkeys(pool.tasks, 0)]
    sizes = [0, 0]
    half_of: dict[str, int] = {}
    for patient in sorted(images_of, key=order):
        findings = {d for _, d, positive in images_of[patient] if positive}
        if findings:
            load = [sum(positives[h][d] for d in findings) for h in (0, 1)]
        else:
            load = sizes
        half = 0 if load[0] < load[1] else 1 if load[1] < load[0] else int(order(patient)[-1], 16) % 2
        half_of[patient] = half
        sizes[half] += 1
        for d in findings:
            positives[half][d] += 1
    halves: list[dict[str, DiseaseTask]] = [{}, {}]
    kept_in_validation = []
    for name, task in pool.tasks.items():
        parts = [([i for i in task.test_pos if half_of[pool.patient_of[i]] == h],
                  [i for i in task.test_neg if half_of[pool.patient_of[i]] == h]) for h in (0, 1)]
        if all(pos and neg for pos, neg in parts):
            for h, (pos, neg) in enumerate(parts):
                halves[h][name] = DiseaseTask(name, list(task.train_pos), list(task.train_neg), pos, neg)
        else:
            halves[0][name] = task
            kept_in_validation.append(name)
    return TaskPool(halves[0], pool.patient_of), TaskPool(halves[1], pool.patient_of), kept_in_validation
