"""Running an experiment file on Ray: its cells in dependency order, on workers that keep backbones loaded.

`run_experiment` expands the file (`grid.cells`), reads from the MLflow store which cells are finished, and runs
the others on `CellWorker` actors: one per GPU (`num_gpus=1`) on a GPU cluster, else CPU workers. A worker keeps
its loaded backbones (`grid.stages.Backbones`) across cells, and the scheduler sends a ready cell to an idle
worker that already holds its decoder when there is one (`route`). A failing cell is recorded FAILED with its
reason in its run and the grid goes on; the cells that depend on it are not started (BLOCKED, with the reason).
Re-running the same command resumes: see the numbered precedence in `run_experiment`.

Store access happens where the work is: each worker opens its own `GridStore` on the tracking URI and writes
its cells' runs itself (training streams its losses there while it runs). The driver reads the states before
and after, creates the parent run before any worker starts (so that workers find one instead of racing to
create it), marks the run of a cell whose worker died, and logs the backbone loads on the parent run. With the
default sqlite store concurrent writers wait on SQLite's lock (MLflow sets a 20 s busy timeout), which is
enough for a few local workers; a cluster points `MLFLOW_TRACKING_URI` at an `mlflow server` on the head node.

Relative paths in the experiment (models, manifests) resolve against each worker's working directory: the
driver's for a local Ray, the job's `working_dir` under `ray job submit`. Each cell works in
`workdir/<experiment name>/<cell id>/`, where its training checkpoints survive an interruption.

Not here yet: `train` cells run single-process in their worker; the paper's DDP projector training (2 GPUs,
batch 8 per GPU) through Ray Train is the next step.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient
from transformers.utils import logging as hf_logging

from grid.cells import Cell, expand
from grid.experiment import load_experiment
from grid.stages import Backbones, run_cell
from grid.tracking import ERROR_TAG, PENDING, CellState, GridStore
from grid.tracking import tracking_uri as resolve_tracking_uri

log = logging.getLogger(__name__)

FINISHED = "FINISHED"
BLOCKED = "BLOCKED"
"""State of a cell that cannot run because a dependency failed (or is itself blocked)."""
STATES = (FINISHED, "FAILED", "KILLED", "RUNNING", BLOCKED, PENDING)
"""Cell states in display order: MLflow's run statuses, BLOCKED (derived), and PENDING (no run yet)."""
_NOT_DONE = ("FAILED", "KILLED", BLOCKED)
_SQLITE = "sqlite:///"


@dataclass(frozen=True)
class CellStatus:
    """Where one cell stands."""

    cell: Cell
    """The cell."""
    state: str
    """One of `STATES`."""
    run_id: str | None
    """Its run, None when it has none."""
    reason: str | None
    """Why it failed (its run's error) or why it is blocked; None otherwise."""


@dataclass(frozen=True)
class GridStatus:
    """Every cell of an experiment file and where it stands, read from the store."""

    experiment: str
    """The experiment's name (the MLflow experiment)."""
    cells: tuple[CellStatus, ...]
    """One status per cell, in execution order."""

    @property
    def counts(self) -> dict[str, int]:
        """Cells per state, for the states that have any, in `STATES` order."""
        counts = Counter(status.state for status in self.cells)
        return {state: counts[state] for state in STATES if counts[state]}

    @property
    def failed(self) -> list[tuple[str, str]]:
        """(cell id, error) of the FAILED and KILLED cells."""
        return [(s.cell.id, s.reason or "no error recorded") for s in self.cells if s.state in ("FAILED", "KILLED")]

    @property
    def blocked(self) -> list[tuple[str, str]]:
        """(cell id, reason) of the BLOCKED cells."""
        return [(s.cell.id, s.reason or "") for s in self.cells if s.state == BLOCKED]

    @property
    def all_finished(self) -> bool:
        """Whether every cell has a FINISHED run."""
        return all(status.state == FINISHED for status in self.cells)


