"""Running an experiment file on Ray: its cells in dependency order, on workers that keep backbones loaded.

`run_experiment` expands the file (`grid.cells`), reads from the MLflow store which cells are finished, and runs
the others on `CellWorker` actors: one per GPU (`num_gpus=1`) on a GPU cluster, else CPU workers. A worker keeps
its loaded backbones (`grid.stages.Backbones`) across cells, and the scheduler sends a ready cell to an idle
worker that already holds its decoder when there is one (`grid.schedule.route`). Among ready cells, the one with
the most work still depending on it goes first (`grid.schedule.by_critical_path`: the deepest trainings, then the
paths their pruned cells wait on, healings before plain evaluations), and a completion releases its dependents
through counters (`grid.schedule.ReadyQueue`) instead of a scan of every waiting cell. A failing cell is recorded
FAILED with its reason in its run and the grid goes on; the cells that depend on it are not started (BLOCKED, with
the reason).
Re-running the same command resumes: see the numbered precedence in `run_experiment`.

DDP training: a `train` cell with `train_workers: W > 1` (the paper's 2 GPUs) runs through Ray Train, a
`TorchTrainer` of W workers (NCCL on GPUs, gloo on CPUs) that each build the SpeechLLM and call
`grid.stages.train_speech_llm`; rank 0 reports to the cell's run, which a task (holding no resources) opens,
closes and launches the trainer from, so its outcome comes back like a worker's. The scheduler (`_Pool`) counts
slots, each one GPU (or one CPU share): a worker holds one, a DDP cell W for as long as it trains. Workers start
lazily when a cell needs one; a DDP cell takes W free slots, empty ones first, then those of idle workers,
fewest backbones first, which it stops (workers start again when cells need them). A DDP cell that finds fewer
than W slots free waits for running cells to finish, and cells after it wait too (so it is not starved); one
needing more slots than the grid has fails at once with the reason on its run. A trainer that fails or dies is
recorded FAILED like a worker's cell; the placement group of one that died, which Ray would keep (and its slots
reserved) until the job ends, is removed (rank 0 tags the cell's run with it, `PLACEMENT_GROUP_TAG`).

Store access happens where the work is: each worker (and each trainer's rank 0) opens its own store on the
tracking URI and writes its cells' runs itself (training streams its losses there while it runs). The driver
reads the states before and after, creates the parent run before any worker starts (so that workers find one
instead of racing to create it), marks the run of a cell whose worker or trainer died, and logs the backbone
loads on the parent run. With the default sqlite store concurrent writers wait on SQLite's lock (MLflow sets a
20 s busy timeout), which is enough for a few local workers; a cluster points `MLFLOW_TRACKING_URI` at an
`mlflow server` on the head node.

Relative local paths in the experiment (models, manifests) are relative to the experiment file's directory
(`grid.experiment`); the driver checks that they exist before any cell starts and hands the directory to the
workers (`_worker_root`): absolute, or, in a Ray job with a `working_dir` (`ray job submit --working-dir .`),
relative to it, so that every worker (and Ray Train's, which stay in their working directory) resolves it in its
own node's copy. Each cell works in `workdir/<experiment name>/<cell id>/`, where its training
checkpoints survive an interruption. Only a DDP cell's rank 0 reads and writes its checkpoints, but a rerun's
rank 0 may run on another node: on several nodes, `workdir` belongs on a shared filesystem.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from ray._common.utils import get_ray_address_file
from ray._private.utils import read_ray_address
from ray.train import FailureConfig, RunConfig, ScalingConfig, WorkerGroupError, get_context
from ray.train.torch import TorchTrainer, get_device
from ray.util import get_current_placement_group
from ray.util.placement_group import PlacementGroup, remove_placement_group
from transformers.utils import logging as hf_logging

from grid.cells import Cell, expand
from grid.errors import GridError
from grid.experiment import load_experiment, missing_paths, resolve_paths
from grid.lease import DriverLease, stop_processes, this_process_children
from grid.progress import GridProgress, make_progress
from grid.provenance import code_tags, device_tags
from grid.schedule import ReadyQueue, claim_slots, route, train_workers
from grid.stages import Backbones, log_encoder_use, run_cell, train_speech_llm
from grid.status import (
    FINISHED,
    GridStatus,
    drivers_elsewhere,
    grid_status,
    searches,
)
from grid.tracking import ERROR_TAG, CellRun, CellState, GridStore, StoreError, absolute_uri, sqlite_file
from grid.tracking import tracking_uri as resolve_tracking_uri
from slam.errors import BadInputError

log = logging.getLogger(__name__)

DEFAULT_BACKBONES_PER_WORKER = 2
"""Decoders a worker keeps loaded by default: cells are routed to workers holding their decoder, so a worker
rarely needs more, and each master copy of a 7-8B decoder takes 15-30 GB of CPU memory."""
FEATURES_DIR = "features"
"""The frozen-encoder feature cache's directory in the working directory, unless `feature_cache` puts it elsewhere."""
DEFAULT_RETRIES = 2
"""Times a cell whose process died is started again in the same call (`run_experiment`'s `retries`)."""
LOOPBACK = "127.0.0.1"
"""Where the services a run starts (the Ray dashboard) listen unless told otherwise: this machine only."""
RETRIES_TAG = "retries"
"""Tag of a cell's run: how often it was started again after its process died, and why, one line each."""
PLACEMENT_GROUP_TAG = "ray_train.placement_group"
"""Tag of a DDP train cell's run: the placement group holding its trainer's slots (hex id), set by rank 0."""
_LOOKAHEAD = 64  # ready cells `_Pool` looks through beyond one per idle slot, for one whose decoder a slot holds
_RETRY = "retry"  # `_Pool._collect`: the cell's process died and it is started again
_PROBE_BYTES = 1 << 20  # a working directory must take at least a MiB
_PROBE_SECONDS = 5.0
# Ray Train moves its workers into its storage directory unless told not to; relative paths resolve where they are.
_KEEP_WORKING_DIR = {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}


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
    """The worker's backbone loads so far (a DDP cell's: those of all its processes)."""
    held: frozenset[str]
    """Decoder names the worker holds now (none for a DDP cell)."""


