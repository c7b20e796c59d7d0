"""Experiment files: the shipped ones load and match the paper; bad files fail naming file, key and value."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import yaml

from grid.cells import expand
from grid.experiment import ALL_DEPTHS, PathSpec, is_local_path, load_experiment, missing_paths, resolve_paths
from slam.config import HEAL_STRATEGIES
from slam.errors import BadInputError
from tests.conftest import REPO
from tests.grid.edits import set_at

EXPERIMENTS = REPO / "experiments"
FILES = sorted(EXPERIMENTS.glob("*.yaml"))
# Paper section 4: decoder depth m of each backbone.
PAPER_LAYERS = {
    "Qwen/Qwen2.5-1.5B": 28,
    "Qwen/Qwen2.5-3B": 36,
    "Qwen/Qwen2.5-7B": 28,
    "meta-llama/Llama-3.2-1B": 16,
    "meta-llama/Llama-3.2-3B": 28,
    "meta-llama/Llama-3.1-8B": 32,
}


@pytest.mark.parametrize("path", FILES, ids=[path.name for path in FILES])
def test_every_experiment_file_loads_and_expands(path):
    exp = load_experiment(path)
    assert exp.name == path.stem
    assert exp.studies
    cells = expand(exp)
    assert len({cell.id for cell in cells}) == len(cells)
    assert sum(cell.kind == "summary" for cell in cells) == len(exp.studies)


def test_the_shipped_files_are_there():
    assert {path.name for path in FILES} >= {
        "paper.yaml",
        "table1.yaml",
        "table2.yaml",
        "figure1.yaml",
        "figure2.yaml",
        "demo.yaml",
    }


def test_paper_yaml_is_the_papers_setup():
    exp = load_experiment(EXPERIMENTS / "paper.yaml")
    assert {model.decoder.name: model.layers for model in exp.models.values()} == PAPER_LAYERS
    for name, model in exp.models.items():
        assert model.train.batch_size == 8 and model.train.lr == 5e-4 and model.train.betas == (0.9, 0.98)
        assert model.train.clip == 1.0 and model.heal_train.steps == 5_000 and model.heal_train.lr == 5e-4
        long = name == "llama-3.1-8b"
        assert (model.train.steps, model.train.warmdown) == ((75_000, 0.8) if long else (50_000, 0.6))
        # Healing uses the training hyperparameters (paper 3.3), so Llama-3.1-8B heals with 0.8 warmdown too.
        assert model.heal_train.warmdown == (0.8 if long else 0.6)
        expected_encoder = "openai/whisper-large-v3" if name.endswith("whisper") else "microsoft/wavlm-large"
        assert model.encoder.name == expected_encoder
        assert (model.decoder.lora is not None) == name.endswith("lora")
    lora = exp.models["qwen2.5-7b-lora"].decoder.lora
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (
        64,
        64,
        0.05,
        ("q_proj", "k_proj", "v_proj", "o_proj"),
    )
    assert (exp.heal.lora_rank, exp.heal.lora_alpha, exp.heal.lora_dropout) == (64, 64, 0.05)
    assert exp.heal.lora_targets == ("gate_proj", "up_proj", "down_proj")
    assert exp.projector.stack == 5
    asr = exp.tasks["asr"]
    assert asr.train.path == "openslr/librispeech_asr"
    assert set(asr.train.split.split("+")) == {"train.clean.100", "train.clean.360", "train.other.500"}
    assert [d.split for d in asr.dev.values()] == ["validation.clean", "validation.other"]
    assert [d.split for d in asr.eval.values()] == ["test.clean", "test.other", "dev"]
    assert asr.eval["loquacious-dev"].path == "speechbrain/LoquaciousSet"
    assert {(t.task, t.train.path, t.train.name) for n, t in exp.tasks.items() if n != "asr"} == {
        ("ast", "facebook/covost2", "en_de"),
        ("ast", "facebook/covost2", "fr_en"),
    }
    # Paper section 4: batch 8 per GPU on 2 GPUs, so every baseline training is 2-process DDP.
    assert exp.train_workers == 2
    assert {cell.config["train_workers"] for cell in expand(exp) if cell.kind == "train"} == {2}
    studies = {study.name: study for study in exp.studies}
    assert studies["asr"].healing == HEAL_STRATEGIES and studies["asr"].depths == ALL_DEPTHS
    assert len(studies["asr"].models) == 6
    for name in ("ast-en-de", "ast-fr-en"):
        assert studies[name].depths == (4, 7, 10, 13)
        assert studies[name].paths == (PathSpec("speech"), PathSpec("speech", task="asr", model="qwen2.5-7b"))
    assert studies["ast-fr-en"].models == ("qwen2.5-7b-whisper",)
    assert studies["asr-text-path"].paths == (PathSpec("text"),)


def test_demo_yaml_is_small():
    exp = load_experiment(EXPERIMENTS / "demo.yaml")
    (model,) = exp.models.values()
    assert (model.name, model.layers, model.train.steps, model.heal_train.steps) == ("tiny-qwen", 8, 1500, 600)
    assert (exp.distance.max_samples, exp.decode.max_new_tokens) == (64, 40)
    # One training process: no `train_workers` in the train cells, whose ids stay those of single-process runs.
    assert exp.train_workers == 1
    assert not any("train_workers" in cell.config for cell in expand(exp))
    assert {task.name: task.prompt for task in exp.tasks.values()} == {
        "asr": "Transcribe speech to text.",
        "ast": "Translate speech to Toy.",
    }
    assert {data.path for task in exp.tasks.values() for data in [task.train, *task.dev.values()]} == {
        "./demo/train.jsonl",
        "./demo/dev.jsonl",
    }
    # Relative to the file's directory, and every one of them shipped.
    assert exp.root == EXPERIMENTS.resolve()
    assert {str(path.resolved.relative_to(EXPERIMENTS.resolve())) for path in exp.local_paths} == {
        "demo/models/encoder",
        "demo/models/decoder",
        "demo/train.jsonl",
        "demo/dev.jsonl",
        "demo/test.jsonl",
    }
    assert missing_paths(exp) == []


@pytest.mark.parametrize("name", ["table1", "table2", "figure1", "figure2"])
def test_per_table_files_take_papers_sections(name):
    paper = load_experiment(EXPERIMENTS / "paper.yaml")
    exp = load_experiment(EXPERIMENTS / f"{name}.yaml")
    assert (exp.models, exp.tasks, exp.heal, exp.decode, exp.distance, exp.projector, exp.seed, exp.train_workers) == (
        paper.models,
        paper.tasks,
        paper.heal,
        paper.decode,
        paper.distance,
        paper.projector,
        paper.seed,
        paper.train_workers,
    )
    assert exp.source.endswith(f"{name}.yaml")


def test_a_minimal_file_loads_without_any_data_or_model_on_disk(tmp_path):
    exp = load_experiment(_write(tmp_path, _doc()))
    model = exp.models["tiny"]
    assert (model.train.steps, model.heal_train.steps, model.train.seed, model.heal_train.seed) == (10, 2, 7, 7)
    assert exp.tasks["asr"].dev["dev"].path == "missing/dev.jsonl"
    (study,) = exp.studies
    assert (study.depths, study.depths_for(8), study.healing) == ((2, 3), (2, 3), ("none",))
    assert study.resolve(PathSpec("speech"), "tiny") == PathSpec("speech", "asr", "tiny")
    assert study.resolve(PathSpec("text", task="ast"), "tiny") == PathSpec("text", "ast", "tiny")
    with pytest.raises(FrozenInstanceError):
        study.name = "other"


def test_depths_all_expand_to_every_block_size(tmp_path):
    doc = _doc()
    doc["studies"][0]["depths"] = "all"
    (study,) = load_experiment(_write(tmp_path, doc)).studies
    assert study.depths_for(8) == (2, 3, 4, 5, 6, 7)
    assert study.depths_for(3) == (2,)


def test_model_overrides_merge_over_defaults_and_healing_inherits_them(tmp_path):
    doc = _doc()
    doc["models"]["tiny"]["train"] = {"warmdown": 0.8, "lr": 1.0e-3}
    doc["models"]["tiny"]["heal_train"] = {"batch_size": 4}
    model = load_experiment(_write(tmp_path, doc)).models["tiny"]
    assert (model.train.steps, model.train.warmdown, model.train.lr) == (10, 0.8, 1e-3)
    assert (model.heal_train.steps, model.heal_train.warmdown, model.heal_train.lr) == (2, 0.8, 1e-3)
    assert (model.heal_train.batch_size, model.train.batch_size) == (4, 8)


def _delete(path: str) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        *parents, last = path.split("/")
        target = doc
        for part in parents:
            target = target[int(part) if part.isdigit() else part]
        del target[last]

    return edit


BAD = {
    "healing not a strategy": (
        set_at("studies/0/healing/0", "all"),
        "studies[0].healing[0]='all' is not allowed: expected one of none, decoder, projector, decoder+projector",
    ),
    "unknown top-level key": (
        set_at("studys", []),
        "studys: unknown key; allowed keys: name, defaults, models, tasks, studies",
    ),
    "unknown defaults key": (
        set_at("defaults/workers", 2),
        "defaults.workers: unknown key; allowed keys: projector, train, heal, heal_train, decode, distance, seed, "
        "train_workers",
    ),
    "unknown slam config key": (
        set_at("defaults/heal", {"lora_rnak": 8}),
        "defaults.heal.lora_rnak: unknown key; allowed keys: strategy, lora_rank, lora_alpha, lora_dropout, "
        "lora_targets",
    ),
    "bad slam config value": (
        set_at("defaults/train/steps", 0),
        "defaults.train: train.steps=0 is not allowed: expected a positive integer",
    ),
    "train_workers zero": (
        set_at("defaults/train_workers", 0),
        "defaults.train_workers=0 is not allowed: expected an integer >= 1 (DDP processes per training)",
    ),
    "train_workers not an integer": (
        set_at("defaults/train_workers", "2"),
        "defaults.train_workers='2' is not allowed: expected an integer >= 1 (DDP processes per training)",
    ),
    "bad model override": (
        set_at("models/tiny/train", {"lr": "1e-3"}),
        "models.tiny.train.lr='1e-3': expected float",
    ),
    "bad data source": (
        set_at("tasks/asr/eval/test/source", "s3"),
        "tasks.asr.eval.test: data.source='s3' is not allowed: expected one of librispeech, loquacious, covost2, "
        "manifest",
    ),
    "bad decoder dtype": (
        set_at("models/tiny/decoder/dtype", "int8"),
        "models.tiny.decoder: decoder.dtype='int8' is not allowed: expected one of float32, bfloat16, float16",
    ),
    "unknown model in a study": (
        set_at("studies/0/models", ["tiny", "gpt"]),
        "studies[0].models[1]='gpt' is not allowed: expected one of tiny, shallow",
    ),
    "unknown task in a study": (
        set_at("studies/0/task", "tts"),
        "studies[0].task='tts' is not allowed: expected one of asr, ast",
    ),
    "unknown task in a path": (
        set_at("studies/0/paths/0", {"source": "speech", "task": "asr2"}),
        "studies[0].paths[0].task='asr2' is not allowed: expected one of asr, ast",
    ),
    "unknown model in a path": (
        set_at("studies/0/paths/0", {"source": "text", "model": "gpt"}),
        "studies[0].paths[0].model='gpt' is not allowed: expected one of tiny, shallow",
    ),
    "unknown path source": (
        set_at("studies/0/paths/0", {"source": "video"}),
        "studies[0].paths[0].source='video' is not allowed: expected one of speech, text",
    ),
    "unknown path key": (
        set_at("studies/0/paths/0", {"source": "speech", "layer": 3}),
        "studies[0].paths[0].layer: unknown key; allowed keys: source, task, model, convention",
    ),
    "unknown path convention": (
        set_at("studies/0/paths/0", {"source": "text", "convention": "shortgpt"}),
        "studies[0].paths[0].convention='shortgpt' is not allowed: expected one of paper, gromov",
    ),
    "unknown search": (
        set_at("studies/0/search", "random"),
        "studies[0].search='random' is not allowed: expected one of sweep, bisect",
    ),
    "a search in a study without depths": (
        lambda doc: doc["studies"][0].update(depths=[], healing=[], search="bisect"),
        "studies[0].search='bisect' is not allowed: expected sweep in a study without depths (it only measures paths)",
    ),
    "depth outside both conventions of a study": (
        lambda doc: doc["studies"][0].update(
            paths=[{"source": "text"}, {"source": "text", "convention": "gromov"}], depths=[2, 7]
        ),  # fmt: skip
        # paper's blocks are 2..7, gromov's 1..6: a depth both cut at lies in 2..6.
        "studies[0].depths[1]=7 is not allowed: expected an integer in 2..6 (tiny has 8 layers; paper and gromov "
        "conventions)",
    ),
    "a model directory written like a hub id": (
        set_at("models/tiny/encoder/name", "experiments/demo/models/encoder"),
        "models.tiny.encoder.name='experiments/demo/models/encoder' is not allowed: expected a hub id (org/name) or "
        "a local path written ./path, ../path (relative to this file's directory), /path or ~/path",
    ),
    "a data directory written like a hub id": (
        set_at("tasks/asr/eval/test", {"source": "librispeech", "path": "data/LibriSpeech/test", "split": "test"}),
        "tasks.asr.eval.test.path='data/LibriSpeech/test' is not allowed: expected a hub id (org/name) or a local "
        "path written ./path, ../path (relative to this file's directory), /path or ~/path",
    ),
    "path from a model of another depth": (
        set_at("studies/0/paths/0", {"source": "speech", "model": "shallow"}),
        "studies[0].paths[0].model='shallow' is not allowed: expected a model with as many layers as tiny (8); "
        "it has 6",
    ),
    "depth m": (
        set_at("studies/0/depths", [2, 8]),
        "studies[0].depths[1]=8 is not allowed: expected an integer in 2..7 (tiny has 8 layers)",
    ),
    "depth 1": (
        set_at("studies/0/depths", [1]),
        "studies[0].depths[0]=1 is not allowed: expected an integer in 2..7 (tiny has 8 layers)",
    ),
    "depth beyond the shallowest model": (
        lambda doc: doc["studies"][0].update(models=["tiny", "shallow"], depths=[2, 6]),
        "studies[0].depths[1]=6 is not allowed: expected an integer in 2..5 (shallow has 6 layers)",
    ),
    "depths neither all nor a list": (
        set_at("studies/0/depths", "some"),
        "studies[0].depths='some' is not allowed: expected 'all' or a list of block sizes n",
    ),
    "duplicate depth": (
        set_at("studies/0/depths", [2, 3, 2]),
        "studies[0].depths[2]=2 is not allowed: expected a value not already given at studies[0].depths[0]",
    ),
    "healing without depths": (
        set_at("studies/0/depths", []),
        "studies[0].healing=['none'] is not allowed: expected no healing in a study without depths "
        "(it only measures paths)",
    ),
    "no healing": (
        set_at("studies/0/healing", []),
        "studies[0].healing=[] is not allowed: expected a non-empty list",
    ),
    "missing layers": (
        _delete("models/tiny/layers"),
        "models.tiny.layers: missing required key",
    ),
    "too few layers": (
        set_at("models/tiny/layers", 2),
        "models.tiny.layers=2 is not allowed: expected an integer >= 3 (the decoder's number of layers)",
    ),
    "strategy set in defaults": (
        set_at("defaults/heal", {"strategy": "decoder"}),
        "defaults.heal.strategy: set by each study's `healing` axis, not here",
    ),
    "task set in a train block": (
        set_at("models/tiny/train", {"task": "ast"}),
        "models.tiny.train.task: set by each task (`tasks.<name>.task`), not here",
    ),
    "seed set in a train block": (
        set_at("defaults/heal_train/seed", 3),
        "defaults.heal_train.seed: set by `defaults.seed`, not here",
    ),
    "task kind": (
        set_at("tasks/ast/task", "st"),
        "tasks.ast.task='st' is not allowed: expected one of asr, ast",
    ),
    "no eval sets": (
        set_at("tasks/asr/eval", {}),
        "tasks.asr.eval={} is not allowed: expected at least one named data set",
    ),
    "name with a space": (
        set_at("studies/0/name", "my study"),
        "studies[0].name='my study' is not allowed: expected a name of letters, digits, '.', '_' and '-'",
    ),
    "duplicate study name": (
        lambda doc: doc["studies"].append(dict(doc["studies"][0])),
        "studies[1].name='asr' is not allowed: expected a value not already given at studies[0]",
    ),
    "studies not a list": (
        set_at("studies", {"name": "asr"}),
        "studies={'name': 'asr'} is not allowed: expected a non-empty list of studies",
    ),
}


@pytest.mark.parametrize("edit, message", list(BAD.values()), ids=list(BAD))
def test_bad_files_name_the_file_the_key_and_the_value(tmp_path, edit, message):
    doc = _doc()
    edit(doc)
    path = _write(tmp_path, doc)
    with pytest.raises(BadInputError) as caught:
        load_experiment(path)
    assert str(caught.value) == f"{path}: {message}"
    assert isinstance(caught.value, ValueError)


def test_a_key_written_twice_is_an_error(tmp_path):
    text = yaml.safe_dump(_doc(), sort_keys=False).replace("models:\n", "models:\n  tiny: {}\n", 1)
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(BadInputError) as caught:
        load_experiment(path)
    assert str(caught.value) == f"{path}: not valid YAML at line 10, column 3: found duplicate key 'tiny'"


def test_anchors_merge_keys_and_a_paths_only_study(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "name: anchors\n"
        "models: {tiny: {encoder: {name: e}, decoder: {name: d}, layers: 8}}\n"
        "tasks:\n"
        "  asr:\n"
        "    task: asr\n"
        "    prompt: P\n"
        "    train: &set {source: manifest, path: a.jsonl, split: x}\n"
        "    dev: {dev: *set}\n"
        "    eval: {test: {<<: *set, path: b.jsonl}}\n"
        "studies: [{name: s, task: asr, models: [tiny], paths: [{source: text}], depths: []}]\n"
    )
    exp = load_experiment(path)
    test = exp.tasks["asr"].eval["test"]
    assert (test.path, test.split, exp.tasks["asr"].dev["dev"].path) == ("b.jsonl", "x", "a.jsonl")
    (study,) = exp.studies
    assert (study.depths, study.healing, study.measures_only, study.depths_for(8)) == ((), (), True, ())


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: [unclosed", "not valid YAML at line 1, column 16: expected ',' or ']', but got '<stream end>'"),
        ("- a list", "(top level)=['a list'] is not allowed: expected a mapping"),
    ],
)
def test_unreadable_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(BadInputError) as caught:
        load_experiment(path)
    assert str(caught.value).startswith(f"{path}: {message}")


def test_a_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="nothing.yaml: no such experiment file"):
        load_experiment(tmp_path / "nothing.yaml")


def test_base_file_gives_sections_and_its_errors_name_it(tmp_path):
    base = _write(tmp_path, _doc(), "base.yaml")
    study = {"name": "other", "task": "ast", "models": ["shallow"], "paths": [{"source": "text"}], "depths": [5]}
    child = tmp_path / "child.yaml"
    study["healing"] = ["decoder"]
    child.write_text(yaml.safe_dump({"name": "child", "base": "base.yaml", "studies": [study]}))
    exp = load_experiment(child)
    assert (exp.name, exp.models["tiny"].layers, [s.name for s in exp.studies]) == ("child", 8, ["other"])

    child.write_text(yaml.safe_dump({"name": "child", "base": "base.yaml", "defaults": {}, "studies": [study]}))
    with pytest.raises(BadInputError, match=r"child\.yaml: defaults: unknown key; allowed keys: name, base, studies"):
        load_experiment(child)

    doc = _doc()
    doc["models"]["tiny"]["layers"] = "eight"
    _write(tmp_path, doc, "base.yaml")
    child.write_text(yaml.safe_dump({"name": "child", "base": "base.yaml", "studies": [study]}))
    with pytest.raises(BadInputError) as caught:
        load_experiment(child)
    assert str(caught.value).startswith(f"{base}: models.tiny.layers='eight' is not allowed")


def test_local_paths_are_relative_to_the_file_and_hub_ids_stay_hub_ids(tmp_path, monkeypatch):
    doc = _doc()
    doc["models"]["tiny"]["encoder"]["name"] = "./models/enc"
    doc["models"]["tiny"]["decoder"]["name"] = "Qwen/Qwen2.5-7B"
    doc["models"]["shallow"]["decoder"] = {"name": "../shared/dec"}
    doc["tasks"]["ast"]["dev"]["dev"] = {"source": "covost2", "path": "facebook/covost2", "name": "en_de"}
    (tmp_path / "sub").mkdir()
    path = _write(tmp_path / "sub", doc)
    monkeypatch.chdir(tmp_path.parent)  # not the file's directory: nothing depends on where the run starts
    exp = load_experiment(path)
    here = (tmp_path / "sub").resolve()
    assert exp.root == here
    local = {(p.where, p.written): p.resolved for p in exp.local_paths}
    assert local[("models.tiny.encoder.name", "./models/enc")] == here / "models" / "enc"
    assert local[("models.shallow.decoder.name", "../shared/dec")] == tmp_path.resolve() / "shared" / "dec"
    assert local[("tasks.asr.train.path", "missing/train.jsonl")] == here / "missing" / "train.jsonl"  # a manifest
    assert not any(p.written in ("Qwen/Qwen2.5-7B", "facebook/covost2", "dec") for p in exp.local_paths)
    assert {p.where for p in missing_paths(exp)} == {p.where for p in exp.local_paths}
    # Cells keep the paths as written (their ids do not depend on where the files sit); a worker resolves them.
    cell = next(c for c in expand(exp) if c.kind == "train")
    assert cell.config["speech_llm"]["encoder"]["name"] == "./models/enc"
    resolved = resolve_paths(cell.config, exp.root)
    assert resolved["speech_llm"]["encoder"]["name"] == str(here / "models" / "enc")
    assert resolved["speech_llm"]["decoder"]["name"] == "Qwen/Qwen2.5-7B"
    assert resolved["data"]["path"] == str(here / "missing" / "train.jsonl")
    assert cell.config["data"]["path"] == "missing/train.jsonl"  # the cell's own config is left as it was
    monkeypatch.chdir(tmp_path)
    relative = resolve_paths(cell.config, "sub")  # a root given relative to the working directory
    assert relative == resolved
    assert is_local_path("~/x") and is_local_path("/x") and not is_local_path("org/name")
    assert is_local_path("train.jsonl", "manifest") and not is_local_path("train.jsonl", "librispeech")


def test_a_based_file_s_paths_are_relative_to_its_base_file(tmp_path):
    doc = _doc()
    doc["models"]["tiny"]["encoder"]["name"] = "./enc"
    _write(tmp_path, doc, "base.yaml")
    (tmp_path / "tables").mkdir()
    child = tmp_path / "tables" / "child.yaml"
    child.write_text(yaml.safe_dump({"name": "child", "base": "../base.yaml", "studies": doc["studies"]}))
    exp = load_experiment(child)
    assert exp.root == tmp_path.resolve()
    assert {p.file for p in exp.local_paths} == {str(child.parent / "../base.yaml")}
    encoder = next(p for p in exp.local_paths if p.where == "models.tiny.encoder.name")
    assert encoder.resolved == tmp_path.resolve() / "enc"


def test_loading_imports_neither_ray_nor_mlflow_nor_torch():
    code = (
        "import sys; from grid.cells import expand; from grid.experiment import load_experiment; "
        "expand(load_experiment('experiments/paper.yaml')); "
        "print(' '.join(m for m in ('ray', 'mlflow', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _doc() -> dict:
    """A small valid experiment; nothing it names exists."""
    manifest = {"source": "manifest", "path": "missing/train.jsonl"}
    sets = {
        "train": manifest,
        "dev": {"dev": {**manifest, "path": "missing/dev.jsonl"}},
        "eval": {"test": {**manifest, "path": "missing/test.jsonl"}},
    }
    model = {"encoder": {"name": "enc"}, "decoder": {"name": "dec"}, "layers": 8}
    return {
        "name": "tiny",
        "defaults": {"train": {"steps": 10}, "heal_train": {"steps": 2}, "seed": 7},
        "models": {"tiny": model, "shallow": {**model, "layers": 6}},
        "tasks": {
            "asr": {"task": "asr", "prompt": "Transcribe.", **sets},
            "ast": {"task": "ast", "prompt": "Translate.", **sets},
        },
        "studies": [
            {
                "name": "asr",
                "task": "asr",
                "models": ["tiny"],
                "paths": [{"source": "speech"}],
                "depths": [2, 3],
                "healing": ["none"],
            }
        ],
    }


def _write(tmp_path: Path, doc: dict, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(json.loads(json.dumps(doc)), sort_keys=False))
    return path
