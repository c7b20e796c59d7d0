"""`slamgrid export`: a finished prune cell's pruned and healed model as files to deploy, rebuilt from the store.

A prune cell's model is its baseline's trained SpeechLLM (the train cell's `model/` artifact), pruned along its path
(the path cell's `distance.json`), and what healing trained (its own `healed/` artifact). `export_cells` rebuilds
exactly that (`grid.stages.pruned_speech_llm`, the function the cell ran, then `slam.export.restore_healed`) and
writes it with `slam.export`: one cell as one SpeechLLM, several cells of different tasks that remove the same
layers of the same decoder as one backbone with a projector and adapter per task.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from grid.cells import Cell, expand
from grid.experiment import load_experiment
from grid.stages import DISTANCE_ARTIFACT, HEALED_ARTIFACT, Backbones, PrunedModel, path_step, pruned_speech_llm
from grid.tracking import GridStore, absolute_uri, store_has_experiment
from grid.tracking import tracking_uri as resolve_tracking_uri
from slam.errors import BadInputError
from slam.export import HEALED_FILE, export_speech_llm, export_tasks, restore_healed

_FINISHED = "FINISHED"


def export_cells(
    path: str | Path,
    cell_ids: Sequence[str],
    out: str | Path,
    tracking_uri: str | None = None,
    device: str = "cpu",
) -> Path:
    """Export finished prune cells of an experiment file: one as a SpeechLLM, several as tasks on one backbone.

    Args:
        path: The experiment file.
        cell_ids: Prune cell ids (`cell_id` tags, or unique prefixes of them, as `slamgrid status` prints them).
        out: A new (or empty) directory to write.
        tracking_uri: MLflow tracking URI; None: `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db`.
        device: Where the models are rebuilt (and LoRA merged).

    Returns:
        The directory written.

    Raises:
        BadInputError: A cell that is not a finished prune cell of the file, or cells that do not share a backbone
            (another decoder, other layers removed, a baseline LoRA, the same task twice).
    """
    if not cell_ids:
        raise BadInputError("export: name at least one prune cell (--cell ID, or --cells ID1 ID2 ...)")
    exp = load_experiment(path)
    uri = absolute_uri(resolve_tracking_uri(tracking_uri))
    if not store_has_experiment(uri, exp.name):
        raise BadInputError(f"the MLflow store {uri} has no experiment {exp.name!r}: run `slamgrid run` on it first")
    store = GridStore(uri, exp.name)
    cells = expand(exp, store.results())
    chosen = [_find(cells, cell_id) for cell_id in cell_ids]
    states = store.states({dep for cell in chosen for dep in (cell.id, *cell.deps)})
    for cell in chosen:
        if cell.kind != "prune":
            raise BadInputError(f"cell {cell.id} is a {cell.kind} cell: only prune cells have a pruned model")
        for needed in (cell.id, *cell.deps):
            if states[needed].status != _FINISHED:
                raise BadInputError(
                    f"cell {needed} ({'the cell' if needed == cell.id else 'a dependency of ' + cell.id}) is "
                    f"{states[needed].status}, not FINISHED: run `slamgrid run` to finish it first"
                )
    if len(chosen) > 1:
        _check_shared(chosen, store, states)
    backbones = Backbones(device)
    with tempfile.TemporaryDirectory(prefix="slamgrid-export-") as scratch:
        rebuilt = {cell.id: _rebuild(cell, store, states, Path(scratch), backbones, str(exp.root)) for cell in chosen}
    first = chosen[0]
    manifest = {
        "experiment": exp.name,
        "tracking_uri": uri,
        "decoder": first.config["speech_llm"]["decoder"]["name"],
        "layers": first.config["layers"],
        "removed": list(rebuilt[first.id].step.removed),
    }
    if len(chosen) == 1:
        pruned = rebuilt[first.id]
        return export_speech_llm(pruned.model, pruned.cfg, out, {**manifest, **_describe(first, pruned)})
    models = {cell.tags["task"]: (rebuilt[cell.id].model, rebuilt[cell.id].cfg) for cell in chosen}
    details = {cell.tags["task"]: _describe(cell, rebuilt[cell.id]) for cell in chosen}
    return export_tasks(models, out, {**manifest, "cells": details})


def _rebuild(cell: Cell, store: GridStore, states: dict, scratch: Path, backbones: Backbones, root: str) -> PrunedModel:
    """The model a prune cell evaluated: pruned as it did, and healed with the weights it saved."""
    deps = {dep: states[dep].run_id for dep in cell.deps}
    pruned = pruned_speech_llm(cell, store, deps, scratch, backbones, root)
    if pruned.heal.strategy != "none":
        run_id = states[cell.id].run_id
        if not store.has_artifact(run_id, f"{HEALED_ARTIFACT}/{HEALED_FILE}"):
            raise BadInputError(
                f"cell {cell.id}: its run {run_id} has no {HEALED_ARTIFACT}/{HEALED_FILE} (it finished before prune "
                "cells kept what healing trained); delete the run and run the grid again to heal it anew"
            )
        local = store.download_artifacts(run_id, f"{HEALED_ARTIFACT}/{HEALED_FILE}", scratch)
        restore_healed(pruned.model, local)
    pruned.model.eval()
    return pruned


def _check_shared(cells: Sequence[Cell], store: GridStore, states: dict) -> None:
    """Refuse cells that cannot share one backbone, naming the first two that differ and how."""
    tasks = [cell.tags["task"] for cell in cells]
    twice = sorted({task for task in tasks if tasks.count(task) > 1})
    if twice:
        raise BadInputError(f"cells of the same task ({', '.join(twice)}) cannot share one export: one cell per task")
    first = cells[0]
    for cell in cells:
        lora = cell.config["speech_llm"]["decoder"].get("lora")
        if lora:
            raise BadInputError(
                f"cell {cell.id}: its baseline trained a LoRA on the decoder, so its backbone is its task's own; "
                "export it alone with --cell"
            )
    removed = {cell.id: _removed(cell, store, states) for cell in cells}
    for cell in cells[1:]:
        for what, key in (("decoder", _decoder), ("layers removed", lambda c: removed[c.id])):
            if key(cell) != key(first):
                raise BadInputError(
                    f"cells {first.id} and {cell.id} do not share the pruned layers of one backbone ({what}: "
                    f"{key(first)} vs {key(cell)}); export them one at a time with --cell"
                )


def _decoder(cell: Cell) -> tuple:
    decoder = cell.config["speech_llm"]["decoder"]
    return decoder["name"], decoder.get("dtype"), cell.config["layers"]


def _removed(cell: Cell, store: GridStore, states: dict) -> list[int]:
    """The layers a prune cell removes, from its path cell's report (1-based, in the unpruned decoder)."""
    report = store.load_json_artifact(states[cell.config["path_cell"]].run_id, DISTANCE_ARTIFACT)
    return list(path_step(report, cell.config["n"], cell.config["path_cell"]).removed)


def _describe(cell: Cell, pruned: PrunedModel) -> dict:
    return {
        "cell_id": cell.id,
        "model": cell.tags.get("model"),
        "task": cell.tags.get("task"),
        "n": cell.config["n"],
        "fraction": cell.config["fraction"],
        "healing": cell.config["healing"],
        "receiving_layer": pruned.step.receiving_layer,
        "path_cell": cell.config["path_cell"],
    }


def _find(cells: Sequence[Cell], wanted: str) -> Cell:
    matches = [cell for cell in cells if cell.id.startswith(wanted)] if wanted else []
    if len(matches) != 1:
        found = "no cell" if not matches else f"{len(matches)} cells"
        raise BadInputError(f"--cell {wanted!r}: {found} of the experiment file has that id")
    return matches[0]
