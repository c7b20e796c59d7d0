"""The tiny world the grid's runner tests run cells in: backbones, noise utterances, manifests, experiment files.

A 4-layer Qwen2-shaped LM with its own tokenizer, a tiny WavLM, and 8 noise utterances of 0.3-0.5 s with
transcripts and (word-reversed) translations; `train.jsonl` holds all 8, `dev.jsonl` the first 4, `test.jsonl`
the last 4.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray
import soundfile as sf
import yaml
from mlflow.tracking import MlflowClient

from grid.cli import main
from grid.runner import RunReport, run_experiment
from slam.tiny import build_tiny_lm, build_tiny_wavlm

TEXTS = ["the river ran cold", "she opened the window", "a small boat", "seven birds", "a long letter",
         "the old bridge", "morning air", "his brother"]  # fmt: skip
DEMO = Path(__file__).resolve().parents[2] / "experiments" / "demo"
"""The shipped demo world."""
LAYERS = 4
UNREPEATABLE = ("wall_seconds", "peak_memory_mb", "_per_s", "decode_seconds", "encode_seconds")
"""Endings of the metrics that differ between two runs of the same cells by nature: time, throughput, memory."""
FEATURE_COUNTS = ("features.encoded", "features.cached")
"""What a cell's encoding cost (`grid.stages.log_encoder_use`): depends on what the feature cache held, not results."""
TRAIN = {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 2}
"""The experiments' default training: 4 steps of 2 utterances."""


def build_world(root: Path) -> Path:
    """Write the world under `root` (`lm/`, `encoder/`, `audio/`, manifests) and return `root`."""
    build_tiny_lm(root / "lm", TEXTS + [" ".join(reversed(t.split())) for t in TEXTS], layers=LAYERS, hidden=32)
    build_tiny_wavlm(root / "encoder")
    rng = np.random.default_rng(0)
    (root / "audio").mkdir()
    lines = []
    for i, text in enumerate(TEXTS):
        seconds = 0.3 + 0.2 * i / (len(TEXTS) - 1)
        sf.write(root / "audio" / f"{i}.flac", 0.1 * rng.standard_normal(int(16_000 * seconds)), 16_000)
        record = {
            "id": f"u{i}",
            "audio": f"audio/{i}.flac",
            "text": text,
            "translation": " ".join(reversed(text.split())),
        }
        lines.append(json.dumps(record))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "dev.jsonl").write_text("\n".join(lines[:4]) + "\n")
    (root / "test.jsonl").write_text("\n".join(lines[4:]) + "\n")
    return root


