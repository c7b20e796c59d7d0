"""Live progress of a running grid: cells finished, running, failed and blocked out of the total, elapsed time and
an estimate of the time left, and each running training's step, loss and speed as its run records them.

`slamgrid run --progress MODE` picks the display (`make_progress`):

- `rich`: a live display on stderr (the `rich` library): a bar for the grid and one per running training, redrawn
  in place, with the runner's log lines printed above it;
- `plain`: log lines (logger `grid.progress`), for files, CI and schedulers: every `interval` seconds while
  something changes, a line per training that recorded a new step, then the grid's counts and estimate;
- `off`: neither (the runner's line per cell start and end stays);
- `auto` (the default): `rich` when stdout and stderr are terminals, else `plain`.

Training progress is read from the store, where the cell's worker logs it (`slam.train` logs `train.step`,
`train.loss` and `train.steps_per_s` every `log_every` steps on the cell's run), so it is the same whether the
training runs in a worker, in DDP under Ray Train, or on another node. The time left is estimated from the work
done so far: each cell's `grid.schedule.work_estimate` (a training's part by its step), the finished share of the
grid's work against the time it took. It is a rough guide: the estimate weighs cells by their arithmetic, and the
first minutes, before a cell has finished, give none.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Protocol

from grid.cells import Cell
from grid.schedule import work_estimate

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger(__name__)

MODES = ("auto", "rich", "plain", "off")
"""`slamgrid run --progress` values."""
PLAIN_INTERVAL = 30.0
"""Seconds between two plain progress reads of the store (and lines, when something changed)."""
RICH_INTERVAL = 2.0
"""Seconds between two reads of the running trainings' metrics for the live display."""


