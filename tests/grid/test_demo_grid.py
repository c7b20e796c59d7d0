"""The demo grid runs from any directory, gives the same numbers every time, and shows the paper's findings.

The fast test runs the shrunk demo (`tests.grid.world.shrunk_demo`: the shipped file with its relative paths, small
sizes) twice, from two working directories, and compares every metric. The slow one runs the shipped
`experiments/demo.yaml` itself, given by absolute path from a temporary directory, twice, and checks the paper's
qualitative findings on it (README, "The demo world").
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from grid.cells import expand
from grid.experiment import load_experiment
from grid.summarize import summarize
from slam.config import DataConfig
from slam.data import load_dataset
from slam.features import audio_key
from slam.metrics import WER_THRESHOLD
from tests.grid.world import DEMO, FEATURE_COUNTS, SHRUNK_SIZES, cell_runs, repeatable, shrunk_demo, slamgrid_run

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_runs_from_any_directory_and_twice_gives_identical_metrics(tmp_path, monkeypatch):
    path = shrunk_demo(tmp_path / "experiment")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # 1. From a directory unrelated to the file, the file given by absolute path, its feature cache empty.
    first = _run(path, f"sqlite:///{tmp_path}/first.db", elsewhere, monkeypatch)
    # 2. From the file's own directory, the file given by a relative path, on the first run's feature cache.
    cache = ["--feature-cache", str(elsewhere / "out" / "features")]
    second = _run(Path("demo.yaml"), f"sqlite:///{tmp_path}/second.db", path.parent, monkeypatch, cache)
    assert first.keys() == second.keys() == {cell.id for cell in expand(load_experiment(path))}
    # The first run encoded each utterance it read once (train, dev and test are distinct), the second none.
    utterances = {
        audio_key(sample.audio)
        for name, size in SHRUNK_SIZES.items()
        for sample in load_dataset(DataConfig("manifest", str(DEMO / f"{name}.jsonl"), max_samples=size))
    }
    assert len(utterances) == sum(SHRUNK_SIZES.values())
    assert _total(first, "features.encoded") == len(utterances)
    assert _total(second, "features.encoded") == 0
    assert _total(second, "features.cached") == _total(first, "features.encoded") + _total(first, "features.cached")
    assert _results(first) == _results(second)
    first = _results(first)
    # The same numbers, not the same empty ones: every cell logged, the evaluations scored.
    assert all(first.values())
    # ASR: the baseline, 4 prune cells of study asr and the text-path one of asr-text-path.
    assert sum(key == "test.wer" for metrics in first.values() for key in metrics) == 1 + 4 + 1


@pytest.mark.slow
def test_the_shipped_demo_shows_the_papers_findings_every_time(tmp_path, monkeypatch):
    path = REPO / "experiments" / "demo.yaml"
    uri = f"sqlite:///{tmp_path}/first.db"
    # Each run in a directory of its own: a shared working directory would hand the second the first's checkpoints.
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = _results(_run(path, uri, tmp_path / "first", monkeypatch))
    assert _results(_run(path, f"sqlite:///{tmp_path}/second.db", tmp_path / "second", monkeypatch)) == first
    studies = {study["study"]: study for study in summarize(path, tracking_uri=uri, log=False).studies}
    results = {(r["path_label"], r["healing"]): r for r in studies["asr"]["results"]}
    healed, unhealed = results[("speech-asr", "decoder+projector")], results[("speech-asr", "none")]
    for with_healing, without in zip(healed["rows"], unhealed["rows"], strict=True):
        # (a) decoder+projector healing is at least as good as no healing at every depth.
        assert with_healing["n"] == without["n"]
        assert with_healing["delta"]["test"] <= without["delta"]["test"], with_healing["n"]
    # (c) with it, at least one depth is removable (delta_WER <= 0.25).
    assert healed["removable_fraction"] >= 1 / 8
    assert any(row["delta"]["test"] <= WER_THRESHOLD for row in healed["rows"])
    # (b) the text- and speech-derived paths pick the same block at most depths.
    (pair,) = studies["asr-text-path"]["agreement"]
    assert (pair["text"], pair["speech"]) == ("text-asr", "speech-asr")
    assert len(pair["same_block"]) > len(pair["depths"]) / 2


def _run(path: Path, uri: str, cwd: Path, monkeypatch, options: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """`slamgrid run` of `path` from `cwd` on a fresh local Ray: every cell run's metrics by cell id (those that
    differ between two runs by nature left out, `tests.grid.world.repeatable`)."""
    monkeypatch.chdir(cwd)
    slamgrid_run(path, uri, cwd / "out", options=options)
    name = "demo"
    runs = cell_runs(uri, name)
    assert all(run.info.status == "FINISHED" for run in runs)
    metrics = {}
    for run in runs:
        values = repeatable(run.data.metrics)
        assert all(not math.isnan(value) for value in values.values())
        metrics[run.data.tags["cell_id"]] = values
    return metrics


def _results(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The metrics without what the feature cache held (what encoding cost), which results do not depend on."""
    return {cell: {k: v for k, v in values.items() if k not in FEATURE_COUNTS} for cell, values in metrics.items()}


def _total(metrics: dict[str, dict[str, float]], key: str) -> float:
    return sum(values.get(key, 0) for values in metrics.values())
