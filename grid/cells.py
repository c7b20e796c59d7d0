"""Cells: an experiment expanded into units of work with stable ids, in an order that respects dependencies.

Kinds, in execution order:

- `train`: baseline projector training of one (model, task); with `train_workers: W > 1` in its config,
  DDP in W processes (the global batch is `train.batch_size * W`).
- `path`: the distance matrix and optimal pruning path of one (model, task, source, convention): `speech`
  measures the trained SpeechLLM (depends on its `train` cell) on the task's dev sets; `text` runs the
  pretrained decoder alone (without any LoRA of the SpeechLLM) on the transcripts of those sets; the path
  follows the block convention (`paper` or `gromov`, `slam.redundancy`).
- `eval`: baseline WER or BLEU of a `train` cell on the study task's evaluation sets.
- `prune`: one (model, path, n, healing) of a study: prune the `train` cell's SpeechLLM along the
  `path` cell's path, heal it, evaluate it. Healing runs in one process on the baseline training's global
  batch: its `heal_train.batch_size` is the file's `batch_size` times `train_workers` (the paper: 8 x 2).
- `summary`: one per study; depends on every path, eval and prune cell of the study. A `search: bisect`
  study's prune cells are the depths its binary searches asked for, and its summary exists once they decided
  (`expand` with the results so far).

A cell's `config` is everything that determines its result, as plain JSON data, including the ids of
the cells it depends on; its `id` hashes kind and config. Display names (of models, tasks, studies)
are tags, not config, except a summary's study name: the same training in two studies, or in two
experiment files, is one cell with one id, and renaming a model does not retrain it. A config holds
only what its stage reads (a `none`-healing cell has no healing training config, a
projector-only one no LoRA settings, a single-process training no `train_workers`), so a change reruns
exactly the cells it affects.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from grid.experiment import Experiment, ModelSpec, PathSpec, Study, TaskSpec
from slam.config import TASK_METRICS, HealConfig, SpeechLLMConfig, json_ready, to_dict
from slam.metrics import bisect_depth, set_scores, within_threshold

KINDS = ("train", "path", "eval", "prune", "summary")


@dataclass(frozen=True)
class Cell:
    """One unit of work of the grid."""

    kind: str
    """`train`, `path`, `eval`, `prune` or `summary`."""
    config: dict
    """The cell's full config as JSON-ready data, with its dependencies' ids."""
    deps: tuple[str, ...]
    """Ids of the cells that must finish first."""
    tags: dict[str, str] = field(default_factory=dict)
    """MLflow tags for finding the cell: model, task, n, fraction, healing, path.*, study."""
    id: str = field(init=False)
    """`cell_id(kind, config)`."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"cell.kind={self.kind!r} is not allowed: expected one of {', '.join(KINDS)}")
        object.__setattr__(self, "id", cell_id(self.kind, self.config))


