"""The ``cxrtune`` command.

``cxrtune data index|cache|tasks|info|preview`` work on data sources; ``cxrtune pretrain`` and
``cxrtune evaluate`` run one pretraining or one evaluation in this process. Sweeps live in
``sweeps/*.py`` and are started with ``python sweeps/NAME.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from cxrtune.errors import ConfigError, CxrtuneError


def parse_value(text: str) -> Any:
    """CLI option values: JSON where it parses (numbers, true/false, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def parse_options(pairs: Sequence[str] | None, flag: str = "--option") -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise CxrtuneError(
                f"{flag} {pair!r} is not of the form key=value: give the name, '=' and the value "
                f"(a number, true/false, a JSON list or text), e.g. {flag} name=3"
            )
        key, value = pair.split("=", 1)
        options[key.strip().replace("-", "_")] = parse_value(value.strip())
    return options


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", default="phantom",
                        help="data source: phantom (embedded default), nih, padchest or csv")
    parser.add_argument("--root", default=None, help="folder of the source's files (not needed for phantom)")
    parser.add_argument("--csv", default=None, help="labels CSV when it is not at the source's default place")
    parser.add_argument("--allow-missing", action="store_true",
                        help="index only the listed images present on disk instead of failing")
    parser.add_argument("--option", "-o", action="append", metavar="KEY=VALUE",
                        help="source option, repeatable (e.g. -o n_pretrain=2000 for phantom)")


def source_from_args(args: argparse.Namespace):
    from cxrtune.data.sources.base import make_source

    options = parse_options(args.option)
    if args.csv is not None:
        options["csv"] = args.csv
    if args.allow_missing:
        options["allow_missing"] = True
    return make_source(args.source, args.root, **options)


# -- data subcommands ---------------------------------------------------------------------------
def parse_shots(text: str, flag: str = "--shots") -> list[int]:
    """``"1,5,10"`` -> ``[1, 5, 10]``; anything else is a :class:`ConfigError` naming ``flag``."""
    valid = f"use positive integers separated by commas, e.g. {flag} 1,5,10"
    items = [item.strip() for item in str(text).split(",")]
    shots = []
    for item in items:
        try:
            value = int(item)
        except ValueError:
            value = None
        if value is None or value < 1:
            what = "an empty entry" if not item else f"{item!r} is not a positive integer"
            raise ConfigError(f"{flag} {text!r} is not valid: {what}; {valid}")
        if value in shots:
            raise ConfigError(f"{flag} {text!r} is not valid: {value} is listed twice; {valid}")
        shots.append(value)
    return shots


def check_int_flag(flag: str, value: int | None, low: int, high: int | None = None, what: str = "") -> None:
    """Refuse an integer flag outside [low, high] with the valid range in the message (None passes:
    the flag was not given)."""
    if value is None or (value >= low and (high is None or value <= high)):
        return
    valid = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
    raise ConfigError(f"{flag} {value} is not valid: use {valid}" + (f" ({what})" if what else ""))


def _check_cache_flags(args: argparse.Namespace) -> None:
    import dataclasses

    from cxrtune.data.cache import CacheConfig

    size = next(f for f in dataclasses.fields(CacheConfig) if f.name == "size").metadata
    check_int_flag("--size", args.size, int(size["low"]), int(size["high"]), "pixels per side of the cached images")
    check_int_flag("--workers", args.workers, 1, what="decoding processes; leave it out for the default")


def _print_caught(caught) -> None:
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def cmd_data_index(args: argparse.Namespace) -> int:
    from cxrtune.data.index import write_index

    source = source_from_args(args)
    index = source.build_index()
    out = Path(args.out) if args.out else default_index_path(source)
    write_index(index, out, metadata={**source.describe(), "fingerprint": source.fingerprint(index)})
    print(index_summary(index))
    print(f"index written to {out}")
    return 0


