"""The grid's MLflow store: one run per cell under one parent run per experiment file, read back to resume.

What is finished is read from the store, never from process memory: `GridStore.states` answers from
`search_runs` alone, so a new driver (or a second one) sees what an earlier one did. Every call goes
through an explicit `MlflowClient(uri)`: nothing sets MLflow's global tracking URI, so two stores in one
process do not interfere. `CellRun` is the `slam.track.Tracker` a cell reports through; `slam/` never
imports MLflow.

Layout in the store:

- One MLflow experiment per experiment file, tagged as a model-development experiment (`EXPERIMENT_KIND`: MLflow's
  UI opens it on its runs table); in it one parent run (tag `grid_role=parent`) holding the
  summaries (`summaries/{name}.json`, `summaries/{name}/{figure}.png`) and, as its description, the report's
  tables (`GridStore.describe_parent`).
- One child run per cell (tag `mlflow.parentRunId`), named by what it does (`run_name`: `prune tiny-qwen asr
  speech-asr n=3 none [1a2b3c4d]`), tagged `cell_id`, `cell_kind` and the cell's tags, its config logged as
  flattened params (`heal.lora_rank`) and whole as the artifact `config.json`; a failure leaves the tag `error`
  and the artifact `error.txt`.
- With a local sqlite store, artifacts go to `mlartifacts/` beside the database file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mlflow.entities import LifecycleStage, Metric, Param, Run, RunData, RunInfo, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

from grid.cells import Cell, prune_path_label
from slam.track import Tracker

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PENDING = "PENDING"
"""Status of a cell that has no run yet."""
TRUNCATED = " ...[truncated; full value in config.json]"
"""Marker that ends a param value cut to MLflow's length limit."""
PARENT_TAG = "grid_role"
"""Tag that marks the experiment's parent run (value `parent`)."""
ERROR_TAG = "error"
"""Tag holding the one-line error of a failed or killed cell."""
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""The experiment tag (key, value) that marks a model-development ("Machine learning") experiment, which MLflow's UI
opens on its runs table rather than a GenAI overview. MLflow 3.17's UI lays pages out by its global "GenAI / Model
training" switch instead (the URL's `?workflowType=machine_learning`, else the browser's last choice, GenAI at
first): there a link to the runs table needs that query."""
UI_LAYOUT = "workflowType=machine_learning"
"""The URL query that opens MLflow 3.17's pages in their model-training layout (the runs table, no GenAI overview)."""
NOTE_TAG = "mlflow.note.content"
"""The run tag MLflow's UI renders as the run's description, in Markdown."""

# MLflow's limits (mlflow.utils.validation, the run table's `name` column): param values 6,000 chars, tag values
# 8,000, param keys and run names 250, a log_batch call 1,000 metrics or 100 params/tags.
_PARAM_VALUE_LIMIT = 6000
_TAG_VALUE_LIMIT = 8000
_RUN_NAME_LIMIT = 250
_KEY_LIMIT = 250
_METRICS_PER_BATCH = 1000
_PARAMS_PER_BATCH = 100
_ERROR_LIMIT = 5000
_PAGE = 1000
_SQLITE = "sqlite:///"
_FEW_CELLS = 100  # `GridStore.states` of at most this many cells reads only their runs
_IDS_PER_QUERY = 100  # run ids in one `GridStore.runs` query
_PARENT_TAG_VALUE = "parent"
_PARENT_RUN_NAME = "grid"
_PARENT_RUN_ID_TAG = "mlflow.parentRunId"


StoreError = MlflowException
"""What a failing store (an unreachable server, a refused write) raises."""


def experiment_id_of(uri: str, name: str) -> str | None:
    """The id of the experiment `name` in the store at `uri`, None when it has none (nothing is created)."""
    found = MlflowClient(uri).get_experiment_by_name(name)
    return found.experiment_id if found is not None else None


