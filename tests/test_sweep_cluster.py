"""The same sweep on a two-node Ray cluster (two raylets on loopback): trials land on both nodes,
results and MLflow runs come back to the driver."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from _sweep_fixtures import remove_ray_tmpdir, short_ray_tmpdir  # noqa: E402

DRIVER = Path(__file__).with_name("_sweep_driver.py")


@pytest.mark.slow
def test_sweep_runs_across_two_nodes(tmp_path, monkeypatch):
    ray_tmp = short_ray_tmpdir()  # both raylets' session files, removed below
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": 128 * 1024**2})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=128 * 1024**2)
        cluster.wait_for_nodes()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        done = subprocess.run(
            [sys.executable, str(DRIVER), "--storage", str(tmp_path / "runs"), "--uri", uri,
             "--markers", str(tmp_path / "m"), "--samples", "4", "--sleep", "0.3", "--address", cluster.address],
            env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "TRIALS 4 ERRORS 0" in done.stdout
        nodes = {p.name.split("-", 1)[1] for p in (tmp_path / "m" / "nodes").glob("*")}
        assert len(nodes) == 2, nodes
        client = mlflow.tracking.MlflowClient(uri)
        experiment = client.get_experiment_by_name("cxrtune/synthetic")
        children = [r for r in client.search_runs([experiment.experiment_id])
                    if r.data.tags.get("cxrtune.role") == "trial"]
        assert len(children) == 4
    finally:
        cluster.shutdown()
        remove_ray_tmpdir(ray_tmp)
