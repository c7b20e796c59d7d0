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
from grid.stages import Backbones, run_cell
from grid.tracking import (
    DEFAULT_TRACKING_URI,
    EXPERIMENT_KIND,
    NOTE_TAG,
    TRUNCATED,
    CellRun,
    GridStore,
    run_name,
    tracking_uri,
)
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
    assert got.info.run_name == f"prune tiny-qwen asr speech-asr n=2 decoder+projector [{prune_cell.id[:8]}]"
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
    monkeypatch.setattr(
        GridStore, "_cell_runs", lambda self, cell_ids: self._search("tags.cell_id LIKE '%'", everywhere=True)
    )
    assert store.states(ids) == fast
    # The cell finished under another experiment is finished here too.
    assert [fast[i].status for i in ids] == ["FINISHED", "FAILED", "FINISHED", "PENDING", "FINISHED", "PENDING"]
    assert fast[elsewhere.id].experiment_id == GridStore(uri, "other").experiment_id != store.experiment_id
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


def test_a_cell_finished_under_one_experiment_is_finished_for_every_other(uri, demo_cells):
    cell = demo_cells[0]
    demo = GridStore(uri, "demo")
    with demo.start_cell(cell) as run:
        pass
    table1 = GridStore(uri, "table1")
    state = table1.states([cell.id])[cell.id]
    assert (state.status, state.run_id, state.experiment_id) == ("FINISHED", run.run_id, demo.experiment_id)
    assert table1.finished() == {cell.id: run.run_id} and list(table1.runs([run.run_id])) == [run.run_id]
    with pytest.raises(ValueError, match="already has a FINISHED run"):
        table1.start_cell(cell)  # never a second run
    assert table1.parent_run() != demo.parent_run()  # each file keeps its own parent run (its lease, its report)


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


def test_run_names_say_what_each_cell_is(demo_cells):
    names = [run_name(cell) for cell in demo_cells]
    assert all(name.endswith(f" [{cell.id[:8]}]") for name, cell in zip(names, demo_cells))
    readable = [name.rsplit(" [", 1)[0] for name in names]
    assert len(set(names)) == len(names) == 25
    # One of each kind (and path kind) of the demo, as the runs table lists them.
    assert {
        "train tiny-qwen asr",
        "eval tiny-qwen ast",
        "path tiny-qwen asr speech",
        "path tiny-qwen asr text gromov",
        "prune tiny-qwen asr speech-asr n=2 none",
        "prune tiny-qwen asr speech-asr n=3 decoder+projector",
        "prune tiny-qwen ast speech-asr n=5 decoder+projector",
        "prune tiny-qwen asr text-asr n=3 decoder+projector",
        "summary asr-text-path",
    } <= set(readable)
    assert [name for name in readable if name.startswith("summary")] == [
        "summary asr",
        "summary ast",
        "summary asr-text-path",
        "summary figure1",
    ]


def test_run_names_of_another_model_s_path_and_of_long_tags():
    tags = {"model": "qwen-7b", "task": "asr", "n": "4", "healing": "none", "path.source": "text",
            "path.task": "asr", "path.model": "qwen-1.5b", "path.convention": "gromov"}  # fmt: skip
    cell = Cell("prune", {"n": 4}, (), tags)
    assert run_name(cell) == f"prune qwen-7b asr text-asr-qwen-1.5b-gromov n=4 none [{cell.id[:8]}]"
    long = Cell("train", {}, (), {"model": "m" * 300, "task": "asr"})
    assert len(run_name(long)) == 250
    assert run_name(long) == f"train {'m' * 233} [{long.id[:8]}]"
    assert run_name(Cell("eval", {}, (), {})) == f"eval [{Cell('eval', {}, (), {}).id[:8]}]"


def test_the_experiment_is_tagged_as_model_development(uri):
    key, kind = EXPERIMENT_KIND
    assert (key, kind) == ("mlflow.experimentKind", "custom_model_development")
    client = MlflowClient(uri)
    store = GridStore(uri, "demo")
    assert client.get_experiment(store.experiment_id).tags[key] == kind
    # An experiment made before the tag gets it when a store opens it; a kind chosen in the UI is kept.
    old = client.create_experiment("old")
    assert key not in client.get_experiment(old).tags
    assert GridStore(uri, "old").experiment_id == old
    assert client.get_experiment(old).tags[key] == kind
    chosen = client.create_experiment("chosen", tags={key: "genai_development"})
    GridStore(uri, "chosen")
    assert client.get_experiment(chosen).tags[key] == "genai_development"


