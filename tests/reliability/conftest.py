"""The tiny world the reliability tests run their grids in, and the grid they run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.grid.world import build_world, write_experiment

STUDIES = [
    {"name": "asr", "task": "asr", "models": ["tiny"], "paths": [{"source": "speech"}], "depths": [2],
     "healing": ["none", "decoder+projector"]},
    {"name": "text", "task": "asr", "models": ["tiny"], "paths": [{"source": "text"}], "depths": []},
]  # fmt: skip
"""A baseline training, a speech path, two pruned cells (one healed), a summary; and a text path, independent of
the training, which finishes while it trains."""
LONG_TRAIN = {"steps": 600, "batch_size": 2, "checkpoint_every": 20, "log_every": 20}
"""A training long enough to be hit mid-way (a checkpoint every 20 steps)."""
RESUMED = ("train.resumed_from", "train.unreadable_checkpoints")
"""What differs between a disturbed and an undisturbed run besides time and memory: where training resumed."""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def long_grid(world) -> Path:
    """The experiment file of the grid with `LONG_TRAIN`."""
    return write_experiment(world, "reliability", STUDIES, train=LONG_TRAIN)
