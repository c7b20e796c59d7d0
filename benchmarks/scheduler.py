"""Scheduler: the grid's makespan against its lower bound, and against the same cells as a plain Ray Tune grid.

Default: a synthetic experiment shaped like `paper.yaml` (its 8 models under hub-style names `synthetic/...`, two
encoders and six decoders, 4 depths per study: 87 cells), expanded by `grid.cells.expand` and run by the real
`grid.runner.run_experiment` on a local Ray with 8 logical GPUs and a sqlite MLflow store. In the Ray worker
processes (a `worker_process_setup_hook`, as in `tests/reliability/faults.py`) every stage is a fake that sleeps
its cell's known duration, and a backbone load takes 2 s; the real `Backbones` decides what is loaded and when, and
counts it (`benchmarks/scheduler_fakes.py` says how long each cell takes).

The lower bound of any schedule is the larger of the total work over the slots and the longest dependency chain.
Work: each cell's duration times its slots, plus 2 s for every backbone that single-process cells need (some worker
loads it at least once) and, for a DDP cell, its loads in each of its processes. Chain: the durations along the
longest dependency path plus the loads of its first cell (at time 0 no worker holds a backbone). As a check that the
bound can be approached at all, the most that dependencies force is printed beside it (cells that cannot start
before t end no earlier than t plus their work over the slots).

The makespan runs from the first cell's start to the last cell's end, as the store recorded them (each cell run's
start and end time). Before the first cell, Ray starts the worker processes, each importing torch, transformers,
MLflow and Ray Train: 19 s alone on this machine, 1 to 2 minutes for 8 at once on its 2 cores (a GPU node, a core
per worker, takes the 19 s once). That is printed apart, with the wall time of the whole `run_experiment` call.

Side by side, the same cells as plain Ray Tune: one `tune.Tuner` per dependency wave (trainings, then paths and
baseline evaluations, then pruned cells, then summaries), `tune.grid_search` over the wave's cells, one trial per
cell on `{"GPU": 1}` sleeping its backbones' loads and its duration (trials share nothing, so each loads its own
backbones; Tune reuses its actors between trials). Its makespan likewise, from the first trial's start to the last
trial's end. The ratio of the two is printed, then, last, ours over the bound.

`--scale`: 10,000 cells (the paper's ASR study over 255 synthetic models of the paper's depths, 9 depths each, the 4
healing strategies, DDP training in 2 processes as in `paper.yaml`: see `SCALE_DEPTHS`) on 512 logical GPUs. No
machine holds 512 workers, so the real `grid.runner._Pool` (its scheduling loop, `route`, `claim_slots`, its
dependency handling) runs against a simulated Ray on a virtual clock (`SimulatedCluster`): a worker's `run.remote`
(a real `Backbones` deciding its loads) and a DDP cell's trainer return a reference that finishes at now + loads +
duration, `ray.wait` returns the earliest and moves the clock to it, and the driver's own time moves the clock too (a
slow driver starts cells late); a worker starts at once. Durations as above in units of 60 s (the training of a
28-layer model: 40 minutes). Driver overhead: the driver process's CPU time in the loop per cell, the simulation's
own left out. Then a sqlite store holding a FINISHED run of every cell (what a worker's `GridStore.start_cell` and
`CellRun` leave, written in bulk through MLflow's own ORM and checked against runs written the real way) and
`slamgrid status` on it, timed as a subprocess; the last line is the simulated makespan over its bound.

    python benchmarks/scheduler.py [--unit 1]              # 7 to 9 minutes, 1 to 2 of them Ray starting 8 workers
    python benchmarks/scheduler.py --scale [--cells 10000] [--gpus 512] [--unit 60]         # 5 to 6 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import io
import itertools
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import ray
import yaml
from mlflow.entities import LifecycleStage, RunStatus, SourceType
from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray import tune
from scheduler_fakes import LOAD_SECONDS, UNIT_ENV, cell_backbones, cell_seconds, load_backbones, loaders

import grid.runner
import grid.stages
from grid.cells import Cell, expand, plan_summary
from grid.experiment import load_experiment
from grid.runner import CellOutcome, run_experiment
from grid.schedule import train_workers
from grid.stages import Backbones
from grid.tracking import GridStore, _params

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PAPER_MODELS = (
    ("qwen2.5-1.5b", 28, "wavlm-large", "qwen2.5-1.5b"),
    ("qwen2.5-3b", 36, "wavlm-large", "qwen2.5-3b"),
    ("qwen2.5-7b", 28, "wavlm-large", "qwen2.5-7b"),
    ("llama-3.2-1b", 16, "wavlm-large", "llama-3.2-1b"),
    ("llama-3.2-3b", 28, "wavlm-large", "llama-3.2-3b"),
    ("llama-3.1-8b", 32, "wavlm-large", "llama-3.1-8b"),
)
"""`paper.yaml`'s six backbones: (model, layers m, encoder, decoder), each named `synthetic/<name>` in the files."""
DEFAULT_DEPTHS = [3, 5, 7, 9]
"""Block sizes n of the default grid's studies (removing 2, 4, 6, 8 layers)."""
HEALING = ["none", "decoder", "projector", "decoder+projector"]
SCALE_DEPTHS = list(range(2, 11))
"""Block sizes n of the scale grid's studies: the first nine (removing 1 to 9 layers, where the paper's thresholds
fall), so that its trainings (two GPUs each) about fill 512 GPUs at the start, as the bound assumes (with every
depth, fewer models fill fewer GPUs, and every schedule leaves the rest idle while they train)."""
DEFAULT_TARGET, SCALE_TARGET = 1.10, 1.05
DRIVER_TARGET_MS = 10.0
NODE_GPUS = 8
"""GPUs per simulated node (H100 nodes of `cluster.yaml`)."""
_BULK_WORKER = "bulk:0"
"""The `worker` tag of the runs written in bulk."""


