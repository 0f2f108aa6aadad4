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

* **Inner products only.** The optimal ``w`` lies in the span of the training rows, ``w = X^T alpha``,
  so each problem is solved exactly in the coefficients ``alpha`` from the training rows' Gram
  matrix ``G`` (margins ``G alpha``, penalty ``alpha^T G alpha``); a 2048-d problem with ``2n``
  samples becomes a ``2n``-d one. The 2048-d features are touched once per episode (training and
  test rows' inner products, gathered a few episodes at a time); each cross-validation fold takes
  its block of the episode's ``G``, and held-out or test decisions are inner products times ``alpha``.
* **Batched Newton in sample space.** All (episode x fold x C) problems of one training size are
  stacked, padded with zero-weight samples, and solved by Newton's method, the system solved
  through the Woodbury identity (one N x N Cholesky of ``I + S G S`` per unconverged problem and
  iteration, which needs no jitter even for duplicate rows) with the unpenalised intercept
  eliminated by its Schur complement, and a batched backtracking line search; float64 throughout,
  until the Newton decrement vanishes. Products with ``G`` are shared by a fold's five Cs (one
  batched product with five columns); converged problems leave the factorisation at once; the
  factorisation that would only confirm convergence after a full step from the quadratic zone is
  skipped; solves use one right-hand side per call (CPU batched triangular solves with two run
  ~10x slower).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from cxrtune.device import resolve_device
from sklearn.model_selection import StratifiedKFold

from cxrtune.config import Config, param
from cxrtune.errors import ConfigError, DataError, TaskError
from cxrtune.evaluate.metrics import batched_accuracy, batched_auroc, batched_f1

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0)
_GATHER_BLOCK_ELEMENTS = 2 ** 21  # feature values gathered at once (16 MB in float64)
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
    chunk: int = param(256, low=1, doc="problems solved per batch (bounds memory; 256 keeps their systems in cache)")
    device: str = param("cpu", doc="torch device for the solver: cpu, cuda, cuda:1 or auto")

    def validate(self) -> None:
        if not self.Cs:
            raise ConfigError("ProbeConfig.Cs = () is empty: give at least one C, e.g. [0.01, 0.1, 1, 10, 100]")




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
    forming an r x r Hessian; the intercept is eliminated by its Schur complement. (``fit_probes``
    uses ``solve_kernel_logistic``, which needs only inner products; this form takes feature rows.)
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


