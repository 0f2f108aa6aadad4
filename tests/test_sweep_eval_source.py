"""The driver's data preparation with a separate evaluation source, and the trial's restore path,
without starting Ray (the end-to-end sweep is in test_sweep_kill_real.py)."""

from __future__ import annotations

import argparse

import pytest
import torch

from _fixtures_layouts import write_csv_layout
from _sweep_fixtures import EVAL_FINDINGS, write_eval_archive
from cxrtune.engine.checkpoint import FORMAT, checkpoint_path, list_checkpoints
from cxrtune.errors import CxrtuneError
from cxrtune.sweep.cli import build_parser
from cxrtune.sweep.data import EpisodePlan, prepare_data as prepare
from cxrtune.engine.train import METRICS_FILE
from cxrtune.sweepfolder import ENGINE_CHECKPOINT, INITIAL_RESULTS, STATE_FILE
from cxrtune.trial import TrialInputs, restore_into

PLAN = EpisodePlan(shots=(5,), trials=2)


def prepare_data(args, folder):
    return prepare(args, 32, {}, PLAN, folder)


def _parse(*argv: str) -> argparse.Namespace:
    from cxrtune.sweep.cli import PretrainSweep

    sweep = PretrainSweep(name="t", method="moco", space={}, seed_point={})
    return build_parser(sweep).parse_args(list(argv))


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_episodes_come_from_the_eval_source_and_both_caches_are_built(cache_env):
    pretrain = write_csv_layout(cache_env / "pretrain", n_images=8)
    evaluation = write_eval_archive(cache_env / "eval")
    args = _parse("--source", "csv", "--root", str(pretrain["root"]),
                  "--eval-source", "csv", "--eval-root", str(evaluation["root"]))
    folder = cache_env / "sweep"
    folder.mkdir()
    data = prepare_data(args, folder)
    assert data.separate_eval
    assert len(data.cache) == 8 and len(data.eval_cache) == len(evaluation["ids"])
    ids = {i for col in ("train_ids", "test_ids") for row in data.episodes[col] for i in row}
    assert ids <= evaluation["ids"]
    assert set(data.episodes["disease"]) == set(EVAL_FINDINGS)
    assert (folder / "episodes.parquet").is_file()
    assert "pretraining on csv (8 cached images" in data.describe()

    # a resume with another evaluation source is refused before anything runs
    other = _parse("--source", "csv", "--root", str(pretrain["root"]))
    with pytest.raises(CxrtuneError, match="started with another evaluation source"):
        prepare_data(other, folder)


def test_an_eval_source_without_few_shot_tasks_is_refused_by_name(cache_env):
    tiny = write_csv_layout(cache_env / "tiny", n_images=8)  # labels too rare for any task
    args = _parse("--source", "csv", "--root", str(tiny["root"]), "--eval-source", "csv",
                  "--eval-root", str(tiny["root"]))
    folder = cache_env / "sweep"
    folder.mkdir()
    with pytest.raises(CxrtuneError, match=r"--eval-source csv \(root .*tiny\) defines no few-shot task.*"
                                           r"pass --eval-source with a labelled archive"):
        prepare_data(args, folder)
    assert not (folder / "episodes.parquet").exists()


def test_eval_root_without_eval_source_is_refused(cache_env):
    tiny = write_csv_layout(cache_env / "tiny", n_images=8)
    args = _parse("--source", "csv", "--root", str(tiny["root"]), "--eval-root", str(tiny["root"]))
    with pytest.raises(CxrtuneError, match="pass --eval-source NAME too"):
        prepare_data(args, cache_env)


def test_inputs_without_an_eval_cache_still_load_and_inputs_without_a_cache_are_refused():
    inputs = TrialInputs.from_inputs({"trial.cache": "/c", "trial.episodes": "/e.parquet"})
    assert inputs.eval_cache == "" and inputs.source == "" and inputs.eval_source == ""
    with pytest.raises(CxrtuneError, match="must name the sweep's cache folder and episodes file"):
        TrialInputs.from_inputs({"trial.episodes": "/e.parquet"})


def _engine_checkpoint(path, epoch: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "epoch": epoch, "marker": torch.tensor([epoch])}, path)