def cell_id(kind: str, config: dict) -> str:
    """The stable id of a cell: the first 16 hex digits of the sha256 of its canonical JSON.

    Args:
        kind: The cell's kind.
        config: Its JSON-ready config.

    Returns:
        16 lowercase hex digits; equal configs give equal ids in any process or on any machine.
    """
    canonical = json.dumps({"kind": kind, "config": config}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def prune_path_label(tags: Mapping[str, str]) -> str:
    """How tables and run names call a prune cell's path: `{source}-{task}`, plus `-{model}` when the path is another
    model's, and `-gromov` when it follows Gromov et al.'s block convention rather than the paper's.

    Args:
        tags: The prune cell's tags (`path.source`, `path.task`, `path.model`, `path.convention`, `model`).

    Returns:
        The label; empty for tags without a path (not a prune cell).
    """
    if "path.source" not in tags or "path.task" not in tags:
        return ""
    label = f"{tags['path.source']}-{tags['path.task']}"
    if tags.get("path.model", tags.get("model")) != tags.get("model"):
        label += f"-{tags['path.model']}"
    convention = tags.get("path.convention", "paper")
    return label if convention == "paper" else f"{label}-{convention}"


def expand(exp: Experiment, results: Mapping[str, Mapping[str, float]] | None = None) -> list[Cell]:
    """Expand an experiment into its cells, shared cells once, each after the cells it depends on.

    A `search: bisect` study's pruned cells depend on what earlier ones scored: the search asks for the next
    depth once the one before has a result in `results`, and the study's summary cell appears once every search
    of the study has decided. Expanding again as results come in (`grid.runner` does) grows the grid until it
    is complete; with every result in, the cells are what they will stay.

    Args:
        exp: A loaded experiment.
        results: The metrics of each finished cell, by id (`GridStore.results`); None: none finished.

    Returns:
        The cells ordered by kind (`KINDS`), then by first use in the file's studies.
    """
    grid = _Grid(exp, results or {})
    for study in exp.studies:
        grid.add_study(study)
    return grid.cells()


def plan_summary(cells: list[Cell]) -> dict[str, int]:
    """The number of cells of each kind, every kind listed, in execution order."""
    counts = Counter(cell.kind for cell in cells)
    return {kind: counts[kind] for kind in KINDS}


@dataclass
class _Entry:
    """A cell being collected; the studies that use it are gathered into its `study` tag."""

    kind: str
    config: dict
    deps: tuple[str, ...]
    tags: dict[str, str]
    studies: list[str]


class _Grid:
    """Collects the cells of each study, deduplicated by id."""

    def __init__(self, exp: Experiment, results: Mapping[str, Mapping[str, float]]) -> None:
        self.exp = exp
        self.results = results
        self.entries: dict[str, _Entry] = {}

    def add_study(self, study: Study) -> None:
        task = self.exp.tasks[study.task]
        paths, evals, prunes = [], [], []
        searching = False
        for model_name in study.models:
            model = self.exp.models[model_name]
            refs = [study.resolve(spec, model_name) for spec in study.paths]
            model_paths = [self.path(self.exp.models[r.model], self.exp.tasks[r.task], r, study) for r in refs]
            paths += model_paths
            if study.measures_only:
                continue
            train = self.train(model, task, study)
            evaluated = self.eval(model, task, train, study)
            evals.append(evaluated)
            for ref, path in zip(refs, model_paths):
                depths = study.depths_for(model.layers, ref.convention)
                if study.search == "bisect":
                    for healing in study.healing:
                        asked, decided = self.bisect(model, task, train, evaluated, path, ref, depths, healing, study)
                        prunes += asked
                        searching = searching or not decided
                    continue
                for n in depths:
                    for healing in study.healing:
                        prunes.append(self.prune(model, task, train, path, ref, n, healing, study))
        if searching:
            return  # the summary waits for every search of the study to decide
        deps = _unique(paths + evals + prunes)
        config = {
            "study": study.name,
            "task": task.task,
            "path_cells": _unique(paths),
            "eval_cells": _unique(evals),
            "prune_cells": _unique(prunes),
        }
        if study.search != "sweep":
            config["search"] = study.search
        self.add("summary", config, deps, {"task": task.name}, study)

    def bisect(
        self,
        model: ModelSpec,
        task: TaskSpec,
        train: str,
        evaluated: str,
        path: str,
        ref: PathSpec,
        depths: tuple[int, ...],
        healing: str,
        study: Study,
    ) -> tuple[list[str], bool]:
        """The pruned cells a binary search over `depths` has asked for so far, and whether it has decided.

        A depth passes when its scores are within the threshold of the baseline's on every evaluation set; a
        zero baseline score (where the relative change is undefined) ends the search after its first cell.
        """
        metric = TASK_METRICS[task.task]
        asked: list[str] = []
        baseline = set_scores(self.results[evaluated], metric) if evaluated in self.results else None

        def passes(n: int) -> bool | None:
            cell = self.prune(model, task, train, path, ref, n, healing, study)
            asked.append(cell)
            if cell not in self.results or baseline is None:
                return None
            if not all(baseline.values()):
                raise _Undecidable
            return within_threshold(baseline, set_scores(self.results[cell], metric), metric)

        try:
            _, needed = bisect_depth(sorted(depths), passes)
        except _Undecidable:
            return asked, True
        return asked, needed is None

    def train(self, model: ModelSpec, task: TaskSpec, study: Study) -> str:
        config = {
            **self.speech_llm(model, task),
            "data": to_dict(task.train),
            "train": to_dict(replace(model.train, task=task.task)),
        }
        if self.exp.train_workers > 1:
            # The global batch is `train.batch_size` times the processes: a different training, another cell.
            config["train_workers"] = self.exp.train_workers
        return self.add("train", config, (), {"model": model.name, "task": task.name}, study)

    def path(self, model: ModelSpec, task: TaskSpec, ref: PathSpec, study: Study) -> str:
        tags = {"model": model.name, "task": task.name, "path.source": ref.source, "path.convention": ref.convention}
        common = {
            "source": ref.source,
            "convention": ref.convention,
            "dev": {name: to_dict(data) for name, data in task.dev.items()},
            "distance": to_dict(self.exp.distance),
        }
        if ref.source == "text":
            # The pretrained LLM alone: a SpeechLLM's LoRA is trained with it, so it has no part in text paths.
            decoder = to_dict(replace(model.decoder, lora=None))
            config = {**common, "decoder": decoder, "layers": model.layers}
            return self.add("path", config, (), tags, study)
        train = self.train(model, task, study)
        config = {**common, **self.speech_llm(model, task), "train_cell": train}
        return self.add("path", config, (train,), tags, study)

    def eval(self, model: ModelSpec, task: TaskSpec, train: str, study: Study) -> str:
        config = {
            **self.speech_llm(model, task),
            "eval": {name: to_dict(data) for name, data in task.eval.items()},
            "decode": to_dict(self.exp.decode),
            "train_cell": train,
        }
        return self.add("eval", config, (train,), {"model": model.name, "task": task.name}, study)

    def prune(
        self,
        model: ModelSpec,
        task: TaskSpec,
        train: str,
        path: str,
        ref: PathSpec,
        n: int,
        healing: str,
        study: Study,
    ) -> str:
        fraction = (n - 1) / model.layers
        config = {
            **self.speech_llm(model, task),
            "n": n,
            "fraction": fraction,
            "healing": healing,
            "heal": _heal(self.exp.heal, healing),
            "eval": {name: to_dict(data) for name, data in task.eval.items()},
            "decode": to_dict(self.exp.decode),
            "train_cell": train,
            "path_cell": path,
        }
        if healing != "none":
            # Healing trains on the task's training set with the training hyperparameters (paper 3.3), the global
            # batch included: in one process, on `batch_size` times the baseline's DDP processes per step.
            config["data"] = to_dict(task.train)
            batch = model.heal_train.batch_size * self.exp.train_workers
            config["heal_train"] = to_dict(replace(model.heal_train, task=task.task, batch_size=batch))
        tags = {
            "model": model.name,
            "task": task.name,
            "n": str(n),
            "fraction": f"{fraction:.4f}",
            "healing": healing,
            "path.source": ref.source,
            "path.task": str(ref.task),
            "path.model": str(ref.model),
            "path.convention": ref.convention,
        }
        return self.add("prune", config, (train, path), tags, study)

    def speech_llm(self, model: ModelSpec, task: TaskSpec) -> dict[str, Any]:
        """The SpeechLLM of (model, task), as the `speech_llm`, `layers` and `task` keys of a config."""
        speech_llm = SpeechLLMConfig(
            encoder=model.encoder, decoder=model.decoder, projector=self.exp.projector, prompt=task.prompt
        )
        return {"speech_llm": to_dict(speech_llm), "layers": model.layers, "task": task.task}

    def add(self, kind: str, config: dict, deps: tuple[str, ...], tags: dict[str, str], study: Study) -> str:
        config = json_ready(config)
        key = cell_id(kind, config)
        entry = self.entries.setdefault(key, _Entry(kind, config, tuple(deps), tags, []))
        if study.name not in entry.studies:
            entry.studies.append(study.name)
        return key

    def cells(self) -> list[Cell]:
        # Within a kind, first use comes first; every dependency is of an earlier kind.
        order = sorted(self.entries.values(), key=lambda entry: KINDS.index(entry.kind))
        return [
            Cell(entry.kind, entry.config, entry.deps, {**entry.tags, "study": ",".join(entry.studies)})
            for entry in order
        ]


class _Undecidable(Exception):
    """A bisect search's baseline scored 0: no relative change, no decision; the summary says so."""


def _heal(heal: HealConfig, strategy: str) -> dict[str, Any]:
    """The healing config of one strategy; the LoRA settings only where the strategy adds a LoRA."""
    cfg = replace(heal, strategy=strategy)
    if cfg.heals_decoder:
        return to_dict(cfg)
    return {"strategy": strategy}


def _unique(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))