def solve_kernel_logistic(gram: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, C: torch.Tensor,
                          max_iter: int = 50, tol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve Q x K L2-penalised logistic regressions from inner products alone, by Newton's method.

    ``gram`` (Q, N, N) holds the inner products of each problem set's samples (zero rows and
    columns for padding), ``labels`` (Q, N) in {0, 1}, ``weights`` (Q, N) sample weights (0 for
    padding), ``C`` (Q, K): K regularisation strengths per sample set. With ``w = sum_j alpha_j x_j``
    (the optimum lies in the span of the samples) this minimises ``0.5 ||w||^2 + C sum_i weights_i
    log(1 + exp(-s_i (x_i.w + b)))``, ``s_i = 2 y_i - 1``, intercept ``b`` unpenalised. Returns
    ``alpha`` (Q, K, N), ``b`` (Q, K) and the Newton iterations each problem used (Q, K); the
    decision on a row ``z`` is ``(z . x_j) alpha_j + b``.

    The iterates are exactly those of Newton's method on ``w`` (only their coordinates differ):
    with curvatures ``D``, ``S = D^{1/2}`` and the samples as rows of ``X``, Woodbury gives
    ``(I + X^T D X)^{-1} X^T v = X^T (v - S (I + S G S)^{-1} S G v)``, so an iteration costs one
    N x N Cholesky per unconverged problem, and every product with ``G`` is shared by the K
    problems of a sample set (one batched matrix product with K columns). ``I + S G S >= I`` needs
    no jitter even when ``G`` is singular. The intercept is eliminated by its Schur complement.
    """
    Q, N, _ = gram.shape
    K = C.shape[1]
    P = Q * K
    dtype, device = gram.dtype, gram.device
    s = (labels.to(dtype) * 2 - 1).repeat_interleave(K, 0)  # (P, N), problem p = q * K + k
    m = weights.to(dtype).repeat_interleave(K, 0)
    c = C.to(dtype).reshape(P, 1)
    owner = torch.arange(Q, device=device).repeat_interleave(K)
    alpha = torch.zeros(P, N, dtype=dtype, device=device)
    u = torch.zeros(P, N, dtype=dtype, device=device)  # G alpha, updated alongside alpha
    b = torch.zeros(P, dtype=dtype, device=device)
    done = torch.zeros(P, dtype=torch.bool, device=device)
    iterations = torch.zeros(P, dtype=torch.long, device=device)
    steps = _LINE_SEARCH_STEPS.to(device=device, dtype=dtype)
    eye = torch.eye(N, dtype=dtype, device=device)
    quadratic_zone = tol ** 0.5 / 10

    def times_gram(vectors: torch.Tensor) -> torch.Tensor:
        """G v for (P, J, N) vectors: one (Q, N, N) x (Q, N, K * J) product."""
        J = vectors.shape[1]
        stacked = vectors.reshape(Q, K * J, N).transpose(1, 2)
        return torch.bmm(gram, stacked).transpose(1, 2).reshape(P, J, N)

    for _ in range(max_iter):
        margins = s * (u + b[:, None])
        sig = torch.sigmoid(-margins)  # 1 - p(correct class)
        residual = c * m * s * sig
        curvature = c * m * sig * (1 - sig)
        v = alpha - residual  # the gradient in w is X^T v
        grad_b = -residual.sum(1)
        g_vd = times_gram(torch.stack([v, curvature], 1))  # (P, 2, N): G v, G d
        active = torch.nonzero(~done).flatten()
        root = curvature[active].sqrt()
        system = gram[owner[active]]
        system *= root[:, :, None] * root[:, None, :]
        system.diagonal(dim1=1, dim2=2).add_(1.0)  # I + S G S
        chol, info = torch.linalg.cholesky_ex(system)
        if bool((info != 0).any()):
            chol, _ = torch.linalg.cholesky_ex(system + 1e-6 * eye)
        rhs = root[:, None, :] * g_vd[active]  # (A, 2, N): S G v, S G d
        # one right-hand side per call: on CPU, batched triangular solves with several right-hand
        # sides run ~10x slower than the same solves one column at a time
        solved = torch.stack([torch.cholesky_solve(rhs[:, j, :, None], chol)[..., 0] for j in range(2)], 2)
        scaled = torch.zeros(P, N, 2, dtype=dtype, device=device)
        scaled[active] = root[:, :, None] * solved  # S (I + S G S)^{-1} S G [v, d]
        g_scaled = times_gram(scaled.transpose(1, 2))
        a_v = v - scaled[..., 0]  # H^{-1} X^T v = X^T a_v
        a_d = curvature - scaled[..., 1]  # H^{-1} X^T D 1 = X^T a_d
        g_a_v = g_vd[:, 0] - g_scaled[:, 0]
        g_a_d = g_vd[:, 1] - g_scaled[:, 1]
        g_d = g_vd[:, 1]
        schur = (curvature.sum(1) - (g_d * a_d).sum(1)).clamp(min=1e-300)
        db = (-grad_b + (g_d * a_v).sum(1)) / schur
        d_alpha = -a_v - a_d * db[:, None]
        g_d_alpha = -g_a_v - g_a_d * db[:, None]
        decrement = -((g_vd[:, 0] * d_alpha).sum(1) + grad_b * db)  # Newton decrement squared
        done = done | (decrement / 2 <= tol) | (decrement <= 0)
        if bool(done.all()):
            break
        iterations += (~done).long()
        # Backtracking (Armijo) over a fixed ladder of steps for the unconverged problems at once:
        # margins are affine in the step, so each trial loss costs O(N).
        live = torch.nonzero(~done).flatten()
        mg, ml, cl, dl = margins[live], m[live], c[live], decrement[live]
        along = s[live] * (g_d_alpha[live] + db[live, None])
        ww = (alpha[live] * u[live]).sum(1)
        wd = (alpha[live] * g_d_alpha[live]).sum(1)
        dd = (d_alpha[live] * g_d_alpha[live]).sum(1)
        f0 = 0.5 * ww + cl[:, 0] * (ml * torch.nn.functional.softplus(-mg)).sum(1)
        trial_margins = mg[:, None, :] + steps[None, :, None] * along[:, None, :]
        trial_w2 = ww[:, None] + 2 * steps[None, :] * wd[:, None] + steps[None, :] ** 2 * dd[:, None]
        f_trial = 0.5 * trial_w2 + cl * (ml[:, None, :] * torch.nn.functional.softplus(-trial_margins)).sum(2)
        ok = f_trial <= f0[:, None] - 1e-4 * steps[None, :] * dl[:, None]
        first_ok = torch.where(ok.any(1), ok.to(torch.int8).argmax(1),
                               torch.full_like(live, steps.numel() - 1))
        step = steps[first_ok]
        alpha[live] += step[:, None] * d_alpha[live]
        u[live] += step[:, None] * g_d_alpha[live]
        b[live] += step * db[live]
        # Newton converges quadratically here: after a full step from a decrement of at most
        # sqrt(tol) / 10 the next one is far below tol (it is ~ its square), so the
        # factorisation that would only confirm convergence is skipped.
        done[live[(step == 1) & (dl / 2 <= quadratic_zone)]] = True
        if bool(done.all()):
            break
    return alpha.reshape(Q, K, N), b.reshape(Q, K), iterations.reshape(Q, K)


# -------------------------------------------------------------------------------------------
# Episodes -> problems
# -------------------------------------------------------------------------------------------


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
    # All later work needs only inner products: of training rows with each other, (G, T, T), and
    # of test rows with training rows, (G, M, T); padded test entries point at row 0 and the
    # metrics mask them out. Rows are gathered a few episodes at a time: one gather of every
    # episode's rows would write hundreds of MB of fresh memory and cost more than the products.
    rows = torch.cat([train_idx, test_idx], 1)
    products = torch.empty(G, T + M, T, dtype=x.dtype, device=device)
    per_block = max(1, _GATHER_BLOCK_ELEMENTS // ((T + M) * x.shape[1]))
    for start in range(0, G, per_block):
        block = x[rows[start: start + per_block]]
        torch.bmm(block, block[:, :T].transpose(1, 2), out=products[start: start + per_block])
    gram, cross = products[:, :T].contiguous(), products[:, T:]

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
        fit_labels = y_train[fold_episode[:, None], fit_idx]
        held_labels = y_train[fold_episode[:, None], held_idx]
        alpha, bias = _solve_kernel_chunked(fit_gram, fit_labels, fit_valid.to(torch.float64),
                                            Cs.expand(Q, n_C), config)
        decision = torch.bmm(held_cross, alpha.transpose(1, 2)) + bias[:, None, :]  # (Q, B, n_C)
        fold_accuracy = batched_accuracy(decision.transpose(1, 2).reshape(Q * n_C, B) > 0,
                                         held_labels.repeat_interleave(n_C, 0), held_valid.repeat_interleave(n_C, 0))
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
    alpha, bias = _solve_kernel_chunked(gram, y_train, torch.ones(G, T, dtype=torch.float64, device=device),
                                        chosen_C[:, None], config)
    decision = torch.bmm(cross, alpha[:, 0, :, None]).squeeze(-1) + bias
    auc = batched_auroc(decision, y_test, test_mask)
    acc = batched_accuracy(decision > 0, y_test, test_mask)
    f1 = batched_f1(decision > 0, y_test, test_mask)
    return [
        {"C": float(chosen_C[e]), "auroc": float(auc[e]), "accuracy": float(acc[e]), "f1": float(f1[e])}
        for e in range(G)
    ]


def _solve_kernel_chunked(gram, labels, sample_weights, C, config: ProbeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``solve_kernel_logistic`` over sample sets in chunks of about ``config.chunk`` problems."""
    per_chunk = max(1, config.chunk // C.shape[1])
    alphas, biases = [], []
    for start in range(0, len(gram), per_chunk):
        sl = slice(start, start + per_chunk)
        alpha, bias, _ = solve_kernel_logistic(gram[sl], labels[sl], sample_weights[sl], C[sl],
                                               max_iter=config.max_iter, tol=config.tol)
        alphas.append(alpha)
        biases.append(bias)
    return torch.cat(alphas), torch.cat(biases)
