"""The frozen-encoder feature cache on a whole grid: encoder calls, identical results, wall time with and without.

The experiment (default: the shipped demo, `experiments/demo.yaml`) runs three times as `slamgrid run` in a
subprocess on a new local Ray, each time in a new MLflow store and working directory, so that only the feature
cache carries over:

1. without the cache (`--feature-cache off`): every cell encodes every utterance it reads, every time;
2. with an empty cache: the first grid, which encodes each utterance once;
3. on the cache the second run filled: a second grid over the same data, which encodes nothing.

Printed per run: wall time, the utterances run through the encoder (`features.encoded`, summed over the cells)
and read from the cache (`features.cached`), and the encoders' time in evaluation (`{set}.encode_seconds`); the
distinct utterances the grid reads (the cache's entries); whether every result metric (WER, BLEU, losses,
distances: all but times, throughputs, memory and the encoding counts) is identical across the three runs; the
wall-time ratios. One run each, in this order: a grid of the demo's size takes about 12 minutes on 2 cores, so the
machine's drift (up to 2x) is not averaged out the way the smaller benchmarks do it. The last line: the first grid's
wall time with the cache over without.

    python benchmarks/feature_cache.py [experiments/demo.yaml]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from grid.experiment import load_experiment

REPO = Path(__file__).resolve().parents[1]
_NOT_RESULTS = ("wall_seconds", "peak_memory_mb", "_per_s", "decode_seconds", "encode_seconds")
"""Endings of metrics that differ between two runs of the same cells by nature: time, throughput, memory."""
_COUNTS = ("features.encoded", "features.cached")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", default=str(REPO / "experiments" / "demo.yaml"))
    args = parser.parse_args()
    path = Path(args.experiment).resolve()
    name = load_experiment(path).name
    with tempfile.TemporaryDirectory(prefix="feature-cache-") as scratch:
        root = Path(scratch)
        cache = root / "features"
        runs = {}
        for label, option in (("without the cache", "off"), ("empty cache", str(cache)), ("filled cache", str(cache))):
            runs[label] = _grid(path, name, root / f"run-{len(runs) + 1}", option)
            seconds, metrics = runs[label]
            encoded, cached = (sum(m.get(key, 0) for m in metrics.values()) for key in _COUNTS)
            encode_seconds = sum(v for m in metrics.values() for k, v in m.items() if k.endswith(".encode_seconds"))
            print(
                f"{label:>17}: {seconds:7.1f} s wall, {len(metrics)} cells, encoder ran on {encoded:.0f} utterances, "
                f"{cached:.0f} read from the cache, evaluation encoding {encode_seconds:.1f} s"
            )
        entries = sum(1 for _ in cache.rglob("*.npy"))
        print(f"distinct utterances the grid reads (cache entries): {entries}")
        results = [_results(metrics) for _, metrics in runs.values()]
        scores = sum(key.endswith((".wer", ".bleu")) for cell in results[0].values() for key in cell)
        same = all(r == results[0] for r in results[1:])
        print(f"every result metric identical in the three runs ({scores} WER/BLEU scores among them): {same}")
        without, cold, warm = (seconds for seconds, _ in runs.values())
        print(f"wall time ratio, second grid on the filled cache over without: {warm / without:.3f}")
        print(f"wall time ratio, first grid with the cache over without: {cold / without:.3f}")


def _grid(path: Path, name: str, directory: Path, feature_cache: str) -> tuple[float, dict[str, dict[str, float]]]:
    """Run the grid once from `directory` (its own store and workdir); its wall time and each cell's metrics."""
    directory.mkdir()
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    command = [sys.executable, "-m", "grid", "run", str(path), "--tracking-uri", uri]
    command += ["--workdir", str(directory / "out"), "--feature-cache", feature_cache, "--address", "local"]
    log = directory / "slamgrid.log"
    began = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(command, cwd=directory, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - began
    if done.returncode != 0:
        sys.exit(f"slamgrid run exited {done.returncode}:\n{log.read_text()[-4000:]}")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], "tags.cell_id LIKE '%'", max_results=10_000)
    return seconds, {run.data.tags["cell_id"]: dict(run.data.metrics) for run in runs}


def _results(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Every cell's metrics but those that differ between two runs by nature, or by what the cache held."""
    return {
        cell: {k: v for k, v in values.items() if not k.endswith(_NOT_RESULTS) and k not in _COUNTS}
        for cell, values in metrics.items()
    }


if __name__ == "__main__":
    main()
