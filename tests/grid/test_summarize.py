"""The demo grid end to end, shrunk, and `slamgrid summarize` on its store.

`experiments/demo.yaml` runs as shipped (the demo backbones, corpus, studies and prompts) except for its sizes
(`tests.grid.world.shrunk_demo`): 20 training steps, 3 healing steps, 8 training, 4 dev and 6 test utterances, fewer
depths. The summary's numbers
are then checked against the slam functions applied to what the cells logged (their hypotheses and references).
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from grid.cells import expand
from grid.cli import main
from grid.experiment import load_experiment
from grid.summarize import REPORT_DIR, collect, summarize, table1
from grid.tracking import GridStore
from slam.metrics import corpus_bleu, corpus_wer, format_percent, removable_fraction
from slam.redundancy import path_agreement
from tests.grid.world import shrunk_demo, slamgrid_run

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "experiments" / "demo.yaml"
# What the demo's summary writes: both tables as text, CSV and Markdown, the paths, the JSON and every figure.
REPORT_FILES = [f"table{i}.{ext}" for i in (1, 2) for ext in ("txt", "csv", "md")] + [
    "paths.txt", "summary.json", "figure1.png", "figure2.png", "figure2_bleu.png"
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str, str]:
    """The shrunk demo grid run once through `slamgrid run` on a local Ray with 2 logical GPUs: (file, uri, stdout)."""
    root = tmp_path_factory.mktemp("demo")
    path = shrunk_demo(root)
    uri = f"sqlite:///{root}/mlflow.db"
    return path, uri, slamgrid_run(path, uri, root / "out", gpus=2)


def test_the_demo_grid_finishes_and_prints_its_tables(demo_run):
    path, uri, out = demo_run
    cells = expand(load_experiment(path))
    runs = _runs(uri)
    assert sorted(r.data.tags["cell_id"] for r in runs) == sorted(c.id for c in cells)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert f"demo: {len(cells)} cells\n  FINISHED  {len(cells)}\n" in out
    assert "Table 1, study asr:" in out and "Table 2, study ast, tiny-qwen, healing decoder+projector:" in out
    assert f"mlflow ui --backend-store-uri {uri}" in out


def test_table1_equals_the_slam_metrics_on_the_logged_hypotheses(demo_run):
    path, uri, _ = demo_run
    summary = summarize(path, tracking_uri=uri, log=False)
    assert summary.missing == []
    store = GridStore(uri, "demo")
    runs = _runs(uri)
    (baseline_run,) = _select(runs, {"cell_kind": "eval", "task": "asr"})
    baseline = {"test": _rescored(store, baseline_run, "wer")}
    asr = next(study for study in summary.studies if study["study"] == "asr")
    assert [(r["path_label"], r["healing"]) for r in asr["results"]] == [
        ("speech-asr", "none"),
        ("speech-asr", "decoder+projector"),
    ]
    lines = summary.table1.splitlines()
    for result in asr["results"]:
        assert result["baseline"]["test"] == pytest.approx(baseline["test"], abs=1e-9)
        wanted = {"cell_kind": "prune", "task": "asr", "healing": result["healing"], "path.source": "speech"}
        pruned = {r.data.metrics["fraction"]: {"test": _rescored(store, r, "wer")} for r in _select(runs, wanted)}
        assert sorted(pruned) == [row["fraction"] for row in result["rows"]] == [1 / 8, 2 / 8]
        expected = removable_fraction(baseline, pruned, "wer")
        assert result["removable_fraction"] == expected
        row = next(line for line in lines if line.startswith("tiny-qwen") and result["healing"] in line.split())
        assert row.split()[-1] == f"{baseline['test']:.2f}"
        pruned_line = lines[lines.index(row) + 1].split()
        assert pruned_line[:3] == ["+", "pruning", format_percent(expected)]
        if expected > 0:
            assert pruned_line[3] == f"{pruned[expected]['test']:.2f}"


def test_table2_equals_the_slam_bleu_of_each_path(demo_run):
    path, uri, _ = demo_run
    summary = summarize(path, tracking_uri=uri, log=False)
    store = GridStore(uri, "demo")
    runs = _runs(uri)
    (baseline_run,) = _select(runs, {"cell_kind": "eval", "task": "ast"})
    baseline = {"test": _rescored(store, baseline_run, "bleu")}
    ast = next(study for study in summary.studies if study["study"] == "ast")
    assert sorted(r["path_label"] for r in ast["results"]) == ["speech-asr", "speech-ast"]
    header, base_row, *rows = summary.table2.splitlines()[1:]
    assert header.split() == ["%", "drop", "speech-ast", "test", "speech-asr", "test"]
    assert base_row.split() == ["–", f"{baseline['test']:.2f}", f"{baseline['test']:.2f}"]
    for column, result in enumerate(ast["results"]):
        wanted = {"cell_kind": "prune", "task": "ast", "path.task": result["path"]["task"]}
        scores = {r.data.metrics["fraction"]: {"test": _rescored(store, r, "bleu")} for r in _select(runs, wanted)}
        assert len(scores) == 1
        ((fraction, score),) = scores.items()
        line = next(row.split() for row in rows if row.startswith(format_percent(fraction)))
        assert line[1 + column] == f"{score['test']:.2f}"
        removable = next(row.split() for row in rows if row.startswith("removable"))
        expected = removable_fraction(baseline, scores, "bleu") if baseline["test"] > 0 else None
        assert result["removable_fraction"] == expected
        assert removable[2 + column] == ("n/a" if expected is None else format_percent(expected))


def test_summarize_logs_tables_and_figures_to_the_parent_run(demo_run, capsys):
    path, uri, _ = demo_run
    assert main(["summarize", str(path), "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    store = GridStore(uri, "demo")
    parent = store.parent_run()
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(parent, REPORT_DIR)}
    assert logged == {f"{REPORT_DIR}/{name}" for name in REPORT_FILES}
    saved = store.load_json_artifact(parent, f"{REPORT_DIR}/summary.json")
    assert saved["table1"] in out and saved["table2"] in out and saved["paths_text"] in out
    table1_csv = list(csv.reader(io.StringIO(_logged_text(client, parent, "table1.csv"))))
    assert table1_csv[0] == ["block", "model", "path", "healing", "drop %", "test"]
    assert {row[0] for row in table1_csv} == {"block", "asr", "asr-text-path"}
    assert _logged_text(client, parent, "table2.md").startswith("### Table 2, study ast, tiny-qwen, healing ")
    # The path cells: speech (asr), speech (ast), text (asr), text (asr) in gromov's convention.
    assert [(p["source"], p["task"], p["convention"]) for p in saved["paths"]] == [
        ("speech", "asr", "paper"),
        ("speech", "ast", "paper"),
        ("text", "asr", "paper"),
        ("text", "asr", "gromov"),
    ]
    # Figure 1 (a) vs (b): the text and the speech path of asr-text-path and figure1, compared once.
    text, speech = (next(p for p in saved["paths"] if (p["source"], p["task"], p["convention"]) == (source, "asr",
                    "paper")) for source in ("text", "speech"))  # fmt: skip
    agreement = path_agreement(text, speech)
    assert saved["paths_text"].splitlines()[1:] == [
        f"  tiny-qwen: text-asr vs speech-asr (paper convention): mean |D_text - D_speech| over the path's blocks "
        f"{agreement['mean_abs_diff']:.4f}; the same block at {len(agreement['same_block'])} of 6 depths"
    ]
    for study in ("asr-text-path", "figure1"):
        table = next(t for t in saved["studies"] if t["study"] == study)
        (pair,) = table["agreement"]
        assert pair["mean_abs_diff"] == pytest.approx(agreement["mean_abs_diff"], abs=1e-12)
        summary_run = next(
            r for r in _runs(uri) if r.data.tags["cell_kind"] == "summary" and r.data.tags["study"] == study
        )
        key = "path_agreement.tiny-qwen.text-asr.speech-asr"
        assert summary_run.data.metrics[f"{key}.same_block"] == len(agreement["same_block"])
        assert summary_run.data.metrics[f"{key}.depths"] == 6
    for report in saved["paths"]:
        distance = np.array(report["distance"])
        assert distance.shape == (9, 9) and np.all(np.diag(distance) == 0)
    # Figure 1 draws that pair side by side on one scale, and the speech (ast) and gromov paths alone.
    figure = summarize(path, tracking_uri=uri, log=False).figures["figure1"]
    pair, alone = figure.subfigs
    assert pair.get_suptitle() == f"tiny-qwen: mean |D_text − D_speech| = {agreement['mean_abs_diff']:.4f}"
    panels = [ax for ax in pair.axes if ax.images]
    assert [ax.get_title().split("\n")[1].split(",")[0] for ax in panels] == ["text-derived", "speech-derived"]
    assert panels[0].images[0].get_clim() == panels[1].images[0].get_clim()
    assert len([ax for ax in alone.axes if ax.images]) == 2


def test_summarize_writes_the_files_it_logs_to_the_out_folder(demo_run, tmp_path, capsys):
    path, uri, _ = demo_run
    assert main(["summarize", str(path), "--tracking-uri", uri, "--out", str(tmp_path / "report")]) == 0
    assert f"written to {tmp_path / 'report'}/: tables as .txt, .csv and .md" in capsys.readouterr().out
    summary = summarize(path, tracking_uri=uri, log=False)
    assert sorted(file.name for file in (tmp_path / "report").iterdir()) == sorted(REPORT_FILES)
    assert (tmp_path / "report" / "table1.txt").read_text(encoding="utf-8") == summary.table1 + "\n"
    client = MlflowClient(uri)
    parent = GridStore(uri, "demo").parent_run()
    for name in ("table1.csv", "table2.md", "paths.txt"):
        assert (tmp_path / "report" / name).read_text(encoding="utf-8") == _logged_text(client, parent, name)


def test_a_partial_grid_is_summarised_from_its_finished_cells(demo_run):
    path, uri, _ = demo_run
    cells = expand(load_experiment(path))
    store = GridStore(uri, "demo")
    finished = {cid: state.run_id for cid, state in store.states(c.id for c in cells).items()}
    asr_eval = next(c for c in cells if c.kind == "eval" and c.tags["task"] == "asr")
    one_prune = next(c for c in cells if c.kind == "prune" and c.tags["task"] == "ast")
    partial = {cid: run for cid, run in finished.items() if cid not in (asr_eval.id, one_prune.id)}
    summary = collect(store, cells, partial, "demo")
    asr_prunes = [c.id for c in cells if c.kind == "prune" and c.config["train_cell"] == asr_eval.config["train_cell"]]
    # The ASR baseline is gone, so are the ASR prune cells measured against it; one AST prune cell is gone.
    assert set(summary.missing) == {asr_eval.id, one_prune.id, *asr_prunes}
    assert all(study["results"] == [] for study in summary.studies if study["task"] == "asr")
    ast = next(study for study in summary.studies if study["study"] == "ast")
    assert sum(len(result["rows"]) for result in ast["results"]) == 1
    assert f"{len(summary.missing)} of {len(cells)} cells have no finished result" in summary.text()
    assert summary.table1 == "" and "figure2" not in summary.figures


# Table 1 of the paper: (layers removed, decoder depth) and the "% drop" it prints.
PAPER_TABLE_1 = {"Qwen2.5-7B": (8, 28, "28.6"), "Qwen2.5-7B + LoRA": (5, 28, "17.9"), "Qwen2.5-3B": (11, 36, "30.6"),
                 "Qwen2.5-1.5B": (7, 28, "25.0"), "Llama-3.1-8B": (14, 32, "43.8"), "Llama-3.2-3B": (11, 28, "39.3"),
                 "Llama-3.2-1B": (1, 16, "6.3")}  # fmt: skip


def test_table1_prints_every_paper_row_s_fraction_as_the_paper_does():
    results = [
        {
            "model": model.replace(" ", ""),
            "path_label": "speech-asr",
            "healing": "decoder+projector",
            "baseline": {"test-clean": 2.0},
            "rows": [{"fraction": removed / depth, "scores": {"test-clean": 2.1}}],
            "removable_fraction": removed / depth,
            "note": None,
        }
        for model, (removed, depth, _) in PAPER_TABLE_1.items()
    ]
    study = {"study": "asr", "metric": "wer", "threshold": 0.25, "results": results}
    lines = table1([study]).splitlines()
    printed = [line.split()[2] for line in lines if line.startswith("+ pruning")]
    assert printed == [percent for _, _, percent in PAPER_TABLE_1.values()]


def test_summarize_without_a_run_is_a_clear_error(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/none.db"
    assert main(["summarize", str(DEMO), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slamgrid: error: ") and "has no experiment 'demo'" in err
    assert not (tmp_path / "none.db").exists()


def _logged_text(client: MlflowClient, run_id: str, name: str) -> str:
    """A file the summary logged on the parent run under `report/`."""
    with tempfile.TemporaryDirectory() as scratch:
        return Path(client.download_artifacts(run_id, f"{REPORT_DIR}/{name}", scratch)).read_text(encoding="utf-8")


def _runs(uri: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [run for run in runs if "cell_id" in run.data.tags]


def _select(runs, tags: dict[str, str]) -> list:
    return [r for r in runs if all(r.data.tags.get(key) == value for key, value in tags.items())]


def _rescored(store: GridStore, run, metric: str) -> float:
    """The set `test` scored again with the slam metric from the hypotheses and references the run logged."""
    logged = store.load_json_artifact(run.info.run_id, "hypotheses/test.json")
    if metric == "wer":
        score = 100.0 * corpus_wer(logged["hypotheses"], logged["references"]).wer
    else:
        score = corpus_bleu(logged["hypotheses"], logged["references"]).bleu
    assert math.isclose(score, run.data.metrics[f"test.{metric}"], rel_tol=1e-9, abs_tol=1e-9)
    assert len(logged["hypotheses"]) == len(logged["references"]) == 6
    return score


def test_a_summary_reads_its_runs_in_pages_not_one_get_run_per_cell(demo_run, monkeypatch):
    path, uri, _ = demo_run
    calls = []
    get_run = MlflowClient.get_run
    monkeypatch.setattr(MlflowClient, "get_run", lambda self, run_id: calls.append(run_id) or get_run(self, run_id))
    summary = summarize(path, tracking_uri=uri, log=False)
    scored = {r.info.run_id for r in _runs(uri) if r.data.tags["cell_kind"] in ("eval", "prune")}
    assert len(scored) == 9 and sum(len(r["rows"]) for s in summary.studies for r in s["results"]) >= 6
    # The evaluations' and pruned cells' runs come from paged queries; what remains is MLflow finding where a path
    # cell's `distance.json` lies, once per report read.
    assert not scored.intersection(calls)
    paths = {r.info.run_id for r in _runs(uri) if r.data.tags["cell_kind"] == "path"}
    assert set(calls) <= paths
