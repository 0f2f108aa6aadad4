"""Benchmark: the batched linear probe vs a scikit-learn loop on the study's grid.

The grid is the study's: 10 diseases x 5 shot counts (1, 5, 10, 20, 50) x 10 trials = 500 probes,
each with C chosen from {0.01, 0.1, 1, 10, 100} by min(5, n)-fold cross-validation (C = 1 at one
shot), on L2-normalised 2048-d features. Episodes come from the real task sampler on a synthetic
index with the study's pool sizes; features are ReLU-like with a weak per-disease signal, so
AUROCs sit in the study's range rather than at 1.0.

Both sides run in this process on the same episodes and features, with the same thread count:

* batched: ``cxrtune.evaluate.probe.fit_probes`` (torch, float64);
* reference: ``LogisticRegressionCV(Cs, cv=min(5, n), scoring=accuracy)`` per episode
  (``LogisticRegression(C=1)`` at one shot), scikit-learn's defaults otherwise (the study's probe),
  with BLAS limited to ``--sklearn-blas-threads`` (1 by default: on these small problems extra BLAS
  threads make the loop slower, so 1 is the fair setting).

Prints wall times, the ratio, probes/s, and the agreement (mean and max |AUROC difference|, share
of episodes where the chosen C differs). Then times the batched probe alone at 512-d.

    python bench/probe_batched.py --threads 2
    python bench/probe_batched.py --threads 2 --sklearn-episodes 100   # time a subset of the loop
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
    parser.add_argument("--repeats", type=int, default=3,
                        help="batched runs before and again after the loop; the fastest counts, the median is shown")
    parser.add_argument("--device", default="cpu")
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

    config = ProbeConfig(device=args.device)
    x, row_of_id = features(args.dim)
    print(f"grid: {len(episodes)} probes ({args.diseases} diseases x shots 1/5/10/20/50 x {args.trials} trials), "
          f"{args.dim}-d features, {args.threads} threads, device {args.device}")

    fit_probes(x[:, :64], episodes.head(20), row_of_id, config)  # warm-up (allocator, kernels)
    batched_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        batched = fit_probes(x, episodes, row_of_id, config)
        batched_times.append(time.perf_counter() - start)
    t_batched = min(batched_times)

    normalised = x.astype(np.float64)
    normalised /= np.linalg.norm(normalised, axis=1, keepdims=True)
    chosen = np.arange(len(episodes))
    if args.sklearn_episodes and args.sklearn_episodes < len(episodes):
        chosen = np.linspace(0, len(episodes) - 1, args.sklearn_episodes).round().astype(int)
    reference_auc, reference_C = [], []
    limit = threadpool_limits(args.sklearn_blas_threads)  # tiny problems: extra BLAS threads only add overhead
    start = time.perf_counter()
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
        reference_auc.append(roc_auc_score(rec.test_labels, model.decision_function(test)))
        reference_C.append(C)
    t_loop_measured = time.perf_counter() - start
    limit.restore_original_limits()
    t_loop = t_loop_measured * len(episodes) / len(chosen)
    for _ in range(args.repeats):  # again after the loop: the machine's load may have changed
        start = time.perf_counter()
        fit_probes(x, episodes, row_of_id, config)
        batched_times.append(time.perf_counter() - start)
    t_batched = min(batched_times)
    t_batched_median = float(np.median(batched_times))

    diff = np.abs(np.asarray(reference_auc) - batched["auroc"].to_numpy()[chosen])
    c_differs = np.mean(np.asarray(reference_C) != batched["C"].to_numpy()[chosen])
    scaled = "" if len(chosen) == len(episodes) else f" (measured {t_loop_measured:.1f} s on {len(chosen)} episodes, scaled)"
    print(f"scikit-learn loop : {t_loop:8.2f} s   {len(episodes) / t_loop:9.1f} probes/s{scaled}")
    print(f"batched (torch)   : {t_batched:8.2f} s   {len(episodes) / t_batched:9.1f} probes/s   (runs: "
          + ", ".join(f"{t:.2f}" for t in batched_times) + ")")
    print(f"speed-up          : {t_loop / t_batched:8.1f} x   (with the median batched run: "
          f"{t_loop / t_batched_median:.1f} x)")
    print(f"agreement on {len(chosen)} probes: mean |dAUROC| = {diff.mean():.4f}, max = {diff.max():.4f}, "
          f"C differs in {100 * c_differs:.0f} %")
    by_shots = pd.DataFrame({"shots": episodes["shots"].to_numpy()[chosen], "sklearn": reference_auc,
                             "batched": batched["auroc"].to_numpy()[chosen]}).groupby("shots").mean()
    print("mean AUROC by shots (sklearn / batched): "
          + "  ".join(f"{s}: {r.sklearn:.3f}/{r.batched:.3f}" for s, r in by_shots.iterrows()))

    x_small, _ = features(args.small_dim, seed=1)
    small_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fit_probes(x_small, episodes, row_of_id, config)
        small_times.append(time.perf_counter() - start)
    t_small = min(small_times)
    print(f"batched at {args.small_dim}-d : {t_small:8.2f} s   {len(episodes) / t_small:9.1f} probes/s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