@dataclass(frozen=True)
class Bound:
    """The lower bound of a grid's makespan on a number of slots."""

    work: float
    """Slot-seconds no schedule avoids: durations times slots, and the loads counted in the module docstring."""
    chain: float
    """Seconds of the longest dependency chain, with its first cell's loads."""
    slots: int
    """Slots (GPUs)."""
    released: float
    """A check on the bound: the most, over times t, of t plus the work of the cells that cannot start before t (their
    dependencies' chain) over the slots. Above `seconds`, dependencies force GPUs to idle in every schedule."""
    released_at: float
    """The t of `released`."""

    @property
    def seconds(self) -> float:
        """The bound: the larger of the work over the slots and the chain."""
        return max(self.work / self.slots, self.chain)


@dataclass(frozen=True)
class Span:
    """When a set of cells ran, from the clocks of the processes that ran them."""

    began: float
    """Unix time the first cell started."""
    ended: float
    """Unix time the last cell ended."""

    @property
    def seconds(self) -> float:
        """The makespan."""
        return self.ended - self.began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", action="store_true", help="10,000 cells on 512 simulated GPUs, and the store")
    parser.add_argument("--unit", type=float, default=None, help="seconds per unit of work (default 1; --scale 60)")
    parser.add_argument("--gpus", type=int, default=None, help="logical GPUs (default 8; --scale 512)")
    parser.add_argument("--cells", type=int, default=10_000, help="--scale: cells of the synthetic grid, about")
    args = parser.parse_args()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="slamgrid-scheduler-") as tmp:
        # The runner's progress, one line per cell, goes to a file as `slamgrid run 2> file` would write it.
        runner_log = logging.getLogger("grid.runner")
        runner_log.setLevel(logging.INFO)
        runner_log.addHandler(logging.FileHandler(Path(tmp) / "runner.log"))
        if args.scale:
            _run_scale(Path(tmp), args.cells, args.gpus or 512, args.unit or 60.0)
        else:
            _run_default(Path(tmp), args.gpus or 8, args.unit or 1.0)


