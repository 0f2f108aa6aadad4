"""Does SSL on the phantom beat random init? The engine's science benchmark on 2 CPU cores.

Pretrains one method (default: MoCo v2 with the variance term, the engine's ``cpu`` profile at
64 px) on the phantom's unlabelled ``pretrain`` subset for at most ``--minutes``, then probes the
final backbone and the random-init ResNet18 it started from on the same few-shot episodes
(20 shots by default, 10 trials per finding, logistic probe with C by cross-validation). The test
set of every episode is all held-out labelled images: every validation positive of the finding
against every other validation image (normal, or with another finding), so small gains resolve.

Prints both means, the paired difference (SSL - random) with its 95 % bootstrap CI over the
per-finding mean differences (the statistic the sweeps report), and the per-finding table; writes
the tidy results next to the run (``<out>/results.parquet``).

    python bench/ssl_vs_random.py --minutes 50 --epochs 26   # the figure in docs/performance.md
    python bench/ssl_vs_random.py --minutes 2 --n-pretrain 2000   # a quick look
    python bench/ssl_vs_random.py --combine bench-runs/ssl_vs_random_seed1 bench-runs/ssl_vs_random_seed2

``--combine`` runs nothing: it reads the results of earlier runs (other seeds of the same
benchmark) and prints each run's difference and the seeds' average, finding by finding, with its
95 % bootstrap CI over the findings. ``--reprobe`` probes the final backbones of earlier runs, and
the random init each started from, again on their own episodes, with the images rendered at
``--probe-size`` (e.g. backbones pretrained at 64 px, probed on 128 px images):

    python bench/ssl_vs_random.py --reprobe bench-runs/ssl_vs_random_seed1 --probe-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import pandas as pd  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from cxrtune.methods import method_names

    ap.add_argument("--method", default="moco", choices=method_names())
    ap.add_argument("--minutes", type=float, default=50.0, help="pretraining time limit")
    ap.add_argument("--epochs", type=int, default=26, help="epochs: the cosine schedule spans them (26 fit 50 minutes at 64 px on 2 cores)")
    ap.add_argument("--size", type=int, default=64, help="image side for pretraining and probing")
    ap.add_argument("--n-pretrain", type=int, default=10000, help="unlabelled phantom images")
    ap.add_argument("--val-pos", type=int, default=60, help="held-out positives per finding")
    ap.add_argument("--shots", type=int, nargs="+", default=[20])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="engine config override")
    ap.add_argument("--out", default="bench-runs/ssl_vs_random")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--combine", nargs="+", metavar="RUN_DIR",
                    help="only combine the results.parquet of these earlier runs (seeds); no pretraining")
    ap.add_argument("--reprobe", nargs="+", metavar="RUN_DIR",
                    help="only probe the final backbones of these earlier runs again, at --probe-size")
    ap.add_argument("--probe-size", type=int, default=None, help="image side for --reprobe (default: --size)")
    args = ap.parse_args()
    if args.combine:
        combine([Path(d) for d in args.combine])
        return
    if args.reprobe:
        reprobe([Path(d) for d in args.reprobe], args)
        return
    torch.set_num_threads(args.threads)

    from cxrtune.cli import parse_options
    from cxrtune.data.cache import get_cache
    from cxrtune.data.sources.base import make_source
    from cxrtune.data.tasks import sample_episodes, save_episodes
    from cxrtune.profiles import cpu
    from cxrtune.engine.train import pretrain
    from cxrtune.evaluate.stats import bootstrap_ci
    from cxrtune.models.backbone import build_backbone
    from cxrtune.trial import pretrain_rows

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = make_source("phantom", None, n_pretrain=args.n_pretrain, val_pos=args.val_pos)
    cache = get_cache(source, size=args.size, progress=True)
    pool = source.task_pool(cache.index)
    episodes = sample_episodes(pool, shots=args.shots, trials=args.trials, test_negatives="all")
    n_test = episodes.groupby("disease")["test_labels"].first().map(lambda y: (sum(y), len(y) - sum(y)))
    print(f"data: {len(cache)} images at {cache.size} px; test set per finding (pos, neg): {n_test.iloc[0]}")

    config = cpu(args.method).override({
        "train.image_size": args.size, "train.epochs": args.epochs, "train.time_limit_minutes": args.minutes,
        "train.checkpoint_every": 5, **parse_options(args.set, "--set")})
    rows = pretrain_rows(cache, "pretrain")
    random_init = build_backbone(config.model.arch, init="random", seed=config.train.seed,
                                 in_chans=config.model.in_chans)
    started = time.time()
    result = pretrain(config, cache.images, out / "run", rows=rows, progress=True)
    minutes = (time.time() - started) / 60

    save_episodes(episodes, out / "episodes.parquet")
    results = probe_pair(cache, episodes, out / "episodes.parquet", args.size, result.backbone, random_init)
    results.to_parquet(out / "results.parquet")

    per = results.groupby(["backbone", "shots", "disease"])["auroc"].mean().unstack("backbone")
    lines = [f"{args.method}: {result.epochs_completed} epochs in {minutes:.1f} min on {args.threads} threads, "
             f"{len(rows)} pretraining images at {args.size} px"]
    summary = {"method": args.method, "minutes": minutes, "epochs": result.epochs_completed, "shots": {}}
    for shots, part in per.groupby(level="shots"):
        diff = (part["ssl"] - part["random"]).to_numpy()
        low, high = bootstrap_ci(diff)
        lines.append(f"{shots} shots: SSL {part['ssl'].mean():.3f}  random init {part['random'].mean():.3f}  "
                     f"difference {diff.mean():+.3f} [95 % CI {low:+.3f}, {high:+.3f}] over {len(diff)} findings")
        summary["shots"][int(shots)] = {"ssl": float(part["ssl"].mean()), "random": float(part["random"].mean()),
                                        "diff": float(diff.mean()), "ci": [float(low), float(high)]}
    print(per.round(3).to_string())
    print("\n".join(lines))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def probe_pair(cache, episodes: pd.DataFrame, episodes_path: Path, size: int, ssl, random_init) -> pd.DataFrame:
    """The tidy probe results of the SSL backbone and its random init on ``episodes`` (a
    ``backbone`` column tells them apart), through the sweeps' own judge: the same rows,
    preprocessing (the whole cached image at ``size``) and probe."""
    from cxrtune.resolve import InLoopProbeConfig
    from cxrtune.trial import ProbeJudge

    judge = ProbeJudge(cache, episodes, InLoopProbeConfig(input_size=size, crop_fraction=1.0), "cpu")
    tables = []
    for name, model in (("ssl", ssl), ("random", random_init)):
        _, table = judge(model)
        table.insert(0, "backbone", name)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def finding_differences(results: pd.DataFrame) -> pd.Series:
    """SSL - random mean AUROC per (shots, finding) of one run's results."""
    per = results.groupby(["shots", "disease", "backbone"])["auroc"].mean().unstack("backbone")
    return per["ssl"] - per["random"]