def tracking_uri(explicit: str | None = None) -> str:
    """The tracking URI to use.

    Args:
        explicit: A URI given on the command line, if any.

    Returns:
        `explicit`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` (in the working directory).
    """
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def store_has_experiment(uri: str, name: str) -> bool:
    """Whether the store at `uri` holds the MLflow experiment `name`, asked without creating either.

    Opening a missing sqlite database would create it, and a `GridStore` creates its experiment, so readers
    (`slamgrid status`, `slamgrid summarize`) ask this first.
    """
    database = sqlite_file(uri)
    if database is not None and not database.is_file():
        return False
    return MlflowClient(uri).get_experiment_by_name(name) is not None


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local sqlite URI, None for any other store (or an in-memory one)."""
    if not uri.startswith(_SQLITE):
        return None
    database = uri[len(_SQLITE) :].partition("?")[0]
    return Path(database) if database not in ("", ":memory:") else None


def absolute_uri(uri: str) -> str:
    """A relative sqlite URI made absolute, so that every process (a worker elsewhere) opens the same database."""
    database = sqlite_file(uri)
    if database is None or database.is_absolute():
        return uri
    _, sep, query = uri[len(_SQLITE) :].partition("?")
    return f"{_SQLITE}{database.resolve()}{sep}{query}"


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, strings as they are, lists (and `{}`) as JSON.

    Args:
        config: JSON-ready nested mapping.
        prefix: Key prefix of this level (with its trailing dot).

    Returns:
        Dotted key -> value string, e.g. `{"heal.lora_rank": "64", "train.betas": "[0.9, 0.98]"}`.
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple | Mapping):
            flat[name] = json.dumps(value)
        else:
            flat[name] = str(value)
    return flat


def run_name(cell: Cell) -> str:
    """A cell's run name, what MLflow's UI lists it by: its kind, what it is about, and its id's first 8 characters.

    Args:
        cell: The cell; its tags say what it is about (those missing are left out).

    Returns:
        `train tiny-qwen asr [1a2b3c4d]`, `eval tiny-qwen asr [..]`, `path tiny-qwen asr speech [..]` (`text gromov`
        in Gromov et al.'s convention), `prune tiny-qwen asr speech-asr n=3 decoder+projector [..]` (the path as
        `grid.stages` labels it), `summary asr [..]` (the study), cut to MLflow's 250 characters.
    """
    tags = cell.tags
    about = [tags.get("study", "")] if cell.kind == "summary" else [tags.get("model", ""), tags.get("task", "")]
    if cell.kind == "path":
        convention = tags.get("path.convention", "paper")
        about += [tags.get("path.source", ""), "" if convention == "paper" else convention]
    if cell.kind == "prune":
        about += [prune_path_label(tags), f"n={tags['n']}" if "n" in tags else "", tags.get("healing", "")]
    words = " ".join(part for part in (cell.kind, *about) if part)
    # The id keeps two cells that differ only in config (two trainings of one model and task) apart.
    suffix = f" [{cell.id[:8]}]"
    return words[: _RUN_NAME_LIMIT - len(suffix)] + suffix


@dataclass(frozen=True)
class CellState:
    """What the store knows about one cell."""

    cell_id: str
    """The cell's id (`grid.cells.cell_id`)."""
    kind: str
    """The cell's kind (tag `cell_kind`); empty when it has no run."""
    status: str
    """The run's status (`FINISHED`, `FAILED`, `RUNNING`, `KILLED`, `SCHEDULED`), or `PENDING`: no run yet."""
    run_id: str | None
    """The run that stands for the cell, None when it has none."""
    error: str | None
    """The one-line error of a failed or killed run."""
    tags: dict[str, str]
    """The run's tags, without MLflow's own (`mlflow.*`)."""
    experiment_id: str | None = None
    """The MLflow experiment the run is in: another experiment file's when that file ran the cell (same id, same
    cell); None when it has no run."""