@dataclass(frozen=True)
class RunReport:
    """What `run_experiment` did, and where the grid stands after it."""

    status: GridStatus
    """Every cell's state, read from the store after the run."""
    started: int
    """Cells this call started (0 when everything was already finished)."""
    worker_loads: dict[str, dict[str, int]] = field(default_factory=dict)
    """Backbone loads of each worker (`host:pid`, its runs' `worker` tag), by `encoder:<name>` / `decoder:<name>`."""

    @property
    def counts(self) -> dict[str, int]:
        """Cells per state."""
        return self.status.counts

    @property
    def failed(self) -> list[tuple[str, str]]:
        """(cell id, error) of the failed cells."""
        return self.status.failed

    @property
    def loads(self) -> dict[str, int]:
        """Backbone loads summed over the workers."""
        total: Counter[str] = Counter()
        for loads in self.worker_loads.values():
            total.update(loads)
        return dict(total)


@dataclass(frozen=True)
class CellOutcome:
    """What a worker reports back after a cell."""

    cell_id: str
    run_id: str | None
    """The cell's run; None when no run could be started."""
    error: str | None
    """One-line error when the cell failed; None when it finished."""
    worker: str
    """The worker that ran it, `host:pid` (also the run's `worker` tag)."""
    loads: dict[str, int]
    """The worker's backbone loads so far."""
    held: frozenset[str]
    """Decoder names the worker holds now."""


@ray.remote
class CellWorker:
    """A Ray actor that runs cells one at a time, keeping its backbones loaded across them."""

    def __init__(self, uri: str, experiment: str, workdir: str) -> None:
        """Open the store and start with no backbone.

        Args:
            uri: Tracking URI.
            experiment: MLflow experiment name.
            workdir: `workdir/<experiment name>`; each cell works in its `<cell id>/` below.
        """
        # Download progress bars would interleave in the driver's log, one per artifact a cell reads.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        hf_logging.disable_progress_bar()
        self.store = GridStore(uri, experiment)
        self.workdir = Path(workdir)
        self.backbones = Backbones()
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, cell: Cell, deps: dict[str, str]) -> CellOutcome:
        """Run one cell in its run (continued if one exists); a failure is recorded there and reported back.

        Args:
            cell: The cell.
            deps: Each dependency's cell id -> its FINISHED run id.

        Returns:
            The outcome, with the worker's loads and held decoders.
        """
        run_id, error = None, None
        try:
            with self.store.start_cell(cell) as run:
                run_id = run.run_id
                run.set_tags({"worker": self.name})
                run_cell(cell, run, deps, self.store, self.workdir / cell.id, self.backbones)
        except Exception as err:  # recorded on the run by `CellRun.__exit__`; the worker goes on
            error = _one_line(err)
        # After the `except` block, so that the traceback no longer holds the cell's model.
        self.backbones.release()
        loads, held = dict(self.backbones.loads), frozenset(self.backbones.held())
        return CellOutcome(cell.id, run_id, error, self.name, loads, held)


