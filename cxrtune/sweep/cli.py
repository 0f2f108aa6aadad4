"""The command line every pretraining sweep script shares, and what the driver does around Tune.

A sweep script declares a :class:`PretrainSweep` (method, search space, the study's setting as
the seed point, objective) and calls :func:`main`. The driver then

1. builds (or reuses) the image caches, once, before any trial starts: the pretraining source's
   (``--source``) and, when validation uses another archive (``--eval-source``, e.g. pretrain on
   NIH and validate on PadChest as the study did), the evaluation source's;
2. samples the validation episodes once, from the evaluation source, into
   ``<sweep>/episodes.parquet`` (every trial and every resume sees the same ones);
3. runs the Tune sweep (Optuna TPE, ASHA on the downstream objective, MLflow tracking); Ray's own
   console output goes to ``<sweep>/ray-console.log`` unless ``--verbose``;
4. prints the table of trials, the best trial's objective next to random init's on the same
   episodes with the 95 % CI of the paired difference, and exports the best checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from cxrtune.errors import CxrtuneError
from cxrtune.sweep.console import CONSOLE_LOG

#: Per profile: the engine profile, the sweep budget and the data scale. ``note`` says what a run
#: of this size can and cannot show.
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        "engine": "smoke", "num_samples": 2, "max_concurrent": 2, "cache_size": 32,
        "overrides": {"train.epochs": 2, "train.checkpoint_every": 1, "train.batch_size": 16,
                      "train.keep_checkpoints": 1},
        "phantom": {"n_pretrain": 192, "studies_per_patient": 4, "train_pos": 20, "val_pos": 4,
                    "train_neg": 40, "val_neg": 30, "fewshot_studies": 1},
        # grace period = epochs: ASHA never stops a smoke trial, so a smoke run is deterministic
        "shots": (5, 20), "trials": 2, "probe_input_size": 32, "grace_period": 2, "resources": {"cpu": 1},
        "note": "a plumbing check: two tiny trials of two epochs; its AUROCs mean nothing",
    },
    "default": {
        "engine": "cpu", "num_samples": 4, "max_concurrent": 2, "cache_size": 64,
        "overrides": {"train.epochs": 3, "train.checkpoint_every": 1, "train.time_limit_minutes": 3.0,
                      "train.keep_checkpoints": 1, "optim.warmup_epochs": 1, "moco.queue_size": 1024},
        "phantom": {"n_pretrain": 2048, "train_pos": 40, "val_pos": 20, "train_neg": 400, "val_neg": 200},
        "shots": (5, 20), "trials": 3, "probe_input_size": 64, "grace_period": 1, "resources": {"cpu": 1},
        "note": ("minutes of CPU pretraining learn little: this run shows the whole workflow (search, "
                 "tracking, comparison with random init, export), not a gain over random init; use "
                 "--profile cpu (about an hour) for that"),
    },
    "cpu": {
        # Two trials side by side, one core each, ~20 epochs of the 10,000 pretraining images in
        # under an hour: the study's setting and the engine's cpu profile (the setting that
        # bench/ssl_vs_random.py measured). Every held-out image is in each test set so that a
        # gain of a few AUROC points resolves. More trials need more cores or --num-samples.
        "engine": "cpu", "num_samples": 2, "max_concurrent": 2, "cache_size": 64,
        "overrides": {"train.epochs": 20, "train.checkpoint_every": 4, "train.time_limit_minutes": 56.0},
        "phantom": {}, "profile_point": True, "test_negatives": "all",
        "shots": (5, 20), "trials": 10, "probe_input_size": 64, "grace_period": 20, "resources": {"cpu": 1},
        "note": ("about an hour on 2 CPU cores: two 20-epoch trials side by side (the study's setting "
                 "and the cpu profile's), judged on every held-out image; on phantom version 6 its best "
                 "trial (the study's temperature and lr) measured +0.058 AUROC over random init, 95% CI "
                 "[+0.018, +0.101], the other +0.013; a single run of the cpu setting "
                 "(bench/ssl_vs_random.py) gave +0.024 to +0.047 on three seeds, its CI above zero in "
                 "2 of 3: the gain is small and one run does not always show it"),
    },
    "l4": {
        "engine": "study", "num_samples": 16, "max_concurrent": 1, "cache_size": 256,
        "overrides": {"train.checkpoint_every": 10},
        "phantom": {},
        "shots": (5, 20), "trials": 10, "probe_input_size": 224, "grace_period": 50,
        "resources": {"cpu": 8, "gpu": 1},
        "note": "the study's settings on one 24 GB GPU: days per trial, as in the study",
    },
}


@dataclasses.dataclass
class PretrainSweep:
    """What a pretraining sweep script declares."""

    name: str
    method: str
    space: dict[str, Any]
    seed_point: dict[str, Any]
    objective: str = "probe_auroc_20shot"
    description: str = ""
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``0`` is refused, never read as "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; use an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range; use an integer >= 1")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; use a number > 0") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is out of range; use a finite number > 0")
    return value


def build_parser(sweep: PretrainSweep) -> argparse.ArgumentParser:
    from cxrtune.sweep.runner import DEFAULT_STORAGE

    searched = ", ".join(sweep.space)
    parser = argparse.ArgumentParser(
        prog=f"python sweeps/{sweep.name}.py",
        description=(sweep.description or f"{sweep.method} sweep") + f"\n\nSearched: {searched}. "
        f"Objective: {sweep.objective} (mean probe AUROC over the findings, maximised).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Profiles:\n" + "\n".join(f"  {k:<8} {v['note']}" for k, v in PROFILES.items()),
    )
    # --profile, --source and --seed default to None so that --resume can tell a value given again
    # (checked against the sweep's record) from one left out (taken from the record).
    parser.add_argument("--profile", default=None, choices=tuple(PROFILES), help="budget and scale (default: default)")
    parser.add_argument("--source", default=None,
                        help="data source: phantom (embedded, the default), nih, padchest, csv")
    parser.add_argument("--root", default=None, help="folder of the source's files")
    parser.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="source option, repeatable")
    add_eval_source_arguments(parser)
    parser.add_argument("--num-samples", type=positive_int, default=None, help="trials to run (default: the profile's)")
    parser.add_argument("--max-concurrent", type=positive_int, default=None,
                        help="trials at once (default: the profile's)")
    parser.add_argument("--name", default=None, help=f"sweep name, the folder under --storage (default: {sweep.name})")
    parser.add_argument("--storage", default=DEFAULT_STORAGE, help="where sweeps live; shared storage on a cluster")
    parser.add_argument("--address", default=None, help="an existing Ray cluster ('auto' or host:port)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db; with --resume, the "
                             "sweep's recorded URI, or this one to move its tracking to another store)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted sweep of this name (Ctrl-C or a dead driver), with the data, "
                             "profile and --set values it was created with")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="fix a config key, e.g. train.epochs=5")
    parser.add_argument("--gpu", type=positive_float, default=None,
                        help="GPU share per trial (default: the profile's); refused on a cluster without GPUs")
    parser.add_argument("--cpus", type=positive_int, default=None, help="CPUs Ray may use on this machine (default: all)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the Optuna sampler (default: 0)")
    parser.add_argument("--time-budget", type=positive_float, default=None, metavar="MINUTES",
                        help="stop starting trials after this many minutes (running ones are stopped too)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own progress tables and logs here instead of in <sweep>/ray-console.log")
    parser.add_argument("--print-config", action="store_true",
                        help="print a trial's config with where each value comes from (engine profile, sweep "
                             "profile, sweep script, --set, search space) and exit; nothing is run or written")
    return parser


def add_eval_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-source", default=None,
                        help="source of the validation episodes and the probe's images (default: --source)")
    parser.add_argument("--eval-root", default=None, help="folder of the evaluation source's files")
    parser.add_argument("--eval-option", action="append", metavar="KEY=VALUE",
                        help="evaluation source option, repeatable")


def _profile_config(sweep: PretrainSweep, profile: dict[str, Any], sets: dict[str, Any]) -> dict[str, Any]:
    from cxrtune.engine import profiles

    config = profiles.profile(profile["engine"], sweep.method).override({**profile["overrides"], **sweep.fixed, **sets})
    return config.to_flat()


def config_provenance(sweep: PretrainSweep, profile_name: str, sets: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(key, value, where it came from) for every key of a trial's config: the engine profile,
    the sweep profile's overrides, the sweep script's fixed keys, ``--set``, or the search space
    (with the study's seed point, evaluated first)."""
    profile = PROFILES[profile_name]
    flat = _profile_config(sweep, profile, sets)
    flat["trial.probe_input_size"] = profile["probe_input_size"]
    rows = []
    for key, value in flat.items():
        if key in sweep.space and key not in sets:
            seed = f"; seed point {sweep.seed_point[key]!r}" if key in sweep.seed_point else ""
            rows.append((key, sweep.space[key], f"searched{seed}"))
        elif key in sets:
            rows.append((key, value, "--set"))
        elif key in sweep.fixed:
            rows.append((key, value, f"sweep script {sweep.name}"))
        elif key in profile["overrides"]:
            rows.append((key, value, f"sweep profile {profile_name}"))
        elif key == "trial.probe_input_size":
            rows.append((key, value, f"sweep profile {profile_name} (probe_input_size)"))
        else:
            rows.append((key, value, f"engine profile {profile['engine']} ({sweep.method})"))
    return rows


