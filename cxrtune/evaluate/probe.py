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
AUROC are identical (``tests/test_eval_probe.py``). The inner products of float32 features are
summed in float32 (float64 features keep float64 products): a relative error of about 1e-7 per
product, which changed no chosen C and no AUROC against float64 products on the benchmark's grid
(500 probes each at 512-d and 2048-d, on easy and on hard tasks).

Why it is fast:

* **Inner products only.** The optimal ``w`` lies in the span of the training rows, ``w = X^T alpha``,
  so each problem is solved exactly in the coefficients ``alpha`` from the training rows' Gram
  matrix ``G`` (margins ``G alpha``, penalty ``alpha^T G alpha``); a 2048-d problem with ``2n``
  samples becomes a ``2n``-d one. The 2048-d features are touched once per episode: its training
  and test rows are gathered in their own precision (float32 from a backbone; half the memory
  traffic of a normalised float64 copy), a few episodes at a time, multiplied in that precision
  (float32 GEMMs run at twice the float64 rate), and the small products are taken to float64 and
  divided by the row norms. Each cross-validation fold takes its block of the episode's ``G``
  (slice copies: a fold of sorted labels is a few runs of rows), and held-out or test decisions
  are inner products times ``alpha``.
* **Batched Newton in sample space** (:func:`kernel_newton`). All (episode x fold) problems of one
  training size and one C are stacked, padded with zero-weight samples, and solved by Newton's
  method through the Woodbury identity (an N x N Cholesky of ``I + S G S``, no jitter needed even
  for duplicate rows), the unpenalised intercept eliminated by its Schur complement, a batched
  backtracking line search that tries the full step first; float64 throughout. The working set
  is compacted as problems converge. On the CPU the batched Cholesky and the small products go
  through numpy, which spends less per matrix than torch on these 80 x 80 problems
  (``bench/probe_batched.py --ops``).
* **Fewer factorisations.** A problem keeps its factorisation while its curvatures stay within
  ``1 +- reuse`` of it and takes steps with that Hessian (products and triangular solves only);
  convergence is still certified exactly, through the smallest curvature ratio. On the study's
  grid this and the path's start below cut the factorisations from 3.4 per (fold, C) at 50 shots
  to 1.4.
