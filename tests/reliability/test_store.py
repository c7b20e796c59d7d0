"""The tracking store and the working directory fail: the MLflow server goes away and comes back, a directory
cannot be written or its disk is full. Nothing is lost, nothing is left half-written, and the message says so.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.reliability.drivers import checkpoints, runs_by_cell, slamgrid, start_driver, wait_for

EXPERIMENT = "reliability"


class Server:
    """`mlflow server` on 127.0.0.1 with a sqlite backend, which a test stops and starts again on the same port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                   "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]  # fmt: skip
        log = (self.root / "server.log").open("a")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._answers, "the MLflow server to answer", timeout=120, process=self.process)

    def stop(self) -> None:
        """SIGKILL the server and its workers, as a crash or a lost head node would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def _answers(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True


@pytest.fixture
def server(tmp_path) -> Iterator[Server]:
    server = Server(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
def test_the_mlflow_server_going_away_for_a_while_loses_nothing(long_grid, server, tmp_path):
    workdir = tmp_path / "out"
    driver = start_driver(long_grid, server.uri, workdir, tmp_path / "driver.log")
    wait_for(lambda: checkpoints(workdir), "a checkpoint", process=driver)
    server.stop()
    time.sleep(15)  # well within MLflow's retries with backoff (7 retries, a few minutes in all)
    server.start()
    assert driver.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()

    runs = runs_by_cell(server.uri, EXPERIMENT)
    assert all(len(cell_runs) == 1 and cell_runs[0].info.status == "FINISHED" for cell_runs in runs.values())
    [[train]] = [cell_runs for cell_runs in runs.values() if cell_runs[0].data.tags["cell_kind"] == "train"]
    history = MlflowClient(server.uri).get_metric_history(train.info.run_id, "train.loss")
    assert {m.step for m in history} == set(range(20, 601, 20))


@pytest.mark.slow
def test_an_mlflow_server_gone_for_good_stops_the_driver_cleanly_and_a_rerun_resumes(long_grid, server, tmp_path):
    workdir = tmp_path / "out"
    # Retries cut short, so that the outage outlasts them.
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    driver = start_driver(long_grid, server.uri, workdir, tmp_path / "driver.log", env=quick)
    wait_for(lambda: checkpoints(workdir), "a checkpoint", process=driver)
    server.stop()
    assert driver.wait(timeout=600) == 3
    log = (tmp_path / "driver.log").read_text()
    assert f"slamgrid: error: the MLflow store {server.uri} failed: " in log
    assert "run the same command again once the store is back" in log

    server.start()
    again = slamgrid("run", str(long_grid), "--tracking-uri", server.uri, "--workdir", str(workdir), "--address",
                     "local")  # fmt: skip
    assert again.returncode == 0, again.stderr
    runs = runs_by_cell(server.uri, EXPERIMENT)
    assert all(len(cell_runs) == 1 and cell_runs[0].info.status == "FINISHED" for cell_runs in runs.values())
    [[train]] = [cell_runs for cell_runs in runs.values() if cell_runs[0].data.tags["cell_kind"] == "train"]
    assert train.data.metrics["train.resumed_from"] >= 20
    history = MlflowClient(server.uri).get_metric_history(train.info.run_id, "train.loss")
    assert {m.step for m in history} == set(range(20, 601, 20))


@contextmanager
def mounted(where: Path, options: str) -> Iterator[Path]:
    """A small tmpfs at `where` (e.g. `size=64k`, `ro`): a full or read-only disk, even for root."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_full_or_read_only_workdir_is_one_line_and_writes_nothing(long_grid, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with mounted(tmp_path / "full", "size=64k") as full:
        done = slamgrid("run", str(long_grid), "--tracking-uri", uri, "--workdir", str(full / "out"))
        assert done.returncode == 3
        [line] = done.stderr.strip().splitlines()
        assert line == (f"slamgrid: error: --workdir {full / 'out' / EXPERIMENT}: cannot write there "
                        f"(No space left on device); nothing was started")  # fmt: skip
    with mounted(tmp_path / "ro", "ro") as read_only:
        done = slamgrid("run", str(long_grid), "--tracking-uri", uri, "--workdir", str(read_only / "out"))
        assert done.returncode == 3
        [line] = done.stderr.strip().splitlines()
        assert line.startswith(f"slamgrid: error: --workdir {read_only / 'out' / EXPERIMENT}: cannot write there")
        assert "Read-only file system" in line
    assert not (tmp_path / "mlflow.db").exists()


def test_a_read_only_store_directory_is_one_line_and_the_store_is_untouched(long_grid, tmp_path):
    with mounted(tmp_path / "store", "size=16m") as store:
        uri = f"sqlite:///{store}/mlflow.db"
        # The store exists and holds the experiment (made in another process: an open database file would
        # keep the file system from being remounted).
        code = f"from mlflow.tracking import MlflowClient; MlflowClient({uri!r}).create_experiment({EXPERIMENT!r})"
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        before = (store / "mlflow.db").read_bytes()
        subprocess.run(["mount", "-o", "remount,ro", str(store)], check=True)
        done = slamgrid("run", str(long_grid), "--tracking-uri", uri, "--workdir", str(tmp_path / "out"))
        assert done.returncode == 3
        [line] = done.stderr.strip().splitlines()
        assert line == (f"slamgrid: error: the tracking store's directory {store}: cannot write there "
                        f"(Read-only file system); nothing was started")  # fmt: skip
        assert (store / "mlflow.db").read_bytes() == before