class MetricsSource(Protocol):
    """Where the latest metrics of the running cells are read (`grid.tracking.GridStore`)."""

    def run_ids(self, cell_ids: Sequence[str]) -> dict[str, str]:
        """Cell id -> the id of the run standing for it, for the cells that have one."""

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of each metric of a run."""


@dataclass(frozen=True)
class Training:
    """Where one running training (a train cell, or a prune cell's healing) stands, as its run last recorded it."""

    cell: Cell
    steps: int
    """Steps it runs in all (`train.steps`, or `heal_train.steps`)."""
    step: int = 0
    """The last step its run recorded; 0 before the first."""
    loss: float | None = None
    """`train.loss` at that step."""
    steps_per_s: float | None = None
    """`train.steps_per_s` over the steps before it."""

    def describe(self) -> str:
        """`train 1a2b3c4d tiny-qwen/asr: step 300/1500 (20%), loss 0.5321, 2.41 steps/s`."""
        text = f"{describe_cell(self.cell)}: step {self.step}/{self.steps} ({100 * self.step / self.steps:.0f}%)"
        if self.loss is not None:
            text += f", loss {self.loss:.4f}"
        if self.steps_per_s is not None:
            text += f", {self.steps_per_s:.2f} steps/s"
        return text


class GridProgress:
    """What every display counts and estimates; `update` shows it (nothing here: `--progress off`).

    The runner tells it the cells it adds (`add`), starts (`started`) and ends (`ended`, `blocked`), and calls `poll`
    while it waits; `poll` reads the running trainings from `source` at most every `interval` seconds.
    """

    def __init__(self, source: MetricsSource | None = None, interval: float = PLAIN_INTERVAL) -> None:
        """Start counting now.

        Args:
            source: Where the running trainings' metrics are read; None: not read.
            interval: Seconds between two reads of `source` (and, for plain lines, between two lines).
        """
        self.source = source
        self.interval = interval
        self.began = time.monotonic()
        self.total = 0
        self.counts = {"finished": 0, "running": 0, "failed": 0, "blocked": 0}
        self.work_total = 0.0
        self.work_done = 0.0
        self.work_before = 0.0
        """Work of the cells finished before this call: not part of the rate."""
        self.running: dict[str, Cell] = {}
        self.trainings: dict[str, Training] = {}
        self._runs: dict[str, str] = {}
        self._read = float("-inf")

    def add(self, cells: Iterable[Cell], finished: Iterable[Cell] = ()) -> None:
        """Count more cells of the grid: `cells` to run, `finished` already done (a bisect search adds waves)."""
        for cell in cells:
            self.total += 1
            self.work_total += work_estimate(cell)
        for cell in finished:
            self.total += 1
            self.counts["finished"] += 1
            self.work_total += work_estimate(cell)
            self.work_done += work_estimate(cell)
            self.work_before += work_estimate(cell)
        self.update()

    def started(self, cell: Cell) -> None:
        """A cell was started (or started again after its process died)."""
        if cell.id not in self.running:
            self.counts["running"] += 1
        self.running[cell.id] = cell
        steps = training_steps(cell)
        if steps:
            self.trainings[cell.id] = Training(cell, steps)
        self.update()

    def ended(self, cell: Cell, finished: bool) -> None:
        """A cell ended: FINISHED, or not (FAILED, KILLED, or its process died past its retries)."""
        if self.running.pop(cell.id, None) is not None:
            self.counts["running"] -= 1
        self.trainings.pop(cell.id, None)
        self._runs.pop(cell.id, None)
        self.counts["finished" if finished else "failed"] += 1
        self.work_done += work_estimate(cell)
        self.update()

    def retried(self, cell: Cell) -> None:
        """A cell's process died and it waits to be started again: it is not running meanwhile."""
        if self.running.pop(cell.id, None) is not None:
            self.counts["running"] -= 1
        self.trainings.pop(cell.id, None)
        self.update()

    def blocked(self, cells: Sequence[Cell]) -> None:
        """Cells that will not run in this call: a dependency did not finish (or they could not run at all)."""
        self.counts["blocked"] += len(cells)
        self.work_done += sum(work_estimate(cell) for cell in cells)
        self.update()

    def poll(self) -> None:
        """Read the running trainings' latest metrics, if `interval` has passed since the last read, and show them."""
        now = time.monotonic()
        if now - self._read < self.interval:
            return
        self._read = now
        if self.source is not None and self.trainings:
            self._read_trainings()
        self.update(tick=True)

    def close(self) -> None:
        """The grid call is over: show the last counts."""
        self.update(tick=True)

    def update(self, tick: bool = False) -> None:
        """Show the counts (a display's own; `tick`: from `poll`, at most every `interval`)."""

    @property
    def elapsed(self) -> float:
        """Seconds since this call began."""
        return time.monotonic() - self.began

    @property
    def left(self) -> int:
        """Cells of the grid not yet ended (pending or running)."""
        return self.total - self.counts["finished"] - self.counts["failed"] - self.counts["blocked"]

    def eta(self) -> float | None:
        """Seconds left, estimated from the work done in this call so far; None before there is any to go by."""
        done = self.work_done - self.work_before + sum(self._partial(t) for t in self.trainings.values())
        remaining = self.work_total - self.work_done - sum(self._partial(t) for t in self.trainings.values())
        if done <= 0:
            return None
        return max(0.0, remaining * self.elapsed / done)

    def counts_text(self) -> str:
        """`5/25 finished, 2 running, 1 failed, 3 blocked; 4m10s elapsed, about 9m00s left`."""
        counts = self.counts
        text = f"{counts['finished']}/{self.total} finished, {counts['running']} running"
        text += "".join(f", {counts[state]} {state}" for state in ("failed", "blocked") if counts[state])
        eta = self.eta()
        left = "" if eta is None or not self.left else f", about {duration(eta)} left"
        return f"{text}; {duration(self.elapsed)} elapsed{left}"

    def _partial(self, training: Training) -> float:
        return work_estimate(training.cell) * training.step / training.steps

    def _read_trainings(self) -> None:
        unknown = [cell_id for cell_id in self.trainings if cell_id not in self._runs]
        if unknown:
            self._runs.update(self.source.run_ids(unknown))
        for cell_id, training in list(self.trainings.items()):
            run_id = self._runs.get(cell_id)
            if run_id is None:
                continue
            metrics = self.source.run_metrics(run_id)
            if "train.step" not in metrics:
                continue
            self.trainings[cell_id] = Training(
                training.cell,
                training.steps,
                int(metrics["train.step"]),
                metrics.get("train.loss"),
                metrics.get("train.steps_per_s"),
            )


class PlainProgress(GridProgress):
    """Progress as log lines (logger `grid.progress`): for files, CI logs and job schedulers."""

    def __init__(self, source: MetricsSource | None = None, interval: float = PLAIN_INTERVAL) -> None:
        super().__init__(source, interval)
        self._shown: str | None = None
        self._steps: dict[str, int] = {}

    def update(self, tick: bool = False) -> None:
        """On a tick: a line per training that recorded a new step, then the counts if anything moved."""
        if not tick:
            return
        stepped = False
        for cell_id, training in self.trainings.items():
            if training.step and self._steps.get(cell_id) != training.step:
                self._steps[cell_id] = training.step
                stepped = True
                log.info("%s", training.describe())
        counts = self.counts_text()
        # Elapsed time alone changing is no news; a training's new step is (the estimate moves with it).
        key = counts.split(";")[0]
        if key != self._shown or stepped:
            self._shown = key
            log.info("progress: %s", counts)


class RichProgress(GridProgress):
    """A live display on the terminal (stderr): a bar for the grid, one per running training."""

    def __init__(
        self, source: MetricsSource | None = None, interval: float = RICH_INTERVAL, console: Console | None = None
    ) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        super().__init__(source, interval)
        self.display = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            console=console or shared_console(),
            transient=False,
        )
        self._grid = self.display.add_task("grid", total=None, note="")
        self._bars: dict[str, int] = {}
        self.display.start()

    def update(self, tick: bool = False) -> None:
        """Redraw the grid's bar and the trainings' bars."""
        ended = self.counts["finished"] + self.counts["failed"] + self.counts["blocked"]
        note = self.counts_text().split("finished, ", 1)[1]
        self.display.update(self._grid, total=max(self.total, 1), completed=ended, note=note)
        for cell_id in [c for c in self._bars if c not in self.trainings]:
            self.display.remove_task(self._bars.pop(cell_id))
        for cell_id, training in self.trainings.items():
            if cell_id not in self._bars:
                self._bars[cell_id] = self.display.add_task(
                    f"  {describe_cell(training.cell)}", total=training.steps, note=""
                )
            note = "" if training.loss is None else f"loss {training.loss:.4f}"
            if training.steps_per_s is not None:
                note += f", {training.steps_per_s:.2f} steps/s"
            self.display.update(self._bars[cell_id], completed=training.step, note=note)

    def close(self) -> None:
        """Show the last counts and stop redrawing."""
        super().close()
        self.display.stop()