def report(diffs: dict[str, pd.Series]) -> None:
    """Each run's difference and the runs' average, finding by finding, with 95 % bootstrap CIs
    over the findings."""
    from cxrtune.evaluate.stats import bootstrap_ci

    table = pd.DataFrame(diffs)
    if table.isna().any().any():
        raise SystemExit("the runs do not share their (shots, finding) cells; combine runs of one protocol")
    table["mean"] = table.mean(axis=1)
    print(table.round(3).to_string())
    for shots, part in table.groupby(level="shots"):
        for name in table.columns:
            low, high = bootstrap_ci(part[name].to_numpy())
            label = f"average of {len(diffs)} runs" if name == "mean" else name
            print(f"{shots} shots, {label}: difference {part[name].mean():+.3f} "
                  f"[95 % CI {low:+.3f}, {high:+.3f}] over {len(part)} findings")


def combine(runs: list[Path]) -> None:
    """Each run's SSL - random difference per finding, and their average over the runs (seeds)."""
    missing = [str(run / "results.parquet") for run in runs if not (run / "results.parquet").is_file()]
    if missing:
        raise SystemExit(f"--combine: {', '.join(missing)} does not exist; give run folders written by this benchmark")
    report({run.name: finding_differences(pd.read_parquet(run / "results.parquet")) for run in runs})


def reprobe(runs: list[Path], args: argparse.Namespace) -> None:
    """The final backbone of each run and its random init, probed on the run's episodes at --probe-size."""
    from cxrtune.data.cache import get_cache
    from cxrtune.data.sources.base import make_source
    from cxrtune.data.tasks import load_episodes
    from cxrtune.models.backbone import build_backbone

    needed = ("run/checkpoints/epoch-*.pt", "run/config.json", "episodes.parquet")
    for run in runs:  # before the (slow) cache build
        absent = [name for name in needed if not any(run.glob(name))]
        if absent:
            raise SystemExit(f"--reprobe: {run} holds no {', '.join(absent)}; give run folders written by this benchmark")
    torch.set_num_threads(args.threads)
    size = args.probe_size or args.size
    source = make_source("phantom", None, n_pretrain=args.n_pretrain, val_pos=args.val_pos)
    cache = get_cache(source, size=size, progress=True)
    diffs = {}
    for run in runs:
        final = sorted((run / "run" / "checkpoints").glob("epoch-*.pt"))[-1]
        config = json.loads((run / "run" / "config.json").read_text())
        random_init = build_backbone(config["model.arch"], init="random", seed=config["train.seed"],
                                     in_chans=config["model.in_chans"])
        results = probe_pair(cache, load_episodes(run / "episodes.parquet"), run / "episodes.parquet", size,
                             build_backbone(config["model.arch"], init=str(final)), random_init)
        means = results.groupby(["backbone", "disease"])["auroc"].mean().groupby("backbone").mean()
        print(f"{run.name} ({final.name}) probed at {size} px: SSL {means['ssl']:.3f}  random init {means['random']:.3f}",
              flush=True)
        diffs[f"{run.name} at {size} px"] = finding_differences(results)
    report(diffs)


if __name__ == "__main__":
    main()
