"""The grid's progress display: counts, the estimate of the time left, training lines read from a store, the live
display, and the choice of mode. No Ray: the runner's use of it is tested in `test_runner.py`."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from grid import progress as progress_module
from grid.cells import Cell
from grid.progress import (
    GridProgress,
    PlainProgress,
    RichProgress,
    describe_cell,
    duration,
    make_progress,
    resolve_mode,
    training_steps,
)
from grid.schedule import work_estimate


def _train(name: str, steps: int = 10) -> Cell:
    config = {"train": {"steps": steps, "batch_size": 2}, "layers": 4, "name": name}
    return Cell("train", config, (), {"model": "tiny", "task": "asr"})


def _eval(name: str) -> Cell:
    return Cell("eval", {"layers": 4, "eval": {"test": {}}, "name": name}, (), {"model": "tiny", "task": "asr"})


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Store:
    """Runs and metrics as a `GridStore` gives them to the display."""

    def __init__(self) -> None:
        self.runs: dict[str, str] = {}
        self.metrics: dict[str, dict[str, float]] = {}

    def run_ids(self, cell_ids):
        return {cell: self.runs[cell] for cell in cell_ids if cell in self.runs}

    def run_metrics(self, run_id):
        return dict(self.metrics.get(run_id, {}))


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    clock = _Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    return clock


def test_counts_and_the_time_left_follow_the_work_done(clock):
    done, train, evals = _eval("done"), _train("a"), [_eval("b"), _eval("c")]
    shown = GridProgress(interval=0)
    shown.add([train, *evals], finished=[done])
    assert shown.total == 4 and shown.counts == {"finished": 1, "running": 0, "failed": 0, "blocked": 0}
    assert shown.eta() is None  # nothing done in this call yet: the cell finished before does not count
    shown.started(train)
    shown.started(evals[0])
    clock.now += 60
    shown.ended(evals[0], finished=True)
    # 60 s for one eval cell's work: the rest (the training and the other eval) at that rate.
    rest = work_estimate(train) + work_estimate(evals[1])
    assert shown.eta() == pytest.approx(rest * 60 / work_estimate(evals[0]))
    shown.blocked([evals[1]])
    assert shown.counts == {"finished": 2, "running": 1, "failed": 0, "blocked": 1}
    assert shown.left == 1
    assert shown.counts_text().startswith("2/4 finished, 1 running, 1 blocked; 1m00s elapsed, about ")
    shown.ended(train, finished=False)
    assert shown.counts["failed"] == 1 and shown.left == 0
    assert shown.counts_text() == "2/4 finished, 0 running, 1 failed, 1 blocked; 1m00s elapsed"


def test_a_running_training_counts_by_its_step_in_the_estimate(clock):
    store = _Store()
    train, other = _train("a", steps=100), _eval("b")
    shown = GridProgress(store, interval=0)
    shown.add([train, other])
    shown.started(train)
    store.runs[train.id] = "run-a"
    store.metrics["run-a"] = {"train.step": 25.0, "train.loss": 1.5, "train.steps_per_s": 2.0, "other": 1.0}
    clock.now += 100
    shown.poll()
    training = shown.trainings[train.id]
    assert (training.step, training.loss, training.steps_per_s) == (25, 1.5, 2.0)
    # A quarter of the training's work in 100 s: the other three quarters, and the eval cell, at that rate.
    quarter = work_estimate(train) / 4
    assert shown.eta() == pytest.approx((3 * quarter + work_estimate(other)) * 100 / quarter)


def test_plain_lines_name_each_new_training_step_and_the_counts_when_they_change(clock, caplog):
    store = _Store()
    train = _train("a", steps=8)
    shown = PlainProgress(store, interval=10)
    shown.add([train])
    with caplog.at_level(logging.INFO, logger="grid.progress"):
        shown.started(train)
        store.runs[train.id] = "run-a"
        for step, loss in ((2, 0.75), (2, 0.75), (4, 0.5)):
            store.metrics["run-a"] = {"train.step": step, "train.loss": loss, "train.steps_per_s": 3.0}
            clock.now += 10
            shown.poll()
        clock.now += 5
        shown.poll()  # within the interval: nothing read, nothing said
        shown.ended(train, finished=True)
        shown.close()
    lines = [record.getMessage() for record in caplog.records]
    name = f"train {train.id[:8]} tiny/asr"
    assert lines == [
        f"{name}: step 2/8 (25%), loss 0.7500, 3.00 steps/s",
        "progress: 0/1 finished, 1 running; 10s elapsed, about 30s left",  # a quarter of the work in 10 s
        f"{name}: step 4/8 (50%), loss 0.5000, 3.00 steps/s",
        "progress: 0/1 finished, 1 running; 30s elapsed, about 30s left",
        "progress: 1/1 finished, 0 running; 35s elapsed",
    ]


def test_the_live_display_draws_the_grid_and_each_training():
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=140, color_system=None)
    store = _Store()
    train = _train("a", steps=8)
    shown = RichProgress(store, interval=0, console=console)
    shown.add([train, _eval("b")])
    shown.started(train)
    store.runs[train.id] = "run-a"
    store.metrics["run-a"] = {"train.step": 6, "train.loss": 0.25, "train.steps_per_s": 4.0}
    shown.poll()
    assert len(shown.display.tasks) == 2
    bar = shown.display.tasks[1]
    assert (bar.completed, bar.total) == (6, 8) and bar.fields["note"] == "loss 0.2500, 4.00 steps/s"
    shown.ended(train, finished=True)
    assert len(shown.display.tasks) == 1 and shown.display.tasks[0].completed == 1
    shown.close()
    drawn = screen.getvalue()
    assert "grid" in drawn and "1/2" in drawn


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_auto_is_rich_only_on_a_terminal_and_a_bad_mode_is_refused():
    assert resolve_mode("auto", _Stream(True), _Stream(True)) == "rich"
    assert resolve_mode("auto", _Stream(False), _Stream(True)) == "plain"  # `slamgrid run ... > log`
    assert resolve_mode("auto", _Stream(True), _Stream(False)) == "plain"
    assert resolve_mode("off", _Stream(True), _Stream(True)) == "off"
    with pytest.raises(ValueError, match=r"--progress 'fancy': expected one of auto, rich, plain, off"):
        resolve_mode("fancy")
    assert type(make_progress("plain")) is PlainProgress and type(make_progress("off")) is GridProgress


def test_training_steps_and_descriptions():
    assert training_steps(_train("a", steps=40)) == 40 and training_steps(_eval("b")) == 0
    healed = Cell(
        "prune",
        {"n": 3, "heal": {"strategy": "decoder"}, "heal_train": {"steps": 7, "batch_size": 2}, "layers": 4},
        (),
        {"model": "tiny", "task": "asr", "n": "3", "healing": "decoder"},
    )
    plain = Cell("prune", {"n": 3, "heal": {"strategy": "none"}, "layers": 4}, (), {"n": "3", "healing": "none"})
    assert training_steps(healed) == 7 and training_steps(plain) == 0
    assert describe_cell(healed) == f"prune {healed.id[:8]} tiny/asr n=3 decoder"
    assert [duration(s) for s in (0, 59.4, 61, 3599, 3600, 7325)] == ["0s", "59s", "1m01s", "59m59s", "1h00m", "2h02m"]
