"""The batched linear probe against scikit-learn on the same episodes and features."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from _eval_fixtures import make_episodes, synthetic_features
from cxrtune.errors import DataError, TaskError
from cxrtune.evaluate.logistic import solve_logistic
from cxrtune.evaluate.probe import ProbeConfig, fit_probes

CS = [0.01, 0.1, 1, 10, 100]


def _sklearn_probe(x, rec, row_of_id, **solver):
    """The study's probe, episode by episode: LogisticRegressionCV, C = 1 at one shot."""
    train = x[[row_of_id[i] for i in rec.train_ids]]
    test = x[[row_of_id[i] for i in rec.test_ids]]
    if rec.n == 1:
        model, C = LogisticRegression(C=1.0, **solver).fit(train, rec.train_labels), 1.0
    else:
        model = LogisticRegressionCV(Cs=CS, cv=min(5, int(rec.n)), scoring="accuracy", l1_ratios=(0.0,),
                                     use_legacy_attributes=False, **solver).fit(train, rec.train_labels)
        C = float(np.ravel(model.C_)[0])
    return roc_auc_score(rec.test_labels, model.decision_function(test)), C


@pytest.fixture(scope="module")
def grid():
    index, episodes = make_episodes(n_diseases=4, shots=(1, 5, 10, 20), trials=3)
    features, row_of_id = synthetic_features(index, dim=48, signal=0.3)
    x = features.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return episodes, features, x, row_of_id


