"""The grid runner: every cell once on Ray workers that keep their backbones, resume from the store, failures that
block their dependents only, summaries that agree with the slam functions, and the `run` / `status` commands.

One tiny world (a 4-layer Qwen2-shaped LM, a tiny WavLM, 8 noise utterances) and one local Ray with 2 CPUs and 2
logical GPUs serve the whole module; the grid's cells run for real, only their sizes are tiny.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient

from grid.cells import Cell, expand
from grid.cli import main
from grid.experiment import load_experiment
from grid.lease import DriverLease
from grid.provenance import COMMIT_TAG, DEVICE_TAG, code_tags, describe
from grid.runner import RunReport, run_experiment
from grid.schedule import backbone_of, route
from grid.stages import Backbones
from grid.status import experiment_status
from grid.tracking import GridStore
from slam.config import DecoderConfig, DistanceConfig, EncoderConfig, ProjectorConfig, SpeechLLMConfig
from slam.metrics import bisect_depth, relative_change, removable_fraction, within_threshold
from slam.model import load_decoder
from slam.redundancy import SPEECH_TOKEN, TEXT_TOKEN, text_layer_distances
from slam.tiny import build_tiny_lm
from tests.grid.world import FEATURE_COUNTS, LAYERS, TEXTS, TRAIN, build_world, cell_runs, repeatable, write_experiment

STUDIES = [
    {"name": "asr", "task": "asr", "models": ["tiny"], "paths": [{"source": "speech"}], "depths": [2],
     "healing": ["none", "decoder+projector"]},
    {"name": "ast", "task": "ast", "models": ["tiny"], "paths": [{"source": "speech"}], "depths": [2],
     "healing": ["none", "decoder+projector"]},
    {"name": "text", "task": "asr", "models": ["tiny"], "paths": [{"source": "text"}], "depths": []},
]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Tiny backbones, 8 noise utterances of 0.3-0.5 s with texts and translations, and manifests."""
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def first_run(world, ray_cluster) -> tuple[Path, str, RunReport]:
    """The whole grid, run once."""
    path = write_experiment(world, "runner", STUDIES)
    uri = f"sqlite:///{world}/mlflow.db"
    return path, uri, run_experiment(path, tracking_uri=uri, workdir=world / "out")


def test_every_cell_finishes_with_exactly_one_run(first_run):
    path, uri, report = first_run
    cells = expand(load_experiment(path))
    assert [c.kind for c in cells].count("prune") == 4 and len(cells) == 14
    assert report.counts == {"FINISHED": 14}
    assert report.failed == [] and report.started == 14
    runs = cell_runs(uri, "runner")
    assert Counter(run.data.tags["cell_id"] for run in runs) == Counter(c.id for c in cells)
    assert all(run.info.status == "FINISHED" for run in runs)
    train = next(run for run in runs if run.data.tags["cell_kind"] == "train")
    assert train.data.metrics["trainable_params"] > 0 and np.isfinite(train.data.metrics["train.loss"])
    prunes = [run for run in runs if run.data.tags["cell_kind"] == "prune"]
    for run in prunes:
        assert run.data.metrics["removed_layers"] == 1 and run.data.metrics["fraction"] == 1 / LAYERS
        healed = run.data.tags["healing"] != "none"
        assert (run.data.metrics["trainable_params"] > 0) == healed


def test_backbones_are_loaded_once_per_worker_not_per_cell(first_run):
    path, uri, report = first_run
    cells = {c.id: c for c in expand(load_experiment(path))}
    pairs = set()
    for run in cell_runs(uri, "runner"):
        cell = cells[run.data.tags["cell_id"]]
        worker = run.data.tags["worker"]
        if "speech_llm" in cell.config:
            pairs.add((worker, f"encoder:{cell.config['speech_llm']['encoder']['name']}"))
        if backbone_of(cell) is not None:
            pairs.add((worker, f"decoder:{backbone_of(cell)}"))
    assert {(worker, key) for worker, loads in report.worker_loads.items() for key in loads} == pairs
    assert all(count == 1 for loads in report.worker_loads.values() for count in loads.values())
    assert sum(report.loads.values()) == len(pairs) <= 4
    parent = GridStore(uri, "runner").parent_run()
    assert MlflowClient(uri).get_run(parent).data.metrics["backbone_loads"] == len(pairs)