* **The C path.** Cs are solved one after the other in tie-break order, each C starting from the
  previous C's solution continued by the path's last move (scaled to the step in log C; for
  increasing Cs), or by the quadratic through the last three solutions where the last three steps
  in log C are equal (the study's Cs from C = 10 on): on separable folds the solution grows about
  linearly in log C, and at 50 shots C = 100 then needs 2 factorisations instead of 3, and 4 Newton
  iterations instead of 6 with the quadratic. Newton reaches the same optimum from any start. An
  episode whose folds are all classified without error at some C is decided there: no later C can
  exceed a perfect sum, and ties go to the earlier C. Exact, and it saves most of the work on easy tasks (it seldom triggers at 50 shots on
  real features).
* **Fewer ops per iteration.** The Newton decrement comes from the forward triangular solve
  alone (``g^T A^-1 g = v.Gv - |L^-1 S G v|^2``), so the iteration that only certifies
  convergence skips the backward solve, the step and the line search; the loss at the accepted
  point and ``G alpha`` are carried from one iteration, and one C, to the next.
* **Both cores, by data parallelism** (``ProbeConfig.workers``, ``ProbeConfig.parallel``). Each
  training size's episodes are split into one piece per worker, and the workers take pieces
  from one queue, the largest training sizes first: a worker that the machine slows down takes
  fewer of the later, smaller pieces, so the workers finish together. Torch and numpy's BLAS are
  held to one thread meanwhile (their own threading costs more than it gains on these small
  ops), and the solver runs in inference mode (no autograd bookkeeping: about 8 % at one
  worker). On Linux the workers are forked processes: they inherit the features by copy-on-write
  and send back a few numbers per episode, and no worker waits for the GIL, which the Python
  between the ~80 small ops of a Newton iteration holds (threads gave 1.25x on 2 cores, processes
  about 1.6-1.7x: the fork takes about 15 ms, and two halves of the grid side by side take 0.37 s
  against 0.34 s for one half alone, the cores' contention; a worker kept alive between calls
  measured no faster than one forked per call). The cyclic garbage collector is off while the
  workers run. Threads are the fallback elsewhere, and ``auto`` also keeps to threads in a process
  that runs other Python threads (a fork copies only the calling thread). An episode's arithmetic
  does not depend on its piece: the results equal one worker's (bit for bit on the benchmark's
  grid, tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import os
import pickle
import signal
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from cxrtune.device import resolve_device
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import ThreadpoolController

from cxrtune.config import Config, param
from cxrtune.errors import ConfigError, DataError, TaskError
from cxrtune.evaluate.metrics import batched_accuracy, batched_auroc, batched_f1

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0)
_GATHER_BLOCK_ELEMENTS = 2 ** 18  # feature values gathered at once (2 MB in float64: stays in cache)
_SCORES = ("C", "auroc", "accuracy", "f1")  # what _fit_group returns per episode, in this order
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
                          max_iter: int = 50, tol: float = 1e-10,
                          reuse: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve Q x K L2-penalised logistic regressions from inner products alone.

    ``gram`` (Q, N, N) holds the inner products of each problem set's samples (zero rows and
    columns for padding), ``labels`` (Q, N) in {0, 1}, ``weights`` (Q, N) sample weights (0 for
    padding), ``C`` (Q, K): K regularisation strengths per sample set. With ``w = sum_j alpha_j x_j``
    (the optimum lies in the span of the samples) this minimises ``0.5 ||w||^2 + C sum_i weights_i
    log(1 + exp(-s_i (x_i.w + b)))``, ``s_i = 2 y_i - 1``, intercept ``b`` unpenalised. Returns
    ``alpha`` (Q, K, N), ``b`` (Q, K) and the iterations each problem used (Q, K); the decision on
    a row ``z`` is ``(z . x_j) alpha_j + b``. See :func:`kernel_newton` for the method.
    """
    Q, N, _ = gram.shape
    K = C.shape[1]
    dtype, device = gram.dtype, gram.device
    problems = gram if K == 1 else gram.repeat_interleave(K, 0)  # problem p = q * K + k
    s = (labels.to(dtype) * 2 - 1).repeat_interleave(K, 0)
    m = weights.to(dtype).repeat_interleave(K, 0)
    start = torch.zeros(Q * K, N, dtype=dtype, device=device)
    alpha, b, iterations, _ = kernel_newton(problems, s, m, C.to(dtype).reshape(-1), start,
                                            torch.zeros(Q * K, dtype=dtype, device=device),
                                            max_iter=max_iter, tol=tol, reuse=reuse)
    return alpha.reshape(Q, K, N), b.reshape(Q, K), iterations.reshape(Q, K)


def kernel_newton(gram: torch.Tensor, signs: torch.Tensor, weights: torch.Tensor, C: torch.Tensor,
                  alpha: torch.Tensor, b: torch.Tensor, max_iter: int = 50, tol: float = 1e-10,
                  reuse: float = 0.25, products: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """P kernel logistic regressions from a starting point, by Newton's method with Hessian reuse.

    ``gram`` (P, N, N) one Gram matrix per problem, ``signs`` (P, N) in {-1, +1}, ``weights``
    (P, N) (0 for padding), ``C`` (P,), starting coefficients ``alpha`` (P, N) and intercepts
    ``b`` (P,). Returns ``alpha``, ``b``, the iterations and the Cholesky factorisations each
    problem used. ``products``, if given, holds ``G alpha`` of the start (which saves computing
    it) and is overwritten with ``G alpha`` of the solution.

    The iterates are those of Newton's method on ``w`` (only their coordinates differ): with
    curvatures ``D``, ``S = D^{1/2}`` and the samples as rows of ``X``, Woodbury gives
    ``(I + X^T D X)^{-1} X^T v = X^T (v - S (I + S G S)^{-1} S G v)``, so a Newton system costs one
    N x N Cholesky of ``I + S G S`` (``>= I``: no jitter even for a singular ``G``); the intercept
    is eliminated by its Schur complement, and a batched backtracking line search keeps every
    step a descent step.

    Hessian reuse: a problem keeps its last factorisation while every curvature stays within a
    factor ``1 +- reuse`` of the ones it was built with (a step with that Hessian is still a descent
    direction, and converges at a rate of about ``reuse``); such an iteration costs matrix-vector
    products and triangular solves instead of a factorisation. Convergence is certified whatever
    Hessian was used: with ``rho`` the smallest ratio of current to factorised curvature (at most
    1), the true Hessian is ``>= rho`` times the factorised one, so the true squared Newton
    decrement is at most the computed one divided by ``rho``; a problem stops when half of that
    bound is below ``tol``, or after a full fresh Newton step from a decrement of at most
    ``sqrt(tol) / 10`` (quadratic convergence makes the next decrement far below ``tol``).

    The working set is compacted when a third of it has converged, so converged problems cost
    nothing and no iteration gathers its matrices.
    """
    P, N, _ = gram.shape
    dtype, device = gram.dtype, gram.device
    out_alpha, out_b = alpha.clone(), b.clone()
    out_iterations = torch.zeros(P, dtype=torch.long, device=device)
    out_factorisations = torch.zeros(P, dtype=torch.long, device=device)
    steps = _LINE_SEARCH_STEPS.to(device=device, dtype=dtype)
    eye = torch.eye(N, dtype=dtype, device=device)
    quadratic_zone = tol ** 0.5 / 10
    # working set
    idx = torch.arange(P, device=device)
    G, s, m, c = gram, signs, weights, C.reshape(P, 1)
    al, bb = alpha.clone(), b.clone()
    if products is not None:
        u = products.clone()
    elif bool(al.any()):
        u = _matmul(G, al.unsqueeze(-1)).squeeze(-1)
    else:
        u = torch.zeros_like(al)
    chol = torch.empty(P, N, N, dtype=dtype, device=device)
    factorised = torch.zeros(P, N, dtype=dtype, device=device)  # curvatures of the stored factorisation
    have = torch.zeros(P, dtype=torch.bool, device=device)
    done = torch.zeros(P, dtype=torch.bool, device=device)
    iterations = torch.zeros(P, dtype=torch.long, device=device)
    factorisations = torch.zeros(P, dtype=torch.long, device=device)
    f0 = None  # the loss at the current point, once known
    for _ in range(max_iter):
        margins = s * (u + bb[:, None])
        sig = torch.sigmoid(-margins)  # 1 - p(correct class)
        residual = c * m * s * sig
        curvature = c * m * sig * (1 - sig)
        ratio = torch.where(factorised > 0, curvature / factorised.clamp(min=1e-300), torch.ones_like(curvature))
        rho = ratio.amin(1).clamp(max=1.0)
        fresh = ~done & (~have | (rho < 1 - reuse) | (ratio.amax(1) > 1 + reuse))
        n_fresh = int(fresh.sum())
        if n_fresh:
            which = None if n_fresh == len(idx) else torch.nonzero(fresh).flatten()
            cur = curvature if which is None else curvature[which]
            root = cur.sqrt()
            system = (G if which is None else G[which]) * root[:, :, None]
            system *= root[:, None, :]
            system.diagonal(dim1=1, dim2=2).add_(1.0)  # I + S G S
            new_chol = _cholesky(system)
            if new_chol is None:  # I + S G S >= I: only rounding on an enormous G gets here
                new_chol = _cholesky(system + 1e-6 * eye)
                if new_chol is None:
                    raise DataError("probe: a Newton system I + S G S is not positive definite even with jitter; "
                                    "the inner products of the features are not finite")
            if which is None:
                chol, factorised = new_chol, cur.clone()
            else:
                chol[which] = new_chol
                factorised[which] = cur
            have |= fresh
            factorisations += fresh.long()
            rho = torch.where(fresh, torch.ones_like(rho), rho)
        d = factorised
        root = d.sqrt()
        v = al - residual  # the gradient in w is X^T v
        grad_b = -residual.sum(1)
        # right-hand sides stored as (W, 2, N) and passed transposed: measured ~2x faster products
        g_vd = _matmul(G, torch.stack([v, d], 1).mT)  # (W, N, 2): G v, G d
        half = torch.linalg.solve_triangular(chol, root[:, :, None] * g_vd, upper=False)  # L^-1 S G [v, d]
        g_v, g_d = g_vd[..., 0], g_vd[..., 1]
        h_v, h_d = half[..., 0], half[..., 1]
        # The Newton decrement needs only the forward solve: with A = I + X^T D X (in w),
        # g^T A^-1 g = v.Gv - |L^-1 S G v|^2, and likewise for the intercept's coupling c = X^T d.
        v_a_v = (v * g_v).sum(1) - (h_v * h_v).sum(1)
        c_a_v = (d * g_v).sum(1) - (h_d * h_v).sum(1)
        schur = (d.sum(1) - ((d * g_d).sum(1) - (h_d * h_d).sum(1))).clamp(min=1e-300)
        db = (c_a_v - grad_b) / schur
        decrement = v_a_v + schur * db * db  # with the Hessian used
        finished = done | (decrement / rho / 2 <= tol) | (decrement <= 0)
        if bool(finished.all()):  # only certified here: the step is not needed
            break
        scaled = root[:, :, None] * torch.linalg.solve_triangular(chol.mT, half, upper=True)  # S (I + S G S)^{-1} S G [v, d]
        g_scaled = _matmul(G, scaled)
        a_v = v - scaled[..., 0]  # H^{-1} X^T v = X^T a_v
        a_d = d - scaled[..., 1]  # H^{-1} X^T D 1 = X^T a_d
        d_alpha = -a_v - a_d * db[:, None]
        g_d_alpha = -(g_v - g_scaled[..., 0]) - (g_d - g_scaled[..., 1]) * db[:, None]
        # Backtracking (Armijo): margins are affine in the step, so a trial loss costs O(N). The
        # full step is tried first; problems that refuse it try a ladder of halved steps at once.
        along = s * (g_d_alpha + db[:, None])
        ww = (al * u).sum(1)
        wd = (al * g_d_alpha).sum(1)
        dd = (d_alpha * g_d_alpha).sum(1)
        if f0 is None:  # the loss at the start; later it is the accepted trial's
            f0 = 0.5 * ww + c[:, 0] * (m * torch.nn.functional.softplus(-margins)).sum(1)
        f_full = 0.5 * (ww + 2 * wd + dd) + c[:, 0] * (m * torch.nn.functional.softplus(-(margins + along))).sum(1)
        step = torch.where(finished, torch.zeros_like(decrement), torch.ones_like(decrement))
        f_next = torch.where(finished, f0, f_full)
        refused = torch.nonzero(~finished & (f_full > f0 - 1e-4 * decrement)).flatten()
        if len(refused):
            ladder = steps[1:]
            trial_margins = margins[refused, None, :] + ladder[None, :, None] * along[refused, None, :]
            trial_w2 = (ww[refused, None] + 2 * ladder[None, :] * wd[refused, None]
                        + ladder[None, :] ** 2 * dd[refused, None])
            f_trial = 0.5 * trial_w2 + c[refused] * (m[refused, None, :]
                                                     * torch.nn.functional.softplus(-trial_margins)).sum(2)
            ok = f_trial <= f0[refused, None] - 1e-4 * ladder[None, :] * decrement[refused, None]
            first_ok = torch.where(ok.any(1), ok.to(torch.int8).argmax(1), torch.full_like(refused, ladder.numel() - 1))
            step[refused] = ladder[first_ok]
            f_next[refused] = f_trial[torch.arange(len(refused), device=device), first_ok]
        f0 = f_next
        al += step[:, None] * d_alpha
        u += step[:, None] * g_d_alpha
        bb += step * db
        iterations += (~finished).long()
        done = finished | ((step == 1) & fresh & (decrement / 2 <= quadratic_zone))
        n_finished = int(done.sum())
        if n_finished == len(idx):
            break
        if n_finished * 3 >= len(idx):  # a third converged: write them out, compact the working set
            out_alpha[idx], out_b[idx] = al, bb
            out_iterations[idx], out_factorisations[idx] = iterations, factorisations
            if products is not None:
                products[idx] = u
            keep = torch.nonzero(~done).flatten()
            idx, G, s, m, c = idx[keep], G[keep], s[keep], m[keep], c[keep]
            al, bb, u, chol, factorised, f0 = al[keep], bb[keep], u[keep], chol[keep], factorised[keep], f0[keep]
            have, done, iterations, factorisations = have[keep], done[keep], iterations[keep], factorisations[keep]
    out_alpha[idx], out_b[idx] = al, bb
    out_iterations[idx], out_factorisations[idx] = iterations, factorisations
    if products is not None:
        products[idx] = u
    return out_alpha, out_b, out_iterations, out_factorisations


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``a @ b``; on the CPU through numpy, whose matmul costs about a third of ``torch.bmm``
    on these small float64 matrices (per-matrix overhead; ``bench/probe_batched.py --ops``)."""
    if a.device.type == "cpu":
        return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))
    return torch.matmul(a, b)


