"""The paper's tables and figures for an experiment file, computed from its MLflow store alone.

`summarize(path)` finds the FINISHED run of every cell of the file (by `cell_id`), rebuilds each study's table
from those runs (`grid.stages.study_table`, what the summary cells log) and lays the results out as the paper does:

- Table 1 (every ASR study): per (model, path, healing), the baseline WER on each evaluation set, then the
  largest fraction of decoder layers removed with delta_WER <= 0.25 on every set at once and the WER there.
- Table 2 (every AST study): BLEU per fraction removed, one column per (path, evaluation set), so that the
  task's own path and a path measured on another task (the paper's AST- and ASR-optimal paths) sit side by side;
  the last row is each path's removable fraction (delta_BLEU >= -0.10).
- Figure 1: the distance heatmap D[l][l+n] of every path cell, its optimal path marked; a text- and a
  speech-derived path of one model and convention side by side on one colour scale, titled with their mean
  absolute difference (paper Figure 1 (a) vs (b)); a path without such a partner in a panel of its own.
- Figure 2: the relative WER change against the fraction removed, a row per model family (`model_family`) and a
  column per evaluation set, a line per (model, path, healing), and the threshold as a grey dashed line (and the
  same for BLEU when the file has AST studies).

Each table is built once as blocks of plain data (`TableBlock`: a title, a header and rows) and rendered three
ways: aligned text (`table_text`, what `slamgrid summarize` prints), CSV (`table_csv`) and Markdown
(`table_markdown`).

A grid that has not finished is summarised from what has: cells without a FINISHED run are left out and counted,
and a prune cell whose baseline is missing is left out with it. `Summary.write` puts everything in a folder
(`table1.txt`, `table1.csv`, `table1.md`, the same for `table2`, `paths.txt`, `summary.json`, `figure1.png`,
`figure2.png`, `figure2_bleu.png`, those the results allow); with `log=True` the same files go to the experiment's
parent run under `report/`, beside the per-study `summaries/` of the summary cells, and the tables in Markdown become
the run's description (what MLflow's UI shows on its page). `paths.txt` compares, per
model, the text- and speech-derived paths of every study that has both (paper Figure 1 (a) vs (b)).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from grid.cells import Cell, expand
from grid.experiment import load_experiment
from grid.stages import DISTANCE_ARTIFACT, draw_distance_heatmap, path_cell_label, study_table
from grid.tracking import GridStore, store_has_experiment
from grid.tracking import tracking_uri as resolve_tracking_uri
from slam.metrics import BLEU_THRESHOLD, WER_THRESHOLD, format_percent

REPORT_DIR = "report"
"""Artifact directory of the summary on the experiment's parent run."""
TABLES = ("table1", "table2")
"""The tables of a summary, by the name of their files."""
_FINISHED = "FINISHED"
_THRESHOLDS = {"wer": WER_THRESHOLD, "bleu": BLEU_THRESHOLD}
_Y_RANGE = 4.0  # Figure 2 spans this many thresholds on the failing side: +100% WER, -40% BLEU
_Y_MARGIN = 0.2  # and a fifth of a threshold beyond, so that points at an edge are not cut in half
_NONE = "–"
# A size such as `-7B`, `-1.5B` or `-135M`, and whatever follows it (`-Instruct`), then a version such as `-3.2`.
_SIZE_SUFFIX = re.compile(r"-\d+(\.\d+)?[BbMm](-.*)?$")
_VERSION_SUFFIX = re.compile(r"-\d+(\.\d+)*$")


