"""Tables 1 and 2 as text, CSV and Markdown, Figures 1 and 2, and `Summary.write`, from study tables written here.

No Ray and no MLflow store: the study tables have the shape `grid.stages.study_table` gives (its results built
with the slam metrics), the path reports are `slam.redundancy.path_report`s of fixed matrices and their
agreement is `grid.stages.path_comparisons`'s, so the pairing of Figure 1 is checked against the labels it makes.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from grid.stages import path_comparisons
from grid.summarize import (
    figure1,
    figure2,
    model_family,
    summary_of,
    table1,
    table1_blocks,
    table2,
    table2_blocks,
    table_csv,
    table_markdown,
    table_text,
)
from slam.metrics import relative_change, removable_fraction
from slam.redundancy import DistanceResult, path_agreement, path_report


def _result(model: str, path_label: str, healing: str, metric: str, baseline: dict, pruned: dict) -> dict:
    """One (model, path, healing) of a study table: its rows, relative changes and removable fraction."""
    rows = [
        {
            "n": n,
            "fraction": fraction,
            "scores": scores,
            "delta": {name: relative_change(scores[name], base) if base else None for name, base in baseline.items()},
        }
        for n, (fraction, scores) in enumerate(pruned.items(), start=2)
    ]
    zero = [name for name, base in baseline.items() if base == 0]
    note = f"baseline {metric} is 0 on {', '.join(zero)}: the relative change is undefined" if zero else None
    return {
        "model": model,
        "path_label": path_label,
        "healing": healing,
        "baseline": baseline,
        "rows": rows,
        "removable_fraction": None if zero else removable_fraction(baseline, pruned, metric),
        "note": note,
    }


def _study(name: str, metric: str, results: list[dict], search: str = "sweep", paths=(), agreement=()) -> dict:
    return {
        "study": name,
        "task": "asr" if metric == "wer" else "ast",
        "search": search,
        "metric": metric,
        "threshold": {"wer": 0.25, "bleu": -0.1}[metric],
        "results": results,
        "paths": list(paths),
        "agreement": list(agreement),
    }


ASR = _study("asr", "wer", [
    _result("Qwen2.5-7B", "speech-asr", "decoder+projector", "wer", {"test-clean": 2.0, "test-other": 4.0},
            {0.25: {"test-clean": 2.1, "test-other": 5.0}, 0.5: {"test-clean": 3.0, "test-other": 9.0}}),
    _result("Llama-3.2-1B", "text-asr", "none", "wer", {"test-clean": 0.0, "test-other": 8.0},
            {0.25: {"test-clean": 1.0, "test-other": 9.0}}),
])  # fmt: skip
BISECT = _study("asr-bisect", "wer", [
    _result("Qwen2.5-1.5B", "speech-asr", "none", "wer", {"test-clean": 3.0, "test-other": 6.0},
            {0.125: {"test-clean": 3.3, "test-other": 6.5}}),
], search="bisect")  # fmt: skip
AST = _study("ast", "bleu", [
    _result("Qwen2.5-7B", "speech-ast", "decoder+projector", "bleu", {"fr-en": 30.0, "en-de": 20.0},
            {0.25: {"fr-en": 29.0, "en-de": 19.5}, 0.5: {"fr-en": 20.0, "en-de": 15.0}}),
    _result("Qwen2.5-7B", "speech-asr", "decoder+projector", "bleu", {"fr-en": 30.0, "en-de": 20.0},
            {0.25: {"fr-en": 28.5, "en-de": 19.0}}),
    _result("Qwen2.5-7B", "speech-ast", "none", "bleu", {"fr-en": 30.0, "en-de": 20.0},
            {0.25: {"fr-en": 25.0, "en-de": 17.0}}),
])  # fmt: skip
STUDIES = [ASR, BISECT, AST]

# What `table1` and `table2` printed before the tables were built as blocks: the text must not change.
TABLE_1 = "\n".join([
    "Table 1, study asr: WER (%) before and after pruning; drop = the largest fraction of decoder layers removed "
    "with relative WER change <= 0.25 on every set (where none is, the first failing depth's WER)",
    "model         path        healing            drop %  test-clean" + " " * 57 + "test-other",
    "Qwen2.5-7B    speech-asr  decoder+projector  –       2.00" + " " * 63 + "4.00",
    "+ pruning                                    25.0    2.10" + " " * 63 + "5.00",
    "Llama-3.2-1B  text-asr    none               –       0.00" + " " * 63 + "8.00",
    "+ pruning                                    n/a     baseline wer is 0 on test-clean: the relative change is "
    "undefined",
    "",
    "Table 1, study asr-bisect: WER (%) before and after pruning; drop = the largest fraction of decoder layers "
    "removed with relative WER change <= 0.25 on every set (where none is, the first failing depth's WER)",
    "(search: bisect, a binary search over the depths, which assumes that degradation grows with depth; a sweep "
    "checks every depth)",
    "model         path        healing  drop %  test-clean  test-other",
    "Qwen2.5-1.5B  speech-asr  none     –       3.00        6.00",
    "+ pruning                          12.5    3.30        6.50",
])  # fmt: skip
TABLE_2 = "\n".join([
    "Table 2, study ast, Qwen2.5-7B, healing decoder+projector: BLEU per fraction of decoder layers removed along "
    "each path; removable: relative BLEU change >= -0.1 on every set",
    "% drop       speech-ast fr-en  speech-ast en-de  speech-asr fr-en  speech-asr en-de",
    "–            30.00             20.00             30.00             20.00",
    "25.0         29.00             19.50             28.50             19.00",
    "50.0         20.00             15.00             –                 –",
    "removable %  25.0              25.0              25.0              25.0",
    "",
    "Table 2, study ast, Qwen2.5-7B, healing none: BLEU per fraction of decoder layers removed along each path; "
    "removable: relative BLEU change >= -0.1 on every set",
    "% drop       speech-ast fr-en  speech-ast en-de",
    "–            30.00             20.00",
    "25.0         25.00             17.00",
    "removable %  0.0               0.0",
])  # fmt: skip


def test_the_text_tables_are_printed_as_before():
    assert table1(STUDIES) == table_text(table1_blocks(STUDIES)) == TABLE_1
    assert table2(STUDIES) == table_text(table2_blocks(STUDIES)) == TABLE_2
    assert table1([AST]) == "" and table2([ASR]) == ""


@pytest.mark.parametrize("build", [table1_blocks, table2_blocks])
def test_the_csv_holds_the_text_table_s_cells_block_by_block(build):
    blocks = build(STUDIES)
    lines = list(csv.reader(io.StringIO(table_csv(blocks))))
    starts = [i for i, line in enumerate(lines) if line[0] == "block"]
    assert len(starts) == len(blocks) == len(table_text(blocks).split("\n\n"))
    for block, start, text in zip(blocks, starts, table_text(blocks).split("\n\n")):
        parsed = lines[start : start + 1 + len(block.rows)]
        assert parsed[0] == ["block", *block.header]
        assert {line[0] for line in parsed[1:]} == {block.name}
        # The text aligns the same cells with spaces: the words of each text line are those of its CSV row.
        printed = text.splitlines()[2 if block.note else 1 :]
        assert [" ".join(line[1:]).split() for line in parsed] == [line.split() for line in printed]
    assert len(lines) == sum(1 + len(block.rows) for block in blocks)


def test_the_csv_names_each_block_and_keeps_the_printed_values():
    lines = list(csv.reader(io.StringIO(table_csv(table1_blocks(STUDIES)))))
    assert lines[0] == ["block", "model", "path", "healing", "drop %", "test-clean", "test-other"]
    assert lines[2] == ["asr", "+ pruning", "", "", "25.0", "2.10", "5.00"]
    assert lines[4][:5] == ["asr", "+ pruning", "", "", "n/a"]
    assert lines[6] == ["asr-bisect", "Qwen2.5-1.5B", "speech-asr", "none", "–", "3.00", "6.00"]
    names = [line[0] for line in csv.reader(io.StringIO(table_csv(table2_blocks(STUDIES)))) if line[0] != "block"]
    assert list(dict.fromkeys(names)) == ["ast/Qwen2.5-7B/decoder+projector", "ast/Qwen2.5-7B/none"]


def test_the_markdown_has_a_title_a_header_and_a_row_per_row():
    blocks = table1_blocks(STUDIES)
    lines = table_markdown(blocks).splitlines()
    assert [line[4:] for line in lines if line.startswith("### ")] == [block.title for block in blocks]
    for block in blocks:
        start = lines.index(f"### {block.title}")
        header = start + (4 if block.note else 2)
        if block.note:
            assert lines[start + 2] == block.note
        assert lines[header] == "| " + " | ".join(block.header) + " |"
        assert lines[header + 1] == "| " + " | ".join(["---"] * len(block.header)) + " |"
        rows = lines[header + 2 : header + 2 + len(block.rows)]
        # A row shorter than the header is padded with empty cells.
        assert [row[2:-2].split(" | ") for row in rows] == [
            row + [""] * (len(block.header) - len(row)) for row in block.rows
        ]
        assert header + 2 + len(block.rows) == len(lines) or lines[header + 2 + len(block.rows)] == ""
    assert "| + pruning |  |  | n/a | baseline wer is 0 on test-clean: the relative change is undefined |  |" in lines


def test_write_puts_every_table_figure_and_the_json_in_the_folder(tmp_path):
    paths, path_studies = _paths_and_studies()
    summary = summary_of("demo", [*STUDIES, *path_studies], paths, cells=12, missing=["abc"])
    folder = tmp_path / "new" / "report"
    written = summary.write(folder)
    tables = ["table1.txt", "table1.csv", "table1.md", "table2.txt", "table2.csv", "table2.md"]
    names = [*tables, "paths.txt", "summary.json"]
    assert [path.name for path in written] == [*names, "figure1.png", "figure2.png", "figure2_bleu.png"]
    assert sorted(path.name for path in folder.iterdir()) == sorted(path.name for path in written)
    assert (folder / "table1.txt").read_text(encoding="utf-8") == TABLE_1 + "\n"
    assert (folder / "paths.txt").read_text(encoding="utf-8") == summary.paths_text + "\n"
    assert "Qwen2.5-7B: text-asr vs speech-asr (paper convention)" in summary.paths_text
    assert (folder / "table2.csv").read_text(encoding="utf-8") == table_csv(table2_blocks(STUDIES))
    assert (folder / "table1.md").read_text(encoding="utf-8") == table_markdown(table1_blocks(STUDIES))
    assert json.loads((folder / "summary.json").read_text(encoding="utf-8")) == json.loads(
        json.dumps(summary.to_dict())
    )
    assert all((folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in summary.figures)


def test_write_leaves_out_the_tables_and_figures_without_results(tmp_path):
    written = summary_of("demo", [ASR], []).write(tmp_path)
    assert [path.name for path in written] == ["table1.txt", "table1.csv", "table1.md", "summary.json", "figure2.png"]


def test_figure1_draws_a_text_and_a_speech_path_side_by_side_on_one_scale():
    paths, studies = _paths_and_studies()
    text, speech = paths[0], paths[1]
    figure = figure1(paths, studies)
    pair, singles = figure.subfigs
    expected = path_agreement(text, speech)["mean_abs_diff"]
    assert expected > 0
    assert pair.get_suptitle() == f"Qwen2.5-7B: mean |D_text − D_speech| = {expected:.4f}"
    panels = [ax for ax in pair.axes if ax.images]
    assert [ax.get_title().split("\n")[1].split(",")[0] for ax in panels] == ["text-derived", "speech-derived"]
    limits = [ax.images[0].get_clim() for ax in panels]
    # The speech matrix reaches higher, and sets the top of the shared scale.
    assert limits[0] == limits[1] == (0.0, pytest.approx(np.max(speech["distance"])))
    assert np.max(text["distance"]) < np.max(speech["distance"])
    assert len(pair.axes) == 3, "two heatmaps and one colour bar"
    # The AST path and the Gromov-convention path have no partner: a panel and a colour bar each.
    alone = [ax for ax in singles.axes if ax.images]
    assert [ax.get_title().split("\n")[0] for ax in alone] == ["(c) Qwen2.5-7B", "(d) Qwen2.5-7B"]
    assert len(singles.axes) == 4
    assert alone[1].get_title().endswith("gromov convention")


def test_figure1_without_studies_gives_every_path_a_panel():
    paths, _ = _paths_and_studies()
    figure = figure1(paths)
    assert [subfigure.get_suptitle() for subfigure in figure.subfigs] == ["", ""]
    titles = [ax.get_title().split("\n")[0] for ax in figure.axes if ax.images]
    assert titles == ["(a) Qwen2.5-7B", "(b) Qwen2.5-7B", "(c) Qwen2.5-7B", "(d) Qwen2.5-7B"]


def test_figure2_has_a_row_per_model_family_and_the_threshold_line():
    sizes = ["Qwen2.5-1.5B", "Qwen2.5-7B", "Llama-3.2-1B", "Llama-3.1-8B"]
    results = [
        _result(model, "speech-asr", "decoder+projector", "wer", {"test-clean": 2.0, "test-other": 4.0},
                {0.25: {"test-clean": 2.0 + i, "test-other": 4.5}})
        for i, model in enumerate(sizes)
    ]  # fmt: skip
    figure = figure2([_study("asr", "wer", results)])
    assert [ax.get_title() for ax in figure.axes] == [
        "Qwen2.5, test-clean",
        "Qwen2.5, test-other",
        "Llama, test-clean",
        "Llama, test-other",
    ]
    for ax, family in zip(figure.axes, ["Qwen2.5-", "Qwen2.5-", "Llama-", "Llama-"]):
        (threshold,) = [line for line in ax.get_lines() if line.get_label().startswith("threshold")]
        assert threshold.get_label() == "threshold 0.25"
        assert list(threshold.get_ydata()) == [0.25, 0.25] and threshold.get_linestyle() == "--"
        # (Markers of points beyond the y-range have no label.)
        curves = [line for line in ax.get_lines() if line is not threshold and not line.get_label().startswith("_")]
        assert [line.get_label().split()[0] for line in curves] == [m for m in sizes if m.startswith(family)]
    clean = next(line for line in figure.axes[0].get_lines() if line.get_label().startswith("Qwen2.5-7B"))
    assert list(clean.get_xdata()) == [0.0, 0.25] and list(clean.get_ydata()) == [0.0, pytest.approx(0.5)]
    (bleu,) = [line for line in figure2([AST], "bleu").axes[0].get_lines() if line.get_label().startswith("thr")]
    assert list(bleu.get_ydata()) == [-0.1, -0.1]


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("Qwen2.5-1.5B", "Qwen2.5"),
        ("Qwen2.5-7B", "Qwen2.5"),
        ("Qwen2.5-7B-Instruct", "Qwen2.5"),
        ("Llama-3.2-1B", "Llama"),
        ("Llama-3.1-8B", "Llama"),
        ("SmolLM2-135M", "SmolLM2"),
        ("tiny-qwen", "tiny-qwen"),
        ("gpt-2", "gpt-2"),
    ],
)
def test_model_family_drops_the_size_and_the_version(name, family):
    assert model_family(name) == family


def _paths_and_studies() -> tuple[list[dict], list[dict]]:
    """Four path reports of one model (text and speech ASR, speech AST, text ASR in Gromov's convention) and
    the studies over them: one compares the text and speech ASR paths, the others have one path each."""
    rng = np.random.default_rng(0)
    cases = [("text", "asr", "paper", 0.4), ("speech", "asr", "paper", 0.6), ("speech", "ast", "paper", 0.5),
             ("text", "asr", "gromov", 0.4)]  # fmt: skip
    paths = []
    for i, (source, task, convention, scale) in enumerate(cases):
        upper = np.triu(rng.uniform(0.05, scale, size=(5, 5)), k=1)  # (m+1, m+1), m = 4 layers
        distance = upper + upper.T
        result = DistanceResult(distance=distance, per_sample=distance[None])
        report = path_report("org/qwen-7b", result, source, convention)
        paths.append({**report, "model": "Qwen2.5-7B", "decoder": report["model"], "task": task, "cell_id": f"p{i}"})
    # A study's `paths` entry, as `grid.stages.study_table` makes it from the path cell's run.
    keys = ("model", "task", "source", "convention", "cell_id")
    studies = []
    for members in ([0, 1], [2], [3]):
        entries = [{key: paths[i][key] for key in keys} for i in members]
        agreement = path_comparisons(entries, [paths[i] for i in members])
        studies.append(_study(f"paths-{members[0]}", "wer", [], paths=entries, agreement=agreement))
    return paths, studies


def test_table1_shows_the_first_failing_depth_where_nothing_is_removable():
    result = _result("Llama-3.2-1B", "speech-asr", "none", "wer", {"test": 10.0},
                     {0.125: {"test": 13.0}, 0.25: {"test": 20.0}})  # fmt: skip
    assert result["removable_fraction"] == 0.0
    (block,) = table1_blocks([_study("asr", "wer", [result])])
    assert block.rows == [
        ["Llama-3.2-1B", "speech-asr", "none", "–", "10.00"],
        ["+ pruning", "", "", "0.0", "–"],
        ["first failing", "", "", "12.5", "13.00"],
    ]
    # Where a depth is removable, there is no such row.
    (passing,) = table1_blocks([ASR])[:1]
    assert not any(row[0] == "first failing" for row in passing.rows)


def test_figure2_keeps_the_threshold_readable_and_marks_the_points_beyond_its_range():
    result = _result("Qwen2.5-7B", "speech-asr", "none", "wer", {"test": 2.0},
                     {0.125: {"test": 2.2}, 0.25: {"test": 2.6}, 0.5: {"test": 8.0}})  # fmt: skip
    (ax,) = figure2([_study("asr", "wer", [result])]).axes
    low, high = ax.get_ylim()
    assert (low, high) == (pytest.approx(-0.05), pytest.approx(1.05))  # 4 thresholds up, a fifth of one beyond
    assert low < 0.25 < high  # the threshold in view, however far the deepest cut went (+300%)
    curve = next(line for line in ax.get_lines() if line.get_label().startswith("Qwen2.5-7B"))
    assert list(curve.get_ydata()) == [0.0, pytest.approx(0.1), pytest.approx(0.3), pytest.approx(1.05)]
    (beyond,) = [line for line in ax.get_lines() if line.get_marker() == "^"]
    assert (list(beyond.get_xdata()), list(beyond.get_ydata())) == ([0.5], [pytest.approx(1.05)])
    assert [text.get_text() for text in ax.texts] == ["+3.00"]  # (8 - 2) / 2, its true value
    bleu = _result(
        "Qwen2.5-7B", "speech-ast", "none", "bleu", {"test": 30.0}, {0.25: {"test": 27.0}, 0.5: {"test": 6.0}}
    )
    (ax,) = figure2([_study("ast", "bleu", [bleu])], "bleu").axes
    assert ax.get_ylim() == (pytest.approx(-0.42), pytest.approx(0.02))
    assert ax.get_ylim()[0] < -0.1 < ax.get_ylim()[1]
    assert [line.get_marker() for line in ax.get_lines() if line.get_marker() in "^v"] == ["v"]
    assert [text.get_text() for text in ax.texts] == ["-0.80"]
