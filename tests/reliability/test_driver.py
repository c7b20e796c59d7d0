"""The driver meets SIGKILL, Ctrl-C, a second driver and a dead Ray head: each survived, nothing lost or doubled.

Drivers run as `slamgrid run` processes (`tests.reliability.drivers`), each on its own new local Ray.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from mlflow.tracking import MlflowClient

from grid.errors import GridError
from grid.lease import RAY_PROCESSES_TAG, DriverLease
from grid.tracking import GridStore
from tests.reliability.drivers import checkpoints, results, runs_by_cell, slamgrid, start_driver, wait_for

EXPERIMENT = "reliability"


@pytest.fixture(scope="module")
def calm(long_grid, tmp_path_factory) -> dict[str, dict[str, float]]:
    """The grid's results, undisturbed."""
    root = tmp_path_factory.mktemp("calm")
    uri = f"sqlite:///{root}/mlflow.db"
    done = slamgrid("run", str(long_grid), "--tracking-uri", uri, "--workdir", str(root / "out"), "--address", "local")
    assert done.returncode == 0, done.stderr
    return results(uri, EXPERIMENT)


@pytest.mark.slow
def test_a_sigkilled_driver_is_resumed_by_the_next_as_if_undisturbed(long_grid, calm, tmp_path):
    uri, workdir = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "out"
    driver = start_driver(long_grid, uri, workdir, tmp_path / "first.log")
    # Killed while the training is half done, once the text path (which does not wait for it) has finished.
    wait_for(lambda: checkpoints(workdir) and _finished(uri), "a checkpoint and a finished cell", process=driver)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    before = {cell: (run.info.run_id, run.data.metrics) for cell, [run] in runs_by_cell(uri, EXPERIMENT).items()
              if run.info.status == "FINISHED"}  # fmt: skip
    [train] = [run for [run] in runs_by_cell(uri, EXPERIMENT).values() if run.data.tags["cell_kind"] == "train"]
    assert before and train.info.status == "RUNNING"

    # The killed run does not read RUNNING forever: status says its driver is gone.
    status = slamgrid("status", str(long_grid), "--tracking-uri", uri)
    assert "INTERRUPTED 1" in " ".join(status.stdout.split()) and f"train {train.data.tags['cell_id']}" in status.stdout
    left = _ray_processes(uri)
    assert left, "a SIGKILLed driver leaves some of its local Ray's processes running"

    again = slamgrid("run", str(long_grid), "--tracking-uri", uri, "--workdir", str(workdir), "--address", "local")
    assert again.returncode == 0, again.stderr
    assert "stopped without finishing: resuming its cells" in again.stderr
    assert f"stopped {len(left)} Ray process(es) left by that driver" in again.stderr
    assert not [p for p in left if p.is_running()]

    runs = runs_by_cell(uri, EXPERIMENT)
    assert all(len(cell_runs) == 1 and cell_runs[0].info.status == "FINISHED" for cell_runs in runs.values())
    for cell, (run_id, metrics) in before.items():  # finished cells untouched
        assert runs[cell][0].info.run_id == run_id and runs[cell][0].data.metrics == metrics
    [resumed] = runs[train.data.tags["cell_id"]]
    assert resumed.info.run_id == train.info.run_id and resumed.data.metrics["train.resumed_from"] >= 20
    assert results(uri, EXPERIMENT) == calm


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_marks_killed_and_the_rerun_resumes_past_a_truncated_checkpoint(long_grid, calm, tmp_path):
    uri, workdir = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "out"
    driver = start_driver(long_grid, uri, workdir, tmp_path / "first.log")
    wait_for(lambda: len(checkpoints(workdir)) >= 2, "two checkpoints", process=driver)
    os.killpg(driver.pid, signal.SIGINT)  # a terminal's Ctrl-C: the driver's whole process group
    assert driver.wait(timeout=120) == 130
    log = (tmp_path / "first.log").read_text()
    assert "interrupted; the running cells are marked KILLED" in log
    [train] = [run for [run] in runs_by_cell(uri, EXPERIMENT).values() if run.data.tags["cell_kind"] == "train"]
    assert train.info.status == "KILLED"
    assert not [p for p in _ray_processes(uri) if p.is_running()], "a clean stop leaves no Ray process behind"

    # The newest checkpoint cut short, as a full disk or a crash while writing would leave it.
    latest = checkpoints(workdir)[-1]
    weights = latest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    again = slamgrid("run", str(long_grid), "--tracking-uri", uri, "--workdir", str(workdir), "--address", "local")
    assert again.returncode == 0, again.stderr

    [resumed] = runs_by_cell(uri, EXPERIMENT)[train.data.tags["cell_id"]]
    assert resumed.info.run_id == train.info.run_id and resumed.info.status == "FINISHED"
    step = int(latest.name.removeprefix("step-"))
    assert resumed.data.metrics["train.resumed_from"] == step - 20  # the one before the truncated one
    assert resumed.data.tags["train.unreadable_checkpoints"] == str(latest)
    assert results(uri, EXPERIMENT) == calm