def test_a_second_run_starts_no_cell_and_creates_no_run(first_run, world):
    path, uri, _ = first_run
    before = len(cell_runs(uri, "runner"))
    again = run_experiment(path, tracking_uri=uri, workdir=world / "out")
    assert again.started == 0 and again.worker_loads == {}
    assert again.counts == {"FINISHED": 14}
    assert len(cell_runs(uri, "runner")) == before


def test_the_feature_cache_encodes_each_utterance_once_and_changes_no_result(first_run, tmp_path):
    path, uri, _ = first_run
    cached = cell_runs(uri, "runner")
    # dev and test are among the 8 training utterances: addressed by their audio, each is encoded once in the grid.
    assert sum(run.data.metrics.get("features.encoded", 0) for run in cached) == len(TEXTS)
    speech = [
        run
        for run in cached
        if run.data.tags["cell_kind"] in ("train", "eval", "prune") or run.data.tags.get("path.source") == "speech"
    ]
    assert all(run.data.metrics["features.encoded"] + run.data.metrics["features.cached"] > 0 for run in speech)
    # The same grid without the cache, in a new store: every cell encodes all it reads, and every number is the same.
    off_uri = f"sqlite:///{tmp_path}/off.db"
    report = run_experiment(path, tracking_uri=off_uri, workdir=tmp_path / "out", feature_cache=False)
    assert report.counts == {"FINISHED": 14}
    assert not (tmp_path / "out" / "features").exists()
    uncached = cell_runs(off_uri, "runner")
    assert sum(run.data.metrics.get("features.cached", 0) for run in uncached) == 0
    assert sum(run.data.metrics.get("features.encoded", 0) for run in uncached) > 4 * len(TEXTS)

    def results(runs) -> dict[str, dict[str, float]]:
        return {run.data.tags["cell_id"]: repeatable(run.data.metrics, also=FEATURE_COUNTS) for run in runs}

    assert results(uncached) == results(cached)
    assert sum(key.endswith((".wer", ".bleu")) for metrics in results(cached).values() for key in metrics) == 2 + 4


def test_path_cells_log_the_path_contract(first_run, world):
    _, uri, _ = first_run
    client = MlflowClient(uri)
    paths = [run for run in cell_runs(uri, "runner") if run.data.tags["cell_kind"] == "path"]
    assert sorted(run.data.tags["path.source"] for run in paths) == ["speech", "speech", "text"]
    for run in paths:
        report = GridStore(uri, "runner").load_json_artifact(run.info.run_id, "distance.json")
        assert set(report) == {
            "model", "n_layers", "source", "num_samples", "token", "layout", "convention", "distance", "path"
        }  # fmt: skip
        assert (report["model"], report["n_layers"], report["convention"]) == (str(world / "lm"), LAYERS, "paper")
        token = SPEECH_TOKEN if report["source"] == "speech" else TEXT_TOKEN
        assert report["token"] == run.data.tags["measured_token"] == token
        assert report["layout"] == run.data.tags["layout"]
        assert (report["source"], report["num_samples"]) == (run.data.tags["path.source"], 4)
        distance = np.array(report["distance"])
        np.testing.assert_allclose(distance, distance.T, atol=1e-12)
        assert distance.shape == (LAYERS + 1, LAYERS + 1) and np.all(np.diag(distance) == 0)
        assert [step["n"] for step in report["path"]] == [2, 3]
        for step in report["path"]:
            assert step["removed"] == list(range(step["start"] + 1, step["start"] + step["n"]))
            assert step["distance"] == min(distance[i, i + step["n"]] for i in range(1, LAYERS - step["n"] + 1))
        assert "heatmap.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    text = next(run for run in paths if run.data.tags["path.source"] == "text")
    report = GridStore(uri, "runner").load_json_artifact(text.info.run_id, "distance.json")
    decoder, tokenizer = load_decoder(DecoderConfig(str(world / "lm")))
    direct = text_layer_distances(decoder, tokenizer, TEXTS[:4], DistanceConfig(batch_size=4))
    np.testing.assert_allclose(report["distance"], direct.distance, atol=1e-6)