@ray.remote
class CellWorker:
    """A Ray actor that runs cells one at a time, keeping its backbones loaded across them."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        workdir: str,
        root: str,
        backbones_per_worker: int | None = None,
        feature_cache: str | None = None,
        provenance: dict[str, str] | None = None,
    ) -> None:
        """Open the store and start with no backbone.

        Args:
            uri: Tracking URI.
            experiment: MLflow experiment name.
            workdir: `workdir/<experiment name>`; each cell works in its `<cell id>/` below.
            root: The experiment's directory, absolute or relative to this process's working directory; the
                cells' relative local paths resolve against it (`grid.experiment.resolve_paths`).
            backbones_per_worker: Decoders kept loaded at most (`Backbones`); None: no limit.
            feature_cache: Root of the frozen-encoder feature cache (absolute); None: no cache.
            provenance: The driver's code tags (`grid.provenance.code_tags`: the driver has the repository, a
                job's workers may have a copy without `.git`); this worker adds its device.
        """
        # Download progress bars would interleave in the driver's log, one per artifact a cell reads.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        hf_logging.disable_progress_bar()
        self.store = GridStore(uri, experiment, {**(provenance or {}), **device_tags()})
        self.workdir = Path(workdir)
        self.root = root
        self.backbones = Backbones(backbones_per_worker=backbones_per_worker, feature_cache=feature_cache)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        # Every cell ends with a garbage collection (`Backbones.release`), which would otherwise walk every object of
        # the libraries imported by now (about 640,000, 0.35 s of CPU per cell on a small machine); they live as long
        # as the process, so they are set aside, and collections see only what cells create.
        gc.collect()
        gc.freeze()

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
                run_cell(cell, run, deps, self.store, self.workdir / cell.id, self.backbones, self.root)
        except Exception as err:  # recorded on the run by `CellRun.__exit__`; the worker goes on
            error = _one_line(err)
        # After the `except` block, so that the traceback no longer holds the cell's model.
        self.backbones.release()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # after an out-of-memory error above all: the next cell gets the memory back
        loads, held = dict(self.backbones.loads), frozenset(self.backbones.held())
        return CellOutcome(cell.id, run_id, error, self.name, loads, held)


def run_experiment(
    path: str | Path,
    tracking_uri: str | None = None,
    workdir: str | Path = "out",
    workers: int | None = None,
    use_gpu: bool | None = None,
    ray_address: str | None = None,
    backbones_per_worker: int | None = DEFAULT_BACKBONES_PER_WORKER,
    retries: int = DEFAULT_RETRIES,
    dashboard_host: str = LOOPBACK,
    feature_cache: str | Path | bool = True,
    progress: str = "plain",
    progress_interval: float | None = None,
) -> RunReport:
    """Run (or resume) every cell of an experiment file on Ray, tracked in MLflow.

    Args:
        path: The experiment file.
        tracking_uri: MLflow tracking URI; None: `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db`.
        workdir: Root of the cells' working directories (checkpoints).
        workers: Slots (`--workers`): cell workers and DDP training processes running at once; None: one per GPU,
            or one per CPU without GPUs (never more than the cells to run need).
        use_gpu: One GPU per worker; None: when the Ray cluster has GPUs.
        ray_address: Ray cluster to connect to; None: `$RAY_ADDRESS`, else the cluster `ray start` left its
            address for on this machine, else a local Ray; `local`: a new local Ray (an already initialised Ray
            is used as it is).
        backbones_per_worker: Decoders a worker keeps loaded at most, least recently used dropped first
            (`grid.stages.Backbones`); None: no limit.
        retries: Times a cell whose worker or trainer process died (killed, out of host memory, a lost node) is
            started again on a new one in this call, resuming from its checkpoints; a cell that raises is not.
        dashboard_host: Interface the dashboard of a Ray this call starts listens on.
        feature_cache: Where frozen-encoder outputs are kept and reused (`slam.features`): True for
            `workdir/features`, a directory (on a cluster, one every node sees, or the same path on each node),
            or False to encode every utterance in every cell. Results are the same either way.
        progress: How the grid's progress is shown while it runs (`grid.progress.MODES`): `plain` log lines
            (logger `grid.progress`), a `rich` live display on stderr, `off`, or `auto` (rich on a terminal).
        progress_interval: Seconds between two reads of the running trainings' progress from the store (and two
            plain lines); None: the display's default.

    Returns:
        The report: every cell's state from the store, cells started, backbone loads.

    Raises:
        BadInputError: The experiment file is wrong.
        ValueError: More workers, or GPUs, than the Ray cluster has.
        GridError: Another driver runs the experiment; the Ray cluster, the store or the working directory cannot
            be used. Nothing is left half-written: the same call resumes once the cause is gone.
        KeyboardInterrupt: SIGINT; the cells in flight are stopped and their runs marked KILLED.
    """
    exp = load_experiment(path)
    missing = missing_paths(exp)
    if missing:
        first = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BadInputError(
            f"{first.file}: {first.where}={first.written!r}: no such file or directory: {first.resolved}{more}"
        )
    uri = absolute_uri(resolve_tracking_uri(tracking_uri))
    # Before the store is opened (which creates it), so that a bad place writes nothing there.
    cell_root = Path(workdir).resolve() / exp.name
    check_writable(cell_root, "--workdir")
    features = _feature_root(feature_cache, workdir)
    if features is not None:
        check_writable(Path(features), "--feature-cache")
    database = sqlite_file(uri)
    if database is not None:
        check_writable(database.parent, "the tracking store's directory", create=False)
    try:
        store = GridStore(uri, exp.name, code_tags())
        lease = DriverLease(store.client, store.parent_run(), f"experiment {exp.name!r} in {uri}")
        previous = lease.acquire()
    except StoreError as err:
        raise _store_failed(uri, err) from err
    try:
        if previous is not None:
            log.info("the previous driver, %s, stopped without finishing: resuming its cells", previous.describe())
        # Resume precedence, decided from the store alone (nothing is remembered between calls):
        # 1. A cell with a FINISHED run is done: never started again; its run id feeds its dependents.
        # 2. A cell whose dependency fails, or is blocked, in this call is BLOCKED: not started, no run created.
        # 3. Every other cell runs once its dependencies have finished: a FAILED, KILLED or interrupted RUNNING
        #    run is continued under the same run id (`GridStore.start_cell`), and its training resumes from the
        #    checkpoints in its working directory (`slam.train`).
        # 4. A bisect search asks for its next depth once the one before finished: the grid is expanded again
        #    from the store after each wave, until a wave adds no cell this call has not tried.
        # 5. A cell is the same cell in every experiment file that has it: one finished under another file is done
        #    here too (its run stays where it is), and one another file's live driver runs now is left to it, with
        #    the cells that depend on it.
        cells = expand(exp, store.results() if searches(exp) else None)  # a sweep's cells need no results
        states = store.states(c.id for c in cells)
        done = {cell: state.run_id for cell, state in states.items() if state.status == FINISHED}
        left = _left_to_other_drivers(store, cells, states)
        todo = [cell for cell in cells if cell.id not in done and cell.id not in left]
        started, worker_loads = 0, {}
        if todo:
            if previous is not None:
                # Before a new Ray starts: a killed driver's Ray agents would otherwise run on beside it.
                left = lease.left_behind(previous)
                if left:
                    stopped = stop_processes(left)
                    log.info("stopped %d Ray process(es) left by that driver: %s", len(stopped), ", ".join(stopped))
            owns_ray = not ray.is_initialized()
            if owns_ray:
                _init_ray(ray_address, dashboard_host)
                lease.record_ray_processes(this_process_children())
            try:
                root = _worker_root(exp.root)
                display = make_progress(progress, store, progress_interval)
                display.add(todo, finished=[cell for cell in cells if cell.id in done])
                pool = _Pool(
                    store, cell_root, root, todo, workers, use_gpu, backbones_per_worker, retries, features, display
                )
                tried: set[str] = set(left)
                try:
                    while todo:
                        tried.update(cell.id for cell in todo)
                        started += pool.run(todo, done)
                        cells = expand(exp, store.results()) if searches(exp) else cells
                        todo = [cell for cell in cells if cell.id not in done and cell.id not in tried]
                        display.add(todo)
                finally:
                    pool.close()
                    display.close()
                worker_loads = pool.loads
            finally:
                if owns_ray:
                    ray.shutdown()
            total = sum(sum(loads.values()) for loads in worker_loads.values())
            store.log_metrics(store.parent_run(), {"backbone_loads": total})
        return RunReport(
            status=_final_status(store, cells, exp.name, lease),
            started=started,
            worker_loads=worker_loads,
        )
    except StoreError as err:
        raise _store_failed(uri, err) from err
    finally:
        lease.release()


def check_writable(directory: Path, what: str, create: bool = True) -> None:
    """Check that files can be written in `directory` (made when `create`) and that its disk is not full.

    A probe file of `_PROBE_BYTES` is written, flushed to disk and removed.

    Raises:
        GridError: Naming `what`, the directory and the reason.
    """
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".slamgrid-probe-") as probe:
            probe.write(b"\0" * _PROBE_BYTES)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        reason = err.strerror or str(err)
        raise GridError(f"{what} {directory}: cannot write there ({reason}); nothing was started") from err


def _left_to_other_drivers(store: GridStore, cells: Sequence[Cell], states: Mapping[str, CellState]) -> set[str]:
    """The cells another experiment file's live driver runs now, and those that depend on them: not started here."""
    drivers = drivers_elsewhere(store, states)
    busy = {
        cell_id
        for cell_id, state in states.items()
        if state.status == "RUNNING" and drivers.get(state.experiment_id) is not None
    }
    left = set(busy)
    for cell in cells:  # dependencies come first
        if left.intersection(cell.deps):
            left.add(cell.id)
    for cell_id in sorted(busy):
        state = states[cell_id]
        log.info(
            "cell %s runs under experiment %r (%s): left to it, with the cells that depend on it",
            cell_id, store.experiment_name(state.experiment_id), drivers[state.experiment_id].describe(),
        )  # fmt: skip
    return left


