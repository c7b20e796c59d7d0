"""What an experiment file will cost before it runs: its cells by kind and model, what the store already holds,
and an estimate of the slot-hours (GPU-hours on GPUs) left to spend. `slamgrid plan EXP` prints it.

Nothing runs and nothing is written. Each cell's time is its work times a per-backbone timing (`Timing`), which
comes from one of three places, in this order:

1. configured: a YAML file (`--timings FILE`) with, per decoder (its name or the experiment's model name),
   `step_s` (one optimiser step at `batch_size` samples per process), `utterance_s` (greedy decoding of one
   evaluation utterance), `forward_s` (one sample's forward pass for the distance matrix) and `encoder_s` (one
   utterance through the frozen encoder, once per utterance thanks to the feature cache);
2. measured on this machine (`--measure`), for models that are local directories (the demo's): a few real
   training steps at the cell's batch size, decoding and forward passes of a few utterances, through the same
   `slam` functions the cells call; the encoder is timed inside them (uncached), so `encoder_s` is 0;
3. derived from the model's size, for an H100 (`derived_timing`): 4·N·T FLOPs per training sample (forward and
   backward through a frozen decoder of N parameters computing, T tokens per sample), 2·N·T per forward pass,
   at `UTILISATION` of the bf16 dense peak; greedy decoding reads the weights once per generated token for the
   whole decode batch, at `BANDWIDTH_USE` of the memory bandwidth. N comes from the decoder's `config.json` (a
   local directory) or from `HUB_DECODERS` (the paper's six backbones).

A cell's time: a training `steps x step_s` on each of its `train_workers` slots, plus its distinct utterances
through the encoder; a path cell its dev samples' forward passes; an evaluation its utterances' decoding; a pruned
cell its healing steps (at its batch size, relative to the training's) and its decoding, both scaled by the share
of decoder layers it keeps; a summary nothing. Data set sizes come from local manifests (their lines) or from
`HUB_SETS` (the paper's public sets), capped by `max_samples`; a set of unknown size counts 0 and is named in the
plan. A `search: bisect` study runs at most ceil(log2(k + 1)) of its k depths per (model, path, healing), which
ones depends on the results: the plan counts that many and costs them as the shallowest (dearest) ones, so its
count and hours are upper bounds there.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from grid.cells import KINDS, Cell, expand
from grid.experiment import Experiment, is_local_path, load_experiment, resolve_paths
from grid.tracking import GridStore, absolute_uri, store_has_experiment
from grid.tracking import tracking_uri as resolve_tracking_uri
from slam.errors import BadInputError

H100_BF16_FLOPS = 989e12
"""Dense bf16 tensor-core peak of an H100 SXM, FLOP/s."""
H100_BANDWIDTH = 3.35e12
"""HBM3 bandwidth of an H100 SXM, bytes/s."""
UTILISATION = 0.4
"""Share of the FLOP peak a training step or a prefill reaches (large matmuls, short sequences)."""
BANDWIDTH_USE = 0.6
"""Share of the memory bandwidth greedy decoding reaches."""
SPEECH_SECONDS = 12.3
"""Mean utterance length assumed for derived timings: LibriSpeech 960 h's (its train set's mean is 12.3 s)."""
PROMPT_TOKENS = 10
"""Prompt tokens (with BOS) assumed per sample."""
TARGET_TOKENS = 45
"""Target tokens assumed per utterance (LibriSpeech's mean transcript, 33 words, in BPE tokens), also decoded."""
HUB_DECODERS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-1.5B": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
                          "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                          "vocab_size": 151936, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-3B": {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008,
                        "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                        "vocab_size": 151936, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-7B": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "vocab_size": 152064, "tie_word_embeddings": False},
    "meta-llama/Llama-3.2-1B": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                                "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                                "vocab_size": 128256, "tie_word_embeddings": True},
    "meta-llama/Llama-3.2-3B": {"model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192,
                                "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
                                "vocab_size": 128256, "tie_word_embeddings": True},
    "meta-llama/Llama-3.1-8B": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                "vocab_size": 128256, "tie_word_embeddings": False},
}  # fmt: skip
"""The `config.json` fields that size the paper's decoders (from their Hugging Face model cards)."""
HUB_ENCODERS: dict[str, tuple[float, float]] = {
    "microsoft/wavlm-large": (315e6, 50.0),
    "openai/whisper-large-v3": (635e6, 1500 / SPEECH_SECONDS),  # always a 30 s window: 1,500 frames
}
"""Encoder parameters and frames per second of speech (Whisper's as its fixed 1,500 frames per utterance)."""
HUB_SETS: dict[tuple[str, str, str], int] = {
    ("librispeech", "all", "train.clean.100+train.clean.360+train.other.500"): 281_241,
    ("librispeech", "all", "validation.clean"): 2_703,
    ("librispeech", "all", "validation.other"): 2_864,
    ("librispeech", "all", "test.clean"): 2_620,
    ("librispeech", "all", "test.other"): 2_939,
    ("covost2", "en_de", "train"): 289_430,
    ("covost2", "en_de", "validation"): 15_531,
    ("covost2", "en_de", "test"): 15_531,
    ("covost2", "fr_en", "train"): 207_374,
    ("covost2", "fr_en", "validation"): 14_760,
    ("covost2", "fr_en", "test"): 14_760,
}
"""Utterances of the paper's public sets by (source, name, split) (LibriSpeech's and CoVoST 2's papers)."""
TIMING_FIELDS = ("step_s", "utterance_s", "forward_s", "encoder_s")
_ALL = "-"  # the model column of cells of no one model (summaries)