@dataclass
class TableBlock:
    """One block of Table 1 or Table 2: rows under one header, as the text, CSV and Markdown renderers take them."""

    name: str
    """What the block holds: its study (Table 1) or `study/model/healing` (Table 2); the CSV's first column."""
    title: str
    """The line above the block."""
    header: list[str]
    """The column names."""
    rows: list[list[str]]
    """The cells as printed; a row may be shorter than the header (Table 1's `+ pruning` row with only a note)."""
    note: str = ""
    """How a bisect study chose its depths, printed under the title; empty for a sweep."""


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
    tables: dict[str, list[TableBlock]] = field(default_factory=dict)
    """`table1` and `table2` as blocks; a table without a block has no ASR (AST) result."""
    paths_text: str = ""
    """Figure 1 (a) vs (b): how each model's text- and speech-derived paths agree; empty without such a pair."""
    figures: dict[str, Figure] = field(default_factory=dict)
    """`figure1`, `figure2` (WER) and `figure2_bleu`, those the results allow."""
    cells: int = 0
    """Cells of the experiment file, summary cells included."""
    missing: list[str] = field(default_factory=list)
    """Ids of the cells whose results are left out: no FINISHED run, or a prune cell without its baseline."""

    @property
    def table1(self) -> str:
        """Table 1 as text; empty without an ASR study."""
        return table_text(self.tables.get("table1", []))

    @property
    def table2(self) -> str:
        """Table 2 as text; empty without an AST study."""
        return table_text(self.tables.get("table2", []))

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

    def write(self, directory: str | Path) -> list[Path]:
        """Write the tables, the JSON and the figures into `directory`, created if missing.

        Args:
            directory: The output folder; files of the same names there are replaced.

        Returns:
            The files written: `table1.txt`, `table1.csv`, `table1.md` and the same for `table2` (each table that
            has a block), `paths.txt` (when a text and a speech path compare), `summary.json`, then a PNG per figure.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        texts = {}
        for name in TABLES:
            blocks = self.tables.get(name, [])
            if blocks:
                texts[f"{name}.txt"] = table_text(blocks) + "\n"
                texts[f"{name}.csv"] = table_csv(blocks)
                texts[f"{name}.md"] = table_markdown(blocks)
        if self.paths_text:
            texts["paths.txt"] = self.paths_text + "\n"
        texts["summary.json"] = json.dumps(self.to_dict(), indent=2) + "\n"
        written = []
        for name, text in texts.items():
            # newline="": "\n" as it is on every platform, so that the files (and the run's artifacts) are the same.
            (directory / name).write_text(text, encoding="utf-8", newline="")
            written.append(directory / name)
        for name, figure in self.figures.items():
            figure.savefig(directory / f"{name}.png")
            written.append(directory / f"{name}.png")
        return written


def summarize(
    path: str | Path, tracking_uri: str | None = None, log: bool = True, out: str | Path | None = None
) -> Summary:
    """Compute the tables and figures of an experiment file from its MLflow store, and log them.

    Args:
        path: The experiment file.
        tracking_uri: MLflow tracking URI; None: `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db`.
        log: Log the files of `Summary.write` (tables as text, CSV and Markdown, the JSON, the figures) on the
            parent run under `report/`, and set its description (what MLflow's UI shows on the run's page) to the
            tables in Markdown.
        out: A folder to write those files into as well (`Summary.write`); None: none.

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
    if log or out is not None:
        # The parent run gets the very files of `write`, so that the folder and the run never differ.
        with tempfile.TemporaryDirectory(prefix="slamgrid-summary-") as scratch:
            files = summary.write(scratch if out is None else out)
            if log:
                parent = store.parent_run()
                for file in files:
                    store.log_artifact(parent, file, REPORT_DIR)
                store.describe_parent(_report_note(summary), f"`{REPORT_DIR}/table1.md` and `{REPORT_DIR}/table2.md`")
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
    return summary_of(experiment, studies, paths, cells=len(cells), missing=missing)


def summary_of(
    experiment: str,
    studies: Sequence[dict[str, Any]],
    paths: Sequence[dict[str, Any]],
    cells: int = 0,
    missing: Sequence[str] = (),
) -> Summary:
    """The tables and figures of study tables and path reports, however they were obtained.

    Args:
        experiment: The experiment's name.
        studies: Study tables (`grid.stages.study_table`).
        paths: Path reports (`Summary.paths`).
        cells: Cells of the experiment file.
        missing: Ids of the cells left out.

    Returns:
        The summary.
    """
    figures = {}
    if paths:
        figures["figure1"] = figure1(paths, studies)
    for metric, name in (("wer", "figure2"), ("bleu", "figure2_bleu")):
        if any(result["rows"] for study in studies if study["metric"] == metric for result in study["results"]):
            figures[name] = figure2(studies, metric)
    return Summary(
        experiment=experiment,
        studies=list(studies),
        paths=list(paths),
        tables={"table1": table1_blocks(studies), "table2": table2_blocks(studies)},
        paths_text=path_agreement_text(studies),
        figures=figures,
        cells=cells,
        missing=list(missing),
    )


