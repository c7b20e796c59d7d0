"""One driver per experiment and store at a time: a lease kept in the store, which a killed driver does not hold.

`slamgrid run` takes the experiment's lease before it starts any cell and gives it back when it stops, however it
stops short of SIGKILL. The lease lives on the experiment's parent run, so that drivers on different machines
sharing one `mlflow server` see it:

- Each taking is the param `driver.lease.<n>` (JSON: host, pid, the process's start time, a random token, when),
  written with the next n. MLflow refuses to change a param's value, and the store's unique key on (run, key)
  makes the write atomic: of two drivers that both saw lease n free, exactly one writes n+1; the other is told
  who holds it. The params double as a history of the drivers that ran the experiment.
- The holder stamps the tag `driver.heartbeat` (`<n> <unix time>`) every `HEARTBEAT_SECONDS`, and sets
  `driver.released` to n when it stops.

Lease n is held while it is not released and its holder lives: on the same host, while a process with its pid and
start time exists (a SIGKILLed driver frees it at once); from another host, while its heartbeat is younger than
`STALE_SECONDS`. The tag `driver.ray_processes.<n>` lists the local Ray processes the holder started, so that the
next driver on that host stops those a SIGKILL left behind (Ray's dashboard and runtime-env agents outlive it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import psutil
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from grid.errors import GridError

log = logging.getLogger(__name__)

LEASE_PARAM = "driver.lease."
"""Prefix of the param recording each taking of the lease, `driver.lease.<n>`."""
HEARTBEAT_TAG = "driver.heartbeat"
RELEASED_TAG = "driver.released"
RAY_PROCESSES_TAG = "driver.ray_processes."
HEARTBEAT_SECONDS = 10.0
"""How often the holder stamps its heartbeat."""
STALE_SECONDS = 90.0
"""A heartbeat older than this means the holder on another host is gone (its clock may differ a little)."""


@dataclass(frozen=True)
class Holder:
    """A driver that took the lease."""

    lease: int
    """Which taking of the lease (1, 2, ...)."""
    host: str
    """Its host name."""
    pid: int
    """Its process id on that host."""
    created: float
    """Its process's start time (unix seconds), which tells it from a later process given the same pid."""
    token: str
    """Random, so that no two takings write the same value."""
    since: float
    """When it took the lease (unix seconds)."""

    def describe(self) -> str:
        """`pid 123 on host h (since 2026-12-03 16:00:00 UTC)`."""
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"pid {self.pid} on host {self.host} (since {when})"


