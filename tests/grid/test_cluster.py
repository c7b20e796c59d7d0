"""cluster.yaml: the launcher config ships and installs the package and gives workers GPUs."""

from __future__ import annotations

import yaml

from tests.conftest import REPO


def test_cluster_config_ships_the_package_to_gpu_workers():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert cfg["file_mounts"]["~/slamgrid"] == "."
    assert any("pip install" in cmd and "~/slamgrid" in cmd for cmd in cfg["setup_commands"])
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers)
    start = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2
    assert "mlflow server" in start and "--dashboard-host=127.0.0.1" in start
