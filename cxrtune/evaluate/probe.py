"""The study's linear probe on frozen features, every episode of a few-shot grid at once.

Semantics are scikit-learn's ``LogisticRegressionCV`` (the study's probe): L2-penalised logistic
regression, ``loss = 0.5 * ||w||^2 + C * sum(log-loss)`` with an unpenalised intercept, on
L2-normalised features; ``C`` chosen from ``Cs`` by stratified ``min(cv_folds, n)``-fold
cross-validation inside the training set (``StratifiedKFold`` without shuffling), scored by
accuracy, ties broken towards the first C in ``Cs``, then refit on the whole training set;
``C = one_shot_C`` at one shot, where no fold split exists. Every problem is solved to
optimality, where scikit-learn's lbfgs stops at ``tol = 1e-4``: docs/performance.md ("Batched
linear probes: how the solver is fast") compares the two and explains the speed.

The solver is :mod:`cxrtune.evaluate.logistic`, one training size's cross-validation and scoring
:mod:`cxrtune.evaluate.probe_cv`, the CPU workers :mod:`cxrtune.evaluate.workers`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from cxrtune.config import Config, param
from cxrtune.device import resolve_device
from cxrtune.errors import ConfigError, DataError
from cxrtune.evaluate import probe_cv
from cxrtune.evaluate.episodes import episode_arrays
from cxrtune.evaluate.probe_cv import GATHER_BLOCK_ELEMENTS, SCORES
from cxrtune.evaluate.workers import run_workers, solver_threads

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0)


@dataclasses.dataclass
class ProbeConfig(Config):
    """The linear probe: the study's settings are the defaults."""

    Cs: tuple[float, ...] = param(DEFAULT_CS, low=0, low_open=True,
                                  doc="inverse L2 strengths tried by cross-validation, in tie-break order")
    cv_folds: int = param(5, low=2, doc="folds = min(cv_folds, n) stratified folds inside the training set")
    one_shot_C: float = param(1.0, low=0, low_open=True, doc="C at one shot, where no fold split exists")
    max_iter: int = param(50, low=1, high=10_000, doc="Newton iterations per problem at most")
    tol: float = param(1e-10, low=0, low_open=True, doc="stop when half the squared Newton decrement is below")
    reuse: float = param(0.25, low=0, high=0.9, doc="keep a Newton factorisation while curvatures stay within 1 +- reuse of it")
    chunk: int = param(2 ** 19, low=1, doc="Gram entries solved per batch (problems x N^2); 4 MB keeps a batch's "
                       "matrices in cache (81 problems of 80 samples; measured fastest)")
    device: str = param("cpu", doc="torch device for the solver: cpu, cuda, cuda:1 or auto")
    workers: int | None = param(None, low=1, doc="CPU workers (processes or threads, see parallel) that take "
                                "pieces of the episodes from one queue, torch itself held to one thread "
                                "meanwhile; None = min(2, torch.get_num_threads()); a GPU runs the grid as one stream")
    parallel: str = param("auto", choices=("auto", "processes", "threads"),
                          doc="how workers share the CPU: processes (forked children that inherit the features; "
                          "Linux only), threads (the Python between ops holds the GIL: slower), or auto = "
                          "processes on Linux when the calling process runs no other Python thread, else threads")

    def validate(self) -> None:
        if not self.Cs:
            raise ConfigError("ProbeConfig.Cs = () is empty: give at least one C, e.g. [0.01, 0.1, 1, 10, 100]")


def normalize_features(features: np.ndarray | torch.Tensor, what: str = "features") -> torch.Tensor:
    """L2-normalised float64 rows; NaN/inf or all-zero rows are refused by name."""
    x = _as_matrix(features, what).to(torch.float64)
    return x / _row_norms(x, what)[:, None]