def describe_domain(domain: Any) -> str:
    """A Tune search domain in words: ``loguniform(0.03, 0.3)``, ``choice([1, 2])``."""
    if hasattr(domain, "categories"):
        return f"choice({list(domain.categories)!r})"
    lower, upper = getattr(domain, "lower", None), getattr(domain, "upper", None)
    if lower is not None and upper is not None:
        sampler = type(getattr(domain, "sampler", None)).__name__.lower()
        kind = "loguniform" if "log" in sampler else "randint" if type(domain).__name__ == "Integer" else "uniform"
        return f"{kind}({lower:g}, {upper:g})"
    if isinstance(domain, dict) and "grid_search" in domain:
        return f"grid({domain['grid_search']!r})"
    return repr(domain)


def print_config(sweep: PretrainSweep, profile_name: str, sets: dict[str, Any], out=None) -> None:
    rows = config_provenance(sweep, profile_name, sets)
    width = max(len(k) for k, _, _ in rows)
    shown = [(k, describe_domain(v) if where.startswith("searched") else repr(v), where) for k, v, where in rows]
    vwidth = min(40, max(len(v) for _, v, _ in shown))
    print(f"# sweep {sweep.name}, profile {profile_name}: a trial's config and where each value comes from", file=out)
    for key, value, where in shown:
        print(f"{key:<{width}}  {value:<{vwidth}}  {where}", file=out)


