"""Drivers as a user runs them: `slamgrid` in its own process (so that it can be killed), and waiting for the
moments a fault is injected at (a checkpoint written, a run started).

Each driver runs `python -m grid run ... --address local`: a new local Ray of its own, whatever else ran on the
machine, in a new session (process group), so that a test can SIGINT it as a terminal's Ctrl-C would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mlflow.tracking import MlflowClient

from tests.grid.world import repeatable
from tests.reliability.conftest import RESUMED

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def start_driver(
    path: Path, uri: str, workdir: Path, log: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `slamgrid run path` on a new local Ray; its stdout and stderr go to `log`."""
    command = [sys.executable, "-m", "grid", "run", str(path), "--tracking-uri", uri, "--workdir", str(workdir),
               "--address", "local", *extra]  # fmt: skip
    out = log.open("w")
    return subprocess.Popen(
        command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        start_new_session=True,
    )  # fmt: skip


def slamgrid(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `slamgrid args...` to its end; its exit code, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "grid", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def wait_for(found: Callable[[], T], what: str, timeout: float = 300, process: subprocess.Popen | None = None) -> T:
    """Poll `found` until it returns something true; fail naming `what` on timeout or if `process` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        value = found()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the driver exited with {process.returncode} before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def checkpoints(workdir: Path, kind: str = "train") -> list[Path]:
    """The training checkpoints written under a driver's working directory (`kind`: train, heal)."""
    return sorted(workdir.glob(f"*/*/{kind}/checkpoints/step-*[0-9]"))


def runs_by_cell(uri: str, experiment: str) -> dict[str, list]:
    """Every cell run of an experiment, grouped by cell id."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    grouped: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id], "tags.cell_id LIKE '%'", max_results=1000):
        grouped.setdefault(run.data.tags["cell_id"], []).append(run)
    return grouped


def results(uri: str, experiment: str) -> dict[str, dict[str, float]]:
    """Every cell's metrics by cell id, but time, memory and where training resumed: what an undisturbed and a
    disturbed run must agree on."""
    return {cell: repeatable(run.data.metrics, RESUMED) for cell, [run] in runs_by_cell(uri, experiment).items()}
