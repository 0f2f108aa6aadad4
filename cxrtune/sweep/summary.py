"""What a pretraining sweep prints and writes when it ends: the trials table (``trials.csv``), the
best checkpoint against random init on the validation episodes it was chosen on and, where the
sweep has report episodes (other patients' test images), on those, which no selection has seen
(the paired difference and its CI; ``report_comparison.json``), the cause of each errored trial,
and the export of the best checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from cxrtune.errors import CxrtuneError
from cxrtune.sweepfolder import REPORT_COMPARISON, REPORT_RESULTS, TRIAL_LOG, TRIALS_TABLE, Checkpoint, SweepFolder


def trials_table(results, objective: str, searched: Iterable[str],
                 interrupted: set[str] | frozenset = frozenset()) -> pd.DataFrame:
    """One row per trial: status, epochs, last objective, random init and the searched values;
    ``interrupted`` names the trials a Ctrl-C cut off."""
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
               objective: metrics.get(objective),
               "random_init": metrics.get(f"initial_{objective}")}
        for key in searched:
            row[key] = config.get(key)
        rows.append(row)
    return pd.DataFrame(rows)


def paired_difference(best: Checkpoint, objective: str, seed: int = 0) -> dict[str, float] | None:
    """Best checkpoint vs random init on the same episodes: mean AUROC difference at the
    objective's shot count with a 95 % bootstrap CI over the per-disease mean differences."""
    if not best.probe_results.is_file() or not best.initial_results.is_file():
        return None
    comparison = paired_tables(pd.read_parquet(best.probe_results), pd.read_parquet(best.initial_results),
                               objective, seed)
    return {**comparison, "epoch": best.epoch}


def paired_tables(best: pd.DataFrame, random: pd.DataFrame, objective: str, seed: int = 0) -> dict[str, float]:
    """Two probe tables on the same episodes: the mean AUROC of each at the objective's shot count,
    their difference and its 95 % bootstrap CI over the per-disease mean differences."""
    from cxrtune.evaluate.stats import bootstrap_ci

    shots = int(objective.rsplit("_", 1)[1].replace("shot", ""))
    a, b = best[best["shots"] == shots], random[random["shots"] == shots]
    merged = a.merge(b, on=["disease", "shots", "trial"], suffixes=("_best", "_random"))
    per_disease = merged.groupby("disease")[["auroc_best", "auroc_random"]].mean()
    diff = (per_disease["auroc_best"] - per_disease["auroc_random"]).to_numpy()
    low, high = bootstrap_ci(diff, seed=seed)
    return {"best": float(per_disease["auroc_best"].mean()), "random": float(per_disease["auroc_random"].mean()),
            "difference": float(diff.mean()), "ci_low": low, "ci_high": high, "diseases": int(diff.size)}