def _run_default(tmp: Path, gpus: int, unit: float) -> None:
    """The real grid on a local Ray with `gpus` logical GPUs, against its bound and against plain Ray Tune.

    Args:
        tmp: Where the experiment file, the store, the cells' and Tune's directories go.
        gpus: Logical GPUs (slots).
        unit: Seconds per unit of `scheduler_fakes.COSTS`.
    """
    path = write_experiment(tmp / "scheduler.yaml", default_experiment())
    cells = expand(load_experiment(path))
    bound = lower_bound(cells, unit, gpus)
    backbones = {name for cell in cells for name in cell_backbones(cell)}
    print(_describe(cells, len(backbones), unit))
    print(_describe_bound(bound))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    print("running the grid (grid.runner.run_experiment) ...", flush=True)
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)]), UNIT_ENV: repr(unit)}
    ray.init(
        address="local",
        num_cpus=gpus,
        num_gpus=gpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": "scheduler_fakes.install", "env_vars": env},
    )
    try:
        called, cpu = time.time(), time.process_time()
        report = run_experiment(path, tracking_uri=uri, workdir=tmp / "out")
        returned, cpu = time.time(), time.process_time() - cpu
    finally:
        ray.shutdown()
    if not report.status.all_finished:
        raise RuntimeError(f"the grid did not finish: {report.counts}, e.g. {report.failed[:1]}")
    ours = _store_span(GridStore(uri, report.status.experiment), len(cells))
    loads = sum(report.loads.values())
    workers = len(report.worker_loads)
    print(
        f"ours: makespan {ours.seconds:.1f} s; the whole call {returned - called:.1f} s, of which "
        f"{ours.began - called:.1f} s before the first cell (Ray starting the workers: each imports the grid)"
    )
    print(
        f"  backbone loads {loads}, at most backbones x workers = {len(backbones)} x {workers} = "
        f"{len(backbones) * workers}: {'yes' if loads <= len(backbones) * workers else 'NO'}; the driver process's "
        f"CPU over the call {cpu:.1f} s ({cpu / len(cells) * 1000:.0f} ms per cell, its start and Ray's threads in it)"
    )
    print("running the same cells as plain Ray Tune, a Tuner per dependency wave ...", flush=True)
    tuned, walls = tune_waves(cells, unit, gpus, tmp / "tune")
    waves = ", ".join(f"{wall:.1f}" for wall in walls)
    print(f"plain Ray Tune: makespan {tuned.seconds:.1f} s; the Tuners' wall times {waves} s ({sum(walls):.1f} s)")
    print(f"makespan ours / plain Ray Tune: {ours.seconds / tuned.seconds:.3f}")
    print(f"the whole call over the bound, for reference: {(returned - called) / bound.seconds:.3f}")
    print(f"makespan over its lower bound (target <= {DEFAULT_TARGET:.2f}): {ours.seconds / bound.seconds:.3f}")


def _run_scale(tmp: Path, cells_wanted: int, gpus: int, unit: float) -> None:
    """The real scheduling loop on a simulated cluster, against its bound; then `slamgrid status` on a big store.

    Args:
        tmp: Where the experiment file and the store go.
        cells_wanted: Cells of the synthetic grid (`scale_experiment`).
        gpus: Simulated GPUs (slots).
        unit: Seconds per unit of `scheduler_fakes.COSTS`.
    """
    path = write_experiment(tmp / "scale.yaml", scale_experiment(cells_wanted))
    exp = load_experiment(path)
    began = time.perf_counter()
    cells = expand(exp)
    expanded = time.perf_counter() - began
    bound = lower_bound(cells, unit, gpus)
    backbones = {name for cell in cells for name in cell_backbones(cell)}
    print(_describe(cells, len(backbones), unit) + f"; expanded in {expanded:.1f} s")
    print(_describe_bound(bound))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    store = GridStore(uri, exp.name)
    print(f"scheduling on {gpus} simulated GPUs (grid.runner._Pool) ...", flush=True)
    cluster = SimulatedCluster(gpus, unit)
    with cluster.installed():
        pool = grid.runner._Pool(store, tmp / "out", str(exp.root), cells, None, None)
        wall, cpu = time.perf_counter(), time.process_time()
        done: dict[str, str] = {}
        started = pool.run(cells, done)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        pool.close()
    if started != len(cells) or len(done) != len(cells):
        raise RuntimeError(f"{len(done)} of {len(cells)} cells finished")
    driver_ms = (cpu - cluster.own_cpu) / len(cells) * 1000
    workers = {name: loads for name, loads in pool.loads.items() if not name.startswith(SimulatedCluster.TRAINER)}
    loads = sum(sum(loads.values()) for loads in workers.values())
    ddp_loads = sum(sum(loads.values()) for loads in pool.loads.values()) - loads
    print(
        f"ours: makespan {cluster.now / 3600:.2f} h (simulated) against the bound's {bound.seconds / 3600:.2f} h; "
        f"{pool.started_workers} workers started"
    )
    print(
        f"  backbone loads of the workers {loads}, at most backbones x workers = {len(backbones)} x "
        f"{pool.started_workers} = {len(backbones) * pool.started_workers}; DDP processes {ddp_loads} (2 each)"
    )
    print(
        f"  driver: {driver_ms:.2f} ms of CPU per cell (target <= {DRIVER_TARGET_MS:.0f}); the loop took "
        f"{wall:.1f} s, of which the simulation itself {cluster.own_cpu:.1f} s of CPU"
    )
    print("writing a FINISHED run of every cell to the store ...", flush=True)
    small, large = write_finished_runs(store, cells)
    print(f"  a cell's own store round trip (start_cell to FINISHED): {small * 1000:.0f} ms on an empty store, "
          f"{large * 1000:.0f} ms on {len(cells):,} runs")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's `slamgrid`
    status, lines = _timed([sys.executable, "-m", "grid", "status", str(path), "--tracking-uri", uri], env)
    if lines[1].split() != ["FINISHED", str(len(cells))]:
        raise RuntimeError(f"slamgrid status does not see the runs: {lines}")
    imports, _ = _timed([sys.executable, "-c", "import grid.cli, grid.status"], env)
    print(f"slamgrid status on {len(cells):,} cell runs: {status:.1f} s, of which {imports:.1f} s importing what it "
          f"uses (MLflow, the experiment and cell code; not torch or Ray): {lines[0]}, {lines[1].strip()}")  # fmt: skip
    print(f"makespan over its lower bound at {len(cells):,} cells on {gpus} GPUs (target <= {SCALE_TARGET:.2f}): "
          f"{cluster.now / bound.seconds:.3f}")  # fmt: skip


