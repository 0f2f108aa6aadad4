"""The sections of a sweep report, each a :class:`cxrtune.analysis.document.Section` built from the sweep
folder: status, the study's tables, the search, training health, localisation (Grad-CAM), cost.

A section that lacks its inputs still appears, with a note saying what is missing and how to get
it, so a reader knows the part was not forgotten."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pandas as pd

from cxrtune.analysis import figures
from cxrtune.analysis.document import Note, Paragraph, Section, Table, figure
from cxrtune.analysis.palette import palette
from cxrtune.analysis.sweep_folder import SweepFolder
from cxrtune.analysis.tables import disease_shots_table, fmt, study_summary, wide_study_table

if TYPE_CHECKING:
    from cxrtune.analysis.report import ReportConfig


def build_sections(sweep: SweepFolder, config: ReportConfig, colours: dict[str, str],
                   progress: Callable[[str], Any] = print) -> list[Section]:
    localisation = [localisation_section(sweep, config, colours, progress)] if config.localisation else []
    return [status_section(sweep), study_section(sweep, config, colours), search_section(sweep, config),
            health_section(sweep), fidelity_section(sweep), *localisation, cost_section(sweep)]


def sweep_colours(sweep: SweepFolder) -> dict[str, str]:
    """One colour per name the report can show, chosen together so that no two clash."""
    names = set(sweep.results["backbone"].astype(str)) if sweep.results is not None else set()
    arch = first_params(sweep).get("model.arch", "resnet18")
    return palette(names | {sweep.name, f"random-{arch}", f"imagenet-{arch}"})


def first_params(sweep: SweepFolder) -> dict[str, Any]:
    """A trial's params with the sweep's data inputs (``inputs.json``; older sweeps kept them in
    the params)."""
    from cxrtune.sweepstate import read_inputs

    params = dict(sweep.trials["_params"].iloc[0]) if not sweep.trials.empty else {}
    return {**params, **read_inputs(sweep.folder)}


# -- status ----------------------------------------------------------------------------------------
def status_section(sweep: SweepFolder) -> Section:
    blocks = [Note(text, warn=True) for text in sweep.notes]
    counts = sweep.trials["status"].value_counts() if not sweep.trials.empty else pd.Series(dtype=int)
    order = ["completed", "pruned", "collapsed", "diverged", "errored", "running"]
    frame = pd.DataFrame({"status": order + sorted(set(counts.index) - set(order))})
    frame["trials"] = [int(counts.get(s, 0)) for s in frame["status"]]
    blocks.append(Table("status_counts", frame, "Trials by final status"))
    if sweep.results_paths:
        blocks.append(Paragraph("Results tables read: " + ", ".join(str(p) for p in sweep.results_paths)))
    return Section("status", "Status", blocks)


# -- study -----------------------------------------------------------------------------------------
def study_section(sweep: SweepFolder, config: ReportConfig, colours: dict[str, str]) -> Section:
    if sweep.results is None:
        return Section("study", "Study tables", [Note(
            "No few-shot results table for this sweep: run sweeps/compare_methods.py --from-sweeps "
            f"{sweep.name} (or sweeps/fewshot_grid.py), then pass its results.parquet with --results. "
            "The search and training sections below do not need it.")])
    results = sweep.results
    summary = study_summary(results, seed=config.seed)
    per_disease = {key: disease_shots_table(results, *key)
                   for key in sorted(set(zip(results["backbone"], results["evaluator"])))}
    blocks = [
        Paragraph("Mean over findings of each finding's mean AUROC over trials (the study's summary); 95% CI: "
                  "percentile bootstrap over findings. p-values: paired t-test / Wilcoxon signed-rank over the "
                  "per-finding means, against each baseline with the same evaluator."),
        Table("study_table", wide_study_table(summary), "Mean AUROC by shots"),
        figure("shot_curves", figures.shot_curves(summary, colours), "AUROC vs shots"),
        figure("disease_heatmap", figures.disease_heatmaps(per_disease), "AUROC per finding and shots")]
    return Section("study", "Study tables and shot curves", blocks, data={"study_summary": summary})


# -- search ----------------------------------------------------------------------------------------
def search_section(sweep: SweepFolder, config: ReportConfig) -> Section:
    trials = sweep.trials
    if trials.empty or not sweep.objective:
        return Section("search", "Search", [Note("No pretraining trial has reported yet: nothing to show about "
                                                 "the search.")])
    blocks = [Table("trials", _trials_table(sweep), "Trials (in order of start)")]
    scored = trials.dropna(subset=["objective"])
    selectable = scored[~scored["audit"].astype(bool)] if "audit" in scored.columns else scored
    if not selectable.empty:
        best = selectable.loc[selectable["objective"].astype(float).idxmax()]
        blocks.append(Paragraph(
            f"Best trial {best['trial']}: {sweep.objective} {fmt(float(best['objective']))} "
            f"(random init on the same episodes: {fmt(float(best['random_init']))})"
            + ("; trials of the pruning audit are left out of the selection." if len(selectable) < len(scored)
               else ".")))
        held_out = _report_comparison(sweep.folder)
        if held_out is not None:
            blocks.append(Paragraph(
                f"The winner chosen on the validation episodes, reported on {held_out['episodes']} report episodes "
                f"(test images of other patients, never used for selection): {fmt(held_out['best'])} vs random init "
                f"{fmt(held_out['random'])}, difference {held_out['difference']:+.3f}, 95% CI "
                f"[{held_out['ci_low']:+.3f}, {held_out['ci_high']:+.3f}] over {held_out['diseases']} findings. "
                "The figures above are on the validation episodes, which the selection has seen."))
    if not scored.empty:
        blocks.append(figure("search_progress", figures.search_progress(trials, sweep.objective), "search progress"))
    blocks += _importance_blocks(sweep.study, config.importance_min_trials)
    if sweep.searched and not scored.empty:
        blocks.append(figure("objective_vs_params", figures.objective_vs_params(scored, sweep.searched,
                                                                                sweep.objective),
                             "objective against each searched parameter"))
    return Section("search", "Search", blocks)


def _report_comparison(folder) -> dict | None:
    """The winner on the report episodes (``report_comparison.json``, written when the sweep ended)."""
    import json

    from cxrtune.sweepfolder import REPORT_COMPARISON

    path = folder / REPORT_COMPARISON
    try:
        return json.loads(path.read_text()).get("report") if path.is_file() else None
    except (OSError, ValueError):
        return None


def _trials_table(sweep: SweepFolder) -> pd.DataFrame:
    shown = sweep.trials[["trial", "status", "epochs", "objective", "random_init", *sweep.searched]].copy()
    if "audit" in sweep.trials.columns and sweep.trials["audit"].astype(bool).any():
        shown.insert(2, "audit", sweep.trials["audit"].map(lambda a: "audit" if a else ""))
    for column in ("objective", "random_init"):
        shown[column] = shown[column].map(fmt)
    for key in sweep.searched:
        shown[key] = shown[key].map(lambda v: f"{v:.4g}" if isinstance(v, (int, float)) and math.isfinite(v) else "–")
    return shown.rename(columns={"objective": sweep.objective, "random_init": f"{sweep.objective} random init"})


def _importance_blocks(study, min_trials: int) -> list:
    if study is None:
        return [Note("No Optuna study (optuna.db) in the sweep folder: parameter importance is not available.")]
    finished = _completed(study)
    if finished < min_trials:
        return [Note(f"Parameter importance needs at least {min_trials} completed Optuna trials; this sweep has "
                     f"{finished}. With fewer, Optuna's fANOVA forest is fitted on too few points to rank "
                     "parameters.")]
    importances = _importances(study)
    if importances is None:
        return [Note("Optuna could not compute parameter importances (all trials share one value, or no "
                     "completed trial holds every parameter).")]
    frame = pd.DataFrame({"parameter": list(importances), "importance": [fmt(v) for v in importances.values()]})
    return [Table("importance", frame, "Parameter importance (fANOVA, share of variance)"),
            figure("importance", figures.importance_bars(importances), "parameter importance")]


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


# -- training health -------------------------------------------------------------------------------
def health_section(sweep: SweepFolder) -> Section:
    history = sweep.history
    if history.empty or history["ssl_loss"].isna().all():
        return Section("health", "Training health", [Note("No per-epoch pretraining metrics in this sweep folder.")])
    status_of = dict(zip(sweep.trials["trial"], sweep.trials["status"]))
    return Section("health", "Training health", [
        Paragraph("One line per trial, coloured by its final status. A collapse shows as feature std and effective "
                  "rank falling towards zero/one while the loss keeps dropping; a divergence as a loss that jumps "
                  "or ends early."),
        figure("training_health", figures.training_health(history, status_of), "training health")])


# -- pruning audit ---------------------------------------------------------------------------------
def fidelity_section(sweep: SweepFolder) -> Section:
    """How well the sweep's early judgements predict its final objectives, from the trials trained
    to the full budget (those ASHA kept and those the pruning audit let run on)."""
    from cxrtune.analysis.fidelity import audit_outcome, judged_curves

    title = ("fidelity", "Early judgements (pruning audit)")
    trials = sweep.trials
    if trials.empty or not sweep.objective:
        return Section(*title, [Note("No pretraining trial has reported yet.")])
    audited = set(trials.loc[trials["audit"].astype(bool), "trial"]) if "audit" in trials.columns else set()
    final = trials["_last"].map(lambda r: bool(r.get("final")))
    finished = trials[(trials["status"] == "completed") & final]
    full = list(finished.loc[finished["epochs"] == finished["epochs"].max(), "trial"]) if not finished.empty else []
    outcome = audit_outcome(judged_curves(sweep.history, sweep.objective), full, audited)
    blocks: list = []
    if not audited:
        blocks.append(Note("This sweep ran no pruning audit: every trial trained to the end was kept by ASHA, so "
                           "the trials below are its best early performers and say little about the ones it stopped. "
                           "Run with --audit-fraction (e.g. 0.3) to let a seeded share of the stopped trials run on "
                           "and measure how far the early rungs can be trusted on this data."))
    if len(outcome.full) < 3:
        blocks.append(Note(f"{len(outcome.full)} trial(s) trained to the full budget; a rank correlation needs at "
                           "least 3."))
        return Section(*title, blocks)
    table = outcome.correlations.copy()
    shown = pd.DataFrame({"epoch": table["epoch"], "Spearman rho": table["spearman"].map(fmt),
                          "95% CI": [f"[{fmt(lo)}, {fmt(hi)}]" for lo, hi in zip(table["ci_low"], table["ci_high"])],
                          "trials": table["trials"]})
    blocks.append(Paragraph(
        f"{len(outcome.full)} trials trained to the full budget ({len(outcome.audited)} of them audited: ASHA would "
        "have stopped them). For each epoch at which they were judged, Spearman's rank correlation between the "
        "objective there and the final objective, with a 95% bootstrap CI over these trials. A correlation near 1 "
        "at a rung means that stopping trials there keeps the ones that end best."))
    blocks.append(Table("fidelity", shown, "Early vs final objective, trials trained to the end"))
    if outcome.pick is not None and audited:
        blocks.append(Paragraph(
            f"Regret of ASHA's pick: {fmt(outcome.regret)} ({sweep.objective} of the best fully trained trial, "
            f"{outcome.best}, minus that of the best trial ASHA kept, {outcome.pick})"
            + ("; the audit found no better trial among those ASHA stopped." if outcome.best == outcome.pick
               else "; a trial ASHA stopped would have ended better.")))
    return Section(*title, blocks, data={"fidelity_full": table})


# -- localisation ----------------------------------------------------------------------------------
_LOCALISATION = ("localisation", "Localisation (Grad-CAM)")


def localisation_section(sweep: SweepFolder, config: ReportConfig, colours: dict[str, str],
                         progress: Callable[[str], Any]) -> Section:
    """Grad-CAM of each backbone's per-finding logistic head, scored against the ground truth.
    The slow part of a report (minutes on CPU): ``config.gradcam`` switches it off, leaving a note;
    ``config.localisation`` leaves the whole section out (:func:`build_sections`)."""
    if not config.gradcam:
        return Section(*_LOCALISATION, [Note("Grad-CAM was switched off (--no-gradcam).")])
    inputs = _gradcam_inputs(sweep, config)
    if isinstance(inputs, Note):
        return Section(*_LOCALISATION, [inputs])
    cache, truth, diseases = inputs
    from cxrtune.analysis.localise import localise, sweep_backbones

    entries = sweep_backbones(sweep.folder, sweep.objective, first_params(sweep), config.imagenet_weights)
    progress(f"Grad-CAM: {sum(e.backbone is not None for e in entries)} backbones x {len(diseases)} findings "
             f"at {config.cam.input_size} px")
    result = localise(entries, cache, diseases, truth, config.cam)
    blocks = [Paragraph(
        f"Ground truth: {result.ground_truth}. Per finding, a logistic head is fitted on all training positives "
        f"and negatives, and Grad-CAM of its logit is taken on the backbone's last stage for up to "
        f"{config.cam.max_images} evaluation positives with a region. Pointing game: the heatmap's maximum lies "
        "inside the region. Energy: share of the heatmap inside it (chance = the region's area share). "
        "95% CIs: bootstrap over images. Panels: one evaluation positive per finding; the heatmap over the "
        "image, × at its maximum, the ground truth outlined in white.")]
    blocks += [Note(f"{e.label}: {e.note}") for e in result.backbones if e.backbone is None]
    blocks += [Note(text) for text in result.notes]
    if result.summary.empty:
        return Section(*_LOCALISATION, blocks)
    blocks += [
        Table("localisation", _localisation_table(sweep, result.summary),
              "Localisation beside AUROC, per finding and backbone"),
        figure("localisation", figures.localisation_bars(result.summary, colours), "localisation scores"),
        figure("gradcam", figures.gradcam_panels(result.examples, result.backbones, colours), "Grad-CAM panels")]
    return Section(*_LOCALISATION, blocks, data={"localisation_scores": result.scores})


def _gradcam_inputs(sweep: SweepFolder, config: ReportConfig):
    """(image cache, ground truth, findings) for Grad-CAM, or a Note saying which is missing."""
    params = first_params(sweep)
    cache_path = params.get("trial.eval_cache") or params.get("trial.cache")  # where the episodes live
    if sweep.trials.empty or not cache_path or not Path(cache_path).is_dir():
        return Note("Grad-CAM needs a pretraining trial's image cache (params.json trial.cache)"
                    + (f"; {cache_path} does not exist on this machine." if cache_path else "; this sweep has none."))
    from cxrtune.analysis.ground_truth import BBOX_FILE, GroundTruth
    from cxrtune.data.cache import ImageCache
    from cxrtune.data.tasks import load_episodes

    cache = ImageCache.open(cache_path)
    truth = GroundTruth(cache, config.boxes or default_boxes(cache))
    if not truth.available():
        return Note(f"No ground truth for this source: phantom caches carry masks; for NIH pass --boxes {BBOX_FILE}.")
    episodes_path = Path(params.get("trial.episodes", sweep.folder / "episodes.parquet"))
    if not episodes_path.is_file():
        return Note(f"Grad-CAM needs the sweep's episodes to know its findings; {episodes_path} is missing.", warn=True)
    return cache, truth, sorted(load_episodes(episodes_path)["disease"].unique())


def default_boxes(cache) -> str | None:
    """<source root>/BBox_List_2017.csv when the cache was built from an NIH root that has it."""
    import ast

    from cxrtune.analysis.ground_truth import BBOX_FILE

    described = cache.report.get("source")
    try:
        described = ast.literal_eval(described) if isinstance(described, str) else dict(described or {})
        root = described.get("root")
    except (ValueError, SyntaxError, AttributeError):
        return None
    path = Path(root) / BBOX_FILE if root else None
    return str(path) if path is not None and path.is_file() else None


def _localisation_table(sweep: SweepFolder, s: pd.DataFrame) -> pd.DataFrame:
    shots = int(sweep.objective.rsplit("_", 1)[1].replace("shot", "")) if sweep.objective else None
    return pd.DataFrame({
        "finding": s["finding"], "backbone": s["backbone"], "images": s["images"],
        "AUROC": [fmt(_auroc_beside(sweep, bb, f, shots)) for f, bb in zip(s["finding"], s["backbone"])],
        "pointing hit rate [95% CI]": [f"{fmt(v, 2)} [{fmt(lo, 2)}, {fmt(hi, 2)}]"
                                       for v, lo, hi in zip(s["hit_rate"], s["hit_ci_low"], s["hit_ci_high"])],
        "energy inside [95% CI]": [f"{fmt(v, 2)} [{fmt(lo, 2)}, {fmt(hi, 2)}]"
                                   for v, lo, hi in zip(s["energy"], s["energy_ci_low"], s["energy_ci_high"])],
        "chance (area)": [fmt(v, 2) for v in s["chance"]]})


def _auroc_beside(sweep: SweepFolder, label: str, finding: str, shots: int | None) -> float:
    """AUROC of ``label`` on ``finding``: the results table's probe at its largest shots, else the
    sweep's own probe files (best checkpoint / random init) at the objective's shots."""
    results = sweep.results
    if results is not None and label in set(results["backbone"]):
        part = results[(results["backbone"] == label) & (results["disease"] == finding)]
        part = part[part["evaluator"] == "probe"] if (part["evaluator"] == "probe").any() else part
        if not part.empty:
            return float(part[part["shots"] == part["shots"].max()]["auroc"].mean())
    from cxrtune.analysis.localise import best_checkpoint_dir, initial_results

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


# -- cost ------------------------------------------------------------------------------------------
def cost_section(sweep: SweepFolder) -> Section:
    trials = sweep.trials
    if trials.empty:
        return Section("cost", "Cost", [Note("No trial has reported yet.")])
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
    return Section("cost", "Cost", [Table("cost", frame, "Per trial"), Table("cost_total", total, "Sweep total"),
                                    figure("cost", figures.cost_bars(trials), "cost per trial")])


def _sweep_span(trials: pd.DataFrame) -> float:
    """First trial start to last trial end, in seconds."""
    starts = trials["started"].astype(float)
    ends = starts + trials["wall_time_s"].astype(float)
    return float(ends.max() - starts.min()) if starts.notna().any() else math.nan