def test_a_continued_run_gets_the_readable_name(uri, prune_cell):
    store = GridStore(uri, "demo")
    client = MlflowClient(uri)
    old = client.create_run(store.experiment_id, tags={"cell_id": prune_cell.id}, run_name=f"prune-{prune_cell.id[:8]}")
    client.set_terminated(old.info.run_id, "FAILED")
    with store.start_cell(prune_cell) as run:
        pass
    assert run.run_id == old.info.run_id
    assert client.get_run(run.run_id).info.run_name == run_name(prune_cell)


def test_the_parent_run_s_description_is_cut_at_a_line_to_mlflow_s_limit(uri):
    store = GridStore(uri, "demo")
    client = MlflowClient(uri)
    store.describe_parent("**demo**\n\n| a |\n| --- |\n| 1 |\n", "`report/table1.md`")
    assert client.get_run(store.parent_run()).data.tags[NOTE_TAG] == "**demo**\n\n| a |\n| --- |\n| 1 |\n"
    rows = [f"| row {i:04d} | {'x' * 40} |" for i in range(400)]  # 55 characters and a newline each: 22,399 in all
    store.describe_parent("\n".join(rows), "`report/table1.md`")
    note = client.get_run(store.parent_run()).data.tags[NOTE_TAG]
    kept, _, end = note.partition("\n\n*")
    assert end == "Cut to MLflow's limit of 8000 characters: the whole is in `report/table1.md`.*\n"
    assert len(note) <= 8000 and kept.split("\n") == rows[: len(kept.split("\n"))]
    # As many whole rows as fit beside the note.
    assert len(kept.split("\n")) == (8000 - len("\n\n*" + end)) // 56 == 141


def test_the_summary_logs_each_pruned_cell_s_change_on_its_run(uri, tmp_path, demo_cells):
    store = GridStore(uri, "demo")
    evaluated = next(c for c in demo_cells if c.kind == "eval" and c.tags["task"] == "asr")
    prunes = [c for c in demo_cells if c.kind == "prune" and c.tags["study"] == "asr" and c.tags["healing"] == "none"]
    pruned_wer = {"2": 0.22, "3": 0.3, "4": 0.25}  # against 0.2: +10 % (within 25 %), +50 %, +25 % (on the line)
    runs = {}
    with store.start_cell(evaluated) as run:
        run.log_metrics({"test.wer": 0.2})
    runs[evaluated.id] = run.run_id
    for cell in prunes[:3]:
        with store.start_cell(cell) as run:
            run.set_tags({"removed": "[1]"})
            n = int(cell.tags["n"])
            run.log_metrics({"n": n, "fraction": (n - 1) / 8, "test.wer": pruned_wer[cell.tags["n"]]})
        runs[cell.id] = run.run_id
    config = {"study": "asr", "task": "asr", "path_cells": [], "eval_cells": [evaluated.id],
              "prune_cells": [c.id for c in prunes[:3]]}  # fmt: skip
    summary = Cell("summary", config, tuple(runs), {"task": "asr", "study": "asr"})
    with store.start_cell(summary) as run:
        run_cell(summary, run, runs, store, tmp_path, Backbones("cpu"))
    logged = {cell.tags["n"]: store.run_metrics(runs[cell.id]) for cell in prunes[:3]}
    assert {n: metrics["test.delta"] for n, metrics in logged.items()} == pytest.approx({"2": 0.1, "3": 0.5, "4": 0.25})
    assert {n: metrics["within_threshold"] for n, metrics in logged.items()} == {"2": 1.0, "3": 0.0, "4": 1.0}
    assert "test.delta" not in store.run_metrics(runs[evaluated.id])


def test_runs_are_read_by_id_in_pages_not_one_query_each(uri, monkeypatch):
    store = GridStore(uri, "paged")
    ids = [store.client.create_run(store.experiment_id, tags={"i": str(i)}).info.run_id for i in range(7)]
    store.client.log_metric(ids[3], "test.wer", 12.5)
    queries = []
    search = store.client.search_runs
    monkeypatch.setattr(grid.tracking, "_IDS_PER_QUERY", 3)
    monkeypatch.setattr(store.client, "search_runs", lambda *a, **k: queries.append(k) or search(*a, **k))
    runs = store.runs(reversed(ids))
    assert sorted(runs) == sorted(ids) and len(queries) == 3  # 7 ids, 3 to a query
    assert runs[ids[3]].data.metrics == {"test.wer": 12.5} and runs[ids[5]].data.tags["i"] == "5"
    with pytest.raises(KeyError, match=r"runs \['0123'\] are not in experiment 'paged'"):
        store.runs([ids[0], "0123"])
