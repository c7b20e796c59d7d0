"""DDP train cells through Ray Train: the projector of one process on the global batch, rank 0 alone reporting,
slots taken from idle workers without deadlock, and the failures of a cell that cannot or does not train.

A local Ray with 2 CPUs and no GPU: 2 CPU slots, DDP over gloo. The tiny world is `tests.grid.world`'s.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from grid.cells import expand
from grid.experiment import load_experiment
from grid.runner import RunReport, _Pool, run_experiment
from grid.schedule import claim_slots
from grid.stages import MODEL_ARTIFACT, Backbones
from grid.tracking import GridStore
from slam.config import DataConfig, SpeechLLMConfig, TrainConfig, from_dict
from slam.data import load_dataset
from slam.model import TRAINED_FILE
from slam.train import train
from tests.grid.world import TRAIN, build_world, cell_runs, write_experiment

# Logged losses (relative) and projector weights of the 2-process DDP cell against one process on the doubled batch,
# as in tests/slam/test_train.py; measured: losses 8e-8 relative, weights 1.5e-8 absolute.
DDP_TOLERANCE = 1e-6
# Text paths of both tasks (on different dev sets: two cells), then a speech path that needs the trained SpeechLLM.
TEXT_STUDIES = [
    {"name": "text-asr", "task": "asr", "models": ["tiny"], "paths": [{"source": "text"}], "depths": []},
    {"name": "text-ast", "task": "ast", "models": ["tiny"], "paths": [{"source": "text"}], "depths": []},
]
SPEECH_STUDY = {"name": "speech", "task": "asr", "models": ["tiny"], "paths": [{"source": "speech"}], "depths": []}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = build_world(tmp_path_factory.mktemp("world"))
    shutil.copy(root / "test.jsonl", root / "dev-ast.jsonl")
    return root


@pytest.fixture(scope="module")
def ray_cpus():
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def after_workers(world, ray_cpus) -> tuple[str, dict, _Pool]:
    """One pool: text path cells start a worker in each slot, then the DDP train cell and its speech path run."""
    path = write_experiment(
        world, "ddp", [*TEXT_STUDIES, SPEECH_STUDY], defaults={"train_workers": 2}, ast_dev="dev-ast.jsonl"
    )
    cells = expand(load_experiment(path))
    uri = f"sqlite:///{world}/mlflow.db"
    store = GridStore(uri, "ddp")
    store.parent_run()
    pool = _Pool(store, world / "out" / "ddp", str(world), cells, workers=None, use_gpu=None)
    text = [c for c in cells if c.tags["study"] in ("text-asr", "text-ast")]
    done: dict[str, str] = {}
    outcome: dict[str, object] = {}

    def run_all() -> None:
        outcome["text"] = pool.run(text, done)
        outcome["workers"] = dict(pool.held)
        outcome["speech"] = pool.run([c for c in cells if c not in text], done)

    thread = threading.Thread(target=run_all, daemon=True)
    try:
        thread.start()
        thread.join(timeout=600)
        assert not thread.is_alive(), "the grid did not finish: deadlocked?"
    finally:
        pool.close()
    return uri, {**outcome, "done": done, "cells": cells}, pool


def test_ddp_takes_the_slots_of_idle_workers_and_workers_start_again_after_it(after_workers, world):
    uri, outcome, pool = after_workers
    assert pool.size == 2 and (outcome["text"], outcome["speech"]) == (4, 3)
    # Both slots held a worker (each with the decoder loaded) when the DDP cell came: it stopped both.
    assert outcome["workers"] == {0: frozenset({str(world / "lm")}), 1: frozenset({str(world / "lm")})}
    assert pool.started_workers == 3  # two for the text paths, one for the speech path after the training
    runs = {run.data.tags["cell_id"]: run for run in cell_runs(uri, "ddp")}
    assert set(runs) == {cell.id for cell in outcome["cells"]} == set(outcome["done"])
    assert {run.info.status for run in runs.values()} == {"FINISHED"}


def test_ddp_train_cell_reports_once_from_rank_0(after_workers, world):
    uri, outcome, pool = after_workers
    [cell] = [c for c in outcome["cells"] if c.kind == "train"]
    assert cell.config["train_workers"] == 2
    client = MlflowClient(uri)
    run = client.get_run(outcome["done"][cell.id])
    assert run.info.status == "FINISHED" and run.data.tags["train_workers"] == "2"
    speech_llm = cell.config["speech_llm"]
    # Each of the 2 processes loaded the encoder and the decoder once.
    expected_loads = {f"encoder:{speech_llm['encoder']['name']}": 2, f"decoder:{speech_llm['decoder']['name']}": 2}
    assert pool.loads[run.data.tags["worker"]] == expected_loads
    losses = client.get_metric_history(run.info.run_id, "train.loss")
    assert sorted(m.step for m in losses) == [2, 4]  # log_every=2 of 4 steps, logged by rank 0 only
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train.lr")) == [2, 4]
    assert run.data.metrics["trainable_params"] > 0 and run.data.metrics["train.resumed_from"] == 0
    checkpoints = world / "out" / "ddp" / cell.id / "train" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002", "step-000004"]


def test_ddp_projector_equals_one_process_on_the_global_batch(after_workers):
    uri, outcome, _ = after_workers
    [cell] = [c for c in outcome["cells"] if c.kind == "train"]
    with tempfile.TemporaryDirectory() as tmp:
        saved = MlflowClient(uri).download_artifacts(outcome["done"][cell.id], MODEL_ARTIFACT, tmp)
        ddp = load_file(Path(saved) / TRAINED_FILE)

    cfg = from_dict(SpeechLLMConfig, cell.config["speech_llm"])
    train_cfg = from_dict(TrainConfig, cell.config["train"])
    model = Backbones("cpu").speech_llm(cfg, seed=train_cfg.seed)
    dataset = load_dataset(from_dict(DataConfig, cell.config["data"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray Train workers
    try:
        single = train(model, dataset, replace(train_cfg, batch_size=2 * TRAIN["batch_size"]))
    finally:
        torch.set_num_threads(threads)

    history = MlflowClient(uri).get_metric_history(outcome["done"][cell.id], "train.loss")
    logged = [metric.value for metric in sorted(history, key=lambda metric: metric.step)]
    np.testing.assert_allclose(logged, [np.mean(single.losses[:2]), np.mean(single.losses[2:])], rtol=DDP_TOLERANCE)
    expected = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    assert ddp.keys() == expected.keys() and any(name.startswith("projector.") for name in ddp)
    for name, tensor in expected.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=DDP_TOLERANCE, atol=DDP_TOLERANCE)


def test_a_ddp_cell_wider_than_the_cluster_fails_with_its_reason(world, ray_cpus):
    path = write_experiment(world, "too-wide", [SPEECH_STUDY], defaults={"train_workers": 3})
    uri = f"sqlite:///{world}/mlflow.db"
    reason = "train_workers=3: DDP training needs 3 CPU slots at once, but the Ray cluster has 2 CPUs"
    for _ in range(2):  # a rerun fails the same way, in the same run
        report = run_experiment(path, tracking_uri=uri, workdir=world / "out")
        assert report.counts == {"FAILED": 1, "BLOCKED": 2} and report.started == 0
        [(cell, error)] = report.failed
        assert error == reason and report.worker_loads == {}
        [run] = [run for run in cell_runs(uri, "too-wide") if run.data.tags["cell_kind"] == "train"]
        assert run.info.status == "FAILED" and run.data.tags["error"] == reason
    with pytest.raises(ValueError, match="workers=3 is not allowed: the Ray cluster has 2 CPUs"):
        run_experiment(path, tracking_uri=uri, workdir=world / "out", workers=3)


@pytest.mark.slow  # a Ray Train start for a training that fails: about 30 s
def test_a_failing_ddp_training_is_failed_with_the_ranks_error_and_the_grid_goes_on(world, ray_cpus):
    (world / "bad-train.jsonl").write_text('{"id": "x", "audio": "audio/missing.flac", "text": "a b"}\n')
    path = write_experiment(world, "ddp-fails", [*TEXT_STUDIES[:1], SPEECH_STUDY], defaults={"train_workers": 2})
    doc = path.read_text().replace(str(world / "train.jsonl"), str(world / "bad-train.jsonl"))
    path.write_text(doc)
    uri = f"sqlite:///{world}/mlflow.db"

    report = run_experiment(path, tracking_uri=uri, workdir=world / "out")

    states = {status.cell.kind + ":" + status.cell.tags["study"]: status for status in report.status.cells}
    assert {key: status.state for key, status in states.items()} == {
        "train:speech": "FAILED",
        "path:text-asr": "FINISHED",
        "path:speech": "BLOCKED",
        "summary:text-asr": "FINISHED",
        "summary:speech": "BLOCKED",
    }
    # Both ranks fail loading the data; the error of the lowest rank that Ray Train reports is the reason.
    reason = states["train:speech"].reason
    assert re.fullmatch(r"RuntimeError: DDP rank [01] of 2 failed: \w+: .* missing audio file .*missing\.flac", reason)


def test_claim_slots_takes_empty_slots_then_workers_with_fewest_backbones():
    held = {1: frozenset({"a", "b"}), 2: frozenset({"a"}), 3: frozenset(), 5: frozenset({"c"})}
    assert claim_slots([0, 1, 2, 3, 4, 5], held, 2) == [0, 4]
    assert claim_slots([1, 2, 3, 5], held, 3) == [3, 2, 5]
    assert claim_slots([1, 2], held, 2) == [2, 1]


@pytest.mark.slow  # two Ray Train starts and 400 steps: about 90 s
def test_a_killed_trainer_is_started_again_and_its_cell_resumes(world, ray_cpus):
    train = {"steps": 400, "batch_size": 2, "checkpoint_every": 20, "log_every": 20}
    studies = [*TEXT_STUDIES[:1], SPEECH_STUDY]
    path = write_experiment(world, "ddp-killed", studies, train=train, defaults={"train_workers": 2})
    uri = f"sqlite:///{world}/mlflow.db"
    result: dict[str, RunReport] = {}
    thread = threading.Thread(target=lambda: result.update(first=run_experiment(path, uri, world / "out")), daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not list((world / "out" / "ddp-killed").glob("*/train/checkpoints/step-*")):
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    [run] = [run for run in cell_runs(uri, "ddp-killed") if run.data.tags["cell_kind"] == "train"]
    os.kill(int(run.data.tags["worker"].rpartition(":")[2]), signal.SIGKILL)  # the task the trainer runs from
    thread.join(timeout=300)
    assert not thread.is_alive()

    # The trainer's slots came back (its placement group released) and the cell ran again in the same call.
    assert result["first"].counts == {"FINISHED": 5}
    [resumed] = [run for run in cell_runs(uri, "ddp-killed") if run.data.tags["cell_kind"] == "train"]
    assert resumed.info.run_id == run.info.run_id and resumed.data.metrics["train.resumed_from"] >= 20
    assert resumed.data.tags["retries"].startswith("1/2: trainer died: ")
    history = MlflowClient(uri).get_metric_history(run.info.run_id, "train.loss")
    assert {m.step for m in history} == set(range(20, 401, 20))