class GridStore:
    """The cells and summaries of one experiment file in one MLflow tracking store."""

    def __init__(self, uri: str, experiment: str, provenance: Mapping[str, str] | None = None) -> None:
        """Open the store and get or create the MLflow experiment.

        Args:
            uri: Tracking URI (see `tracking_uri`).
            experiment: Name of the MLflow experiment, the experiment file's `name`.
            provenance: Tags every cell run this store starts or continues gets: where its results come from
                (`grid.provenance`: the code version, the package versions, the device).
        """
        self.uri = uri
        self.experiment = experiment
        self.provenance = dict(provenance or {})
        self.client = MlflowClient(uri)
        self.experiment_id = _experiment_id(self.client, experiment, _artifact_location(uri))
        self._parent: str | None = None

    def states(self, cell_ids: Iterable[str]) -> dict[str, CellState]:
        """The state of each cell, read from the store alone.

        Args:
            cell_ids: Ids of the cells to report.

        Returns:
            Each id mapped to its state; for a cell with several runs the FINISHED one wins, else the
            newest. A cell without a run is `PENDING`.
        """
        wanted = list(dict.fromkeys(cell_ids))
        runs: dict[str, list[Run]] = {cell: [] for cell in wanted}
        for run in self._cell_runs(wanted if len(wanted) <= _FEW_CELLS else None):
            cell = run.data.tags["cell_id"]
            if cell in runs:
                runs[cell].append(run)
        return {cell: _state(cell, _pick(runs[cell])) for cell in wanted}

    def results(self) -> dict[str, dict[str, float]]:
        """The latest metrics of every cell with a FINISHED run, by cell id (what bisect searches decide on).

        Returns:
            Cell id -> metric name -> value.
        """
        return {cell: dict(run.data.metrics) for cell, run in self._finished_runs().items()}

    def finished(self) -> dict[str, str]:
        """The cells with a FINISHED run.

        Returns:
            Cell id -> run id.
        """
        return {cell: run.info.run_id for cell, run in self._finished_runs().items()}

    def start_cell(self, cell: Cell) -> CellRun:
        """The run a cell writes to, as a context manager that records how it ended.

        Args:
            cell: The cell; its kind, id, tags and config are recorded on a new run.

        Returns:
            A RUNNING `CellRun`: FINISHED on a normal exit of the `with` block, FAILED on an exception
            (KILLED on a KeyboardInterrupt), which propagates.

        Raises:
            ValueError: The cell already has a FINISHED run.
        """
        # Resume precedence, from the store alone:
        # 1. A FINISHED run exists: refuse (the runner must not start the cell; never a second FINISHED run).
        # 2. A FAILED, KILLED or RUNNING (interrupted) run exists: continue that run (the newest), back to
        #    RUNNING with its `error` tag cleared, so a rerun never duplicates; checkpoints are the runner's.
        # 3. Else: a new run under the parent run, its params logged once, here.
        runs = self._search(f"tags.cell_id = '{cell.id}'", everywhere=True)
        run = _pick(runs)
        tags = {"cell_id": cell.id, "cell_kind": cell.kind, **cell.tags, **self.provenance}
        if run is not None and run.info.status == "FINISHED":
            raise ValueError(f"cell {cell.id} ({cell.kind}) already has a FINISHED run {run.info.run_id}")
        if run is not None:
            run_id = run.info.run_id
            # The name too: a run made before names were readable gets the readable one.
            self.client.update_run(run_id, status="RUNNING", name=run_name(cell))
            if ERROR_TAG in run.data.tags:
                self.client.delete_tag(run_id, ERROR_TAG)
            _log_batch(self.client, run_id, tags=tags)
            # Only what a crash during creation left out: MLflow refuses a param whose value changes.
            missing = {k: v for k, v in _params(cell.config).items() if k not in run.data.params}
        else:
            parent = self.parent_run()
            created = self.client.create_run(
                self.experiment_id,
                tags={**tags, _PARENT_RUN_ID_TAG: parent},
                run_name=run_name(cell),
            )
            run_id = created.info.run_id
            missing = _params(cell.config)
        if missing:
            self.client.log_text(run_id, json.dumps(cell.config, indent=2, sort_keys=True), "config.json")
            _log_batch(self.client, run_id, params=missing)
        return CellRun(self.client, run_id)

    def parent_run(self) -> str:
        """The experiment's parent run, created once and reused by every store on this experiment.

        Returns:
            Its run id.
        """
        if self._parent is None:
            self._parent = self.find_parent() or self._create_parent()
        return self._parent

    def log_summary(self, name: str, table: dict | list, figures: Mapping[str, Figure] | None = None) -> None:
        """Log a summary on the parent run: `summaries/{name}.json` and `summaries/{name}/{figure}.png`.

        Args:
            name: Summary name (a study's name).
            table: JSON-ready rows or mapping.
            figures: Matplotlib figures by name.
        """
        parent = self.parent_run()
        self.client.log_text(parent, _json(table), f"summaries/{name}.json")
        for figure_name, figure in (figures or {}).items():
            self.client.log_figure(parent, figure, f"summaries/{name}/{figure_name}.png")

    def describe_parent(self, markdown: str, whole: str) -> None:
        """Set the parent run's description (`NOTE_TAG`), which MLflow's UI shows as Markdown on the run's page.

        Args:
            markdown: The description.
            whole: Where the whole text can be read, named in the note that ends a description cut to MLflow's
                tag value limit (8,000 characters).
        """
        note = f"\n\n*Cut to MLflow's limit of {_TAG_VALUE_LIMIT} characters: the whole is in {whole}.*\n"
        if len(markdown) > _TAG_VALUE_LIMIT:
            # Cut at a line's end, so that no table row is left half-drawn.
            kept = markdown[: _TAG_VALUE_LIMIT - len(note)]
            markdown = kept[: kept.rfind("\n") + 1].rstrip("\n") + note
        self.client.set_tag(self.parent_run(), NOTE_TAG, markdown)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float]) -> None:
        """Record metrics (at step 0) on any run of the experiment, finished or not, e.g. a summary's numbers on the
        cells it summarises.

        Args:
            run_id: The run.
            metrics: Name -> value.
        """
        _log_metrics(self.client, run_id, metrics, 0)

    def runs(self, run_ids: Iterable[str]) -> dict[str, Run]:
        """Runs of this experiment by id, with their params, tags and latest metrics, in pages of `_IDS_PER_QUERY`
        ids: a summary of thousands of cells makes tens of queries, not one `get_run` per cell.

        Raises:
            KeyError: A run id that the experiment does not hold.
        """
        wanted = list(dict.fromkeys(run_ids))
        found: dict[str, Run] = {}
        for i in range(0, len(wanted), _IDS_PER_QUERY):
            chunk = ", ".join(f"'{run_id}'" for run_id in wanted[i : i + _IDS_PER_QUERY])
            found |= {run.info.run_id: run for run in self._search(f"attributes.run_id IN ({chunk})", everywhere=True)}
        missing = [run_id for run_id in wanted if run_id not in found]
        if missing:
            raise KeyError(f"runs {missing[:3]} are not in experiment {self.experiment!r}")
        return found

    def end_run(self, run_id: str, status: str, reason: str | None = None) -> None:
        """End a run that is not (or no longer) in a `CellRun` block: FAILED or KILLED with its reason as `error`."""
        if reason is not None:
            self.client.set_tag(run_id, ERROR_TAG, reason)
        self.client.set_terminated(run_id, status)

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set tags on any run of the store (a retry's note, the lease's parent run)."""
        _log_batch(self.client, run_id, tags=tags)

    def log_artifact(self, run_id: str, file: str | Path, directory: str) -> None:
        """Log one file as an artifact of a run, under `directory`."""
        self.client.log_artifact(run_id, str(file), directory)

    def download_artifacts(self, run_id: str, path: str, destination: str | Path) -> Path:
        """Download an artifact (a file, or a directory) of a run into `destination`; its local path."""
        return Path(self.client.download_artifacts(run_id, path, str(destination)))

    def has_artifact(self, run_id: str, path: str) -> bool:
        """Whether a run has the artifact file `path` (e.g. `healed/healed.safetensors`)."""
        directory = path.rsplit("/", 1)[0] if "/" in path else ""
        return path in {item.path for item in self.client.list_artifacts(run_id, directory or None)}

    def run_ids(self, cell_ids: Sequence[str]) -> dict[str, str]:
        """Cell id -> the run standing for it (`states`), for the cells that have a run."""
        return {cell: state.run_id for cell, state in self.states(cell_ids).items() if state.run_id is not None}

    def run_metrics(self, run_id: str) -> dict[str, float]:
        """The latest value of each metric of a run."""
        return dict(self.client.get_run(run_id).data.metrics)

    def load_json_artifact(self, run_id: str, path: str) -> Any:
        """Read a JSON artifact of a run back.

        Args:
            run_id: The run.
            path: Artifact path, e.g. `distance.json`.

        Returns:
            The parsed JSON.
        """
        with tempfile.TemporaryDirectory() as tmp:
            local = self.client.download_artifacts(run_id, path, tmp)
            return json.loads(Path(local).read_text(encoding="utf-8"))

    def find_parent(self) -> str | None:
        """The experiment's parent run if it has one (never creates it), else None."""
        parents = sorted(self._search(f"tags.{PARENT_TAG} = '{_PARENT_TAG_VALUE}'"), key=_age)
        return parents[0].info.run_id if parents else None

    def _finished_runs(self) -> dict[str, Run]:
        """The FINISHED run standing for each cell that has one: the oldest, so that the answer is stable even if
        a race ever left two (as in `states`)."""
        runs = self._search("attributes.status = 'FINISHED' and tags.cell_id LIKE '%'", everywhere=True)
        found: dict[str, Run] = {}
        for run in sorted(runs, key=_age):
            found.setdefault(run.data.tags["cell_id"], run)
        return found

    def _cell_runs(self, cell_ids: list[str] | None = None) -> list[Run]:
        """The active cell runs of the experiment (of `cell_ids` only, when given; they may hold others' runs too),
        with their status, start time and tags, without params or metrics.

        On a database store (sqlite, PostgreSQL, MySQL) one query reads just that from MLflow's own tables:
        `search_runs` also loads every run's params and metrics, about 3 ms a run, so half a minute for a store
        of 10,000 cells. On any other store (a tracking server), `search_runs`, by id for a few cells.
        """
        from mlflow.store.tracking.dbmodels.models import SqlRun, SqlTag
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = getattr(getattr(self.client, "_tracking_client", None), "store", None)
        if not isinstance(store, SqlAlchemyStore):
            if cell_ids is None:
                return self._search("tags.cell_id LIKE '%'", everywhere=True)
            return [run for cell in cell_ids for run in self._search(f"tags.cell_id = '{cell}'", everywhere=True)]
        columns = (
            SqlRun.run_uuid,
            SqlRun.experiment_id,
            SqlRun.status,
            SqlRun.start_time,
            SqlRun.end_time,
            SqlTag.key,
            SqlTag.value,
        )
        experiments = [int(experiment) for experiment in self._experiment_ids()]
        with store.ManagedSessionMaker() as session:
            query = (
                session.query(*columns)
                .join(SqlTag, SqlTag.run_uuid == SqlRun.run_uuid)
                .filter(SqlRun.experiment_id.in_(experiments))
                .filter(SqlRun.lifecycle_stage == LifecycleStage.ACTIVE)
            )
            if cell_ids is not None:
                tagged = session.query(SqlTag.run_uuid).filter(SqlTag.key == "cell_id", SqlTag.value.in_(cell_ids))
                query = query.filter(SqlRun.run_uuid.in_(tagged))
            rows = query.all()
        heads: dict[str, tuple[str, str, int, int | None]] = {}
        tags: dict[str, list[RunTag]] = {}
        for run_id, experiment, status, start, end, key, value in rows:
            heads[run_id] = str(experiment), status, start, end
            tags.setdefault(run_id, []).append(RunTag(key, value))
        return [
            Run(
                RunInfo(run_id, experiment, "", status, start, end, LifecycleStage.ACTIVE),
                RunData(tags=tags[run_id]),
            )
            for run_id, (experiment, status, start, end) in heads.items()
            if any(tag.key == "cell_id" for tag in tags[run_id])
        ]

    def parent_of(self, experiment_id: str) -> str | None:
        """The parent run of another experiment of the store (where its driver's lease lives), None if it has none."""
        parents = self.client.search_runs(
            [experiment_id], f"tags.{PARENT_TAG} = '{_PARENT_TAG_VALUE}'", run_view_type=ViewType.ACTIVE_ONLY
        )
        return min(parents, key=_age).info.run_id if parents else None

    def experiment_name(self, experiment_id: str) -> str:
        """The name of an experiment of the store (the experiment file's `name`)."""
        return self.client.get_experiment(experiment_id).name

    def _experiment_ids(self) -> list[str]:
        """Every active experiment of the store: a cell's run may be in another experiment file's."""
        found, token = [], None
        while True:
            page = self.client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=_PAGE, page_token=token)
            found += [experiment.experiment_id for experiment in page]
            token = page.token
            if not token:
                return found

    def _search(self, filter_string: str, everywhere: bool = False) -> list[Run]:
        """Every active run of the experiment that matches, all pages; with `everywhere`, of every experiment of
        the store (a cell is the same cell, with the same id, in every experiment file that has it)."""
        runs: list[Run] = []
        token = None
        experiments = self._experiment_ids() if everywhere else [self.experiment_id]
        while True:
            page = self.client.search_runs(
                experiments,
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=_PAGE,
                page_token=token,
            )
            runs += page
            token = page.token
            if not token:
                return runs

    def _create_parent(self) -> str:
        tags = {PARENT_TAG: _PARENT_TAG_VALUE}
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=_PARENT_RUN_NAME)
        run_id = run.info.run_id
        # Only a container: FINISHED, so the UI does not show it running forever; it still takes artifacts.
        self.client.set_terminated(run_id, "FINISHED")
        # Two drivers may create one at once: the oldest wins, the others delete their own.
        winner = self.find_parent()
        if winner != run_id:
            self.client.delete_run(run_id)
        return winner or run_id


