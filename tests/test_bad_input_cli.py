"""Bad command-line input is refused up front with ``cxrtune: error: ...`` and exit status 2.

Each row: the argv (``{file}`` is an existing text file, ``{dir}`` an existing folder, ``{empty}``
an empty file), the exit status and fragments the message must hold (the input, the value and what
would be valid). Every refusal comes before any cache is built, so each row takes well under a
second; the timeout catches a refusal that regresses into starting the work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxrtune.cli import main

pytestmark = pytest.mark.timeout(60)

PRETRAIN = ["pretrain", "--method", "moco", "--profile", "smoke", "--quiet"]
EVALUATE = ["evaluate", "--checkpoint", "random", "--arch", "resnet18", "--quiet"]
REPORT = ["report", "--sweep", "nothing", "--no-gradcam"]

CASES = [
    # cxrtune pretrain: 0 and negatives are not defaults
    (PRETRAIN + ["--out", "{dir}/run", "--size", "0"], 2, ["--size 0 is out of range", "from 8 to 4096"]),
    (PRETRAIN + ["--out", "{dir}/run", "--size", "-32"], 2, ["--size -32 is out of range", "from 8 to 4096"]),
    (PRETRAIN + ["--out", "{dir}/run", "--size", "5000"], 2, ["--size 5000 is out of range", "from 8 to 4096"]),
    (PRETRAIN + ["--out", "{dir}/run", "--epochs", "0"], 2, ["--epochs 0 is out of range", "integer >= 1"]),
    (PRETRAIN + ["--out", "{dir}/run", "--threads", "0"], 2, ["--threads 0 is out of range", "integer >= 1"]),
    (PRETRAIN + ["--out", "{dir}/run", "--threads", "-1"], 2, ["--threads -1 is out of range", "integer >= 1"]),
    # cxrtune pretrain: where the run goes, and on what
    (PRETRAIN + ["--out", "{file}"], 2, ["--out {file} is an existing file, not a folder"]),
    (PRETRAIN + ["--out", "{file}/run"], 2, ["--out {file}/run", "{file} is a file"]),
    (PRETRAIN + ["--out", "{dir}/run", "--device", "cuda"], 2,
     ["--device = 'cuda' but CUDA is not available here", "use cpu or auto"]),
    (PRETRAIN + ["--out", "{dir}/run", "--device", "cuda:1"], 2, ["--device = 'cuda:1' but CUDA is not available"]),
    (PRETRAIN + ["--out", "{dir}/run", "--device", "gpu"], 2,
     ["--device = 'gpu' is not a device", "auto, cpu, cuda or cuda:N"]),
    (PRETRAIN + ["--out", "{dir}/run", "--device", "mps"], 2, ["--device = 'mps'", "auto, cpu, cuda or cuda:N"]),
    (PRETRAIN + ["--out", "{dir}/run", "--set", "train.device=cuda"], 2, ["train.device = 'cuda' but CUDA"]),
    # cxrtune evaluate
    (EVALUATE + ["--out", "{dir}/r.parquet", "--size", "0"], 2, ["--size 0 is out of range", "from 8 to 4096"]),
    (EVALUATE + ["--out", "{dir}/r.parquet", "--trials", "0"], 2, ["--trials 0 is out of range", "integer >= 1"]),
    (EVALUATE + ["--out", "{dir}/r.parquet", "--shots", "0,5"], 2,
     ["--shots '0,5'", "'0' is not a shot count", ">= 1"]),
    (EVALUATE + ["--out", "{dir}/r.parquet", "--shots", "5,x"], 2, ["--shots '5,x'", "'x' is not a shot count"]),
    (EVALUATE + ["--out", "{dir}"], 2, ["--out {dir} is a folder", "results Parquet file"]),
    (EVALUATE + ["--out", "{dir}/r.parquet", "--device", "cuda"], 2, ["--device = 'cuda' but CUDA is not available"]),
    # cxrtune report / compare
    (REPORT + ["--results", "{file}"], 2, ["--results {file} is not a Parquet file", "expected a tidy results table"]),
    (REPORT + ["--results", "{empty}"], 2, ["--results {empty} is an empty file", "Parquet"]),
    (REPORT + ["--results", "{dir}"], 2, ["--results {dir} is not a file", "Parquet"]),
    (REPORT + ["--results", "{dir}/missing.parquet"], 2, ["--results {dir}/missing.parquet does not exist"]),
    (REPORT + ["--gradcam-size", "0"], 2, ["--gradcam-size 0 is out of range", "from 32 to 4096"]),
    (REPORT + ["--gradcam-images", "-1"], 2, ["--gradcam-images -1 is out of range", "integer >= 1"]),
    (["compare", "a", "--input-size", "0"], 2, ["--input-size 0 is out of range", "from 16 to 4096"]),
    # cxrtune export
    (["export", "--sweep", "s", "--storage", "{dir}", "--out", "{file}"], 2,
     ["export folder {file} is an existing file, not a folder"]),
]


@pytest.fixture
def paths(tmp_path, monkeypatch):
    """Real files to point the options at; no CUDA (also on a GPU machine); a private cache."""
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "notes.txt").write_text("col_a,col_b\n1,2\n")
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    return {"file": str(tmp_path / "notes.txt"), "empty": str(tmp_path / "empty.parquet"),
            "dir": str(tmp_path / "folder")}


@pytest.mark.parametrize("argv, status, fragments", CASES,
                         ids=[" ".join(argv[:1] + argv[-2:]) for argv, _, _ in CASES])
def test_bad_input_is_refused_with_a_clear_message(paths, capsys, argv, status, fragments):
    threads = torch.get_num_threads()
    try:
        assert main([a.format(**paths) for a in argv]) == status
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert err.startswith("cxrtune: error: "), err
    for fragment in fragments:
        assert fragment.format(**paths) in err
    assert "Traceback" not in err
    assert not Path(paths["dir"], "run").exists()  # nothing was started


def test_the_real_command_exits_2_with_the_message(tmp_path):
    """``python -m cxrtune``: the same refusal from a fresh interpreter."""
    env = {**os.environ, "CXRTUNE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "cxrtune", "pretrain", "--method", "moco", "--profile", "smoke",
                           "--size", "0", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("cxrtune: error: --size 0 is out of range")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