def test_a_second_driver_is_refused_naming_the_holder_until_the_holder_is_killed(long_grid, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    holder = _hold_lease(uri)
    try:
        refused = slamgrid("run", str(long_grid), "--tracking-uri", uri, "--workdir", str(tmp_path / "out"))
        assert refused.returncode == 3
        [line] = refused.stderr.strip().splitlines()
        assert line.startswith(f"slamgrid: error: experiment '{EXPERIMENT}' in {uri} is being run by another")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in line
        assert not list((tmp_path / "out").glob("*/*")), "the refused driver started nothing"
    finally:
        holder.kill()
        holder.wait()
    # A SIGKILLed holder leaves nothing stuck: the next driver takes the lease at once.
    lease = _lease(uri)
    previous = lease.acquire()
    lease.release()
    assert previous is not None and previous.pid == holder.pid


def test_of_drivers_starting_at_once_exactly_one_takes_the_lease(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _lease(uri)  # the experiment and its parent run exist
    context = multiprocessing.get_context("spawn")
    barrier, outcomes = context.Barrier(4), context.Queue()
    racers = [context.Process(target=_race, args=(uri, barrier, outcomes)) for _ in range(4)]
    for racer in racers:
        racer.start()
    got = [outcomes.get(timeout=120) for _ in racers]
    for racer in racers:
        racer.join()
    assert sorted(got) == ["busy", "busy", "busy", "took"]


def test_a_dead_ray_head_left_behind_is_one_clear_line_at_once(long_grid, tmp_path):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    # What `ray start --head` leaves behind once its head has died.
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    env = {"RAY_TMPDIR": str(tmp_path), "RAY_ADDRESS": ""}
    began = time.monotonic()
    stale = slamgrid("run", str(long_grid), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--workdir",
                     str(tmp_path / "out"), env=env)  # fmt: skip
    assert time.monotonic() - began < 60  # Ray's own wait would be minutes
    assert stale.returncode == 3
    [line] = stale.stderr.strip().splitlines()
    assert line.startswith(f"slamgrid: error: no Ray cluster answers at 127.0.0.1:{port} (the address `ray start`")
    assert str(tmp_path / "ray" / "ray_current_cluster") in line and "--address local" in line


def _finished(uri: str) -> bool:
    try:
        return any(run.info.status == "FINISHED" for [run] in runs_by_cell(uri, EXPERIMENT).values())
    except Exception:  # the store is not created yet
        return False


def _ray_processes(uri: str) -> list[psutil.Process]:
    """The local Ray processes the first driver recorded on the parent run, as they are now (gone ones left out)."""
    lease = _lease(uri)
    listed = json.loads(MlflowClient(uri).get_run(lease.parent_run).data.tags[f"{RAY_PROCESSES_TAG}1"])
    found = []
    for pid, created in listed:
        try:
            process = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        if abs(process.create_time() - created) < 0.5 and process.status() != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def _lease(uri: str) -> DriverLease:
    store = GridStore(uri, EXPERIMENT)
    return DriverLease(store.client, store.parent_run(), EXPERIMENT)


def _hold_lease(uri: str) -> subprocess.Popen:
    """A process that takes the experiment's lease and holds it until killed."""
    code = textwrap.dedent(f"""
        import time
        from grid.lease import DriverLease
        from grid.tracking import GridStore
        store = GridStore({uri!r}, {EXPERIMENT!r})
        DriverLease(store.client, store.parent_run(), {EXPERIMENT!r}).acquire()
        print("held", flush=True)
        time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _race(uri: str, barrier, outcomes) -> None:
    lease = _lease(uri)
    barrier.wait()
    try:
        lease.acquire()
    except GridError:
        outcomes.put("busy")
        return
    outcomes.put("took")
    time.sleep(5)  # hold it while the others try
    lease.release()