def _cholesky(a: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factors of a batch of matrices, or None if one is not positive definite.

    On the CPU through numpy: ``torch.linalg.cholesky_ex`` copies each matrix to column-major order
    and clears its upper triangle in extra passes (``bench/probe_batched.py --ops``)."""
    if a.device.type == "cpu":
        try:
            return torch.from_numpy(np.linalg.cholesky(a.numpy()))
        except np.linalg.LinAlgError:
            return None
    chol, info = torch.linalg.cholesky_ex(a)
    return None if bool((info != 0).any()) else chol


# -------------------------------------------------------------------------------------------
# Episodes -> problems
# -------------------------------------------------------------------------------------------


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
    step = max(1, _GATHER_BLOCK_ELEMENTS // max(1, x.shape[1]))
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


def _episode_arrays(episodes: pd.DataFrame, row_of_id: Mapping[str, int]):
    """Feature-row indices and labels of every episode, checked.

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
    # inference mode: no autograd bookkeeping on the solver's thousands of small ops
    with _solver_threads(device), torch.inference_mode():
        by_size: dict[int, list[int]] = {}
        for e, size in enumerate(map(len, episodes["train_ids"].tolist())):
            by_size.setdefault(size, []).append(e)
        # Each training size splits into `workers` pieces of episodes; the workers take pieces from
        # one queue, the largest sizes first, so a worker slowed by the machine takes fewer of the
        # later (smaller) pieces and the two finish together. An episode's arithmetic is the same
        # in any piece.
        pieces = [piece for _, members in sorted(by_size.items(), reverse=True)
                  for piece in np.array_split(np.asarray(members), min(workers, len(members)))]
        workers = min(workers, len(pieces))
        rows = x.shape[0]

        def work(queue: _PieceQueue) -> list[tuple[np.ndarray, np.ndarray]]:
            # each worker looks up and checks its pieces' rows and labels, and computes the norms
            # of the rows they use, once each (only those are checked for NaN, inf or zero)
            inv_norm = torch.zeros(rows, dtype=torch.float64, device=device)
            known = torch.zeros(rows, dtype=torch.bool, device=device)
            out = []
            for p in queue:
                members = pieces[p]
                arrays = _episode_arrays(episodes.iloc[members], row_of_id)
                used = torch.as_tensor(np.unique(np.concatenate([np.concatenate([a[0], a[2]]) for a in arrays])),
                                       device=device)
                new = used[~known[used]]
                if len(new):
                    inv_norm[new] = 1.0 / _row_norms(x, "features", new)
                    known[new] = True
                out.append((members, _fit_group(x, inv_norm, arrays, config, device)))
            return out

        with _PieceQueue(len(pieces)) as queue:
            if workers <= 1:
                solved = work(queue)
            elif _use_processes(config.parallel):
                solved = _forked_map(lambda _: work(queue), range(workers))
            else:  # threads: torch and numpy release the GIL inside their ops
                with ThreadPoolExecutor(workers, thread_name_prefix="probe") as pool:
                    solved = [row for rows in pool.map(lambda _: work(queue), range(workers)) for row in rows]
    scores = np.empty((len(episodes), len(_SCORES)))
    for share, values in solved:
        scores[share] = values
    frame = episodes[["disease", "shots", "n", "trial"]].reset_index(drop=True)
    for j, key in enumerate(_SCORES):
        frame[key] = scores[:, j]
    return frame


class _PieceQueue:
    """The numbers ``0 .. n - 1``, each taken by exactly one of the workers that iterate over it,
    in order: threads, or processes forked while it is open (they inherit the pipe).

    A pipe holds the numbers as 4-byte records, written at once before any worker starts; a read
    of one record is atomic between processes and threads alike (Linux serialises reads of a
    pipe), and the end of the pipe ends every worker's iteration.
    """

    _RECORD = 4

    def __init__(self, n: int) -> None:
        payload = np.arange(n, dtype=np.int32).tobytes()
        if len(payload) > 65536:  # the pipe's capacity (Linux): written before any reader runs
            raise ConfigError(f"probe: {n} pieces of work are too many for one queue (at most 16384); "
                              "use fewer ProbeConfig.workers")
        self._read, write = os.pipe()
        try:
            while payload:
                payload = payload[os.write(write, payload):]
        except BaseException:
            os.close(self._read)
            raise
        finally:
            os.close(write)

    def __iter__(self):
        while True:
            record = os.read(self._read, self._RECORD)
            if not record:
                return
            yield int(np.frombuffer(record, dtype=np.int32)[0])

    def __enter__(self) -> "_PieceQueue":
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._read)


