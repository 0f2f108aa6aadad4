"""``cxrtune compare RUN_OR_SWEEP ...``: several sweeps or checkpoints side by side on the same episodes.

- A **sweep** (a name under ``--storage`` or a sweep folder) contributes two rows: its best trial
  (the best checkpoint's ``probe_results.parquet``) and random init (the trial's
  ``work/initial_probe_results.parquet``), both as the sweep scored them in the loop.
- A **checkpoint** (a ``.pt`` file, or an export folder holding ``backbone.pt``) is probed here
  with the existing evaluators (:func:`cxrtune.evaluate.run.run_evaluation`) on the episodes of
  ``--episodes`` (default: the first sweep's), with images from ``--cache`` (default: that sweep's).

Comparisons are only meaningful on identical episodes: differing ones are refused, naming the
first difference. Cells are the study's summary (mean over findings of per-finding mean AUROC)
with a 95 % bootstrap CI over findings.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pandas as pd

from cxrtune.analysis.tables import fmt, to_markdown
from cxrtune.errors import CxrtuneError
from cxrtune.evaluate.stats import bootstrap_ci
from cxrtune.sweepfolder import BACKBONE_FILE, EPISODES_FILE, PROBE_RESULTS, SweepFolder, initial_results
from cxrtune.tune_files import read_params

EPISODE_KEY = ["disease", "shots", "trial"]


class CompareError(CxrtuneError):
    """Inputs of ``cxrtune compare`` that cannot be compared."""


@dataclasses.dataclass
class Entry:
    label: str
    kind: str  # "sweep best" | "random init" | "checkpoint"
    source: str
    table: pd.DataFrame  # per episode: disease, shots, trial, auroc
    episodes: Path | None = None


def _as_sweep_folder(arg: str, storage: Path) -> Path | None:
    for candidate in (Path(arg), storage / arg):
        if candidate.is_dir() and (candidate / EPISODES_FILE).is_file():
            return candidate
    return None


def _as_checkpoint(arg: str) -> Path | None:
    path = Path(arg)
    if path.is_file():
        return path
    if path.is_dir() and (path / BACKBONE_FILE).is_file():
        return path / BACKBONE_FILE
    return None


def sweep_entries(folder: Path) -> list[Entry]:
    from cxrtune.analysis.sweep_folder import load_sweep

    sweep = load_sweep(folder.name, folder.parent)
    best = SweepFolder(folder).chosen_checkpoint(sweep.objective)
    if best is None:
        raise CompareError(f"sweep {folder}: no checkpoint folder on disk whose report has {sweep.objective!r} "
                           "(and no export/metrics.json); has a trial finished an epoch?")
    best_table = best / PROBE_RESULTS
    initial = initial_results(best)
    for path, what in ((best_table, "the best checkpoint's probe results"), (initial, "random init's probe results")):
        if not path.is_file():
            raise CompareError(f"sweep {folder}: {what} ({path}) are missing")
    arch = read_params(best.parent).get("model.arch", "resnet18")
    episodes = SweepFolder(folder).episodes
    return [Entry(folder.name, "sweep best", str(best), pd.read_parquet(best_table), episodes),
            Entry(f"{folder.name}: random-{arch}", "random init", str(initial), pd.read_parquet(initial), episodes)]


def check_same_episodes(paths: list[tuple[str, Path]]) -> pd.DataFrame:
    """The episodes all ``paths`` share; raises :class:`CompareError` naming the first difference."""
    from cxrtune.data.tasks import load_episodes

    (first_name, first_path), *rest = paths
    reference = load_episodes(first_path).sort_values(EPISODE_KEY).reset_index(drop=True)
    for name, path in rest:
        other = load_episodes(path).sort_values(EPISODE_KEY).reset_index(drop=True)
        if len(other) != len(reference):
            raise CompareError(f"episodes differ: {first_name} has {len(reference)} episodes ({first_path}), {name} has "
                               f"{len(other)} ({path}); compare runs that were scored on the same episodes file")
        for column in EPISODE_KEY + ["train_ids", "test_ids"]:
            for k, (a, b) in enumerate(zip(reference[column], other[column])):
                if list(a) != list(b) if column.endswith("_ids") else a != b:
                    ep = reference.loc[k, EPISODE_KEY].to_dict()
                    raise CompareError(f"episodes differ: {first_name} ({first_path}) and {name} ({path}) differ in "
                                       f"{column} of episode {ep}; compare runs scored on the same episodes file")
    return reference


def checkpoint_entry(path: Path, episodes: pd.DataFrame, episodes_path: Path, cache_path: Path,
                     input_size: int, crop_fraction: float) -> Entry:
    from cxrtune.data.cache import ImageCache
    from cxrtune.evaluate.features import BackboneSpec
    from cxrtune.evaluate.run import EvalConfig, run_evaluation
    from cxrtune.models.backbone import load_backbone

    backbone = load_backbone(path)
    spec = BackboneSpec(init=str(path), arch=backbone.arch, in_chans=backbone.in_chans)
    config = EvalConfig(evaluators=("probe",), input_size=input_size, crop_fraction=crop_fraction, device="cpu")
    table = run_evaluation(spec, ImageCache.open(cache_path), episodes, config=config, model=backbone)
    label = f"{path.parent.parent.name}/{path.parent.name}" if path.name == "backbone.pt" else path.stem
    return Entry(label, "checkpoint", str(path), table, episodes_path)


def side_by_side(entries: list[Entry], seed: int = 0) -> pd.DataFrame:
    """One row per entry: per shots ``mean [CI]`` and the number of findings."""
    shots = sorted(set().union(*(set(e.table["shots"].astype(int)) for e in entries)))
    rows = []
    for entry in entries:
        per = entry.table.groupby(["shots", "disease"])["auroc"].mean()
        row = {"run": entry.label, "kind": entry.kind}
        for s in shots:
            if s in per.index.get_level_values(0):
                values = per.loc[s].to_numpy()
                low, high = bootstrap_ci(values, seed=seed)
                row[f"{s}-shot AUROC [95% CI]"] = f"{fmt(values.mean())} [{fmt(low)}, {fmt(high)}]"
            else:
                row[f"{s}-shot AUROC [95% CI]"] = "–"
        row["findings"] = int(entry.table["disease"].nunique())
        row["source"] = entry.source
        rows.append(row)
    return pd.DataFrame(rows)


def compare(args_runs: list[str], storage: str | Path = "./cxrtune-runs", episodes: str | Path | None = None,
            cache: str | Path | None = None, input_size: int | None = None, crop_fraction: float = 1.0) -> pd.DataFrame:
    storage = Path(storage)
    sweeps, checkpoints = [], []
    for arg in args_runs:
        folder = _as_sweep_folder(arg, storage)
        checkpoint = None if folder else _as_checkpoint(arg)
        if folder is None and checkpoint is None:
            raise CompareError(f"{arg!r} is neither a sweep (a folder with episodes.parquet, here or under --storage "
                               f"{storage}) nor a checkpoint file / export folder with backbone.pt")
        (sweeps if folder else checkpoints).append(folder or checkpoint)
    entries: list[Entry] = []
    for folder in sweeps:
        entries += sweep_entries(folder)
    named = [(e.label, e.episodes) for e in entries if e.kind == "sweep best"]
    if episodes is not None:
        named.insert(0, ("--episodes", Path(episodes)))
    if checkpoints and not named:
        raise CompareError("checkpoints need episodes to be probed on: pass --episodes PATH (and --cache), or a sweep")
    shared = check_same_episodes(named) if len(named) > 1 else None
    if checkpoints:
        from cxrtune.data.tasks import load_episodes

        episodes_path = named[0][1]
        shared = shared if shared is not None else load_episodes(episodes_path)
        first = SweepFolder(sweeps[0]) if sweeps else None
        params = {**read_params(first.trial_dirs()[0]), **first.read_inputs()} if first and first.trial_dirs() else {}
        cache_path = Path(cache) if cache else Path(params.get("trial.eval_cache") or params.get("trial.cache", ""))
        if not cache_path.is_dir():
            raise CompareError(f"image cache {cache_path} does not exist: pass --cache FOLDER (the cache the "
                               "episodes' images are in)")
        # probe.* keys since the in-loop probe became config; trial.probe_* in older sweeps
        size = input_size or int(params.get("probe.input_size", params.get("trial.probe_input_size", 224)))
        crop = (float(params.get("probe.crop_fraction", params.get("trial.probe_crop_fraction", crop_fraction)))
                if params else crop_fraction)
        for path in checkpoints:
            entries.append(checkpoint_entry(path, shared, episodes_path, cache_path, size, crop))
    return side_by_side(entries)


def run(args: argparse.Namespace) -> int:
    table = compare(args.runs, args.storage, args.episodes, args.cache, args.input_size)
    print(to_markdown(table.drop(columns=["source"])))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        table.to_csv(tmp, index=False)
        tmp.replace(out)
        print(f"table: {out}")
    return 0
