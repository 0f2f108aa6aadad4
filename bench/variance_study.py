"""Does the variance term keep MoCo from collapsing under the study's conditions? Plain MoCo next to
variance weights 1 and 5, same seeds, on the embedded phantom.

The study saw plain MoCo's backbone feature std fall from 0.363 to 0.060 between epochs 50 and 264
on homogeneous chest X-rays with weak augmentations, and kept the variance term (weight 1, on the
raw projections) from then on. This is the closest reproduction two CPU cores afford:

- homogeneous images: the phantom's unlabelled ``pretrain`` subset (one body plan, one exposure
  model), few of them (``--n-pretrain``) seen for many epochs, so that each is revisited often;
- weak augmentations: crops of 80-100 % of the image and nothing else (no flip, rotation, jitter,
  blur or noise), as opposed to the study's final recipe;
- the study's loss and optimiser where they are not a matter of scale: temperature 0.07, SGD with
  momentum 0.9, weight decay 1e-4 on every parameter, gradient clip 3, warmup then cosine; the
  cpu preset's scale otherwise (ResNet18 at 64 px, batch 64, 512-wide projector to 128, key
  momentum 0.99, lr 0.06);
- a queue of half as many keys as there are images (``--queue``, default ``--n-pretrain`` / 2), as
  the study's 65,536 keys were about 0.6 of its 112,120 NIH images: a queue longer than the
  dataset holds several earlier keys of each image, which then serve as its negatives and, once
  the learning rate has decayed and the encoder stops changing, are near copies of its positive
  (with 1,024 images and the cpu preset's 4,096 keys the loss rose over the last eight epochs of
  every run);
- the study's monitors every epoch: mean per-dimension std of the pooled backbone features,
  effective rank and mean pairwise cosine on 512 fixed images (the engine's ``metrics.jsonl``);
- the downstream objective every ``--probe-every`` epochs: the 20-shot linear probe on the same
  episodes for every run (10 per finding, every held-out image in each test set), and the random
  init each seed starts from, on the same episodes.

Each (weight, seed) run is a process of its own with ``--threads`` threads; ``--jobs`` run side by
side. Writes ``<out>/<w>-seed<s>/`` (the engine's run folder, ``probe.parquet``), then
``<out>/summary.json``, ``<out>/summary.md`` (one row per weight: std and rank curves' first, peak
and last values, the final probe against random init and against plain MoCo with 95 % bootstrap
CIs over the findings) and ``<out>/curves.png``.

    python bench/variance_study.py                                  # the figure in docs/performance.md
    python bench/variance_study.py --seeds 0 1 --epochs 60 --jobs 3
    python bench/variance_study.py --summarise bench-runs/variance_study   # tables from finished runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: the study's conditions, as far as two cores allow (see the module docstring)
CONDITIONS = {
    "augment.crop_scale_min": 0.8, "augment.crop_scale_max": 1.0, "augment.crop_ratio_min": 0.9,
    "augment.crop_ratio_max": 1.111, "augment.hflip_p": 0.0, "augment.rotation_deg": 0.0,
    "augment.jitter_p": 0.0, "augment.blur_p": 0.0, "augment.noise_std": 0.0,
    "moco.temperature": 0.07, "optim.optimizer": "sgd", "optim.momentum": 0.9, "optim.weight_decay": 1e-4,
    "optim.exclude_norm_bias_decay": False, "optim.clip_grad_norm": 3.0, "optim.schedule": "cosine",
    "train.monitor_images": 512,
}
METRICS = ("feature_std", "effective_rank", "mean_cosine")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 5.0], help="variance weights (0 = plain MoCo)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--n-pretrain", type=int, default=1024, help="unlabelled phantom images")
    ap.add_argument("--size", type=int, default=64, help="image side for pretraining and probing")
    ap.add_argument("--queue", type=int, default=None, help="MoCo queue length (default: half of --n-pretrain)")
    ap.add_argument("--warmup", type=float, default=2.0, help="warmup epochs")
    ap.add_argument("--probe-every", type=int, default=10, help="epochs between probes (the last epoch is always probed)")
    ap.add_argument("--shots", type=int, default=20)
    ap.add_argument("--trials", type=int, default=10, help="episodes per finding")
    ap.add_argument("--val-pos", type=int, default=60, help="held-out positives per finding")
    ap.add_argument("--jobs", type=int, default=3, help="runs side by side")
    ap.add_argument("--threads", type=int, default=1, help="threads per run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="further engine config override")
    ap.add_argument("--out", default="bench-runs/variance_study")
    ap.add_argument("--summarise", metavar="OUT", help="only write the summary of the runs in OUT")
    ap.add_argument("--one", nargs=2, type=float, metavar=("WEIGHT", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe_every < 1 or args.epochs < 1 or args.jobs < 1 or args.threads < 1:
        ap.error("--epochs, --probe-every, --jobs and --threads must be at least 1")
    if args.queue is None:
        args.queue = max(args.n_pretrain // 2, 1)
    if args.queue < 1:
        ap.error(f"--queue must be at least 1, got {args.queue}")
    if any(w < 0 for w in args.weights):
        ap.error(f"--weights must be >= 0, got {args.weights}")
    return args


def run_name(weight: float, seed: int) -> str:
    return f"w{weight:g}-seed{seed}"


def data(args: argparse.Namespace):
    """The phantom cache and the episodes every run is probed on (sampled once, in ``out``)."""
    from cxrtune.data.cache import get_cache
    from cxrtune.data.sources.base import make_source
    from cxrtune.data.tasks import load_episodes, sample_episodes, save_episodes

    source = make_source("phantom", None, n_pretrain=args.n_pretrain, val_pos=args.val_pos)
    cache = get_cache(source, size=args.size, progress=args.one is None)
    path = Path(args.out) / "episodes.parquet"
    if not path.is_file():
        pool = source.task_pool(cache.index)
        save_episodes(sample_episodes(pool, shots=[args.shots], trials=args.trials, test_negatives="all"), path)
    return cache, load_episodes(path)


def config_for(args: argparse.Namespace, weight: float, seed: int):
    from cxrtune.cli import parse_options
    from cxrtune.profiles import cpu

    return cpu("moco").override({
        **CONDITIONS, "moco.variance_weight": weight, "moco.queue_size": args.queue, "train.seed": seed, "train.image_size": args.size,
        "train.epochs": args.epochs, "optim.warmup_epochs": args.warmup, "train.checkpoint_every": args.probe_every,
        "train.keep_checkpoints": 1, "train.time_limit_minutes": 0.0, **parse_options(args.set, "--set")})


def run_one(args: argparse.Namespace) -> None:
    """One (weight, seed): pretrain, probing every checkpoint; the random init first (epoch 0)."""
    import pandas as pd
    import torch

    from cxrtune.engine.train import pretrain
    from cxrtune.models.backbone import build_backbone
    from cxrtune.resolve import InLoopProbeConfig
    from cxrtune.trial import ProbeJudge, pretrain_rows

    torch.set_num_threads(args.threads)
    weight, seed = args.one[0], int(args.one[1])
    out = Path(args.out) / run_name(weight, seed)
    out.mkdir(parents=True, exist_ok=True)
    cache, episodes = data(args)
    config = config_for(args, weight, seed)
    judge = ProbeJudge(cache, episodes, InLoopProbeConfig(input_size=args.size, crop_fraction=1.0), "cpu")
    tables = []

    def probe(epoch: int, backbone) -> None:
        _, table = judge(backbone)
        table.insert(0, "epoch", epoch)
        tables.append(table)
        print(f"{out.name} epoch {epoch}: probe {table['auroc'].mean():.3f}", flush=True)

    probe(0, build_backbone(config.model.arch, init="random", seed=seed, in_chans=config.model.in_chans))

    def callback(metrics):
        if metrics.get("checkpoint"):
            probe(metrics["epoch"], build_backbone(config.model.arch, init=metrics["checkpoint"]))
        print(f"{out.name} epoch {metrics['epoch']}: loss {metrics['ssl_loss']:.3f} std {metrics['feature_std']:.3f} "
              f"rank {metrics['effective_rank']:.1f}", flush=True)

    started = time.time()
    pretrain(config, cache.images, out / "run", rows=pretrain_rows(cache, "pretrain"), callback=callback,
             resume=False)
    pd.concat(tables, ignore_index=True).to_parquet(out / "probe.parquet")
    (out / "done.json").write_text(json.dumps({"minutes": (time.time() - started) / 60, "threads": args.threads}))


def launch(args: argparse.Namespace) -> None:
    """Every (weight, seed) as its own process, ``--jobs`` at a time."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data(args)  # the cache and the episodes once, before the runs start
    (out / "conditions.json").write_text(json.dumps({
        "conditions": CONDITIONS, "epochs": args.epochs, "n_pretrain": args.n_pretrain, "queue": args.queue,
        "size": args.size, "warmup": args.warmup, "shots": args.shots, "trials": args.trials, "weights": args.weights,
        "seeds": args.seeds, "set": args.set, "threads": args.threads, "jobs": args.jobs}, indent=2))
    passthrough = ["--epochs", str(args.epochs), "--n-pretrain", str(args.n_pretrain), "--queue", str(args.queue),
                   "--size", str(args.size),
                   "--warmup", str(args.warmup), "--probe-every", str(args.probe_every), "--shots", str(args.shots),
                   "--trials", str(args.trials), "--val-pos", str(args.val_pos), "--threads", str(args.threads),
                   "--out", str(out)] + [x for kv in args.set for x in ("--set", kv)]
    pending = [(w, s) for s in args.seeds for w in args.weights]
    running: list[tuple[str, subprocess.Popen]] = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    failed = []
    while pending or running:
        while pending and len(running) < args.jobs:
            weight, seed = pending.pop(0)
            name = run_name(weight, seed)
            (out / name).mkdir(exist_ok=True)
            log = open(out / name / "log.txt", "w")
            cmd = [sys.executable, __file__, "--one", str(weight), str(seed), *passthrough]
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
            print(f"started {name}", flush=True)
        time.sleep(2)
        for item in list(running):
            name, proc = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"{name}: {'done' if proc.returncode == 0 else f'failed ({proc.returncode}), see its log.txt'}",
                      flush=True)
                if proc.returncode:
                    failed.append(name)
    if failed:
        raise SystemExit(f"runs failed: {', '.join(failed)} (logs in {out}/<run>/log.txt)")
    summarise(out)