@dataclasses.dataclass
class SweepData:
    """What the driver prepares before Ray starts: the pretraining images, the evaluation images
    (the same source and cache unless ``--eval-source`` names another) and the episodes."""

    source: Any
    cache: Any
    eval_source: Any
    eval_cache: Any
    episodes: pd.DataFrame
    episodes_path: Path

    @property
    def separate_eval(self) -> bool:
        return Path(self.eval_cache.path) != Path(self.cache.path)

    def describe(self) -> str:
        if not self.separate_eval:
            return (f"data: {self.source.name}, {len(self.cache)} cached images at {self.cache.size} px, "
                    f"{len(self.episodes)} validation episodes")
        return (f"data: pretraining on {self.source.name} ({len(self.cache)} cached images at {self.cache.size} px), "
                f"validating on {self.eval_source.name} ({len(self.eval_cache)} cached images, "
                f"{len(self.episodes)} episodes over {self.episodes['disease'].nunique()} findings)")


def _make_source(name: str, root: str | None, pairs: list[str] | None, flag: str, profile: dict[str, Any]):
    from cxrtune.cli import parse_options
    from cxrtune.data.sources.base import make_source

    options = parse_options(pairs, flag)
    if name == "phantom":
        options = {**profile["phantom"], **options}
    return make_source(name, root, **options)