def write_experiment(
    root: Path,
    name: str,
    studies: list[dict],
    dev: str = "dev.jsonl",
    train: dict | None = None,
    defaults: dict | None = None,
    ast_dev: str | None = None,
) -> Path:
    """An experiment file `root/{name}.yaml` on the world's model `tiny` and tasks `asr` and `ast`.

    Args:
        root: The world.
        name: The experiment's name.
        studies: Its studies.
        dev: Manifest of the tasks' dev sets.
        train: The training config; None: `TRAIN`.
        defaults: More `defaults` keys (e.g. `train_workers`).
        ast_dev: Manifest of the AST task's dev set instead of `dev`.

    Returns:
        The file.
    """

    def data(file: str) -> dict:
        return {"source": "manifest", "path": str(root / file)}

    def task(kind: str, prompt: str, dev: str) -> dict:
        return {"task": kind, "prompt": prompt, "train": data("train.jsonl"), "dev": {"dev": data(dev)},
                "eval": {"test": data("test.jsonl")}}  # fmt: skip

    experiment = {
        "name": name,
        "defaults": {
            "projector": {"stack": 5, "hidden": 16},
            "train": train or TRAIN,
            "heal": {"lora_rank": 4, "lora_alpha": 4},
            "heal_train": {"steps": 2},
            "decode": {"batch_size": 4, "max_new_tokens": 4},
            "distance": {"batch_size": 4, "max_samples": 4},
            "seed": 0,
            **(defaults or {}),
        },
        "models": {
            "tiny": {
                "encoder": {"name": str(root / "encoder"), "kind": "wavlm"},
                "decoder": {"name": str(root / "lm")},
                "layers": LAYERS,
            }
        },
        "tasks": {
            "asr": task("asr", "Transcribe speech to text.", dev),
            "ast": task("ast", "Translate speech.", ast_dev or dev),
        },
        "studies": studies,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return path


SHRUNK_SIZES = {"train": 8, "dev": 4, "test": 6}
"""The utterances `shrunk_demo` takes of each shipped manifest (the first ones)."""


def shrunk_demo(root: Path) -> Path:
    """`experiments/demo.yaml` shrunk, written to `root/demo.yaml` beside a link `root/demo` to the shipped world.

    Everything is as shipped (backbones, corpus, studies, prompts, relative paths) but the sizes: 20 training steps,
    3 healing steps, 8 training, 4 dev and 6 test utterances, depths 2 and 3 (ASR) and 3 (AST). Its `./demo/...`
    paths resolve against `root`, through the link.
    """
    doc = yaml.safe_load((DEMO.parent / "demo.yaml").read_text())
    doc["defaults"]["train"].update(steps=20, log_every=10, checkpoint_every=10)
    doc["defaults"]["heal_train"].update(steps=3)
    doc["defaults"]["distance"].update(max_samples=4)
    sizes = SHRUNK_SIZES
    for task in doc["tasks"].values():
        task["train"] = {**task["train"], "max_samples": sizes["train"]}
        for group in ("dev", "eval"):
            for name, data in task[group].items():
                task[group][name] = {**data, "max_samples": sizes[name]}
    doc["studies"][0]["depths"] = [2, 3]
    doc["studies"][1]["depths"] = [3]
    root.mkdir(parents=True, exist_ok=True)
    (root / "demo").symlink_to(DEMO, target_is_directory=True)
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_grid(root: Path, name: str, studies: list[dict], gpus: int = 0) -> tuple[Path, str, RunReport]:
    """A grid of `studies` on the world in `root` (`write_experiment`), run to the end on a fresh local Ray of 2 CPUs.

    Returns:
        The experiment file, its tracking URI (`root/mlflow.db`) and the run's report.
    """
    path = write_experiment(root, name, studies)
    uri = f"sqlite:///{root}/mlflow.db"
    ray.init(address="local", num_cpus=2, num_gpus=gpus, include_dashboard=False)
    try:
        report = run_experiment(path, tracking_uri=uri, workdir=root / "out")
    finally:
        ray.shutdown()
    assert report.status.all_finished, report.counts
    return path, uri, report


def slamgrid_run(path: Path, uri: str, workdir: Path, gpus: int = 0, options: Sequence[str] = ()) -> str:
    """`slamgrid run path` on a fresh local Ray of 2 CPUs (and `gpus` logical GPUs); its stdout, once it exited 0.

    `options` are more `slamgrid run` options, e.g. `--feature-cache DIR`.
    """
    ray.init(address="local", num_cpus=2, num_gpus=gpus, include_dashboard=False)
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["run", str(path), "--tracking-uri", uri, "--workdir", str(workdir), *options])
    finally:
        ray.shutdown()
    assert code == 0, out.getvalue()
    return out.getvalue()


def repeatable(metrics: dict[str, float], also: tuple[str, ...] = ()) -> dict[str, float]:
    """`metrics` without those two runs of the same cells need not agree on (`UNREPEATABLE`, and `also`)."""
    return {key: value for key, value in metrics.items() if not key.endswith(UNREPEATABLE + also)}


def cell_runs(uri: str, experiment: str) -> list:
    """Every cell run of an experiment (the parent run left out)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.cell_id LIKE '%'", max_results=1000)
