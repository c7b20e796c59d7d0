"""The paper's tables and figures for an experiment file, computed from its MLflow store alone.

`summarize(path)` finds the FINISHED run of every cell of the file (by `cell_id`), rebuilds each study's table
from those runs (`grid.stages.study_table`, what the summary cells log) and lays the results out as the paper does:

- Table 1 (every ASR study): per (model, path, healing), the baseline WER on each evaluation set, then the
  largest fraction of decoder layers removed with delta_WER <= 0.25 on every set at once and the WER there.
- Table 2 (every AST study): BLEU per fraction removed, one column per (path, evaluation set), so that the
  task's own path and a path measured on another task (the paper's AST- and ASR-optimal paths) sit side by side;
  the last row is each path's removable fraction (delta_BLEU >= -0.10).
- Figure 1: the distance heatmap D[l][l+n] of every path cell, one panel each, its optimal path marked.
- Figure 2: the relative WER change against the fraction removed, a row per model and a column per evaluation
  set, a line per (path, healing), and the threshold as a grey dashed line (and the same for BLEU when the file
  has AST studies).

A grid that has not finished is summarised from what has: cells without a FINISHED run are left out and counted,
and a prune cell whose baseline is missing is left out with it. With `log=True` everything goes to the
experiment's parent run under `report/` (`table1.txt`, `table2.txt`, `paths.txt`, `summary.json`, `figure1.png`,
`figure2.png`, `figure2_bleu.png`), beside the per-study `summaries/` of the summary cells. `paths.txt` compares,
per model, the text- and speech-derived paths of every study that has both (paper Figure 1 (a) vs (b)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from grid.cells import Cell, expand
from grid.experiment import load_experiment
from grid.stages import DISTANCE_ARTIFACT, draw_distance_heatmap, study_table
from grid.tracking import GridStore, store_has_experiment
from grid.tracking import tracking_uri as resolve_tracking_uri
from slam.metrics import BLEU_THRESHOLD, WER_THRESHOLD, format_percent

REPORT_DIR = "report"
"""Artifact directory of the summary on the experiment's parent run."""
_FINISHED = "FINISHED"
_THRESHOLDS = {"wer": WER_THRESHOLD, "bleu": BLEU_THRESHOLD}
_NONE = "–"


@dataclass
class Summary:
    """The tables and figures of one experiment file, and how much of the grid they cover."""

    experiment: str
    """The experiment's name (its MLflow experiment)."""
    studies: list[dict[str, Any]]
    """Each study's table as `grid.stages.study_table` gives it (baselines, rows per depth, removable fractions)."""
    paths: list[dict[str, Any]]
    """Every finished path cell: model (the experiment's name), decoder, task, source, n_layers, num_samples,
    distance matrix, path, cell_id."""
    table1: str
    """Table 1 as text; empty without an ASR study."""
    table2: str
    """Table 2 as text; empty without an AST study."""
    paths_text: str = ""
    """Figure 1 (a) vs (b): how each model's text- and speech-derived paths agree; empty without such a pair."""
    figures: dict[str, Figure] = field(default_factory=dict)
    """`figure1`, `figure2` (WER) and `figure2_bleu`, those the results allow."""
    cells: int = 0
    """Cells of the experiment file, summary cells included."""
    missing: list[str] = field(default_factory=list)
    """Ids of the cells whose results are left out: no FINISHED run, or a prune cell without its baseline."""

    def text(self) -> str:
        """Both tables and a line on what is missing, as `slamgrid summarize` prints them."""
        parts = [table for table in (self.table1, self.table2, self.paths_text) if table]
        if not parts:
            parts.append(f"{self.experiment}: no finished evaluation to summarise yet")
        if self.missing:
            parts.append(
                f"{len(self.missing)} of {self.cells} cells have no finished result and are left out: "
                "run `slamgrid status` to see why"
            )
        return "\n\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data (without the figures)."""
        return {
            "experiment": self.experiment,
            "cells": self.cells,
            "missing": self.missing,
            "studies": self.studies,
            "paths": self.paths,
            "table1": self.table1,
            "table2": self.table2,
            "paths_text": self.paths_text,
        }


