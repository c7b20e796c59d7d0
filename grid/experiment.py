"""Experiment files: a base config plus the axes of the grid, loaded and checked before anything runs.

An experiment file is YAML (read with a safe loader that also rejects a key given twice) holding data,
never logic:

```yaml
name: demo                  # the MLflow experiment
defaults:                   # base config of every cell; keys are the slam config names
  projector: {...}          # ProjectorConfig
  train: {...}              # TrainConfig of the baseline projector training
  heal: {...}               # HealConfig; the strategy comes from each study's healing axis
  heal_train: {...}         # TrainConfig of healing, merged over the model's training config
  decode: {...}             # DecodeConfig
  distance: {...}           # DistanceConfig
  seed: 0                   # fills train.seed and heal_train.seed
  train_workers: 1          # DDP processes of each baseline training (1: one process, in a grid worker)
models:                     # named backbones
  NAME: {encoder: {...}, decoder: {...}, layers: M, train: {...}, heal_train: {...}}
tasks:                      # named tasks
  NAME: {task: asr|ast, prompt: ..., train: {DataConfig}, dev: {SET: {DataConfig}}, eval: {SET: {DataConfig}}}
studies:                    # grid blocks
  - {name, task, models: [...], paths: [{source: speech|text, task?, model?, convention?}], depths: all|[n...],
     healing: [...], search?: sweep|bisect}
```

Conventions:

- Every slam config is built with `slam.config.from_dict`, so a key has the same name in YAML, in the
  dataclass and in MLflow params (`heal.lora_rank`).
- Training configs merge, key by key: `defaults.train`, then the model's `train` (e.g. Llama-3.1-8B's
  75,000 steps and 0.8 warmdown). Healing uses the same hyperparameters as training (paper 3.3), so
  `heal_train` merges `defaults.heal_train` and the model's `heal_train` over that model's training
  config. `train.task` is set by each task and `train.seed` by `defaults.seed`; neither may be written
  in a `train` block, nor `heal.strategy` (set by the healing axis).
- `train_workers` (W, default 1) trains every baseline projector with DDP in W processes (Ray Train),
  each on `train.batch_size` samples per step: the global batch is `batch_size * W` (the paper: 8 per
  GPU on 2 GPUs). It is part of each `train` cell's config, so changing it retrains. Healing uses the same
  global batch (paper 3.3: "the same hyperparameters"), in one process: a prune cell's `heal_train.batch_size`
  is `batch_size * W`, which DDP matches up to floating-point summation order (`slam.train`).
- `layers` (m) is required so that depths expand without loading a model; the run checks it against
  the model's config.
- A study with `depths: []` only measures pruning paths (Figure 1's heatmaps): no baseline evaluation,
  no pruned cells, and no `healing`.
- `search: sweep` (default) runs a pruned cell at every depth. `search: bisect` finds, for each (model, path,
  healing), the deepest depth within the threshold by binary search over `depths` (`slam.metrics.bisect_depth`):
  ceil(log2(k + 1)) pruned cells of k depths, assuming that degradation grows with depth (a depth within the
  threshold means every shallower one is). A pruned cell is the same cell, with the same id, whichever asked.
- A path's `convention` is `paper` (default: eq. 2, block n removes the n-1 layers l*+1..l*+n-1, n = 2..m-1) or
  `gromov` (Gromov et al., PruneMe: block n removes the n layers l*+1..l*+n that D[l][l+n] spans, n = 1..m-2);
  see `slam.redundancy`. A depth n is the block size of D[l][l+n] in either; `all` is every n of the path's
  convention.
- A path `{source: speech}` comes from the study's own trained SpeechLLM on its task's dev sets;
  `task` and `model` point elsewhere (`{source: speech, task: asr, model: qwen2.5-7b}` in an AST
  study is the ASR-derived path) and the model must have the same depth. `{source: text}` is a
  decoder-only forward on the transcripts of the task's dev sets.
- `base: paper.yaml` (relative to the file) takes `defaults`, `models` and `tasks` from another
  experiment file; the file then holds only `name`, `base` and its own `studies`, so the per-table
  files cannot drift from the whole study.
- Local paths. A model's `name` (encoder or decoder) and a data set's `path` are local when written
  `./x`, `../x`, `/x` or `~/x`; a manifest's `path` always is. Anything else is a hub id (`org/name`: a
  name with two or more `/` that is not written as a local path is an error, not a hub id). A relative
  local path is relative to the directory of the file that holds it (for `base:` files, the base file's),
  whatever directory `slamgrid run` runs from. Cells keep the paths as written, so their ids do not depend
  on where the repository sits; each process resolves them when it runs a cell (`resolve_paths`), against
  the experiment's directory: given relative to the job's working directory when the file is inside it
  (under `ray job submit --working-dir .` each node has its own copy there), absolute otherwise.
  `load_experiment` checks none of them exist (status and summaries need no data); `missing_paths`
  lists those that do not, which `slamgrid run` reports before any cell starts.

Every mistake raises `BadInputError` (a `ValueError`) naming the file, the dotted key path and the
bad value, e.g. `experiments/x.yaml: studies[1].healing[0]='all' is not allowed: expected one of none,
decoder, projector, decoder+projector`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from slam.config import (
    HEAL_STRATEGIES,
    PATH_CONVENTIONS,
    TASKS,
    DataConfig,
    DecodeConfig,
    DecoderConfig,
    DistanceConfig,
    EncoderConfig,
    HealConfig,
    ProjectorConfig,
    TrainConfig,
    depth_range,
    from_dict,
)
from slam.errors import BadInputError

T = TypeVar("T")

PATH_SOURCES = ("speech", "text")
ALL_DEPTHS = "all"

_TOP_KEYS = ("name", "defaults", "models", "tasks", "studies")
_BASED_KEYS = ("name", "base", "studies")
_DEFAULT_KEYS = ("projector", "train", "heal", "heal_train", "decode", "distance", "seed", "train_workers")
_MODEL_KEYS = ("encoder", "decoder", "layers", "train", "heal_train")
_TASK_KEYS = ("task", "prompt", "train", "dev", "eval")
_STUDY_KEYS = ("name", "task", "models", "paths", "depths", "healing", "search")
SEARCHES = ("sweep", "bisect")
"""How a study covers its depths: every one, or a binary search for the deepest within the threshold."""
_PATH_KEYS = ("source", "task", "model", "convention")
_LOCAL_PREFIXES = ("./", "../", "/", "~")
# Names become MLflow tags, metric keys (`wer/test-clean`) and directory names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NAME_RULE = "a name of letters, digits, '.', '_' and '-'"


@dataclass(frozen=True)
class ModelSpec:
    """A named backbone: the SpeechLLM's encoder and decoder, its depth, and its training configs."""

    name: str
    """Key of the model in the file's `models`."""
    layers: int
    """m, the decoder's number of layers; depths are expanded from it."""
    encoder: EncoderConfig
    """The frozen speech encoder."""
    decoder: DecoderConfig
    """The LLM decoder (with its optional LoRA)."""
    train: TrainConfig
    """Baseline projector training: `defaults.train` with this model's overrides; `task` is set per task."""
    heal_train: TrainConfig
    """Healing: `train` with `defaults.heal_train` and this model's `heal_train` on top; `task` set per task."""


