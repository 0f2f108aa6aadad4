"""One report per sweep: ``python analysis/report.py --sweep NAME [--storage DIR]`` (or
``cxrtune report``).

Writes ``<storage>/<sweep>/report/``: ``report.html`` (self-contained: figures embedded as data
URIs, opens offline), ``report.md`` and ``tables/*.csv`` (the same tables), ``figures/*.png``. The
folder is built under a temporary name and renamed into place, so a failed run leaves the previous
report intact. When the sweep has an MLflow parent run (tag ``cxrtune.sweep = NAME``) in the
tracking store, the folder is logged as its ``report/`` artifacts.

Sections (:mod:`cxrtune.analysis.sections`): status, the study's tables (when a results.parquet exists),
shot curves and the disease x shots heatmap, the search, training health, localisation with
Grad-CAM, cost. Grad-CAM takes minutes; the rest takes seconds, so a report written at the end of
every sweep uses ``ReportConfig(localisation=False)``, which leaves the section out.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    try:
        import cxrtune  # noqa: F401  (installed)
    except ImportError:  # from a checkout that is not installed
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from cxrtune.analysis import document, webpage  # noqa: E402
from cxrtune.analysis.gradcam import GradcamConfig  # noqa: E402
from cxrtune.analysis.report_folder import log_to_mlflow, write_report_folder  # noqa: E402
from cxrtune.analysis.sections import build_sections, sweep_colours  # noqa: E402
from cxrtune.analysis.sweep_folder import load_sweep  # noqa: E402
from cxrtune.config import Config, param  # noqa: E402
from cxrtune.errors import CxrtuneError  # noqa: E402


@dataclasses.dataclass
class ReportConfig(Config):
    """Every choice the report makes, with its default."""

    localisation: bool = param(True, doc="include the localisation section; False leaves it out of the page "
                                         "(the report written at the end of every sweep, in seconds)")
    gradcam: bool = param(True, doc="compute Grad-CAM panels and localisation scores (minutes on CPU at 224 px); "
                                    "False keeps the section with a note saying so (--no-gradcam)")
    imagenet_weights: str | None = param(None, doc="local torchvision ImageNet weights for the Grad-CAM baseline")
    boxes: str | None = param(None, doc="NIH BBox_List_2017.csv (default: <source root>/BBox_List_2017.csv if present)")
    importance_min_trials: int = param(
        5, low=2, doc="completed Optuna trials needed before Optuna's importances are shown (fewer: a forest fit on noise)")
    seed: int = param(0, doc="bootstrap seed of every CI")
    log_to_mlflow: bool = param(True, doc="log the report folder to the sweep's MLflow parent run when it exists")
    tracking_uri: str | None = param(None, doc="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    cam: GradcamConfig = param(default_factory=GradcamConfig)


@dataclasses.dataclass
class Report:
    folder: Path
    html: Path
    tables: dict[str, pd.DataFrame]
    notes: list[str]
    mlflow_run: str | None


def build_report(name: str, storage: str | Path = "./cxrtune-runs", results: list[str | Path] | None = None,
                 config: ReportConfig | None = None, objective: str | None = None, progress=print) -> Report:
    """Read the sweep, build every section, write ``<sweep>/report/`` atomically, log to MLflow."""
    config = config or ReportConfig()
    sweep = load_sweep(name, storage, results, objective)
    colours = sweep_colours(sweep)
    sections = build_sections(sweep, config, colours, progress)
    title = f"Sweep report: {sweep.name}"
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = (f"{sweep.folder.resolve()} · {len(sweep.trials)} trial folder(s) · objective {sweep.objective or '–'} · "
            f"written {created}")
    tables = document.all_tables(sections)
    out = write_report_folder(sweep.folder / "report", webpage.page(title, meta, sections, colours),
                              document.markdown(title, sections), tables, document.pngs(sections))
    run_id = log_to_mlflow(sweep.name, out, sweep.folder, config.tracking_uri) if config.log_to_mlflow else None
    return Report(folder=out, html=out / "report.html", tables=tables, notes=sweep.notes, mlflow_run=run_id)


# -- command line ----------------------------------------------------------------------------------
def config_from_args(args: argparse.Namespace) -> ReportConfig:
    findings = tuple(f.strip() for f in args.gradcam_findings.split(",") if f.strip()) if args.gradcam_findings else None
    cam = {k: v for k, v in (("input_size", args.gradcam_size), ("max_images", args.gradcam_images),
                             ("findings", findings)) if v is not None}
    return ReportConfig(gradcam=not args.no_gradcam, imagenet_weights=args.imagenet_weights, boxes=args.boxes,
                        tracking_uri=args.tracking_uri, cam=GradcamConfig(**cam))


def check_results_files(paths: list[str | Path]) -> None:
    """Each ``--results`` must be an existing Parquet file: refused here, naming it, before the sweep is read.

    Only the file's footer (its schema) is read; the tidy columns are checked when it is loaded.
    """
    import pyarrow.parquet as pq

    expected = "a tidy results table in Parquet (written by cxrtune evaluate, compare_methods or fewshot_grid)"
    for path in map(Path, paths):
        if not path.exists():
            raise CxrtuneError(f"--results {path} does not exist: expected {expected}")
        if not path.is_file():
            raise CxrtuneError(f"--results {path} is not a file: expected {expected}")
        try:
            pq.read_schema(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
            kind = "an empty file" if path.stat().st_size == 0 else "not a Parquet file"
            raise CxrtuneError(f"--results {path} is {kind} ({type(exc).__name__}: {exc}): "
                               f"expected {expected}") from exc


def run(args: argparse.Namespace) -> int:
    from cxrtune.report_cli import check_report_arguments

    check_report_arguments(args)
    check_results_files(args.results)
    if args.imagenet_weights is not None and not Path(args.imagenet_weights).is_file():
        raise CxrtuneError(f"--imagenet-weights {args.imagenet_weights} does not exist: pass a local torchvision "
                           "weights file, or leave the option out (the ImageNet panel then says it is absent)")
    report = build_report(args.sweep, args.storage, args.results, config_from_args(args), args.objective)
    for text in report.notes:
        print(f"note: {text}")
    print(f"report: {report.html}")
    if report.mlflow_run:
        print(f"logged to MLflow run {report.mlflow_run} (artifacts report/)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from cxrtune.report_cli import report_arguments

    parser = argparse.ArgumentParser(prog="python analysis/report.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    report_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CxrtuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