class CellRun(Tracker):
    """The MLflow run of one cell while it runs: a `slam.track.Tracker` plus artifacts and tags."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        """Wrap a RUNNING run; `GridStore.start_cell` makes these.

        Args:
            client: The store's client.
            run_id: The run.
        """
        self.client = client
        self.run_id = run_id
        self._started = time.monotonic()

    @classmethod
    def open(cls, uri: str, run_id: str) -> CellRun:
        """The run `run_id` of the store at `uri`, from another process (a DDP rank reporting to its cell's run)."""
        return cls(MlflowClient(uri), run_id)

    def __enter__(self) -> CellRun:
        self._started = time.monotonic()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.log_metrics({"wall_seconds": time.monotonic() - self._started})
        if exc is None:
            self.client.set_terminated(self.run_id, "FINISHED")
            return
        self.set_tags({ERROR_TAG: _one_line(exc)})
        self.log_text("error.txt", "".join(traceback.format_exception(exc_type, exc, tb)))
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"
        self.client.set_terminated(self.run_id, status)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record scalar metrics, optionally at a step (0 when none).

        Args:
            metrics: Name -> value, e.g. `{"wer/test-clean": 0.031}`.
            step: Training step or block size n.
        """
        _log_metrics(self.client, self.run_id, metrics, step or 0)

    def log_artifacts(self, directory: str | Path, path: str) -> None:
        """Log the files of a local directory as the run's artifact directory `path` (e.g. `model/`)."""
        self.client.log_artifacts(self.run_id, str(directory), path)

    def end(self, status: str) -> None:
        """End the run outside a `with` block (a cell recorded as failed before it could start)."""
        self.client.set_terminated(self.run_id, status)

    def log_json(self, path: str, data: Any) -> None:
        """Log JSON-ready data as the artifact `path` (e.g. `distance.json`, `hypotheses/test.json`)."""
        self.client.log_text(self.run_id, _json(data), path)

    def log_figure(self, path: str, figure: Figure) -> None:
        """Log a matplotlib figure as the artifact `path` (e.g. `heatmap.png`)."""
        self.client.log_figure(self.run_id, figure, path)

    def log_text(self, path: str, text: str) -> None:
        """Log text as the artifact `path`."""
        self.client.log_text(self.run_id, text, path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) tags of the run."""
        _log_batch(self.client, self.run_id, tags=tags)


def _log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Metrics at one step and one timestamp, in batches of MLflow's size limit (one batch for up to 1,000)."""
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
    for i in range(0, len(batch), _METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=batch[i : i + _METRICS_PER_BATCH])


def _params(config: Mapping[str, Any]) -> dict[str, str]:
    """`flatten`, cut to MLflow's limits: long values end with `TRUNCATED`, long keys end with a hash."""
    params = {}
    for key, value in flatten(config).items():
        if len(key) > _KEY_LIMIT:
            digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]
            key = f"{key[: _KEY_LIMIT - 9]}~{digest}"
        if len(value) > _PARAM_VALUE_LIMIT:
            value = value[: _PARAM_VALUE_LIMIT - len(TRUNCATED)] + TRUNCATED
        params[key] = value
    return params


