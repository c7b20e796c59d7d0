"""`slamgrid plan`: the cells of an experiment file by kind and model, those the store holds, and the slot-hours
left, from configured, measured or derived timings; nothing runs and nothing is written."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from grid.cells import expand, plan_summary
from grid.cli import main
from grid.experiment import load_experiment
from grid.plan import (
    H100_BF16_FLOPS,
    HUB_DECODERS,
    HUB_ENCODERS,
    HUB_SETS,
    PROMPT_TOKENS,
    SPEECH_SECONDS,
    TARGET_TOKENS,
    UTILISATION,
    cell_seconds,
    decoder_parameters,
    plan_experiment,
)
from grid.tracking import GridStore

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
PAPER = EXPERIMENTS / "paper.yaml"
DEMO = EXPERIMENTS / "demo.yaml"


def _computing(model: torch.nn.Module) -> int:
    """Parameters used per token: all but the input embedding (a lookup), the LM head counted even when tied."""
    config = model.config
    used = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    tied = config.tie_word_embeddings and "lm_head.weight" not in dict(model.named_parameters())
    return used + (config.vocab_size * config.hidden_size if tied else 0)


@pytest.mark.parametrize("name", sorted(HUB_DECODERS))
def test_decoder_parameters_are_those_of_the_model_transformers_builds(name):
    fields = dict(HUB_DECODERS[name])
    config = (Qwen2Config if fields.pop("model_type") == "qwen2" else LlamaConfig)(**fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert decoder_parameters(HUB_DECODERS[name]) == _computing(model)


def test_the_paper_plan_counts_every_cell_and_derives_each_cost_from_model_size(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    plan = plan_experiment(PAPER, tracking_uri=uri)
    exp = load_experiment(PAPER)
    cells = expand(exp)
    assert plan.counts() == plan_summary(cells) and sum(plan.counts().values()) == 741
    assert not (tmp_path / "mlflow.db").exists()  # asking creates no store
    assert plan.unknown_sets == ["loquacious-dev (loquacious speechbrain/LoquaciousSet dev)"]

    # The Qwen2.5-7B ASR training, by hand: 50,000 steps of 8 samples on each of 2 slots, and the 281,241
    # utterances of LibriSpeech 960 h once through WavLM Large.
    train = next(c for c in cells if c.kind == "train" and c.tags["model"] == "qwen2.5-7b" and c.tags["task"] == "asr")
    n = decoder_parameters(HUB_DECODERS["Qwen/Qwen2.5-7B"])
    tokens = SPEECH_SECONDS * 10 + PROMPT_TOKENS + TARGET_TOKENS
    step = 8 * 4 * n * tokens / (H100_BF16_FLOPS * UTILISATION)
    encoder_parameters, frames = HUB_ENCODERS["microsoft/wavlm-large"]
    encoder = 2 * encoder_parameters * frames * SPEECH_SECONDS / (H100_BF16_FLOPS * UTILISATION)
    timing = plan.timings["qwen2.5-7b"]
    assert timing.step_s == pytest.approx(step) and timing.encoder_s == pytest.approx(encoder)
    data = HUB_SETS[("librispeech", "all", "train.clean.100+train.clean.360+train.other.500")]
    expected = 50_000 * step * 2 + min(50_000 * 16, data) * encoder
    assert cell_seconds(train, timing, {"data": data}) == pytest.approx(expected)
    row = next(r for r in plan.rows if (r.model, r.kind) == ("qwen2.5-7b", "train"))
    assert row.cells == 2 and row.hours > expected / 3600  # its AST training too

    # A pruned cell keeps (m - n + 1) of m layers: its decoding and healing scale with them.
    prune = next(
        c
        for c in cells
        if c.kind == "prune" and c.tags["model"] == "qwen2.5-7b" and c.config["n"] == 8 and "heal_train" in c.config
    )
    sizes = {"eval.test-clean": 2620, "eval.test-other": 2939}
    heal = prune.config["heal_train"]
    kept = (28 - 8 + 1) / 28
    expected = 5559 * timing.utterance_s * kept + heal["steps"] * step * heal["batch_size"] / 8 * kept
    assert cell_seconds(prune, timing, sizes) == pytest.approx(expected)
    text = plan.text()
    assert text.startswith(f"paper: 741 cells, 0 finished in {uri}")
    assert f"{plan.hours:.2f}" in text and "derived for an H100 from 7.07e9 decoder parameters" in text


def test_finished_cells_come_from_the_store_and_cost_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cells = expand(load_experiment(DEMO))
    before = plan_experiment(DEMO, tracking_uri=uri)
    store = GridStore(uri, "demo")
    trains = [cell for cell in cells if cell.kind == "train"]
    for cell in trains:
        with store.start_cell(cell):
            pass
    after = plan_experiment(DEMO, tracking_uri=uri)
    row = next(r for r in after.rows if r.kind == "train")
    assert (row.cells, row.finished, row.hours) == (2, 2, 0.0)
    train_hours = next(r.hours for r in before.rows if r.kind == "train")
    assert after.hours == pytest.approx(before.hours - train_hours)
    assert after.text().startswith(f"demo: 25 cells, 2 finished in {uri}")


def test_a_bisect_study_counts_its_bound_the_shallowest_depths(tmp_path):
    doc = yaml.safe_load(DEMO.read_text())
    doc["name"] = "demo-bisect"
    doc["studies"] = [{**doc["studies"][0], "search": "bisect", "depths": [2, 3, 4, 5, 6]}]
    path = tmp_path / "bisect.yaml"
    path.write_text(yaml.safe_dump(doc))
    # `./demo/...` paths are relative to the file: the shipped world beside it.
    (tmp_path / "demo").symlink_to(EXPERIMENTS / "demo", target_is_directory=True)
    plan = plan_experiment(path, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    prune = next(r for r in plan.rows if r.kind == "prune")
    healings = len(doc["studies"][0]["healing"])
    assert prune.bound and prune.cells == healings * math.ceil(math.log2(5 + 1))
    assert "<=6" in plan.text() and "at most" in plan.text() and "searches its depths (bisect)" in plan.text()


def test_configured_timings_win_and_a_bad_file_names_the_field(tmp_path, capsys):
    timings = tmp_path / "timings.yaml"
    timings.write_text(
        yaml.safe_dump({"tiny-qwen": {"step_s": 2.0, "batch_size": 4, "utterance_s": 0.5, "forward_s": 0.25}})
    )
    plan = plan_experiment(DEMO, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", timings=timings)
    timing = plan.timings["tiny-qwen"]
    assert (timing.step_s, timing.batch_size, timing.encoder_s) == (2.0, 4, 0.0)
    assert timing.how == f"configured in {timings}"
    train = next(c for c in expand(load_experiment(DEMO)) if c.kind == "train")
    assert cell_seconds(train, timing, {"data": 380}) == 1500 * 2.0 * 8 / 4
    timings.write_text(yaml.safe_dump({"tiny-qwen": {"step_s": "fast", "batch_size": 4}}))
    assert main(["plan", str(DEMO), "--timings", str(timings), "--tracking-uri", f"sqlite:///{tmp_path}/x.db"]) == 2
    error = f"slamgrid: error: {timings}: tiny-qwen.step_s='fast' is not a non-negative number"
    assert capsys.readouterr().err.strip() == error


def test_measured_timings_run_the_demo_backbone_on_this_machine(tmp_path):
    plan = plan_experiment(DEMO, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", measure=True)
    timing = plan.timings["tiny-qwen"]
    assert timing.how.startswith("measured on this machine") and timing.batch_size == 8
    assert timing.forward_s > 0 and timing.utterance_s > 0 and 0 < timing.step_s < 60
    assert 0 < plan.hours < 24


def test_plan_imports_neither_torch_nor_ray(tmp_path):
    code = (
        "import sys; from grid.cli import main; "
        f"assert main(['plan', {str(PAPER)!r}, '--tracking-uri', 'sqlite:///{tmp_path}/mlflow.db']) == 0; "
        "assert not {'torch', 'ray', 'matplotlib'} & set(sys.modules), sorted({'torch', 'ray'} & set(sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "paper: 741 cells, 0 finished" in done.stdout