@dataclass(frozen=True)
class TaskSpec:
    """A named task: what the SpeechLLM is trained to produce, and the data to train, measure and evaluate on."""

    name: str
    """Key of the task in the file's `tasks`."""
    task: str
    """`asr` (target: the transcript) or `ast` (target: the translation)."""
    prompt: str
    """Instruction placed between the speech embeddings and the target."""
    train: DataConfig
    """Training set of the projector (and of healing)."""
    dev: dict[str, DataConfig]
    """Named sets the layer distances are averaged over (speech, or their transcripts for text paths)."""
    eval: dict[str, DataConfig]
    """Named sets the WER or BLEU is reported on."""


@dataclass(frozen=True)
class PathSpec:
    """Where a study's pruning path comes from."""

    source: str
    """`speech` (a trained SpeechLLM on speech) or `text` (the decoder alone on transcripts)."""
    task: str | None = None
    """Task whose dev sets (and, for speech, whose SpeechLLM) give the path; None: the study's task."""
    model: str | None = None
    """Model that gives the path; None: each model of the study, its own."""
    convention: str = "paper"
    """Block convention: `paper` (eq. 2, n-1 layers removed per block n) or `gromov` (n layers removed)."""


@dataclass(frozen=True)
class Study:
    """One block of the grid: models x paths x depths x healing strategies on one task."""

    name: str
    """Unique within the file; the summary cell's name."""
    task: str
    """Key of the task every model is trained and evaluated on."""
    models: tuple[str, ...]
    """Keys of the models."""
    paths: tuple[PathSpec, ...]
    """Pruning paths applied to each model."""
    depths: tuple[int, ...] | str
    """Block sizes n of D[l][l+n], or `all` for every n of each path's convention (n = 2..m-1 for `paper`, whose
    block n removes n - 1 layers); () measures paths only."""
    healing: tuple[str, ...]
    """Healing strategies: `none`, `decoder`, `projector`, `decoder+projector`; () when there are no depths."""
    search: str = "sweep"
    """`sweep` (every depth) or `bisect` (a binary search for the deepest depth within the threshold)."""

    @property
    def measures_only(self) -> bool:
        """Whether the study only measures pruning paths (no evaluation, no pruned cells)."""
        return self.depths == ()

    def depths_for(self, layers: int, convention: str = "paper") -> tuple[int, ...]:
        """The block sizes n of this study on a path of `convention` for a model with `layers` decoder layers (m)."""
        return tuple(depth_range(layers, convention)) if self.depths == ALL_DEPTHS else tuple(self.depths)

    def resolve(self, path: PathSpec, model: str) -> PathSpec:
        """`path` with its task and model filled in for `model` of this study."""
        return replace(path, task=path.task or self.task, model=path.model or model)