def summarize(path: str | Path, tracking_uri: str | None = None, log: bool = True) -> Summary:
    """Compute the tables and figures of an experiment file from its MLflow store, and log them.

    Args:
        path: The experiment file.
        tracking_uri: MLflow tracking URI; None: `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db`.
        log: Log the tables, the JSON and the figures on the parent run under `report/`.

    Returns:
        The summary.

    Raises:
        BadInputError: The experiment file is wrong.
        ValueError: The store has no MLflow experiment of that name (nothing has run yet).
    """
    exp = load_experiment(path)
    uri = resolve_tracking_uri(tracking_uri)
    _require_experiment(uri, exp.name)
    store = GridStore(uri, exp.name)
    cells = expand(exp, store.results())
    finished = {
        cell_id: state.run_id
        for cell_id, state in store.states(cell.id for cell in cells).items()
        if state.status == _FINISHED and state.run_id is not None
    }
    summary = collect(store, cells, finished, exp.name)
    if log:
        parent = store.parent_run()
        client = store.client
        for name, text in (("table1", summary.table1), ("table2", summary.table2), ("paths", summary.paths_text)):
            if text:
                client.log_text(parent, text + "\n", f"{REPORT_DIR}/{name}.txt")
        client.log_dict(parent, summary.to_dict(), f"{REPORT_DIR}/summary.json")
        for name, figure in summary.figures.items():
            client.log_figure(parent, figure, f"{REPORT_DIR}/{name}.png")
    return summary


def collect(store: GridStore, cells: Sequence[Cell], finished: dict[str, str], experiment: str) -> Summary:
    """Build the summary of `cells` from the runs in `finished` (cell id -> FINISHED run id).

    Args:
        store: The experiment's store.
        cells: The expanded cells of the experiment file.
        finished: The FINISHED run of each cell that has one.
        experiment: The experiment's name.

    Returns:
        The summary, with the ids of the cells left out.
    """
    by_id = {cell.id: cell for cell in cells}
    missing = [cell.id for cell in cells if cell.id not in finished]
    studies = []
    for cell in cells:
        if cell.kind != "summary":
            continue
        config = dict(cell.config)
        config["eval_cells"] = [c for c in config["eval_cells"] if c in finished]
        baselines = {by_id[c].config["train_cell"] for c in config["eval_cells"]}
        prunes = [c for c in config["prune_cells"] if c in finished]
        config["prune_cells"] = [c for c in prunes if by_id[c].config["train_cell"] in baselines]
        missing += [c for c in prunes if c not in config["prune_cells"] and c not in missing]
        config["path_cells"] = [c for c in config["path_cells"] if c in finished]
        studies.append(study_table(store, config, finished))
    paths = []
    for cell in cells:
        if cell.kind == "path" and cell.id in finished:
            report = store.load_json_artifact(finished[cell.id], DISTANCE_ARTIFACT)
            # `model` is the experiment's name for the model; the report's own `model` (the decoder's id) is kept.
            names = {"model": cell.tags["model"], "decoder": report["model"], "task": cell.tags["task"]}
            paths.append({**report, **names, "cell_id": cell.id})
    figures = {}
    if paths:
        figures["figure1"] = figure1(paths)
    for metric, name in (("wer", "figure2"), ("bleu", "figure2_bleu")):
        if any(result["rows"] for study in studies if study["metric"] == metric for result in study["results"]):
            figures[name] = figure2(studies, metric)
    return Summary(
        experiment=experiment,
        studies=studies,
        paths=paths,
        table1=table1(studies),
        table2=table2(studies),
        paths_text=path_agreement_text(studies),
        figures=figures,
        cells=len(cells),
        missing=missing,
    )