def test_solver_matches_sklearn_coefficients_with_padding_and_weights():
    rng = np.random.default_rng(0)
    problems, expected = [], []
    for C in (0.01, 1.0, 100.0):
        n = int(rng.integers(6, 20))
        x = rng.normal(size=(n, 5))
        y = (x[:, 0] + rng.normal(size=n) > 0).astype(int)
        y[:2] = (0, 1)
        model = LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(x, y)
        expected.append(np.r_[model.coef_.ravel(), model.intercept_])
        problems.append((x, y, C))
    N = max(len(p[1]) for p in problems)
    feats = torch.zeros(3, N, 5, dtype=torch.float64)
    labels = torch.zeros(3, N, dtype=torch.long)
    weights = torch.zeros(3, N, dtype=torch.float64)
    for i, (x, y, _) in enumerate(problems):
        feats[i, : len(y)] = torch.from_numpy(x)
        feats[i, len(y):] = 7.0  # padded samples carry weight 0 and must not matter
        labels[i, : len(y)] = torch.from_numpy(y)
        weights[i, : len(y)] = 1
    theta, iterations = solve_logistic(feats, labels, weights, torch.tensor([p[2] for p in problems]))
    for got, want in zip(theta.numpy(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert int(iterations.max()) < 50


def test_batched_probe_agrees_with_the_studys_sklearn_probe(grid):
    """The issue's criterion: mean |AUROC difference| <= 0.01 against LogisticRegressionCV defaults."""
    episodes, features, x, row_of_id = grid
    got = fit_probes(features, episodes, row_of_id, ProbeConfig())
    assert list(got.columns[:4]) == ["disease", "shots", "n", "trial"]
    with warnings.catch_warnings(), threadpool_limits(1):  # tiny BLAS calls: threads only add overhead
        warnings.simplefilter("ignore", ConvergenceWarning)
        reference = [_sklearn_probe(x, rec, row_of_id) for rec in episodes.itertuples()]
    diff = np.abs(got["auroc"].to_numpy() - np.array([r[0] for r in reference]))
    print(f"mean |dAUROC| vs sklearn defaults over {len(diff)} probes: {diff.mean():.5f} (max {diff.max():.5f})")
    assert diff.mean() <= 0.01
    assert got["auroc"].between(0.5, 1.0).mean() > 0.8  # the features carry signal: not a vacuous match


def test_batched_probe_equals_a_fully_converged_sklearn_probe(grid):
    """With scikit-learn run to convergence, the chosen C and the AUROC are the same per episode."""
    episodes, features, x, row_of_id = grid
    part = episodes[episodes["shots"].isin([1, 5, 10])].iloc[::3]
    got = fit_probes(features, part, row_of_id)
    with threadpool_limits(1):
        reference = [_sklearn_probe(x, rec, row_of_id, tol=1e-10, max_iter=10_000) for rec in part.itertuples()]
    np.testing.assert_allclose(got["auroc"], [r[0] for r in reference], atol=1e-9)
    assert got["C"].tolist() == [r[1] for r in reference]
    assert set(got.loc[got["n"] == 1, "C"]) == {1.0}


def test_probe_refuses_nan_features_and_tasks_without_test_positives(grid):
    episodes, features, x, row_of_id = grid
    broken = features.copy()
    nan_row = row_of_id[episodes.iloc[0].train_ids[0]]
    broken[nan_row, 3] = np.nan
    with pytest.raises(DataError, match=rf"1 of \d+ feature rows contain NaN or inf \(rows \[{nan_row}\]"):
        fit_probes(broken, episodes.head(2), row_of_id)  # the row named by its number in the features
    zero = features.copy()
    zero[nan_row] = 0.0
    with pytest.raises(DataError, match=rf"feature rows \[{nan_row}\] are all zero"):
        fit_probes(zero, episodes.head(2), row_of_id)
    uneven = episodes.head(1).copy()
    uneven.at[uneven.index[0], "train_labels"] = list(uneven.iloc[0].train_labels)[:-1]
    with pytest.raises(TaskError, match=r"episode \(disease .*\): \d+ train ids but \d+ train labels"):
        fit_probes(features, uneven, row_of_id)
    bad = episodes.head(1).copy()
    bad.at[bad.index[0], "test_labels"] = [0] * len(bad.iloc[0].test_labels)
    with pytest.raises(TaskError, match="test set has 0 positives"):
        fit_probes(features, bad, row_of_id)
    with pytest.raises(DataError, match="no extracted feature row"):
        fit_probes(features, episodes.head(1), {})


def test_kernel_solver_matches_sklearn_from_inner_products_alone():
    """Several Cs per sample set, padding, singular Gram (duplicate rows, more rows than dims)."""
    from cxrtune.evaluate.logistic import solve_kernel_logistic

    rng = np.random.default_rng(1)
    Cs = [0.01, 1.0, 100.0]
    sets, expected = [], []
    for n in (9, 14):
        x = rng.normal(size=(n, 6))
        x[1] = x[0]  # duplicate row: the Gram matrix is singular
        y = (x[:, 0] + rng.normal(size=n) > 0).astype(int)
        y[:3] = (0, 0, 1)
        sets.append((x, y))
        expected.append([np.r_[m.coef_.ravel(), m.intercept_] for m in
                         (LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(x, y) for C in Cs)])
    N = max(len(y) for _, y in sets)
    gram = torch.zeros(len(sets), N, N, dtype=torch.float64)
    labels = torch.zeros(len(sets), N, dtype=torch.long)
    weights = torch.zeros(len(sets), N, dtype=torch.float64)
    for q, (x, y) in enumerate(sets):
        gram[q, : len(y), : len(y)] = torch.from_numpy(x @ x.T)
        labels[q, : len(y)] = torch.from_numpy(y)
        weights[q, : len(y)] = 1
    # tol tighter than the default: at C = 0.01 the loss is so flat in the intercept that the default
    # stop (half squared Newton decrement <= 1e-10) allows ~1e-4 of intercept error
    alpha, bias, iterations = solve_kernel_logistic(gram, labels, weights, torch.tensor([Cs, Cs], dtype=torch.float64),
                                                    tol=1e-14)
    for q, (x, y) in enumerate(sets):
        for k in range(len(Cs)):
            w = x.T @ alpha[q, k, : len(y)].numpy()
            np.testing.assert_allclose(np.r_[w, float(bias[q, k])], expected[q][k], rtol=1e-5, atol=1e-6)
        assert float(alpha[q, :, len(y):].abs().sum()) == 0.0  # padding stays out of the solution
    assert int(iterations.max()) < 50


def test_probe_results_do_not_depend_on_chunking(grid):
    episodes, features, x, row_of_id = grid
    reference = fit_probes(features, episodes, row_of_id, ProbeConfig())
    other = fit_probes(features, episodes, row_of_id, ProbeConfig(chunk=9_000))  # e.g. 8 folds of 32 samples a batch
    assert other["C"].tolist() == reference["C"].tolist()
    np.testing.assert_allclose(other["auroc"], reference["auroc"], atol=1e-9)


def test_newton_from_a_warm_start_with_hessian_reuse_matches_sklearn():
    """Any starting point, with or without reused factorisations: the same optimum as scikit-learn."""
    from cxrtune.evaluate.logistic import kernel_newton

    rng = np.random.default_rng(2)
    P, N, C = 6, 12, 10.0
    x = rng.normal(size=(P, N, 5))
    y = (x[..., 0] + 0.5 * rng.normal(size=(P, N)) > 0).astype(int)
    y[:, :2] = (0, 1)
    expected = [LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(x[p], y[p]) for p in range(P)]
    gram = torch.from_numpy(x @ x.transpose(0, 2, 1))
    signs = torch.from_numpy(2.0 * y - 1)
    start = torch.from_numpy(rng.normal(size=(P, N)))  # far from the optimum
    solutions = {}
    for reuse in (0.0, 0.5):
        alpha, b, iterations, factorisations = kernel_newton(
            gram, signs, torch.ones(P, N, dtype=torch.float64), torch.full((P,), C, dtype=torch.float64),
            start, torch.zeros(P, dtype=torch.float64), tol=1e-14, reuse=reuse)
        for p in range(P):
            w = x[p].T @ alpha[p].numpy()
            np.testing.assert_allclose(np.r_[w, float(b[p])], np.r_[expected[p].coef_.ravel(), expected[p].intercept_],
                                       rtol=1e-5, atol=1e-6)
        solutions[reuse] = (int(iterations.sum()), int(factorisations.sum()))
    # without reuse every iteration factorises; with it some steps take a kept factorisation
    assert solutions[0.0][1] >= solutions[0.0][0]
    assert solutions[0.5][1] < solutions[0.5][0]


def test_easy_tasks_decided_early_still_choose_the_converged_sklearn_C():
    """Strong features: many folds are perfect at the first C, which ends their C path; exactly sklearn's choice."""
    index, episodes = make_episodes(n_diseases=2, shots=(5, 10), trials=2)
    features, row_of_id = synthetic_features(index, dim=32, signal=3.0)
    x = features.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = fit_probes(features, episodes, row_of_id)
    with threadpool_limits(1):
        reference = [_sklearn_probe(x, rec, row_of_id, tol=1e-10, max_iter=10_000) for rec in episodes.itertuples()]
    assert got["C"].tolist() == [r[1] for r in reference]
    assert (got["C"] == CS[0]).mean() >= 0.5  # most episodes are decided at the first C (perfect folds)
    np.testing.assert_allclose(got["auroc"], [r[0] for r in reference], atol=1e-9)


def test_float32_and_float64_features_give_the_same_probes(grid):
    episodes, features, x, row_of_id = grid
    part = episodes.iloc[::4]
    single = fit_probes(features, part, row_of_id)
    double = fit_probes(features.astype(np.float64), part, row_of_id)
    assert single["C"].tolist() == double["C"].tolist()
    np.testing.assert_allclose(single["auroc"], double["auroc"], atol=1e-9)


def test_probe_device_setting_runs_on_cuda_when_present_and_says_so_when_absent(grid):
    from cxrtune.errors import ConfigError

    episodes, features, x, row_of_id = grid
    part = episodes.iloc[::5]
    on_cpu = fit_probes(features, part, row_of_id, ProbeConfig(device="cpu"))
    if torch.cuda.is_available():
        on_gpu = fit_probes(features, part, row_of_id, ProbeConfig(device="cuda"))
        assert on_gpu["C"].tolist() == on_cpu["C"].tolist()
        np.testing.assert_allclose(on_gpu["auroc"], on_cpu["auroc"], atol=1e-9)
    else:
        with pytest.raises(ConfigError, match="CUDA is not available"):
            fit_probes(features, part, row_of_id, ProbeConfig(device="cuda"))
    automatic = fit_probes(features, part, row_of_id, ProbeConfig(device="auto"))
    assert automatic["C"].tolist() == on_cpu["C"].tolist()
    np.testing.assert_allclose(automatic["auroc"], on_cpu["auroc"], atol=1e-9)


@pytest.mark.parametrize("parallel", ["threads", "processes"])
def test_workers_give_exactly_the_serial_results_and_restore_torch_threads(grid, parallel):
    """Episodes split between threads or forked processes: every C and score as with one worker."""
    episodes, features, x, row_of_id = grid
    from threadpoolctl import threadpool_info

    before = torch.get_num_threads(), [lib["num_threads"] for lib in threadpool_info()]
    serial = fit_probes(features, episodes, row_of_id, ProbeConfig(workers=1))
    for workers in (2, 3):
        threaded = fit_probes(features, episodes, row_of_id, ProbeConfig(workers=workers, parallel=parallel))
        assert (torch.get_num_threads(), [lib["num_threads"] for lib in threadpool_info()]) == before
        assert threaded["C"].tolist() == serial["C"].tolist()
        for column in ("auroc", "accuracy", "f1"):  # bit-identical here; rounding is all that may differ
            np.testing.assert_allclose(threaded[column], serial[column], rtol=0, atol=1e-12, err_msg=column)
    assert serial["C"].nunique() > 1  # the C choice is exercised, not constant


def _fails_in_a_child(parent: int, how: str):
    """A stand-in for fit_episode_group that fails only in a forked worker process."""
    from cxrtune.evaluate import probe_cv

    real = probe_cv.fit_episode_group

    def fit_group(*args, **kwargs):
        if os.getpid() != parent:
            if how == "raise":
                raise TaskError("episode 7 is malformed (raised in the child)")
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
        time.sleep(0.2)  # the workers share a queue of pieces: leave the child some
        return real(*args, **kwargs)

    return fit_group


@pytest.mark.parametrize("how", ["raise", "killed"])
def test_a_failing_worker_process_fails_the_call_clearly_and_leaves_no_process(grid, monkeypatch, how):
    from cxrtune.evaluate import probe_cv

    episodes, features, x, row_of_id = grid
    monkeypatch.setattr(probe_cv, "fit_episode_group", _fails_in_a_child(os.getpid(), how))
    forked, fork = [], os.fork

    def recording_fork():
        pid = fork()
        if pid:
            forked.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", recording_fork)
    config = ProbeConfig(workers=2, parallel="processes")
    if how == "raise":  # the child's own exception, with its traceback as a note
        with pytest.raises(TaskError, match="episode 7 is malformed") as caught:
            fit_probes(features, episodes, row_of_id, config)
        assert any("raised in probe worker process" in note for note in caught.value.__notes__)
    else:
        with pytest.raises(DataError, match=r"ended without a result .*killed.*parallel='threads'"):
            fit_probes(features, episodes, row_of_id, config)
    monkeypatch.undo()
    assert len(forked) == 1
    # the worker process was collected before the call returned: no zombie, and no process left
    with pytest.raises(ChildProcessError):
        os.waitpid(forked[0], os.WNOHANG)
    with pytest.raises(ProcessLookupError):
        os.kill(forked[0], 0)


def test_piece_queue_hands_each_piece_to_exactly_one_worker_process_or_thread():
    """The workers' shared queue: forked processes and threads draw from it at once, every piece
    is taken once, and a slow worker simply takes fewer (the balance of the two cores)."""
    from cxrtune.evaluate.workers import PieceQueue

    n = 400
    with PieceQueue(n) as queue:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # a worker process: takes pieces slowly, reports them
            try:
                taken = []
                for piece in queue:
                    taken.append(piece)
                    time.sleep(0.002)
                os.write(write, np.asarray(taken, dtype=np.int64).tobytes())
            finally:
                os._exit(0)
        os.close(write)
        threads_took: list[list[int]] = [[], []]

        def drain(out: list[int]) -> None:
            out.extend(queue)

        workers = [threading.Thread(target=drain, args=(out,)) for out in threads_took]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        with os.fdopen(read, "rb") as pipe:
            child_took = np.frombuffer(pipe.read(), dtype=np.int64).tolist()
        os.waitpid(pid, 0)
    everything = child_took + threads_took[0] + threads_took[1]
    assert sorted(everything) == list(range(n))  # each piece exactly once
    assert len(child_took) < n / 2  # the slow worker took fewer
    assert all(a < b for a, b in zip(child_took, child_took[1:]))  # in queue order
    from cxrtune.errors import ConfigError

    with pytest.raises(ConfigError, match="20000 pieces of work are too many"):
        PieceQueue(20000)


def test_processes_are_refused_where_fork_is_missing_and_auto_stays_in_threads(grid, monkeypatch):
    from cxrtune.errors import ConfigError
    from cxrtune.evaluate import workers

    with pytest.raises(ConfigError, match="ProbeConfig.parallel = 'bogus'"):
        ProbeConfig(parallel="bogus")
    monkeypatch.setattr(workers.sys, "platform", "darwin")
    with pytest.raises(ConfigError, match="parallel = 'processes' needs os.fork on Linux; this is darwin"):
        workers.use_processes("processes")
    assert workers.use_processes("auto") is False
    monkeypatch.undo()
    assert workers.use_processes("threads") is False
    if sys.platform.startswith("linux"):
        assert workers.use_processes("processes") is True
        # another Python thread running (a Ray worker, a server): auto does not fork
        release = threading.Event()
        other = threading.Thread(target=release.wait)
        other.start()
        try:
            assert workers.use_processes("auto") is False
        finally:
            release.set()
            other.join()
        assert workers.use_processes("auto") is (threading.active_count() == 1)


def test_workers_must_be_a_positive_count():
    from cxrtune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"ProbeConfig.workers = 0 is out of range: use a value >= 1"):
        ProbeConfig(workers=0)
    assert ProbeConfig(workers=None).workers is None  # None: min(2, torch threads)


def test_fold_blocks_by_runs_equal_fancy_indexing():
    from cxrtune.evaluate.probe_cv import _copy_block

    rng = np.random.default_rng(3)
    source = torch.from_numpy(rng.normal(size=(4, 30, 30)))
    few_runs = np.r_[0:5, 9:17, 20:30]  # a stratified fold of sorted labels
    scattered = np.sort(rng.choice(30, 21, replace=False))  # many runs: the gather path
    for rows, columns in ((few_runs, few_runs), (np.r_[5:9, 17:20], few_runs), (scattered, scattered)):
        out = torch.zeros(4, 25, 25, dtype=torch.float64)
        _copy_block(out, source, rows, columns)
        expected = torch.zeros(4, 25, 25, dtype=torch.float64)
        expected[:, : len(rows), : len(columns)] = source[:, rows][:, :, columns]
        assert torch.equal(out, expected)


def test_unordered_Cs_still_choose_the_converged_sklearn_C(grid):
    """The C-path start extrapolates only along increasing Cs; any order gives sklearn's choice."""
    from cxrtune.evaluate.probe_cv import _path_extrapolation

    assert _path_extrapolation(CS, 1) == 0.0 and _path_extrapolation(CS, 2) == pytest.approx(1.0)
    assert _path_extrapolation([1, 10, 1000], 2) == 2.0  # capped
    assert _path_extrapolation([10, 1, 100], 2) == 0.0
    episodes, features, x, row_of_id = grid
    part = episodes[episodes["shots"].isin([5, 10])].iloc[::2]
    Cs = [10.0, 0.1, 100.0, 1.0]
    got = fit_probes(features, part, row_of_id, ProbeConfig(Cs=tuple(Cs)))
    reference = []
    with threadpool_limits(1):
        for rec in part.itertuples():
            train = x[[row_of_id[i] for i in rec.train_ids]]
            test = x[[row_of_id[i] for i in rec.test_ids]]
            model = LogisticRegressionCV(Cs=Cs, cv=min(5, int(rec.n)), scoring="accuracy", l1_ratios=(0.0,),
                                         use_legacy_attributes=False, tol=1e-10, max_iter=10_000
                                         ).fit(train, rec.train_labels)
            reference.append((roc_auc_score(rec.test_labels, model.decision_function(test)),
                              float(np.ravel(model.C_)[0])))
    assert got["C"].tolist() == [r[1] for r in reference]
    np.testing.assert_allclose(got["auroc"], [r[0] for r in reference], atol=1e-9)
