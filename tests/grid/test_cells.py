"""Cells: counts by formula, stable ids that change exactly where a config value reaches, order, sharing."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grid.cells import KINDS, Cell, cell_id, expand, plan_summary
from grid.experiment import load_experiment
from tests.conftest import REPO
from tests.grid.edits import set_at

EXPERIMENTS = REPO / "experiments"
FILES = sorted(EXPERIMENTS.glob("*.yaml"))
# Paper section 4: decoder depth m of each backbone of the ASR study.
ASR_LAYERS = {
    "qwen2.5-1.5b": 28,
    "qwen2.5-3b": 36,
    "qwen2.5-7b": 28,
    "llama-3.2-1b": 16,
    "llama-3.2-3b": 28,
    "llama-3.1-8b": 32,
}


def _cells(name: str) -> list[Cell]:
    return expand(load_experiment(EXPERIMENTS / name))


def test_paper_counts():
    # asr: every depth n = 2..m-1 of the six backbones x 4 healing strategies; asr-lora and asr-text-path:
    # every depth of a 28-layer Qwen2.5-7B x decoder+projector; each AST pair: 2 paths x 4 depths x 2 healings.
    prune = 4 * sum(m - 2 for m in ASR_LAYERS.values()) + (28 - 2) + (28 - 2) + 2 * (2 * 4 * 2)
    # (model, task) trained: six for ASR, the LoRA model, Qwen2.5-7B on En->De, the Whisper model on Fr->En;
    # the ASR-derived path of the AST studies reuses Qwen2.5-7B's ASR training.
    train = 6 + 1 + 1 + 1
    # Speech paths of every trained model, plus the text path of Qwen2.5-7B.
    path = train + 1
    # Baselines of every trained model (asr-text-path shares Qwen2.5-7B's).
    evals = train
    assert plan_summary(_cells("paper.yaml")) == {
        "train": train,
        "path": path,
        "eval": evals,
        "prune": prune,
        "summary": 5,
    }
    assert prune == 708


def test_demo_counts():
    # asr: 4 depths x 2 healings; ast: 2 paths x 2 depths; asr-text-path: 1 depth of the text path (its speech
    # path's is the asr study's); paths: speech of each task, text, text in Gromov's convention (figure1).
    assert plan_summary(_cells("demo.yaml")) == {
        "train": 2,
        "path": 4,
        "eval": 2,
        "prune": 4 * 2 + 2 * 2 + 1,
        "summary": 4,
    }


def test_figure1_measures_paths_only():
    cells = _cells("figure1.yaml")
    assert plan_summary(cells) == {"train": 3, "path": 4, "eval": 0, "prune": 0, "summary": 2}
    paths = {(c.tags["model"], c.tags["path.source"]) for c in cells if c.kind == "path"}
    assert paths == {
        ("qwen2.5-7b", "text"),
        ("qwen2.5-7b", "speech"),
        ("qwen2.5-7b-lora", "speech"),
        ("llama-3.1-8b", "speech"),
    }
    for summary in (c for c in cells if c.kind == "summary"):
        assert summary.config["prune_cells"] == summary.config["eval_cells"] == []
        assert list(summary.deps) == summary.config["path_cells"]


@pytest.mark.parametrize("name", ["table1.yaml", "table2.yaml", "figure1.yaml", "figure2.yaml"])
def test_per_table_cells_are_papers_cells(name):
    """Ids depend on content, not on the file: a table's cells are the paper grid's (summaries aside)."""
    paper = {cell.id for cell in _cells("paper.yaml")}
    cells = [cell for cell in _cells(name) if cell.kind != "summary"]
    assert cells and {cell.id for cell in cells} <= paper


def test_depths_all_and_exact_fractions():
    cells = _cells("paper.yaml")
    for model, m in ASR_LAYERS.items():
        for healing in ("none", "decoder", "projector", "decoder+projector"):
            prunes = [
                c
                for c in cells
                if c.kind == "prune" and c.tags["study"] == "asr" and c.tags["model"] == model
                if c.tags["healing"] == healing
            ]
            assert [c.config["n"] for c in prunes] == list(range(2, m))
            assert all(c.config["fraction"] == (c.config["n"] - 1) / m for c in prunes)
            assert all(c.config["layers"] == m for c in prunes)


def test_table2_fractions_are_the_papers():
    prunes = [c for c in _cells("table2.yaml") if c.kind == "prune"]
    assert {round(100 * c.config["fraction"], 1) for c in prunes} == {10.7, 21.4, 32.1, 42.9}
    assert {c.tags["fraction"] for c in prunes} == {"0.1071", "0.2143", "0.3214", "0.4286"}


def test_ids_are_the_hash_of_kind_and_config():
    for cell in _cells("demo.yaml"):
        canonical = json.dumps({"kind": cell.kind, "config": cell.config}, sort_keys=True, separators=(",", ":"))
        assert cell.id == hashlib.sha256(canonical.encode()).hexdigest()[:16]
        # JSON-ready: the config survives a round trip unchanged (no tuples, no objects).
        assert json.loads(json.dumps(cell.config)) == cell.config
        assert all(isinstance(v, str) for v in cell.tags.values())


def test_an_id_is_a_known_value_whatever_the_key_order():
    # Pinned: a change to the hashing would re-run every finished cell of every store.
    config = {"steps": 3, "name": "x", "nested": {"b": [1, 2], "a": None}}
    assert cell_id("train", config) == "759ad0b44dfa12e4"
    assert cell_id("train", {"nested": {"a": None, "b": [1, 2]}, "name": "x", "steps": 3}) == "759ad0b44dfa12e4"
    assert cell_id("eval", config) != "759ad0b44dfa12e4"


def test_ids_are_stable_across_loads_and_processes():
    first = [cell.id for cell in _cells("demo.yaml")]
    assert [cell.id for cell in _cells("demo.yaml")] == first
    code = (
        "import json; from grid.cells import expand; from grid.experiment import load_experiment; "
        "print(json.dumps([c.id for c in expand(load_experiment('experiments/demo.yaml'))]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == first


@pytest.mark.parametrize("name", [path.name for path in FILES])
def test_dependencies_come_first(name):
    cells = _cells(name)
    index = {cell.id: i for i, cell in enumerate(cells)}
    assert len(index) == len(cells)
    for i, cell in enumerate(cells):
        assert all(index[dep] < i for dep in cell.deps), cell.tags
        assert KINDS.index(cell.kind) >= max((KINDS.index(cells[index[d]].kind) for d in cell.deps), default=0)


def test_cell_configs_carry_what_their_stage_reads():
    exp = load_experiment(EXPERIMENTS / "demo.yaml")
    cells = expand(exp)
    by_id = {cell.id: cell for cell in cells}
    for cell in cells:
        if cell.kind == "prune":
            assert cell.deps == (cell.config["train_cell"], cell.config["path_cell"])
            assert by_id[cell.config["train_cell"]].kind == "train"
            assert by_id[cell.config["path_cell"]].kind == "path"
            assert cell.config["heal"]["strategy"] == cell.config["healing"]
            if cell.config["healing"] == "none":
                assert "heal_train" not in cell.config and "data" not in cell.config
                assert cell.config["heal"] == {"strategy": "none"}
            else:
                assert cell.config["heal"]["lora_rank"] == 64
                assert cell.config["heal_train"]["steps"] == 600
                assert cell.config["heal_train"]["task"] == cell.config["task"]
                assert cell.config["data"]["path"] == "./demo/train.jsonl"
            assert cell.config["decode"]["max_new_tokens"] == 40
            assert list(cell.config["eval"]) == ["test"]
        elif cell.kind == "train":
            assert cell.deps == ()
            assert cell.config["train"]["steps"] == 1500 and cell.config["train"]["task"] == cell.tags["task"]
            assert cell.config["speech_llm"]["prompt"] == exp.tasks[cell.tags["task"]].prompt
        elif cell.kind == "path" and cell.config["source"] == "speech":
            assert cell.deps == (cell.config["train_cell"],) and by_id[cell.deps[0]].kind == "train"
            assert cell.config["distance"]["max_samples"] == 64
        elif cell.kind == "path":
            assert cell.deps == () and "speech_llm" not in cell.config
            assert cell.config["decoder"]["name"] == "./demo/models/decoder"
        elif cell.kind == "eval":
            assert cell.deps == (cell.config["train_cell"],)
    # The AST study's ASR-derived path is the ASR study's path cell.
    asr_path = next(
        c.id for c in cells if c.kind == "path" and c.tags["task"] == "asr" and c.tags["path.source"] == "speech"
    )
    borrowed = [c for c in cells if c.kind == "prune" and c.tags["task"] == "ast" and c.tags["path.task"] == "asr"]
    assert len(borrowed) == 2 and {c.config["path_cell"] for c in borrowed} == {asr_path}


def test_text_paths_ignore_the_speechllms_lora(tmp_path):
    """The text path runs the pretrained decoder: the LoRA model's is the frozen model's, one cell."""
    (tmp_path / "paper.yaml").write_text((EXPERIMENTS / "paper.yaml").read_text())
    doc = yaml.safe_load((EXPERIMENTS / "figure1.yaml").read_text())
    doc["studies"] = [{**doc["studies"][0], "models": ["qwen2.5-7b", "qwen2.5-7b-lora"]}]
    (tmp_path / "text.yaml").write_text(yaml.safe_dump(doc))
    cells = expand(load_experiment(tmp_path / "text.yaml"))
    assert plan_summary(cells) == {"train": 0, "path": 1, "eval": 0, "prune": 0, "summary": 1}
    (path,) = (c for c in cells if c.kind == "path")
    assert path.config["decoder"] == {
        "name": "Qwen/Qwen2.5-7B",
        "dtype": "bfloat16",
        "lora": None,
        "trust_remote_code": False,
    }


def test_shared_cells_are_listed_once_and_tagged_with_every_study():
    cells = _cells("paper.yaml")
    qwen_asr_train = [
        c for c in cells if c.kind == "train" and c.tags["model"] == "qwen2.5-7b" and c.tags["task"] == "asr"
    ]
    assert len(qwen_asr_train) == 1
    assert qwen_asr_train[0].tags["study"] == "asr,asr-text-path,ast-en-de,ast-fr-en"
    summaries = {c.tags["study"]: c for c in cells if c.kind == "summary"}
    qwen_asr_eval = next(c for c in cells if c.kind == "eval" and c.config["train_cell"] == qwen_asr_train[0].id)
    assert summaries["asr-text-path"].config["eval_cells"] == [qwen_asr_eval.id]
    assert qwen_asr_eval.id in summaries["asr"].config["eval_cells"]
    # Fr->En on the Whisper model borrows the WavLM Qwen2.5-7B ASR path.
    borrowed = {
        c.config["path_cell"] for c in cells if c.tags.get("study") == "ast-fr-en" and c.tags.get("path.task") == "asr"
    }
    (path,) = borrowed
    assert next(c for c in cells if c.id == path).tags["model"] == "qwen2.5-7b"


def test_two_studies_with_the_same_axes_share_every_cell_but_the_summary(tmp_path):
    doc = yaml.safe_load((EXPERIMENTS / "demo.yaml").read_text())
    doc["studies"] = [doc["studies"][0], {**doc["studies"][0], "name": "again"}]
    cells = expand(load_experiment(_write(tmp_path, doc)))
    assert plan_summary(cells) == {"train": 1, "path": 1, "eval": 1, "prune": 8, "summary": 2}
    first, second = (c for c in cells if c.kind == "summary")
    assert first.deps == second.deps and first.id != second.id


def _trains(cell: Cell) -> bool:
    return cell.kind == "train" or (cell.kind == "prune" and cell.tags["healing"] != "none")


def _heals_decoder(cell: Cell) -> bool:
    return cell.kind == "prune" and cell.tags["healing"] in ("decoder", "decoder+projector")


# (file, edit, the cells the edited value reaches directly); their dependents change too, nothing else.
CHANGES = {
    "heal LoRA rank": ("demo.yaml", set_at("defaults/heal/lora_rank", 32), _heals_decoder),
    # All four strategies: `none` and `projector` add no LoRA, so its settings do not reach them.
    "heal LoRA dropout": ("paper.yaml", set_at("defaults/heal/lora_dropout", 0.1), _heals_decoder),
    "healing steps": (
        "demo.yaml",
        set_at("defaults/heal_train/steps", 100),
        lambda c: c.kind == "prune" and c.tags["healing"] != "none",
    ),
    "an ASR dev set": (
        "demo.yaml",
        set_at("tasks/asr/dev/dev/path", "elsewhere/dev.jsonl"),
        lambda c: c.kind == "path" and c.tags["task"] == "asr",
    ),
    "an AST eval set": (
        "demo.yaml",
        set_at("tasks/ast/eval/test/max_samples", 10),
        lambda c: c.kind in ("eval", "prune") and c.tags["task"] == "ast",
    ),
    "the ASR prompt": (
        "demo.yaml",
        set_at("tasks/asr/prompt", "Write down what is said."),
        # The prompt is part of every SpeechLLM of the task, not of the decoder-only text path.
        lambda c: (
            c.kind != "summary" and c.tags["task"] == "asr" and (c.kind, c.tags.get("path.source")) != ("path", "text")
        ),
    ),
    "decoding": ("demo.yaml", set_at("defaults/decode/max_new_tokens", 50), lambda c: c.kind in ("eval", "prune")),
    "distances": ("demo.yaml", set_at("defaults/distance/max_samples", 32), lambda c: c.kind == "path"),
    "projector": (
        "demo.yaml",
        set_at("defaults/projector/hidden", 128),
        lambda c: c.kind in ("train", "eval", "prune") or (c.kind == "path" and c.tags["path.source"] == "speech"),
    ),
    "a study's name": (
        "demo.yaml",
        set_at("studies/1/name", "translation"),
        lambda c: c.kind == "summary" and c.tags["study"] == "ast",
    ),
    "one model's training steps": (
        "paper.yaml",
        set_at("models/llama-3.1-8b/train/steps", 60_000),
        lambda c: c.kind == "train" and c.tags["model"] == "llama-3.1-8b",
    ),
    "one model's LoRA": (
        "paper.yaml",
        set_at("models/qwen2.5-7b-lora/decoder/lora/rank", 32),
        lambda c: c.kind == "train" and c.tags["model"] == "qwen2.5-7b-lora",
    ),
    # The global batch is batch_size x processes: every baseline training, and healing, which trains on it too.
    "DDP training processes": ("paper.yaml", set_at("defaults/train_workers", 4), lambda c: _trains(c)),
    "DDP training of the demo": ("demo.yaml", set_at("defaults/train_workers", 2), lambda c: _trains(c)),
}


@pytest.mark.parametrize("name, edit, reached", list(CHANGES.values()), ids=list(CHANGES))
def test_a_change_reruns_exactly_the_cells_it_reaches(tmp_path, name, edit, reached):
    before = _cells(name)
    doc = yaml.safe_load((EXPERIMENTS / name).read_text())
    doc = json.loads(json.dumps(doc))  # YAML anchors share objects: edit one place only
    edit(doc)
    after = expand(load_experiment(_write(tmp_path, doc)))
    # Edits change values, never the grid's shape: cells correspond by position.
    assert [c.kind for c in after] == [c.kind for c in before]
    expected = _with_dependents(before, {c.id for c in before if reached(c)})
    changed = {b.id for b, a in zip(before, after) if b.id != a.id}
    assert changed == expected
    assert 0 < len(expected) < len(before)


def test_one_training_process_is_the_default_and_keeps_single_process_ids(tmp_path):
    doc = yaml.safe_load((EXPERIMENTS / "demo.yaml").read_text())
    doc["defaults"]["train_workers"] = 1
    assert [c.id for c in expand(load_experiment(_write(tmp_path, doc)))] == [c.id for c in _cells("demo.yaml")]


def test_healing_trains_on_the_global_batch_of_the_baseline_training():
    # paper.yaml: batch 8 per GPU on 2 GPUs; healing, in one process, takes the 16 of one global batch per step.
    exp = load_experiment(EXPERIMENTS / "paper.yaml")
    cells = expand(exp)
    by_id = {cell.id: cell for cell in cells}
    healing = [c for c in cells if c.kind == "prune" and c.config["healing"] != "none"]
    assert healing
    for cell in healing:
        train = by_id[cell.config["train_cell"]].config
        assert cell.config["heal_train"]["batch_size"] == train["train"]["batch_size"] * train["train_workers"] == 16
        assert cell.config["heal_train"]["steps"] == 5000
    assert all("heal_train" not in c.config for c in cells if c.kind == "prune" and c.config["healing"] == "none")


def test_the_path_convention_is_part_of_the_path_cell_and_labels_its_prune_cells(tmp_path):
    doc = yaml.safe_load((EXPERIMENTS / "demo.yaml").read_text())
    doc["studies"] = [
        {"name": "conventions", "task": "asr", "models": ["tiny-qwen"], "depths": [3],
         "paths": [{"source": "text"}, {"source": "text", "convention": "gromov"}], "healing": ["none"]},
    ]  # fmt: skip
    cells = expand(load_experiment(_write(tmp_path, doc)))
    paths = [c for c in cells if c.kind == "path"]
    assert [c.config["convention"] for c in paths] == ["paper", "gromov"]
    assert [c.tags["path.convention"] for c in paths] == ["paper", "gromov"]
    assert len({c.id for c in paths}) == 2
    assert {k: v for k, v in paths[0].config.items() if k != "convention"} == {
        k: v for k, v in paths[1].config.items() if k != "convention"
    }
    prunes = [c for c in cells if c.kind == "prune"]
    assert [(c.config["path_cell"], c.tags["path.convention"]) for c in prunes] == [
        (paths[0].id, "paper"),
        (paths[1].id, "gromov"),
    ]


def test_cell_kind_is_checked():
    with pytest.raises(ValueError, match="cell.kind='deploy' is not allowed"):
        Cell("deploy", {}, ())


def test_plan_summary_lists_every_kind():
    assert plan_summary([]) == dict.fromkeys(KINDS, 0)


def _with_dependents(cells: list[Cell], ids: set[str]) -> set[str]:
    reached = set(ids)
    for cell in cells:  # dependencies come first, so one pass closes the set
        if reached.intersection(cell.deps):
            reached.add(cell.id)
    return reached


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_a_bisect_study_asks_log2_depths_of_the_sweeps_cells_and_finds_the_sweeps_answer(tmp_path):
    # Llama-3.1-8B (32 layers, 30 depths) on a synthetic degradation curve: WER grows 2% of the baseline's per
    # removed layer, so depths up to n = 13 ((n - 1) x 0.02 <= 0.25) are within the threshold.
    doc = yaml.safe_load((EXPERIMENTS / "paper.yaml").read_text())
    study = {"name": "b", "task": "asr", "models": ["llama-3.1-8b"], "paths": [{"source": "speech"}],
             "depths": "all", "healing": ["none", "decoder+projector"]}  # fmt: skip
    sweep = [c for c in expand(load_experiment(_write(tmp_path, {**doc, "studies": [study]}))) if c.kind == "prune"]
    exp = load_experiment(_write(tmp_path, {**doc, "studies": [{**study, "search": "bisect"}]}))
    sets = ("test-clean", "test-other")
    results: dict[str, dict[str, float]] = {}
    rounds = 0
    while True:
        cells = expand(exp, results)
        summaries = [c for c in cells if c.kind == "summary"]
        if summaries:
            break
        for cell in cells:  # every cell asked for finishes, with the curve's scores
            if cell.kind == "eval":
                results[cell.id] = {f"{name}.wer": 10.0 for name in sets}
            elif cell.kind == "prune":
                results[cell.id] = {f"{name}.wer": 10.0 * (1 + 0.02 * (cell.config["n"] - 1)) for name in sets}
        rounds += 1
    asked = [c for c in cells if c.kind == "prune"]
    assert {c.id for c in asked} <= {c.id for c in sweep}  # the sweep's cells, ids and all
    for healing in ("none", "decoder+projector"):
        depths = sorted(c.config["n"] for c in asked if c.config["healing"] == healing)
        assert len(depths) == 5 == math.ceil(math.log2(30 + 1))  # against 30 in the sweep
        assert max(n for n in depths if n <= 13) == 13  # the deepest passing depth asked: the sweep's answer
    [summary] = summaries
    assert summary.config["search"] == "bisect" and set(summary.config["prune_cells"]) == {c.id for c in asked}
    assert rounds == 5