def default_index_path(source) -> Path:
    import hashlib

    from cxrtune.data.cache import cache_root

    digest = hashlib.sha256(json.dumps(source.describe(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_root() / source.name / f"index-{digest}.parquet"


def cmd_data_cache(args: argparse.Namespace) -> int:
    from cxrtune.data.cache import FlatImageWarning, build_cache, cache_summary

    _check_cache_flags(args)
    source = source_from_args(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FlatImageWarning)
        cache = build_cache(source, size=args.size, fit=args.fit, workers=args.workers, strict=args.strict,
                            rebuild=args.rebuild, progress=not args.quiet)
    _print_caught(caught)
    print(cache_summary(cache))
    return 0


def cmd_data_tasks(args: argparse.Namespace) -> int:
    from cxrtune.data.cache import FlatImageWarning, get_cache
    from cxrtune.data.tasks import ShotsCappedWarning, sample_episodes, save_episodes
    from cxrtune.errors import TaskError

    # Every flag is checked before the cache is built: a typo should not cost a decoding run.
    _check_cache_flags(args)
    shots = parse_shots(args.shots)
    check_int_flag("--trials", args.trials, 1, what="trials per disease and shot count")
    check_int_flag("--seed-base", args.seed_base, 0, what="trial t uses seed seed-base + t")
    pool_options = parse_options(args.pool_option, "--pool-option")
    if args.diseases is not None:
        pool_options["diseases"] = [d.strip() for d in args.diseases.split(",") if d.strip()]
        if not pool_options["diseases"]:
            raise ConfigError(f"--diseases {args.diseases!r} names no disease: use comma-separated labels, "
                              "e.g. --diseases Hernia,Mass, or leave it out for every qualifying one")
    source = source_from_args(args)
    known = type(source).task_option_names()
    unknown = sorted(set(pool_options) - set(known))
    if unknown:
        raise ConfigError(f"--pool-option {unknown[0]} is not a task pool option of the {source.name} source: "
                          f"use one of {', '.join(known)}")
    # Episodes refer to images the cache could decode, so they are drawn from the cache's index.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FlatImageWarning)
        cache = get_cache(source, size=args.size, fit=args.fit, workers=args.workers, progress=not args.quiet)
    _print_caught(caught)
    pool = source.task_pool(cache.index, **pool_options)
    if not pool.diseases:
        raise TaskError(
            f"no label of the {source.name} source qualifies as a few-shot task (too few single-label "
            "training or evaluation positives for the protocol's min_train / min_val; the no-finding "
            f"labels {list(source.no_finding)} are never tasks); lower the minimums, e.g. --pool-option "
            "min_train=5 --pool-option min_val=2, or add labelled images"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ShotsCappedWarning)
        episodes = sample_episodes(pool, shots=shots, trials=args.trials, seed_base=args.seed_base,
                                   strict=args.strict)
    _print_caught(caught)
    out = Path(args.out)
    save_episodes(episodes, out)
    print(pool.summary().to_string(index=False))
    print(f"{len(episodes)} episodes ({len(pool.diseases)} diseases x {len(shots)} shot counts x "
          f"{args.trials} trials) written to {out}")
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from cxrtune.data.cache import find_caches, cache_summary
    from cxrtune.data.sources.base import source_names

    if args.source is None:
        print("sources: " + ", ".join(source_names()))
        caches = find_caches()
    else:
        source = source_from_args(args)
        index = source.build_index()
        print(index_summary(index))
        caches = find_caches(source.name)
    if caches:
        print("\ncaches:")
        for cache in caches:
            print(cache_summary(cache))
    else:
        print("\nno image cache built yet (cxrtune data cache --source NAME)")
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    if args.source != "phantom":
        raise CxrtuneError(f"--source {args.source!r}: preview is available for the phantom source only")
    check_int_flag("--size", args.size, 8, 4096, "pixels per side of each tile")
    check_int_flag("--seed", args.seed, 0)
    from cxrtune.data.phantom.preview import preview_contact_sheet

    path = preview_contact_sheet(Path(args.out), size=args.size, seed=args.seed)
    print(f"contact sheet written to {path}")
    return 0


def index_summary(index) -> str:
    from collections import Counter

    labels = Counter(label for labels in index["labels"] for label in labels)
    lines = [
        f"images: {len(index)}   patients: {index['patient_id'].nunique()}",
        "splits: " + ", ".join(f"{k} {v}" for k, v in index["split"].value_counts().sort_index().items()),
        "views: " + ", ".join(f"{k} {v}" for k, v in index["view"].value_counts().head(8).items()),
        "labels (most frequent): " + ", ".join(f"{k} {v}" for k, v in labels.most_common(12)),
    ]
    return "\n".join(lines)


# -- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrtune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="index, cache and inspect data sources")
    data_cmds = data.add_subparsers(dest="data_command", required=True)

    p = data_cmds.add_parser("index", help="write a source's Parquet index")
    add_source_arguments(p)
    p.add_argument("--out", default=None, help="Parquet path (default: in the cxrtune cache)")
    p.set_defaults(func=cmd_data_index)

    def cache_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--size", type=int, default=256, help="side of the cached square images (px)")
        p.add_argument("--fit", default="crop", choices=("crop", "pad", "squash"),
                       help="how non-square images become square")
        p.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores, at most 2)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = data_cmds.add_parser("cache", help="decode a source once into the uint8 image cache")
    add_source_arguments(p)
    cache_args(p)
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image instead of skipping it")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if a complete cache exists")
    p.set_defaults(func=cmd_data_cache)

    p = data_cmds.add_parser("tasks", help="sample the few-shot episodes and save them as Parquet")
    add_source_arguments(p)
    cache_args(p)
    p.add_argument("--shots", default="1,5,10,20,50", help="comma-separated shot counts")
    p.add_argument("--trials", type=int, default=10, help="trials per (disease, shots); trial t uses seed 42+t")
    p.add_argument("--seed-base", type=int, default=42)
    p.add_argument("--diseases", default=None, help="comma-separated diseases (default: every qualifying one)")
    p.add_argument("--strict", action="store_true", help="fail when a disease has fewer positives than shots")
    p.add_argument("--pool-option", action="append", metavar="KEY=VALUE",
                   help="task-pool option, e.g. min_train=15, max_train_neg=5000")
    p.add_argument("--out", default="episodes.parquet", help="output Parquet path")
    p.set_defaults(func=cmd_data_tasks)

    p = data_cmds.add_parser("info", help="summarise a source's index and the caches built")
    add_source_arguments(p)
    p.set_defaults(func=cmd_data_info, source=None)

    p = data_cmds.add_parser("preview", help="write a PNG contact sheet of the phantom source")
    p.add_argument("--source", default="phantom")
    p.add_argument("--out", default="phantom-preview.png")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_preview)

    # Commands contributed by other core modules, wired when present.
    for module, adder in (("cxrtune.engine.cli", "add_pretrain_parser"),
                          ("cxrtune.evaluate.cli", "add_evaluate_parser"),
                          ("cxrtune.export", "add_export_parser"),
                          ("cxrtune.report_cli", "add_report_parser"),
                          ("cxrtune.report_cli", "add_compare_parser")):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                continue
            raise
        getattr(mod, adder)(commands)
    return parser


def _version() -> str:
    from cxrtune import __version__

    return f"cxrtune {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CxrtuneError as err:
        print(f"cxrtune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cxrtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