def table1(studies: Sequence[dict[str, Any]]) -> str:
    """Table 1: baseline WER and WER at the removable fraction, per (model, path, healing) of each ASR study.

    Args:
        studies: Study tables (`grid.stages.study_table`); those with metric `wer` are used.

    Returns:
        The table as aligned text, one block per study; empty when there is no ASR result.
    """
    blocks = []
    for study in studies:
        if study["metric"] != "wer" or not study["results"]:
            continue
        sets = _sets(study)
        header = ["model", "path", "healing", "drop %", *sets]
        rows = []
        for result in study["results"]:
            names = [result["model"], result["path_label"], result["healing"]]
            rows.append([*names, _NONE, *_cells(result["baseline"], sets)])
            fraction = result["removable_fraction"]
            if fraction is None:
                rows.append(["+ pruning", "", "", "n/a", result["note"] or ""])
                continue
            at = _row_at(result, fraction)
            rows.append(["+ pruning", "", "", format_percent(fraction), *_cells(at["scores"] if at else {}, sets)])
        title = (
            f"Table 1, study {study['study']}: WER (%) before and after pruning; drop = the largest fraction of "
            f"decoder layers removed with relative WER change <= {study['threshold']:g} on every set"
        )
        blocks.append(title + _search_note(study) + "\n" + _aligned(header, rows))
    return "\n\n".join(blocks)


def table2(studies: Sequence[dict[str, Any]]) -> str:
    """Table 2: BLEU per fraction removed, a column per (path, evaluation set), per (model, healing) of each AST study.

    Args:
        studies: Study tables (`grid.stages.study_table`); those with metric `bleu` are used.

    Returns:
        The table as aligned text, one block per (study, model, healing); empty when there is no AST result.
    """
    blocks = []
    for study in studies:
        if study["metric"] != "bleu":
            continue
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for result in study["results"]:
            groups.setdefault((result["model"], result["healing"]), []).append(result)
        sets = _sets(study)
        for (model, healing), results in groups.items():
            columns = [(result, name) for result in results for name in sets]
            header = ["% drop", *(f"{result['path_label']} {name}" for result, name in columns)]
            fractions = sorted({row["fraction"] for result in results for row in result["rows"]})
            rows = [[_NONE, *(_score(result["baseline"].get(name)) for result, name in columns)]]
            for fraction in fractions:
                cells = []
                for result, name in columns:
                    at = _row_at(result, fraction)
                    cells.append(_score(at["scores"].get(name) if at else None))
                rows.append([format_percent(fraction), *cells])
            rows.append(["removable %", *(_fraction(result["removable_fraction"]) for result, _ in columns)])
            title = (
                f"Table 2, study {study['study']}, {model}, healing {healing}: BLEU per fraction of decoder layers "
                f"removed along each path; removable: relative BLEU change >= {study['threshold']:g} on every set"
            )
            blocks.append(title + _search_note(study) + "\n" + _aligned(header, rows))
    return "\n\n".join(blocks)


def path_agreement_text(studies: Sequence[dict[str, Any]]) -> str:
    """Figure 1 (a) vs (b) in words: each (model, text path, speech path) pair of the studies, once.

    Args:
        studies: Study tables (`grid.stages.study_table`), whose `agreement` lists the pairs.

    Returns:
        One line per pair: the mean absolute difference of the two matrices over the path's candidate blocks (the
        paper: about 0.007 for Qwen2.5-7B) and the depths at which both paths remove the same layers; empty
        without a pair.
    """
    seen, lines = set(), []
    for study in studies:
        for pair in study.get("agreement", []):
            key = (pair["model"], pair["text"], pair["speech"])
            if key in seen:
                continue
            seen.add(key)
            lines.append(
                f"{pair['model']}: {pair['text']} vs {pair['speech']} ({pair['convention']} convention): mean "
                f"|D_text - D_speech| over the path's blocks {pair['mean_abs_diff']:.4f}; the same block at "
                f"{len(pair['same_block'])} of {len(pair['depths'])} depths"
            )
    if not lines:
        return ""
    return "Figure 1 (a) vs (b), text- against speech-derived paths:\n" + "\n".join(f"  {line}" for line in lines)


