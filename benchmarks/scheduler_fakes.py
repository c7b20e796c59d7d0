"""The synthetic cells of `benchmarks/scheduler.py`: how long each cell takes, and the fake stage and backbone
loaders that make a grid worker take exactly that long.

A cell's duration is a function of its kind, its model's depth m, its block size n and its healing
(`cell_seconds`), in units of `unit` seconds, weighed roughly as the paper's recipe weighs them: a baseline
training (50,000 steps of 8 samples per GPU, so as long in one process as in two) is 40 units, a healing (5,000
steps of the global batch, in one process) 6, an evaluation on the test sets 6, a pruning path (forward passes over
the dev sets) 3, a summary 1; all but the summary scale with the decoder's depth (m / 28, so a 28-layer model is 1),
and a pruned cell's evaluation with the layers it keeps ((m - n + 1) / m). A backbone (an encoder, or a decoder)
takes `LOAD_SECONDS` to load, the first time a worker needs it, or again when its `grid.stages.Backbones` dropped
it (`--backbones-per-worker`).

`install` is a Ray `worker_process_setup_hook`, as in `tests/reliability/faults.py`: it runs in every worker process
before its first task and replaces, there, every stage of `grid.stages._STAGES` with one that asks the worker's
`Backbones` for what the real stage would load (encoder and decoder; a text path only the decoder; a summary
nothing), then sleeps the cell's duration, and the loaders under `Backbones` with ones that sleep `LOAD_SECONDS`.
So the real `Backbones` decides what is loaded, when, and counts it (`RunReport.worker_loads`). The unit comes
from the environment variable `UNIT_ENV`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

import grid.stages
from grid.cells import Cell
from grid.stages import Backbones
from slam.config import DecoderConfig, SpeechLLMConfig, from_dict

LOAD_SECONDS = 2.0
"""Seconds one backbone (an encoder, or a decoder) takes to load."""
UNIT_ENV = "SLAMGRID_BENCH_UNIT"
"""Environment variable of the worker processes: seconds per unit of `COSTS`."""
COSTS = {"train": 40.0, "heal": 6.0, "eval": 6.0, "path": 3.0, "summary": 1.0}
"""Units of work: a baseline training, a healing, an evaluation (the baseline's, or a pruned model's before the
layers it lost are taken off), a pruning path, a summary; for a 28-layer decoder."""
REFERENCE_LAYERS = 28
"""The depth whose cells cost `COSTS` as they are (Qwen2.5-7B's)."""


def cell_seconds(cell: Cell, unit: float) -> float:
    """How long a cell's work takes once its backbones are loaded.

    Args:
        cell: A cell of `grid.cells.expand`.
        unit: Seconds per unit of `COSTS`.

    Returns:
        Seconds: `COSTS[kind]` times m / 28; a prune cell's evaluation times (m - n + 1) / m, plus a healing if it
        heals; a summary `COSTS["summary"]`.
    """
    config = cell.config
    if cell.kind == "summary":
        return COSTS["summary"] * unit
    size = config["layers"] / REFERENCE_LAYERS
    if cell.kind != "prune":
        return COSTS[cell.kind] * size * unit
    kept = (config["layers"] - config["n"] + 1) / config["layers"]
    heal = COSTS["heal"] if config["healing"] != "none" else 0.0
    return (COSTS["eval"] * kept + heal) * size * unit


def cell_backbones(cell: Cell) -> tuple[str, ...]:
    """The backbones a cell's stage loads, named as `grid.stages.Backbones` counts them (`encoder:<name>`)."""
    config = cell.config
    if "speech_llm" in config:
        speech_llm = config["speech_llm"]
        return f"encoder:{speech_llm['encoder']['name']}", f"decoder:{speech_llm['decoder']['name']}"
    if "decoder" in config:
        return (f"decoder:{config['decoder']['name']}",)
    return ()


def load_backbones(backbones: Backbones, config: Mapping[str, Any]) -> None:
    """Ask a worker's `Backbones` for what a cell's real stage loads.

    Args:
        backbones: The worker's backbones; they load what they do not hold (and count it).
        config: The cell's config: the encoder and decoder of its SpeechLLM, a text path's decoder alone, nothing
            for a summary.
    """
    if "speech_llm" in config:
        speech_llm = from_dict(SpeechLLMConfig, config["speech_llm"], "speech_llm")
        backbones.encoder(speech_llm.encoder)
        backbones.decoder(speech_llm.decoder)
    elif "decoder" in config:
        backbones.decoder(from_dict(DecoderConfig, config["decoder"], "decoder"))


def loaders(seconds: float) -> tuple[Callable[[Any], torch.nn.Module], Callable[[Any], tuple[torch.nn.Module, None]]]:
    """Stand-ins for `grid.stages.load_encoder` and `load_decoder` that take `seconds` and load nothing.

    Returns:
        The encoder loader (an identity module that has encoded nothing) and the decoder loader (an identity
        module, no tokenizer).
    """

    def load_encoder(cfg: Any) -> torch.nn.Module:
        time.sleep(seconds)
        return _Encoder()

    def load_decoder(cfg: Any) -> tuple[torch.nn.Module, None]:
        time.sleep(seconds)
        return torch.nn.Identity(), None

    return load_encoder, load_decoder


class _Encoder(torch.nn.Identity):
    """A stand-in encoder: it encodes nothing, and counts so (what `Backbones.encoder_use` reads)."""

    encoded = 0
    cached = 0
    cache = None


def install() -> None:
    """Replace the stages and the backbone loaders of this worker process by the timed fakes."""
    unit = float(os.environ[UNIT_ENV])

    def stage(ctx: Any) -> None:
        load_backbones(ctx.backbones, ctx.config)
        began = time.time()
        seconds = cell_seconds(ctx.cell, unit)
        time.sleep(seconds)
        ctx.run.log_metrics({"bench.began": began, "bench.seconds": seconds})

    grid.stages.load_encoder, grid.stages.load_decoder = loaders(LOAD_SECONDS)
    for kind in grid.stages._STAGES:
        grid.stages._STAGES[kind] = stage
