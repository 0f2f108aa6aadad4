"""One report per sweep: ``python analysis/report.py --sweep NAME [--storage DIR]`` (or
``cxrtune report``).

Writes ``<storage>/<sweep>/report/``: ``report.html`` (self-contained: figures embedded as data
URIs, opens offline), ``report.md`` and ``tables/*.csv`` (the same tables), ``figures/*.png``. The
folder is built under a temporary name and renamed into place, so a failed run leaves the previous
report intact. When the sweep has an MLflow parent run (tag ``cxrtune.sweep = NAME``) in the
tracking store, the folder is logged as its ``report/`` artifacts.

Sections: status, the study's tables (when a results.parquet exists), shot curves and the
disease x shots heatmap, the search, training health, localisation with Grad-CAM, cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from analysis import figures, webpage  # noqa: E402
from analysis.gradcam import GradcamConfig  # noqa: E402
from analysis.palette import palette  # noqa: E402
from analysis.sweep_folder import SweepFolder, load_sweep  # noqa: E402
from analysis.tables import fmt, study_summary, to_markdown, wide_study_table  # noqa: E402
from cxrtune.config import Config, param  # noqa: E402
from cxrtune.errors import CxrtuneError  # noqa: E402


@dataclasses.dataclass
class ReportConfig(Config):
    """Every choice the report makes, with its default."""

    gradcam: bool = param(True, doc="compute Grad-CAM panels and localisation scores (minutes on CPU at 224 px)")
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


class _Builder:
    """Accumulates sections, tables (for CSV/Markdown) and figures (PNG copies)."""

    def __init__(self, title: str, colours: dict[str, str]) -> None:
        self.colours = colours
        self.sections: list[tuple[str, str, str]] = []
        self.tables: dict[str, pd.DataFrame] = {}
        self.figures: dict[str, str] = {}
        self.markdown: list[str] = [f"# {title}\n"]
        self._section_start = 1  # where the current section's Markdown begins

    def table(self, key: str, frame: pd.DataFrame, title: str) -> str:
        self.tables[key] = frame
        self.markdown.append(f"### {title}\n\n{to_markdown(frame)}")
        return f"<h3>{webpage.html.escape(title)}</h3>" + webpage.table_html(frame, key, self.colours)

    def figure(self, key: str, fig, alt: str) -> str:
        uri = webpage.figure_uri(fig)
        self.figures[key] = uri
        self.markdown.append(f"![{alt}](figures/{key}.png)\n")
        return f'<img alt="{webpage.html.escape(alt)}" src="{uri}">'

    def section(self, anchor: str, title: str, parts: list[str]) -> None:
        self.sections.append((anchor, title, "".join(parts)))
        self.markdown.insert(self._section_start, f"## {title}\n")
        self._section_start = len(self.markdown)

    def note(self, text: str, kind: str = "note") -> str:
        self.markdown.append(f"> {text}\n")
        return webpage.note(text, kind)


def build_report(name: str, storage: str | Path = "./cxrtune-runs", results: list[str | Path] | None = None,
                 config: ReportConfig | None = None, objective: str | None = None, progress=print) -> Report:
    """Read the sweep, build every section, write ``<sweep>/report/`` atomically, log to MLflow."""
    config = config or ReportConfig()
    sweep = load_sweep(name, storage, results, objective)
    names = set()
    if sweep.results is not None:
        names |= set(sweep.results["backbone"].astype(str))
    arch = _first_params(sweep).get("model.arch", "resnet18")
    names |= {sweep.name, f"random-{arch}", f"imagenet-{arch}"}
    b = _Builder(f"Sweep report: {sweep.name}", palette(names))
    _status_section(b, sweep)
    _study_section(b, sweep, config)
    _search_section(b, sweep, config)
    _health_section(b, sweep)
    _localisation_section(b, sweep, config, progress)
    _cost_section(b, sweep)

    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = (f"{sweep.folder.resolve()} · {len(sweep.trials)} trial folder(s) · objective {sweep.objective or '–'} · "
            f"written {created}")
    page = webpage.page(f"Sweep report: {sweep.name}", meta, b.sections)
    out = _write(sweep.folder / "report", page, b)
    run_id = _log_to_mlflow(sweep.name, out, config, sweep.folder) if config.log_to_mlflow else None
    return Report(folder=out, html=out / "report.html", tables=b.tables, notes=sweep.notes, mlflow_run=run_id)


def _first_params(sweep: SweepFolder) -> dict[str, Any]:
    """A trial's params with the sweep's data inputs (``inputs.json``; older sweeps kept them in
    the params)."""
    from cxrtune.sweepstate import read_inputs

    params = dict(sweep.trials["_params"].iloc[0]) if not sweep.trials.empty else {}
    return {**params, **read_inputs(sweep.folder)}


# -- sections --------------------------------------------------------------------------------------
def _status_section(b: _Builder, sweep: SweepFolder) -> None:
    parts = []
    for text in sweep.notes:
        parts.append(b.note(text, "warn"))
    counts = sweep.trials["status"].value_counts() if not sweep.trials.empty else pd.Series(dtype=int)
    order = ["completed", "pruned", "collapsed", "diverged", "errored", "running"]
    frame = pd.DataFrame({"status": order + sorted(set(counts.index) - set(order)),})
    frame["trials"] = [int(counts.get(s, 0)) for s in frame["status"]]
    parts.append(b.table("status_counts", frame, "Trials by final status"))
    if sweep.results_paths:
        parts.append(webpage.paragraph("Results tables read: " + ", ".join(str(p) for p in sweep.results_paths)))
    b.section("status", "Status", parts)


def _study_section(b: _Builder, sweep: SweepFolder, config: ReportConfig) -> None:
    if sweep.results is None:
        b.section("study", "Study tables", [b.note(
            "No few-shot results table for this sweep: run sweeps/compare_methods.py --from-sweeps "
            f"{sweep.name} (or sweeps/fewshot_grid.py), then pass its results.parquet with --results. "
            "The search and training sections below do not need it.")])
        return
    results = sweep.results
    summary = study_summary(results, seed=config.seed)
    parts = [webpage.paragraph(
        "Mean over findings of each finding's mean AUROC over trials (the study's summary); 95% CI: percentile "
        "bootstrap over findings. p-values: paired t-test / Wilcoxon signed-rank over the per-finding means, "
        "against each baseline with the same evaluator.")]
    parts.append(b.table("study_table", wide_study_table(summary), "Mean AUROC by shots"))
    b.tables["study_summary"] = summary  # the long form, with full-precision numbers, for CSV
    parts.append(b.figure("shot_curves", figures.shot_curves(summary, b.colours), "AUROC vs shots"))
    from analysis.tables import disease_shots_table

    per_disease = {key: disease_shots_table(results, *key)
                   for key in sorted(set(zip(results["backbone"], results["evaluator"])))}
    parts.append(b.figure("disease_heatmap", figures.disease_heatmaps(per_disease), "AUROC per finding and shots"))
    b.section("study", "Study tables and shot curves", parts)


def _search_section(b: _Builder, sweep: SweepFolder, config: ReportConfig) -> None:
    trials = sweep.trials
    if trials.empty or not sweep.objective:
        b.section("search", "Search", [b.note("No pretraining trial has reported yet: nothing to show about the search.")])
        return
    parts = []
    shown = trials[["trial", "status", "epochs", "objective", "random_init", *sweep.searched]].copy()
    for column in ("objective", "random_init"):
        shown[column] = shown[column].map(fmt)
    for key in sweep.searched:
        shown[key] = shown[key].map(lambda v: f"{v:.4g}" if isinstance(v, (int, float)) and math.isfinite(v) else "–")
    shown = shown.rename(columns={"objective": sweep.objective, "random_init": f"{sweep.objective} random init"})
    parts.append(b.table("trials", shown, "Trials (in order of start)"))
    scored = trials.dropna(subset=["objective"])
    if not scored.empty:
        best = scored.loc[scored["objective"].astype(float).idxmax()]
        parts.append(webpage.paragraph(
            f"Best trial {best['trial']}: {sweep.objective} {fmt(float(best['objective']))} "
            f"(random init on the same episodes: {fmt(float(best['random_init']))})."))
        parts.append(b.figure("search_progress", figures.search_progress(trials, sweep.objective), "search progress"))
    importances = None
    if sweep.study is None:
        parts.append(b.note("No Optuna study (optuna.db) in the sweep folder: parameter importance is not available."))
    elif (finished := _completed(sweep.study)) < config.importance_min_trials:
        parts.append(b.note(
            f"Parameter importance needs at least {config.importance_min_trials} completed Optuna trials; this sweep "
            f"has {finished}. With fewer, Optuna's fANOVA forest is fitted on too few points to rank parameters."))
    else:
        importances = _importances(sweep.study)
        if importances is None:
            parts.append(b.note("Optuna could not compute parameter importances (all trials share one value, "
                                "or no completed trial holds every parameter)."))
        else:
            frame = pd.DataFrame({"parameter": list(importances), "importance": [fmt(v) for v in importances.values()]})
            parts.append(b.table("importance", frame, "Parameter importance (fANOVA, share of variance)"))
            parts.append(b.figure("importance", figures.importance_bars(importances), "parameter importance"))
    if sweep.searched and not scored.empty:
        parts.append(b.figure("objective_vs_params", figures.objective_vs_params(scored, sweep.searched, sweep.objective),
                              "objective against each searched parameter"))
    b.section("search", "Search", parts)


def _completed(study) -> int:
    import optuna

    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def _importances(study) -> dict[str, float] | None:
    import optuna

    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # seeded: the same report twice
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return None


def _health_section(b: _Builder, sweep: SweepFolder) -> None:
    history = sweep.history
    if history.empty or history["ssl_loss"].isna().all():
        b.section("health", "Training health", [b.note("No per-epoch pretraining metrics in this sweep folder.")])
        return
    status_of = dict(zip(sweep.trials["trial"], sweep.trials["status"]))
    parts = [webpage.paragraph(
        "One line per trial, coloured by its final status. A collapse shows as feature std and effective rank "
        "falling towards zero/one while the loss keeps dropping; a divergence as a loss that jumps or ends early.")]
    parts.append(b.figure("training_health", figures.training_health(history, status_of), "training health"))
    b.section("health", "Training health", parts)


def _auroc_beside(sweep: SweepFolder, label: str, finding: str, shots: int | None) -> float:
    """AUROC of ``label`` on ``finding``: the results table's probe at its largest shots, else the
    sweep's own probe files (best checkpoint / random init) at the objective's shots."""
    results = sweep.results
    if results is not None and label in set(results["backbone"]):
        part = results[(results["backbone"] == label) & (results["disease"] == finding)]
        part = part[part["evaluator"] == "probe"] if (part["evaluator"] == "probe").any() else part
        if not part.empty:
            return float(part[part["shots"] == part["shots"].max()]["auroc"].mean())
    from analysis.localise import best_checkpoint_dir, initial_results

    path = None
    best = best_checkpoint_dir(sweep.folder, sweep.objective)
    if label == sweep.name and best is not None:
        path = best / "probe_results.parquet"
    elif label.startswith("random-") and best is not None:
        path = initial_results(best)
    if path is None or not path.is_file():
        return math.nan
    table = pd.read_parquet(path)
    table = table[(table["disease"] == finding) & ((table["shots"] == shots) if shots else True)]
    return float(table["auroc"].mean()) if not table.empty else math.nan


def _localisation_section(b: _Builder, sweep: SweepFolder, config: ReportConfig, progress) -> None:
    anchor, title = "localisation", "Localisation (Grad-CAM)"
    if not config.gradcam:
        b.section(anchor, title, [b.note("Grad-CAM was switched off (--no-gradcam).")])
        return
    params = _first_params(sweep)
    cache_path = params.get("trial.eval_cache") or params.get("trial.cache")  # where the episodes live
    if sweep.trials.empty or not cache_path or not Path(cache_path).is_dir():
        b.section(anchor, title, [b.note(
            "Grad-CAM needs a pretraining trial's image cache (params.json trial.cache)"
            + (f"; {cache_path} does not exist on this machine." if cache_path else "; this sweep has none."))])
        return
    from analysis.ground_truth import BBOX_FILE, GroundTruth
    from analysis.localise import localise, sweep_backbones
    from cxrtune.data.cache import ImageCache
    from cxrtune.data.tasks import load_episodes

    cache = ImageCache.open(cache_path)
    boxes = config.boxes or _default_boxes(cache)
    truth = GroundTruth(cache, boxes)
    if not truth.available():
        b.section(anchor, title, [b.note(
            f"No ground truth for this source: phantom caches carry masks; for NIH pass --boxes {BBOX_FILE}.")])
        return
    episodes_path = Path(params.get("trial.episodes", sweep.folder / "episodes.parquet"))
    if not episodes_path.is_file():
        b.section(anchor, title, [b.note(f"Grad-CAM needs the sweep's episodes to know its findings; {episodes_path} "
                                         "is missing.", "warn")])
        return
    diseases = sorted(load_episodes(episodes_path)["disease"].unique())
    entries = sweep_backbones(sweep.folder, sweep.objective, params, config.imagenet_weights)
    progress(f"Grad-CAM: {sum(e.backbone is not None for e in entries)} backbones x {len(diseases)} findings "
             f"at {config.cam.input_size} px")
    result = localise(entries, cache, diseases, truth, config.cam)
    parts = [webpage.paragraph(
        f"Ground truth: {result.ground_truth}. Per finding, a logistic head is fitted on all training positives "
        f"and negatives, and Grad-CAM of its logit is taken on the backbone's last stage for up to "
        f"{config.cam.max_images} evaluation positives with a region. Pointing game: the heatmap's maximum lies "
        "inside the region. Energy: share of the heatmap inside it (chance = the region's area share). "
        "95% CIs: bootstrap over images. Panels: one evaluation positive per finding; the heatmap over the "
        "image, × at its maximum, the ground truth outlined in white.")]
    for entry in result.backbones:
        if entry.backbone is None:
            parts.append(b.note(f"{entry.label}: {entry.note}"))
    for text in result.notes:
        parts.append(b.note(text))
    if not result.summary.empty:
        shots = int(sweep.objective.rsplit("_", 1)[1].replace("shot", "")) if sweep.objective else None
        s = result.summary
        frame = pd.DataFrame({
            "finding": s["finding"], "backbone": s["backbone"], "images": s["images"],
            "AUROC": [fmt(_auroc_beside(sweep, bb, f, shots)) for f, bb in zip(s["finding"], s["backbone"])],
            "pointing hit rate [95% CI]": [f"{fmt(v, 2)} [{fmt(lo, 2)}, {fmt(hi, 2)}]"
                                           for v, lo, hi in zip(s["hit_rate"], s["hit_ci_low"], s["hit_ci_high"])],
            "energy inside [95% CI]": [f"{fmt(v, 2)} [{fmt(lo, 2)}, {fmt(hi, 2)}]"
                                       for v, lo, hi in zip(s["energy"], s["energy_ci_low"], s["energy_ci_high"])],
            "chance (area)": [fmt(v, 2) for v in s["chance"]]})
        parts.append(b.table("localisation", frame, "Localisation beside AUROC, per finding and backbone"))
        b.tables["localisation_scores"] = result.scores
        parts.append(b.figure("localisation", figures.localisation_bars(result.summary, b.colours), "localisation scores"))
        parts.append(b.figure("gradcam", figures.gradcam_panels(result.examples, result.backbones, b.colours),
                              "Grad-CAM panels"))
    b.section(anchor, title, parts)


def _default_boxes(cache) -> str | None:
    """<source root>/BBox_List_2017.csv when the cache was built from an NIH root that has it."""
    import ast

    from analysis.ground_truth import BBOX_FILE

    described = cache.report.get("source")
    try:
        described = ast.literal_eval(described) if isinstance(described, str) else dict(described or {})
        root = described.get("root")
    except (ValueError, SyntaxError, AttributeError):
        return None
    path = Path(root) / BBOX_FILE if root else None
    return str(path) if path is not None and path.is_file() else None


def _cost_section(b: _Builder, sweep: SweepFolder) -> None:
    trials = sweep.trials
    if trials.empty:
        b.section("cost", "Cost", [b.note("No trial has reported yet.")])
        return
    frame = pd.DataFrame({
        "trial": trials["trial"], "status": trials["status"], "epochs": trials["epochs"],
        "wall time (min)": [fmt(v / 60, 2) for v in trials["wall_time_s"]],
        "images/s": [fmt(v, 1) for v in trials["images_per_s"]],
        "CPUs": [fmt(v, 1) for v in trials["cpu"]], "GPU share": [fmt(v, 2) for v in trials["gpu"]],
        "GPU hours": [fmt(g * w / 3600, 3) for g, w in zip(trials["gpu"], trials["wall_time_s"])]})
    wall = trials["wall_time_s"].astype(float)
    total = pd.DataFrame({
        "trials": [len(trials)], "trial time (h)": [fmt(wall.sum() / 3600, 3)],
        "CPU hours": [fmt(float((trials["cpu"].astype(float) * wall).sum()) / 3600, 3)],
        "GPU hours": [fmt(float((trials["gpu"].astype(float) * wall).sum()) / 3600, 3)],
        "sweep wall clock (min)": [fmt(_sweep_span(trials) / 60, 2)]})
    parts = [b.table("cost", frame, "Per trial"), b.table("cost_total", total, "Sweep total"),
             b.figure("cost", figures.cost_bars(trials), "cost per trial")]
    b.section("cost", "Cost", parts)


def _sweep_span(trials: pd.DataFrame) -> float:
    """First trial start to last trial end, in seconds."""
    starts = trials["started"].astype(float)
    ends = starts + trials["wall_time_s"].astype(float)
    return float(ends.max() - starts.min()) if starts.notna().any() else math.nan


# -- output ----------------------------------------------------------------------------------------
def _write(final: Path, page: str, b: _Builder) -> Path:
    """Build the report folder beside its final place, then swap it in."""
    import base64

    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a report is meant to be read
    try:
        (tmp / "report.html").write_text(page, encoding="utf-8")
        (tmp / "report.md").write_text("\n".join(b.markdown), encoding="utf-8")
        (tmp / "tables").mkdir()
        for key, frame in b.tables.items():
            frame.to_csv(tmp / "tables" / f"{key}.csv", index=False)
        (tmp / "figures").mkdir()
        for key, uri in b.figures.items():
            (tmp / "figures" / f"{key}.png").write_bytes(base64.b64decode(uri.split(",", 1)[1]))
        old = None
        if final.exists():
            old = final.with_name(f".report-old-{os.getpid()}")
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _log_to_mlflow(name: str, folder: Path, config: ReportConfig, sweep_folder: Path | None = None) -> str | None:
    """Log the report as ``report/`` artifacts of the sweep's parent run; None when there is none.
    The run is found by the sweep's id (its ``sweep.json``; by name for sweeps made before ids),
    in the sweep's recorded store unless a tracking URI is given. A missing SQLite store is not
    created."""
    from cxrtune.sweepstate import read_identity
    from cxrtune.tracking import ROLE_TAG, SWEEP_ID_TAG, SWEEP_TAG, tracking_uri

    identity = read_identity(sweep_folder) if sweep_folder is not None else None
    uri = tracking_uri(config.tracking_uri or (identity or {}).get("tracking_uri"))
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(f"cxrtune/{name}")
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=(f"tags.`{SWEEP_ID_TAG}` = '{identity['sweep_id']}'" if identity else
                                             f"tags.`{SWEEP_TAG}` = '{name}'") + f" and tags.`{ROLE_TAG}` = 'sweep'",
                              max_results=1)
    if not runs:
        return None
    run_id = runs[0].info.run_id
    client.log_artifacts(run_id, str(folder), "report")
    return run_id


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