@dataclass(frozen=True)
class LocalPath:
    """A local path of an experiment file (a model directory, a manifest, a data set directory)."""

    file: str
    """The file that holds it."""
    where: str
    """Its dotted key path in that file, e.g. `models.tiny-qwen.encoder.name`."""
    written: str
    """The value as written."""
    resolved: Path
    """The absolute path it stands for."""


@dataclass(frozen=True)
class Experiment:
    """A loaded, checked experiment file."""

    name: str
    """MLflow experiment that holds every cell of the file."""
    source: str
    """The file it was loaded from, as given."""
    root: Path
    """Absolute directory that relative local paths are relative to: that of the file holding `models` and
    `tasks` (the base file of a `base:` file)."""
    local_paths: tuple[LocalPath, ...]
    """Every local path of the models and tasks, resolved against `root`."""
    projector: ProjectorConfig
    """Projector of every SpeechLLM."""
    heal: HealConfig
    """Healing LoRA settings; each cell sets the strategy from its study's healing axis."""
    decode: DecodeConfig
    """Greedy decoding of every evaluation."""
    distance: DistanceConfig
    """Measuring the layer distances of every path."""
    seed: int
    """Seed of every training run (`train.seed`, `heal_train.seed`)."""
    train_workers: int
    """DDP processes of each baseline projector training; the global batch is `train.batch_size` times this."""
    models: dict[str, ModelSpec]
    """Backbones by name."""
    tasks: dict[str, TaskSpec]
    """Tasks by name."""
    studies: tuple[Study, ...]
    """The grid's blocks, in file order."""


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment file (see the module docstring for the format).

    Args:
        path: The YAML file.

    Returns:
        The experiment, every slam config built and every reference checked.

    Raises:
        BadInputError: The file is missing or not YAML, or a key, value or reference is wrong; the
            message names the file, the dotted key path and the value.
    """
    path = Path(path)
    parser = _Parser(str(path))
    raw = parser.mapping(_read_yaml(path), "")
    if "base" in raw:
        parser.keys(raw, "", _BASED_KEYS, required=("name", "base", "studies"))
        base_path = path.parent / parser.string(raw["base"], "base")
        base_parser = _Parser(str(base_path))
        base = base_parser.mapping(_read_yaml(base_path), "")
        base_parser.keys(base, "", _TOP_KEYS, required=("name", "models", "tasks"))
    else:
        parser.keys(raw, "", _TOP_KEYS, required=("name", "models", "tasks", "studies"))
        base_parser, base = parser, raw
    name = parser.name(raw["name"], "name")
    defaults = base_parser.defaults(base.get("defaults", {}))
    models = base_parser.models(base["models"], defaults)
    tasks = base_parser.tasks(base["tasks"])
    studies = parser.studies(raw["studies"], models, tasks)
    return Experiment(
        name=name,
        source=str(path),
        root=base_parser.root,
        local_paths=tuple(base_parser.local_paths),
        projector=defaults.projector,
        heal=defaults.heal,
        decode=defaults.decode,
        distance=defaults.distance,
        seed=defaults.seed,
        train_workers=defaults.train_workers,
        models=models,
        tasks=tasks,
        studies=studies,
    )


@dataclass(frozen=True)
class _Defaults:
    """`defaults`, checked; the raw training blocks are kept for merging with each model's."""

    projector: ProjectorConfig
    heal: HealConfig
    decode: DecodeConfig
    distance: DistanceConfig
    seed: int
    train_workers: int
    train: dict
    heal_train: dict