def _sample_episodes(source, cache, profile: dict[str, Any], flag: str) -> pd.DataFrame:
    from cxrtune.data.tasks import sample_episodes
    from cxrtune.errors import TaskError

    where = f"{flag} {source.name}" + (f" (root {source.root})" if getattr(source, "root", None) else "")
    try:
        pool = source.task_pool(cache.index)
    except TaskError as err:
        raise CxrtuneError(f"{where} defines no few-shot task to validate on: {err}; "
                           "pass --eval-source with a labelled archive (e.g. padchest, nih or csv)") from err
    if not pool.tasks:
        raise CxrtuneError(
            f"{where} defines no few-shot task to validate on: none of its {len(cache)} images' labels has "
            "enough single-label training and validation positives; pass --eval-source with a labelled "
            "archive (e.g. padchest, nih or csv)")
    return sample_episodes(pool, shots=profile["shots"], trials=profile["trials"],
                           test_negatives=profile.get("test_negatives", "matched"))


def prepare_data(args: argparse.Namespace, profile: dict[str, Any], folder: Path) -> SweepData:
    """Build the caches and sample the episodes once, in the driver."""
    from cxrtune.data.cache import get_cache
    from cxrtune.data.tasks import load_episodes, save_episodes

    source = _make_source(args.source, args.root, args.option, "--option", profile)
    cache = get_cache(source, size=profile["cache_size"], progress=True)
    eval_name = getattr(args, "eval_source", None)
    eval_root = getattr(args, "eval_root", None)
    eval_pairs = getattr(args, "eval_option", None)
    if eval_name is None and (eval_root is not None or eval_pairs):
        raise CxrtuneError("--eval-root and --eval-option describe an evaluation source: pass --eval-source NAME too")
    if eval_name is None:
        eval_source, eval_cache, flag = source, cache, "--source"
    else:
        eval_source = _make_source(eval_name, eval_root, eval_pairs, "--eval-option", profile)
        eval_cache = get_cache(eval_source, size=profile["cache_size"], progress=True)
        flag = "--eval-source"
    episodes_path = folder / "episodes.parquet"
    if episodes_path.is_file():
        episodes = load_episodes(episodes_path)
        known = set(eval_cache.index["image_id"])
        foreign = [i for ids in episodes["test_ids"] for i in ids if i not in known]
        if foreign:
            raise CxrtuneError(
                f"{episodes_path} refers to image {foreign[0]!r}, which {flag} {eval_source.name} does not "
                f"hold: the sweep was started with another evaluation source; resume it with the same "
                f"--eval-source, or start a new sweep with --name")
    else:
        episodes = _sample_episodes(eval_source, eval_cache, profile, flag)
        save_episodes(episodes, episodes_path)
    return SweepData(source, cache, eval_source, eval_cache, episodes, episodes_path)


#: defaults of the arguments a sweep records (``None`` in the parser, see build_parser)
RECORD_DEFAULTS = {"profile": "default", "source": "phantom", "seed": 0}


def main(sweep: PretrainSweep, argv: list[str] | None = None) -> int:
    args = build_parser(sweep).parse_args(argv)
    try:
        return run(sweep, args)
    except CxrtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted. {resume_hint(sweep, args)}", file=sys.stderr)
        return 130