def run_experiment(
    path: str | Path,
    tracking_uri: str | None = None,
    workdir: str | Path = "out",
    num_workers: int | None = None,
    use_gpu: bool | None = None,
    ray_address: str | None = None,
) -> RunReport:
    """Run (or resume) every cell of an experiment file on Ray, tracked in MLflow.

    Args:
        path: The experiment file.
        tracking_uri: MLflow tracking URI; None: `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db`.
        workdir: Root of the cells' working directories (checkpoints).
        num_workers: Workers to start; None: one per GPU, or one per CPU without GPUs (never more than the
            cells to run).
        use_gpu: One GPU per worker; None: when the Ray cluster has GPUs.
        ray_address: Ray cluster to connect to; None: `$RAY_ADDRESS`, else a local Ray (an already initialised
            Ray is used as it is).

    Returns:
        The report: every cell's state from the store, cells started, backbone loads.

    Raises:
        BadInputError: The experiment file is wrong.
        ValueError: More workers, or GPUs, than the Ray cluster has.
    """
    exp = load_experiment(path)
    cells = expand(exp)
    uri = _absolute(resolve_tracking_uri(tracking_uri))
    store = GridStore(uri, exp.name)
    # Resume precedence, decided from the store alone (nothing is remembered between calls):
    # 1. A cell with a FINISHED run is done: never started again; its run id feeds its dependents.
    # 2. A cell whose dependency fails, or is blocked, in this call is BLOCKED: not started, no run created.
    # 3. Every other cell runs once its dependencies have finished: a FAILED, KILLED or interrupted RUNNING
    #    run is continued under the same run id (`GridStore.start_cell`), and its training resumes from the
    #    checkpoints in its working directory (`slam.train`).
    done = {cell: state.run_id for cell, state in store.states(c.id for c in cells).items() if state.status == FINISHED}
    todo = [cell for cell in cells if cell.id not in done]
    started, worker_loads = 0, {}
    if todo:
        store.parent_run()
        owns_ray = not ray.is_initialized()
        if owns_ray:
            ray.init(address=ray_address, ignore_reinit_error=True)
        try:
            pool = _Pool(uri, exp.name, Path(workdir).resolve() / exp.name, len(todo), num_workers, use_gpu)
            try:
                started = pool.run(todo, done, store)
            finally:
                pool.close()
            worker_loads = pool.loads
        finally:
            if owns_ray:
                ray.shutdown()
        total = sum(sum(loads.values()) for loads in worker_loads.values())
        store.client.log_metric(store.parent_run(), "backbone_loads", total)
    return RunReport(
        status=grid_status(cells, store.states(c.id for c in cells), exp.name),
        started=started,
        worker_loads=worker_loads,
    )


def experiment_status(path: str | Path, tracking_uri: str | None = None) -> GridStatus:
    """Where every cell of an experiment file stands, read from the store; writes nothing.

    Args:
        path: The experiment file.
        tracking_uri: MLflow tracking URI; None: `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db`.

    Returns:
        Each cell's state: FINISHED, FAILED, KILLED, RUNNING, BLOCKED or PENDING.
    """
    exp = load_experiment(path)
    cells = expand(exp)
    uri = _absolute(resolve_tracking_uri(tracking_uri))
    database = _sqlite_file(uri)
    # Opening a missing sqlite file, or a GridStore on an unknown experiment, would create them.
    if (database is not None and not database.is_file()) or MlflowClient(uri).get_experiment_by_name(exp.name) is None:
        return grid_status(cells, {}, exp.name)
    return grid_status(cells, GridStore(uri, exp.name).states(c.id for c in cells), exp.name)


def grid_status(cells: Sequence[Cell], states: Mapping[str, CellState], experiment: str) -> GridStatus:
    """Each cell's state from its run's status, with BLOCKED derived from its dependencies.

    A cell without a FINISHED run whose dependency is FAILED, KILLED or BLOCKED is BLOCKED: it cannot run until
    that dependency finishes, whatever an earlier attempt of its own left.

    Args:
        cells: The cells, each after its dependencies (`grid.cells.expand` order).
        states: The store's state of each cell id (`GridStore.states`); a missing id counts as PENDING.
        experiment: The experiment's name.

    Returns:
        The status of every cell, in the order given.
    """
    by_id: dict[str, CellStatus] = {}
    for cell in cells:
        state = states.get(cell.id)
        run_id = state.run_id if state else None
        status = state.status if state else PENDING
        reason = state.error if state else None
        if status != FINISHED:
            bad = next((by_id[dep] for dep in cell.deps if dep in by_id and by_id[dep].state in _NOT_DONE), None)
            if bad is not None:
                status, reason = BLOCKED, f"dependency {bad.cell.kind} {bad.cell.id} is {bad.state}"
        by_id[cell.id] = CellStatus(cell=cell, state=status, run_id=run_id, reason=reason)
    return GridStatus(experiment=experiment, cells=tuple(by_id.values()))