@dataclass(frozen=True)
class Timing:
    """Seconds one slot (a GPU, or a CPU share) spends on each unit of work of one backbone."""

    step_s: float
    """One optimiser step at `batch_size` samples per process."""
    batch_size: int
    """The per-process batch `step_s` was taken at; other batch sizes scale linearly."""
    utterance_s: float
    """Greedy decoding of one evaluation utterance, by the unpruned model."""
    forward_s: float
    """One sample's forward pass for the distance matrix."""
    encoder_s: float
    """One utterance through the frozen encoder (0 when the other timings include it)."""
    how: str
    """Where the numbers come from: configured, measured or derived, and on what."""


@dataclass(frozen=True)
class PlanRow:
    """The cells of one (model, kind)."""

    model: str
    kind: str
    cells: int
    finished: int
    hours: float
    """Slot-hours of the cells not yet finished."""
    bound: bool = False
    """The count is an upper bound (a bisect search's)."""


@dataclass
class Plan:
    """An experiment file's cells, what the store holds of them, and the slot-hours left."""

    experiment: str
    uri: str
    rows: list[PlanRow]
    timings: dict[str, Timing]
    """Per model (the experiment's name)."""
    unknown_sets: list[str] = field(default_factory=list)
    """Data sets of unknown size, counted as 0 utterances."""
    bisect_studies: list[str] = field(default_factory=list)

    @property
    def hours(self) -> float:
        """Slot-hours left to run."""
        return sum(row.hours for row in self.rows)

    def counts(self) -> dict[str, int]:
        """Cells per kind (bounds included), every kind."""
        counts: Counter[str] = Counter()
        for row in self.rows:
            counts[row.kind] += row.cells
        return {kind: counts[kind] for kind in KINDS}

    def text(self) -> str:
        """The plan as `slamgrid plan` prints it."""
        total = sum(row.cells for row in self.rows)
        finished = sum(row.finished for row in self.rows)
        bound = any(row.bound for row in self.rows)
        at_most = "at most " if bound else ""
        lines = [f"{self.experiment}: {at_most}{total} cells, {finished} finished in {self.uri}", ""]
        header = ["model", "kind", "cells", "finished", "slot-hours left"]
        table = [
            [row.model, row.kind, f"{'<=' if row.bound else ''}{row.cells}", str(row.finished), _hours(row.hours)]
            for row in self.rows
        ]
        kinds = self.counts()
        table.append(["all", "", f"{'<=' if bound else ''}{total}", str(finished), _hours(self.hours)])
        lines.append(_aligned(header, table))
        lines.append("")
        lines.append("cells per kind: " + ", ".join(f"{kind} {count}" for kind, count in kinds.items()))
        lines.append(
            f"estimate: {at_most}{_hours(self.hours)} slot-hours left (a slot is one GPU, or a CPU share without "
            "GPUs; a DDP training holds train_workers slots)"
        )
        lines.append("timings (seconds per slot):")
        for model, timing in self.timings.items():
            lines.append(
                f"  {model}: step {timing.step_s:.3g} s at batch {timing.batch_size}, decoding {timing.utterance_s:.3g}"
                f" s/utterance, forward {timing.forward_s:.3g} s/sample, encoder {timing.encoder_s:.3g} s/utterance;"
                f" {timing.how}"
            )
        for study in self.bisect_studies:
            lines.append(
                f"study {study} searches its depths (bisect): its pruned cells are counted as ceil(log2(k + 1)) per "
                "(model, path, healing), the shallowest, so counts and hours are upper bounds"
            )
        if self.unknown_sets:
            lines.append("of unknown size, counted as 0 utterances: " + ", ".join(self.unknown_sets))
        return "\n".join(lines)


