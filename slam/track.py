"""The one tracking interface the science code reports through, with a no-op default.

Stages take a `Tracker` and call it; they never import a tracking library. `grid/` holds the only
MLflow implementation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Tracker(Protocol):
    """Receives metrics as a stage runs."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record scalar metrics, optionally at a step."""


class NullTracker:
    """A tracker that drops everything: the default when nobody is listening."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Drop the metrics."""
