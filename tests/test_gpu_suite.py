"""The prepared GPU script runs end to end on the CPU at toy sizes, so it cannot rot before a GPU
run: every section measures, writes its JSON and Markdown, the sweep exports a loadable backbone."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _bench import load_bench as _load


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    suite = _load("gpu_suite")
    threads = torch.get_num_threads()
    try:
        code = suite.main([str(out), "--tiny", "--device", "cpu", "--methods", "moco,barlow"])
    finally:
        torch.set_num_threads(threads)
    return out, code, json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.md").read_text()


def test_every_section_ran_and_wrote_its_figures(suite_run):
    out, code, report, md = suite_run
    assert code == 0
    assert list(report["sections"]) == ["throughput", "pipeline", "precision", "syncs", "profile", "sweep"]
    assert not [name for name, r in report["sections"].items() if "error" in r]
    for heading in ("## throughput", "## pipeline", "## precision", "## syncs", "## profile", "## sweep", "TOY SIZES"):
        assert heading in md


def test_throughput_rows_cover_methods_memory_formats_and_checkpointing(suite_run):
    _, _, report, md = suite_run
    rows = report["sections"]["throughput"]["rows"]
    got = {(r["method"], r["channels_last"], r["grad_checkpointing"]) for r in rows}
    assert got == {("moco", False, False), ("moco", True, False), ("barlow", False, False), ("barlow", True, False),
                   ("moco", True, True)}
    assert all(r["images_per_s"] > 0 and r["gflop_per_image"] > 0 and not r["compile"] for r in rows)
    ckpt = next(r for r in rows if r["grad_checkpointing"])
    plain = next(r for r in rows if r["method"] == "moco" and r["channels_last"] and not r["grad_checkpointing"])
    # recomputation in backward: more FLOPs per image for the same model
    assert ckpt["gflop_per_image"] > plain["gflop_per_image"]
    assert md.count("| moco | resnet18 |") == 3


def test_pipeline_shares_and_precision_losses_are_measured(suite_run):
    _, _, report, _ = suite_run
    pipe = report["sections"]["pipeline"]
    for name in ("plain", "prefetcher"):
        assert 0 <= pipe[f"input_share_{name}"] < 1 and pipe[f"step_ms_{name}"] > 0
    assert pipe["synthetic"]["plain_ms_per_batch"] > 0 and pipe["synthetic"]["speedup"] > 0
    precision = report["sections"]["precision"]
    assert [r["method"] for r in precision["rows"]] == ["moco", "barlow"]
    for r in precision["rows"]:
        assert len(r["fp32"]) == len(r["bf16"]) == 3
        assert all(math.isfinite(v) for v in r["fp32"] + r["bf16"])
        assert r["fp32"] != r["bf16"]  # autocast really ran in bf16
        assert r["within_tolerance"] == (r["max_rel_diff"] <= precision["tolerance"])


def test_profile_and_sweep_leave_their_files(suite_run):
    out, _, report, md = suite_run
    table = (out / "profile_moco.txt").read_text()
    assert "aten::" in table and report["sections"]["profile"]["top"]
    sweep = report["sections"]["sweep"]
    assert sweep["returncode"] == 0 and sweep["export_returncode"] == 0
    assert {"backbone.pt", "MODEL_CARD.md", "config.json", "metrics.json"} <= set(sweep["files"])
    assert sweep["selected_by"]["metric"] == "probe_auroc_20shot"
    state = torch.load(out / "export" / "backbone.pt", weights_only=True)
    assert "conv1.weight" in state
    assert "and it loads" in md
    assert "502 cached images at 36 px" in (out / "sweep.log").read_text()  # --cache-size 36


def test_bad_arguments_are_refused_by_name(tmp_path, capsys):
    suite = _load("gpu_suite")
    with pytest.raises(SystemExit):
        suite.main([str(tmp_path), "--tiny", "--device", "cpu", "--sections", "throughput,speed"])
    assert "--sections speed: not a section" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.main([str(tmp_path), "--tiny", "--device", "cpu", "--methods", "moco,simclr"])
    assert "--methods simclr: not a registered method" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            suite.main([str(tmp_path), "--device", "cuda"])
        assert "CUDA is not available here" in capsys.readouterr().err
