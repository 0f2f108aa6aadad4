"""One training size's probes at once: inner products, cross-validated C, refit and scores.

Implements scikit-learn's ``LogisticRegressionCV`` choice of C for every episode of a group
(stratified folds without shuffling, summed fold accuracies, ties to the first C), batched over
episodes, folds and the C path. Only inner products of feature rows are needed, so each
episode's rows are touched once. docs/performance.md explains what makes it fast.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from cxrtune.evaluate import logistic
from cxrtune.evaluate.episodes import EpisodeArrays
from cxrtune.evaluate.metrics import batched_accuracy, batched_auroc, batched_f1

if TYPE_CHECKING:
    from cxrtune.evaluate.probe import ProbeConfig

GATHER_BLOCK_ELEMENTS = 2 ** 18  # feature values gathered at once (2 MB in float64: stays in cache)
SCORES = ("C", "auroc", "accuracy", "f1")  # what fit_episode_group returns per episode, in this order


def fit_episode_group(x: torch.Tensor, inv_norm: torch.Tensor, group: Sequence[EpisodeArrays],
                      config: ProbeConfig, device: torch.device) -> np.ndarray:
    """All episodes with the same training size: CV problems, C choice, refit, scoring; one row of
    ``SCORES`` per episode."""
    episodes = _EpisodeTensors.of(group, device)
    gram, cross = _inner_products(x, inv_norm, episodes.train_idx, episodes.test_idx)
    chosen_C = torch.full((len(group),), float(config.one_shot_C), dtype=torch.float64, device=device)
    folds = _FoldLayout.of(group, config.cv_folds, device)
    if folds is not None:
        chosen_C = _choose_C(gram, episodes.y_train, folds, config, chosen_C)
    zeros = torch.zeros(len(group), gram.shape[1], dtype=torch.float64, device=device)
    alpha, bias = logistic.kernel_newton_chunked(gram, episodes.y_train.to(torch.float64) * 2 - 1,
                                                 torch.ones_like(zeros), chosen_C, zeros, zeros[:, 0],
                                                 **_solver_settings(config))
    decision = logistic.batched_matmul(cross, alpha[:, :, None]).squeeze(-1) + bias[:, None]
    y_test, test_mask = episodes.y_test, episodes.test_mask
    auc = batched_auroc(decision, y_test, test_mask)
    acc = batched_accuracy(decision > 0, y_test, test_mask)
    f1 = batched_f1(decision > 0, y_test, test_mask)
    return torch.stack([t.to(torch.float64) for t in (chosen_C, auc, acc, f1)], 1).cpu().numpy()


def _solver_settings(config: ProbeConfig) -> dict:
    return {"chunk": config.chunk, "max_iter": config.max_iter, "tol": config.tol, "reuse": config.reuse}


@dataclasses.dataclass
class _EpisodeTensors:
    """A group's row indices and labels; test sets padded to the longest (padding points at row 0
    and is masked out of the metrics)."""

    train_idx: torch.Tensor  # (G, T)
    y_train: torch.Tensor  # (G, T)
    test_idx: torch.Tensor  # (G, M)
    y_test: torch.Tensor  # (G, M)
    test_mask: torch.Tensor  # (G, M)

    @classmethod
    def of(cls, group: Sequence[EpisodeArrays], device: torch.device) -> _EpisodeTensors:
        G, M = len(group), max(len(g[2]) for g in group)
        test_idx = torch.zeros(G, M, dtype=torch.long, device=device)
        y_test = torch.zeros(G, M, dtype=torch.long, device=device)
        test_mask = torch.zeros(G, M, dtype=torch.bool, device=device)
        for e, g in enumerate(group):
            test_idx[e, : len(g[2])] = torch.as_tensor(g[2])
            y_test[e, : len(g[3])] = torch.as_tensor(g[3])
            test_mask[e, : len(g[2])] = True
        return cls(torch.as_tensor(np.stack([g[0] for g in group]), device=device),
                   torch.as_tensor(np.stack([g[1] for g in group]), device=device), test_idx, y_test, test_mask)


def _inner_products(x: torch.Tensor, inv_norm: torch.Tensor, train_idx: torch.Tensor,
                    test_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines of training rows with each other, (G, T, T), and of test rows with training rows,
    (G, M, T), in float64.

    Rows are gathered an episode or a few at a time, in their own precision, so that the block
    is still in cache for the product: one gather of every episode's rows would write hundreds of
    MB of fresh memory and cost more than the products.
    """
    G, T = train_idx.shape
    M = test_idx.shape[1]
    rows = torch.cat([train_idx, test_idx], 1)
    gemm_dtype = x.dtype  # products in the features' precision (float64 measured no more accurate here)
    products = torch.empty(G, T + M, T, dtype=gemm_dtype, device=x.device)
    per_block = max(1, GATHER_BLOCK_ELEMENTS // ((T + M) * x.shape[1]))
    for start in range(0, G, per_block):
        chunk = rows[start: start + per_block]
        block = torch.index_select(x, 0, chunk.flatten()).view(len(chunk), T + M, -1).to(gemm_dtype)
        torch.bmm(block, block[:, :T].transpose(1, 2), out=products[start: start + per_block])
    products = products.to(torch.float64)
    products *= inv_norm[rows][:, :, None] * inv_norm[train_idx][:, None, :]
    return products[:, :T].contiguous(), products[:, T:]


@dataclasses.dataclass
class _FoldLayout:
    """Every (episode, fold) cross-validation problem of a group, padded to the largest fold.

    Folds are ordered (label vector, fold, episode): the folds that take the same rows of their
    episodes' G are consecutive (``same_rows``), so their blocks are copied as one slice.
    """

    fold_episode: torch.Tensor  # (Q,) the episode of each fold
    fit_idx: torch.Tensor  # (Q, A) training positions of the rows each fold fits on
    fit_valid: torch.Tensor
    held_idx: torch.Tensor  # (Q, B) positions of its held-out rows
    held_valid: torch.Tensor
    same_rows: list[tuple[int, list[int], tuple[np.ndarray, np.ndarray]]]  # (first fold, episodes, split)

    @classmethod
    def of(cls, group: Sequence[EpisodeArrays], cv_folds: int, device: torch.device) -> _FoldLayout | None:
        """None where no episode has a fold split (one shot)."""
        T = len(group[0][0])
        # Episodes sampled by cxrtune.data.tasks share one label vector per training size, hence
        # one fold split: splits are computed once per distinct label vector and reused.
        splits: dict[tuple, list] = {}
        episodes_of: dict[tuple, list[int]] = {}
        for e, g in enumerate(group):
            key = tuple(g[1].tolist())
            if key not in splits:
                n_min = int(min((g[1] == 1).sum(), (g[1] == 0).sum()))
                k = min(cv_folds, n_min)
                splits[key] = list(StratifiedKFold(n_splits=k).split(np.zeros(T), g[1])) if k >= 2 else []
            episodes_of.setdefault(key, []).append(e)
        fold_episode, fold_rows, same_rows = [], [], []
        for key, members in episodes_of.items():
            for fold in splits[key]:
                same_rows.append((len(fold_rows), members, fold))
                fold_episode += members
                fold_rows += [fold] * len(members)
        if not fold_rows:
            return None
        fit_idx, fit_valid = _padded([fit for fit, _ in fold_rows], device)
        held_idx, held_valid = _padded([held for _, held in fold_rows], device)
        return cls(torch.as_tensor(fold_episode, device=device), fit_idx, fit_valid, held_idx, held_valid, same_rows)


def _padded(index_lists: Sequence[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index lists as one zero-padded (Q, longest) array, and the mask of their real entries."""
    index = np.zeros((len(index_lists), max(map(len, index_lists))), np.int64)
    valid = np.zeros(index.shape, bool)
    for q, values in enumerate(index_lists):
        index[q, : len(values)], valid[q, : len(values)] = values, True
    return torch.as_tensor(index, device=device), torch.as_tensor(valid, device=device)


def _fold_blocks(gram: torch.Tensor, folds: _FoldLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Each fold's blocks of its episode's G: fitted rows with each other (Q, A, A), held-out rows
    with fitted rows (Q, B, A); only the padding is zeroed (most folds have none)."""
    Q, A = folds.fit_idx.shape
    B = folds.held_idx.shape[1]
    fit_gram = torch.empty(Q, A, A, dtype=torch.float64, device=gram.device)
    held_cross = torch.empty(Q, B, A, dtype=torch.float64, device=gram.device)
    for first, members, (fit, held) in folds.same_rows:
        source = (gram if len(members) == len(gram)
                  else gram.index_select(0, torch.as_tensor(members, device=gram.device)))
        at = slice(first, first + len(members))
        _copy_block(fit_gram[at], source, fit, fit)
        _copy_block(held_cross[at], source, held, fit)
        fit_gram[at, len(fit):], fit_gram[at, :, len(fit):] = 0.0, 0.0
        held_cross[at, len(held):], held_cross[at, :, len(fit):] = 0.0, 0.0
    return fit_gram, held_cross


def _choose_C(gram: torch.Tensor, y_train: torch.Tensor, folds: _FoldLayout, config: ProbeConfig,
              chosen_C: torch.Tensor) -> torch.Tensor:
    """The C of each episode with folds (the others keep ``chosen_C``): the first C of the
    highest sum of fold accuracies, as ``LogisticRegressionCV`` chooses it.

    The C path runs in tie-break order: each C starts from the previous C's solution, and an
    episode whose folds are all classified without error at some C is decided there (no later C
    can beat a perfect sum, and ties go to the earlier C), so its folds leave the path.
    """
    G, device = len(gram), gram.device
    fit_gram, held_cross = _fold_blocks(gram, folds)
    fold_episode = folds.fold_episode
    Q, A = folds.fit_idx.shape
    fit_signs = y_train[fold_episode[:, None], folds.fit_idx].to(torch.float64) * 2 - 1
    fit_weights = folds.fit_valid.to(torch.float64)
    held_labels = y_train[fold_episode[:, None], folds.held_idx]
    folds_of = torch.zeros(G, dtype=torch.float64, device=device).index_add_(
        0, fold_episode, torch.ones(Q, dtype=torch.float64, device=device))
    Cs = torch.tensor(config.Cs, dtype=torch.float64, device=device)
    totals = torch.full((G, len(config.Cs)), -1.0, dtype=torch.float64, device=device)
    # the path's latest solution of each fold: alpha, intercept and G alpha
    current = (torch.zeros(Q, A, dtype=torch.float64, device=device),
               torch.zeros(Q, dtype=torch.float64, device=device),
               torch.zeros(Q, A, dtype=torch.float64, device=device))
    previous = older = None
    pending = torch.arange(Q, device=device)
    for k in range(len(config.Cs)):
        if k:
            undecided = (torch.round(totals[:, :k] * 1e9).amax(1) < torch.round(folds_of * 1e9))
            pending = pending[undecided[fold_episode[pending]]]
            if not len(pending):
                break

        def take(t: torch.Tensor, pending=pending) -> torch.Tensor:  # gathering every fold's Gram would copy it
            return t if len(pending) == Q else t[pending]

        start_a, start_b, start_u = _path_start(config.Cs, k, take, current, previous, older)
        if k:
            older = previous
        previous = tuple(t.clone() for t in current)
        a, b = logistic.kernel_newton_chunked(take(fit_gram), take(fit_signs), take(fit_weights),
                                              Cs[k].expand(len(pending)), start_a, start_b,
                                              products=start_u, **_solver_settings(config))
        current[0][pending], current[1][pending], current[2][pending] = a, b, start_u
        decision = logistic.batched_matmul(take(held_cross), a.unsqueeze(-1)).squeeze(-1) + b[:, None]
        fold_accuracy = batched_accuracy(decision > 0, take(held_labels), take(folds.held_valid))
        # sum of fold accuracies per (episode, C), as LogisticRegressionCV sums its fold scores
        totals[:, k] = 0.0
        totals[:, k].index_add_(0, fold_episode[pending], fold_accuracy)
    # argmax takes the first maximum; rounding keeps float summation order from breaking a tie
    best = torch.round(totals * 1e9).argmax(1)
    has_cv = torch.zeros(G, dtype=torch.bool, device=device)
    has_cv[fold_episode] = True
    return torch.where(has_cv, Cs[best], chosen_C)


Solution = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (alpha, intercept, G alpha) of every fold


def _path_start(Cs: Sequence[float], k: int, take: Callable[[torch.Tensor], torch.Tensor], current: Solution,
                previous: Solution | None, older: Solution | None) -> Solution:
    """The pending folds' start for the k-th C, from the path's last three solutions (``current``
    the (k-1)-th C's, ``previous`` and ``older`` the two before); ``G alpha`` is a fresh tensor,
    which the solver overwrites with that of its solution."""
    alpha, bias, products = take(current[0]), take(current[1]), take(current[2]).clone()
    reach = _path_extrapolation(Cs, k)
    if reach == 1.0 and _path_extrapolation(Cs, k - 1) == 1.0:
        # three equal steps in log C: the quadratic through the last three solutions
        alpha = 3 * alpha - 3 * take(previous[0]) + take(older[0])
        bias = 3 * bias - 3 * take(previous[1]) + take(older[1])
        products = 3 * products - 3 * take(previous[2]) + take(older[2])
    elif reach:  # continue the path's last move, scaled to this step's length in log C (G alpha too)
        alpha = alpha + reach * (alpha - take(previous[0]))
        bias = bias + reach * (bias - take(previous[1]))
        products += reach * (products - take(previous[2]))
    return alpha, bias, products


def _path_extrapolation(Cs: Sequence[float], k: int) -> float:
    """How far the k-th C's start continues the path's last move: the ratio of the steps in log C.

    On separable training sets (any fold of fewer rows than dimensions) the solution grows about
    linearly in log C, so one step on from the last two solutions lands near the next; from there
    the largest Cs need one factorisation fewer. Only for increasing Cs, and at most twice the
    last move. Newton converges to the same optimum from any start, so this only saves work.
    """
    if k < 2 or not Cs[k] > Cs[k - 1] > Cs[k - 2]:
        return 0.0
    return min(2.0, float(np.log(Cs[k] / Cs[k - 1]) / np.log(Cs[k - 1] / Cs[k - 2])))


def _copy_block(out: torch.Tensor, source: torch.Tensor, rows: np.ndarray, columns: np.ndarray) -> None:
    """``out[:, :len(rows), :len(columns)] = source[:, rows][:, :, columns]``, by runs of consecutive indices.

    A stratified fold of sorted labels is a few runs of consecutive rows, so the block is a few
    slice copies; gathering single elements along the last dimension costs several times more.
    """
    row_runs, column_runs = _runs(rows), _runs(columns)
    if len(row_runs) * len(column_runs) > 16:
        index = torch.as_tensor(columns, device=source.device)
        out[:, : len(rows), : len(columns)] = source.index_select(1, torch.as_tensor(rows, device=source.device)
                                                                  ).index_select(2, index)
        return
    for r, (r0, r1) in row_runs:
        for c, (c0, c1) in column_runs:
            out[:, r: r + r1 - r0, c: c + c1 - c0] = source[:, r0:r1, c0:c1]


def _runs(index: np.ndarray) -> list[tuple[int, tuple[int, int]]]:
    """Maximal runs of consecutive values in ``index``: (position in index, (first value, stop))."""
    index = np.asarray(index)
    starts = np.r_[0, np.flatnonzero(np.diff(index) != 1) + 1]
    stops = np.r_[starts[1:], len(index)]
    return [(int(a), (int(index[a]), int(index[b - 1]) + 1)) for a, b in zip(starts, stops)]
