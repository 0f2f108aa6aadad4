"""Every linear probe of a few-shot grid, solved together as one batched optimisation.

Semantics are scikit-learn's ``LogisticRegressionCV`` (the study's probe): L2-penalised logistic
regression, ``loss = 0.5 * ||w||^2 + C * sum(log-loss)`` with an unpenalised intercept, on
L2-normalised features; ``C`` chosen from ``Cs`` by stratified ``min(cv_folds, n)``-fold
cross-validation inside the training set (``StratifiedKFold`` without shuffling, as
``LogisticRegressionCV(cv=int)`` builds it), scored by accuracy (its default scoring, which the
study kept), ties between ``C`` values broken towards the first in ``Cs`` (``argmax`` of the summed
fold accuracies), then refit on the whole training set; ``C = one_shot_C`` at one shot, where no
fold split exists.

Where it differs from the study's scikit-learn run: every problem here is solved to optimality
(Newton, float64), while scikit-learn's lbfgs stops at ``tol = 1e-4``. At ``C = 0.01`` that early
stop leaves the weights near zero, fold accuracies at chance, and so scikit-learn picks another C
than the exact optimum would in about 20-45 % of episodes. The AUROC hardly moves (for small C the
direction of ``w`` barely depends on C): mean |AUROC difference| 0.0003 over the study's 500-probe
grid (``bench/probe_batched.py``). Against scikit-learn run to convergence the chosen C and the
AUROC are identical (``tests/test_eval_probe.py``).

Why it is fast:

* **Span coordinates.** The optimal ``w`` lies in the span of the training rows, so each problem
  is rewritten exactly in that span from inner products alone: with the Cholesky factor
  ``X X^T = L L^T`` the rows of ``L`` have the inner products of the rows of ``X``. A 2048-d
  problem with ``2n`` samples becomes a ``2n``-d one; each cross-validation fold gets the span of
  its own rows from the episode's Gram matrix, so the 2048-d features are touched once per episode.
* **Batched Newton in sample space.** All (episode x fold x C) problems of one training size are
  stacked, padded with zero-weight samples, and solved by Newton's method, the system solved
  through the Woodbury identity (one N x N Cholesky per iteration, no r x r Hessian) with the
  unpenalised intercept eliminated by its Schur complement, and a batched backtracking line search;
  float64 throughout, until the Newton decrement vanishes; converged problems leave the batch.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold

from cxrtune.config import Config, param
from cxrtune.errors import ConfigError, DataError, TaskError
from cxrtune.evaluate.metrics import batched_accuracy, batched_auroc, batched_f1

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0)
_LINE_SEARCH_STEPS = torch.tensor([0.5 ** k for k in range(12)], dtype=torch.float64)


@dataclasses.dataclass
class ProbeConfig(Config):
    """The linear probe: the study's settings are the defaults."""

    Cs: tuple[float, ...] = param(DEFAULT_CS, low=0, low_open=True,
                                  doc="inverse L2 strengths tried by cross-validation, in tie-break order")
    cv_folds: int = param(5, low=2, doc="folds = min(cv_folds, n) stratified folds inside the training set")
    one_shot_C: float = param(1.0, low=0, low_open=True, doc="C at one shot, where no fold split exists")
    max_iter: int = param(50, low=1, high=10_000, doc="Newton iterations per problem at most")
    tol: float = param(1e-10, low=0, low_open=True, doc="stop when half the squared Newton decrement is below")
    chunk: int = param(512, low=1, doc="problems solved per batch (bounds memory)")
    device: str = param("cpu", doc="torch device for the solver: cpu, cuda, cuda:1 or auto")

    def validate(self) -> None:
        if not self.Cs:
            raise ConfigError("ProbeConfig.Cs = () is empty: give at least one C, e.g. [0.01, 0.1, 1, 10, 100]")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# -------------------------------------------------------------------------------------------
# Batched L2 logistic regression
# -------------------------------------------------------------------------------------------