def plan_experiment(
    path: str | Path,
    tracking_uri: str | None = None,
    timings: str | Path | None = None,
    measure: bool = False,
) -> Plan:
    """The cells of an experiment file, those finished in the store, and the slot-hours left; runs nothing.

    Args:
        path: The experiment file.
        tracking_uri: MLflow tracking URI; None: `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db`. A store that
            does not exist (or lacks the experiment) is not created: nothing is finished.
        timings: A YAML file of timings per decoder (see the module's docstring); they win over the others.
        measure: Measure the timings of models in local directories on this machine (loads them: seconds to
            minutes); without it, and without a configured timing, timings are derived from model sizes.

    Returns:
        The plan.

    Raises:
        BadInputError: The experiment or timings file is wrong, or a model's size cannot be found.
    """
    exp = load_experiment(path)
    uri = absolute_uri(resolve_tracking_uri(tracking_uri))
    results: dict[str, dict[str, float]] = {}
    if store_has_experiment(uri, exp.name):
        results = GridStore(uri, exp.name).results()
    cells, bounded = _bounded(exp, results)
    trains = {cell.id: cell.config for cell in cells if cell.kind == "train"}
    configured = read_timings(Path(timings)) if timings is not None else {}
    per_model: dict[str, Timing] = {}
    unknown: list[str] = []
    hours: defaultdict[tuple[str, str], float] = defaultdict(float)
    counts: Counter[tuple[str, str]] = Counter()
    finished: Counter[tuple[str, str]] = Counter()
    for cell in cells:
        model = cell.tags.get("model", _ALL)
        key = (model, cell.kind)
        counts[key] += 1
        if cell.id in results:
            finished[key] += 1
            continue
        if cell.kind == "summary":
            continue
        if model not in per_model:
            per_model[model] = _timing(exp, cell, trains, configured, measure)
        hours[key] += cell_seconds(cell, per_model[model], _set_sizes(exp, cell, unknown)) / 3600
    rows = [
        PlanRow(
            model,
            kind,
            counts[(model, kind)],
            finished[(model, kind)],
            hours[(model, kind)],
            bound=(model, kind) in bounded,
        )  # fmt: skip
        for model, kind in sorted(counts, key=lambda key: (KINDS.index(key[1]), key[0]))
    ]
    bisects = [study.name for study in exp.studies if study.search == "bisect"]
    return Plan(exp.name, uri, rows, per_model, sorted(set(unknown)), bisects)