def test_summaries_equal_the_slam_functions_on_the_logged_metrics(first_run):
    _, uri, _ = first_run
    client = MlflowClient(uri)
    store = GridStore(uri, "runner")
    runs = cell_runs(uri, "runner")
    for study, metric in (("asr", "wer"), ("ast", "bleu")):
        baseline_run = next(r for r in runs if r.data.tags["cell_kind"] == "eval" and r.data.tags["task"] == study)
        baseline = {"test": baseline_run.data.metrics[f"test.{metric}"]}
        summary_run = next(r for r in runs if r.data.tags["cell_kind"] == "summary" and r.data.tags["study"] == study)
        table = store.load_json_artifact(summary_run.info.run_id, "summary.json")
        assert table == store.load_json_artifact(store.parent_run(), f"summaries/{study}.json")
        assert (table["metric"], len(table["results"])) == (metric, 2)
        for healing in ("none", "decoder+projector"):
            pruned = [
                r
                for r in runs
                if r.data.tags["cell_kind"] == "prune"
                and r.data.tags["task"] == study
                and r.data.tags["healing"] == healing
            ]
            scores = {r.data.metrics["fraction"]: {"test": r.data.metrics[f"test.{metric}"]} for r in pruned}
            result = next(row for row in table["results"] if row["healing"] == healing)
            assert result["baseline"] == baseline
            assert [row["scores"] for row in result["rows"]] == list(scores.values())
            # Speed and memory against the baseline's, as logged by both cells.
            base = baseline_run.data.metrics
            assert [row["speedup"] for row in result["rows"]] == [
                {"test": r.data.metrics["test.decode_tokens_per_s"] / base["test.decode_tokens_per_s"]} for r in pruned
            ]
            assert [row["peak_memory_ratio"] for row in result["rows"]] == [
                r.data.metrics["peak_memory_mb"] / base["peak_memory_mb"] for r in pruned
            ]
            key = f"removable_fraction.tiny.speech-{study}.{healing.replace('+', '_')}"
            if baseline["test"] == 0:
                # A random tiny model scores BLEU 0 (its WER is never 0): the relative change is undefined, and the
                # table says so instead of a fraction.
                assert metric == "bleu"
                assert result["note"] == "baseline bleu is 0 on test: the relative change is undefined"
                assert result["removable_fraction"] is None and key not in summary_run.data.metrics
                assert all(row["delta"] == {"test": None} for row in result["rows"])
                continue
            expected = removable_fraction(baseline, scores, metric)
            assert result["removable_fraction"] == expected and result["note"] is None
            assert summary_run.data.metrics[key] == expected
            assert [row["delta"]["test"] for row in result["rows"]] == [
                relative_change(s["test"], baseline["test"]) for s in scores.values()
            ]
    text_summary = next(r for r in runs if r.data.tags["cell_kind"] == "summary" and r.data.tags["study"] == "text")
    table = store.load_json_artifact(text_summary.info.run_id, "summary.json")
    assert table["results"] == [] and [p["source"] for p in table["paths"]] == ["text"]
    assert client.get_run(text_summary.info.run_id).info.status == "FINISHED"


def test_a_missing_local_path_stops_the_run_before_any_cell_naming_file_key_and_path(world, tmp_path, capsys):
    path = write_experiment(world, "missing", STUDIES[:1], dev="nowhere/dev.jsonl")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["run", str(path), "--tracking-uri", uri, "--workdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"slamgrid: error: {path}: tasks.asr.dev.dev.path={str(world / 'nowhere/dev.jsonl')!r}: no such file or "
        f"directory: {world / 'nowhere/dev.jsonl'} (and 1 more)"
    ]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()


