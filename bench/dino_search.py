"""Which DINO settings learn something useful on the phantom? Named settings of the cpu preset,
chosen on validation episodes, the winner reported on separate report episodes.

Each setting is the method's ``cpu`` preset (ResNet18 at 64 px, AdamW) with a few keys changed:
the levers the DINO literature and the study's failure point at (teacher temperature and its
warmup, centre momentum, local crops, freezing the last layer, learning rate, batch size) and
the crops the other methods' cpu presets keep (80-100 % of the image, no flip: body size and lung
height carry the phantom's findings). Every setting trains the same ``--epochs`` on the same
``--n-pretrain`` unlabelled images from the same seed, one after another with ``--threads``.

The held-out images are split by patient (``cxrtune.data.tasks.split_for_report``, as a sweep
does): every setting and the random init they all start from are probed (20 shots, 10 episodes per
finding, every held-out image of the half in each test set) on the validation half, the setting
with the highest mean is chosen there, and only the chosen one is probed again, with its random
init, on the report half: that difference carries no selection. Writes ``<out>/<setting>/``
(engine run folder, ``validation.parquet``), ``<out>/summary.json`` and ``<out>/summary.md``.
Settings already finished in ``--out`` are not run again, so a search grows across invocations.

    python bench/dino_search.py --settings preset phantom-crops centre-0.99 phantom-crops+centre-0.99
    python bench/dino_search.py --summarise bench-runs/dino_search
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHANTOM_CROPS = {"augment.crop_scale_min": 0.8, "augment.crop_ratio_min": 0.9, "augment.crop_ratio_max": 1.111,
                 "augment.hflip_p": 0.0}
#: name -> overrides of the dino cpu preset
SETTINGS: dict[str, dict] = {
    "preset": {},
    "phantom-crops": PHANTOM_CROPS,
    "centre-0.99": {"dino.center_momentum": 0.99},
    "phantom-crops+centre-0.99": {**PHANTOM_CROPS, "dino.center_momentum": 0.99},
    "teacher-0.04-to-0.07": {"dino.warmup_teacher_temperature": 0.04, "dino.teacher_temperature": 0.07,
                             "dino.warmup_teacher_epochs": 3},
    "local-crops-2": {"dino.local_crops": 2, "dino.local_crop_size": 32, "dino.local_scale_min": 0.2,
                      "dino.local_scale_max": 0.5},
    "freeze-last-layer-3": {"dino.freeze_last_layer_epochs": 3},
    "lr-1e-3": {"optim.lr": 1e-3},
    "lr-2.5e-4": {"optim.lr": 2.5e-4},
    "batch-128": {"train.batch_size": 128},
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS)[:4], choices=list(SETTINGS))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--n-pretrain", type=int, default=4096, help="unlabelled phantom images")
    ap.add_argument("--size", type=int, default=64, help="image side for pretraining and probing")
    ap.add_argument("--shots", type=int, default=20)
    ap.add_argument("--trials", type=int, default=10, help="episodes per finding, on each half")
    ap.add_argument("--val-pos", type=int, default=60, help="held-out positives per finding (both halves)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every setting")
    ap.add_argument("--out", default="bench-runs/dino_search")
    ap.add_argument("--summarise", metavar="OUT", help="only summarise (and report the winner of) the runs in OUT")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.threads < 1 or args.n_pretrain < 1:
        ap.error("--epochs, --threads and --n-pretrain must be at least 1")
    return args


def data(args: argparse.Namespace, out: Path):
    """The phantom cache and the validation and report episodes (sampled once, kept in ``out``)."""
    from cxrtune.data.cache import get_cache
    from cxrtune.data.sources.base import make_source
    from cxrtune.data.tasks import load_episodes, sample_episodes, save_episodes, split_for_report
    from cxrtune.sweep.data import REPORT_SEED_BASE

    source = make_source("phantom", None, n_pretrain=args.n_pretrain, val_pos=args.val_pos)
    cache = get_cache(source, size=args.size, progress=True)
    paths = out / "validation_episodes.parquet", out / "report_episodes.parquet"
    if not all(p.is_file() for p in paths):
        validation, report, kept = split_for_report(source.task_pool(cache.index))
        if kept:
            raise SystemExit(f"findings {kept} cannot be split by patient here; raise --val-pos")
        save_episodes(sample_episodes(validation, shots=[args.shots], trials=args.trials, test_negatives="all"), paths[0])
        save_episodes(sample_episodes(report, shots=[args.shots], trials=args.trials, test_negatives="all",
                                      seed_base=REPORT_SEED_BASE), paths[1])
    return cache, load_episodes(paths[0]), load_episodes(paths[1])


def judge(cache, episodes, size: int):
    from cxrtune.resolve import InLoopProbeConfig
    from cxrtune.trial import ProbeJudge

    return ProbeJudge(cache, episodes, InLoopProbeConfig(input_size=size, crop_fraction=1.0), "cpu")


def config_for(args: argparse.Namespace, name: str):
    from cxrtune.cli import parse_options
    from cxrtune.profiles import cpu

    return cpu("dino").override({
        "train.image_size": args.size, "train.epochs": args.epochs, "train.checkpoint_every": args.epochs,
        "train.keep_checkpoints": 1, "train.time_limit_minutes": 0.0, "train.monitor_images": 512,
        **SETTINGS[name], **parse_options(args.set, "--set")})


def run(args: argparse.Namespace) -> None:
    import torch

    from cxrtune.engine.train import pretrain
    from cxrtune.models.backbone import build_backbone
    from cxrtune.trial import pretrain_rows

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = {"epochs": args.epochs, "n_pretrain": args.n_pretrain, "size": args.size, "shots": args.shots,
              "trials": args.trials, "val_pos": args.val_pos, "set": args.set}
    if (out / "search.json").is_file():
        # settings are compared on one budget, data and episodes: a search grows only under its own
        recorded = json.loads((out / "search.json").read_text())
        differ = [f"--{k.replace('_', '-')}: recorded {recorded.get(k)!r}, given {v!r}" for k, v in params.items()
                  if recorded.get(k) != v]
        if differ:
            raise SystemExit(f"{out} holds a search with other parameters ({'; '.join(differ)}); "
                             "give those, or another --out")
    (out / "search.json").write_text(json.dumps(params, indent=2))
    cache, validation, _ = data(args, out)
    val_judge = judge(cache, validation, args.size)
    if not (out / "random_validation.parquet").is_file():
        config = config_for(args, "preset")
        random_init = build_backbone(config.model.arch, init="random", seed=config.train.seed,
                                     in_chans=config.model.in_chans)
        val_judge(random_init)[1].to_parquet(out / "random_validation.parquet")
    for name in args.settings:
        folder = out / name
        if (folder / "done.json").is_file():
            print(f"{name}: finished earlier, not run again", flush=True)
            continue
        config = config_for(args, name)
        print(f"{name}: {SETTINGS[name] or 'the cpu preset'}", flush=True)
        started = time.time()
        result = pretrain(config, cache.images, folder / "run", rows=pretrain_rows(cache, "pretrain"), progress=True,
                          resume=False)
        minutes = (time.time() - started) / 60
        _, table = val_judge(result.backbone)
        table.to_parquet(folder / "validation.parquet")
        (folder / "done.json").write_text(json.dumps({"minutes": minutes, "epochs": result.epochs_completed,
                                                      "overrides": SETTINGS[name]}))
        print(f"{name}: {minutes:.1f} min, validation probe {table['auroc'].mean():.3f}", flush=True)
    summarise(out, args)


def per_finding(table):
    return table.groupby("disease")["auroc"].mean()


def summarise(out: Path, args: argparse.Namespace) -> dict:
    """Every finished setting on the validation half; the best of them against its random init on
    the report half (probed here once, then read back)."""
    import pandas as pd

    from cxrtune.evaluate.stats import bootstrap_ci
    from cxrtune.models.backbone import build_backbone

    done = sorted(p.parent for p in out.glob("*/done.json"))
    if not done or not (out / "random_validation.parquet").is_file():
        raise SystemExit(f"{out} holds no finished settings (folders with done.json); run the search first")
    random_val = per_finding(pd.read_parquet(out / "random_validation.parquet"))
    rows = []
    for folder in done:
        info = json.loads((folder / "done.json").read_text())
        config = json.loads((folder / "run" / "config.json").read_text())
        metrics = pd.read_json(folder / "run" / "metrics.jsonl", lines=True)
        val = per_finding(pd.read_parquet(folder / "validation.parquet"))
        diff = (val - random_val).to_numpy()
        uniform = math.log(config["dino.out_dim"])
        first, last = metrics.iloc[0], metrics.iloc[-1]
        rows.append({"setting": folder.name, "overrides": info["overrides"], "epochs": int(info["epochs"]),
                     "minutes": info["minutes"], "validation": float(val.mean()),
                     "random_init_validation": float(random_val.mean()), "vs_random": float(diff.mean()),
                     "vs_random_ci": list(map(float, bootstrap_ci(diff))),
                     "loss_first": float(first["ssl_loss"]), "loss_last": float(last["ssl_loss"]),
                     "loss_last_of_uniform": float(last["ssl_loss"]) / uniform,
                     "teacher_entropy_first": float(first["teacher_entropy_ratio"]),
                     "teacher_entropy_last": float(last["teacher_entropy_ratio"]),
                     "feature_std": float(last["feature_std"]), "effective_rank": float(last["effective_rank"])})
    best = max(rows, key=lambda r: r["validation"])
    report_file = out / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else None
    if report is None or report["setting"] != best["setting"]:
        import torch

        torch.set_num_threads(args.threads)
        params = json.loads((out / "search.json").read_text())
        # the search's own data (its cache is keyed by these), not this invocation's defaults
        args.n_pretrain, args.size = params["n_pretrain"], params["size"]
        args.val_pos = params.get("val_pos", args.val_pos)
        cache, _, report_episodes = data(args, out)
        report_judge = judge(cache, report_episodes, args.size)
        config = json.loads((out / best["setting"] / "run" / "config.json").read_text())
        final = sorted((out / best["setting"] / "run" / "checkpoints").glob("epoch-*.pt"))[-1]
        ssl = per_finding(report_judge(build_backbone(config["model.arch"], init=str(final)))[1])
        rand = per_finding(report_judge(build_backbone(config["model.arch"], init="random", seed=config["train.seed"],
                                                       in_chans=config["model.in_chans"]))[1])
        diff = (ssl - rand).to_numpy()
        report = {"setting": best["setting"], "probe": float(ssl.mean()), "random_init": float(rand.mean()),
                  "vs_random": float(diff.mean()), "vs_random_ci": list(map(float, bootstrap_ci(diff))),
                  "per_finding": {k: float(v) for k, v in (ssl - rand).items()}}
        report_file.write_text(json.dumps(report, indent=2))
    summary = {"settings": rows, "chosen": best["setting"], "report": report}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = markdown(rows, report)
    (out / "summary.md").write_text(text)
    print(text)
    return summary


def markdown(rows: list[dict], report: dict) -> str:
    def ci(value, interval):
        return f"{value:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]"

    lines = ["| setting | epochs | min | validation probe | vs random init (validation) [95 % CI] "
             "| loss first -> last (last / ln out_dim) | teacher entropy first -> last | feature std | effective rank |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['epochs']} | {r['minutes']:.1f} | {r['validation']:.3f} "
                     f"| {ci(r['vs_random'], r['vs_random_ci'])} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} "
                     f"({r['loss_last_of_uniform']:.2f}) | {r['teacher_entropy_first']:.2f} -> "
                     f"{r['teacher_entropy_last']:.2f} | {r['feature_std']:.3f} | {r['effective_rank']:.1f} |")
    lines.append("")
    lines.append(f"Chosen on the validation half: **{report['setting']}**; on the report half it scores "
                 f"{report['probe']:.3f} against its random init's {report['random_init']:.3f}: "
                 f"**{ci(report['vs_random'], report['vs_random_ci'])}** (95 % bootstrap CI over the findings).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.summarise:
        summarise(Path(args.summarise), args)
    else:
        run(args)


if __name__ == "__main__":
    main()