def _as_matrix(features: np.ndarray | torch.Tensor, what: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    if x.ndim != 2:
        raise DataError(f"{what}: expected a (rows, dim) matrix, got shape {tuple(x.shape)}")
    return x


def _row_norms(x: torch.Tensor, what: str, rows: torch.Tensor | None = None) -> torch.Tensor:
    """float64 L2 norms of the rows of ``x`` (or of the rows numbered ``rows``), after refusing
    NaN/inf and all-zero rows by name.

    Computed a block of rows at a time: a float64 copy of the whole matrix would cost more than
    the arithmetic.
    """
    n = x.shape[0] if rows is None else len(rows)
    norms = torch.empty(n, dtype=torch.float64, device=x.device)
    step = max(1, GATHER_BLOCK_ELEMENTS // max(1, x.shape[1]))
    # one float64 block reused: a fresh block each time costs its page faults, more than the arithmetic
    block = torch.empty(min(step, n), x.shape[1], dtype=torch.float64, device=x.device)
    for start in range(0, n, step):
        part = x[start: start + step] if rows is None else x.index_select(0, rows[start: start + step])
        torch.linalg.vector_norm(block[: len(part)].copy_(part), dim=1, out=norms[start: start + len(part)])

    def numbers(positions: torch.Tensor) -> list[int]:  # row numbers of x
        positions = positions.flatten()[:5]
        return (positions if rows is None else rows[positions]).tolist()

    finite = torch.isfinite(norms)  # a NaN or inf entry makes its row's norm NaN or inf: one check per row
    if not bool(finite.all()):
        overflow = numbers(torch.nonzero(~finite))
        finite = torch.isfinite(x if rows is None else x.index_select(0, rows)).all(1)
        if bool(finite.all()):
            raise DataError(f"{what}: feature rows {overflow} have norms beyond the float64 range; "
                            "rescale the features (their scale does not matter to the probe)")
        raise DataError(
            f"{what}: {int((~finite).sum())} of {n} feature rows contain NaN or inf "
            f"(rows {numbers(torch.nonzero(~finite))}...); the backbone's output is not usable "
            "(diverged weights or a corrupt checkpoint?)"
        )
    if bool((norms == 0).any()):
        raise DataError(f"{what}: feature rows {numbers(torch.nonzero(norms == 0))} are all zero; "
                        "L2 normalisation is undefined (collapsed backbone?)")
    return norms


def fit_probes(features: np.ndarray | torch.Tensor, episodes: pd.DataFrame, row_of_id: Mapping[str, int],
               config: ProbeConfig | None = None) -> pd.DataFrame:
    """Fit and score the probe of every episode.

    ``features`` (rows, dim) are raw backbone features; ``row_of_id`` maps each image id of the
    episodes to its row. Returns one row per episode (in the episodes' order) with ``disease,
    shots, n, trial, C, auroc, accuracy, f1``.
    """
    config = config or ProbeConfig()
    device = resolve_device(config.device)
    # Rows stay in their own precision (float32 from a backbone) until gathered for the inner
    # products, which are float64 and divided by the norms: half the memory traffic of a
    # normalised float64 copy, the same numbers to rounding.
    x = _as_matrix(features, "features")
    x = x.to(device, torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()
    workers = 1 if device.type != "cpu" else config.workers or min(2, torch.get_num_threads())
    by_size: dict[int, list[int]] = {}
    for e, size in enumerate(map(len, episodes["train_ids"].tolist())):
        by_size.setdefault(size, []).append(e)
    # Each training size splits into `workers` pieces, queued largest sizes first: a worker slowed
    # by the machine takes fewer of the later (smaller) pieces. An episode's arithmetic is the same
    # in any piece, so the results equal one worker's.
    pieces = [piece for _, members in sorted(by_size.items(), reverse=True)
              for piece in np.array_split(np.asarray(members), min(workers, len(members)))]

    def work(queue: Iterable[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        # each worker looks up and checks its pieces' rows and labels, and computes the norms of
        # the rows they use, once each (only those are checked for NaN, inf or zero)
        inv_norm = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
        known = torch.zeros(x.shape[0], dtype=torch.bool, device=device)
        out = []
        for p in queue:
            arrays = episode_arrays(episodes.iloc[pieces[p]], row_of_id)
            used = torch.as_tensor(np.unique(np.concatenate([np.concatenate([a[0], a[2]]) for a in arrays])),
                                   device=device)
            new = used[~known[used]]
            if len(new):
                inv_norm[new] = 1.0 / _row_norms(x, "features", new)
                known[new] = True
            out.append((pieces[p], probe_cv.fit_episode_group(x, inv_norm, arrays, config, device)))
        return out

    # inference mode: no autograd bookkeeping on the solver's thousands of small ops
    with solver_threads(device), torch.inference_mode():
        solved = run_workers(work, len(pieces), min(workers, len(pieces)), config.parallel)
    scores = np.empty((len(episodes), len(SCORES)))
    for share, values in solved:
        scores[share] = values
    frame = episodes[["disease", "shots", "n", "trial"]].reset_index(drop=True)
    for j, key in enumerate(SCORES):
        frame[key] = scores[:, j]
    return frame