def resume_hint(sweep: PretrainSweep, args: argparse.Namespace) -> str:
    """How to continue this sweep (or start it again when Tune never saved it)."""
    from cxrtune.sweep.runner import DEFAULT_STORAGE, sweep_dir

    name = args.name if args.name is not None else sweep.name
    folder = sweep_dir(name, args.storage)
    command = f"python sweeps/{sweep.name}.py --resume"
    if args.name:
        command += f" --name {args.name}"
    if args.storage != DEFAULT_STORAGE:
        command += f" --storage {args.storage}"
    try:
        from ray import tune

        started = tune.Tuner.can_restore(str(folder))
    except Exception:  # noqa: BLE001 - a hint must not fail
        started = False
    if started:
        return f"Continue the sweep with: {command}"
    return "No trial had started; run the same command again to start the sweep."


def sweep_record(args: argparse.Namespace) -> dict[str, Any]:
    """What a sweep records when it is created and a resume checks: its data, profile, --set
    values, seed and trial count (``None`` where the user gave nothing)."""
    def folder(path):
        return str(Path(path).expanduser().resolve()) if path else None

    return {"profile": args.profile, "source": args.source, "root": folder(args.root),
            "options": sorted(args.option) if args.option else None,
            "eval_source": getattr(args, "eval_source", None), "eval_root": folder(getattr(args, "eval_root", None)),
            "eval_options": sorted(args.eval_option) if getattr(args, "eval_option", None) else None,
            "set": sorted(args.set) if args.set else None, "seed": args.seed, "num_samples": args.num_samples}


