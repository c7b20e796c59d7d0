"""Where an experiment's cells stand, read from the tracking store: what `slamgrid status` prints and what
`run_experiment` reports.

Kept apart from `grid.runner` so that asking imports neither Ray nor torch: MLflow and the experiment file are
all it reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from grid.cells import Cell, expand
from grid.experiment import Experiment, load_experiment
from grid.lease import DriverLease, Holder
from grid.provenance import COMMIT_TAG, describe
from grid.tracking import PENDING, CellState, GridStore, absolute_uri, store_has_experiment
from grid.tracking import tracking_uri as resolve_tracking_uri

FINISHED = "FINISHED"
BLOCKED = "BLOCKED"
"""State of a cell that cannot run because a dependency failed (or is itself blocked)."""
INTERRUPTED = "INTERRUPTED"
"""State of a cell whose run reads RUNNING but whose driver is gone (killed): the next `slamgrid run` resumes it."""
STATES = (FINISHED, "FAILED", "KILLED", "RUNNING", INTERRUPTED, BLOCKED, PENDING)
"""Cell states in display order: MLflow's run statuses, INTERRUPTED and BLOCKED (derived), PENDING (no run yet)."""
NOT_DONE = ("FAILED", "KILLED", BLOCKED)
"""States of a cell that did not finish and blocks its dependents."""
UNRECORDED = "unrecorded"
"""`CellStatus.code` of a run from before runs recorded their code version."""


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
    code: str | None = None
    """The code version its run recorded (`grid.provenance.describe`: a short commit, `+dirty` when tracked files
    differed), `unrecorded` for a run from before runs recorded it; None without a run."""


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

    def other_code(self, current: str) -> dict[str, int]:
        """The finished cells whose results came from another code version than `current`, counted per version.

        Args:
            current: This checkout's version (`grid.provenance.describe(code_tags())`).

        Returns:
            Version -> FINISHED cells that recorded it, for every version but `current`, most cells first.
        """
        versions = Counter(s.code for s in self.cells if s.state == FINISHED and s.code and s.code != current)
        return dict(versions.most_common())

    @property
    def all_finished(self) -> bool:
        """Whether every cell has a FINISHED run."""
        return all(status.state == FINISHED for status in self.cells)


def experiment_status(path: str | Path, tracking_uri: str | None = None) -> GridStatus:
    """Where every cell of an experiment file stands, read from the store; writes nothing.

    Args:
        path: The experiment file.
        tracking_uri: MLflow tracking URI; None: `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db`.

    Returns:
        Each cell's state: FINISHED, FAILED, KILLED, RUNNING (its driver runs), INTERRUPTED (a RUNNING run whose
        driver is gone), BLOCKED or PENDING.
    """
    exp = load_experiment(path)
    uri = absolute_uri(resolve_tracking_uri(tracking_uri))
    if not store_has_experiment(uri, exp.name):
        return grid_status(expand(exp), {}, exp.name)
    store = GridStore(uri, exp.name)
    # Reading the results scans every finished run: only a search's cells depend on them.
    cells = expand(exp, store.results() if searches(exp) else None)
    parent = store.find_parent()
    holder = DriverLease(store.client, parent, exp.name).holder() if parent else None
    states = store.states(c.id for c in cells)
    return grid_status(cells, states, exp.name, driver=holder, drivers=drivers_elsewhere(store, states))


def drivers_elsewhere(store: GridStore, states: Mapping[str, CellState]) -> dict[str, Holder | None]:
    """The live driver, if any, of each other experiment file that holds a RUNNING run of these cells.

    A cell is the same cell in every file that has it (`GridStore.states` reads its runs wherever they are), so a
    cell another file's driver runs now is RUNNING, not INTERRUPTED, and is left to that driver.

    Returns:
        Experiment id -> its driver (None when none holds it), for the experiments other than `store`'s.
    """
    others = {
        state.experiment_id
        for state in states.values()
        if state.status == "RUNNING" and state.experiment_id not in (None, store.experiment_id)
    }
    drivers: dict[str, Holder | None] = {}
    for experiment in others:
        parent = store.parent_of(experiment)
        what = f"experiment {store.experiment_name(experiment)!r}"
        drivers[experiment] = DriverLease(store.client, parent, what).holder() if parent else None
    return drivers


def grid_status(
    cells: Sequence[Cell],
    states: Mapping[str, CellState],
    experiment: str,
    driver: Holder | None = None,
    drivers: Mapping[str, Holder | None] | None = None,
) -> GridStatus:
    """Each cell's state from its run's status, with BLOCKED and INTERRUPTED derived.

    A cell without a FINISHED run whose dependency is FAILED, KILLED or BLOCKED is BLOCKED: it cannot run until
    that dependency finishes, whatever an earlier attempt of its own left. A RUNNING run with no live driver
    holding the experiment (`grid.lease`) is INTERRUPTED: its driver was killed, and `slamgrid run` continues it.

    Args:
        cells: The cells, each after its dependencies (`grid.cells.expand` order).
        states: The store's state of each cell id (`GridStore.states`); a missing id counts as PENDING.
        experiment: The experiment's name.
        driver: The driver running the experiment now, None when none is.
        drivers: The drivers of other experiments whose runs `states` holds (`drivers_elsewhere`), by experiment id;
            a run of one of them is judged by its own experiment's driver.

    Returns:
        The status of every cell, in the order given.
    """
    by_id: dict[str, CellStatus] = {}
    for cell in cells:
        state = states.get(cell.id)
        run_id = state.run_id if state else None
        status = state.status if state else PENDING
        reason = state.error if state else None
        owner = (drivers or {}).get(state.experiment_id, driver) if state else driver
        if status == "RUNNING" and owner is None:
            status, reason = INTERRUPTED, "its driver stopped without finishing it; `slamgrid run` resumes it"
        if status != FINISHED:
            bad = next((by_id[dep] for dep in cell.deps if dep in by_id and by_id[dep].state in NOT_DONE), None)
            if bad is not None:
                status, reason = BLOCKED, f"dependency {bad.cell.kind} {bad.cell.id} is {bad.state}"
        code = (describe(state.tags) if COMMIT_TAG in state.tags else UNRECORDED) if run_id else None
        by_id[cell.id] = CellStatus(cell=cell, state=status, run_id=run_id, reason=reason, code=code)
    return GridStatus(experiment=experiment, cells=tuple(by_id.values()))


def searches(exp: Experiment) -> bool:
    """Whether a study of the experiment searches its depths (its cells grow as results come in)."""
    return any(study.search != "sweep" for study in exp.studies)