def test_a_failed_cell_blocks_its_dependents_and_reruns_in_the_same_run(world, ray_cluster, capsys, tmp_path):
    # A store of its own: in the module's, the training and evaluation it shares with `runner` are finished.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = {**STUDIES[0], "healing": ["none"]}
    path = write_experiment(world, "broken", [study], dev="late-dev.jsonl")
    # The manifest is there (the run checks that before starting anything), the audio it names is not yet.
    (world / "late-dev.jsonl").write_text('{"id": "late", "audio": "audio/late.flac", "text": "late news"}\n')
    argv = ["--tracking-uri", uri]
    assert main(["run", str(path), *argv, "--workdir", str(world / "out")]) == 1
    assert "FAILED" in capsys.readouterr().out

    status = {s.cell.kind: s for s in experiment_status(path, tracking_uri=uri).cells}
    assert {kind: s.state for kind, s in status.items()} == {
        "train": "FINISHED",
        "path": "FAILED",
        "eval": "FINISHED",
        "prune": "BLOCKED",
        "summary": "BLOCKED",
    }
    assert "missing audio file" in status["path"].reason and "late-dev.jsonl line 1" in status["path"].reason
    assert status["prune"].reason == f"dependency path {status['path'].cell.id} is FAILED"
    assert main(["status", str(path), *argv]) == 0
    out = capsys.readouterr().out
    assert f"path {status['path'].cell.id} [" in out and "late-dev.jsonl" in out and "BLOCKED   2" in out

    shutil.copy(world / "dev.jsonl", world / "late-dev.jsonl")
    report = run_experiment(path, tracking_uri=uri, workdir=world / "out")
    assert report.counts == {"FINISHED": 5} and report.started == 3
    runs = cell_runs(uri, "broken")
    assert len(runs) == 5
    rerun = next(run for run in runs if run.data.tags["cell_kind"] == "path")
    assert rerun.info.run_id == status["path"].run_id and "error" not in rerun.data.tags


def test_training_and_healing_skip_bad_audio_under_skip_and_report_it(world, ray_cluster):
    lines = (world / "train.jsonl").read_text().splitlines()
    (world / "audio" / "broken.flac").write_bytes(np.random.default_rng(1).bytes(3000))
    broken = json.dumps({"id": "broken", "audio": "audio/broken.flac", "text": "a broken file", "translation": "x"})
    (world / "train-broken.jsonl").write_text("\n".join([*lines[:3], broken, *lines[3:]]) + "\n")
    study = {**STUDIES[0], "paths": [{"source": "text"}], "depths": [2], "healing": ["decoder+projector"]}
    path = write_experiment(world, "broken-audio", [study])
    experiment = yaml.safe_load(path.read_text())
    experiment["tasks"]["asr"]["train"] = {
        "source": "manifest",
        "path": str(world / "train-broken.jsonl"),
        "on_bad_sample": "skip",
    }
    # 12 samples of 9 in both: every sample is met, the broken one too.
    experiment["defaults"]["train"] = {**experiment["defaults"]["train"], "steps": 6}
    experiment["defaults"]["heal_train"] = {"steps": 6}
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    uri = f"sqlite:///{world}/mlflow.db"

    report = run_experiment(path, tracking_uri=uri, workdir=world / "out")

    assert report.failed == []
    runs = cell_runs(uri, "broken-audio")
    trained = [run for run in runs if run.data.tags["cell_kind"] in ("train", "prune")]
    assert sorted(run.data.tags["cell_kind"] for run in trained) == ["prune", "train"]
    for run in trained:  # the baseline training, and the healing of the prune cell
        assert run.data.metrics["train.skipped"] == 1
        local = MlflowClient(uri).download_artifacts(
            run.info.run_id, "train_skipped.json", str(world / run.info.run_id)
        )
        listed = json.loads(Path(local).read_text())
        assert [where for where, _ in listed] == [
            f"{world / 'train-broken.jsonl'} line 4 ({world / 'audio' / 'broken.flac'})"
        ]
        assert "cannot decode audio" in listed[0][1]