def default_experiment() -> dict[str, Any]:
    """`paper.yaml` in small: its 8 models (with the LoRA and the Whisper variants of Qwen2.5-7B), 4 depths each."""
    models = {name: _model(layers, encoder, decoder) for name, layers, encoder, decoder in PAPER_MODELS}
    models["qwen2.5-7b-lora"] = {
        **_model(28, "wavlm-large", "qwen2.5-7b"),
        "decoder": {"name": "synthetic/qwen2.5-7b", "lora": {"rank": 64, "alpha": 64}},
    }
    models["qwen2.5-7b-whisper"] = _model(28, "whisper-large-v3", "qwen2.5-7b", kind="whisper")
    studies = [
        _study("asr", "asr", [name for name, *_ in PAPER_MODELS], DEFAULT_DEPTHS, ["none", "decoder+projector"]),
        _study("asr-lora", "asr", ["qwen2.5-7b-lora"], DEFAULT_DEPTHS, ["decoder+projector"]),
        _study("ast", "ast", ["qwen2.5-7b-whisper"], DEFAULT_DEPTHS, ["none", "decoder+projector"]),
    ]
    return {"name": "scheduler", "models": models, "tasks": _tasks(), "studies": studies}


def scale_experiment(cells: int) -> dict[str, Any]:
    """The paper's ASR study widened to about `cells` cells: models of the paper's depths, six a study, the depths of
    `SCALE_DEPTHS`, the 4 healing strategies, DDP training in 2 processes; studies that only measure text paths (in
    the paper's block convention, then in Gromov et al.'s) of some of the models take what is left (all of it, for
    10,000 cells).
    """
    per_model = 3 + len(SCALE_DEPTHS) * len(HEALING)  # a train, a path and an eval cell, and the prune cells
    sizes = []
    for i in itertools.count():
        size = per_model + (1 if i % len(PAPER_MODELS) == 0 else 0)  # and a study's summary
        if sum(sizes) + size > cells:
            break
        sizes.append(size)
    if cells - sum(sizes) == 1 and len(sizes) > 1:
        sizes.pop()  # one cell alone cannot be a study: the text studies take the last model's cells instead
    models: dict[str, dict] = {}
    studies: list[dict] = []
    for i in range(len(sizes)):
        name = f"model-{i:03d}"
        models[name] = _model(PAPER_MODELS[i % len(PAPER_MODELS)][1], "wavlm-large", name)
        if i % len(PAPER_MODELS) == 0:
            studies.append(_study(f"asr-{len(studies):02d}", "asr", [], SCALE_DEPTHS, HEALING))
        studies[-1]["models"].append(name)
    left = cells - sum(sizes)  # the text studies: a path per model and convention, and a summary each
    paper = max(0, min(len(models), left - 1))
    if left - paper - 1 == 1:
        paper -= 1  # a study of one cell has no path: one path fewer here, a study of one path and a summary after
    gromov = max(0, min(len(models), left - paper - 2))
    for convention, count in (("paper", paper), ("gromov", gromov)):
        if count:
            paths = [{"source": "text", "convention": convention}]
            studies.append({"name": f"text-{convention}", "task": "asr", "models": list(models)[:count],
                            "paths": paths, "depths": []})  # fmt: skip
    return {"name": "scheduler-scale", "defaults": {"train_workers": 2}, "models": models, "tasks": _tasks(),
            "studies": studies}  # fmt: skip


def write_experiment(path: Path, experiment: dict[str, Any]) -> Path:
    """Write an experiment file (YAML) and return its path."""
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