def report_comparison(pick: Checkpoint, objective: str, folder: Path, data) -> dict[str, Any] | None:
    """The winner (chosen on the validation episodes) and its random init on the report episodes,
    which no selection has seen; the tables go to ``<sweep>/report_results.parquet``."""
    from cxrtune.trial import judge_on_episodes

    if data is None or data.report_episodes is None or not pick.backbone.is_file():
        return None
    trained, initial = judge_on_episodes(pick.config, pick.backbone, data.eval_cache, data.report_episodes)
    table = pd.concat([trained.assign(backbone="best", trial_id=pick.trial_id),
                       initial.assign(backbone="random", trial_id=pick.trial_id)], ignore_index=True)
    tmp = folder / (REPORT_RESULTS + ".tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(folder / REPORT_RESULTS)
    return {**paired_tables(trained, initial, objective), "episodes": len(data.report_episodes),
            "dropped": list(data.report_dropped), "trial_id": pick.trial_id, "epoch": pick.epoch}


def error_causes(results) -> dict[str, str]:
    """trial id -> the cause of its error, read from the exception, its ``error.txt`` and its
    ``trial.log``: an OS error (``OSError: [Errno 28] No space left on device``) where one is in
    the chain, since the last exception of a chain often hides it, else the last error line."""
    import shutil


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


def _write_json(path: Path, value: dict[str, Any]) -> None:
    import json

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    tmp.replace(path)


def _write_table(table: pd.DataFrame, path: Path) -> None:
    """``trials.csv``, replaced whole (a Ctrl-C mid-write leaves the previous one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(path)


def summarise(results, objective: str, searched: Iterable[str], folder: Path, data=None,
              emit=None) -> dict[str, Any]:
    """The trials table, the best checkpoint against random init, and its export; returns them
    with the text. ``emit`` (e.g. ``print``) shows the table as soon as it is known, before the
    comparison and the export run, and the rest after."""
    from cxrtune.export import export_best

    table = trials_table(results, objective, searched)
    lines = ["", "trials:", table.to_string(index=False, float_format=lambda v: f"{v:.4g}"), ""]
    if data is not None:
        lines.insert(1, f"pretrained on {data.source.name}, validated on {data.eval_source.name} "
                        f"({len(data.episodes)} episodes over {data.episodes['disease'].nunique()} findings)")
    scored = table.dropna(subset=[objective])
    summary: dict[str, Any] = {"table": table}
    causes = error_causes(results)
    if causes:
        lines.append(f"{len(causes)} trial(s) errored:")
        lines += [f"  trial {trial}: {cause}" for trial, cause in causes.items()]
    if len(table) == 0 or (table["status"] == "errored").all():
        summary["failed"] = (f"no trial of sweep {folder.name} completed"
                             + (f" ({len(causes)} errored; first cause: {next(iter(causes.values()))})" if causes else "")
                             + f"; trial folders and logs are in {folder}")
    _write_table(table, folder / TRIALS_TABLE)
    if scored.empty:
        lines.append("no trial reported the objective; nothing to export")
        summary["text"] = "\n".join(lines)
        if emit is not None:
            emit(summary["text"])
        return summary
    shown = len(lines)
    if emit is not None:
        emit("\n".join(lines))
    # The best checkpoint as the sweep folder defines it (Tune's own "best result" can name a report
    # whose checkpoint num_to_keep has deleted).
    try:
        pick = SweepFolder(folder).best_checkpoint(objective, "max")
    except CxrtuneError:
        pick = None
    if pick is not None:
        comparison = paired_difference(pick, objective)
        held_out = report_comparison(pick, objective, folder, data)
        if comparison is not None:
            where = ("the validation episodes it was chosen on (selection inflates this)" if held_out is not None
                     else "the same episodes")
            verdict = ("the CI lies above zero: the best trial beats random init on these episodes"
                       if comparison["ci_low"] > 0 else
                       "the CI includes zero (or lies below it): no gain over random init is shown")
            lines.append(
                f"best trial {pick.trial_id} at epoch {comparison['epoch']}: "
                f"{objective} {comparison['best']:.3f} "
                f"vs random init {comparison['random']:.3f} "
                f"on {where}: difference {comparison['difference']:+.3f}, 95% CI "
                f"[{comparison['ci_low']:+.3f}, {comparison['ci_high']:+.3f}] over {comparison['diseases']} findings"
                + ("" if held_out is not None else "; " + verdict))
            summary["comparison"] = comparison
        if held_out is not None:
            verdict = ("the CI lies above zero: the winner beats random init on episodes no selection has seen"
                       if held_out["ci_low"] > 0 else
                       "the CI includes zero (or lies below it): no gain over random init is shown")
            dropped = (f" ({', '.join(held_out['dropped'])} had too few evaluation patients to split and is "
                       "validated only)" if held_out["dropped"] else "")
            lines.append(
                f"reported on {held_out['episodes']} report episodes (test images of other patients, never used "
                f"for selection): {objective} {held_out['best']:.3f} vs random init {held_out['random']:.3f}, "
                f"difference {held_out['difference']:+.3f}, 95% CI [{held_out['ci_low']:+.3f}, "
                f"{held_out['ci_high']:+.3f}] over {held_out['diseases']} findings{dropped}; {verdict}")
            summary["report_comparison"] = held_out
            _write_json(folder / REPORT_COMPARISON, {"metric": objective, "validation": comparison, "report": held_out})
    try:
        out = export_best(folder, objective, "max", force=True)
        lines.append(f"exported the best checkpoint to {out}")
        summary["export"] = out
    except CxrtuneError as err:
        lines.append(f"export skipped: {err}")
    summary["text"] = "\n".join(lines)
    if emit is not None:
        emit("\n".join(lines[shown:]))
    return summary


def write_report(name: str, storage: str, opened) -> None:
    """The sweep's HTML report (without the Grad-CAM section, the slow part); a failure is printed,
    never fatal: the sweep's results are already saved."""
    try:
        from cxrtune.analysis.report import ReportConfig, build_report

        report = build_report(name, storage, config=ReportConfig(localisation=False, tracking_uri=opened.tracking_uri))
        print(f"report: {report.html}")
    except Exception as err:  # noqa: BLE001 - the report is a view of results already on disk
        print(f"report skipped ({type(err).__name__}: {err}); run `cxrtune report --sweep {name}` to retry",
              file=sys.stderr)
