"""`slamgrid export`: a finished prune cell's pruned and healed model, rebuilt from the store, as files that plain
transformers and `slam.model.load_speech_llm` load, giving the cell's own greedy output; several tasks that remove
the same layers as one backbone; and the refusals.

One small grid (ASR, and AST on the ASR-derived path, healed) on a local Ray serves the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from grid.cells import expand
from grid.cli import main
from grid.experiment import load_experiment
from grid.export import export_cells
from grid.stages import Backbones, pruned_speech_llm
from grid.tracking import GridStore
from slam.config import DataConfig, DecodeConfig
from slam.data import load_dataset
from slam.decode import greedy_decode
from slam.export import DECODER_DIR, MANIFEST_FILE, SharedBackbone, restore_healed
from slam.model import load_speech_llm
from tests.grid.world import LAYERS, build_world, cell_runs, run_grid

STUDIES = [
    {"name": "asr", "task": "asr", "models": ["tiny"], "paths": [{"source": "speech"}], "depths": [2],
     "healing": ["decoder+projector"]},
    {"name": "ast", "task": "ast", "models": ["tiny"], "paths": [{"source": "speech", "task": "asr"}],
     "depths": [2, 3], "healing": ["decoder+projector"]},
]  # fmt: skip


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    world = build_world(tmp_path_factory.mktemp("world"))
    path, uri, _ = run_grid(world, "export", STUDIES)
    prunes = {(run.data.tags["task"], int(run.data.tags["n"])): run for run in cell_runs(uri, "export")
              if run.data.tags["cell_kind"] == "prune"}  # fmt: skip
    return world, path, uri, prunes


def _hypotheses(uri: str, run) -> dict:
    store = GridStore(uri, "export")
    return store.load_json_artifact(run.info.run_id, "hypotheses/test.json")


def _nll(model, world: Path) -> float:
    """Mean teacher-forced NLL of the test transcripts."""
    samples = list(load_dataset(DataConfig(source="manifest", path=str(world / "test.jsonl"))).samples())
    with torch.no_grad():
        total, count = model.nll([s.audio for s in samples], [s.target("asr") for s in samples])
    return float(total / count)


def _decoded(model, world: Path, ids: list[str]) -> list[str]:
    dataset = load_dataset(DataConfig(source="manifest", path=str(world / "test.jsonl")))
    audio = {sample.id: sample.audio for sample in dataset.samples()}
    # As the cells decoded (`write_experiment`'s decode config).
    return greedy_decode(model.eval(), [audio[i] for i in ids], DecodeConfig(batch_size=4, max_new_tokens=4))


def test_an_exported_cell_gives_the_cell_s_own_greedy_output(grid, tmp_path, capsys):
    world, path, uri, prunes = grid
    run = prunes[("asr", 2)]
    cell = run.data.tags["cell_id"]
    assert main(["export", str(path), "--cell", cell[:8], "--out", str(tmp_path / "asr"), "--tracking-uri", uri]) == 0
    assert f"exported cell {cell[:8]} to {tmp_path / 'asr'}" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "asr" / MANIFEST_FILE).read_text())
    removed = json.loads(run.data.tags["removed"])
    assert (manifest["cell_id"], manifest["removed"], manifest["healing"]) == (cell, removed, "decoder+projector")
    assert manifest["num_hidden_layers"] == LAYERS - len(removed)
    decoder = AutoModelForCausalLM.from_pretrained(tmp_path / "asr" / DECODER_DIR)
    assert decoder.config.num_hidden_layers == LAYERS - len(removed)
    model, _ = load_speech_llm(tmp_path / "asr")
    logged = _hypotheses(uri, run)
    assert _decoded(model, world, logged["ids"]) == logged["hypotheses"]
    # Its logits are the cell's model's: the baseline pruned as the cell did, with the weights healing trained (and
    # without them, the model is another).
    exp = load_experiment(path)
    store = GridStore(uri, "export")
    prune = next(c for c in expand(exp) if c.id == cell)
    deps = {dep: state.run_id for dep, state in store.states(prune.deps).items()}
    in_grid = pruned_speech_llm(prune, store, deps, tmp_path, Backbones("cpu"), str(exp.root)).model.eval()
    unhealed = _nll(in_grid, world)
    healed = store.client.download_artifacts(run.info.run_id, "healed/healed.safetensors", str(tmp_path))
    restore_healed(in_grid, healed)
    assert _nll(model, world) == pytest.approx(_nll(in_grid, world), abs=1e-5)
    assert abs(_nll(model, world) - unhealed) > 1e-3
    # The decoder plain transformers loaded is the SpeechLLM's.
    ids = torch.tensor([[1, 4, 7, 2]])
    with torch.no_grad():
        np.testing.assert_allclose(decoder(ids).logits, model.decoder(input_ids=ids).logits, atol=1e-6)


def test_tasks_that_remove_the_same_layers_share_one_backbone(grid, tmp_path):
    world, path, uri, prunes = grid
    asr, ast = prunes[("asr", 2)], prunes[("ast", 2)]
    assert asr.data.tags["removed"] == ast.data.tags["removed"]  # AST pruned along the ASR-derived path
    out = export_cells(path, [asr.data.tags["cell_id"], ast.data.tags["cell_id"]], tmp_path / "both", uri)
    served = SharedBackbone(out)
    assert served.tasks == ["asr", "ast"]
    for task, run in (("asr", asr), ("ast", ast), ("asr", asr)):
        logged = _hypotheses(uri, run)
        assert _decoded(served.model(task), world, logged["ids"]) == logged["hypotheses"], task


def test_cells_that_do_not_share_the_pruned_layers_are_refused(grid, tmp_path, capsys):
    _, path, uri, prunes = grid
    asr, deeper = prunes[("asr", 2)].data.tags["cell_id"], prunes[("ast", 3)].data.tags["cell_id"]
    argv = ["export", str(path), "--cells", asr, deeper, "--out", str(tmp_path / "x"), "--tracking-uri", uri]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cells {asr} and {deeper} do not share the pruned layers of one backbone (layers removed:" in err
    assert not (tmp_path / "x").exists()
    same_task = [prunes[("ast", 2)].data.tags["cell_id"], deeper]
    with pytest.raises(ValueError, match=r"cells of the same task \(ast\) cannot share one export"):
        export_cells(path, same_task, tmp_path / "y", uri)
    train = next(r for r in cell_runs(uri, "export") if r.data.tags["cell_kind"] == "train").data.tags["cell_id"]
    with pytest.raises(ValueError, match=rf"cell {train} is a train cell: only prune cells have a pruned model"):
        export_cells(path, [train], tmp_path / "z", uri)
    with pytest.raises(ValueError, match=r"--cell 'ffffffffffff': no cell of the experiment file has that id"):
        export_cells(path, ["ffffffffffff"], tmp_path / "z", uri)