@contextlib.contextmanager
def _solver_threads(device: torch.device):
    """numpy's BLAS on one thread, and on the CPU torch too, for the duration.

    Intra-op threading costs more than it gains on the solver's small ops (one worker on 2 intra-op
    threads measured 2.6 s on the study's grid, 0.70 s on 1); the workers parallelise instead.
    """
    with _blas_controller().limit(limits=1, user_api="blas"):
        if device.type != "cpu":
            yield
            return
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _use_processes(parallel: str) -> bool:
    """Whether the workers are forked processes. ``auto`` forks only on Linux and only from a process
    that runs no other Python thread (a Ray worker, a server): a fork copies just the calling
    thread, and a lock another thread holds at that moment would stay locked in the child."""
    can_fork = sys.platform.startswith("linux") and hasattr(os, "fork")
    if parallel == "processes" and not can_fork:
        raise ConfigError(f"ProbeConfig.parallel = 'processes' needs os.fork on Linux; this is {sys.platform}: "
                          "use 'threads' or 'auto'")
    return parallel == "processes" or (parallel == "auto" and can_fork and threading.active_count() == 1)


def _forked_map(function, parts: Sequence) -> list:
    """``sum(function(part) for part in parts)``, the first part in this process and each other in a
    forked child, all at once; the children inherit every argument by copy-on-write (no pickling of
    the features) and send back their (small) results through a pipe.

    A child runs only ``function`` and the pickling of its result, in one thread (torch on one
    intra-op thread, numpy's BLAS on one: set before the fork), and always ends with ``os._exit``.
    An exception in a child is raised here with its traceback; a child that dies raises DataError.
    """
    _reap_finished()
    # The cyclic garbage collector writes to every object it visits: while a child shares this
    # process's pages, each such write copies a page. It stays off until the children are done.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _fork_and_collect(function, parts)
    finally:
        if collecting:
            gc.enable()