def cell_seconds(cell: Cell, timing: Timing, sizes: Mapping[str, int]) -> float:
    """Slot-seconds a cell takes: see the module's docstring.

    Args:
        cell: A cell of `expand`.
        timing: Its backbone's timing.
        sizes: Utterances of each data set the cell reads, by the config key naming it (`data`, `dev.NAME`,
            `eval.NAME`), capped by their `max_samples`.

    Returns:
        Seconds on one slot, summed over the slots the cell holds.
    """
    config = cell.config
    if cell.kind == "train":
        train = config["train"]
        workers = int(config.get("train_workers", 1))
        per_step = timing.step_s * train["batch_size"] / timing.batch_size
        encoded = min(train["steps"] * train["batch_size"] * workers, sizes.get("data", 0))
        return train["steps"] * per_step * workers + encoded * timing.encoder_s
    evaluated = sum(count for key, count in sizes.items() if key.startswith("eval."))
    if cell.kind == "path":
        limit = config["distance"].get("max_samples")
        samples = sum(min(count, limit) if limit else count for key, count in sizes.items() if key.startswith("dev."))
        encoder = timing.encoder_s if config["source"] == "speech" else 0.0
        return samples * (timing.forward_s + encoder)
    if cell.kind == "eval":
        return evaluated * (timing.utterance_s + timing.encoder_s)
    if cell.kind == "prune":
        kept = (config["layers"] - config["n"] + 1) / config["layers"]
        seconds = evaluated * timing.utterance_s * kept
        if "heal_train" in config:
            heal = config["heal_train"]
            seconds += heal["steps"] * timing.step_s * heal["batch_size"] / timing.batch_size * kept
        return seconds
    return 0.0


def derived_timing(speech_llm: Mapping[str, Any], batch_size: int, decode_batch: int, root: Path) -> Timing:
    """A backbone's timing on an H100, from its decoder's and encoder's sizes (see the module's docstring).

    Args:
        speech_llm: A cell's `speech_llm` config (encoder and decoder names).
        batch_size: Training samples per process per step.
        decode_batch: Utterances decoded at once.
        root: The experiment's directory, against which local model paths resolve.

    Raises:
        BadInputError: The decoder is neither a local directory with a `config.json` nor one of `HUB_DECODERS`.
    """
    name = speech_llm["decoder"]["name"]
    computing = decoder_parameters(_decoder_config(name, root))
    flops = H100_BF16_FLOPS * UTILISATION
    speech = SPEECH_SECONDS * 50 / speech_llm["projector"]["stack"]
    tokens = speech + PROMPT_TOKENS + TARGET_TOKENS
    step = batch_size * 4 * computing * tokens / flops
    forward = 2 * computing * tokens / flops
    weights = 2 * computing  # bf16 bytes, read once per generated token for the whole decode batch
    utterance = 2 * computing * (speech + PROMPT_TOKENS) / flops
    utterance += TARGET_TOKENS * weights / (H100_BANDWIDTH * BANDWIDTH_USE) / decode_batch
    encoder_parameters, frames = _encoder_size(speech_llm["encoder"]["name"], root)
    encoder = 2 * encoder_parameters * frames * SPEECH_SECONDS / flops
    how = (
        f"derived for an H100 from {_count(computing)} decoder parameters computing per token "
        f"({UTILISATION:.0%} of the bf16 peak, {BANDWIDTH_USE:.0%} of HBM bandwidth, {SPEECH_SECONDS} s utterances)"
    )
    return Timing(step, batch_size, utterance, forward, encoder, how)


def decoder_parameters(config: Mapping[str, Any]) -> int:
    """Parameters a decoder computes with per token: its layers' and its LM head's (the embedding is a lookup).

    Exact for Llama- and Qwen2-shaped decoders (Qwen2's q, k, v biases included), from `config.json` fields.
    """
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    attention = hidden * heads * head_dim * 2 + hidden * kv * 2
    if config.get("model_type") == "qwen2":
        attention += heads * head_dim + 2 * kv
    layer = attention + 3 * hidden * config["intermediate_size"] + 2 * hidden
    return config["num_hidden_layers"] * layer + hidden * config["vocab_size"] + hidden


def read_timings(path: Path) -> dict[str, Timing]:
    """A timings file: decoder (or model) name -> `{step_s, batch_size, utterance_s, forward_s, encoder_s}`.

    Raises:
        BadInputError: Naming the file, the entry and the field that is missing or not a number.
    """
    if not path.is_file():
        raise BadInputError(f"{path}: no such timings file")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a mapping of decoder names to timings")
    timings = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise BadInputError(f"{path}: {name}: expected a mapping with {', '.join(TIMING_FIELDS)}, batch_size")
        values = {}
        for key in (*TIMING_FIELDS, "batch_size"):
            value = entry.get(key, 0.0 if key == "encoder_s" else None)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise BadInputError(f"{path}: {name}.{key}={value!r} is not a non-negative number")
            values[key] = value
        if values["batch_size"] < 1:
            raise BadInputError(f"{path}: {name}.batch_size={values['batch_size']!r} is not a positive integer")
        timings[str(name)] = Timing(
            values["step_s"], int(values["batch_size"]), values["utterance_s"], values["forward_s"],
            values["encoder_s"], f"configured in {path}",
        )  # fmt: skip
    return timings


