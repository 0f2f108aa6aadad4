"""run_evaluation end to end: tidy table, Parquet, feature cache reuse, study table, monitor, CLI."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from _eval_fixtures import FakeCache, make_episodes, synthetic_images
from cxrtune.data.tasks import save_episodes
from cxrtune.errors import TaskError
from cxrtune.evaluate.features import BackboneSpec
from cxrtune.evaluate.run import RESULT_COLUMNS, EvalConfig, run_evaluation, study_table

TINY = dict(input_size=28, device="cpu")


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    index, episodes = make_episodes(n_diseases=3, shots=(1, 5), trials=2, train_pos=12, val_pos=5, normal=(40, 20))
    return FakeCache(index, synthetic_images(index)), episodes


def test_probe_and_knn_give_a_tidy_table_and_reuse_cached_features(data, tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    cache, episodes = data
    spec = BackboneSpec(init="random", arch="resnet18", seed=0)
    config = EvalConfig(evaluators=("probe", "knn"), **TINY)
    table = run_evaluation(spec, cache, episodes, config=config, out=tmp_path / "results.parquet")
    assert list(table.columns[: len(RESULT_COLUMNS)]) == RESULT_COLUMNS
    assert len(table) == 2 * len(episodes) and set(table["evaluator"]) == {"probe", "knn"}
    assert table["backbone"].unique().tolist() == ["random-resnet18"]
    assert table["auroc"].between(0, 1).all() and table.loc[table.evaluator == "probe", "C"].notna().all()
    assert table.loc[table.evaluator == "knn", "C"].isna().all()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "results.parquet"), table)
    assert not list(tmp_path.glob(".*tmp"))
    cached = sorted((tmp_path / "cache" / "features").glob("*.npy"))
    assert len(cached) == 1
    again = run_evaluation(spec, cache, episodes, config=config)
    pd.testing.assert_frame_equal(again, table)
    assert sorted((tmp_path / "cache" / "features").glob("*.npy")) == cached  # extracted once


def test_study_table_agrees_with_the_table(data, tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path))
    cache, episodes = data
    config = EvalConfig(evaluators=("probe",), **TINY)
    a = run_evaluation(BackboneSpec(init="random", arch="resnet18", seed=0), cache, episodes, config=config, name="ssl")
    b = run_evaluation(BackboneSpec(init="random", arch="resnet18", seed=1), cache, episodes, config=config, name="base")
    text = study_table(pd.concat([a, b]), baseline="base")
    per_disease = a.groupby(["shots", "disease"]).auroc.mean().groupby("shots").mean()
    assert f"{per_disease[5]:.3f}" in text.splitlines()[3] and "t-test p / Wilcoxon p" in text
    with pytest.raises(TaskError, match="baseline 'nope'"):
        study_table(a, baseline="nope")


def test_finetune_evaluator_runs_seeded(data, tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path))
    cache, episodes = data
    part = episodes[episodes.shots == 1].head(2)
    config = EvalConfig(evaluators=("finetune",), **TINY).override({"finetune.epochs": 1})
    spec = BackboneSpec(init="random", arch="resnet18", seed=0)
    first = run_evaluation(spec, cache, part, config=config)
    second = run_evaluation(spec, cache, part, config=config)
    pd.testing.assert_frame_equal(first, second)
    assert (first["evaluator"] == "finetune").all() and first["auroc"].between(0, 1).all()


def _write_csv_archive(root, index: pd.DataFrame, images) -> None:
    """The fixture's images as a ``csv`` source: one 8-bit PNG each and labels.csv with ids and splits."""
    from PIL import Image

    (root / "png").mkdir(parents=True)
    rows = []
    for row, image in zip(index.itertuples(), images):
        Image.fromarray(image).save(root / "png" / row.image_id)
        rows.append({"image_id": row.image_id, "path": f"png/{row.image_id}", "labels": "|".join(row.labels),
                     "patient_id": row.patient_id, "split": row.split})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)


def test_cli_prints_the_study_table(data, tmp_path, monkeypatch, capsys):
    """`cxrtune evaluate` through its real source and cache wiring: a csv archive of PNGs, the
    image cache built under $CXRTUNE_CACHE; its table equals an in-memory evaluation of the same
    pixels, and the printed study table shows that table's numbers."""
    import cxrtune.cli

    fake, episodes = data
    images = fake.images.copy()
    images[:, 0, 0], images[:, 0, 1] = 0, 255  # full range: the decoder's min-max rule keeps every pixel
    archive = tmp_path / "archive"
    _write_csv_archive(archive, fake.index, images)
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    save_episodes(episodes, tmp_path / "episodes.parquet")
    code = cxrtune.cli.main(["evaluate", "--checkpoint", "random", "--arch", "resnet18", "--baseline", "random",
                             "--seed", "1", "--episodes", str(tmp_path / "episodes.parquet"), "--device", "cpu",
                             "--source", "csv", "--root", str(archive), "--size", "32",
                             "--set", "input_size=28", "--evaluator", "knn", "--out", str(tmp_path / "r.parquet"),
                             "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "r.parquet").is_file()
    table = pd.read_parquet(tmp_path / "r.parquet")
    assert len(table) == 2 * len(episodes)
    assert set(table["backbone"]) == {"random-resnet18", "random-resnet18-baseline"}
    # the image cache was built from the archive, under $CXRTUNE_CACHE, not found elsewhere
    built = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and "features" not in p.parts]
    assert built, "no image cache under $CXRTUNE_CACHE"

    # the same backbone on the same pixels, in memory: the source and cache wiring changed nothing
    spec = BackboneSpec(init="random", arch="resnet18", seed=1)
    expected = run_evaluation(spec, FakeCache(fake.index, images), episodes,
                              config=EvalConfig(evaluators=("knn",), **TINY))
    keys = ["disease", "shots", "trial"]
    for name in ("random-resnet18", "random-resnet18-baseline"):  # the baseline is the same init and seed
        got = table[table["backbone"] == name].sort_values(keys).reset_index(drop=True)
        want = expected.sort_values(keys).reset_index(drop=True)
        assert got[keys].equals(want[keys])
        assert got["auroc"].to_numpy() == pytest.approx(want["auroc"].to_numpy(), abs=1e-6)

    # the printed study table: each backbone's mean over diseases of per-disease mean AUROC, per shots
    lines = out.splitlines()
    for name in ("random-resnet18", "random-resnet18-baseline"):
        per_shots = (table[table["backbone"] == name].groupby(["shots", "disease"]).auroc.mean()
                     .groupby("shots").mean())
        line = next(l for l in lines if l.split()[:2] == [name, "knn"])
        assert line.split()[2:] == [f"{per_shots[s]:.3f}" for s in sorted(per_shots.index)]
    assert "paired over diseases vs random-resnet18-baseline" in out