class _StrictLoader(yaml.SafeLoader):
    """The safe loader, rejecting a key written twice in one mapping (plain YAML keeps the last silently)."""


def is_local_path(value: str, data_source: str | None = None) -> bool:
    """Whether an experiment's model name or data path is a local path (see the module docstring).

    Args:
        value: A model's `name` or a data set's `path`.
        data_source: The data set's `source` (a manifest path is always local); None for a model name.
    """
    return data_source == "manifest" or value.startswith(_LOCAL_PREFIXES)


def resolve_paths(config: Any, root: str | Path) -> Any:
    """A cell config (or any part of one) with every relative local path made absolute against `root`.

    Local paths are found where configs hold them: the `name` of an `encoder` or `decoder` mapping and the `path`
    of a data set mapping (one with a `source`); hub ids and absolute paths are left as they are.

    Args:
        config: JSON-ready data, e.g. `Cell.config`.
        root: The experiment's directory (`Experiment.root`), or that directory relative to the current one.

    Returns:
        A copy with the paths resolved; `config` itself is not changed.
    """
    base = Path(os.path.abspath(root))
    if isinstance(config, list):
        return [resolve_paths(item, base) for item in config]
    if not isinstance(config, dict):
        return config
    resolved = {}
    for key, value in config.items():
        value = resolve_paths(value, base)
        if key in ("encoder", "decoder") and isinstance(value, dict) and isinstance(value.get("name"), str):
            value = {**value, "name": _resolved(value["name"], base, None)}
        resolved[key] = value
    if isinstance(config.get("source"), str) and isinstance(config.get("path"), str):
        resolved["path"] = _resolved(config["path"], base, config["source"])
    return resolved


def missing_paths(exp: Experiment) -> list[LocalPath]:
    """The local paths of an experiment that do not exist (on this machine)."""
    return [path for path in exp.local_paths if not path.resolved.exists()]


def _resolved(value: str, root: Path, data_source: str | None) -> str:
    if not is_local_path(value, data_source):
        return value
    return os.path.normpath(root / os.path.expanduser(value))


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        # `<<: *anchor` merges are meant to be overridden by the keys written beside them.
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, str | int | float | bool) and key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise BadInputError(f"{path}: no such experiment file")
    try:
        # A SafeLoader subclass: as safe as `yaml.safe_load`, plus the duplicate-key check.
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.MarkedYAMLError as err:
        # One line, where the parser stopped, so that the CLI's one-line error stays readable.
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise BadInputError(f"{path}: not valid YAML{at}: {err.problem or err.context}") from err
    except yaml.YAMLError as err:
        raise BadInputError(f"{path}: not valid YAML: {err}") from err
    except UnicodeDecodeError as err:
        raise BadInputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err