def backbone_of(cell: Cell) -> str | None:
    """The decoder a cell loads (what workers are matched by), None for a summary."""
    if "speech_llm" in cell.config:
        return cell.config["speech_llm"]["decoder"]["name"]
    if "decoder" in cell.config:
        return cell.config["decoder"]["name"]
    return None


def route(ready: Sequence[Cell], idle: Sequence[int], held: Mapping[int, frozenset[str]]) -> list[tuple[Cell, int]]:
    """Assign ready cells to idle workers, each cell to a worker already holding its decoder when one is idle.

    Args:
        ready: Cells whose dependencies have finished, most urgent first.
        idle: Indices of the idle workers.
        held: Decoder names each worker holds.

    Returns:
        (cell, worker) pairs, each worker at most once; cells left over wait for the next idle worker.
    """
    free = list(idle)
    assigned: list[tuple[Cell, int]] = []
    rest = []
    for cell in ready:
        backbone = backbone_of(cell)
        match = next((w for w in free if backbone is not None and backbone in held.get(w, frozenset())), None)
        if match is None:
            rest.append(cell)
            continue
        assigned.append((cell, match))
        free.remove(match)
    for cell in rest:
        if not free:
            break
        # A worker holding fewer backbones first: loading into it keeps the others' backbones where they are useful.
        worker = min(free, key=lambda w: len(held.get(w, frozenset())))
        assigned.append((cell, worker))
        free.remove(worker)
    return assigned


