"""The scheduling policy without Ray: critical-path order, work estimates and the ready queue's counters."""

from __future__ import annotations

import pytest

from grid.cells import Cell, expand
from grid.experiment import load_experiment
from grid.schedule import ReadyQueue, by_critical_path, work_estimate
from tests.conftest import REPO

EXPERIMENTS = REPO / "experiments"
FILES = sorted(EXPERIMENTS.glob("*.yaml"))


def _cells(name: str) -> list[Cell]:
    return expand(load_experiment(EXPERIMENTS / name))


def _cell(kind: str, name: str, *deps: Cell, steps: int = 0, layers: int = 4) -> Cell:
    """A synthetic cell: `steps` training steps of batch 1 through `layers` layers, one evaluation set."""
    config: dict = {"name": name, "layers": layers, "eval": {"test": {}}}
    if kind == "prune":
        config["n"] = 2
    if steps:
        config["heal_train" if kind == "prune" else "train"] = {"steps": steps, "batch_size": 1}
    return Cell(kind, config, tuple(dep.id for dep in deps))


def _graph() -> dict[str, Cell]:
    """Two models: a long training (a) and a short one (b), each with a path, an evaluation, a healed and an
    unhealed pruned cell; a summary over everything."""
    cells: dict[str, Cell] = {}
    for model, steps in (("a", 100), ("b", 10)):
        train = cells[f"{model}.train"] = _cell("train", model, steps=steps)
        path = cells[f"{model}.path"] = _cell("path", model, train)
        cells[f"{model}.eval"] = _cell("eval", model, train)
        cells[f"{model}.heal"] = _cell("prune", f"{model}.heal", train, path, steps=5)
        cells[f"{model}.none"] = _cell("prune", f"{model}.none", train, path)
    cells["summary"] = _cell("summary", "summary", *[cell for name, cell in cells.items() if "train" not in name])
    return cells


def _names(cells, graph: dict[str, Cell]) -> list[str]:
    by_id = {cell.id: name for name, cell in graph.items()}
    return [by_id[cell.id] for cell in cells]


@pytest.mark.parametrize("name", [path.name for path in FILES])
def test_the_critical_path_order_keeps_dependencies_first_and_puts_the_deepest_trainings_first(name):
    cells = _cells(name)
    ordered = by_critical_path(cells)
    assert sorted(c.id for c in ordered) == sorted(c.id for c in cells)
    index = {cell.id: i for i, cell in enumerate(ordered)}
    assert all(index[dep] < index[cell.id] for cell in ordered for dep in cell.deps)
    trains = [cell for cell in cells if cell.kind == "train"]
    # Every other cell waits on a training, and a training is the most work there is: they all come first, the
    # most work (steps x batch x layers) first.
    first = ordered[: len(trains)]
    assert {cell.id for cell in first} == {cell.id for cell in trains}
    work = [work_estimate(cell) for cell in first]
    assert work == sorted(work, reverse=True)


def test_work_estimate_counts_training_samples_through_the_layers_a_cell_runs():
    cells = _cells("paper.yaml")
    train = next(c for c in cells if c.kind == "train" and c.tags["model"] == "qwen2.5-3b")
    steps, batch = train.config["train"]["steps"], train.config["train"]["batch_size"]
    assert work_estimate(train) == 36 * steps * batch
    prunes = [c for c in cells if c.kind == "prune" and c.config["layers"] == 36]
    heal = next(c for c in prunes if c.config["healing"] != "none")
    none = next(c for c in prunes if c.config["healing"] == "none")
    heal_steps, heal_batch = heal.config["heal_train"]["steps"], heal.config["heal_train"]["batch_size"]
    kept = 36 - heal.config["n"] + 1
    assert work_estimate(heal) == kept * (heal_steps * heal_batch + len(heal.config["eval"]))
    assert work_estimate(none) == (36 - none.config["n"] + 1) * len(none.config["eval"])
    assert work_estimate(next(c for c in cells if c.kind == "summary")) == 1.0


def test_among_ready_cells_a_path_comes_before_the_evaluations_and_healing_before_evaluating_alone():
    cells = [c for c in by_critical_path(_cells("demo.yaml")) if c.kind != "train"]
    kinds = [(c.kind, c.config.get("healing")) for c in cells]
    first_eval = kinds.index(("eval", None))
    assert ("path", None) not in kinds[first_eval:]  # every path holds up pruned cells; an evaluation only a summary
    last_heal = max(i for i, (kind, healing) in enumerate(kinds) if healing not in (None, "none"))
    assert last_heal < kinds.index(("prune", "none"))