def _final_status(store: GridStore, cells: Sequence[Cell], experiment: str, lease: DriverLease) -> GridStatus:
    states = store.states(c.id for c in cells)
    return grid_status(cells, states, experiment, driver=lease.mine, drivers=drivers_elsewhere(store, states))


@dataclass(frozen=True)
class _Job:
    """A cell in flight and the slots it holds."""

    cell: Cell
    slots: tuple[int, ...]
    began: float
    ddp: bool


class _Pool:
    """The slots of one `run_experiment` call, the workers started in them, and the scheduling loop."""

    def __init__(
        self,
        store: GridStore,
        workdir: Path,
        root: str,
        cells: Sequence[Cell],
        workers: int | None,
        use_gpu: bool | None,
        backbones_per_worker: int | None = DEFAULT_BACKBONES_PER_WORKER,
        retries: int = DEFAULT_RETRIES,
        feature_cache: str | None = None,
        progress: GridProgress | None = None,
    ) -> None:
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        gpus = int(sum(node.get("GPU", 0) for node in nodes))
        use_gpu = gpus > 0 if use_gpu is None else use_gpu
        if use_gpu and gpus == 0:
            raise ValueError("use_gpu: the Ray cluster has no GPU")
        self.unit = "GPU" if use_gpu else "CPU"
        self.capacity = gpus if use_gpu else max(1, int(sum(node.get("CPU", 0) for node in nodes)))
        if workers is not None and not 1 <= workers <= self.capacity:
            raise ValueError(f"workers={workers} is not allowed: the Ray cluster has {self.capacity} {self.unit}s")
        self.workers_limit = workers
        widest = max((train_workers(cell) for cell in cells), default=1)
        self.size = min(workers or self.capacity, max(len(cells), widest))
        # Each slot gets a share of CPUs (Ray sets its OMP_NUM_THREADS to it) small enough that the slots fit on
        # the nodes as they are: a GPU slot its GPU node's CPUs per GPU, a CPU slot its share of the smallest
        # node's (an actor asking for more than any node has would wait forever).
        if use_gpu:
            share = min(int(node.get("CPU", 0)) // int(node["GPU"]) for node in nodes if node.get("GPU", 0) >= 1)
            self.options = {"num_gpus": 1, "num_cpus": share}
            self.trainer_resources = {"GPU": 1, "CPU": share}
        else:
            share = max(1, min(int(node.get("CPU", 0)) for node in nodes) // self.size)
            self.options = {"num_cpus": share}
            self.trainer_resources = {"CPU": share}
        self.use_gpu = use_gpu
        self.backbones_per_worker = backbones_per_worker
        self.feature_cache = feature_cache
        self.store, self.workdir, self.root = store, workdir, root
        self.workers: dict[int, ray.actor.ActorHandle] = {}
        """The worker of each slot that has one."""
        self.held: dict[int, frozenset[str]] = {}
        """Decoder names each worker holds, by slot."""
        self.names: dict[int, str] = {}
        self.started_workers = 0
        self.trainers: dict[ray.ObjectRef, Cell] = {}
        """DDP cells in flight, by their trainer task."""
        self.loads: dict[str, dict[str, int]] = {}
        self.retries = retries
        self.deaths: Counter[str] = Counter()
        """Processes died under each cell in this call."""
        self.inflight: dict[ray.ObjectRef, _Job] = {}
        self.progress = progress or GridProgress()
        log.info("%d %s slot(s)", self.size, self.unit)

    def run(self, todo: list[Cell], done: dict[str, str]) -> int:
        """Run `todo` in dependency order; `done` (cell id -> FINISHED run id) grows as cells finish.

        Returns:
            The number of cells started.
        """
        try:
            return self._schedule(todo, done)
        except KeyboardInterrupt:
            self._interrupt()
            raise

    def _schedule(self, todo: list[Cell], done: dict[str, str]) -> int:
        queue = ReadyQueue(todo, done)
        inflight = self.inflight
        started = 0
        while queue or inflight:
            busy = {slot for job in inflight.values() for slot in job.slots}
            # Workers first: among equally good slots, a cell goes to a running worker rather than a new one.
            free = sorted((slot for slot in range(self.size) if slot not in busy), key=lambda s: s not in self.workers)
            # The most urgent ready cells, as many as `route` looks through to match slots' decoders (a bound, so
            # that starting a cell costs the same with 10 ready cells as with 10,000).
            head = list(itertools.islice(queue.ready(), len(free) + _LOOKAHEAD)) if free else []
            singles, too_wide, ddp = [], [], []
            for cell in head:
                workers = train_workers(cell)
                if workers == 1:
                    singles.append(cell)
                elif workers > self.size:
                    too_wide.append(cell)
                elif workers > len(free) - sum(train_workers(c) for c in ddp):
                    break  # it waits for running cells to free slots, and the cells after it wait with it
                else:
                    ddp.append(cell)
            for cell in too_wide:
                reason = self._too_wide(train_workers(cell))
                _record_failure(self.store, cell, reason)
                log.info("%s %s failed: %s", cell.kind, cell.id, reason)
                self.progress.blocked([cell])
                self._block(queue, cell.id)
            for cell in ddp:
                slots = claim_slots(free, self.held, train_workers(cell))
                for slot in slots:
                    self._stop(slot)
                    free.remove(slot)
                ref = _train_ddp_cell.options(runtime_env=_KEEP_WORKING_DIR).remote(
                    cell,
                    self.store.uri,
                    self.store.experiment,
                    str(self.workdir),
                    self.root,
                    self.use_gpu,
                    self.trainer_resources,
                    self.feature_cache,
                    self.store.provenance,
                )
                self.trainers[ref] = cell
                inflight[ref] = _Job(cell, tuple(slots), time.monotonic(), ddp=True)
                queue.take(cell)
                started += 1
                log.info("%s %s started: DDP in %d processes on slots %s", cell.kind, cell.id, len(slots), slots)
                self.progress.started(cell)
            for cell, slot in route(singles, free, self.held):
                worker = self.workers[slot] if slot in self.workers else self._start(slot)
                ref = worker.run.remote(cell, {dep: done[dep] for dep in cell.deps})
                inflight[ref] = _Job(cell, (slot,), time.monotonic(), ddp=False)
                queue.take(cell)
                started += 1
                log.info("%s %s started on %s", cell.kind, cell.id, self.names[slot])
                self.progress.started(cell)
            if too_wide:
                continue  # the cells after them may fit now
            if not inflight:
                waiting = queue.waiting()
                if waiting:
                    raise RuntimeError(f"cells {[c.id for c in waiting]} wait on dependencies outside the grid")
                break
            ref = self._wait()
            job = inflight.pop(ref)
            error = self._collect(ref, job, done)
            seconds = time.monotonic() - job.began
            if error is None:
                log.info("%s %s finished (%.1f s)", job.cell.kind, job.cell.id, seconds)
                queue.finished(job.cell.id)
                self.progress.ended(job.cell, finished=True)
            elif error is _RETRY:
                queue.again(job.cell)
                self.progress.retried(job.cell)
            else:
                log.info("%s %s failed (%.1f s): %s", job.cell.kind, job.cell.id, seconds, error)
                self.progress.ended(job.cell, finished=False)
                self._block(queue, job.cell.id)
            self.progress.poll()
        return started

    def _wait(self) -> ray.ObjectRef:
        """The first cell in flight to end; the progress display is kept up to date meanwhile."""
        while True:
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=self.progress.interval)
            if ready:
                return ready[0]
            self.progress.poll()

    def _block(self, queue: ReadyQueue, cell_id: str) -> None:
        """Take a cell that did not finish, and every cell depending on it, out of `queue`, saying why."""
        blocked = queue.block(cell_id)
        for cell, bad in blocked:
            log.info("%s %s blocked: dependency %s did not finish", cell.kind, cell.id, bad)
        self.progress.blocked([cell for cell, _ in blocked])

    def _interrupt(self) -> None:
        """Stop every cell in flight and mark its run KILLED (a rerun continues it from its checkpoints)."""
        jobs = list(self.inflight.values())
        try:
            self.close()
        except Exception as err:  # a Ctrl-C reaches the local Ray's processes too: they may be gone already
            log.debug("stopping the workers after an interrupt: %s", err)
        for job in jobs:
            _mark_failed(self.store, job.cell, "interrupted: the driver was stopped (SIGINT or SIGTERM)", "KILLED")
        self.inflight.clear()
        log.info("interrupted: %d running cell(s) stopped and marked KILLED", len(jobs))

    def close(self) -> None:
        """Stop the workers and any trainer still running, freeing their GPUs and memory."""
        for ref, cell in list(self.trainers.items()):
            ray.cancel(ref, force=True)
            self._release(cell)
        self.trainers.clear()
        for slot in list(self.workers):
            self._stop(slot)

    def _collect(self, ref: ray.ObjectRef, job: _Job, done: dict[str, str]) -> str | None:
        """A finished job's outcome: `done` updated on success; `_RETRY` for a death to retry; the error otherwise."""
        cell = job.cell
        self.trainers.pop(ref, None)
        try:
            outcome: CellOutcome = ray.get(ref)
        except ray.exceptions.RayError as err:
            # Raised outside the cell's run (e.g. starting it), or the process died (out of memory, a crash,
            # killed); either way the cell's run may be left RUNNING.
            died = not isinstance(err, ray.exceptions.RayTaskError)
            kind = "trainer" if job.ddp else "worker"
            reason = f"{kind} died: {_one_line(err)}" if died else _one_line(err.cause or err)
            if job.ddp:
                self._release(cell)
            elif died:
                self._stop(job.slots[0])  # started again when a cell needs it
            if died and self.deaths[cell.id] < self.retries:
                self.deaths[cell.id] += 1
                _note_retry(self.store, cell, self.deaths[cell.id], self.retries, reason)
                log.info("%s %s: %s; starting it again (retry %d of %d)", cell.kind, cell.id, reason,
                         self.deaths[cell.id], self.retries)  # fmt: skip
                return _RETRY
            _mark_failed(self.store, cell, reason)
            return reason
        self.loads[outcome.worker] = outcome.loads
        if not job.ddp:
            self.held[job.slots[0]] = outcome.held
        if outcome.error is None:
            done[cell.id] = outcome.run_id
        return outcome.error

    def _start(self, slot: int) -> ray.actor.ActorHandle:
        self.workers[slot] = CellWorker.options(**self.options).remote(
            self.store.uri,
            self.store.experiment,
            str(self.workdir),
            self.root,
            self.backbones_per_worker,
            self.feature_cache,
            self.store.provenance,
        )
        self.held[slot] = frozenset()
        self.started_workers += 1
        self.names[slot] = f"worker-{self.started_workers}"
        log.info("%s started in slot %d", self.names[slot], slot)
        return self.workers[slot]

    def _stop(self, slot: int) -> None:
        """Stop the worker of a slot, if it has one (its GPU or CPUs are free once its process has exited)."""
        worker = self.workers.pop(slot, None)
        self.held.pop(slot, None)
        if worker is not None:
            ray.kill(worker)

    def _release(self, cell: Cell) -> None:
        """Remove the placement group of a DDP cell whose trainer did not end by itself.

        Ray stops the trainer's processes with the task it ran from, but keeps their placement group, and the
        slots it reserves, until the job ends: workers started in those slots would never be scheduled.
        """
        placement_group = self.store.states([cell.id])[cell.id].tags.get(PLACEMENT_GROUP_TAG)
        if placement_group is not None:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(placement_group)))

    def _too_wide(self, workers: int) -> str:
        """Why a DDP cell of `workers` processes cannot run here."""
        limit = (
            f"workers={self.workers_limit} limits the grid to {self.workers_limit}"
            if self.workers_limit
            else f"the Ray cluster has {self.capacity} {self.unit}s"
        )
        return f"train_workers={workers}: DDP training needs {workers} {self.unit} slots at once, but {limit}"


