"""`ray job submit --working-dir`: the grid's relative paths resolve in each node's copy of the working directory.

A real head node (`ray start --head`) on this machine, a job submitted with `--working-dir` holding the tiny world
and an experiment file whose paths are relative to it; the original directory is moved away as soon as the job
is submitted, so the cells can only finish if every worker reads its own copy, as the nodes of a cluster do.
Opt-in (`-m slow`): it starts and stops Ray's processes on the machine.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.grid.world import build_world, cell_runs, write_experiment

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))
STUDY = {"name": "asr", "task": "asr", "models": ["tiny"], "paths": [{"source": "speech"}], "depths": [2],
         "healing": ["decoder+projector"]}  # fmt: skip


def test_a_submitted_job_resolves_paths_in_its_working_directory_copy(tmp_path):
    world = build_world(tmp_path / "job")
    path = write_experiment(world, "job", [STUDY])
    doc = yaml.safe_load(path.read_text())
    doc["models"]["tiny"]["encoder"]["name"] = "./encoder"
    doc["models"]["tiny"]["decoder"]["name"] = "./lm"
    for task in doc["tasks"].values():
        task["train"] = {**task["train"], "path": "train.jsonl"}
        for group in ("dev", "eval"):
            task[group] = {name: {**data, "path": Path(data["path"]).name} for name, data in task[group].items()}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store}/mlflow.db"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    port, dashboard = _free_port(), _free_port()
    head = ["--port", str(port), "--dashboard-port", str(dashboard), "--num-cpus", "2", "--disable-usage-stats"]
    started = subprocess.run([RAY, "start", "--head", *head], env=env, capture_output=True, text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        address = ["--address", f"http://127.0.0.1:{dashboard}"]
        command = [
            sys.executable,
            "-m",
            "grid",
            "run",
            "job.yaml",
            "--tracking-uri",
            uri,
            "--workdir",
            str(store / "out"),
        ]
        submit = [RAY, "job", "submit", *address, "--working-dir", str(world), "--no-wait", "--", *command]
        out = subprocess.run(submit, env=env, check=True, capture_output=True, text=True)
        job = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout + out.stderr).group(0)
        shutil.move(world, tmp_path / "moved")  # uploaded: from now on only the job's copies exist
        status = ""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not any(s in status for s in ("succeeded", "failed", "stopped")):
            time.sleep(5)
            status = subprocess.run([RAY, "job", "status", *address, job], env=env, capture_output=True, text=True)
            status = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr).lower()  # no colour codes
        logs = subprocess.run([RAY, "job", "logs", *address, job], env=env, capture_output=True, text=True).stdout
        assert f"job '{job.lower()}' succeeded" in status, logs[-3000:]
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
    runs = cell_runs(uri, "job")
    assert len(runs) == 5 and all(run.info.status == "FINISHED" for run in runs)
    assert "job: 5 cells\n  FINISHED  5" in logs


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
