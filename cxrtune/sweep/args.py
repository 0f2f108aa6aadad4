"""The command line every sweep shares (pretraining and few-shot), and what a sweep records of it.

A sweep records its data, profile, ``--set`` values and other arguments in ``sweep.json`` when it
is created (:mod:`cxrtune.sweepstate`); ``--resume`` takes them from there and refuses a value
given again that differs. Flags that a resume takes from the record default to ``None`` here, so
that a value left out can be told from one given again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from cxrtune.profiles import PROFILES

#: defaults of the recorded arguments
RECORD_DEFAULTS = {"profile": "default", "source": "phantom", "seed": 0, "audit_fraction": 0.0}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``0`` is refused, never read as "the default")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; use an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range; use an integer >= 1")
    return value


def share(text: str) -> float:
    """argparse type: a share between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; use a share between 0 and 1") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is out of range; use a share between 0 and 1")
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


def add_common_arguments(parser: argparse.ArgumentParser, default_name: str, gpu_help: str | None = None) -> None:
    """Data, profile, sweep folder, cluster, tracking, resume, ``--set`` and ``--print-config``
    (``gpu_help``: the sweep's own text for ``--gpu``'s default)."""
    from cxrtune.sweep.runner import DEFAULT_STORAGE

    parser.add_argument("--profile", default=None, choices=tuple(PROFILES), help="budget and scale (default: default)")
    parser.add_argument("--source", default=None, help="data source: phantom (embedded, the default), nih, padchest, csv")
    parser.add_argument("--root", default=None, help="folder of the source's files")
    parser.add_argument("--option", "-o", action="append", metavar="KEY=VALUE", help="source option, repeatable")
    parser.add_argument("--name", default=None, help=f"sweep name, the folder under --storage (default: {default_name})")
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
                        help=gpu_help or "GPU share per trial (default: the profile's); refused on a cluster without GPUs")
    parser.add_argument("--cpus", type=positive_int, default=None, help="CPUs Ray may use on this machine (default: all)")
    parser.add_argument("--max-concurrent", type=positive_int, default=None,
                        help="trials at once (default: the profile's, or as resources allow)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own progress tables and logs here instead of in <sweep>/ray-console.log")
    parser.add_argument("--print-config", action="store_true",
                        help="print a trial's config with where each value comes from (defaults, method preset, "
                             "profile, sweep script, --set, search space) and exit; nothing is run or written")
    parser.add_argument("--no-report", action="store_true",
                        help="do not write the sweep's HTML report (<sweep>/report/) when it ends")


def add_eval_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-source", default=None,
                        help="source of the validation episodes and the probe's images (default: --source)")
    parser.add_argument("--eval-root", default=None, help="folder of the evaluation source's files")
    parser.add_argument("--eval-option", action="append", metavar="KEY=VALUE",
                        help="evaluation source option, repeatable")


def _folder(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


#: recorded key -> (argparse attribute, how it is recorded)
_RECORDED = {
    "profile": ("profile", None), "source": ("source", None), "root": ("root", _folder),
    "options": ("option", sorted), "eval_source": ("eval_source", None), "eval_root": ("eval_root", _folder),
    "eval_options": ("eval_option", sorted), "set": ("set", sorted), "seed": ("seed", None),
    "num_samples": ("num_samples", None), "audit_fraction": ("audit_fraction", None),
    "budget_hours": ("budget_hours", None), "grace_period": ("grace_period", None),
    "reduction_factor": ("reduction_factor", None), "cache_size": ("cache_size", None),
    "no_report_split": ("no_report_split", None),
}


def sweep_record(args: argparse.Namespace, keys: Iterable[str] = tuple(_RECORDED)) -> dict[str, Any]:
    """What a sweep records when it is created and a resume checks (``None`` where the user gave nothing)."""
    record = {}
    for key in keys:
        attribute, form = _RECORDED[key]
        value = getattr(args, attribute, None)
        record[key] = (form(value) if value else None) if form is not None else value
    return record


def apply_record(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """Put the sweep's arguments (recorded, or given and defaulted) back on ``args``."""
    for key, (attribute, _) in _RECORDED.items():
        if key in record or hasattr(args, attribute):
            value = record.get(key)
            setattr(args, attribute, value if value is not None else RECORD_DEFAULTS.get(key))


def with_defaults(record: dict[str, Any]) -> dict[str, Any]:
    """A new sweep's record: the defaults of what the user left out."""
    return {**record, **{k: v for k, v in RECORD_DEFAULTS.items() if k in record and record.get(k) is None}}


def resume_hint(script: str, args: argparse.Namespace) -> str:
    """How to continue this sweep (or start it again when Tune never saved it)."""
    from cxrtune.sweep.runner import DEFAULT_STORAGE, sweep_dir

    name = args.name if args.name is not None else script
    folder = sweep_dir(name, args.storage)
    command = f"python sweeps/{script}.py --resume"
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


def run_command(sweep: Any, argv: list[str] | None, build_parser: Callable, run: Callable) -> int:
    """Parse ``argv`` and run the sweep: exit 2 with the message on a refused input, 130 on Ctrl-C
    before Tune took over (with how to continue)."""
    from cxrtune.errors import CxrtuneError

    args = build_parser(sweep).parse_args(argv)
    try:
        return run(sweep, args)
    except CxrtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted. {resume_hint(sweep.name, args)}", file=sys.stderr)
        return 130


def parse_sets(args: argparse.Namespace) -> dict[str, Any]:
    from cxrtune.cli import parse_options

    return parse_options(getattr(args, "set", None), "--set")