def test_restore_drops_engine_checkpoints_newer_than_the_tune_checkpoint(tmp_path):
    """A driver killed after the engine saved epoch 3 but before Tune recorded it: the trial must
    resume from the epoch Tune restores (2), not from the orphaned epoch 3."""
    run_dir = tmp_path / "run"
    _engine_checkpoint(checkpoint_path(run_dir, 3), 3)
    tune_ckpt = tmp_path / "tune_ckpt"
    _engine_checkpoint(tune_ckpt / ENGINE_CHECKPOINT, 2)
    (tune_ckpt / STATE_FILE).write_text('{"objective": {"probe_auroc_5shot": 0.6}, "objective_epoch": 2}')
    (tune_ckpt / METRICS_FILE).write_text('{"epoch": 1}\n{"epoch": 2}\n')
    (tune_ckpt / INITIAL_RESULTS).write_bytes(b"table")
    (run_dir / METRICS_FILE).write_text('{"epoch": 3}\n')  # what the engine logged past the checkpoint
    state = restore_into(run_dir, tune_ckpt)
    assert [epoch for epoch, _ in list_checkpoints(run_dir)] == [2]
    payload = torch.load(checkpoint_path(run_dir, 2), weights_only=True)
    assert int(payload["marker"]) == 2
    assert state["objective_epoch"] == 2
    # a trial folder staged afresh (new Ray session, other node) gets its logs back from the checkpoint
    assert (run_dir / METRICS_FILE).read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    assert (tmp_path / INITIAL_RESULTS).read_bytes() == b"table"


def test_a_trial_tune_restarts_without_a_checkpoint_trains_afresh(cache_env):
    """Tune restarts a trial whose checkpoint it had not recorded when the driver died; engine
    checkpoints the earlier attempt left in the trial folder must not be resumed from (the trial
    would find its epochs done and end without a single report)."""
    from cxrtune.data.cache import get_cache
    from cxrtune.data.sources.base import make_source
    from cxrtune.data.tasks import build_task_pool, sample_episodes, save_episodes
    from cxrtune.resolve import resolve_pretrain
    from cxrtune.trial import run_pretrain_trial

    archive = write_eval_archive(cache_env / "eval")
    source = make_source("csv", archive["root"])
    cache = get_cache(source, size=32)
    episodes = sample_episodes(build_task_pool(cache.index), shots=(5,), trials=1)
    save_episodes(episodes, cache_env / "episodes.parquet")
    flat = resolve_pretrain("smoke", "moco", sets={"train.epochs": 1, "train.batch_size": 16}).flat
    inputs = {"trial.cache": str(cache.path), "trial.episodes": str(cache_env / "episodes.parquet")}
    work = cache_env / "trial" / "work"
    first: list[dict] = []
    run_pretrain_trial(flat, inputs, work, lambda metrics, folder: first.append(dict(metrics)))
    assert [m["epoch"] for m in first] == [1]
    assert list_checkpoints(work / "run")  # the earlier attempt's engine checkpoint stays behind
    again: list[dict] = []
    run_pretrain_trial(flat, inputs, work, lambda metrics, folder: again.append(dict(metrics)))
    assert [m["epoch"] for m in again] == [1]
    assert again[0]["ssl_loss"] == pytest.approx(first[0]["ssl_loss"])  # same seed, trained again
    lines = (work / "run" / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 1


def test_a_wsd_trial_is_judged_at_its_rungs_and_its_other_checkpoints_only_resume(cache_env):
    """A warmup-stable-decay trial with rungs: a cooldown judgement (probe, backbone file) at each
    rung and at the end; the checkpoints between carry the last objective and no backbone, so no
    selection or export can take a backbone that was never judged."""
    from cxrtune.data.cache import get_cache
    from cxrtune.data.sources.base import make_source
    from cxrtune.data.tasks import build_task_pool, sample_episodes, save_episodes
    from cxrtune.resolve import resolve_pretrain
    from cxrtune.sweepfolder import BACKBONE_FILE
    from cxrtune.trial import run_pretrain_trial

    archive = write_eval_archive(cache_env / "eval")
    cache = get_cache(make_source("csv", archive["root"]), size=32)
    save_episodes(sample_episodes(build_task_pool(cache.index), shots=(5,), trials=1), cache_env / "episodes.parquet")
    flat = resolve_pretrain("smoke", "moco", sets={"train.epochs": 3, "train.batch_size": 16,
                                                   "train.checkpoint_every": 1, "optim.schedule": "wsd"},
                            asha=(1, 3)).flat
    assert flat["train.checkpoint_epochs"] == [1]  # ASHA's rung below the last epoch
    inputs = {"trial.cache": str(cache.path), "trial.episodes": str(cache_env / "episodes.parquet")}
    reports: list[tuple[dict, bool]] = []
    run_pretrain_trial(flat, inputs, cache_env / "trial" / "work",
                       lambda m, folder: reports.append((dict(m), folder is not None and (folder / BACKBONE_FILE).is_file())))
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3]
    assert [m["objective_epoch"] for m, _ in reports] == [1, 1, 3]
    assert [m["judged"] for m, _ in reports] == [True, False, True]
    assert [has_backbone for _, has_backbone in reports] == [True, False, True]
    assert reports[1][0]["probe_auroc_5shot"] == reports[0][0]["probe_auroc_5shot"]  # carried, not re-measured