def figure1(paths: Sequence[dict[str, Any]]) -> Figure:
    """Figure 1: one distance heatmap per path cell, D[l][l+n] over layer l and block size n.

    Args:
        paths: Path reports (`Summary.paths`): `distance`, `path`, `model`, `task`, `source`, `num_samples`.

    Returns:
        The figure, panels (a), (b), ... in the order given.
    """
    columns = min(len(paths), 3)
    rows = math.ceil(len(paths) / columns)
    figure = Figure(figsize=(5.5 * columns, 4.5 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for i, (ax, report) in enumerate(zip(axes, paths)):
        draw_distance_heatmap(ax, np.asarray(report["distance"]), report["path"])
        letter = chr(ord("a") + i) if i < 26 else str(i + 1)
        source = f"{report['source']}-derived, task {report['task']}, {report['num_samples']} samples"
        ax.set_title(f"({letter}) {report['model']}\n{source}", fontsize="medium")
    for ax in axes[len(paths) :]:
        ax.set_visible(False)
    return figure


def figure2(studies: Sequence[dict[str, Any]], metric: str = "wer") -> Figure:
    """Figure 2: relative change of the score against the fraction of decoder layers removed.

    One row per model, one column per evaluation set, one line per (study, path, healing) starting at (0, 0),
    and the threshold (0.25 for WER, -0.10 for BLEU) as a grey dashed line.

    Args:
        studies: Study tables (`grid.stages.study_table`); those with `metric` are drawn.
        metric: `wer` or `bleu`.

    Returns:
        The figure.
    """
    results = [(study, r) for study in studies if study["metric"] == metric for r in study["results"] if r["rows"]]
    models = list(dict.fromkeys(result["model"] for _, result in results))
    sets = list(dict.fromkeys(name for _, result in results for name in result["baseline"]))
    figure = Figure(figsize=(4.5 * len(sets), 3.5 * len(models)), layout="constrained")
    axes = figure.subplots(len(models), len(sets), squeeze=False, sharex=True)
    several_studies = len({study["study"] for study, _ in results}) > 1
    for row, model in enumerate(models):
        for column, name in enumerate(sets):
            ax = axes[row][column]
            ax.axhline(_THRESHOLDS[metric], color="grey", linestyle="--", linewidth=1, label="threshold")
            ax.set_title(f"{model}, {name}")
            ax.set_xlabel("fraction of decoder layers removed")
            ax.set_ylabel(f"relative {metric.upper()} change")
    for study, result in results:
        row = models.index(result["model"])
        for name in result["baseline"]:
            points = [(0.0, 0.0)] + [
                (r["fraction"], r["delta"][name]) for r in result["rows"] if r["delta"].get(name) is not None
            ]
            label = f"{result['path_label']}, {result['healing']}"
            label = f"{study['study']}: {label}" if several_studies else label
            axes[row][sets.index(name)].plot(*zip(*points), marker="o", label=label)
    for ax in axes.ravel():
        ax.legend(fontsize="small")
    return figure


def _require_experiment(uri: str, name: str) -> None:
    if not store_has_experiment(uri, name):
        raise ValueError(f"the MLflow store {uri} has no experiment {name!r}: run `slamgrid run` on it first")


def _row_at(result: dict[str, Any], fraction: float) -> dict[str, Any] | None:
    """The pruned row of a result at `fraction`; None when that depth was not run (or a fraction of 0)."""
    return next((row for row in result["rows"] if math.isclose(row["fraction"], fraction)), None)


def _sets(study: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(name for result in study["results"] for name in result["baseline"]))


def _cells(scores: dict[str, float], sets: Sequence[str]) -> list[str]:
    return [_score(scores.get(name)) for name in sets]


def _score(value: float | None) -> str:
    return _NONE if value is None else f"{value:.2f}"


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else format_percent(value)


def _aligned(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(line[i])) for line in [header, *rows] if i < len(line)) for i in range(len(header))]
    lines = [header, *rows]
    return "\n".join("  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in lines)


def _search_note(study: dict[str, Any]) -> str:
    """For a bisect study: how its depths were chosen, and what the answer assumes."""
    if study.get("search", "sweep") == "sweep":
        return ""
    return (
        "\n(search: bisect, a binary search over the depths, which assumes that degradation grows with depth; "
        "a sweep checks every depth)"
    )