@pytest.mark.slow
def test_without_retries_a_cell_whose_worker_dies_is_failed_and_resumes_from_its_checkpoint(world, ray_cluster):
    uri = f"sqlite:///{world}/mlflow.db"
    study = {**STUDIES[0], "healing": ["none"]}
    path = write_experiment(world, "killed", [study], train={"steps": 1000, "batch_size": 2, "checkpoint_every": 20})
    result: dict[str, RunReport] = {}
    thread = threading.Thread(target=lambda: result.update(first=run_experiment(path, uri, world / "out", retries=0)))
    thread.start()
    deadline = time.monotonic() + 300
    while not list((world / "out" / "killed").glob("*/train/checkpoints/step-*")):
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    [train] = [run for run in cell_runs(uri, "killed") if run.data.tags["cell_kind"] == "train"]
    os.kill(int(train.data.tags["worker"].rpartition(":")[2]), signal.SIGKILL)
    thread.join()

    first = result["first"]
    assert first.counts == {"FAILED": 1, "BLOCKED": 4}
    [(cell, error)] = first.failed
    assert cell == train.data.tags["cell_id"] and error.startswith("worker died: ")
    assert MlflowClient(uri).get_run(train.info.run_id).info.status == "FAILED"
    again = run_experiment(path, uri, world / "out")
    assert again.counts == {"FINISHED": 5}
    [resumed] = [run for run in cell_runs(uri, "killed") if run.data.tags["cell_kind"] == "train"]
    assert resumed.info.run_id == train.info.run_id and resumed.data.metrics["train.resumed_from"] >= 20


def test_status_of_a_store_that_does_not_exist_writes_nothing(world, tmp_path):
    path = write_experiment(world, "runner", STUDIES)
    status = experiment_status(path, tracking_uri=f"sqlite:///{tmp_path}/none.db")
    assert status.counts == {"PENDING": 14} and not (tmp_path / "none.db").exists()