def table1_blocks(studies: Sequence[dict[str, Any]]) -> list[TableBlock]:
    """Table 1: baseline WER and WER at the removable fraction, per (model, path, healing) of each ASR study.

    Args:
        studies: Study tables (`grid.stages.study_table`); those with metric `wer` are used.

    Returns:
        One block per study with an ASR result, named by the study: a baseline row per (model, path, healing),
        then its `+ pruning` row (the removable fraction and the WER there), and, where nothing is removable, a
        `first failing` row: the shallowest depth run and its WER, which missed the threshold.
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
            if at is None and result["rows"]:
                # Nothing is removable: the shallowest depth run shows by how much it missed.
                first = min(result["rows"], key=lambda row: row["fraction"])
                failing = format_percent(first["fraction"])
                rows.append(["first failing", "", "", failing, *_cells(first["scores"], sets)])
        title = (
            f"Table 1, study {study['study']}: WER (%) before and after pruning; drop = the largest fraction of "
            f"decoder layers removed with relative WER change <= {study['threshold']:g} on every set (where none "
            "is, the first failing depth's WER)"
        )
        blocks.append(TableBlock(study["study"], title, header, rows, _search_note(study)))
    return blocks


def table2_blocks(studies: Sequence[dict[str, Any]]) -> list[TableBlock]:
    """Table 2: BLEU per fraction removed, a column per (path, evaluation set), per (model, healing) of each AST study.

    Args:
        studies: Study tables (`grid.stages.study_table`); those with metric `bleu` are used.

    Returns:
        One block per (study, model, healing), named `study/model/healing`: the baseline row, a row per fraction
        removed, and the removable fraction of each path.
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
            name = f"{study['study']}/{model}/{healing}"
            blocks.append(TableBlock(name, title, header, rows, _search_note(study)))
    return blocks


def table1(studies: Sequence[dict[str, Any]]) -> str:
    """Table 1 (`table1_blocks`) as aligned text.

    Args:
        studies: Study tables (`grid.stages.study_table`); those with metric `wer` are used.

    Returns:
        The table, one block per study; empty when there is no ASR result.
    """
    return table_text(table1_blocks(studies))


def table2(studies: Sequence[dict[str, Any]]) -> str:
    """Table 2 (`table2_blocks`) as aligned text.

    Args:
        studies: Study tables (`grid.stages.study_table`); those with metric `bleu` are used.

    Returns:
        The table, one block per (study, model, healing); empty when there is no AST result.
    """
    return table_text(table2_blocks(studies))


def table_text(blocks: Sequence[TableBlock]) -> str:
    """Blocks as `slamgrid summarize` prints them: each title (and note), then its columns aligned.

    Args:
        blocks: The blocks of one table.

    Returns:
        The blocks, a blank line between two; empty without a block.
    """
    parts = []
    for block in blocks:
        title = f"{block.title}\n{block.note}" if block.note else block.title
        parts.append(title + "\n" + _aligned(block.header, block.rows))
    return "\n\n".join(parts)