def test_the_queue_releases_a_cell_when_its_last_dependency_finishes_most_urgent_first():
    graph = _graph()
    queue = ReadyQueue(list(graph.values()), done=())
    assert _names(queue.ready(), graph) == ["a.train", "b.train"]  # the longer training first
    for name in ("a.train", "b.train"):
        queue.take(graph[name])
    assert list(queue.ready()) == []
    queue.finished(graph["b.train"].id)
    assert _names(queue.ready(), graph) == ["b.path", "b.eval"]  # its pruned cells also wait on the path
    queue.take(graph["b.path"])
    queue.finished(graph["b.path"].id)
    assert _names(queue.ready(), graph) == ["b.heal", "b.eval", "b.none"]
    queue.finished(graph["a.train"].id)
    assert _names(queue.ready(), graph) == ["a.path", "b.heal", "a.eval", "b.eval", "b.none"]
    assert _names(queue.waiting(), graph) == ["a.heal", "a.none", "summary"]


def test_a_finished_dependency_outside_the_queue_counts_and_a_missing_one_keeps_its_cells_waiting():
    graph = _graph()
    rest = [cell for name, cell in graph.items() if not name.startswith("a.") and name != "b.train"]
    queue = ReadyQueue(rest, done={graph["b.train"].id})
    assert _names(queue.ready(), graph) == ["b.path", "b.eval"]
    for name in ("b.path", "b.eval", "b.heal", "b.none"):
        queue.take(graph[name])
        queue.finished(graph[name].id)
    assert list(queue.ready()) == [] and bool(queue)
    assert _names(queue.waiting(), graph) == ["summary"]  # a's cells never finish here


def test_a_failed_cell_blocks_its_dependents_and_theirs_at_once():
    graph = _graph()
    queue = ReadyQueue(list(graph.values()), done=())
    queue.take(graph["a.train"])
    blocked = queue.block(graph["a.train"].id)
    by_id = {cell.id: name for name, cell in graph.items()}
    pairs = [(by_id[cell.id], by_id[bad]) for cell, bad in blocked]
    assert pairs[:4] == [("a.path", "a.train"), ("a.heal", "a.train"), ("a.eval", "a.train"), ("a.none", "a.train")]
    assert pairs[4][0] == "summary" and pairs[4][1] in ("a.path", "a.eval", "a.heal", "a.none")
    assert len(pairs) == 5
    queue.take(graph["b.train"])
    queue.finished(graph["b.train"].id)
    assert _names(queue.ready(), graph) == ["b.path", "b.eval"]
    for name in ("b.path", "b.eval", "b.heal", "b.none"):
        queue.take(graph[name])
        queue.finished(graph[name].id)
    assert list(queue.ready()) == [] and not queue  # the summary stays blocked: nothing waits any more
    assert queue.block(graph["b.train"].id) == []  # blocking again blocks nothing twice


def test_a_ready_cell_that_cannot_run_leaves_the_queue_with_its_dependents():
    graph = _graph()
    queue = ReadyQueue(list(graph.values()), done=())
    blocked = queue.block(graph["b.train"].id)
    assert len(blocked) == 5 and _names(queue.ready(), graph) == ["a.train"]


def test_a_cell_started_again_goes_first():
    graph = _graph()
    queue = ReadyQueue(list(graph.values()), done=())
    for name in ("a.train", "b.train"):
        queue.take(graph[name])
    queue.finished(graph["b.train"].id)
    queue.take(graph["b.eval"])
    queue.again(graph["b.eval"])
    assert _names(queue.ready(), graph) == ["b.eval", "b.path"]
    queue.take(graph["b.eval"])
    assert _names(queue.ready(), graph) == ["b.path"]


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml"])
def test_draining_the_queue_runs_every_cell_once_after_its_dependencies(name):
    cells = _cells(name)
    queue = ReadyQueue(cells, done=())
    finished: list[str] = []
    while queue:
        cell = next(queue.ready())
        assert all(dep in finished for dep in cell.deps)
        queue.take(cell)
        queue.finished(cell.id)
        finished.append(cell.id)
    assert sorted(finished) == sorted(cell.id for cell in cells)
    assert finished == [cell.id for cell in by_critical_path(cells)]  # one slot: the priority order itself
