"""Benchmark: the batched linear probe vs a scikit-learn loop on the study's grid.

The grid is the study's: 10 diseases x 5 shot counts (1, 5, 10, 20, 50) x 10 trials = 500 probes,
each with C chosen from {0.01, 0.1, 1, 10, 100} by min(5, n)-fold cross-validation (C = 1 at one
shot), on L2-normalised 2048-d features. Episodes come from the real task sampler on a synthetic
index with the study's pool sizes; features are ReLU-like with a weak per-disease signal, so
AUROCs sit in the study's range rather than at 1.0.

Both sides run in this process on the same episodes and features, with the same thread count:

* batched: ``cxrtune.evaluate.probe.fit_probes`` (float64 solves; its default ``workers``, so
  ``min(2, --threads)`` workers that take pieces of the episodes from one queue, each op on one
  thread; its default ``parallel``: forked worker processes on Linux, ``--parallel threads`` for
  threads);
* reference: ``LogisticRegressionCV(Cs, cv=min(5, n), scoring=accuracy)`` per episode
  (``LogisticRegression(C=1)`` at one shot), scikit-learn's defaults otherwise (the study's probe),
  with BLAS limited to ``--sklearn-blas-threads`` (1 by default: on these small problems extra BLAS
  threads make the loop slower, so 1 is the fair setting).

The machine is shared, so the two sides are alternated: each of ``--rounds`` rounds times the
batched grid, the scikit-learn loop, and the batched grid again; a round's ratio is its loop time
over the mean of its two batched times, and the median over rounds is the headline; the CPU-time
ratio (CPU seconds of all threads, each side) is printed too, as other jobs inflate wall times
unevenly. Prints wall
times, the ratios, probes/s, and the agreement (mean and max |AUROC difference|, share of episodes
where the chosen C differs). ``--breakdown`` adds where the batched CPU time goes (one thread);
``--ops`` times the solver's batched Cholesky and small products with torch and with numpy.
Then times the batched probe alone at 512-d.

    python bench/probe_batched.py --threads 2
    python bench/probe_batched.py --threads 2 --sklearn-episodes 100   # time a subset of the loop
    python bench/probe_batched.py --threads 2 --separation 2.5         # harder tasks (AUROC ~0.69 at 50 shots)
    python bench/probe_batched.py --threads 2 --workers 1              # one worker on one core
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both sides")
    parser.add_argument("--sklearn-blas-threads", type=int, default=1,
                        help="BLAS threads during the scikit-learn loop (1 is its fastest setting here)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--small-dim", type=int, default=512)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--diseases", type=int, default=10)
    parser.add_argument("--separation", type=float, default=6.0,
                        help="shift of each label's feature mean along its own unit direction, in noise stds")
    parser.add_argument("--sklearn-episodes", type=int, default=0,
                        help="run the scikit-learn loop on this many episodes (spread over the grid) and "
                             "scale its time to the grid; 0 = all")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternated rounds of (batched, scikit-learn loop, batched); the median ratio counts")
    parser.add_argument("--breakdown", action="store_true", help="also print where the batched CPU time goes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=None,
                        help="ProbeConfig.workers: workers that share the episodes (default: min(2, --threads))")
    parser.add_argument("--parallel", default="auto", choices=("auto", "processes", "threads"),
                        help="ProbeConfig.parallel: how the workers share the CPU")
    parser.add_argument("--ops", action="store_true",
                        help="also time the solver's batched Cholesky and small products, torch against numpy")
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    # On a shared machine, spinning OpenMP workers wait for a descheduled peer at every parallel
    # region (measured 4-10x slower under load); passive waiting removes that artefact.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import warnings

    import numpy as np
    import pandas as pd
    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.metrics import roc_auc_score
    from threadpoolctl import threadpool_limits

    from cxrtune.data.index import validate_index
    from cxrtune.data.tasks import build_task_pool, sample_episodes
    from cxrtune.evaluate.probe import ProbeConfig, fit_probes
    from cxrtune.evaluate.workers import use_processes

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", ConvergenceWarning)
    warnings.simplefilter("ignore", FutureWarning)

    # The study's pools: train/val positives per disease, negatives of every other label.
    pools = [(96, 27), (93, 18), (88, 21), (81, 20), (81, 23), (60, 10), (58, 11), (52, 8), (55, 11), (51, 6)]
    rows = []
    for d in range(args.diseases):
        tr, va = pools[d % len(pools)]
        for split, count in (("train", tr), ("val", va)):
            rows += [{"image_id": f"d{d}-{split}-{i}", "patient_id": f"d{d}-{split}-{i}", "labels": [f"disease{d}"],
                      "view": "PA", "split": split, "path": ""} for i in range(count)]
    for split, count in (("train", 2000), ("val", 600)):
        rows += [{"image_id": f"n-{split}-{i}", "patient_id": f"n-{split}-{i}", "labels": ["normal"],
                  "view": "PA", "split": split, "path": ""} for i in range(count)]
    index = validate_index(pd.DataFrame(rows))
    pool = build_task_pool(index, exclude={"normal"}, min_train=1, min_val=1)
    episodes = sample_episodes(pool, shots=(1, 5, 10, 20, 50), trials=args.trials)

    def features(dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        labels = [l[0] for l in index["labels"]]
        directions = {l: rng.normal(size=dim) for l in sorted(set(labels))}
        directions = {l: v / np.linalg.norm(v) for l, v in directions.items()}
        base = rng.normal(size=dim)
        x = base + rng.normal(size=(len(index), dim)) + args.separation * np.stack([directions[l] for l in labels])
        x = np.maximum(x, 0)
        return x.astype(np.float32), {image_id: i for i, image_id in enumerate(index["image_id"])}

    config = ProbeConfig(device=args.device, workers=args.workers, parallel=args.parallel)
    x, row_of_id = features(args.dim)
    workers = args.workers or min(2, args.threads)
    print(f"grid: {len(episodes)} probes ({args.diseases} diseases x shots 1/5/10/20/50 x {args.trials} trials), "
          f"{args.dim}-d features, {args.threads} threads, {workers} probe workers "
          f"({'processes' if workers > 1 and use_processes(args.parallel) else 'threads'}), device {args.device}")

    fit_probes(x[:, :64], episodes.head(20), row_of_id, config)  # warm-up (allocator, kernels)
    normalised = x.astype(np.float64)
    normalised /= np.linalg.norm(normalised, axis=1, keepdims=True)
    chosen = np.arange(len(episodes))
    if args.sklearn_episodes and args.sklearn_episodes < len(episodes):
        chosen = np.linspace(0, len(episodes) - 1, args.sklearn_episodes).round().astype(int)

    def cpu_seconds() -> float:
        """CPU seconds of this process and of its collected children (the probe's forked workers, joined
        before fit_probes returns)."""
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def batched_run():
        start, cpu = time.perf_counter(), cpu_seconds()
        result = fit_probes(x, episodes, row_of_id, config)
        elapsed = time.perf_counter() - start
        return elapsed, cpu_seconds() - cpu, result

    def sklearn_loop():
        aucs, Cs = [], []
        limit = threadpool_limits(args.sklearn_blas_threads)  # tiny problems: extra BLAS threads only add overhead
        start, cpu = time.perf_counter(), cpu_seconds()
        for i in chosen:
            rec = episodes.iloc[i]
            train = normalised[[row_of_id[j] for j in rec.train_ids]]
            test = normalised[[row_of_id[j] for j in rec.test_ids]]
            if rec.n == 1:
                model = LogisticRegression(C=1.0).fit(train, rec.train_labels)
                C = 1.0
            else:
                model = LogisticRegressionCV(Cs=[0.01, 0.1, 1, 10, 100], cv=min(5, int(rec.n)), scoring="accuracy",
                                             l1_ratios=(0.0,), use_legacy_attributes=False).fit(train, rec.train_labels)
                C = float(np.ravel(model.C_)[0])
            aucs.append(roc_auc_score(rec.test_labels, model.decision_function(test)))
            Cs.append(C)
        elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        limit.restore_original_limits()
        scale = len(episodes) / len(chosen)
        return elapsed * scale, cpu * scale, elapsed, aucs, Cs

    rounds, cpu_ratios = [], []
    for r in range(args.rounds):
        t_before, cpu_before, batched = batched_run()
        t_loop, cpu_loop, t_loop_measured, reference_auc, reference_C = sklearn_loop()
        t_after, cpu_after, _ = batched_run()
        rounds.append((t_loop, t_before, t_after))
        cpu_ratios.append(cpu_loop / ((cpu_before + cpu_after) / 2))
        print(f"round {r + 1}: scikit-learn loop {t_loop:7.2f} s, batched {t_before:.2f} / {t_after:.2f} s, "
              f"ratio {t_loop / ((t_before + t_after) / 2):.1f} x   (CPU seconds: loop {cpu_loop:.1f}, batched "
              f"{cpu_before:.2f} / {cpu_after:.2f}, ratio {cpu_ratios[-1]:.1f} x)", flush=True)
    ratios = [loop / ((a + b) / 2) for loop, a, b in rounds]
    batched_times = [t for _, a, b in rounds for t in (a, b)]
    t_loop = float(np.median([loop for loop, _, _ in rounds]))
    t_batched = float(np.median(batched_times))
    diff = np.abs(np.asarray(reference_auc) - batched["auroc"].to_numpy()[chosen])
    c_differs = np.mean(np.asarray(reference_C) != batched["C"].to_numpy()[chosen])
    scaled = "" if len(chosen) == len(episodes) else f" (last round measured {t_loop_measured:.1f} s on {len(chosen)} episodes, scaled)"
    print(f"scikit-learn loop : {t_loop:8.2f} s   {len(episodes) / t_loop:9.1f} probes/s   (median of rounds){scaled}")
    print(f"batched (torch)   : {t_batched:8.2f} s   {len(episodes) / t_batched:9.1f} probes/s   (median of runs: "
          + ", ".join(f"{t:.2f}" for t in batched_times) + ")")
    print(f"speed-up          : {np.median(ratios):8.1f} x   median of the rounds' ratios "
          f"({', '.join(f'{q:.1f}' for q in ratios)}); fastest batched run: {t_loop / min(batched_times):.1f} x")
    print(f"CPU-time ratio    : {np.median(cpu_ratios):8.1f} x   (CPU seconds of all threads; less sensitive to a loaded machine)")
    print(f"agreement on {len(chosen)} probes: mean |dAUROC| = {diff.mean():.4f}, max = {diff.max():.4f}, "
          f"C differs in {100 * c_differs:.0f} %")
    by_shots = pd.DataFrame({"shots": episodes["shots"].to_numpy()[chosen], "sklearn": reference_auc,
                             "batched": batched["auroc"].to_numpy()[chosen]}).groupby("shots").mean()
    print("mean AUROC by shots (sklearn / batched): "
          + "  ".join(f"{s}: {r.sklearn:.3f}/{r.batched:.3f}" for s, r in by_shots.iterrows()))

    if args.breakdown:
        breakdown(fit_probes, x, episodes, row_of_id, config, args.threads)
    if args.ops:
        solver_ops(args.rounds)
    x_small, _ = features(args.small_dim, seed=1)
    small_times = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        fit_probes(x_small, episodes, row_of_id, config)
        small_times.append(time.perf_counter() - start)
    t_small = float(np.median(small_times))
    print(f"batched at {args.small_dim}-d : {t_small:8.2f} s   {len(episodes) / t_small:9.1f} probes/s   (median of "
          + ", ".join(f"{t:.2f}" for t in small_times) + ")")
    sys.stdout.flush()


def breakdown(fit_probes, x, episodes, row_of_id, config, threads: int) -> None:
    """CPU seconds (one thread, so that the shares add up) of the batched grid by stage."""
    import dataclasses

    import torch

    from cxrtune.evaluate import logistic

    spent: dict[str, float] = {}
    wrapped = {"kernel_newton": logistic.kernel_newton, "cholesky": logistic.batched_cholesky,
               "matmul": logistic.batched_matmul,
               "triangular solves": torch.linalg.solve_triangular}

    def timed(name, f, key=None):
        def call(*a, **k):
            start = time.process_time()
            out = f(*a, **k)
            label = key(*a) if key else name
            spent[label] = spent.get(label, 0.0) + time.process_time() - start
            return out
        return call

    logistic.kernel_newton = timed("solver", wrapped["kernel_newton"], key=lambda g, *a: f"solver, {g.shape[1]} samples")
    logistic.batched_cholesky = timed("cholesky", wrapped["cholesky"])
    logistic.batched_matmul = timed("small products", wrapped["matmul"])
    torch.linalg.solve_triangular = timed("triangular solves", wrapped["triangular solves"])
    torch.set_num_threads(1)
    try:
        start = time.process_time()
        fit_probes(x, episodes, row_of_id, dataclasses.replace(config, workers=1))
        total = time.process_time() - start
    finally:
        logistic.kernel_newton = wrapped["kernel_newton"]
        logistic.batched_cholesky = wrapped["cholesky"]
        logistic.batched_matmul = wrapped["matmul"]
        torch.linalg.solve_triangular = wrapped["triangular solves"]
        torch.set_num_threads(threads)
    solver = sum(v for k, v in spent.items() if k.startswith("solver"))
    print(f"CPU breakdown, one thread: total {total:.2f} s; Newton solves {solver:.2f} s ("
          + ", ".join(f"{k.split(', ')[1]}: {v:.2f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1])
                      if k.startswith("solver")) + f"), of which Cholesky {spent.get('cholesky', 0):.2f} s and "
          f"triangular solves {spent.get('triangular solves', 0):.2f} s; small products (solver and scoring) "
          f"{spent.get('small products', 0):.2f} s; inner products, fold set-up, scoring and checks "
          f"{total - solver:.2f} s")


def solver_ops(rounds: int) -> None:
    """The solver's batched Cholesky and small products at the 50-shot fold shape, torch against numpy."""
    import numpy as np
    import torch

    problems, n = 81, 80  # one chunk of 50-shot cross-validation problems (ProbeConfig.chunk)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(problems, n, 256))
    system = rows @ rows.transpose(0, 2, 1) / 256 + np.eye(n)
    rhs = rng.normal(size=(problems, n, 2))
    t_system, t_rhs_rows = torch.from_numpy(system), torch.from_numpy(rhs.transpose(0, 2, 1).copy())

    def per_call(f, repeats=50):
        f()
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(repeats):
                f()
            best = min(best, (time.perf_counter() - start) / repeats)
        return best * 1e3

    cases = [("Cholesky", lambda: torch.linalg.cholesky_ex(t_system), lambda: np.linalg.cholesky(system)),
             # torch's faster layout for the right-hand sides: (problems, 2, N) passed transposed
             ("products G @ (N, 2)", lambda: torch.bmm(t_system, t_rhs_rows.mT), lambda: np.matmul(system, rhs))]
    for name, with_torch, with_numpy in cases:
        a, b = per_call(with_torch), per_call(with_numpy)
        print(f"{name:20s}: torch {a:.3f} ms, numpy {b:.3f} ms per {problems} problems of {n} samples, "
              f"numpy {a / b:.1f} x faster (one thread, best of {rounds})")


if __name__ == "__main__":
    main()