def solve_logistic(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, C: torch.Tensor,
                   max_iter: int = 50, tol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve P L2-penalised logistic regressions at once by Newton's method.

    ``features`` (P, N, r), ``labels`` (P, N) in {0, 1}, ``weights`` (P, N) sample weights (0 for
    padding), ``C`` (P,). Minimises ``0.5 ||w||^2 + C sum_i weights_i log(1 + exp(-s_i (x_i.w + b)))``
    with ``s_i = 2 y_i - 1`` and an unpenalised intercept ``b``. Returns ``theta`` (P, r+1) =
    (w, b) and the Newton iterations each problem used (P,).

    The Newton system is solved in sample space: with ``D`` the weighted curvatures and
    ``S = D^{1/2}``, ``(I + F^T D F)^{-1} = I - F^T S (I + S F F^T S)^{-1} S F`` (Woodbury), so an
    iteration costs one N x N Cholesky on ``F F^T`` (computed once) scaled by ``S``, instead of
    forming an r x r Hessian; the intercept is eliminated by its Schur complement.
    """
    P, N, r = features.shape
    dtype, device = features.dtype, features.device
    signs = labels.to(dtype) * 2 - 1
    weights = weights.to(dtype)
    C = C.to(dtype)
    gram = torch.bmm(features, features.transpose(1, 2))
    theta = torch.zeros(P, r + 1, dtype=dtype, device=device)
    iterations = torch.zeros(P, dtype=torch.long, device=device)
    steps = _LINE_SEARCH_STEPS.to(device=device, dtype=dtype)
    k = steps.numel()
    # The working set shrinks as problems converge; it is compacted when a third has converged.
    active = torch.arange(P, device=device)
    F, G, s, m, c = features, gram, signs, weights, C
    w = torch.zeros(P, r, dtype=dtype, device=device)
    b = torch.zeros(P, dtype=dtype, device=device)
    for _ in range(max_iter):
        margins = s * (torch.bmm(F, w.unsqueeze(-1)).squeeze(-1) + b[:, None])
        sig = torch.sigmoid(-margins)  # 1 - p(correct class)
        residual = c[:, None] * m * s * sig
        grad_w = w - torch.bmm(residual.unsqueeze(1), F).squeeze(1)
        grad_b = -residual.sum(1)
        curvature = c[:, None] * m * sig * (1 - sig)
        root = curvature.sqrt()
        inner = G * root[:, None, :]
        inner *= root[:, :, None]
        inner.diagonal(dim1=1, dim2=2).add_(1.0)  # I + S G S
        chol, info = torch.linalg.cholesky_ex(inner)
        if bool((info != 0).any()):
            chol, _ = torch.linalg.cholesky_ex(inner + 1e-8 * torch.eye(N, dtype=dtype, device=device))
        coupling = torch.bmm(curvature.unsqueeze(1), F).squeeze(1)  # F^T D 1
        rhs = torch.stack([grad_w, coupling], dim=2)  # (P, r, 2): apply A^{-1} to both at once
        projected = root.unsqueeze(-1) * torch.bmm(F, rhs)
        # two triangular solves: torch's batched cholesky_solve is pathologically slow with >1 RHS on CPU
        half = torch.linalg.solve_triangular(chol, projected, upper=False)
        inverse = torch.linalg.solve_triangular(chol.transpose(1, 2), half, upper=True)
        solved = rhs - torch.bmm(F.transpose(1, 2), root.unsqueeze(-1) * inverse)
        a_grad, a_coupling = solved[..., 0], solved[..., 1]
        schur = (curvature.sum(1) - (coupling * a_coupling).sum(1)).clamp(min=1e-300)
        db = (-grad_b + (coupling * a_grad).sum(1)) / schur
        dw = -a_grad - a_coupling * db[:, None]
        decrement = -((grad_w * dw).sum(1) + grad_b * db)  # Newton decrement squared
        done = (decrement / 2 <= tol) | (decrement <= 0)
        # Backtracking (Armijo) over a fixed ladder of steps, all problems and steps at once:
        # margins are affine in the step, so each trial loss costs O(N).
        along = s * (torch.bmm(F, dw.unsqueeze(-1)).squeeze(-1) + db[:, None])
        f0 = 0.5 * (w * w).sum(1) + c * (m * torch.nn.functional.softplus(-margins)).sum(1)
        t = steps[None, :, None]
        trial_margins = margins[:, None, :] + t * along[:, None, :]  # (P, S, N)
        ww, wd, dd = (w * w).sum(1), (w * dw).sum(1), (dw * dw).sum(1)
        trial_w2 = ww[:, None] + 2 * steps[None, :] * wd[:, None] + steps[None, :] ** 2 * dd[:, None]
        f_trial = 0.5 * trial_w2 + c[:, None] * (m[:, None, :] * torch.nn.functional.softplus(-trial_margins)).sum(2)
        ok = f_trial <= f0[:, None] - 1e-4 * steps[None, :] * decrement[:, None]
        first_ok = torch.where(ok.any(1), ok.to(torch.int8).argmax(1),
                               torch.full_like(decrement, k - 1, dtype=torch.long))
        step = torch.where(done, torch.zeros_like(decrement), steps[first_ok])
        w = w + step[:, None] * dw
        b = b + step * db
        iterations[active] += (~done).long()
        if bool(done.all()):
            break
        if int(done.sum()) * 3 >= len(active):  # a third converged: compact the working set
            theta[active] = torch.cat([w, b[:, None]], dim=1)
            keep = ~done
            active = active[keep]
            F, G, s, m, c, w, b = F[keep], G[keep], s[keep], m[keep], c[keep], w[keep], b[keep]
    theta[active] = torch.cat([w, b[:, None]], dim=1)
    return theta, iterations


# -------------------------------------------------------------------------------------------
# Episodes -> problems
# -------------------------------------------------------------------------------------------


def span_coordinates(gram: torch.Tensor, cross: torch.Tensor, jitter: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of training rows in their own span, from inner products only.

    ``gram`` (Q, A, A) holds the inner products of each problem's training rows (zero rows and
    columns for padding), ``cross`` (Q, B, A) those of other rows with them. With the Cholesky
    factor ``gram + jitter * I = L L^T``, the rows of ``L`` reproduce the training inner products
    and ``cross L^{-T}`` are the other rows' coordinates in the same basis. The jitter (relative
    to the mean squared norm) only makes padded or duplicate rows factorisable; it perturbs inner
    products by ~1e-10, far below the solver tolerance. (A batched Cholesky is ~100x faster than
    the batched eigendecomposition that would avoid the jitter.)
    """
    A = gram.shape[-1]
    scale = torch.diagonal(gram, dim1=1, dim2=2).mean(1).clamp(min=1e-300)
    eye = torch.eye(A, dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram + (jitter * scale)[:, None, None] * eye)
    if bool((info != 0).any()):  # numerically indefinite: a larger jitter for those problems
        bad = info != 0
        chol[bad], _ = torch.linalg.cholesky_ex(gram[bad] + (1e-7 * scale[bad])[:, None, None] * eye)
    other = torch.linalg.solve_triangular(chol, cross.transpose(1, 2), upper=False).transpose(1, 2)
    return chol, other


def normalize_features(features: np.ndarray | torch.Tensor, what: str = "features") -> torch.Tensor:
    """L2-normalised float64 rows; NaN/inf or all-zero rows are refused by name."""
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    x = x.to(torch.float64)
    if x.ndim != 2:
        raise DataError(f"{what}: expected a (rows, dim) matrix, got shape {tuple(x.shape)}")
    finite = torch.isfinite(x).all(1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()[:5].tolist()
        raise DataError(
            f"{what}: {int((~finite).sum())} of {x.shape[0]} feature rows contain NaN or inf "
            f"(rows {bad}...); the backbone's output is not usable (diverged weights or a corrupt checkpoint?)"
        )
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        bad = torch.nonzero(norms.flatten() == 0).flatten()[:5].tolist()
        raise DataError(f"{what}: feature rows {bad} are all zero; L2 normalisation is undefined (collapsed backbone?)")
    return x / norms


def _episode_arrays(episodes: pd.DataFrame, row_of_id: Mapping[str, int]):
    """Feature-row indices and labels of every episode, checked."""
    out = []
    for rec in episodes.itertuples(index=False):
        name = f"episode (disease {rec.disease!r}, shots {rec.shots}, trial {rec.trial})"
        try:
            train = np.fromiter((row_of_id[i] for i in rec.train_ids), dtype=np.int64)
            test = np.fromiter((row_of_id[i] for i in rec.test_ids), dtype=np.int64)
        except KeyError as exc:
            raise DataError(f"{name}: image id {exc.args[0]!r} has no extracted feature row") from None
        y_train = np.asarray(rec.train_labels, dtype=np.int64)
        y_test = np.asarray(rec.test_labels, dtype=np.int64)
        for split, y in (("training", y_train), ("test", y_test)):
            pos, neg = int((y == 1).sum()), int((y == 0).sum())
            if pos == 0 or neg == 0:
                raise TaskError(f"{name}: the {split} set has {pos} positives and {neg} negatives; "
                                "a binary probe needs at least one of each")
        out.append((train, y_train, test, y_test))
    return out


def fit_probes(features: np.ndarray | torch.Tensor, episodes: pd.DataFrame, row_of_id: Mapping[str, int],
               config: ProbeConfig | None = None) -> pd.DataFrame:
    """Fit and score the probe of every episode.

    ``features`` (rows, dim) are raw backbone features; ``row_of_id`` maps each image id of the
    episodes to its row. Returns one row per episode (in the episodes' order) with ``disease,
    shots, n, trial, C, auroc, accuracy, f1``.
    """
    config = config or ProbeConfig()
    device = resolve_device(config.device)
    x = normalize_features(features).to(device)
    arrays = _episode_arrays(episodes, row_of_id)
    results: list[dict | None] = [None] * len(arrays)
    by_size: dict[int, list[int]] = {}
    for e, (train, *_rest) in enumerate(arrays):
        by_size.setdefault(len(train), []).append(e)
    for size, members in sorted(by_size.items()):
        for e, row in zip(members, _fit_group(x, [arrays[e] for e in members], config, device)):
            results[e] = row
    frame = episodes[["disease", "shots", "n", "trial"]].reset_index(drop=True).copy()
    extra = pd.DataFrame(results)
    return pd.concat([frame, extra], axis=1)


def _fit_group(x: torch.Tensor, group: Sequence[tuple], config: ProbeConfig, device: torch.device) -> list[dict]:
    """All episodes with the same training size: CV problems, C choice, refit, scoring."""
    G = len(group)
    T = len(group[0][0])
    M = max(len(g[2]) for g in group)
    train_idx = torch.as_tensor(np.stack([g[0] for g in group]), device=device)
    y_train = torch.as_tensor(np.stack([g[1] for g in group]), device=device)
    test_idx = torch.zeros(G, M, dtype=torch.long, device=device)
    y_test = torch.zeros(G, M, dtype=torch.long, device=device)
    test_mask = torch.zeros(G, M, dtype=torch.bool, device=device)
    for e, g in enumerate(group):
        test_idx[e, : len(g[2])] = torch.as_tensor(g[2])
        y_test[e, : len(g[3])] = torch.as_tensor(g[3])
        test_mask[e, : len(g[2])] = True
    train_x = x[train_idx]
    test_x = x[test_idx]  # padded entries point at row 0; the metrics mask them out
    gram = train_x @ train_x.transpose(1, 2)  # (G, T, T): all later work needs only inner products
    cross = test_x @ train_x.transpose(1, 2)  # (G, M, T)

    Cs = torch.tensor(config.Cs, dtype=torch.float64, device=device)
    n_C = len(config.Cs)
    chosen_C = torch.full((G,), float(config.one_shot_C), dtype=torch.float64, device=device)
    # -- cross-validation: one problem per (episode, fold, C), in the span of the fold's rows --
    # Episodes sampled by cxrtune.data.tasks share one label vector per training size, hence one
    # fold split: splits are computed once per distinct label vector and reused.
    splits: dict[tuple, list] = {}
    fold_episode_list, fold_rows = [], []
    for e, g in enumerate(group):
        key = tuple(g[1].tolist())
        if key not in splits:
            n_min = int(min((g[1] == 1).sum(), (g[1] == 0).sum()))
            k = min(config.cv_folds, n_min)
            splits[key] = list(StratifiedKFold(n_splits=k).split(np.zeros(T), g[1])) if k >= 2 else []
        for fold in splits[key]:
            fold_episode_list.append(e)
            fold_rows.append(fold)
    if fold_rows:
        Q = len(fold_rows)
        A = max(len(f[0]) for f in fold_rows)
        B = max(len(f[1]) for f in fold_rows)
        fold_episode = torch.as_tensor(fold_episode_list, device=device)
        fit_np, fit_valid_np = np.zeros((Q, A), np.int64), np.zeros((Q, A), bool)
        held_np, held_valid_np = np.zeros((Q, B), np.int64), np.zeros((Q, B), bool)
        for q, (fit, held) in enumerate(fold_rows):
            fit_np[q, : len(fit)], fit_valid_np[q, : len(fit)] = fit, True
            held_np[q, : len(held)], held_valid_np[q, : len(held)] = held, True
        fit_idx, fit_valid = torch.as_tensor(fit_np, device=device), torch.as_tensor(fit_valid_np, device=device)
        held_idx, held_valid = torch.as_tensor(held_np, device=device), torch.as_tensor(held_valid_np, device=device)
        eq = fold_episode[:, None, None]
        fit_gram = gram[eq, fit_idx[:, :, None], fit_idx[:, None, :]] * (fit_valid[:, :, None] & fit_valid[:, None, :])
        held_cross = gram[eq, held_idx[:, :, None], fit_idx[:, None, :]] * (held_valid[:, :, None] & fit_valid[:, None, :])
        fit_coords, held_coords = span_coordinates(fit_gram, held_cross)
        fit_labels = y_train[fold_episode[:, None], fit_idx]
        held_labels = y_train[fold_episode[:, None], held_idx]
        theta = _solve_chunked(
            fit_coords.repeat_interleave(n_C, 0), fit_labels.repeat_interleave(n_C, 0),
            fit_valid.to(torch.float64).repeat_interleave(n_C, 0), Cs.repeat(Q), config,
        )
        decision = torch.bmm(held_coords.repeat_interleave(n_C, 0), theta[:, :-1, None]).squeeze(-1) + theta[:, -1:]
        fold_accuracy = batched_accuracy(decision > 0, held_labels.repeat_interleave(n_C, 0),
                                         held_valid.repeat_interleave(n_C, 0))
        # sum of fold accuracies per (episode, C), as LogisticRegressionCV sums its fold scores
        totals = torch.zeros(G, n_C, dtype=torch.float64, device=device)
        totals.index_put_((fold_episode.repeat_interleave(n_C), torch.arange(n_C, device=device).repeat(Q)),
                          fold_accuracy, accumulate=True)
        # argmax takes the first maximum; rounding keeps float summation order from breaking a tie
        best = torch.round(totals * 1e9).argmax(1)
        has_cv = torch.zeros(G, dtype=torch.bool, device=device)
        has_cv[fold_episode] = True
        chosen_C = torch.where(has_cv, Cs[best], chosen_C)
    # -- refit on the whole training set and score the test set -------------------------------
    coords, test_coords = span_coordinates(gram, cross)
    theta = _solve_chunked(coords, y_train, torch.ones(G, T, dtype=torch.float64, device=device), chosen_C, config)
    decision = torch.bmm(test_coords, theta[:, :-1, None]).squeeze(-1) + theta[:, -1:]
    auc = batched_auroc(decision, y_test, test_mask)
    acc = batched_accuracy(decision > 0, y_test, test_mask)
    f1 = batched_f1(decision > 0, y_test, test_mask)
    return [
        {"C": float(chosen_C[e]), "auroc": float(auc[e]), "accuracy": float(acc[e]), "f1": float(f1[e])}
        for e in range(G)
    ]


def _solve_chunked(features, labels, sample_weights, C, config: ProbeConfig) -> torch.Tensor:
    thetas = []
    for start in range(0, len(features), config.chunk):
        sl = slice(start, start + config.chunk)
        theta, _ = solve_logistic(features[sl], labels[sl], sample_weights[sl], C[sl],
                                  max_iter=config.max_iter, tol=config.tol)
        thetas.append(theta)
    return torch.cat(thetas)
