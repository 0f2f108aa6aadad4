"""Batched L2-penalised logistic regression by Newton's method, many small problems at once.

The linear probe (:mod:`cxrtune.evaluate.probe`) solves thousands of tiny problems (a few dozen
samples each); solved one by one, per-call overheads would dominate. Here every problem of a
batch advances together, in sample space (from inner products alone) so that a 2048-d problem
with 80 samples costs 80 x 80 matrices. docs/performance.md explains what makes it fast.
"""

from __future__ import annotations

import numpy as np
import torch

from cxrtune.errors import DataError

LINE_SEARCH_STEPS = torch.tensor([0.5 ** k for k in range(12)], dtype=torch.float64)


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
    steps = LINE_SEARCH_STEPS.to(device=device, dtype=dtype)
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
    steps = LINE_SEARCH_STEPS.to(device=device, dtype=dtype)
    eye = torch.eye(N, dtype=dtype, device=device)
    quadratic_zone = tol ** 0.5 / 10
    # working set
    idx = torch.arange(P, device=device)
    G, s, m, c = gram, signs, weights, C.reshape(P, 1)
    al, bb = alpha.clone(), b.clone()
    if products is not None:
        u = products.clone()
    elif bool(al.any()):
        u = batched_matmul(G, al.unsqueeze(-1)).squeeze(-1)
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
            new_chol = _newton_factor(G if which is None else G[which], cur, eye)
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
        g_vd = batched_matmul(G, torch.stack([v, d], 1).mT)  # (W, N, 2): G v, G d
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
        g_scaled = batched_matmul(G, scaled)
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
        step, f0 = _backtrack(margins, along, ww, wd, dd, c, m, f0, decrement, finished, steps[1:])
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


def _newton_factor(gram: torch.Tensor, curvature: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of ``I + S G S``, ``S = diag(sqrt(curvature))``, one per problem."""
    root = curvature.sqrt()
    system = gram * root[:, :, None]
    system *= root[:, None, :]
    system.diagonal(dim1=1, dim2=2).add_(1.0)  # I + S G S
    factor = batched_cholesky(system)
    if factor is None:  # I + S G S >= I: only rounding on an enormous G gets here
        factor = batched_cholesky(system + 1e-6 * eye)
        if factor is None:
            raise DataError("probe: a Newton system I + S G S is not positive definite even with jitter; "
                            "the inner products of the features are not finite")
    return factor


def _backtrack(margins, along, ww, wd, dd, c, m, f0, decrement, finished, ladder) -> tuple[torch.Tensor, torch.Tensor]:
    """Armijo steps along the Newton directions, and the loss there: 0 for finished problems, else
    the full step if it decreases the loss enough, else the first such step of ``ladder``.

    ``margins`` and ``along`` are the signed margins and their change per unit step, ``ww``, ``wd``,
    ``dd`` the penalty's terms ``w.w``, ``w.dw``, ``dw.dw``, ``f0`` the loss at the current point.
    """
    f_full = 0.5 * (ww + 2 * wd + dd) + c[:, 0] * (m * torch.nn.functional.softplus(-(margins + along))).sum(1)
    step = torch.where(finished, torch.zeros_like(decrement), torch.ones_like(decrement))
    f_next = torch.where(finished, f0, f_full)
    refused = torch.nonzero(~finished & (f_full > f0 - 1e-4 * decrement)).flatten()
    if len(refused):
        trial_margins = margins[refused, None, :] + ladder[None, :, None] * along[refused, None, :]
        trial_w2 = (ww[refused, None] + 2 * ladder[None, :] * wd[refused, None]
                    + ladder[None, :] ** 2 * dd[refused, None])
        f_trial = 0.5 * trial_w2 + c[refused] * (m[refused, None, :]
                                                 * torch.nn.functional.softplus(-trial_margins)).sum(2)
        ok = f_trial <= f0[refused, None] - 1e-4 * ladder[None, :] * decrement[refused, None]
        first_ok = torch.where(ok.any(1), ok.to(torch.int8).argmax(1), torch.full_like(refused, ladder.numel() - 1))
        step[refused] = ladder[first_ok]
        f_next[refused] = f_trial[torch.arange(len(refused), device=margins.device), first_ok]
    return step, f_next


def kernel_newton_chunked(gram, signs, weights, C, alpha, b, *, chunk: int, max_iter: int, tol: float, reuse: float,
                          products: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kernel_newton` over problems in batches of about ``chunk`` Gram entries, so that a
    batch's matrices stay in cache; ``products`` (``G alpha`` of the start, if known) is
    overwritten with ``G alpha`` of the solutions."""
    per_chunk = max(1, chunk // gram.shape[1] ** 2)
    per_chunk = -(-len(gram) // -(-len(gram) // per_chunk))  # equal chunks: no small last one paying full overheads
    alphas, biases = [], []
    for start in range(0, len(gram), per_chunk):
        sl = slice(start, start + per_chunk)
        a, bias, _, _ = kernel_newton(gram[sl], signs[sl], weights[sl], C[sl], alpha[sl], b[sl],
                                      max_iter=max_iter, tol=tol, reuse=reuse,
                                      products=None if products is None else products[sl])
        alphas.append(a)
        biases.append(bias)
    return torch.cat(alphas), torch.cat(biases)


def batched_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched ``a @ b``; on the CPU through numpy, whose matmul costs about a third of ``torch.bmm``
    on these small float64 matrices (per-matrix overhead; ``bench/probe_batched.py --ops``)."""
    if a.device.type == "cpu":
        return torch.from_numpy(np.matmul(a.numpy(), b.numpy()))
    return torch.matmul(a, b)


def batched_cholesky(a: torch.Tensor) -> torch.Tensor | None:
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