class _Parser:
    """Checks the sections of one file; every error it raises names that file."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.root = Path(os.path.abspath(file)).parent
        self.local_paths: list[LocalPath] = []

    def defaults(self, raw: Any) -> _Defaults:
        where = "defaults"
        raw = self.mapping(raw, where)
        self.keys(raw, where, _DEFAULT_KEYS)
        train = self.mapping(raw.get("train", {}), "defaults.train")
        heal_train = self.mapping(raw.get("heal_train", {}), "defaults.heal_train")
        heal = self.mapping(raw.get("heal", {}), "defaults.heal")
        self.reserved(train, "defaults.train")
        self.reserved(heal_train, "defaults.heal_train")
        if "strategy" in heal:
            self.fail_key("defaults.heal.strategy", "set by each study's `healing` axis, not here")
        seed = raw.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            self.fail("defaults.seed", seed, "an integer")
        train_workers = raw.get("train_workers", 1)
        if not isinstance(train_workers, int) or isinstance(train_workers, bool) or train_workers < 1:
            self.fail("defaults.train_workers", train_workers, "an integer >= 1 (DDP processes per training)")
        # Checked on their own first, so that a bad default is reported where it is written.
        self.config(TrainConfig, train, "defaults.train")
        self.config(TrainConfig, {**train, **heal_train}, "defaults.heal_train")
        return _Defaults(
            projector=self.config(ProjectorConfig, raw.get("projector", {}), "defaults.projector"),
            heal=self.config(HealConfig, heal, "defaults.heal"),
            decode=self.config(DecodeConfig, raw.get("decode", {}), "defaults.decode"),
            distance=self.config(DistanceConfig, raw.get("distance", {}), "defaults.distance"),
            seed=seed,
            train_workers=train_workers,
            train=train,
            heal_train=heal_train,
        )

    def models(self, raw: Any, defaults: _Defaults) -> dict[str, ModelSpec]:
        raw = self.mapping(raw, "models")
        if not raw:
            self.fail("models", raw, "at least one model")
        return {self.name(name, f"models.{name}"): self.model(name, spec, defaults) for name, spec in raw.items()}

    def model(self, name: str, raw: Any, defaults: _Defaults) -> ModelSpec:
        where = f"models.{name}"
        raw = self.mapping(raw, where)
        self.keys(raw, where, _MODEL_KEYS, required=("encoder", "decoder", "layers"))
        layers = raw["layers"]
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 3:
            # m >= 3: the smallest block, n = 2, must fit in 2..m-1.
            self.fail(f"{where}.layers", layers, "an integer >= 3 (the decoder's number of layers)")
        train = self.mapping(raw.get("train", {}), f"{where}.train")
        heal_train = self.mapping(raw.get("heal_train", {}), f"{where}.heal_train")
        self.reserved(train, f"{where}.train")
        self.reserved(heal_train, f"{where}.heal_train")
        merged = {**defaults.train, **train, "seed": defaults.seed}
        healing = {**merged, **defaults.heal_train, **heal_train, "seed": defaults.seed}
        encoder = self.config(EncoderConfig, raw["encoder"], f"{where}.encoder")
        decoder = self.config(DecoderConfig, raw["decoder"], f"{where}.decoder")
        self.location(encoder.name, f"{where}.encoder.name")
        self.location(decoder.name, f"{where}.decoder.name")
        return ModelSpec(
            name=name,
            layers=layers,
            encoder=encoder,
            decoder=decoder,
            train=self.config(TrainConfig, merged, f"{where}.train"),
            heal_train=self.config(TrainConfig, healing, f"{where}.heal_train" if heal_train else f"{where}.train"),
        )

    def tasks(self, raw: Any) -> dict[str, TaskSpec]:
        raw = self.mapping(raw, "tasks")
        if not raw:
            self.fail("tasks", raw, "at least one task")
        return {self.name(name, f"tasks.{name}"): self.task(name, spec) for name, spec in raw.items()}

    def task(self, name: str, raw: Any) -> TaskSpec:
        where = f"tasks.{name}"
        raw = self.mapping(raw, where)
        self.keys(raw, where, _TASK_KEYS, required=_TASK_KEYS)
        if raw["task"] not in TASKS:
            self.fail(f"{where}.task", raw["task"], "one of " + ", ".join(TASKS))
        return TaskSpec(
            name=name,
            task=raw["task"],
            prompt=self.string(raw["prompt"], f"{where}.prompt"),
            train=self.data(raw["train"], f"{where}.train"),
            dev=self.data_sets(raw["dev"], f"{where}.dev"),
            eval=self.data_sets(raw["eval"], f"{where}.eval"),
        )

    def data(self, raw: Any, where: str) -> DataConfig:
        data = self.config(DataConfig, raw, where)
        self.location(data.path, f"{where}.path", data.source)
        return data

    def location(self, value: str, where: str, data_source: str | None = None) -> None:
        """Record a local path (resolved against this file's directory); reject a path that looks like a hub id."""
        if is_local_path(value, data_source):
            resolved = Path(_resolved(value, self.root, data_source))
            self.local_paths.append(LocalPath(self.file, where, value, resolved))
        elif value.count("/") >= 2:
            self.fail(
                where,
                value,
                "a hub id (org/name) or a local path written ./path, ../path (relative to this file's directory), "
                "/path or ~/path",
            )

    def data_sets(self, raw: Any, where: str) -> dict[str, DataConfig]:
        raw = self.mapping(raw, where)
        if not raw:
            self.fail(where, raw, "at least one named data set")
        return {self.name(name, f"{where}.{name}"): self.data(spec, f"{where}.{name}") for name, spec in raw.items()}

    def studies(self, raw: Any, models: dict[str, ModelSpec], tasks: dict[str, TaskSpec]) -> tuple[Study, ...]:
        if not isinstance(raw, list) or not raw:
            self.fail("studies", raw, "a non-empty list of studies")
        studies = tuple(self.study(spec, f"studies[{i}]", models, tasks) for i, spec in enumerate(raw))
        self.unique([study.name for study in studies], "studies", "name")
        return studies

    def study(self, raw: Any, where: str, models: dict[str, ModelSpec], tasks: dict[str, TaskSpec]) -> Study:
        raw = self.mapping(raw, where)
        self.keys(raw, where, _STUDY_KEYS, required=("name", "task", "models", "paths", "depths"))
        name = self.name(raw["name"], f"{where}.name")
        task = self.choice(raw["task"], f"{where}.task", tuple(tasks))
        names = self.items(raw["models"], f"{where}.models")
        for i, model in enumerate(names):
            self.choice(model, f"{where}.models[{i}]", tuple(models))
        self.unique(names, f"{where}.models")
        specs = self.items(raw["paths"], f"{where}.paths")
        paths = tuple(self.path(spec, f"{where}.paths[{i}]", models, tasks) for i, spec in enumerate(specs))
        self.unique(paths, f"{where}.paths")
        for i, path in enumerate(paths):
            for model in names:
                self.same_depth(path, models[model], models, f"{where}.paths[{i}].model")
        depths = self.depths(raw["depths"], f"{where}.depths", [models[m] for m in names], paths)
        healing = self.healing(raw.get("healing", []), f"{where}.healing", measures_only=depths == ())
        search = self.choice(raw.get("search", "sweep"), f"{where}.search", SEARCHES)
        if search == "bisect" and depths == ():
            self.fail(f"{where}.search", search, "sweep in a study without depths (it only measures paths)")
        return Study(name=name, task=task, models=tuple(names), paths=paths, depths=depths, healing=healing,
                     search=search)  # fmt: skip

    def path(self, raw: Any, where: str, models: dict[str, ModelSpec], tasks: dict[str, TaskSpec]) -> PathSpec:
        raw = self.mapping(raw, where)
        self.keys(raw, where, _PATH_KEYS, required=("source",))
        return PathSpec(
            source=self.choice(raw["source"], f"{where}.source", PATH_SOURCES),
            task=self.choice(raw["task"], f"{where}.task", tuple(tasks)) if "task" in raw else None,
            model=self.choice(raw["model"], f"{where}.model", tuple(models)) if "model" in raw else None,
            convention=self.choice(raw.get("convention", "paper"), f"{where}.convention", PATH_CONVENTIONS),
        )

    def same_depth(self, path: PathSpec, model: ModelSpec, models: dict[str, ModelSpec], where: str) -> None:
        """A path names layers by number: only a model of the same depth can give it."""
        if path.model is not None and models[path.model].layers != model.layers:
            other = models[path.model]
            self.fail(
                where,
                path.model,
                f"a model with as many layers as {model.name} ({model.layers}); it has {other.layers}",
            )

    def depths(
        self, raw: Any, where: str, models: list[ModelSpec], paths: tuple[PathSpec, ...]
    ) -> tuple[int, ...] | str:
        if raw == ALL_DEPTHS:
            return ALL_DEPTHS
        if not isinstance(raw, list):
            self.fail(where, raw, f"'{ALL_DEPTHS}' or a list of block sizes n")
        shallowest = min(models, key=lambda model: model.layers)
        # Every path of the study is cut at every depth: n must be a block of each path's convention.
        conventions = sorted({path.convention for path in paths}, key=PATH_CONVENTIONS.index)
        allowed = [depth_range(shallowest.layers, convention) for convention in conventions]
        low, high = max(r.start for r in allowed), min(r.stop for r in allowed) - 1
        for i, n in enumerate(raw):
            if not isinstance(n, int) or isinstance(n, bool) or not low <= n <= high:
                self.fail(
                    f"{where}[{i}]",
                    n,
                    f"an integer in {low}..{high} ({shallowest.name} has {shallowest.layers} layers"
                    + ("" if conventions == ["paper"] else f"; {' and '.join(conventions)} conventions")
                    + ")",
                )
        self.unique(raw, where)
        return tuple(raw)

    def healing(self, raw: Any, where: str, measures_only: bool) -> tuple[str, ...]:
        if measures_only:
            if raw not in ([], None):
                self.fail(where, raw, "no healing in a study without depths (it only measures paths)")
            return ()
        strategies = self.items(raw, where)
        for i, strategy in enumerate(strategies):
            self.choice(strategy, f"{where}[{i}]", HEAL_STRATEGIES)
        self.unique(strategies, where)
        return tuple(strategies)

    def reserved(self, raw: dict, where: str) -> None:
        """Keys of TrainConfig that the experiment sets itself, so they have one source of truth."""
        if "task" in raw:
            self.fail_key(f"{where}.task", "set by each task (`tasks.<name>.task`), not here")
        if "seed" in raw:
            self.fail_key(f"{where}.seed", "set by `defaults.seed`, not here")

    def config(self, cls: type[T], raw: Any, where: str) -> T:
        """A slam config through `from_dict`, its error re-worded to name the file and the key path."""
        try:
            return from_dict(cls, raw, where)
        except ValueError as err:
            message = str(err)
            # `__post_init__` names a field by its stage (`train.steps`), not by where it is in the file.
            if not message.startswith(where):
                message = f"{where}: {message}"
            raise BadInputError(f"{self.file}: {message}") from err

    def mapping(self, raw: Any, where: str) -> dict:
        if not isinstance(raw, dict):
            self.fail(where or "(top level)", raw, "a mapping")
        return raw

    def items(self, raw: Any, where: str) -> list:
        if not isinstance(raw, list) or not raw:
            self.fail(where, raw, "a non-empty list")
        return raw

    def keys(self, raw: dict, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
        prefix = f"{where}." if where else ""
        for key in raw:
            if key not in allowed:
                self.fail_key(f"{prefix}{key}", f"unknown key; allowed keys: {', '.join(allowed)}")
        for key in required:
            if key not in raw:
                self.fail_key(f"{prefix}{key}", "missing required key")

    def name(self, raw: Any, where: str) -> str:
        if not isinstance(raw, str) or not _NAME.match(raw):
            self.fail(where, raw, _NAME_RULE)
        return raw

    def string(self, raw: Any, where: str) -> str:
        if not isinstance(raw, str) or not raw:
            self.fail(where, raw, "a non-empty string")
        return raw

    def choice(self, raw: Any, where: str, allowed: tuple[str, ...]) -> str:
        if raw not in allowed:
            self.fail(where, raw, "one of " + ", ".join(allowed))
        return raw

    def unique(self, values: list | tuple, where: str, field: str = "") -> None:
        seen = []
        for i, value in enumerate(values):
            if value in seen:
                key = f"{where}[{i}].{field}" if field else f"{where}[{i}]"
                self.fail(key, value, f"a value not already given at {where}[{seen.index(value)}]")
            seen.append(value)

    def fail(self, where: str, value: Any, expected: str) -> None:
        raise BadInputError(f"{self.file}: {where}={_show(value)} is not allowed: expected {expected}")

    def fail_key(self, where: str, reason: str) -> None:
        raise BadInputError(f"{self.file}: {where}: {reason}")


def _show(value: Any) -> str:
    """A value as in the file, shortened: a whole section in a message helps nobody."""
    if isinstance(value, PathSpec):
        value = {k: v for k, v in vars(value).items() if v is not None}
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
