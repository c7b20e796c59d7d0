"""Scheduling policy, without Ray: which ready cell runs next and where, and when a cell is ready.

`grid.runner._Pool` runs cells on Ray workers; what it asks of this module is plain data in and out:

- `by_critical_path`: cells ordered by the work still ahead of them (`work_estimate` along their dependents), so
  that the cells holding up the most work start first;
- `ReadyQueue`: the cells of one call, released as their dependencies finish (a counter per cell, so a
  completion costs its dependents, not a scan of every waiting cell) and blocked when one fails;
- `route`: ready cells to idle slots, to a worker that holds the cell's decoder when one is idle;
- `claim_slots`: the slots a DDP training takes.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterator, Mapping, Sequence

from grid.cells import Cell


def backbone_of(cell: Cell) -> str | None:
    """The decoder a cell loads (what workers are matched by), None for a summary."""
    if "speech_llm" in cell.config:
        return cell.config["speech_llm"]["decoder"]["name"]
    if "decoder" in cell.config:
        return cell.config["decoder"]["name"]
    return None


def route(ready: Sequence[Cell], idle: Sequence[int], held: Mapping[int, frozenset[str]]) -> list[tuple[Cell, int]]:
    """Assign ready cells to idle slots, each cell to a worker already holding its decoder when one is idle.

    A cell whose decoder no idle worker holds goes to the slot holding fewest backbones (an empty slot, whose
    worker is started for it, holds none), so that loading it there keeps the others' backbones where they are
    useful; a cell that loads no backbone (a summary) goes to a running worker when one is idle.

    Args:
        ready: Cells whose dependencies have finished, most urgent first.
        idle: Idle slots, running workers first among equals.
        held: Decoder names of each slot's worker; a slot missing here has no worker yet.

    Returns:
        (cell, slot) pairs, each slot at most once; cells left over wait for the next idle slot.
    """
    free = list(idle)
    assigned: list[tuple[Cell, int]] = []
    rest = []
    for cell in ready:
        if not free:
            return assigned  # every idle slot has a cell
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
        if backbone_of(cell) is None:
            worker = min(free, key=lambda w: (w not in held, len(held.get(w, frozenset()))))
        else:
            worker = min(free, key=lambda w: len(held.get(w, frozenset())))
        assigned.append((cell, worker))
        free.remove(worker)
    return assigned


def train_workers(cell: Cell) -> int:
    """The processes a cell trains in: its `train_workers` (a DDP train cell), else 1."""
    return cell.config.get("train_workers", 1)


def claim_slots(free: Sequence[int], held: Mapping[int, frozenset[str]], count: int) -> list[int]:
    """The free slots a DDP cell takes: empty ones first, then those of idle workers holding fewest backbones.

    Args:
        free: Slots running nothing.
        held: Decoder names of each slot's worker; a slot missing here has no worker.
        count: Slots wanted, at most `len(free)`.

    Returns:
        `count` slots; the workers in them are to be stopped.
    """
    return sorted(free, key=lambda slot: (slot in held, len(held.get(slot, frozenset())), slot))[:count]


def work_estimate(cell: Cell) -> float:
    """A cell's work, roughly, in passes of one sample through one decoder layer: what the scheduler orders by.

    A training counts `steps x batch_size` samples through the model's `layers` (per process: DDP shares out the
    global batch), a healing likewise through the layers its pruned model keeps; a path, an evaluation or a pruned
    model's evaluation counts one per layer and data set it reads (the sets' sizes are not in the config), and a
    summary 1. Training dominates, as it does in the paper's grid: what the estimate gets right is the order (a
    deeper model's training before a shallower one's, a healing before a cell that only evaluates), not the time.

    Args:
        cell: A cell of `expand`.

    Returns:
        At least 1.
    """
    config = cell.config
    layers = config.get("layers", 1)
    kept = layers - config["n"] + 1 if cell.kind == "prune" else layers
    sets = len(config.get("eval", {})) + len(config.get("dev", {}))
    trained = sum(config[key]["steps"] * config[key]["batch_size"] for key in ("train", "heal_train") if key in config)
    return max(1.0, float(kept * (trained + sets)))


def by_critical_path(cells: list[Cell]) -> list[Cell]:
    """`cells` with the longest chain of work still ahead of them first (`work_estimate` along their dependents).

    The cell that holds up the most work behind it runs first: among cells ready at once, a path whose pruned cells
    wait on it before an evaluation beside it, a healing before a cell that only evaluates. A cell's chain is longer
    than each of its dependents', so dependencies still come before their dependents; equal chains keep the given
    order.

    Args:
        cells: Cells in `expand` order (every dependency before its dependents); dependencies outside them count
            as done.

    Returns:
        The same cells, reordered.
    """
    dependents: dict[str, list[str]] = {cell.id: [] for cell in cells}
    for cell in cells:
        for dep in cell.deps:
            if dep in dependents:
                dependents[dep].append(cell.id)
    chain: dict[str, float] = {}
    for cell in reversed(cells):
        chain[cell.id] = work_estimate(cell) + max((chain[d] for d in dependents[cell.id]), default=0.0)
    return sorted(cells, key=lambda cell: -chain[cell.id])


class ReadyQueue:
    """The cells of one scheduling call: waiting on dependencies, ready, started or blocked.

    Each waiting cell counts its unfinished dependencies; a finished cell decrements its dependents' counts and
    those reaching zero become ready, so a completion costs its own dependents and never a scan of every waiting
    cell. A failed cell blocks its dependents, theirs in turn, at once. Ready cells are kept in
    `by_critical_path` order, a cell started again (its process died) ahead of them all.
    """

    def __init__(self, cells: Sequence[Cell], done: Collection[str]) -> None:
        """Queue `cells`.

        Args:
            cells: The cells to run, in `expand` order (every dependency before its dependents).
            done: Ids of finished cells: a dependency among them counts as finished; one neither among them nor
                among `cells` never finishes here, and its dependents stay waiting (`waiting`).
        """
        order = by_critical_path(list(cells))
        self._rank = {cell.id: rank for rank, cell in enumerate(order)}
        self._cells = {cell.id: cell for cell in order}
        self._missing: dict[str, int] = {}
        self._dependents: dict[str, list[str]] = {}
        self._ready: list[Cell] = []
        """Ready cells, by rank."""
        self._first: list[Cell] = []
        """Cells started again, the latest first."""
        self._blocked: set[str] = set()
        for cell in order:
            unfinished = [dep for dep in cell.deps if dep not in done]
            self._missing[cell.id] = len(unfinished)
            for dep in unfinished:
                self._dependents.setdefault(dep, []).append(cell.id)
            if not unfinished:
                self._ready.append(cell)

    def __bool__(self) -> bool:
        """Whether a cell is ready or still waiting."""
        return bool(self._first or self._ready or self._missing)

    def ready(self) -> Iterator[Cell]:
        """The ready cells, most urgent first; `take` or `block` none of them while iterating."""
        yield from self._first
        yield from self._ready

    def take(self, cell: Cell) -> None:
        """`cell` (ready) has started."""
        if cell in self._first:
            self._first.remove(cell)
        else:
            del self._ready[bisect.bisect_left(self._ready, self._rank[cell.id], key=self._key)]
        del self._missing[cell.id]

    def again(self, cell: Cell) -> None:
        """`cell` (started) must start again: first in line, since it resumes from its checkpoints."""
        self._first.insert(0, cell)
        self._missing[cell.id] = 0

    def finished(self, cell_id: str) -> None:
        """`cell_id` finished: its dependents waiting on nothing else become ready."""
        for dependent in self._dependents.get(cell_id, ()):
            if dependent not in self._missing:
                continue  # blocked meanwhile by another dependency
            self._missing[dependent] -= 1
            if self._missing[dependent] == 0:
                cell = self._cells[dependent]
                bisect.insort(self._ready, cell, key=self._key)

    def block(self, cell_id: str) -> list[tuple[Cell, str]]:
        """`cell_id` did not finish (it failed, or cannot run): every cell depending on it, directly or not, is
        blocked and leaves the queue.

        Returns:
            Each newly blocked cell and the dependency that blocks it, dependencies before dependents.
        """
        if cell_id in self._missing:  # failed before it started (it cannot run here)
            cell = self._cells[cell_id]
            if self._missing[cell_id] == 0:
                self.take(cell)
            else:
                del self._missing[cell_id]
        self._blocked.add(cell_id)
        blocked: list[tuple[Cell, str]] = []
        stack = [cell_id]
        while stack:
            bad = stack.pop()
            for dependent in self._dependents.get(bad, ()):
                if dependent in self._blocked or dependent not in self._missing:
                    continue
                del self._missing[dependent]  # it waited: a dependency of it had not finished
                self._blocked.add(dependent)
                blocked.append((self._cells[dependent], bad))
                stack.append(dependent)
        return sorted(blocked, key=lambda pair: self._rank[pair[0].id])

    def waiting(self) -> list[Cell]:
        """Cells neither started nor blocked whose dependencies have not all finished."""
        return [self._cells[cell_id] for cell_id, missing in self._missing.items() if missing > 0]

    def _key(self, cell: Cell) -> int:
        return self._rank[cell.id]