def _fork_and_collect(function, parts: Sequence) -> list:
    """The work of :func:`_forked_map`."""
    children = []
    try:
        for part in parts[1:]:
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: never returns to the caller's stack
                status = 0
                try:
                    os.close(read_fd)
                    try:
                        payload = pickle.dumps((True, function(part)), protocol=pickle.HIGHEST_PROTOCOL)
                    except BaseException as exc:  # noqa: BLE001 - sent to the parent, raised there
                        status = 1
                        text = "".join(traceback.format_exception(exc))
                        try:
                            payload = pickle.dumps((False, (exc, text)))
                        except Exception:  # noqa: BLE001 - an exception that does not pickle goes as text
                            payload = pickle.dumps((False, (None, text)))
                    with os.fdopen(write_fd, "wb") as pipe:
                        pipe.write(payload)
                finally:
                    os._exit(status)
            os.close(write_fd)
            children.append((pid, read_fd))
        out = list(function(parts[0]))
    except BaseException:  # this process failed or was interrupted: the children's work is moot
        for pid, read_fd in children:
            os.close(read_fd)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        raise
    failure = None
    for pid, read_fd in children:
        with os.fdopen(read_fd, "rb") as pipe:
            payload = pipe.read()
        if not payload:
            _, status = os.waitpid(pid, 0)
            failure = failure or DataError(
                f"probe worker process {pid} ended without a result (wait status {status}: killed, out of "
                "memory?); ProbeConfig(parallel='threads') solves in this process instead")
            continue
        _UNREAPED.append(pid)  # it has sent everything; its exit takes tens of ms: reaped later
        ok, value = pickle.loads(payload)
        if ok:
            out += value
        elif failure is None:
            exc, text = value
            failure = exc if isinstance(exc, Exception) else DataError(f"probe worker process {pid} failed:\n{text}")
            if exc is not None:
                failure.add_note(f"raised in probe worker process {pid}:\n{text}")
    _reap_finished()
    if failure is not None:
        raise failure
    return out


