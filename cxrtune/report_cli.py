"""``cxrtune report`` and ``cxrtune compare``: the command-line doors to :mod:`cxrtune.analysis`.

The options are declared here (``python analysis/report.py`` uses the same ones); the analysis
package (matplotlib, grad-cam) is imported only inside the commands, so ``cxrtune --help`` and
every other command stay fast.
"""

from __future__ import annotations

import argparse


def report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", required=True, help="sweep name (its folder under --storage)")
    parser.add_argument("--storage", default="./cxrtune-runs", help="where sweeps live (default ./cxrtune-runs)")
    parser.add_argument("--results", action="append", default=[], metavar="PARQUET",
                        help="a tidy results table (compare_methods / fewshot_grid / cxrtune evaluate); repeatable. "
                             "<sweep>/results.parquet is read when present")
    parser.add_argument("--objective", default=None, help="metric the sweep maximised (default: from trials.csv)")
    parser.add_argument("--no-gradcam", action="store_true", help="skip Grad-CAM and localisation (fast)")
    parser.add_argument("--imagenet-weights", default=None, metavar="PATH",
                        help="local torchvision ImageNet weights for the Grad-CAM baseline (nothing is downloaded)")
    parser.add_argument("--boxes", default=None, metavar="CSV",
                        help="NIH BBox_List_2017.csv (default: the one in the NIH root the cache was built from)")
    parser.add_argument("--gradcam-size", type=int, default=None,
                        help="backbone input side for Grad-CAM in px, 32 to 4096 "
                             "(default 224: a 7x7 last-stage map)")
    parser.add_argument("--gradcam-images", type=int, default=None,
                        help="evaluation positives per finding scored at most, >= 1 (default 24)")
    parser.add_argument("--gradcam-findings", default=None, metavar="A,B",
                        help="comma-separated findings for Grad-CAM (default: every finding of the episodes)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")


def compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_OR_SWEEP",
                        help="sweep names (under --storage), sweep folders, checkpoints or export folders")
    parser.add_argument("--storage", default="./cxrtune-runs", help="where sweeps live (default ./cxrtune-runs)")
    parser.add_argument("--episodes", default=None, help="episodes Parquet for checkpoints (default: the first sweep's)")
    parser.add_argument("--cache", default=None, help="image cache folder for checkpoints (default: the first sweep's)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="probe input side in px, 16 to 4096 (default: the sweep's)")
    parser.add_argument("--out", default=None, help="also write the table as CSV here")


def _check_int(flag: str, value: int | None, low: int, high: int | None, what: str) -> None:
    from cxrtune.engine.cli import check_int_flag

    check_int_flag(flag, value, low, high, what)


def check_report_arguments(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers before the sweep is read (``--gradcam-size 0`` is no default)."""
    _check_int("--gradcam-size", args.gradcam_size, 32, 4096, "the Grad-CAM input side (px)")
    _check_int("--gradcam-images", args.gradcam_images, 1, None, "the number of positives per finding")


def check_compare_arguments(args: argparse.Namespace) -> None:
    _check_int("--input-size", args.input_size, 16, 4096, "the probe input side (px)")


def _add(commands, name: str, help: str, description: str, arguments, func) -> None:
    parser = commands.add_parser(name, help=help, description=description)
    arguments(parser)
    parser.set_defaults(func=func)


def add_report_parser(commands) -> None:
    _add(commands, "report", "write a sweep's HTML report (tables, curves, search, health, Grad-CAM, cost)",
         "Self-contained HTML report plus Markdown and CSV tables in <storage>/<sweep>/report/, logged to the "
         "sweep's MLflow parent run when it exists.", report_arguments, _run_report)


def add_compare_parser(commands) -> None:
    _add(commands, "compare", "side-by-side table of sweeps or checkpoints on the same episodes",
         "Sweeps contribute their best trial and random init; checkpoints are probed on the episodes. "
         "Runs scored on different episodes are refused.", compare_arguments, _run_compare)


def _run_report(args: argparse.Namespace) -> int:
    from cxrtune.analysis.report import run

    return run(args)


def _run_compare(args: argparse.Namespace) -> int:
    from cxrtune.analysis.compare import run

    check_compare_arguments(args)
    return run(args)
