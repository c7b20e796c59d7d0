"""Edits of a loaded experiment document, for tests that change one value of a YAML file."""

from __future__ import annotations

from collections.abc import Callable


def set_at(path: str, value) -> Callable[[dict], None]:
    """An edit that sets the value at a slash-separated path (list indices as integers)."""

    def edit(doc: dict) -> None:
        *parents, last = [int(part) if part.isdigit() else part for part in path.split("/")]
        target = doc
        for part in parents:
            target = target[part]
        target[last] = value

    return edit
