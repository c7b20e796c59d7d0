"""The MLflow store of the grid: one run per cell, resume without duplicates, params, artifacts, the parent run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

import grid.tracking
from grid.cells import Cell, cell_id, expand
from grid.experiment import load_experiment
from grid.tracking import DEFAULT_TRACKING_URI, TRUNCATED, CellRun, GridStore, tracking_uri
from tests.conftest import REPO


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """A migrated, empty sqlite store: creating MLflow's tables takes seconds, copying the file does not."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def uri(tmp_path, empty_db) -> str:
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


@pytest.fixture(scope="module")
def demo_cells() -> list[Cell]:
    return expand(load_experiment(REPO / "experiments" / "demo.yaml"))


@pytest.fixture
def prune_cell(demo_cells) -> Cell:
    return next(c for c in demo_cells if c.kind == "prune" and c.tags["healing"] == "decoder+projector")


def _runs_of(uri: str, store: GridStore, cell: Cell) -> list:
    return MlflowClient(uri).search_runs([store.experiment_id], f"tags.cell_id = '{cell.id}'")


def test_finished_cell_is_one_run_with_tags_params_metrics_artifacts(uri, prune_cell):
    store = GridStore(uri, "demo")
    figure = Figure()
    figure.subplots().plot([0, 1], [1, 0])
    with store.start_cell(prune_cell) as run:
        assert isinstance(run, CellRun)
        run.log_metrics({"loss": 2.0}, step=1)
        run.log_metrics({"loss": 1.5, "lr": 1e-4}, step=2)
        run.log_metrics({"wer/test": 0.25})
        run.log_json("hypotheses/test.json", {"hyps": ["a b", "c"], "n": 2})
        run.log_text("notes.txt", "healed")
        run.log_figure("heatmap.png", figure)
        run.set_tags({"layers_removed": "3,4"})

    client = MlflowClient(uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == f"prune-{prune_cell.id[:8]}"
    tags = got.data.tags
    assert tags["cell_id"] == prune_cell.id
    assert tags["cell_kind"] == "prune"
    assert tags["model"] == "tiny-qwen"
    assert tags["healing"] == "decoder+projector"
    assert tags["layers_removed"] == "3,4"
    assert tags["mlflow.parentRunId"] == store.parent_run()
    assert client.get_run(store.parent_run()).data.tags["grid_role"] == "parent"

    params = got.data.params
    assert params["heal.lora_rank"] == "64"
    assert params["heal.lora_dropout"] == "0.05"
    assert params["heal.lora_targets"] == '["gate_proj", "up_proj", "down_proj"]'
    assert params["heal_train.betas"] == "[0.9, 0.98]"
    assert params["speech_llm.decoder.lora"] == "None"
    assert params["healing"] == "decoder+projector"
    assert params["train_cell"] == prune_cell.config["train_cell"]
    assert params["n"] == str(prune_cell.config["n"])

    history = client.get_metric_history(run.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.5)]
    metrics = store.run_metrics(run.run_id)
    assert metrics["loss"] == 1.5
    assert metrics["lr"] == pytest.approx(1e-4)
    assert metrics["wer/test"] == 0.25
    assert 0 <= metrics["wall_seconds"] < 60

    assert store.load_json_artifact(run.run_id, "hypotheses/test.json") == {"hyps": ["a b", "c"], "n": 2}
    assert store.load_json_artifact(run.run_id, "config.json") == prune_cell.config
    artifacts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"config.json", "notes.txt", "heatmap.png", "hypotheses"} <= artifacts
    assert "error.txt" not in artifacts
    # Artifacts of a local sqlite store lie beside the database, not in the working directory.
    assert (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").is_dir()


def test_failing_cell_is_failed_then_rerun_continues_the_same_run(uri, tmp_path, demo_cells):
    store = GridStore(uri, "demo")
    cell = demo_cells[0]
    with pytest.raises(RuntimeError, match="boom"), store.start_cell(cell) as run:
        run.log_metrics({"loss": 3.0}, step=10)
        raise RuntimeError("boom\n  at step 10")
    first = run.run_id

    state = store.states([cell.id])[cell.id]
    assert state.status == "FAILED"
    assert state.run_id == first
    assert state.error == "RuntimeError: boom at step 10"
    assert state.kind == cell.kind
    client = MlflowClient(uri)
    traceback_text = Path(client.download_artifacts(first, "error.txt", str(tmp_path))).read_text()
    assert "Traceback" in traceback_text
    assert "RuntimeError: boom" in traceback_text
    assert cell.id not in store.finished()

    with store.start_cell(cell) as rerun:
        assert rerun.run_id == first
        during = store.states([cell.id])[cell.id]
        assert during.status == "RUNNING"
        assert during.error is None
        rerun.log_metrics({"loss": 1.0}, step=20)

    state = store.states([cell.id])[cell.id]
    assert state.status == "FINISHED"
    assert state.run_id == first
    assert state.error is None
    assert len(_runs_of(uri, store, cell)) == 1
    assert store.finished() == {cell.id: first}
    # The run continued: the history of before the failure is still there.
    assert [m.step for m in client.get_metric_history(first, "loss")] == [10, 20]


def test_keyboard_interrupt_marks_killed_and_rerun_reuses(uri, demo_cells):
    store = GridStore(uri, "demo")
    cell = demo_cells[1]
    with pytest.raises(KeyboardInterrupt), store.start_cell(cell) as run:
        raise KeyboardInterrupt
    state = store.states([cell.id])[cell.id]
    assert state.status == "KILLED"
    assert state.error == "KeyboardInterrupt"
    with store.start_cell(cell) as rerun:
        pass
    assert rerun.run_id == run.run_id
    assert store.states([cell.id])[cell.id].status == "FINISHED"
    assert len(_runs_of(uri, store, cell)) == 1


def test_finished_cell_cannot_start_again(uri, demo_cells):
    store = GridStore(uri, "demo")
    cell = demo_cells[0]
    with store.start_cell(cell) as run:
        pass
    assert store.finished() == {cell.id: run.run_id}
    with pytest.raises(ValueError, match="already has a FINISHED run"):
        store.start_cell(cell)
    assert len(_runs_of(uri, store, cell)) == 1


def test_states_of_unknown_cells_are_pending(uri, demo_cells):
    store = GridStore(uri, "demo")
    done, other = demo_cells[0], demo_cells[1]
    with store.start_cell(done):
        pass
    states = store.states([done.id, other.id, "0123456789abcdef"])
    assert states[done.id].status == "FINISHED"
    for cell in (other.id, "0123456789abcdef"):
        assert states[cell].status == "PENDING"
        assert states[cell].run_id is None
        assert states[cell].tags == {}


def test_states_read_from_the_database_are_those_search_runs_gives(uri, demo_cells, monkeypatch):
    store = GridStore(uri, "demo")
    finished, failed, raced, deleted, elsewhere = demo_cells[:5]
    with store.start_cell(finished) as run:
        run.log_metrics({"loss": 1.0})
    with pytest.raises(RuntimeError), store.start_cell(failed):
        raise RuntimeError("boom")
    with store.start_cell(raced):
        pass
    client = MlflowClient(uri)
    # A second run of the same cell (as a race between two drivers could leave), still RUNNING.
    tags = {"cell_id": raced.id, "cell_kind": raced.kind}
    client.create_run(store.experiment_id, tags=tags, start_time=1)
    with store.start_cell(deleted) as gone:
        pass
    client.delete_run(gone.run_id)
    with GridStore(uri, "other").start_cell(elsewhere):
        pass
    ids = [cell.id for cell in demo_cells[:6]]
    fast = store.states(ids)  # a few cells: their runs, by id
    assert {cell: store.states([cell])[cell] for cell in ids} == fast
    monkeypatch.setattr(grid.tracking, "_FEW_CELLS", 0)
    assert store.states(ids) == fast  # every cell run of the experiment
    monkeypatch.setattr(GridStore, "_cell_runs", lambda self, cell_ids: self._search("tags.cell_id LIKE '%'"))
    assert store.states(ids) == fast
    assert [fast[i].status for i in ids] == ["FINISHED", "FAILED", "FINISHED", "PENDING", "PENDING", "PENDING"]
    assert fast[failed.id].error == "RuntimeError: boom" and fast[finished.id].run_id == run.run_id


def test_second_store_sees_the_same_runs_and_parent(uri, demo_cells):
    first = GridStore(uri, "demo")
    cell = demo_cells[0]
    with first.start_cell(cell) as run:
        pass
    parent = first.parent_run()

    second = GridStore(uri, "demo")
    assert second.experiment_id == first.experiment_id
    assert second.parent_run() == parent
    assert second.finished() == {cell.id: run.run_id}
    assert second.states([cell.id]) == first.states([cell.id])
    parents = MlflowClient(uri).search_runs([first.experiment_id], "tags.grid_role = 'parent'")
    assert [p.info.run_id for p in parents] == [parent]


def test_two_stores_in_one_process_do_not_interfere(uri, tmp_path, empty_db, demo_cells):
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    shutil.copy(empty_db, other_dir / "mlflow.db")
    here, there = GridStore(uri, "demo"), GridStore(f"sqlite:///{other_dir}/mlflow.db", "demo")
    cell = demo_cells[0]
    with here.start_cell(cell):
        pass
    assert there.states([cell.id])[cell.id].status == "PENDING"
    assert there.finished() == {}


def test_other_experiment_is_separate(uri, demo_cells):
    cell = demo_cells[0]
    with GridStore(uri, "demo").start_cell(cell):
        pass
    assert GridStore(uri, "table1").states([cell.id])[cell.id].status == "PENDING"


def test_long_param_values_are_truncated_and_config_json_is_whole(uri):
    prompt = "word " * 2000
    cell = Cell("train", {"speech_llm": {"prompt": prompt, "projector": {"stack": 5}}, "steps": 10}, ())
    store = GridStore(uri, "demo")
    with store.start_cell(cell) as run:
        pass
    params = MlflowClient(uri).get_run(run.run_id).data.params
    value = params["speech_llm.prompt"]
    assert len(value) == 6000
    assert value.endswith(TRUNCATED)
    assert prompt.startswith(value.removesuffix(TRUNCATED))
    assert params["speech_llm.projector.stack"] == "5"
    assert params["steps"] == "10"
    assert store.load_json_artifact(run.run_id, "config.json")["speech_llm"]["prompt"] == prompt


def test_metrics_beyond_one_batch(uri, demo_cells):
    store = GridStore(uri, "demo")
    metrics = {f"distance/{i}": i / 2500 for i in range(2500)}
    with store.start_cell(demo_cells[0]) as run:
        run.log_metrics(metrics, step=3)
    logged = store.run_metrics(run.run_id)
    assert len(logged) == 2500 + 1
    assert logged["distance/2499"] == pytest.approx(2499 / 2500)


def test_summary_on_the_parent_run(uri):
    store = GridStore(uri, "demo")
    figure = Figure()
    figure.subplots().bar([1, 2], [0.1, 0.2])
    rows = [{"model": "tiny-qwen", "n": 3, "wer": 0.25}]
    store.log_summary("asr", rows, {"wer_vs_fraction": figure})
    parent = store.parent_run()
    assert store.load_json_artifact(parent, "summaries/asr.json") == rows
    pngs = [a.path for a in MlflowClient(uri).list_artifacts(parent, "summaries/asr")]
    assert pngs == ["summaries/asr/wer_vs_fraction.png"]


def test_tracking_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"
    assert tracking_uri("sqlite:///other.db") == "sqlite:///other.db"


def test_config_json_matches_the_cell_id(uri, demo_cells):
    cell = demo_cells[-1]
    store = GridStore(uri, "demo")
    with store.start_cell(cell) as run:
        pass
    config = store.load_json_artifact(run.run_id, "config.json")
    assert cell_id(cell.kind, config) == cell.id
    assert json.loads(json.dumps(config)) == cell.config