_UNREAPED: list[int] = []  # children that sent their results and may still be exiting


def _reap_finished() -> None:
    """Collect the exit status of every finished child (a zombie until then), without waiting."""
    for pid in list(_UNREAPED):
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # already collected elsewhere
            finished = pid
        if finished:
            _UNREAPED.remove(pid)


@functools.lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    """numpy's BLAS, found once (a search of the loaded libraries costs milliseconds; a limit then 30 us)."""
    return ThreadpoolController()


def _fit_group(x: torch.Tensor, inv_norm: torch.Tensor, group: Sequence[tuple], config: ProbeConfig,
               device: torch.device) -> np.ndarray:
    """All episodes with the same training size: CV problems, C choice, refit, scoring; one row of
    ``_SCORES`` per episode."""
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
    # metrics mask them out. Rows are gathered an episode or a few at a time, in their own
    # precision, so that the block is still in cache for the product: one gather of every
    # episode's rows would write hundreds of MB of fresh memory and cost more than the products.
    rows = torch.cat([train_idx, test_idx], 1)
    gemm_dtype = x.dtype  # products in the features' precision (float64 measured no more accurate here)
    products = torch.empty(G, T + M, T, dtype=gemm_dtype, device=device)
    per_block = max(1, _GATHER_BLOCK_ELEMENTS // ((T + M) * x.shape[1]))
    for start in range(0, G, per_block):
        chunk = rows[start: start + per_block]
        block = torch.index_select(x, 0, chunk.flatten()).view(len(chunk), T + M, -1).to(gemm_dtype)
        torch.bmm(block, block[:, :T].transpose(1, 2), out=products[start: start + per_block])
    products = products.to(torch.float64)
    products *= inv_norm[rows][:, :, None] * inv_norm[train_idx][:, None, :]
    gram, cross = products[:, :T].contiguous(), products[:, T:]

    Cs = torch.tensor(config.Cs, dtype=torch.float64, device=device)
    n_C = len(config.Cs)
    chosen_C = torch.full((G,), float(config.one_shot_C), dtype=torch.float64, device=device)
    # -- cross-validation: one problem per (episode, fold, C), in the span of the fold's rows --
    # Episodes sampled by cxrtune.data.tasks share one label vector per training size, hence one
    # fold split: splits are computed once per distinct label vector and reused.
    splits: dict[tuple, list] = {}
    episodes_of: dict[tuple, list[int]] = {}
    for e, g in enumerate(group):
        key = tuple(g[1].tolist())
        if key not in splits:
            n_min = int(min((g[1] == 1).sum(), (g[1] == 0).sum()))
            k = min(config.cv_folds, n_min)
            splits[key] = list(StratifiedKFold(n_splits=k).split(np.zeros(T), g[1])) if k >= 2 else []
        episodes_of.setdefault(key, []).append(e)
    # Folds in the order (label vector, fold, episode): the folds that take the same rows of their
    # episodes' G are consecutive, so their blocks are copied as one slice.
    fold_episode_list, fold_rows, same_rows = [], [], []
    for key, members in episodes_of.items():
        for fold in splits[key]:
            same_rows.append((len(fold_rows), members, fold))
            fold_episode_list += members
            fold_rows += [fold] * len(members)
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
        # Each fold's blocks of its episode's G; padding stays zero.
        # Each fold's blocks of its episode's G; only the padding is zeroed (most folds have none).
        fit_gram = torch.empty(Q, A, A, dtype=torch.float64, device=device)
        held_cross = torch.empty(Q, B, A, dtype=torch.float64, device=device)
        for first, members, (fit, held) in same_rows:
            source = gram if len(members) == G else gram.index_select(0, torch.as_tensor(members, device=device))
            at = slice(first, first + len(members))
            _copy_block(fit_gram[at], source, fit, fit)
            _copy_block(held_cross[at], source, held, fit)
            fit_gram[at, len(fit):], fit_gram[at, :, len(fit):] = 0.0, 0.0
            held_cross[at, len(held):], held_cross[at, :, len(fit):] = 0.0, 0.0
        fit_labels = y_train[fold_episode[:, None], fit_idx]
        held_labels = y_train[fold_episode[:, None], held_idx]
        fit_signs = fit_labels.to(torch.float64) * 2 - 1
        fit_weights = fit_valid.to(torch.float64)
        folds_of = torch.zeros(G, dtype=torch.float64, device=device).index_add_(
            0, fold_episode, torch.ones(Q, dtype=torch.float64, device=device))
        # The C path, in tie-break order: each C starts from the previous C's solution, and an
        # episode whose folds are all classified without error at some C is decided there (no
        # later C can beat a perfect sum, and ties go to the earlier C), so its folds leave the path.
        totals = torch.full((G, n_C), -1.0, dtype=torch.float64, device=device)
        alpha = torch.zeros(Q, A, dtype=torch.float64, device=device)
        bias = torch.zeros(Q, dtype=torch.float64, device=device)
        products = torch.zeros(Q, A, dtype=torch.float64, device=device)  # G alpha of each fold's solution
        pending = torch.arange(Q, device=device)
        for k in range(n_C):
            if k:
                undecided = (torch.round(totals[:, :k] * 1e9).amax(1) < torch.round(folds_of * 1e9))
                pending = pending[undecided[fold_episode[pending]]]
                if not len(pending):
                    break
            def take(t: torch.Tensor) -> torch.Tensor:  # gathering every fold's Gram would copy it
                return t if len(pending) == Q else t[pending]

            start_a, start_b, start_u = take(alpha), take(bias), take(products).clone()
            reach = _path_extrapolation(config.Cs, k)
            if reach == 1.0 and _path_extrapolation(config.Cs, k - 1) == 1.0:
                # three equal steps in log C: the quadratic through the last three solutions
                start_a = 3 * start_a - 3 * take(previous_alpha) + take(older_alpha)
                start_b = 3 * start_b - 3 * take(previous_bias) + take(older_bias)
                start_u = 3 * start_u - 3 * take(previous_products) + take(older_products)
            elif reach:  # continue the path's last move, scaled to this step's length in log C (G alpha too)
                start_a = start_a + reach * (start_a - take(previous_alpha))
                start_b = start_b + reach * (start_b - take(previous_bias))
                start_u += reach * (start_u - take(previous_products))
            if k:
                older_alpha, older_bias, older_products = previous_alpha, previous_bias, previous_products
            previous_alpha, previous_bias, previous_products = alpha.clone(), bias.clone(), products.clone()
            a, b = _kernel_newton_chunked(take(fit_gram), take(fit_signs), take(fit_weights),
                                          Cs[k].expand(len(pending)), start_a, start_b, config, start_u)
            alpha[pending], bias[pending], products[pending] = a, b, start_u
            decision = _matmul(take(held_cross), a.unsqueeze(-1)).squeeze(-1) + b[:, None]
            fold_accuracy = batched_accuracy(decision > 0, take(held_labels), take(held_valid))
            # sum of fold accuracies per (episode, C), as LogisticRegressionCV sums its fold scores
            totals[:, k] = 0.0
            totals[:, k].index_add_(0, fold_episode[pending], fold_accuracy)
        # argmax takes the first maximum; rounding keeps float summation order from breaking a tie
        best = torch.round(totals * 1e9).argmax(1)
        has_cv = torch.zeros(G, dtype=torch.bool, device=device)
        has_cv[fold_episode] = True
        chosen_C = torch.where(has_cv, Cs[best], chosen_C)
    # -- refit on the whole training set and score the test set -------------------------------
    zeros = torch.zeros(G, T, dtype=torch.float64, device=device)
    alpha, bias = _kernel_newton_chunked(gram, y_train.to(torch.float64) * 2 - 1, torch.ones_like(zeros), chosen_C,
                                         zeros, zeros[:, 0], config)
    decision = _matmul(cross, alpha[:, :, None]).squeeze(-1) + bias[:, None]
    auc = batched_auroc(decision, y_test, test_mask)
    acc = batched_accuracy(decision > 0, y_test, test_mask)
    f1 = batched_f1(decision > 0, y_test, test_mask)
    return torch.stack([t.to(torch.float64) for t in (chosen_C, auc, acc, f1)], 1).cpu().numpy()  # _SCORES per episode


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


def _kernel_newton_chunked(gram, signs, weights, C, alpha, b, config: ProbeConfig,
                           products: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernel_newton`` over problems in chunks of about ``config.chunk`` Gram entries; ``products``
    (``G alpha`` of the start, if known) is overwritten with ``G alpha`` of the solutions."""
    per_chunk = max(1, config.chunk // gram.shape[1] ** 2)
    per_chunk = -(-len(gram) // -(-len(gram) // per_chunk))  # equal chunks: no small last one paying full overheads
    alphas, biases = [], []
    for start in range(0, len(gram), per_chunk):
        sl = slice(start, start + per_chunk)
        a, bias, _, _ = kernel_newton(gram[sl], signs[sl], weights[sl], C[sl], alpha[sl], b[sl],
                                      max_iter=config.max_iter, tol=config.tol, reuse=config.reuse,
                                      products=None if products is None else products[sl])
        alphas.append(a)
        biases.append(bias)
    return torch.cat(alphas), torch.cat(biases)