def _init_ray(address: str | None, dashboard_host: str) -> None:
    """Start or join Ray; an address nothing answers at is a `GridError` at once, not Ray's long wait."""
    if address != "local":
        _check_ray_address(address)
    ray.init(address=address, dashboard_host=dashboard_host)


def _check_ray_address(address: str | None) -> None:
    """Raise a `GridError` if the cluster Ray would join (given, `$RAY_ADDRESS`, or `ray start`'s) does not answer.

    `ray start` leaves the head's address in Ray's temporary directory, and a plain `ray.init()` joins it: once
    that head is gone, Ray retries for a long while and ends with a `ConnectionError`. One TCP connection to its
    GCS port tells in seconds.
    """
    found = os.environ.get("RAY_ADDRESS") or address
    source = "$RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "--address"
    if found is None or found == "auto":
        found = read_ray_address()
        source = f"the address `ray start` left in {get_ray_address_file(None)}"
    if not found or found in ("auto", "local"):
        return
    host, _, port = found.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        return  # not host:port: Ray reports it
    try:
        socket.create_connection((host, int(port)), timeout=_PROBE_SECONDS).close()
    except OSError as err:
        raise GridError(
            f"no Ray cluster answers at {found} ({source}: {err.strerror or err}); its head node is gone or "
            f"unreachable. Run with --address local for a new local Ray, or `ray stop` to forget a dead local head"
        ) from err


