"""cluster.yaml: the launcher config ships and installs the package and gives workers GPUs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
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


def _head_commands(cfg: dict) -> tuple[str, str]:
    """The MLflow server's and its relay's command lines from `head_start_ray_commands`."""
    commands = [" ".join(command.split()) for command in cfg["head_start_ray_commands"]]
    server = next(command for command in commands if "mlflow server" in command)
    relay = next(command for command in commands if command.startswith("nohup socat"))
    return server, relay


def test_the_mlflow_ui_tunnel_ends_where_the_server_listens_and_nowhere_public():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    server, relay = _head_commands(cfg)
    host = re.search(r"--host (\$\(.+?\)|\S+) --port (\d+)", server)
    private, port = host.group(1), host.group(2)
    assert private == "$(hostname -I | awk '{print $1}')"  # the head's private address, which the workers reach
    listen = re.search(r"TCP-LISTEN:(\d+),bind=([\d.]+)\S* TCP:(\$\(.+?\)):(\d+)", relay)
    assert listen.group(2) == "127.0.0.1" and listen.group(3) == private and listen.group(4) == port
    # `ray attach -p 5000` forwards to the head's loopback port 5000: the relay's.
    attach = re.findall(r"ray attach cluster.yaml((?: -p \d+)+)", (REPO / "README.md").read_text())
    assert attach and all(f"-p {listen.group(1)}" in ports for ports in attach)
    assert f"-p {listen.group(1)}" in _comments(REPO / "cluster.yaml")
    # The workers are told the server's own address.
    setup = " ".join(cfg["head_setup_commands"])
    assert f"MLFLOW_TRACKING_URI=http://{private}:{port}" in setup
    assert "0.0.0.0" not in server + relay


def _comments(path) -> str:
    """The comment lines of a YAML file."""
    return "\n".join(line for line in path.read_text().splitlines() if line.lstrip().startswith("#"))


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed (.ci/run installs it)")
def test_the_head_s_mlflow_commands_as_written_serve_the_private_address_and_the_tunnel_end(tmp_path):
    private = subprocess.run(["bash", "-c", "hostname -I | awk '{print $1}'"], capture_output=True, text=True)
    address = private.stdout.strip()
    if not address or address.startswith("127."):
        pytest.skip("this machine has no address besides loopback")
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    processes = []
    try:
        for command in _head_commands(cfg):
            # As written, but in the foreground of its own process group, on a free port, with a scratch home.
            command = command.removeprefix("nohup ").rsplit(" > ", 1)[0].replace("5000", port)
            environment = {
                **os.environ,
                "HOME": str(tmp_path),
                "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            }
            processes.append(subprocess.Popen(["bash", "-c", f"exec {command}"], env=environment,
                                              start_new_session=True, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))  # fmt: skip
            if len(processes) == 1:
                assert _health(f"http://{address}:{port}/health", 90) == "OK"
                # The server alone does not answer on loopback: that is what the relay is for.
                with pytest.raises(OSError):
                    socket.create_connection(("127.0.0.1", int(port)), timeout=2).close()
        assert _health(f"http://127.0.0.1:{port}/health", 30) == "OK"
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def test_the_submit_commands_put_the_workdir_on_the_shared_filesystem_and_name_the_store():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert any("/mnt/shared" in command and "mount -t nfs4" in command for command in cfg["setup_commands"])
    readme = (REPO / "README.md").read_text()
    header = "\n".join(
        line.lstrip("# ") for line in (REPO / "experiments" / "paper.yaml").read_text().splitlines()
        if line.startswith("#")
    )  # fmt: skip
    for text in (readme, header):
        joined = text.replace("\\\n", " ")
        submits = [
            line for line in joined.splitlines() if re.search(r"ray (job )?submit ", line) and "paper.yaml" in line
        ]
        assert len(submits) >= 2, text[:200]
        assert all("--workdir /mnt/shared/out" in line for line in submits), submits
        assert all("MLFLOW_TRACKING_URI" in line for line in submits if "job submit" in line), submits


def _health(url: str, seconds: float) -> str:
    """The body `url` answers with, once it answers (within `seconds`)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
