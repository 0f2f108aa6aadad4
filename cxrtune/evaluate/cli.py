"""``cxrtune evaluate``: judge one backbone (and optionally a baseline) on a source's few-shot tasks.

    cxrtune evaluate --checkpoint runs/moco/last.pt --arch resnet50 --source padchest --root /data/padchest \\
        --evaluator probe --baseline imagenet --weights resnet50-0676ba61.pth --out results.parquet

Episodes come from ``--episodes FILE`` (written by ``cxrtune data tasks``) or are sampled here from
the source's task pool with ``--shots`` and ``--trials``. Prints the study-style table and writes
the tidy results table (Parquet).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd

from cxrtune.errors import ConfigError
from cxrtune.evaluate.features import BackboneSpec
from cxrtune.evaluate.run import EVALUATORS, EvalConfig, run_evaluation, study_table, write_results


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    from cxrtune.cli import add_source_arguments

    p = subparsers.add_parser("evaluate", help="few-shot evaluation of a backbone (probe, kNN, finetune)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a cxrtune checkpoint PATH, 'imagenet' or 'random'")
    p.add_argument("--arch", default="resnet50", help="architecture (a checkpoint must hold this one)")
    p.add_argument("--weights", default=None, help="local torchvision weights file for imagenet (never downloaded)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for random")
    p.add_argument("--evaluator", default="probe",
                   help=f"comma-separated evaluators: {', '.join(EVALUATORS)}")
    p.add_argument("--baseline", default="none", choices=("none", "imagenet", "random"),
                   help="also evaluate this init of the same arch and print paired p-values against it")
    p.add_argument("--episodes", default=None, help="episodes Parquet from `cxrtune data tasks` (else sampled here)")
    p.add_argument("--shots", default="1,5,10,20,50",
                   help="comma-separated shot counts (>= 1) when sampling episodes here")
    p.add_argument("--trials", type=int, default=10, help="trials (>= 1) when sampling episodes here")
    p.add_argument("--size", type=int, default=256, help="image cache side in pixels (8 to 4096)")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:N (cuda needs a CUDA GPU)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="EvalConfig override by dotted name, e.g. --set finetune.epochs=20 --set knn.k=10")
    p.add_argument("--out", default="results.parquet", help="tidy results table (Parquet)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_source_arguments(p)
    p.set_defaults(func=run_evaluate)
    return p


def _episodes(args, cache) -> pd.DataFrame:
    from cxrtune.data.tasks import ShotsCappedWarning, load_episodes, sample_episodes

    if args.episodes:
        return load_episodes(args.episodes)
    from cxrtune.cli import source_from_args

    pool = source_from_args(args).task_pool(cache.index)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShotsCappedWarning)
        episodes = sample_episodes(pool, shots=parse_shots(args.shots), trials=args.trials)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return episodes


def parse_shots(text: str) -> list[int]:
    """``--shots 1,5,20`` -> [1, 5, 20]; anything but positive integers is a :class:`ConfigError`."""
    shots = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            value = None
        if value is None or value < 1:
            raise ConfigError(f"--shots {text!r}: {part!r} is not a shot count; "
                              "use comma-separated integers >= 1, e.g. 1,5,20")
        shots.append(value)
    return shots


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers and unusable paths before the cache is built."""
    from cxrtune.engine.cli import CACHE_SIZE_RANGE, check_int_flag

    check_int_flag("--size", args.size, *CACHE_SIZE_RANGE, what="the side of the cached images (px)")
    check_int_flag("--trials", args.trials, 1, what="the number of trials per (disease, shots)")
    if not args.episodes:
        parse_shots(args.shots)
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: pass the path of the results Parquet file, "
                          f"e.g. {out / 'results.parquet'}")


def run_evaluate(args: argparse.Namespace) -> int:
    from cxrtune.cli import parse_options, source_from_args
    from cxrtune.data.cache import get_cache
    from cxrtune.device import resolve_device

    check_arguments(args)
    overrides = parse_options(args.set, "--set")
    overrides["evaluators"] = [e.strip() for e in args.evaluator.split(",") if e.strip()]
    overrides["device"] = args.device
    config = EvalConfig().override(overrides)
    resolve_device(config.device, "--device")  # before the cache is built, not when features are
    cache = get_cache(source_from_args(args), size=args.size, progress=not args.quiet)
    episodes = _episodes(args, cache)
    specs = [BackboneSpec(init=args.checkpoint, arch=args.arch, weights=args.weights, seed=args.seed)]
    if args.baseline != "none":
        specs.append(BackboneSpec(init=args.baseline, arch=args.arch, weights=args.weights, seed=args.seed))
    names = [spec.label() for spec in specs]
    if len(names) > 1 and names[1] == names[0]:
        names[1] = f"{names[1]}-baseline"
    tables = [run_evaluation(spec, cache, episodes, config=config, name=name, progress=not args.quiet)
              for spec, name in zip(specs, names)]
    results = pd.concat(tables, ignore_index=True)
    out = write_results(results, Path(args.out))
    baseline = tables[1]["backbone"].iloc[0] if len(tables) > 1 else None
    print(study_table(results, baseline=baseline))
    print(f"\n{len(results)} rows written to {out}")
    return 0