def load_runs(out: Path) -> dict[tuple[float, int], dict]:
    import pandas as pd

    runs = {}
    for folder in sorted(out.glob("w*-seed*")):
        if not (folder / "done.json").is_file():
            continue
        weight, seed = folder.name[1:].split("-seed")
        metrics = pd.read_json(folder / "run" / "metrics.jsonl", lines=True)
        runs[(float(weight), int(seed))] = {"metrics": metrics, "probe": pd.read_parquet(folder / "probe.parquet"),
                                            "done": json.loads((folder / "done.json").read_text())}
    if not runs:
        raise SystemExit(f"{out} holds no finished runs (folders w<weight>-seed<seed> with done.json)")
    return runs


def summarise(out: Path) -> dict:
    """The summary of the finished runs in ``out``: JSON, Markdown and the curves."""
    import numpy as np
    import pandas as pd

    from cxrtune.evaluate.stats import bootstrap_ci

    runs = load_runs(out)
    weights = sorted({w for w, _ in runs})
    seeds = sorted({s for _, s in runs})

    def per_finding(probe: pd.DataFrame, epoch: int) -> pd.Series:
        return probe[probe["epoch"] == epoch].groupby("disease")["auroc"].mean()

    rows, curves = [], {}
    for weight in weights:
        keys = [(weight, s) for s in seeds if (weight, s) in runs]
        final_epoch = {k: int(runs[k]["probe"]["epoch"].max()) for k in keys}
        ssl = pd.concat([per_finding(runs[k]["probe"], final_epoch[k]) for k in keys], axis=1).mean(axis=1)
        rand = pd.concat([per_finding(runs[k]["probe"], 0) for k in keys], axis=1).mean(axis=1)
        diff = (ssl - rand).to_numpy()
        row = {"weight": weight, "seeds": [s for _, s in keys], "epochs": min(final_epoch.values()),
               "minutes": float(np.mean([runs[k]["done"]["minutes"] for k in keys])),
               "probe": float(ssl.mean()), "random_init": float(rand.mean()),
               "vs_random": float(diff.mean()), "vs_random_ci": list(map(float, bootstrap_ci(diff)))}
        if (0.0, keys[0][1]) in runs and weight != 0.0:
            plain = pd.concat([per_finding(runs[(0.0, s)]["probe"], final_epoch[(weight, s)]) for _, s in keys
                               if (0.0, s) in runs], axis=1).mean(axis=1)
            d = (ssl - plain).to_numpy()
            row["vs_plain"], row["vs_plain_ci"] = float(d.mean()), list(map(float, bootstrap_ci(d)))
        metrics = pd.concat([runs[k]["metrics"] for k in keys]).groupby("epoch")[list(METRICS) + ["ssl_loss"]].mean()
        for name in METRICS:
            series = metrics[name]
            row[name] = {"first": float(series.iloc[0]), "peak": float(series.max()),
                         "peak_epoch": int(series.idxmax()), "last": float(series.iloc[-1])}
        row["ssl_loss"] = {"first": float(metrics["ssl_loss"].iloc[0]), "last": float(metrics["ssl_loss"].iloc[-1])}
        if "variance" in runs[keys[0]]["metrics"]:
            row["variance_term_last"] = float(np.mean([runs[k]["metrics"]["variance"].iloc[-1] for k in keys]))
        probe_curve = pd.concat([r["probe"].groupby("epoch")["auroc"].mean() for k, r in runs.items() if k in keys],
                                axis=1).mean(axis=1)
        curves[weight] = {"metrics": metrics, "probe": probe_curve}
        rows.append(row)
    summary = {"runs": len(runs), "seeds": seeds, "weights": rows,
               "conditions": json.loads((out / "conditions.json").read_text()) if (out / "conditions.json").is_file()
               else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(markdown(rows))
    print(markdown(rows))
    plot(curves, out / "curves.png")
    return summary


def markdown(rows: list[dict]) -> str:
    def ci(value, interval):
        return f"{value:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]"

    lines = ["| variance weight | epochs | feature std: first / peak (epoch) / last | effective rank: first / last "
             "| mean cosine, last | SSL loss first -> last | probe | vs random init [95 % CI] | vs plain MoCo [95 % CI] |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, e = r["feature_std"], r["effective_rank"]
        lines.append(
            f"| {r['weight']:g} | {r['epochs']} | {s['first']:.3f} / {s['peak']:.3f} ({s['peak_epoch']}) / {s['last']:.3f} "
            f"| {e['first']:.1f} / {e['last']:.1f} | {r['mean_cosine']['last']:.3f} "
            f"| {r['ssl_loss']['first']:.3f} -> {r['ssl_loss']['last']:.3f} | {r['probe']:.3f} "
            f"| {ci(r['vs_random'], r['vs_random_ci'])} "
            f"| {ci(r['vs_plain'], r['vs_plain_ci']) if 'vs_plain' in r else ''} |")
    return "\n".join(lines) + "\n"


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for weight, curve in curves.items():
        label = "plain MoCo" if weight == 0 else f"variance weight {weight:g}"
        for ax, name in zip(axes, METRICS):
            ax.plot(curve["metrics"].index, curve["metrics"][name], label=label)
        axes[3].plot(curve["probe"].index, curve["probe"].to_numpy(), marker="o", label=label)
    axes[0].set_yscale("log")  # a weight's early spike would flatten the other curves
    for ax, title in zip(axes, ("backbone feature std (log)", "effective rank", "mean pairwise cosine",
                                "20-shot probe AUROC (epoch 0 = random init)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.summarise:
        summarise(Path(args.summarise))
    elif args.one is not None:
        run_one(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