def lower_bound(cells: Sequence[Cell], unit: float, slots: int) -> Bound:
    """The lower bound of the makespan of `cells` on `slots` slots (see the module docstring).

    Args:
        cells: The grid, every dependency before its dependents (`grid.cells.expand` order).
        unit: Seconds per unit of `scheduler_fakes.COSTS`.
        slots: GPUs.

    Returns:
        The work and the chain, and the release-time check.
    """
    finish: dict[str, float] = {}
    work: dict[str, float] = {}
    release: dict[str, float] = {}
    needed: set[str] = set()
    for cell in cells:
        seconds = cell_seconds(cell, unit)
        loads = LOAD_SECONDS * len(cell_backbones(cell))
        width = train_workers(cell)
        if width > 1:
            seconds += loads  # a DDP cell's processes are new: each loads both backbones
            work[cell.id] = width * seconds
        else:
            needed.update(cell_backbones(cell))
            work[cell.id] = seconds
            if not cell.deps:
                seconds += loads  # at time 0 no worker holds a backbone
        release[cell.id] = max((finish[dep] for dep in cell.deps), default=0.0)
        finish[cell.id] = release[cell.id] + seconds
    late, released, released_at = 0.0, 0.0, 0.0
    for at, cell_id in sorted(((t, cell_id) for cell_id, t in release.items()), reverse=True):
        late += work[cell_id]
        if at + late / slots > released:
            released, released_at = at + late / slots, at
    total = sum(work.values()) + LOAD_SECONDS * len(needed)
    return Bound(total, max(finish.values()), slots, released, released_at)


def dependency_waves(cells: Sequence[Cell]) -> list[list[Cell]]:
    """The cells by depth in the dependency graph: those without dependencies first, then those on them, ..."""
    depth: dict[str, int] = {}
    waves: list[list[Cell]] = []
    for cell in cells:
        depth[cell.id] = 1 + max((depth[dep] for dep in cell.deps), default=-1)
        if depth[cell.id] == len(waves):
            waves.append([])
        waves[depth[cell.id]].append(cell)
    return waves