def measure_timing(config: Mapping[str, Any], root: str | Path, samples: int = 4, steps: int = 3) -> Timing:
    """A backbone's timing measured on this machine, with the `slam` functions its cells call.

    Times `steps` training steps at the cell's batch size (the first, which warms up, left out), greedy decoding
    and forward passes of `samples` utterances of its data, with no feature cache (so the encoder is inside).

    Args:
        config: A train cell's config (its SpeechLLM, training data and training config).
        root: The experiment's directory.
        samples: Utterances decoded and passed forward.
        steps: Training steps run (at least 2).
    """
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    from slam.config import DataConfig, DecodeConfig, DistanceConfig, SpeechLLMConfig, TrainConfig, from_dict
    from slam.data import load_dataset
    from slam.evaluate import evaluate
    from slam.model import build_speech_llm
    from slam.redundancy import speech_layer_distances
    from slam.train import train

    config = resolve_paths(dict(config), root)
    cfg = from_dict(SpeechLLMConfig, config["speech_llm"], "speech_llm")
    train_cfg = from_dict(TrainConfig, config["train"], "train")
    train_cfg = replace(train_cfg, steps=steps, log_every=1, checkpoint_every=steps, warmdown=0.0)
    data = replace(from_dict(DataConfig, config["data"], "data"), max_samples=max(samples, train_cfg.batch_size))
    dataset = load_dataset(data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", "Support for mismatched key_padding_mask", UserWarning)
    model = build_speech_llm(cfg).to(device)
    recorder = _Recorder()
    train(model, dataset.for_training(), train_cfg, tracker=recorder)
    step = 1 / recorder.metrics[-1]["train.steps_per_s"]
    few = [dataset[i] for i in range(min(samples, len(dataset)))]
    began = time.perf_counter()
    evaluate(model, few, train_cfg.task, DecodeConfig(batch_size=len(few)))
    utterance = (time.perf_counter() - began) / len(few)
    began = time.perf_counter()
    pairs = [(sample.audio, sample.target(train_cfg.task)) for sample in few]
    speech_layer_distances(model, pairs, DistanceConfig(batch_size=len(few)))
    forward = (time.perf_counter() - began) / len(few)
    where = "CUDA" if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    how = f"measured on this machine ({where}; encoder inside, uncached)"
    return Timing(step, train_cfg.batch_size, utterance, forward, 0.0, how)


class _Recorder:
    """A `slam.track.Tracker` that keeps what training logs."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics))

    def log_json(self, path: str, data: Any) -> None:
        """Nothing to keep."""

    def log_text(self, path: str, text: str) -> None:
        """Nothing to keep."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Nothing to keep."""


def _timing(
    exp: Experiment, cell: Cell, trains: Mapping[str, dict], configured: Mapping[str, Timing], measure: bool
) -> Timing:
    """The timing of a cell's backbone: configured, else measured (`measure`, a local model), else derived.

    `trains` holds the train cells' configs by id: a cell's own training says its batch size and SpeechLLM.
    """
    speech_llm = cell.config.get("speech_llm") or {"decoder": cell.config["decoder"]}
    decoder = speech_llm["decoder"]["name"]
    for name in (cell.tags.get("model"), decoder):
        if name in configured:
            return configured[name]
    train = cell.config if cell.kind == "train" else trains.get(cell.config.get("train_cell", ""))
    local = is_local_path(decoder) and is_local_path(speech_llm.get("encoder", {}).get("name", "./"))
    if measure and local and train is not None:
        return measure_timing(train, exp.root)
    batch = train["train"]["batch_size"] if train else 8
    decode_batch = cell.config.get("decode", {}).get("batch_size", 16)
    full = train["speech_llm"] if train else {**speech_llm, "encoder": {"name": ""}, "projector": {"stack": 5}}
    return derived_timing(full, batch, decode_batch, exp.root)


def _set_sizes(exp: Experiment, cell: Cell, unknown: list[str]) -> dict[str, int]:
    """Utterances of each data set a cell reads (`cell_seconds`' `sizes`); unknown sizes named in `unknown`."""
    config = cell.config
    sets = {"data": config["data"]} if "data" in config else {}
    for group in ("dev", "eval"):
        sets.update({f"{group}.{name}": data for name, data in config.get(group, {}).items()})
    sizes = {}
    for key, data in sets.items():
        size = _set_size(data, exp.root)
        if size is None:
            unknown.append(f"{key.split('.', 1)[-1]} ({data['source']} {data['path']} {data.get('split', '')})")
            size = 0
        limit = data.get("max_samples")
        sizes[key] = min(size, limit) if limit else size
    return sizes


def _set_size(data: Mapping[str, Any], root: Path) -> int | None:
    if data["source"] == "manifest" or is_local_path(data["path"], data["source"]):
        manifest = Path(resolve_paths(dict(data), root)["path"])
        if data["source"] == "manifest" and manifest.is_file():
            with manifest.open(encoding="utf-8") as lines:
                return sum(1 for line in lines if line.strip())
        return None
    return HUB_SETS.get((data["source"], str(data.get("name")), str(data.get("split"))))


def _decoder_config(name: str, root: Path) -> dict[str, Any]:
    if is_local_path(name):
        config = Path(resolve_paths({"decoder": {"name": name}}, root)["decoder"]["name"]) / "config.json"
        if not config.is_file():
            raise BadInputError(f"decoder {name}: no config.json at {config} to size it from")
        return json.loads(config.read_text(encoding="utf-8"))
    if name not in HUB_DECODERS:
        raise BadInputError(
            f"decoder {name}: its size is unknown here (not one of {', '.join(HUB_DECODERS)}); give its timings "
            "with --timings FILE"
        )
    return HUB_DECODERS[name]


def _encoder_size(name: str, root: Path) -> tuple[float, float]:
    """(parameters, frames per second of speech) of an encoder; (0, 0) when unknown (text paths)."""
    if name in HUB_ENCODERS:
        return HUB_ENCODERS[name]
    if name and is_local_path(name):
        config = Path(resolve_paths({"encoder": {"name": name}}, root)["encoder"]["name"]) / "config.json"
        if config.is_file():
            fields = json.loads(config.read_text(encoding="utf-8"))
            hidden, layers = fields.get("hidden_size", 0), fields.get("num_hidden_layers", 0)
            return 12 * hidden * hidden * layers, 50.0
    return 0.0, 0.0


def _bounded(exp: Experiment, results: Mapping[str, Mapping[str, float]]) -> tuple[list[Cell], set[tuple[str, str]]]:
    """The cells to count: a sweep's all, a bisect search's ceil(log2(k + 1)) shallowest per (model, path, healing).

    Returns:
        The cells, and the (model, kind) pairs whose count is a bound.
    """
    searched = {study.name for study in exp.studies if study.search == "bisect"}
    if not searched:
        return expand(exp, results), set()
    swept = replace(exp, studies=[replace(study, search="sweep") for study in exp.studies])
    cells = expand(swept, results)
    groups: defaultdict[tuple, list[Cell]] = defaultdict(list)
    keep: list[Cell] = []
    for cell in cells:
        studies = set(cell.tags.get("study", "").split(","))
        if cell.kind == "prune" and studies <= searched:
            config = cell.config
            groups[(config["train_cell"], config["path_cell"], config["healing"])].append(cell)
        else:
            keep.append(cell)
    bounded = set()
    for group in groups.values():
        group.sort(key=lambda cell: cell.config["n"])
        count = math.ceil(math.log2(len(group) + 1))
        keep += group[:count]
        bounded.add((group[0].tags.get("model", ""), "prune"))
    order = {cell.id: i for i, cell in enumerate(cells)}
    return sorted(keep, key=lambda cell: order[cell.id]), bounded


def _count(parameters: float) -> str:
    return f"{parameters / 1e9:.3g}e9" if parameters >= 1e8 else f"{parameters:,.0f}"


def _hours(hours: float) -> str:
    return f"{hours:.2f}" if hours < 100 else f"{hours:,.0f}"


def _aligned(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines)
