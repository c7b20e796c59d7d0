"""Faults injected into the grid's worker processes by Ray's `worker_process_setup_hook`, which runs in every
worker process of a job before its first task: the grid's own code has no hook for tests.

`ray.init(runtime_env={"worker_process_setup_hook": "tests.reliability.faults.<hook>", "env_vars": {...}})`.
"""

from __future__ import annotations

import os
from pathlib import Path

OOM_MARKER = "SLAMGRID_TEST_OOM_MARKER"
"""Environment variable naming a file: while it exists, unhealed prune cells run out of GPU memory."""


def out_of_memory_in_unhealed_prune_cells() -> None:
    """Make every unhealed prune cell raise the error PyTorch raises when CUDA memory runs out."""
    import torch

    import grid.stages

    real = grid.stages._STAGES["prune"]

    def prune(ctx) -> None:
        marker = os.environ.get(OOM_MARKER)
        if marker and Path(marker).exists() and ctx.config["heal"]["strategy"] == "none":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        real(ctx)

    grid.stages._STAGES["prune"] = prune