def _log_batch(
    client: MlflowClient,
    run_id: str,
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> None:
    """Params and tags in batches of MLflow's size limit."""
    entities = [Param(k, v) for k, v in (params or {}).items()] + [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for i in range(0, len(entities), _PARAMS_PER_BATCH):
        chunk = entities[i : i + _PARAMS_PER_BATCH]
        client.log_batch(
            run_id,
            params=[e for e in chunk if isinstance(e, Param)],
            tags=[e for e in chunk if isinstance(e, RunTag)],
        )


def _experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Get or create the experiment; restore it if it was deleted; survive a concurrent creation; tag its kind
    (`EXPERIMENT_KIND`) where it has none, so that one made before the tag existed opens on its runs table too."""
    key, kind = EXPERIMENT_KIND
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags={key: kind})
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    # A kind someone chose in the UI is theirs to keep.
    if key not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, key, kind)
    return experiment.experiment_id


def _artifact_location(uri: str) -> str | None:
    """`mlartifacts/` beside a local sqlite database; None (the server's default) for any other store.

    MLflow's own default for a sqlite store is `./mlruns` in the working directory of whichever process
    created the experiment, which would scatter artifacts (and tests would write into the repository).
    """
    database = sqlite_file(uri)
    return None if database is None else (database.resolve().parent / "mlartifacts").as_uri()


def _pick(runs: list[Run]) -> Run | None:
    """The run that stands for a cell: the (oldest) FINISHED one, else the newest."""
    finished = [run for run in runs if run.info.status == "FINISHED"]
    if finished:
        return min(finished, key=_age)
    return max(runs, key=_age, default=None)


def _age(run: Run) -> tuple[int, str]:
    """Sort key by start time; the run id breaks ties so that every process picks the same run."""
    return run.info.start_time or 0, run.info.run_id


def _state(cell_id: str, run: Run | None) -> CellState:
    if run is None:
        return CellState(cell_id=cell_id, kind="", status=PENDING, run_id=None, error=None, tags={})
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    return CellState(
        cell_id=cell_id,
        kind=tags.get("cell_kind", ""),
        status=run.info.status,
        run_id=run.info.run_id,
        error=tags.get(ERROR_TAG),
        tags=tags,
        experiment_id=run.info.experiment_id,
    )


def _one_line(exc: BaseException) -> str:
    """`"{ExceptionType}: {message}"` on one line, cut to the error tag's limit."""
    message = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return line if len(line) <= _ERROR_LIMIT else line[: _ERROR_LIMIT - 3] + "..."


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False)
