"""Do short trials rank settings as long ones do? Rung objectives against final objectives, on 2 CPU cores.

Trains ``--settings`` MoCo v2 + variance settings, spread over the ``moco_variance`` sweep's space
(variance weight, temperature, learning rate; a seeded Latin hypercube), each to the full budget
without pruning, twice: once with warmup + cosine over the full budget (a rung judges the run
mid-schedule), once with warmup-stable-decay, whose rungs are judged on cooldown branches
(``optim.schedule=wsd``). At every rung of ASHA with grace ``--grace`` and reduction ``--eta`` the
trial's backbone is probed on the same validation episodes as a sweep would (linear probes,
mean AUROC at ``--shots`` shots over the findings).

Prints, per schedule: Spearman's rho between each rung's objective and the final one (95 %
bootstrap CI over the settings); what successive halving with that grace and reduction keeps,
whether it keeps the final winner, its regret and its share of the full grid's compute; and both
schedules' final objectives side by side. Writes ``<out>/curves.csv`` and ``<out>/summary.json``.

Runs are resumable: a finished run is skipped and an interrupted one continues from its last
checkpoint, so the same command picks up where it stopped.

    python bench/rung_fidelity.py                       # the figures in docs/performance.md
    python bench/rung_fidelity.py --settings 3 --epochs 3 --n-pretrain 300 --size 32 --out /tmp/rf  # a look
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

#: the moco_variance sweep's space: (key, low, high, log scale)
SPACE = (("moco.variance_weight", 0.0, 2.0, False), ("moco.temperature", 0.03, 0.3, True),
         ("optim.lr", 0.005, 0.2, True))
SCHEDULES = ("cosine", "wsd")


def settings(count: int, seed: int) -> list[dict[str, float]]:
    """``count`` points of a seeded Latin hypercube over :data:`SPACE`."""
    from scipy.stats import qmc

    unit = qmc.LatinHypercube(d=len(SPACE), seed=seed).random(count)
    points = []
    for u in unit:
        point = {}
        for (key, low, high, log), x in zip(SPACE, u):
            point[key] = (float(np.exp(np.log(low) + x * (np.log(high) - np.log(low)))) if log
                          else low + x * (high - low))
        points.append({k: float(f"{v:.4g}") for k, v in point.items()})
    return points


def run_one(task: dict) -> dict:
    """Train one (setting, schedule) to the full budget, probing at every rung; returns its curve."""
    import torch

    torch.set_num_threads(1)
    from cxrtune.data.cache import ImageCache
    from cxrtune.data.tasks import load_episodes
    from cxrtune.engine.train import pretrain
    from cxrtune.errors import DivergenceError
    from cxrtune.models.backbone import load_backbone
    from cxrtune.profiles import cpu
    from cxrtune.resolve import InLoopProbeConfig
    from cxrtune.trial import ProbeJudge

    run_dir = Path(task["run_dir"])
    done_file = run_dir / "curve.json"
    if done_file.is_file():
        return json.loads(done_file.read_text())
    cache = ImageCache.open(task["cache"])
    judge = ProbeJudge(cache, load_episodes(task["episodes"]),
                       InLoopProbeConfig(input_size=task["size"], crop_fraction=1.0), "cpu")
    metric = f"probe_auroc_{task['shots']}shot"
    config = cpu("moco").override({
        "train.image_size": task["size"], "train.epochs": task["epochs"], "train.time_limit_minutes": 0.0,
        "train.checkpoint_every": task["epochs"], "train.checkpoint_epochs": tuple(task["rungs"]),
        "train.keep_checkpoints": 1, "train.monitor_images": 128, "optim.warmup_epochs": task["warmup"],
        "optim.schedule": task["schedule"], "optim.cooldown_fraction": task["cooldown_fraction"],
        **task["setting"]})
    partial = run_dir / "curve.partial.json"
    curve = json.loads(partial.read_text()) if partial.is_file() else {}
    started = time.perf_counter()

    def on_epoch(metrics: dict) -> None:
        if metrics.get("checkpoint"):
            scores, _ = judge(load_backbone(metrics["checkpoint"]))
            curve[str(metrics["epoch"])] = {"objective": scores[metric], "ssl_loss": metrics["ssl_loss"],
                                            "cooldown_steps": metrics.get("cooldown_steps", 0)}
            partial.write_text(json.dumps(curve))

    status = "completed"
    try:
        pretrain(config, cache.images, run_dir / "run", rows=np.asarray(task["rows"]), callback=on_epoch)
    except DivergenceError as exc:
        status = f"diverged: {exc}"
    out = {"setting": task["setting"], "schedule": task["schedule"], "status": status, "curve": curve,
           "minutes": (time.perf_counter() - started) / 60}
    done_file.write_text(json.dumps(out))
    print(f"{task['schedule']:>6} {task['setting']}: {status}, "
          + ", ".join(f"e{e} {v['objective']:.3f}" for e, v in sorted(curve.items(), key=lambda kv: int(kv[0])))
          + f" ({out['minutes']:.1f} min)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", type=int, default=6, help="settings of the Latin hypercube")
    ap.add_argument("--epochs", type=int, default=9, help="the full budget, epochs (the last rung)")
    ap.add_argument("--grace", type=int, default=1, help="ASHA's grace period, epochs")
    ap.add_argument("--eta", type=int, default=3, help="ASHA's reduction factor")
    ap.add_argument("--warmup", type=float, default=1.0, help="warmup epochs (both schedules)")
    ap.add_argument("--cooldown-fraction", type=float, default=0.2,
                    help="wsd: cooldown branch, share of the steps done")
    ap.add_argument("--size", type=int, default=64, help="image side for pretraining and probing")
    ap.add_argument("--n-pretrain", type=int, default=3000, help="unlabelled phantom images")
    ap.add_argument("--val-pos", type=int, default=60, help="held-out positives per finding")
    ap.add_argument("--shots", type=int, default=20)
    ap.add_argument("--trials", type=int, default=5, help="episodes per finding")
    ap.add_argument("--workers", type=int, default=2, help="runs side by side, one thread each")
    ap.add_argument("--seed", type=int, default=0, help="seed of the Latin hypercube and the episodes")
    ap.add_argument("--out", default="bench-runs/rung_fidelity")
    args = ap.parse_args()

    from cxrtune.analysis.fidelity import rungs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = rungs(args.grace, args.eta, args.epochs)
    cache, episodes, rows = prepare_data(args, out)
    points = settings(args.settings, args.seed)
    tasks = [{"setting": p, "schedule": s, "run_dir": str(out / "runs" / f"s{i}_{s}"), "cache": cache,
              "episodes": episodes, "rows": rows, "size": args.size, "epochs": args.epochs, "rungs": steps,
              "warmup": args.warmup, "cooldown_fraction": args.cooldown_fraction, "shots": args.shots}
             for i, p in enumerate(points) for s in SCHEDULES]
    print(f"{len(points)} settings x {len(SCHEDULES)} schedules, {args.epochs} epochs of {len(rows)} images at "
          f"{args.size} px, rungs {steps}, {args.workers} workers of one thread", flush=True)
    started = time.perf_counter()
    if args.workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(run_one, tasks, chunksize=1)
    else:
        results = [run_one(t) for t in tasks]
    summarise(results, points, steps, args, (time.perf_counter() - started) / 60, out, random_init_objective(tasks[0]))


def random_init_objective(task: dict) -> float:
    """The objective of the random init every run starts from, on the same episodes."""
    from cxrtune.data.cache import ImageCache
    from cxrtune.data.tasks import load_episodes
    from cxrtune.models.backbone import build_backbone
    from cxrtune.profiles import cpu
    from cxrtune.resolve import InLoopProbeConfig
    from cxrtune.trial import ProbeJudge

    model, seed = cpu("moco").model, cpu("moco").train.seed
    judge = ProbeJudge(ImageCache.open(task["cache"]), load_episodes(task["episodes"]),
                       InLoopProbeConfig(input_size=task["size"], crop_fraction=1.0), "cpu")
    scores, _ = judge(build_backbone(model.arch, init="random", seed=seed, in_chans=model.in_chans))
    return scores[f"probe_auroc_{task['shots']}shot"]


def prepare_data(args, out: Path) -> tuple[str, str, list[int]]:
    from cxrtune.data.cache import get_cache
    from cxrtune.data.sources.base import make_source
    from cxrtune.data.tasks import sample_episodes, save_episodes
    from cxrtune.trial import pretrain_rows

    source = make_source("phantom", None, n_pretrain=args.n_pretrain, val_pos=args.val_pos)
    cache = get_cache(source, size=args.size, progress=False)
    path = out / "episodes.parquet"
    if not path.is_file():
        episodes = sample_episodes(source.task_pool(cache.index), shots=[args.shots], trials=args.trials,
                                   test_negatives="all", seed_base=42 + args.seed)
        save_episodes(episodes, path)
    return str(cache.path), str(path), [int(r) for r in pretrain_rows(cache, "pretrain")]


def summarise(results: list[dict], points: list[dict], steps: list[int], args, minutes: float, out: Path,
              random_init: float) -> None:
    from cxrtune.analysis.fidelity import rung_correlations, successive_halving

    records = [{"setting": i // len(SCHEDULES), "schedule": r["schedule"], "epoch": int(e), **v}
               for i, r in enumerate(results) if r["status"] == "completed" for e, v in r["curve"].items()]
    curves = pd.DataFrame(records)
    curves.to_csv(out / "curves.csv", index=False)
    diverged = [(i // len(SCHEDULES), r["schedule"]) for i, r in enumerate(results) if r["status"] != "completed"]
    summary: dict = {"args": vars(args), "settings": points, "rungs": steps, "minutes": minutes,
                     "diverged": diverged, "random_init": random_init, "schedules": {}}
    print(f"\n{minutes:.1f} min; diverged: {diverged or 'none'}; random init on these episodes: {random_init:.4f}")
    finals = {}
    for schedule in SCHEDULES:
        part = curves[curves["schedule"] == schedule].rename(columns={"setting": "trial"})
        if part.empty:
            continue
        table = rung_correlations(part, steps[:-1], seed=args.seed)
        cost = (lambda rung: args.cooldown_fraction * rung) if schedule == "wsd" else None
        halving = successive_halving(part, args.grace, args.eta, judge_cost=cost)
        finals[schedule] = part[part["epoch"] == steps[-1]].set_index("trial")["objective"]
        print(f"\n{schedule}: Spearman of rung vs final objective ({table['trials'].max()} settings)")
        print(table.round(3).to_string(index=False))
        print(f"successive halving (grace {args.grace}, eta {args.eta}): kept {halving.kept}; pick {halving.pick}, "
              f"best {halving.best}, kept the winner: {halving.kept_best}, regret {halving.regret:.4f}, "
              f"{halving.epochs_spent:.1f}/{halving.epochs_full} epochs ({halving.compute_share:.0%} of the grid)")
        summary["schedules"][schedule] = {
            "correlations": table.to_dict(orient="records"),
            "halving": {"kept": {str(k): v for k, v in halving.kept.items()}, "pick": int(halving.pick),
                        "best": int(halving.best), "kept_best": bool(halving.kept_best),
                        "regret": halving.regret, "epochs_spent": halving.epochs_spent,
                        "epochs_full": halving.epochs_full}}
    if finals:
        side = pd.DataFrame(finals)
        side.index.name = "setting"
        side = side.join(pd.DataFrame(points).rename_axis("setting"))
        print("\nfinal objectives\n" + side.round(4).to_string())
        if len(finals) == 2:
            diff = (side["wsd"] - side["cosine"]).dropna()
            print(f"wsd - cosine: mean {diff.mean():+.4f}; best wsd {side['wsd'].max():.4f} vs best cosine "
                  f"{side['cosine'].max():.4f}")
            summary["wsd_minus_cosine"] = float(diff.mean())
        summary["finals"] = side.reset_index().to_dict(orient="records")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