_CONSOLE: list[Console] = []


def shared_console() -> Console:
    """The console (stderr) the live display and the runner's log lines share, so that lines print above it."""
    if not _CONSOLE:
        from rich.console import Console

        _CONSOLE.append(Console(stderr=True))
    return _CONSOLE[0]


def resolve_mode(mode: str, stdout: IO | None = None, stderr: IO | None = None) -> str:
    """`auto` -> `rich` when both streams are terminals, else `plain`; other modes as they are.

    Raises:
        ValueError: Not one of `MODES`.
    """
    if mode not in MODES:
        raise ValueError(f"--progress {mode!r}: expected one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    streams = (stdout or sys.stdout, stderr or sys.stderr)
    return "rich" if all(stream.isatty() for stream in streams) else "plain"


def make_progress(mode: str, source: MetricsSource | None = None, interval: float | None = None) -> GridProgress:
    """The display of a `--progress` mode (`auto` resolved against this process's stdout and stderr).

    Args:
        mode: One of `MODES`.
        source: Where the running trainings' metrics are read.
        interval: Seconds between two reads of `source`; None: the display's default.
    """
    mode = resolve_mode(mode)
    if mode == "rich":
        return RichProgress(source, interval or RICH_INTERVAL)
    if mode == "plain":
        return PlainProgress(source, interval or PLAIN_INTERVAL)
    return GridProgress(None, interval or PLAIN_INTERVAL)


def training_steps(cell: Cell) -> int:
    """Optimiser steps a cell trains: a train cell's `train.steps`, a healed prune cell's `heal_train.steps`, else 0."""
    config = cell.config
    if cell.kind == "train":
        return int(config["train"]["steps"])
    if cell.kind == "prune" and config.get("heal", {}).get("strategy", "none") != "none":
        return int(config["heal_train"]["steps"])
    return 0


def describe_cell(cell: Cell) -> str:
    """`train 1a2b3c4d tiny-qwen/asr`, `prune 5e6f7a8b tiny-qwen/asr n=3 decoder+projector`: kind, id, what."""
    tags = cell.tags
    what = "/".join(tags[key] for key in ("model", "task") if key in tags)
    extra = " ".join(
        f"n={tags['n']}" if key == "n" else tags[key] for key in ("n", "healing") if key in tags and tags[key]
    )
    return " ".join(part for part in (cell.kind, cell.id[:8], what, extra) if part)


def duration(seconds: float) -> str:
    """`45s`, `3m10s`, `2h05m`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
