"""The data a sweep prepares in the driver, before Ray starts: the image caches (built once) and
the validation episodes (sampled once into ``<sweep>/episodes.parquet``, so every trial and every
resume sees the same ones). A pretraining sweep also samples report episodes once
(``<sweep>/report_episodes.parquet``): their test images belong to other patients than the
validation episodes' (:func:`cxrtune.data.tasks.split_for_report`), and the sweep's winner is
reported against random init on them, free of the selection made on the validation episodes."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from cxrtune.errors import CxrtuneError
from cxrtune.sweepfolder import EPISODES_FILE, REPORT_EPISODES_FILE


@dataclasses.dataclass(frozen=True)
class EpisodePlan:
    """How the validation episodes are sampled: shot counts, trials per (finding, shots), test negatives."""

    shots: tuple[int, ...]
    trials: int
    test_negatives: str = "matched"


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
    #: episodes on the other patients' evaluation images (None: the sweep reports on the validation
    #: episodes, with --no-report-split or when created before report episodes existed)
    report_episodes: pd.DataFrame | None = None
    #: findings whose evaluation patients could not fill both halves (validated, not reported apart)
    report_dropped: tuple[str, ...] = ()

    @property
    def separate_eval(self) -> bool:
        return Path(self.eval_cache.path) != Path(self.cache.path)

    def describe(self) -> str:
        if not self.separate_eval:
            text = (f"data: {self.source.name}, {len(self.cache)} cached images at {self.cache.size} px, "
                    f"{len(self.episodes)} validation episodes")
        else:
            text = (f"data: pretraining on {self.source.name} ({len(self.cache)} cached images at {self.cache.size} "
                    f"px), validating on {self.eval_source.name} ({len(self.eval_cache)} cached images, "
                    f"{len(self.episodes)} episodes over {self.episodes['disease'].nunique()} findings)")
        if self.report_episodes is not None:
            text += (f"; the winner is reported on {len(self.report_episodes)} other episodes whose test images "
                     f"are other patients' ({self.report_episodes['disease'].nunique()} findings)")
        return text


def make_source(name: str, root: str | None, pairs: list[str] | None, flag: str, phantom: Mapping[str, Any]):
    """The source ``name``; the phantom starts from the profile's options, ``-o`` pairs on top."""
    from cxrtune.cli import parse_options
    from cxrtune.data.sources.base import make_source as make

    options = parse_options(pairs, flag)
    if name == "phantom":
        options = {**phantom, **options}
    return make(name, root, **options)


def task_pool(source, cache, flag: str):
    """The source's few-shot tasks on ``cache``; a source with no task is refused."""
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
    return pool


def sample_episodes(source, cache, plan: EpisodePlan, flag: str) -> pd.DataFrame:
    """The episodes of ``plan`` from the source's task pool; a source with no task is refused."""
    from cxrtune.data.tasks import sample_episodes as sample

    return sample(task_pool(source, cache, flag), shots=plan.shots, trials=plan.trials,
                  test_negatives=plan.test_negatives)


#: the report episodes' seeds start here (the validation episodes' at the default seed base), so
#: their few-shot training draws differ from the validation ones'
REPORT_SEED_BASE = 10_000


def sample_split_episodes(source, cache, plan: EpisodePlan, flag: str) -> tuple[pd.DataFrame, pd.DataFrame | None,
                                                                                  tuple[str, ...]]:
    """Validation and report episodes on patient-disjoint halves of the evaluation images, and the
    findings kept in validation only; no report episodes when no finding can be split."""
    from cxrtune.data.tasks import sample_episodes as sample
    from cxrtune.data.tasks import split_for_report

    validation, report, kept = split_for_report(task_pool(source, cache, flag))
    episodes = sample(validation, shots=plan.shots, trials=plan.trials, test_negatives=plan.test_negatives)
    if not report.tasks:
        return episodes, None, tuple(kept)
    reported = sample(report, shots=plan.shots, trials=plan.trials, test_negatives=plan.test_negatives,
                      seed_base=REPORT_SEED_BASE)
    return episodes, reported, tuple(kept)


def prepare_data(args: argparse.Namespace, cache_size: int, phantom: Mapping[str, Any], plan: EpisodePlan,
                 folder: Path, report_split: bool = False) -> SweepData:
    """Build the caches and sample the episodes once, in the driver; with ``report_split``, the
    validation and report episodes on patient-disjoint halves of the evaluation images (a resume
    reads back what the sweep sampled when it was created)."""
    from cxrtune.data.cache import get_cache
    from cxrtune.data.tasks import load_episodes, save_episodes

    source = make_source(args.source, args.root, args.option, "--option", phantom)
    cache = get_cache(source, size=cache_size, progress=True)
    eval_name = getattr(args, "eval_source", None)
    eval_root = getattr(args, "eval_root", None)
    eval_pairs = getattr(args, "eval_option", None)
    if eval_name is None and (eval_root is not None or eval_pairs):
        raise CxrtuneError("--eval-root and --eval-option describe an evaluation source: pass --eval-source NAME too")
    if eval_name is None:
        eval_source, eval_cache, flag = source, cache, "--source"
    else:
        eval_source = make_source(eval_name, eval_root, eval_pairs, "--eval-option", phantom)
        eval_cache = get_cache(eval_source, size=cache_size, progress=True)
        flag = "--eval-source"
    episodes_path, report_path = folder / EPISODES_FILE, folder / REPORT_EPISODES_FILE
    report, dropped = None, ()
    if episodes_path.is_file():
        episodes = load_episodes(episodes_path)
        known = set(eval_cache.index["image_id"])
        foreign = [i for ids in episodes["test_ids"] for i in ids if i not in known]
        if foreign:
            raise CxrtuneError(
                f"{episodes_path} refers to image {foreign[0]!r}, which {flag} {eval_source.name} does not "
                f"hold: the sweep was started with another evaluation source; resume it with the same "
                f"--eval-source, or start a new sweep with --name")
        if report_path.is_file():
            report = load_episodes(report_path)
            dropped = tuple(sorted(set(episodes["disease"]) - set(report["disease"])))
    elif report_split:
        episodes, report, dropped = sample_split_episodes(eval_source, eval_cache, plan, flag)
        if report is not None:  # first: a sweep folder with validation episodes has its report ones
            save_episodes(report, report_path)
        save_episodes(episodes, episodes_path)
    else:
        episodes = sample_episodes(eval_source, eval_cache, plan, flag)
        save_episodes(episodes, episodes_path)
    return SweepData(source, cache, eval_source, eval_cache, episodes, episodes_path, report, dropped)


def data_params(data: SweepData) -> dict[str, Any]:
    """The sweep's data, as params of its MLflow parent run."""
    return {"data.source": data.source.name, "data.root": str(data.source.root or ""),
            "data.cache": str(data.cache.path), "data.eval_source": data.eval_source.name,
            "data.eval_root": str(data.eval_source.root or ""), "data.eval_cache": str(data.eval_cache.path),
            "data.episodes": len(data.episodes), "data.findings": int(data.episodes["disease"].nunique()),
            "data.report_episodes": 0 if data.report_episodes is None else len(data.report_episodes)}