def _store_failed(uri: str, err: StoreError) -> GridError:
    """Why the driver stopped when the store failed; what finished is in the store and a rerun resumes."""
    return GridError(
        f"the MLflow store {uri} failed: {_one_line(err)}. Finished cells are recorded there; run the same "
        f"command again once the store is back to resume the others"
    )


@ray.remote(num_cpus=0, max_retries=0)
def _train_ddp_cell(
    cell: Cell,
    uri: str,
    experiment: str,
    workdir: str,
    root: str,
    use_gpu: bool,
    resources: dict[str, float],
    feature_cache: str | None = None,
    provenance: dict[str, str] | None = None,
) -> CellOutcome:
    """Run a DDP train cell through Ray Train, in its run; a failure is recorded there and reported back.

    A Ray task asking for no resources: the trainer's workers hold the cell's slots. It is not retried (a rerun of
    the grid resumes the cell from its checkpoints instead), and killing it ends the trainer (Ray stops the
    actors a task started with it).

    Args:
        cell: A train cell with `train_workers` > 1 in its config.
        uri: Tracking URI.
        experiment: MLflow experiment name.
        workdir: `workdir/<experiment name>`; the cell works in its `<cell id>/` below, Ray Train's files too.
        root: The experiment's directory, as `CellWorker` takes it; each training process resolves against it.
        use_gpu: One GPU per training process (NCCL), else CPUs (gloo).
        resources: What each training process holds: one slot's resources.
        feature_cache: Root of the frozen-encoder feature cache every training process reads and fills; None: none.
        provenance: The driver's code tags; rank 0 adds its device.

    Returns:
        The outcome, the task's `host:pid` as worker; loads are those of the W processes (each loads the
        encoder and the decoder once), counted when the training finished.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    name = f"{socket.gethostname()}:{os.getpid()}"
    workers = train_workers(cell)
    cell_dir = Path(workdir) / cell.id
    run_id, error, loads = None, None, {}
    try:
        with GridStore(uri, experiment, provenance).start_cell(cell) as run:
            run_id = run.run_id
            run.set_tags({"worker": name, "train_workers": str(workers)})
            trainer = TorchTrainer(
                _train_loop,
                train_loop_config={
                    "config": cell.config,
                    "root": root,
                    "uri": uri,
                    "run_id": run_id,
                    "workdir": str(cell_dir),
                    "feature_cache": feature_cache,
                },
                scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
                run_config=RunConfig(
                    name="ray-train", storage_path=str(cell_dir), failure_config=FailureConfig(max_failures=0)
                ),
            )
            try:
                trainer.fit()
            except WorkerGroupError as err:
                rank = min(err.worker_failures)
                failure = err.worker_failures[rank]
                detail = str(failure) if isinstance(failure, _RankFailed) else _one_line(failure)
                raise RuntimeError(f"DDP rank {rank} of {workers} failed: {detail}") from err
        speech_llm = cell.config["speech_llm"]
        loads = {f"{part}:{speech_llm[part]['name']}": workers for part in ("encoder", "decoder")}
    except Exception as err:  # recorded on the run by `CellRun.__exit__`
        error = _one_line(err)
    return CellOutcome(cell.id, run_id, error, name, loads, frozenset())


def _train_loop(config: dict) -> None:
    """One process of a DDP train cell, in a Ray Train worker (the process group is set up): rank 0 reports."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    hf_logging.disable_progress_bar()
    rank = get_context().get_world_rank()
    run = CellRun.open(config["uri"], config["run_id"]) if rank == 0 else None
    if run is not None:
        run.set_tags({PLACEMENT_GROUP_TAG: get_current_placement_group().id.hex(), **device_tags()})
    # Ray Train shows every GPU of the node to each of its workers there: the worker's own is this one.
    backbones = Backbones(get_device(), feature_cache=config["feature_cache"])
    try:
        cell_config = resolve_paths(config["config"], config["root"])
        train_speech_llm(cell_config, Path(config["workdir"]), backbones, run)
        log_encoder_use(run, backbones, (0, 0))
    except Exception as err:
        raise _RankFailed(_one_line(err)) from err