def test_a_bad_experiment_file_is_a_one_line_error(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"slamgrid: error: {tmp_path / 'missing.yaml'}: no such experiment file"


def test_route_prefers_an_idle_worker_that_holds_the_backbone():
    a, b, summary = _cell("a", "train"), _cell("b", "train"), _cell(None, "summary")
    held = {0: frozenset({"a"}), 1: frozenset({"b"}), 2: frozenset()}
    # b's holder is idle: it gets b although a empty worker is listed first; a's holder is busy.
    assert route([a, b], idle=[2, 1], held=held) == [(b, 1), (a, 2)]
    assert route([a, b, summary], idle=[0, 1], held=held) == [(a, 0), (b, 1)]
    assert route([summary, a], idle=[1, 2], held=held) == [(summary, 2), (a, 1)]
    # Slot 3 has no worker yet: a cell loading a decoder starts one there, a summary goes to a running worker.
    assert route([a], idle=[0, 3], held={0: frozenset({"b"})}) == [(a, 3)]
    assert route([summary], idle=[0, 3], held={0: frozenset({"b"})}) == [(summary, 0)]


def test_backbones_load_each_backbone_once_and_give_independent_decoders(world):
    backbones = Backbones()
    cfg = SpeechLLMConfig(
        encoder=EncoderConfig(str(world / "encoder")),
        decoder=DecoderConfig(str(world / "lm")),
        projector=ProjectorConfig(hidden=16),
    )
    first, second = backbones.speech_llm(cfg), backbones.speech_llm(cfg)
    master, _ = backbones.decoder(cfg.decoder)
    assert backbones.loads == {f"encoder:{world / 'encoder'}": 1, f"decoder:{world / 'lm'}": 1}
    assert first.encoder is second.encoder and first.decoder is not second.decoder and first.decoder is not master
    assert backbones.held() == {str(world / "lm")}
    first.decoder.model.layers = first.decoder.model.layers[:1]
    assert len(second.decoder.model.layers) == len(master.model.layers) == LAYERS
    seeded = backbones.speech_llm(cfg, seed=3), backbones.speech_llm(cfg, seed=3)
    assert all(p.equal(q) for p, q in zip(seeded[0].projector.parameters(), seeded[1].projector.parameters()))


def test_backbones_keep_at_most_backbones_per_worker_dropping_the_least_recently_used(world, tmp_path):
    names = [str(world / "lm")]
    for name in ("lm2", "lm3"):
        names.append(str(build_tiny_lm(tmp_path / name, TEXTS, layers=2, hidden=32)))
    backbones = Backbones(backbones_per_worker=2)
    first, second, third = (DecoderConfig(name) for name in names)
    backbones.decoder(first)
    backbones.decoder(second)
    backbones.decoder(first)  # now the most recently used: the third load drops the second, not the first
    backbones.decoder(third)
    assert backbones.held() == {names[0], names[2]}
    backbones.decoder(second)
    assert backbones.held() == {names[2], names[1]}
    assert backbones.loads == {f"decoder:{names[0]}": 1, f"decoder:{names[1]}": 2, f"decoder:{names[2]}": 1}
    with pytest.raises(ValueError, match="backbones_per_worker=0 is not allowed"):
        Backbones(backbones_per_worker=0)


def _cell(decoder: str | None, kind: str) -> Cell:
    config = {"speech_llm": {"decoder": {"name": decoder}}} if decoder else {"study": "s"}
    return Cell(kind, config, ())


def test_a_bisect_study_runs_the_cells_its_search_asks_for_in_waves_and_decides(world, ray_cluster):
    uri = f"sqlite:///{world}/bisect.db"
    study = {**STUDIES[0], "name": "asr-bisect", "depths": [2, 3], "healing": ["none"], "search": "bisect"}
    path = write_experiment(world, "bisect", [study])
    report = run_experiment(path, tracking_uri=uri, workdir=world / "out")
    assert report.status.all_finished
    runs = cell_runs(uri, "bisect")
    prunes = {r.data.tags["cell_id"]: r for r in runs if r.data.tags["cell_kind"] == "prune"}
    [baseline] = [r for r in runs if r.data.tags["cell_kind"] == "eval"]
    # The search replayed on what the cells scored asks for exactly the cells that ran, and decides.
    scores = {int(r.data.metrics["n"]): {"test": r.data.metrics["test.wer"]} for r in prunes.values()}
    base = {"test": baseline.data.metrics["test.wer"]}
    answer, needed = bisect_depth([2, 3], lambda n: within_threshold(base, scores[n], "wer") if n in scores else None)
    assert needed is None and report.started == len(runs)
    sweep = {c.id for c in expand(load_experiment(write_experiment(world, "sweep", [{**study, "search": "sweep"}])))}
    assert set(prunes) <= sweep  # a pruned cell is the same cell whichever asked
    [summary] = [r for r in runs if r.data.tags["cell_kind"] == "summary"]
    table = GridStore(uri, "bisect").load_json_artifact(summary.info.run_id, "summary.json")
    assert table["search"] == "bisect"
    fraction = table["results"][0]["removable_fraction"]
    assert fraction == (0.0 if answer is None else (answer - 1) / LAYERS) or base["test"] == 0
    # Run again: everything is finished, the search asks for nothing new.
    assert run_experiment(path, tracking_uri=uri, workdir=world / "out").started == 0


def test_progress_lines_follow_a_training_step_by_step_as_its_run_records_it(world, ray_cluster, caplog):
    uri = f"sqlite:///{world}/mlflow.db"
    study = {"name": "progress", "task": "asr", "models": ["tiny"], "paths": [{"source": "speech"}], "depths": []}
    train = {**TRAIN, "steps": 60, "log_every": 4, "checkpoint_every": 60}
    path = write_experiment(world, "progress", [study], defaults={"train": train})
    with caplog.at_level(logging.INFO, logger="grid.progress"):
        report = run_experiment(path, tracking_uri=uri, workdir=world / "out", progress="plain", progress_interval=0.05)
    assert report.counts == {"FINISHED": 3}  # train, path, summary
    lines = [record.getMessage() for record in caplog.records if record.name == "grid.progress"]
    run = next(run for run in cell_runs(uri, "progress") if run.data.tags["cell_kind"] == "train")
    losses = {m.step: m.value for m in MlflowClient(uri).get_metric_history(run.info.run_id, "train.loss")}
    prefix = f"train {run.data.tags['cell_id'][:8]} tiny/asr: step "
    seen = []
    for line in lines:
        if line.startswith(prefix):
            step = int(line.removeprefix(prefix).split("/")[0])
            assert line.startswith(f"{prefix}{step}/60 ({100 * step / 60:.0f}%), loss {losses[step]:.4f}, "), line
            seen.append(step)
    # Read while it trained: several steps, each one the run had recorded, in order.
    assert len(seen) >= 2 and seen == sorted(set(seen)) and all(step % 4 == 0 for step in seen), lines
    assert lines[-1].startswith("progress: 3/3 finished, 0 running; "), lines


def test_every_run_records_its_code_version_package_versions_and_device(first_run, capsys):
    path, uri, _ = first_run
    code = code_tags()
    assert code[COMMIT_TAG] != "unknown"  # the tests run from a git checkout
    runs = cell_runs(uri, "runner")
    for run in runs:
        tags = run.data.tags
        assert {key: tags[key] for key in code if key != "versions.torch"} == {
            key: value for key, value in code.items() if key != "versions.torch"
        }, tags["cell_kind"]
        # The worker's torch, with its build: 2.14.1+cu130 and 2.13.0+cpu compute with other kernels.
        assert tags["versions.torch"] == torch.__version__ and tags[DEVICE_TAG].startswith("cpu (")
    # `status` warns when finished cells came from another code version, naming it and counting its cells.
    client = MlflowClient(uri)
    moved = runs[:2]
    for run in moved:
        client.set_tag(run.info.run_id, COMMIT_TAG, "0123456789abcdef")
    try:
        assert main(["status", str(path), "--tracking-uri", uri]) == 0
        lines = capsys.readouterr().out.splitlines()
        warning = [line for line in lines if line.startswith("warning:")]
        assert warning == [
            f"warning: 2 finished cell(s) came from another code version than this checkout's ({describe(code)}): "
            f"{describe({**code, COMMIT_TAG: '0123456789abcdef'})} (2); their results stand as they are (a rerun "
            "does not redo them)"
        ]
    finally:
        for run in moved:
            client.set_tag(run.info.run_id, COMMIT_TAG, code[COMMIT_TAG])
    assert main(["status", str(path), "--tracking-uri", uri]) == 0
    assert "warning:" not in capsys.readouterr().out


def test_a_cell_finished_under_another_file_is_done_for_every_file_that_has_it(first_run, world):
    _, uri, _ = first_run
    more = {"name": "asr-more", "task": "asr", "models": ["tiny"], "paths": [{"source": "speech"}], "depths": [2],
            "healing": ["projector"]}  # fmt: skip
    path = write_experiment(world, "runner-again", [STUDIES[0], more])
    report = run_experiment(path, tracking_uri=uri, workdir=world / "out")
    # Only what `runner` did not run: the projector-healed cell and the new study's summary.
    cells = expand(load_experiment(path))
    assert report.counts == {"FINISHED": len(cells)} and report.started == 2
    client = MlflowClient(uri)
    everywhere = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(everywhere, "tags.cell_id LIKE '%'", max_results=5000)
    assert Counter(run.data.tags["cell_id"] for run in runs if run.data.tags["cell_id"] in {c.id for c in cells}) == (
        Counter(c.id for c in cells)
    )  # one run per cell, in whichever experiment ran it
    again = client.get_experiment_by_name("runner-again").experiment_id
    assert sorted(run.data.tags["cell_kind"] for run in runs if run.info.experiment_id == again) == ["prune", "summary"]
    assert experiment_status(path, tracking_uri=uri).all_finished


def test_a_cell_another_file_s_live_driver_runs_is_left_to_it(world, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = {**STUDIES[0], "healing": ["none"]}
    first, second = (write_experiment(world, name, [study]) for name in ("busy-a", "busy-b"))
    train = next(cell for cell in expand(load_experiment(first)) if cell.kind == "train")
    owner = GridStore(uri, "busy-a")
    lease = DriverLease(owner.client, owner.parent_run(), "experiment 'busy-a'")
    lease.acquire()  # this process is busy-a's live driver, and it is training
    try:
        owner.start_cell(train)
        report = run_experiment(second, tracking_uri=uri, workdir=tmp_path / "out")
        assert report.started == 0  # the training and everything after it wait for busy-a
        states = {s.cell.kind: s.state for s in report.status.cells}
        assert states == {"train": "RUNNING", "path": "PENDING", "eval": "PENDING", "prune": "PENDING",
                          "summary": "PENDING"}  # fmt: skip
        assert {s.cell.kind: s.state for s in experiment_status(second, tracking_uri=uri).cells}["train"] == "RUNNING"
    finally:
        lease.release()
    # Its driver gone, the training is INTERRUPTED, for either file: the next run of either continues it.
    assert {s.cell.kind: s.state for s in experiment_status(second, tracking_uri=uri).cells}["train"] == "INTERRUPTED"
