"""Writing ``<sweep>/report/`` and logging it to the sweep's MLflow parent run.

The folder is built under a temporary name beside its final place and renamed into place, so a
failed run leaves the previous report intact and a reader never sees half a report."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd


def write_report_folder(final: Path, html: str, markdown: str, tables: dict[str, pd.DataFrame],
                        figures: dict[str, bytes]) -> Path:
    """``report.html``, ``report.md``, ``tables/<key>.csv``, ``figures/<key>.png`` in ``final``."""
    tmp = Path(tempfile.mkdtemp(prefix=".report-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a report is meant to be read
    try:
        (tmp / "report.html").write_text(html, encoding="utf-8")
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
        (tmp / "tables").mkdir()
        for key, frame in tables.items():
            frame.to_csv(tmp / "tables" / f"{key}.csv", index=False)
        (tmp / "figures").mkdir()
        for key, png in figures.items():
            (tmp / "figures" / f"{key}.png").write_bytes(png)
        _swap(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _swap(new: Path, final: Path) -> None:
    """Put ``new`` at ``final``; a directory cannot be renamed over a non-empty one, so the old
    report is moved aside first and removed last."""
    old = None
    if final.exists():
        old = final.with_name(f".report-old-{os.getpid()}")
        final.rename(old)
    new.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def log_to_mlflow(name: str, folder: Path, sweep_folder: Path, tracking_uri: str | None = None) -> str | None:
    """Log ``folder`` as ``report/`` artifacts of the sweep's parent run; None when there is none.

    The run is found by the sweep's id (its ``sweep.json``; by name for sweeps made before ids),
    in the sweep's recorded store unless ``tracking_uri`` is given. A missing SQLite store is not
    created: a sweep run without MLflow must not leave an empty database behind."""
    from cxrtune.sweepstate import read_identity
    from cxrtune.tracking import ROLE_TAG, SWEEP_ID_TAG, SWEEP_TAG
    from cxrtune.tracking import tracking_uri as resolve_uri

    identity = read_identity(sweep_folder)
    uri = resolve_uri(tracking_uri or (identity or {}).get("tracking_uri"))
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(f"cxrtune/{name}")
    if experiment is None:
        return None
    sweep = f"tags.`{SWEEP_ID_TAG}` = '{identity['sweep_id']}'" if identity else f"tags.`{SWEEP_TAG}` = '{name}'"
    runs = client.search_runs([experiment.experiment_id], filter_string=f"{sweep} and tags.`{ROLE_TAG}` = 'sweep'",
                              max_results=1)
    if not runs:
        return None
    run_id = runs[0].info.run_id
    client.log_artifacts(run_id, str(folder), "report")
    return run_id
