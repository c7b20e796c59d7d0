"""Cells meet a dying worker, a NaN loss and an out-of-memory error: the grid goes on, and nothing is doubled.

Each test runs the grid in this process on a local Ray of its own (2 CPUs).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from grid.cli import main
from grid.runner import RunReport, run_experiment
from tests.grid.world import write_experiment
from tests.reliability.conftest import STUDIES
from tests.reliability.drivers import REPO, checkpoints, runs_by_cell, wait_for
from tests.reliability.faults import OOM_MARKER

ASR = STUDIES[0]


@pytest.fixture
def local_ray(request):
    """A local Ray of 2 CPUs for one test, with the runtime environment the test's `runtime_env` mark gives."""
    mark = request.node.get_closest_marker("runtime_env")
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env=mark.args[0] if mark else None)
    yield
    ray.shutdown()


def test_a_killed_worker_is_replaced_and_its_cell_resumes_in_the_same_call(world, tmp_path, local_ray):
    train = {"steps": 300, "batch_size": 2, "checkpoint_every": 20, "log_every": 20}
    path = write_experiment(world, "worker-killed", [{**ASR, "healing": ["none"]}], train=train)
    uri, workdir = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "out"
    result: dict[str, RunReport] = {}
    thread = threading.Thread(target=lambda: result.update(report=run_experiment(path, uri, workdir)), daemon=True)
    thread.start()
    wait_for(lambda: checkpoints(workdir), "a checkpoint")
    [[train_run]] = [runs for runs in runs_by_cell(uri, "worker-killed").values()
                     if runs[0].data.tags["cell_kind"] == "train"]  # fmt: skip
    killed = train_run.data.tags["worker"]
    os.kill(int(killed.rpartition(":")[2]), signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive()

    assert result["report"].counts == {"FINISHED": 5}
    runs = runs_by_cell(uri, "worker-killed")
    assert all(len(cell_runs) == 1 and cell_runs[0].info.status == "FINISHED" for cell_runs in runs.values())
    [resumed] = runs[train_run.data.tags["cell_id"]]
    assert resumed.info.run_id == train_run.info.run_id
    assert resumed.data.tags["worker"] != killed and resumed.data.metrics["train.resumed_from"] >= 20
    assert resumed.data.tags["retries"].startswith("1/2: worker died: ")
    history = MlflowClient(uri).get_metric_history(resumed.info.run_id, "train.loss")
    assert {m.step for m in history} == set(range(20, 301, 20))  # nothing lost


@pytest.mark.runtime_env(
    {
        "worker_process_setup_hook": "tests.reliability.faults.out_of_memory_in_unhealed_prune_cells",
        # The hook runs before the driver's import path reaches the worker.
        "env_vars": {
            OOM_MARKER: str(Path(tempfile.gettempdir()) / f"slamgrid-oom-{os.getpid()}"),
            "PYTHONPATH": str(REPO),
        },
    }
)
def test_cells_that_raise_are_failed_with_their_traceback_block_dependents_and_a_rerun_retries_them(
    world, tmp_path, local_ray, capsys
):
    marker = Path(tempfile.gettempdir()) / f"slamgrid-oom-{os.getpid()}"
    marker.touch()
    # The healing's learning rate makes its loss overflow at once: a NaN loss, for real.
    defaults = {"heal_train": {"steps": 3, "lr": 1e30}}
    path = write_experiment(world, "raising", [ASR], defaults=defaults)
    uri, workdir = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "out"
    try:
        first = run_experiment(path, uri, workdir)
    finally:
        marker.unlink()

    # The training, its evaluation and the path finished; both pruned cells failed; the summary is blocked.
    assert first.counts == {"FINISHED": 3, "FAILED": 2, "BLOCKED": 1}
    errors = {tags["healing"]: tags["error"] for tags in _prune_tags(uri)}
    assert errors["none"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB (simulated)"
    assert errors["decoder+projector"].startswith("FloatingPointError: step ")
    assert "the training loss is" in errors["decoder+projector"]
    client = MlflowClient(uri)
    failed = {cell: runs[0] for cell, runs in runs_by_cell(uri, "raising").items()
              if runs[0].info.status == "FAILED"}  # fmt: skip
    for run in failed.values():
        with tempfile.TemporaryDirectory() as tmp:
            text = Path(client.download_artifacts(run.info.run_id, "error.txt", tmp)).read_text()
        assert text.startswith("Traceback (most recent call last):") and run.data.tags["error"].split(":")[0] in text
        assert "retries" not in run.data.tags  # a cell that raises is not started again in the same call

    assert main(["status", str(path), "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "FAILED    2" in out and "BLOCKED   1" in out
    assert "OutOfMemoryError: CUDA out of memory" in out and "summary" in out and "is FAILED" in out

    # A rerun retries the failed cells in their runs: the memory is there now, the learning rate is still wrong.
    again = run_experiment(path, uri, workdir)
    assert again.counts == {"FINISHED": 4, "FAILED": 1, "BLOCKED": 1}
    runs = runs_by_cell(uri, "raising")
    assert all(len(cell_runs) == 1 for cell_runs in runs.values())
    assert {cell: runs[cell][0].info.status for cell in failed} == {
        cell: "FINISHED" if run.data.tags["healing"] == "none" else "FAILED" for cell, run in failed.items()
    }


def _prune_tags(uri: str) -> list[dict[str, str]]:
    return [runs[0].data.tags for runs in runs_by_cell(uri, "raising").values()
            if runs[0].data.tags["cell_kind"] == "prune"]  # fmt: skip