def apply_record(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """Put the sweep's arguments (recorded, or given and defaulted) back on ``args``."""
    args.profile = record["profile"] if record.get("profile") is not None else RECORD_DEFAULTS["profile"]
    args.source = record["source"] if record.get("source") is not None else RECORD_DEFAULTS["source"]
    args.seed = record["seed"] if record.get("seed") is not None else RECORD_DEFAULTS["seed"]
    args.root = record.get("root")
    args.option = record.get("options")
    args.eval_source = record.get("eval_source")
    args.eval_root = record.get("eval_root")
    args.eval_option = record.get("eval_options")
    args.set = record.get("set")
    args.num_samples = record.get("num_samples")


def run(sweep: PretrainSweep, args: argparse.Namespace) -> int:
    from cxrtune.cli import parse_options
    from cxrtune.sweep.runner import open_sweep

    if args.print_config:
        print_config(sweep, args.profile if args.profile is not None else RECORD_DEFAULTS["profile"],
                     parse_options(args.set, "--set"))
        return 0
    name = args.name if args.name is not None else sweep.name
    record = sweep_record(args)
    if not args.resume:
        record = {**record, **{k: v for k, v in RECORD_DEFAULTS.items() if record.get(k) is None}}
    with open_sweep(name, args.storage, resume=args.resume, tracking_uri=args.tracking_uri, record=record,
                    resume_hint=f"(sweep {name} in {args.storage})") as opened:
        apply_record(args, opened.record)
        if args.resume:
            print(f"resuming sweep {name} ({opened.folder / 'sweep.json'}): profile {args.profile}, "
                  f"source {args.source}" + (f", eval source {args.eval_source}" if args.eval_source else "")
                  + f", tracking {opened.tracking_uri}")
        return _run_open(sweep, args, opened)


def _run_open(sweep: PretrainSweep, args: argparse.Namespace, opened) -> int:
    from ray import tune

    from cxrtune import sweepstate
    from cxrtune.cli import parse_options
    from cxrtune.sweep import interrupt
    from cxrtune.sweep.runner import SweepSpec, run_sweep
    from trainables.pretrain import pretrain_trainable

    profile = PROFILES[args.profile]
    name = opened.name
    folder = opened.folder
    started = time.time()
    print(f"sweep {name}: profile {args.profile} ({profile['note']})")
    data = prepare_data(args, profile, folder)
    print(data.describe())

    fixed = _profile_config(sweep, profile, parse_options(args.set, "--set"))
    # The data reaches the trials through tune.with_parameters, not the param space: it is neither
    # searched nor a trial's MLflow param (the parent run's data.* params describe it).
    inputs = {"trial.cache": str(data.cache.path), "trial.episodes": str(data.episodes_path),
              "trial.eval_cache": str(data.eval_cache.path), "trial.source": data.source.name,
              "trial.eval_source": data.eval_source.name}
    sweepstate.write_inputs(folder, inputs)
    fixed["trial.probe_input_size"] = profile["probe_input_size"]
    unknown = [k for k in sweep.space if k not in fixed]
    if unknown:
        raise CxrtuneError(f"search space key {unknown[0]!r} is not a config key")
    sets = parse_options(args.set, "--set")
    space = {k: v for k, v in sweep.space.items() if k not in sets}  # --set fixes a searched key
    points = search_points(sweep, space, fixed, profile)
    param_space = {**fixed, **space}
    resources = dict(profile["resources"])
    if args.gpu is not None:
        resources["gpu"] = args.gpu
    spec = SweepSpec(
        name=name, trainable=tune.with_parameters(pretrain_trainable, inputs=inputs), param_space=param_space,
        metric=sweep.objective, mode="max",
        num_samples=args.num_samples if args.num_samples is not None else profile["num_samples"],
        max_concurrent=args.max_concurrent if args.max_concurrent is not None else profile["max_concurrent"],
        resources=resources, require_gpu=args.gpu is not None,
        points_to_evaluate=points, seed=args.seed, asha=True,
        time_budget_s=args.time_budget * 60 if args.time_budget else None,
        max_t=int(fixed["train.epochs"]), grace_period=min(profile["grace_period"], int(fixed["train.epochs"])),
        tags={"cxrtune.method": sweep.method, "cxrtune.profile": args.profile, "cxrtune.source": data.source.name,
              "cxrtune.eval_source": data.eval_source.name},
        params=_data_params(data),
    )
    if not args.verbose:
        print(f"Ray's own output: {folder / CONSOLE_LOG} (--verbose shows it here)")
    results = run_sweep(spec, storage=args.storage, address=args.address, num_cpus=args.cpus,
                        verbose=1 if args.verbose else 0, opened=opened)
    if interrupt.interrupted():
        table = trials_table(results, sweep, interrupt.cut_trials())
        print("\ninterrupted: the sweep's state is saved; trials cut off are 'interrupted' and continue from "
              "their last checkpoint on resume; nothing was exported")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(resume_hint(sweep, args), file=sys.stderr)
        return 130
    summary = summarise(results, sweep, spec, folder, data, emit=lambda text: print(text, flush=True))
    print(f"sweep folder: {folder}; wall time {time.time() - started:.0f} s")
    if summary.get("failed"):
        print(f"error: {summary['failed']}", file=sys.stderr)
        return 1
    return 0


def search_points(sweep: PretrainSweep, space: dict[str, Any], fixed: dict[str, Any],
                  profile: dict[str, Any]) -> list[dict[str, Any]]:
    """The points Optuna evaluates first: the study's setting (the sweep's seed point), then,
    for a profile with ``profile_point``, the profile's own values of the searched keys when they
    differ from the study's and lie inside the search space."""
    seed_point = {k: v for k, v in sweep.seed_point.items() if k in space}
    points = [seed_point] if seed_point else []
    if profile.get("profile_point") and space:
        profile_point = {k: fixed[k] for k in space}
        if profile_point != seed_point and all(_in_domain(space[k], v) for k, v in profile_point.items()):
            points.append(profile_point)
    return points


def _in_domain(domain: Any, value: Any) -> bool:
    """Whether a fixed value lies in a Tune search domain (a bound, a category or a constant)."""
    if hasattr(domain, "categories"):
        return value in domain.categories
    lower, upper = getattr(domain, "lower", None), getattr(domain, "upper", None)
    if lower is not None and upper is not None:
        try:
            return lower <= value <= upper
        except TypeError:
            return False
    return domain == value


def trials_table(results, sweep: PretrainSweep, interrupted: set[str] | frozenset = frozenset()) -> pd.DataFrame:
    """One row per trial; ``interrupted`` names the trials a Ctrl-C cut off."""
    from cxrtune.health import trial_status

    rows = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name.rsplit("_", 1)[-1]
        row = {"trial": trial_id,
               "status": ("interrupted" if trial_id in interrupted
                          else trial_status(metrics, result.error is not None)),
               "epochs": metrics.get("epoch"),
               sweep.objective: metrics.get(sweep.objective),
               "random_init": metrics.get(f"initial_{sweep.objective}")}
        for key in sweep.space:
            row[key] = config.get(key)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_difference(best_dir: Path, objective: str, seed: int = 0) -> dict[str, float] | None:
    """Best checkpoint vs random init on the same episodes: mean AUROC difference at the
    objective's shot count with a 95 % bootstrap CI over the per-disease mean differences."""
    from cxrtune.evaluate.stats import bootstrap_ci

    from cxrtune.trial import INITIAL_RESULTS, STATE_FILE

    best = best_dir / "probe_results.parquet"
    initial = best_dir / INITIAL_RESULTS  # carried in the checkpoint (on a cluster, work/ stays on the node)
    if not initial.is_file():
        initial = best_dir.parent / "work" / INITIAL_RESULTS
    if not best.is_file() or not initial.is_file():
        return None
    shots = int(objective.rsplit("_", 1)[1].replace("shot", ""))
    a = pd.read_parquet(best)
    b = pd.read_parquet(initial)
    a, b = a[a["shots"] == shots], b[b["shots"] == shots]
    merged = a.merge(b, on=["disease", "shots", "trial"], suffixes=("_best", "_random"))
    per_disease = merged.groupby("disease")[["auroc_best", "auroc_random"]].mean()
    diff = (per_disease["auroc_best"] - per_disease["auroc_random"]).to_numpy()
    low, high = bootstrap_ci(diff, seed=seed)
    state = best_dir / STATE_FILE  # the epoch whose probes the checkpoint carries
    epoch = json.loads(state.read_text()).get("objective_epoch") if state.is_file() else None
    return {"best": float(per_disease["auroc_best"].mean()), "random": float(per_disease["auroc_random"].mean()),
            "epoch": epoch,
            "difference": float(diff.mean()), "ci_low": low, "ci_high": high, "diseases": int(diff.size)}


def _data_params(data: SweepData) -> dict[str, Any]:
    """The sweep's data, as params of its MLflow parent run."""
    return {"data.source": data.source.name, "data.root": str(data.source.root or ""),
            "data.cache": str(data.cache.path), "data.eval_source": data.eval_source.name,
            "data.eval_root": str(data.eval_source.root or ""), "data.eval_cache": str(data.eval_cache.path),
            "data.episodes": len(data.episodes), "data.findings": int(data.episodes["disease"].nunique())}


def error_causes(results) -> dict[str, str]:
    """trial id -> the cause of its error, read from the exception, its ``error.txt`` and its
    ``trial.log``: an OS error (``OSError: [Errno 28] No space left on device``) where one is in
    the chain, since the last exception of a chain often hides it, else the last error line."""
    import shutil

    from trainables._log import TRIAL_LOG

    causes: dict[str, str] = {}
    for result in results:
        if result.error is None:
            continue
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.rsplit("_", 1)[-1]
        texts = [str(result.error)]
        for name in ("error.txt", TRIAL_LOG):
            path = Path(result.path) / name
            if path.is_file():
                texts.append(path.read_text(errors="replace"))
        lines = [l.strip() for text in texts for l in text.splitlines()
                 if l.strip() and not l.strip().startswith(("File ", "^", "Traceback"))]
        os_errors = [l for l in lines if "[Errno " in l]
        named = [l for l in lines if "Error" in l or "Exception" in l]
        cause = (os_errors or named or lines or ["see its error.txt"])[-1 if not os_errors else 0]
        if "[Errno 28]" in cause:
            try:
                free = shutil.disk_usage(result.path).free
                cause += f" ({free / 1e6:.1f} MB free now in {result.path})"
            except OSError:
                pass
        causes[trial_id] = cause[:300]
    return causes


def _write_table(table: pd.DataFrame, path: Path) -> None:
    """``trials.csv``, replaced whole (a Ctrl-C mid-write leaves the previous one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(path)


def summarise(results, sweep: PretrainSweep, spec, folder: Path, data: SweepData | None = None,
              emit=None) -> dict[str, Any]:
    """The trials table, the best checkpoint against random init, and its export; returns them
    with the text. ``emit`` (e.g. ``print``) shows the table as soon as it is known, before the
    comparison and the export run, and the rest after."""
    from cxrtune.export import export_best

    table = trials_table(results, sweep)
    lines = ["", "trials:", table.to_string(index=False, float_format=lambda v: f"{v:.4g}"), ""]
    if data is not None:
        lines.insert(1, f"pretrained on {data.source.name}, validated on {data.eval_source.name} "
                        f"({len(data.episodes)} episodes over {data.episodes['disease'].nunique()} findings)")
    scored = table.dropna(subset=[sweep.objective])
    summary: dict[str, Any] = {"table": table}
    causes = error_causes(results)
    if causes:
        lines.append(f"{len(causes)} trial(s) errored:")
        lines += [f"  trial {trial}: {cause}" for trial, cause in causes.items()]
    if len(table) == 0 or (table["status"] == "errored").all():
        summary["failed"] = (f"no trial of sweep {spec.name} completed"
                             + (f" ({len(causes)} errored; first cause: {next(iter(causes.values()))})" if causes else "")
                             + f"; trial folders and logs are in {folder}")
    _write_table(table, folder / "trials.csv")
    if scored.empty:
        lines.append("no trial reported the objective; nothing to export")
        summary["text"] = "\n".join(lines)
        if emit is not None:
            emit(summary["text"])
        return summary
    shown = len(lines)
    if emit is not None:
        emit("\n".join(lines))
    # The best checkpoint is the export's: the best report whose checkpoint is still on disk
    # (Tune's "best result" can name a report whose checkpoint num_to_keep has deleted).
    from cxrtune.export import best_report

    try:
        pick = best_report(folder, sweep.objective, "max")
    except CxrtuneError:
        pick = None
    if pick is not None:
        comparison = paired_difference(pick.checkpoint.parent, sweep.objective)
        if comparison is not None:
            verdict = ("the CI lies above zero: the best trial beats random init on these episodes"
                       if comparison["ci_low"] > 0 else
                       "the CI includes zero (or lies below it): no gain over random init is shown")
            lines.append(
                f"best trial {pick.trial_id} at epoch {comparison['epoch']}: "
                f"{sweep.objective} {comparison['best']:.3f} "
                f"vs random init {comparison['random']:.3f} "
                f"on the same episodes: difference {comparison['difference']:+.3f}, 95% CI "
                f"[{comparison['ci_low']:+.3f}, {comparison['ci_high']:+.3f}] over {comparison['diseases']} findings; "
                + verdict)
            summary["comparison"] = comparison
    try:
        out = export_best(folder, sweep.objective, "max", force=True)
        lines.append(f"exported the best checkpoint to {out}")
        summary["export"] = out
    except CxrtuneError as err:
        lines.append(f"export skipped: {err}")
    summary["text"] = "\n".join(lines)
    if emit is not None:
        emit("\n".join(lines[shown:]))
    return summary