class _RankFailed(RuntimeError):
    """A training process's error as one line of text, which Ray Train carries back whatever the error's class.

    Ray Train sends a worker's exception to the driver pickled, and an exception class whose `__init__` takes
    other arguments than its message does not unpickle: the driver would only learn that a health check failed.
    """


def _feature_root(feature_cache: str | Path | bool, workdir: str | Path) -> str | None:
    """The feature cache's absolute directory (`run_experiment`'s `feature_cache`), None when there is none."""
    if feature_cache is False:
        return None
    root = Path(workdir) / FEATURES_DIR if feature_cache is True else Path(feature_cache).expanduser()
    return str(root.resolve())


def _record_failure(store: GridStore, cell: Cell, reason: str) -> None:
    """Record a cell that cannot run as FAILED with its reason, in its run (continued, or created)."""
    run = store.start_cell(cell)
    run.set_tags({ERROR_TAG: reason})
    run.end("FAILED")


def _mark_failed(store: GridStore, cell: Cell, reason: str, status: str = "FAILED") -> None:
    """Record a cell lost with its worker as FAILED (or KILLED), so that its run does not read RUNNING."""
    state = store.states([cell.id])[cell.id]
    if state.status == "RUNNING" and state.run_id is not None:
        store.end_run(state.run_id, status, reason)


def _note_retry(store: GridStore, cell: Cell, attempt: int, limit: int, reason: str) -> None:
    """Add why a cell is started again to its run's `RETRIES_TAG`; the run stays RUNNING and is continued."""
    state = store.states([cell.id])[cell.id]
    if state.run_id is None:
        return
    earlier = state.tags.get(RETRIES_TAG, "")
    line = f"{attempt}/{limit}: {reason}"
    store.set_tags(state.run_id, {RETRIES_TAG: f"{earlier}\n{line}" if earlier else line})


def _worker_root(root: Path) -> str:
    """The experiment's directory as workers get it (`CellWorker`'s `root`).

    Under a Ray job with a `working_dir` (`ray job submit --working-dir .`), every node runs the job in its own
    copy of that directory, where this driver runs too: a file inside it is given relative to it, and each worker
    resolves it against its own working directory, its node's copy. Otherwise (a local Ray, a cluster sharing a
    filesystem) the absolute directory, the same for every process on this machine.
    """
    if ray.get_runtime_context().runtime_env.get("working_dir"):
        try:
            return str(root.relative_to(Path.cwd().resolve())) or "."
        except ValueError:
            pass
    return str(root)


def _one_line(err: BaseException) -> str:
    message = " ".join(str(err).split())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__