def table_csv(blocks: Sequence[TableBlock]) -> str:
    """Blocks as one CSV: per block its header row, then its rows, each led by a column naming the block.

    A header row starts with `block`, so a reader splits the file into blocks where the first cell is `block`.
    The cells are the text table's (`–` for a missing score, percentages as printed).

    Args:
        blocks: The blocks of one table.

    Returns:
        The CSV text, lines ended by a newline; empty without a block.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for block in blocks:
        writer.writerow(["block", *block.header])
        writer.writerows([block.name, *row] for row in block.rows)
    return buffer.getvalue()


def table_markdown(blocks: Sequence[TableBlock]) -> str:
    """Blocks as Markdown: per block a `### title` line, its note, and a pipe table.

    Args:
        blocks: The blocks of one table.

    Returns:
        The Markdown text, lines ended by a newline; empty without a block.
    """
    parts = []
    for block in blocks:
        lines = [f"### {block.title}", ""]
        if block.note:
            lines += [block.note, ""]
        width = len(block.header)
        # A row shorter than the header (a note in Table 1) is padded: a pipe table needs a cell per column.
        for row in [block.header, ["---"] * width, *block.rows]:
            cells = [_markdown_cell(cell) for cell in row] + [""] * (width - len(row))
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


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


def figure1(paths: Sequence[dict[str, Any]], studies: Sequence[dict[str, Any]] = ()) -> Figure:
    """Figure 1: the distance heatmaps D[l][l+n] over layer l and block size n of the path cells.

    A text- and a speech-derived path that a study compares (its `agreement`) share a row: the text panel on the
    left, the speech panel on the right, one colour scale and one colour bar, and the row titled with the mean
    absolute difference of the two matrices, as the paper's Figure 1 (a) and (b). Every other path cell gets a
    panel of its own, two to a row, after the pairs.

    Args:
        paths: Path reports (`Summary.paths`): `distance`, `path`, `model`, `task`, `source`, `convention`,
            `num_samples`, `cell_id`.
        studies: Study tables (`grid.stages.study_table`) whose `agreement` pairs the paths; none: no pair.

    Returns:
        The figure, panels (a), (b), ... in the order drawn.
    """
    pairs = _path_pairs(paths, studies)
    paired = {report["cell_id"] for text, speech, _ in pairs for report in (text, speech)}
    singles = [report for report in paths if report["cell_id"] not in paired]
    columns = 2 if pairs or len(singles) > 1 else 1
    rows = len(pairs) + math.ceil(len(singles) / columns)
    figure = Figure(figsize=(5.5 * columns, 4.9 * rows), layout="constrained")
    subfigures = list(figure.subfigures(rows, 1, squeeze=False).ravel())
    panels = 0
    for subfigure, (text, speech, pair) in zip(subfigures, pairs):
        matrices = [np.asarray(text["distance"]), np.asarray(speech["distance"])]
        # One scale for both panels, so that equal colours are equal distances; 0 is the least a distance can be.
        vmax = max(float(np.nanmax(matrix)) for matrix in matrices)
        axes = subfigure.subplots(1, 2)
        for ax, report, matrix in zip(axes, (text, speech), matrices):
            draw_distance_heatmap(ax, matrix, report["path"], vmin=0.0, vmax=vmax, colorbar=ax is axes[-1])
            _panel_title(ax, panels, report)
            panels += 1
        convention = "" if pair["convention"] == "paper" else f" ({pair['convention']} convention)"
        subfigure.suptitle(f"{pair['model']}{convention}: mean |D_text − D_speech| = {pair['mean_abs_diff']:.4f}")
    for row, subfigure in enumerate(subfigures[len(pairs) :]):
        chunk = singles[row * columns : (row + 1) * columns]
        axes = subfigure.subplots(1, columns, squeeze=False).ravel()
        for ax, report in zip(axes, chunk):
            draw_distance_heatmap(ax, np.asarray(report["distance"]), report["path"])
            _panel_title(ax, panels, report)
            panels += 1
        for ax in axes[len(chunk) :]:
            ax.set_visible(False)
    return figure


def figure2(studies: Sequence[dict[str, Any]], metric: str = "wer") -> Figure:
    """Figure 2: relative change of the score against the fraction of decoder layers removed.

    One row per model family (`model_family`), one column per evaluation set, one line per (study, model, path,
    healing) starting at (0, 0), and the threshold (0.25 for WER, -0.10 for BLEU) as a grey dashed line. The
    y-axis shows the decision: it spans `_Y_RANGE` times the threshold on the failing side (+100% WER, -40% BLEU)
    and what the points need on the other, so that the threshold and the points near it stay readable however far
    the deepest cuts go; a point beyond the range sits on the axis's edge as a triangle pointing out, labelled
    with its value.

    Args:
        studies: Study tables (`grid.stages.study_table`); those with `metric` are drawn.
        metric: `wer` or `bleu`.

    Returns:
        The figure.
    """
    results = [(study, r) for study in studies if study["metric"] == metric for r in study["results"] if r["rows"]]
    families = list(dict.fromkeys(model_family(result["model"]) for _, result in results))
    sets = list(dict.fromkeys(name for _, result in results for name in result["baseline"]))
    figure = Figure(figsize=(4.5 * len(sets), 3.5 * len(families)), layout="constrained")
    axes = figure.subplots(len(families), len(sets), squeeze=False, sharex=True)
    threshold = _THRESHOLDS[metric]
    for row, family in enumerate(families):
        for column, name in enumerate(sets):
            ax = axes[row][column]
            ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
            ax.set_title(f"{family}, {name}")
            ax.set_xlabel("fraction of decoder layers removed")
            ax.set_ylabel(f"relative {metric.upper()} change")
    several_studies = len({study["study"] for study, _ in results}) > 1
    low, high = _y_range(results, threshold)
    for study, result in results:
        row = families.index(model_family(result["model"]))
        for name in result["baseline"]:
            points = [(0.0, 0.0)] + [
                (r["fraction"], r["delta"][name]) for r in result["rows"] if r["delta"].get(name) is not None
            ]
            label = f"{result['model']} {result['path_label']}, {result['healing']}"
            label = f"{study['study']}: {label}" if several_studies else label
            ax = axes[row][sets.index(name)]
            xs, ys = zip(*points)
            shown = np.clip(ys, low, high)
            (line,) = ax.plot(xs, shown, marker="o", label=label)
            for x, y, edge in zip(xs, ys, shown):
                if y != edge:
                    ax.plot([x], [edge], marker="^" if y > high else "v", color=line.get_color(), markersize=9)
                    ax.annotate(f"{y:+.2f}", (x, edge), textcoords="offset points", xytext=(4, -10 if y > high else 4),
                                fontsize="x-small", color=line.get_color())  # fmt: skip
    for ax in axes.ravel():
        ax.set_ylim(low, high)
        ax.legend(fontsize="small")
    return figure


def _y_range(results: Sequence[tuple[dict, dict]], threshold: float) -> tuple[float, float]:
    """Figure 2's y-range: `_Y_RANGE` thresholds on the failing side, the points' extent on the other (and 0)."""
    deltas = [d for _, result in results for row in result["rows"] for d in row["delta"].values() if d is not None]
    margin = abs(threshold) * _Y_MARGIN
    if threshold > 0:  # WER: a rise fails
        return min([0.0, *deltas]) - margin, threshold * _Y_RANGE + margin
    return threshold * _Y_RANGE - margin, max([0.0, *deltas]) + margin


def model_family(name: str) -> str:
    """The family of a model, a row of Figure 2: its name without the size suffix, and then without a version.

    `Qwen2.5-1.5B` and `Qwen2.5-7B` are `Qwen2.5` (the version is part of the name); `Llama-3.2-1B` and
    `Llama-3.1-8B` are `Llama` (the version `-3.2` follows a hyphen and goes with the size); a suffix after the
    size goes too (`Qwen2.5-7B-Instruct` is `Qwen2.5`). A name without a size (the demo's `tiny-qwen`) is its own
    family.

    Args:
        name: The model's name in the experiment file.

    Returns:
        The family's name.
    """
    family = _SIZE_SUFFIX.sub("", name)
    return name if family == name else _VERSION_SUFFIX.sub("", family)


def _report_note(summary: Summary) -> str:
    """The parent run's description: a line on what the report covers, Table 1 and Table 2 as Markdown, the paths."""
    done = summary.cells - len(summary.missing)
    parts = [
        f"**{summary.experiment}**: the report of `slamgrid summarize` ({done} of {summary.cells} cells finished); "
        f"its files (the tables as text, CSV and Markdown, the figures, `summary.json`) are the artifacts under "
        f"`{REPORT_DIR}/`."
    ]
    parts += [table_markdown(summary.tables.get(name, [])) for name in TABLES]
    if summary.paths_text:
        # Preformatted: the lines are indented, which Markdown would otherwise fold into one paragraph.
        parts.append(f"```\n{summary.paths_text}\n```")
    if not any(summary.tables.values()):
        parts.append("No finished evaluation to summarise yet.")
    return "\n\n".join(part.strip("\n") for part in parts if part) + "\n"


def _require_experiment(uri: str, name: str) -> None:
    if not store_has_experiment(uri, name):
        raise ValueError(f"the MLflow store {uri} has no experiment {name!r}: run `slamgrid run` on it first")


def _path_pairs(
    paths: Sequence[dict[str, Any]], studies: Sequence[dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(text report, speech report, agreement entry) of every pair the studies compare, once per pair of cells.

    An agreement entry names its paths by label (`grid.stages.path_comparisons`); the study's own `paths` give the
    cell of each label with the same labelling, and the cell its report.
    """
    reports = {report["cell_id"]: report for report in paths}
    seen, pairs = set(), []
    for study in studies:
        cells = {(path["model"], path_cell_label(path)): path["cell_id"] for path in study.get("paths", [])}
        for pair in study.get("agreement", []):
            key = (cells.get((pair["model"], pair["text"])), cells.get((pair["model"], pair["speech"])))
            if key in seen or not all(cell in reports for cell in key):
                continue
            seen.add(key)
            pairs.append((reports[key[0]], reports[key[1]], pair))
    return pairs


def _panel_title(ax: Axes, index: int, report: dict[str, Any]) -> None:
    """Title a Figure 1 panel `(a) model` over where its path comes from."""
    letter = chr(ord("a") + index) if index < 26 else str(index + 1)
    source = f"{report['source']}-derived, task {report['task']}, {report['num_samples']} samples"
    convention = "" if report.get("convention", "paper") == "paper" else f", {report['convention']} convention"
    ax.set_title(f"({letter}) {report['model']}\n{source}{convention}", fontsize="medium")


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


def _markdown_cell(cell: str) -> str:
    """A cell of a pipe table: a `|` in it would end the cell."""
    return str(cell).replace("|", "\\|")


def _search_note(study: dict[str, Any]) -> str:
    """For a bisect study: how its depths were chosen, and what the answer assumes."""
    if study.get("search", "sweep") == "sweep":
        return ""
    return (
        "(search: bisect, a binary search over the depths, which assumes that degradation grows with depth; "
        "a sweep checks every depth)"
    )