class _Pool:
    """The workers of one `run_experiment` call and the scheduling loop that feeds them."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        workdir: Path,
        cells: int,
        num_workers: int | None,
        use_gpu: bool | None,
    ) -> None:
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        gpus = int(sum(node.get("GPU", 0) for node in nodes))
        use_gpu = gpus > 0 if use_gpu is None else use_gpu
        if use_gpu and gpus == 0:
            raise ValueError("use_gpu: the Ray cluster has no GPU")
        capacity = gpus if use_gpu else max(1, int(sum(node.get("CPU", 0) for node in nodes)))
        if num_workers is not None and not 1 <= num_workers <= capacity:
            unit = "GPU" if use_gpu else "CPU"
            raise ValueError(f"workers={num_workers} is not allowed: the Ray cluster has {capacity} {unit}s")
        count = min(num_workers or capacity, cells)
        # Each worker gets a share of CPUs (Ray sets its OMP_NUM_THREADS to it) small enough that the workers
        # fit on the nodes as they are: a GPU worker its GPU node's CPUs per GPU, a CPU worker its share of the
        # smallest node's (an actor asking for more than any node has would wait forever).
        if use_gpu:
            share = min(int(node.get("CPU", 0)) // int(node["GPU"]) for node in nodes if node.get("GPU", 0) >= 1)
            self.options = {"num_gpus": 1, "num_cpus": share}
        else:
            share = min(int(node.get("CPU", 0)) for node in nodes) // count
            self.options = {"num_cpus": max(1, share)}
        self.args = (uri, experiment, str(workdir))
        self.workers = [self._start() for _ in range(count)]
        self.names = [f"worker-{i}" for i in range(count)]
        self.held: dict[int, frozenset[str]] = {i: frozenset() for i in range(count)}
        self.loads: dict[str, dict[str, int]] = {}
        log.info("%d %s worker(s)", count, "GPU" if use_gpu else "CPU")

    def run(self, todo: list[Cell], done: dict[str, str], store: GridStore) -> int:
        """Run `todo` in dependency order; `done` (cell id -> FINISHED run id) grows as cells finish.

        Returns:
            The number of cells started.
        """
        pending = list(todo)  # expansion order: every dependency comes before its dependents
        not_done: set[str] = set()  # failed or blocked in this call
        inflight: dict[ray.ObjectRef, tuple[Cell, int, float]] = {}
        started = 0
        while pending or inflight:
            waiting = []
            for cell in pending:
                bad = next((dep for dep in cell.deps if dep in not_done), None)
                if bad is None:
                    waiting.append(cell)
                    continue
                not_done.add(cell.id)
                log.info("%s %s blocked: dependency %s did not finish", cell.kind, cell.id, bad)
            pending = waiting
            busy = {worker for _, worker, _ in inflight.values()}
            idle = [w for w in range(len(self.workers)) if w not in busy]
            ready = [cell for cell in pending if all(dep in done for dep in cell.deps)]
            for cell, worker in route(ready, idle, self.held):
                ref = self.workers[worker].run.remote(cell, {dep: done[dep] for dep in cell.deps})
                inflight[ref] = (cell, worker, time.monotonic())
                pending.remove(cell)
                started += 1
                log.info("%s %s started on %s", cell.kind, cell.id, self.names[worker])
            if not inflight:
                if pending:
                    raise RuntimeError(f"cells {[c.id for c in pending]} wait on dependencies outside the grid")
                break
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            cell, worker, began = inflight.pop(ref)
            error = self._collect(ref, cell, worker, store, done)
            seconds = time.monotonic() - began
            if error is None:
                log.info("%s %s finished (%.1f s)", cell.kind, cell.id, seconds)
            else:
                not_done.add(cell.id)
                log.info("%s %s failed (%.1f s): %s", cell.kind, cell.id, seconds, error)
        return started

    def close(self) -> None:
        """Stop the workers, freeing their GPUs and memory."""
        for worker in self.workers:
            ray.kill(worker)

    def _collect(
        self, ref: ray.ObjectRef, cell: Cell, worker: int, store: GridStore, done: dict[str, str]
    ) -> str | None:
        """A finished task's outcome: `done` updated on success; the error otherwise."""
        try:
            outcome: CellOutcome = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            # The process died (out of memory, a crash): its cell's run would stay RUNNING forever.
            reason = f"worker died: {_one_line(err)}"
            _mark_failed(store, cell, reason)
            self.workers[worker] = self._start()
            self.names[worker] += "'"
            self.held[worker] = frozenset()
            return reason
        except ray.exceptions.RayTaskError as err:
            # Raised outside the cell's run (e.g. starting it): nothing was recorded on a run.
            return _one_line(err.cause or err)
        self.loads[outcome.worker] = outcome.loads
        self.held[worker] = outcome.held
        if outcome.error is None:
            done[cell.id] = outcome.run_id
        return outcome.error

    def _start(self) -> ray.actor.ActorHandle:
        return CellWorker.options(**self.options).remote(*self.args)


def _mark_failed(store: GridStore, cell: Cell, reason: str) -> None:
    """Record a cell lost with its worker as FAILED, so that its run does not read RUNNING."""
    state = store.states([cell.id])[cell.id]
    if state.status == "RUNNING" and state.run_id is not None:
        store.client.set_tag(state.run_id, ERROR_TAG, reason)
        store.client.set_terminated(state.run_id, "FAILED")


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a local sqlite URI, None for any other store."""
    if not uri.startswith(_SQLITE):
        return None
    database = uri[len(_SQLITE) :].partition("?")[0]
    return Path(database) if database not in ("", ":memory:") else None


def _absolute(uri: str) -> str:
    """A relative sqlite URI made absolute, so that every worker opens the driver's database."""
    database = _sqlite_file(uri)
    if database is None or database.is_absolute():
        return uri
    _, sep, query = uri[len(_SQLITE) :].partition("?")
    return f"{_SQLITE}{database.resolve()}{sep}{query}"


def _one_line(err: BaseException) -> str:
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__