def tune_waves(cells: Sequence[Cell], unit: float, gpus: int, storage: Path) -> tuple[Span, list[float]]:
    """Run `cells` as plain Ray Tune trials, a `Tuner` with a `grid_search` per dependency wave, on a new local Ray.

    Args:
        cells: The grid.
        unit: Seconds per unit of `scheduler_fakes.COSTS`.
        gpus: Logical GPUs; each trial holds one.
        storage: Tune's storage directory.

    Returns:
        When the trials ran, and each Tuner's wall time.
    """
    ray.init(address="local", num_cpus=gpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    began, ended, walls = [], [], []
    try:
        for i, wave in enumerate(dependency_waves(cells)):
            trials = [
                {"cell": cell.id, "seconds": LOAD_SECONDS * len(cell_backbones(cell)) + cell_seconds(cell, unit)}
                for cell in wave
            ]
            tuner = tune.Tuner(
                tune.with_resources(_tune_trial, {"GPU": 1}),
                param_space={"cell": tune.grid_search(trials)},
                tune_config=tune.TuneConfig(reuse_actors=True),
                run_config=tune.RunConfig(name=f"wave-{i}", storage_path=str(storage), verbose=0),
            )
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # Tune's tables, whatever the verbosity
                results = tuner.fit()
            walls.append(time.perf_counter() - start)
            if results.errors:
                raise RuntimeError(f"{len(results.errors)} Tune trials failed: {results.errors[0]}")
            began += [result.metrics["began"] for result in results]
            ended += [result.metrics["ended"] for result in results]
    finally:
        ray.shutdown()
    return Span(min(began), max(ended)), walls


class SimulatedCluster:
    """What `grid.runner._Pool` calls of Ray, on a virtual clock, with no processes.

    The clock (`time`, standing in for `time.monotonic` in `grid.runner`) runs at real speed while the driver
    works, and jumps to the next cell's end in `wait`; what the simulation itself does is left out of it, and its
    CPU time is counted in `own_cpu`.
    """

    TRAINER = "trainer:"
    """Prefix of the worker name a DDP cell's outcome carries."""
    exceptions = ray.exceptions

    def __init__(self, gpus: int, unit: float) -> None:
        """An idle cluster at time 0.

        Args:
            gpus: GPUs, in nodes of `NODE_GPUS`, with 8 CPUs per GPU.
            unit: Seconds per unit of `scheduler_fakes.COSTS`.
        """
        self.gpus = gpus
        self.unit = unit
        self.now = 0.0
        """Virtual seconds at the last `wait`."""
        self.own_cpu = 0.0
        """CPU seconds spent in the simulation (not in the scheduler)."""
        self._mark = time.perf_counter()
        self._pending: list[tuple[float, int, _Reference]] = []
        self._order = itertools.count()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """`grid.runner` on this cluster and `grid.stages.Backbones` loading nothing, for the `with` block."""
        load_encoder, load_decoder = loaders(0.0)
        patches = [
            (grid.runner, "ray", self),
            (grid.runner, "time", SimpleNamespace(monotonic=self.time)),
            (grid.runner, "CellWorker", SimpleNamespace(options=lambda **_: SimpleNamespace(remote=self._worker))),
            (grid.runner, "_train_ddp_cell", SimpleNamespace(options=lambda **_: SimpleNamespace(remote=self._ddp))),
            (grid.stages, "load_encoder", load_encoder),
            (grid.stages, "load_decoder", load_decoder),
            # Freeing a dropped decoder's memory: there is none, and collecting the driver's heap would take long.
            (grid.stages, "gc", SimpleNamespace(collect=lambda: 0)),
        ]
        with contextlib.ExitStack() as stack:
            for module, name, value in patches:
                stack.enter_context(mock.patch.object(module, name, value))
            yield

    def time(self) -> float:
        """The virtual clock."""
        return self.now + time.perf_counter() - self._mark

    def nodes(self) -> list[dict[str, Any]]:
        """`ray.nodes()`: the cluster's nodes, all alive."""
        nodes, rest = divmod(self.gpus, NODE_GPUS)
        sizes = [NODE_GPUS] * nodes + ([rest] if rest else [])
        return [{"Alive": True, "Resources": {"GPU": float(n), "CPU": float(8 * n)}} for n in sizes]

    def wait(
        self, refs: list[_Reference], num_returns: int = 1, timeout: float | None = None
    ) -> tuple[list[_Reference], list[_Reference]]:
        """`ray.wait`: the reference that finishes first; the clock moves to its end (if the driver is not later).

        The virtual clock jumps to that end, so no `timeout` passes before it.
        """
        clock, cpu = self.time(), time.process_time()
        end, _, ref = heapq.heappop(self._pending)
        rest = [other for other in refs if other is not ref]
        self.now = max(clock, end)
        self.own_cpu += time.process_time() - cpu
        self._mark = time.perf_counter()
        return [ref], rest

    def get(self, ref: _Reference) -> CellOutcome:
        """`ray.get`: the cell's outcome."""
        return ref.outcome

    def kill(self, actor: _Worker) -> None:
        """`ray.kill`: the worker is dropped with its backbones (the pool forgets it)."""

    @contextlib.contextmanager
    def aside(self) -> Iterator[float]:
        """Leave the simulation's own work out of the virtual clock and out of the driver's time; yields the clock."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield self.time()
        finally:
            self._mark += time.perf_counter() - wall
            self.own_cpu += time.process_time() - cpu

    def submit(self, end: float, outcome: CellOutcome) -> _Reference:
        """A reference to `outcome` that finishes at virtual time `end`."""
        ref = _Reference(outcome)
        heapq.heappush(self._pending, (end, next(self._order), ref))
        return ref

    def _worker(
        self, uri: str, experiment: str, workdir: str, root: str, backbones_per_worker: int | None, *_: Any
    ) -> _Worker:
        """`CellWorker.options(...).remote(...)`: a new worker holding no backbone (and no feature cache)."""
        with self.aside():
            return _Worker(self, backbones_per_worker)

    def _ddp(self, cell: Cell, *args: Any) -> _Reference:
        """`_train_ddp_cell.options(...).remote(...)`: W new processes, each loading both backbones, then training."""
        with self.aside() as now:
            workers = train_workers(cell)
            backbones = cell_backbones(cell)
            loads = dict.fromkeys(backbones, workers)
            outcome = CellOutcome(cell.id, f"run-{cell.id}", None, f"{self.TRAINER}{cell.id}", loads, frozenset())
            return self.submit(now + LOAD_SECONDS * len(backbones) + cell_seconds(cell, self.unit), outcome)


class _Worker:
    """A simulated `CellWorker`: the real `Backbones` decides what it loads; a cell takes its loads and duration."""

    _names = itertools.count(1)

    def __init__(self, cluster: SimulatedCluster, backbones_per_worker: int | None) -> None:
        self.cluster = cluster
        self.backbones = Backbones("cpu", backbones_per_worker)
        self.name = f"simulated:{next(self._names)}"
        self.run = SimpleNamespace(remote=self._run)

    def _run(self, cell: Cell, deps: dict[str, str]) -> _Reference:
        with self.cluster.aside() as now:
            before = sum(self.backbones.loads.values())
            load_backbones(self.backbones, cell.config)
            loads = sum(self.backbones.loads.values()) - before
            held = frozenset(self.backbones.held())
            outcome = CellOutcome(cell.id, f"run-{cell.id}", None, self.name, dict(self.backbones.loads), held)
            end = now + LOAD_SECONDS * loads + cell_seconds(cell, self.cluster.unit)
            return self.cluster.submit(end, outcome)


@dataclass(eq=False)
class _Reference:
    """A simulated `ray.ObjectRef`: the outcome its cell will have."""

    outcome: CellOutcome


def write_finished_runs(store: GridStore, cells: Sequence[Cell]) -> tuple[float, float]:
    """Give every cell a FINISHED run in `store`, as a worker's `GridStore.start_cell` and `CellRun` leave one.

    One cell of each kind is written the real way (its run opened by `start_cell`, tagged with its worker, the fake
    stage's metrics logged, closed FINISHED), the rest in bulk through MLflow's own ORM classes, one transaction a
    thousand runs, without the `config.json` artifact (files beside the store, which nothing here reads). The bulk
    runs are checked against the real ones: the same run fields, tag keys, params and metric keys.

    Args:
        store: The experiment's store, its cells without runs.
        cells: Every cell of the experiment.

    Returns:
        The seconds of a cell's own round trip through the store (start_cell to FINISHED) on the store before the
        bulk write and after it.
    """
    examples = {cell.kind: cell for cell in reversed(cells)}
    small = _round_trip(store, cells[0])
    for cell in examples.values():
        _finish(store, cell)
    sql = SqlAlchemyStore(store.uri, str(Path(store.uri.removeprefix("sqlite:///")).parent / "mlartifacts"))
    artifact_location = store.client.get_experiment(store.experiment_id).artifact_location
    parent = store.parent_run()
    written = {cell.id for cell in examples.values()}
    rest = [cell for cell in cells if cell.id not in written]
    for start in range(0, len(rest), 1000):
        with sql.ManagedSessionMaker() as session:
            for cell in rest[start : start + 1000]:
                session.add_all(_bulk_run(cell, int(store.experiment_id), artifact_location, parent))
    by_id = {cell.id: cell for cell in cells}
    for kind, cell in examples.items():
        bulk = _run_where(store, f"tags.cell_kind = '{kind}' and tags.worker = '{_BULK_WORKER}'")
        _check_alike(_run_where(store, f"tags.cell_id = '{cell.id}'"), cell, bulk, by_id[bulk.data.tags["cell_id"]])
    return small, _round_trip(store, cells[0])


def _bulk_run(cell: Cell, experiment_id: int, artifact_location: str, parent: str) -> list[Any]:
    """The rows MLflow writes for a finished cell's run (its `create_run`, `log_batch` and `update_run_info`)."""
    run_id = uuid.uuid4().hex
    name = f"{cell.kind}-{cell.id[:8]}"
    now = int(time.time() * 1000)
    tags = {"cell_id": cell.id, "cell_kind": cell.kind, **cell.tags, MLFLOW_PARENT_RUN_ID: parent}
    tags |= {MLFLOW_RUN_NAME: name, "worker": _BULK_WORKER}
    run = SqlRun(
        run_uuid=run_id,
        name=name,
        artifact_uri=f"{artifact_location}/{run_id}/artifacts",
        experiment_id=experiment_id,
        source_type=SourceType.to_string(SourceType.UNKNOWN),
        source_name="",
        entry_point_name="",
        user_id="unknown",
        status=RunStatus.to_string(RunStatus.FINISHED),
        start_time=now,
        end_time=now,
        deleted_time=None,
        source_version="",
        lifecycle_stage=LifecycleStage.ACTIVE,
    )
    run.tags = [SqlTag(key=key, value=value) for key, value in tags.items()]
    metrics = {"bench.began": now / 1000, "bench.seconds": 0.0, "wall_seconds": 0.0}
    rows: list[Any] = [run]
    rows += [SqlParam(run_uuid=run_id, key=key, value=value) for key, value in _params(cell.config).items()]
    for table in (SqlMetric, SqlLatestMetric):
        rows += [
            table(run_uuid=run_id, key=key, value=value, timestamp=now, step=0, is_nan=False)
            for key, value in metrics.items()
        ]
    return rows


def _run_where(store: GridStore, filter_string: str) -> Any:
    """One run of the experiment that matches."""
    [run] = store.client.search_runs([store.experiment_id], filter_string, max_results=1)
    return run


def _finish(store: GridStore, cell: Cell) -> None:
    """A cell's FINISHED run, written as `CellWorker.run` with the fake stage writes it."""
    with store.start_cell(cell) as run:
        run.set_tags({"worker": "bench:0"})
        run.log_metrics({"bench.began": time.time(), "bench.seconds": 0.0})


def _round_trip(store: GridStore, cell: Cell, probes: int = 3) -> float:
    """The median seconds of a run's round trip through the store (`_finish`) for cells like `cell` that are not in
    the grid (so that `slamgrid status` does not count them)."""
    seconds = []
    for _ in range(probes):
        probe = Cell(cell.kind, {**cell.config, "probe": uuid.uuid4().hex}, cell.deps, cell.tags)
        began = time.perf_counter()
        _finish(store, probe)
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds)


def _check_alike(real: Any, real_cell: Cell, bulk: Any, bulk_cell: Cell) -> None:
    """Raise unless a bulk-written run has the fields, tag and metric keys of a really written one of the same kind,
    and each has its cell's config as params."""
    fields = ("status", "lifecycle_stage", "user_id", "experiment_id")
    differences = [f for f in fields if getattr(real.info, f) != getattr(bulk.info, f)]
    if real.info.artifact_uri.replace(real.info.run_id, "") != bulk.info.artifact_uri.replace(bulk.info.run_id, ""):
        differences.append("artifact_uri")
    if set(real.data.tags) != set(bulk.data.tags):
        differences.append(f"tags {sorted(set(real.data.tags) ^ set(bulk.data.tags))}")
    if set(real.data.metrics) != set(bulk.data.metrics):
        differences.append(f"metrics {sorted(set(real.data.metrics) ^ set(bulk.data.metrics))}")
    for run, cell in ((real, real_cell), (bulk, bulk_cell)):
        if run.data.params != _params(cell.config):
            differences.append(f"params of {run.info.run_id}")
    if differences:
        raise RuntimeError(f"bulk-written {real_cell.kind} runs differ from real ones: {differences}")


def _timed(command: list[str], env: dict[str, str]) -> tuple[float, list[str]]:
    """Run a command: its seconds and the lines it printed."""
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - began, done.stdout.splitlines()


def _store_span(store: GridStore, cells: int) -> Span:
    """When the cells' runs started and ended, from the store."""
    runs = store.client.search_runs([store.experiment_id], "tags.cell_id LIKE '%'", max_results=cells + 1)
    if len(runs) != cells:
        raise RuntimeError(f"the store holds {len(runs)} cell runs, not {cells}")
    return Span(min(run.info.start_time for run in runs) / 1000, max(run.info.end_time for run in runs) / 1000)


def _tune_trial(config: dict[str, Any]) -> None:
    """One cell as a plain Ray Tune trial: its backbones' loads and its work, slept; it reports when it ran."""
    began = time.time()
    time.sleep(config["cell"]["seconds"])
    tune.report({"began": began, "ended": time.time()})


def _model(layers: int, encoder: str, decoder: str, kind: str = "wavlm") -> dict[str, Any]:
    return {
        "encoder": {"name": f"synthetic/{encoder}", "kind": kind},
        "decoder": {"name": f"synthetic/{decoder}"},
        "layers": layers,
    }


def _study(name: str, task: str, models: list[str], depths: list[int] | str, healing: list[str]) -> dict[str, Any]:
    return {"name": name, "task": task, "models": models, "paths": [{"source": "speech"}], "depths": depths,
            "healing": healing}  # fmt: skip


def _tasks() -> dict[str, Any]:
    """An ASR and an AST task on hub-style data sets (never read: the stages are fakes)."""

    def data(split: str) -> dict[str, str]:
        return {"source": "librispeech", "path": "synthetic/speech", "split": split}

    sets = {"train": data("train"), "dev": {"dev": data("dev")}, "eval": {"test": data("test")}}
    return {
        "asr": {"task": "asr", "prompt": "Transcribe speech to text.", **sets},
        "ast": {"task": "ast", "prompt": "Translate speech to English.", **sets},
    }


def _describe(cells: Sequence[Cell], backbones: int, unit: float) -> str:
    kinds = ", ".join(f"{kind} {count}" for kind, count in plan_summary(list(cells)).items())
    ddp = Counter(train_workers(cell) for cell in cells if cell.kind == "train")
    trains = ", ".join(f"{count} in {width} process{'es' if width > 1 else ''}" for width, count in sorted(ddp.items()))
    return (
        f"synthetic grid: {len(cells):,} cells ({kinds}; trainings {trains}), {backbones} backbones; "
        f"a unit of work {unit:g} s, a backbone load {LOAD_SECONDS:g} s"
    )


def _describe_bound(bound: Bound) -> str:
    return (
        f"lower bound {bound.seconds:.1f} s: the larger of work / slots = {bound.work:.0f} / {bound.slots} = "
        f"{bound.work / bound.slots:.1f} s and the longest chain {bound.chain:.1f} s; dependencies force no more "
        f"than {bound.released:.1f} s (t = {bound.released_at:.1f} s plus the work of the cells that cannot start "
        f"before it, over the slots)"
    )


if __name__ == "__main__":
    main()