class DriverLease:
    """The lease of one experiment in one store, as this process sees it (`acquire`, `release`, `holder`)."""

    def __init__(self, client: MlflowClient, parent_run: str, what: str) -> None:
        """Look at the lease on an experiment's parent run.

        Args:
            client: The store's client.
            parent_run: The experiment's parent run, where the lease lives.
            what: The experiment and store, for messages (`experiment 'demo' in sqlite:///mlflow.db`).
        """
        self.client = client
        self.parent_run = parent_run
        self.what = what
        self.mine: Holder | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def holder(self) -> Holder | None:
        """The driver holding the lease now, None when it is free."""
        holders, tags = self._read()
        if not holders:
            return None
        newest = holders[-1]
        return newest if _alive(newest, tags) else None

    def acquire(self) -> Holder | None:
        """Take the lease, and start stamping its heartbeat.

        Returns:
            The previous holder, gone without releasing it (killed), if any: its cells' runs were left RUNNING.

        Raises:
            GridError: Another live driver holds it.
        """
        holders, tags = self._read()
        previous = holders[-1] if holders else None
        if previous is not None and _alive(previous, tags):
            raise self._busy(previous)
        process = psutil.Process()
        mine = Holder(
            lease=previous.lease + 1 if previous else 1,
            host=socket.gethostname(),
            pid=process.pid,
            created=process.create_time(),
            token=uuid.uuid4().hex,
            since=time.time(),
        )
        record = {"host": mine.host, "pid": mine.pid, "created": mine.created, "token": mine.token, "since": mine.since}
        try:
            self.client.log_batch(self.parent_run, params=[Param(f"{LEASE_PARAM}{mine.lease}", json.dumps(record))])
        except MlflowException as err:
            # Another driver wrote lease n+1 first: it holds the lease now.
            winner = next((h for h in self._read()[0] if h.lease == mine.lease), None)
            if winner is None:
                raise
            raise self._busy(winner) from err
        self.mine = mine
        self._stamp()
        self._beat = threading.Thread(target=self._heartbeat, name="slamgrid-lease", daemon=True)
        self._beat.start()
        gone = previous is not None and str(previous.lease) != tags.get(RELEASED_TAG)
        return previous if gone else None

    def record_ray_processes(self, processes: list[psutil.Process]) -> None:
        """Note the local Ray processes this driver started, for the next driver to clean up after a SIGKILL."""
        if self.mine is None:
            return
        listed = []
        for process in processes:
            with contextlib.suppress(psutil.Error):  # one that exited meanwhile needs no cleaning up
                listed.append([process.pid, process.create_time()])
        self.client.set_tag(self.parent_run, f"{RAY_PROCESSES_TAG}{self.mine.lease}", json.dumps(listed))

    def left_behind(self, previous: Holder) -> list[psutil.Process]:
        """The Ray processes a killed driver on this host started that still run (with their children)."""
        if previous.host != socket.gethostname():
            return []
        listed = json.loads(self._read()[1].get(f"{RAY_PROCESSES_TAG}{previous.lease}", "[]"))
        found: dict[int, psutil.Process] = {}
        for pid, created in listed:
            process = _process(pid, created)
            if process is None:
                continue
            for each in [process, *_children(process)]:
                found[each.pid] = each
        return list(found.values())

    def release(self) -> None:
        """Give the lease back (idempotent): the next driver takes it at once."""
        if self.mine is None:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=HEARTBEAT_SECONDS)
        try:
            self.client.set_tag(self.parent_run, RELEASED_TAG, str(self.mine.lease))
        except MlflowException as err:  # the store is gone: the lease frees itself once this process has exited
            log.warning("could not release the driver lease of %s: %s", self.what, err)
        self.mine = None

    def _busy(self, holder: Holder) -> GridError:
        return GridError(
            f"{self.what} is being run by another slamgrid driver, {holder.describe()}; wait for it to finish, "
            f"or stop it (a killed driver frees the experiment at once on its host, "
            f"after {STALE_SECONDS:.0f} s without its heartbeat elsewhere)"
        )

    def _stamp(self) -> None:
        assert self.mine is not None
        self.client.set_tag(self.parent_run, HEARTBEAT_TAG, f"{self.mine.lease} {time.time():.3f}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._stamp()
            except Exception as err:  # the store is away for a while: stamp again next time
                log.debug("driver heartbeat: %s", err)

    def _read(self) -> tuple[list[Holder], dict[str, str]]:
        """Every taking of the lease, oldest first, and the parent run's tags."""
        data = self.client.get_run(self.parent_run).data
        holders = []
        for key, value in data.params.items():
            if key.startswith(LEASE_PARAM) and key[len(LEASE_PARAM) :].isdigit():
                record = json.loads(value)
                holders.append(Holder(lease=int(key[len(LEASE_PARAM) :]), **record))
        return sorted(holders, key=lambda h: h.lease), dict(data.tags)


def stop_processes(processes: list[psutil.Process], grace: float = 3.0) -> list[str]:
    """SIGTERM, then SIGKILL after `grace` seconds, each process still running; returns what was stopped."""
    stopped = []
    for process in processes:
        try:
            stopped.append(f"{process.name()} ({process.pid})")
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=grace)
    return stopped


def this_process_children() -> list[psutil.Process]:
    """Every process this one started, recursively (after `ray.init`: the local Ray's processes)."""
    return _children(psutil.Process(os.getpid()))


def _alive(holder: Holder, tags: dict[str, str]) -> bool:
    """Whether `holder` still holds its lease (see the module's docstring)."""
    if tags.get(RELEASED_TAG) == str(holder.lease):
        return False
    if holder.host == socket.gethostname():
        return _process(holder.pid, holder.created) is not None
    beat = tags.get(HEARTBEAT_TAG, "").split()
    if len(beat) != 2 or beat[0] != str(holder.lease):
        return time.time() - holder.since < STALE_SECONDS
    return time.time() - float(beat[1]) < STALE_SECONDS


def _process(pid: int, created: float) -> psutil.Process | None:
    """The running process with this pid and start time, None if it is gone (or the pid was reused)."""
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - created) > 0.5 or process.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return process


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []
