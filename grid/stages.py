"""Executing one cell of the grid, plain (no Ray): the Ray actors and the tests call the same code.

`run_cell` dispatches on the cell's kind; each kind reads its cell's config (`grid.cells`), calls the slam
stage functions and reports through the cell's MLflow run (`grid.tracking.CellRun`):

- `train`: projector (and optional LoRA) training; artifact `model/` (`slam.model.save_speech_llm`), metrics
  `train.loss`, `trainable_params`, `peak_memory_mb`. A single-process cell trains here, in its worker; a cell
  with `train_workers: W > 1` is DDP, which `grid.runner` starts through Ray Train: each of its W processes calls
  `train_speech_llm`, and rank 0 reports.
- `path`: the distance matrix and optimal pruning path in the cell's block convention; artifacts `distance.json`
  (the `slamgrid path` JSON contract, DESIGN section 4) and `heatmap.png` (D[l][l+n], as in the paper's Figure 1);
  tags `measured_token` and `layout` (`slam.redundancy`).
- `eval`: baseline scores; metrics `{set}.wer` (percent) or `{set}.bleu`, `{set}.excluded` (references the
  normaliser empties, left out of the WER), the decoding cost `{set}.decode_tokens_per_s`, `{set}.decode_seconds`,
  `{set}.encode_seconds` (`slam.decode.DecodeStats`) and `peak_memory_mb`; artifacts `hypotheses/{set}.json`.
- `prune`: one step of a path applied to the trained SpeechLLM, healed (unless `none`: `train.loss`,
  `train.skipped`, `train.resumed_from` of the healing) and evaluated like `eval`; metrics also
  `trainable_params`, `n`, `fraction`, `removed_layers`, tags `removed`, `receiving_layer`.
- `summary`: the removable fraction of every (model, path, healing) of a study, computed from the store alone,
  each depth's `speedup` (decoding throughput over its baseline's) and `peak_memory_ratio`, and how its text-
  and speech-derived paths agree (`path_comparisons`); `summaries/{study}.json` on the parent
  run, `summary.json` and metrics `removable_fraction.*` and `path_agreement.*` on its own.

A cell reads what its dependencies produced from their MLflow runs (never from another cell's working
directory), so it runs on any worker whatever ran its dependencies. Its own working directory holds what it
needs to resume after an interruption: training checkpoints (`train/`, `heal/`, see `slam.train`).
"""

from __future__ import annotations

import copy
import gc
import json
import math
import re
import resource
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.ticker import MaxNLocator
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grid.cells import Cell, prune_path_label
from grid.experiment import is_local_path, resolve_paths
from grid.tracking import CellRun, GridStore
from slam.config import (
    TASK_METRICS,
    DataConfig,
    DecodeConfig,
    DecoderConfig,
    DistanceConfig,
    EncoderConfig,
    HealConfig,
    SpeechLLMConfig,
    TrainConfig,
    from_dict,
)
from slam.data import load_dataset
from slam.errors import BadInputError
from slam.evaluate import evaluate
from slam.export import save_healed
from slam.features import FeatureCache
from slam.healing import add_healing
from slam.metrics import (
    BLEU_THRESHOLD,
    WER_THRESHOLD,
    relative_change,
    removable_fraction,
    set_scores,
    within_threshold,
)
from slam.model import (
    SpeechEncoder,
    SpeechLLM,
    assemble_speech_llm,
    decoder_stack,
    load_decoder,
    load_encoder,
    read_speech_llm_config,
    restore_trained,
    save_speech_llm,
)
from slam.pruning import drop_layers
from slam.redundancy import PathStep, path_agreement, path_report, speech_layer_distances, text_layer_distances
from slam.track import NullTracker
from slam.train import TrainResult, train

MODEL_ARTIFACT = "model"
"""Artifact directory of a `train` cell: the saved SpeechLLM (`speechllm.json`, `trained.safetensors`)."""
DISTANCE_ARTIFACT = "distance.json"
"""Artifact of a `path` cell: the `slamgrid path` JSON."""
HEATMAP_ARTIFACT = "heatmap.png"
"""Artifact of a `path` cell: D[l][l+n] over layer l and block size n."""
SUMMARY_ARTIFACT = "summary.json"
"""Artifact of a `summary` cell: its study's table (also `summaries/{study}.json` on the parent run)."""
HEALED_ARTIFACT = "healed"
"""Artifact directory of a healed prune cell: what healing trained (`slam.export.save_healed`)."""
_THRESHOLDS = {"wer": WER_THRESHOLD, "bleu": BLEU_THRESHOLD}
# MLflow metric keys allow letters, digits and `_ - . / : space`; model and strategy names may hold more (`+`).
_METRIC_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ ]")


class Backbones:
    """The backbones a worker has loaded, kept across cells so that each is read from disk (or a hub) once.

    Encoders are shared as they are (frozen, never modified). Decoders are kept on the CPU as masters and
    every SpeechLLM gets a deep copy, because pruning and LoRA change a decoder in place.
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        backbones_per_worker: int | None = None,
        feature_cache: str | Path | None = None,
    ) -> None:
        """Start empty.

        Args:
            device: Where models run; None: `cuda` (the worker's one visible GPU) when available, else `cpu`.
            backbones_per_worker: Decoders kept at most; loading one more first drops the least recently used (a 7B
                master copy takes 15-30 GB of CPU memory). None: no limit.
            feature_cache: Root of the frozen-encoder feature cache (`slam.features`) every encoder reads and
                fills; None: encode every utterance every time.
        """
        if backbones_per_worker is not None and backbones_per_worker < 1:
            raise ValueError(
                f"backbones_per_worker={backbones_per_worker} is not allowed: expected a positive integer or None"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backbones_per_worker = backbones_per_worker
        self.loads: dict[str, int] = {}
        """Loads from disk so far, by `encoder:<name>` and `decoder:<name>`."""
        self.feature_cache = FeatureCache(feature_cache) if feature_cache is not None else None
        self._encoders: dict[EncoderConfig, SpeechEncoder] = {}
        # Least recently used first.
        self._decoders: OrderedDict[DecoderConfig, tuple[PreTrainedModel, PreTrainedTokenizerBase]] = OrderedDict()

    def encoder(self, cfg: EncoderConfig) -> SpeechEncoder:
        """The frozen speech encoder of `cfg`, on `self.device`, loaded on first use."""
        if cfg not in self._encoders:
            self._encoders[cfg] = load_encoder(cfg).to(self.device)
            self._encoders[cfg].cache = self.feature_cache
            self._count(f"encoder:{cfg.name}")
        return self._encoders[cfg]

    def encoder_use(self) -> tuple[int, int]:
        """Utterances the loaded encoders have encoded so far, and those they read from the feature cache."""
        encoders = self._encoders.values()
        return sum(e.encoded for e in encoders), sum(e.cached for e in encoders)

    def decoder(self, cfg: DecoderConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The master copy of a decoder (on CPU; do not modify it) and its tokenizer, loaded on first use.

        Beyond `backbones_per_worker`, the least recently used decoder is dropped first (and loaded again if needed).

        The key leaves out `cfg.lora`: the adapter is added to each SpeechLLM's copy, so the frozen and the
        LoRA-adapted SpeechLLMs of one LLM, and its text paths, share one load.
        """
        key = replace(cfg, lora=None)
        if key in self._decoders:
            self._decoders.move_to_end(key)
            return self._decoders[key]
        if self.backbones_per_worker is not None:
            while len(self._decoders) >= self.backbones_per_worker:
                self._decoders.popitem(last=False)
            gc.collect()
        self._decoders[key] = load_decoder(key)
        self._count(f"decoder:{cfg.name}")
        return self._decoders[key]

    def speech_llm(self, cfg: SpeechLLMConfig, seed: int = 0) -> SpeechLLM:
        """A fresh SpeechLLM of `cfg` on `self.device`: the shared encoder, a copy of the decoder, a new projector.

        Args:
            cfg: The SpeechLLM.
            seed: Seeds the projector's (and a decoder LoRA's) initialisation.

        Returns:
            The composed model; its projector is initialised, not trained.
        """
        encoder = self.encoder(cfg.encoder)
        decoder, tokenizer = self.decoder(cfg.decoder)
        torch.manual_seed(seed)
        return assemble_speech_llm(cfg, encoder, copy.deepcopy(decoder), tokenizer).to(self.device)

    def held(self) -> set[str]:
        """Names of the decoders loaded, what the scheduler routes cells by."""
        return {cfg.name for cfg in self._decoders}

    def release(self) -> None:
        """Free what the last cell left behind (its model copies), keeping the backbones."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _count(self, key: str) -> None:
        self.loads[key] = self.loads.get(key, 0) + 1


def run_cell(
    cell: Cell,
    run: CellRun,
    deps: Mapping[str, str],
    store: GridStore,
    workdir: Path,
    backbones: Backbones,
    root: str | Path | None = None,
) -> None:
    """Execute one cell, reporting to its run; raises on failure (the caller's `with run:` records it).

    Args:
        cell: The cell.
        run: Its RUNNING MLflow run (`GridStore.start_cell`).
        deps: Each dependency's cell id -> its FINISHED run id, where its artifacts and metrics are read.
        store: The grid's store (reads dependencies' runs; the summary writes on the parent run).
        workdir: The cell's own directory (checkpoints, downloads); kept between attempts to resume.
        backbones: The worker's loaded backbones.
        root: The experiment's directory (absolute, or relative to the working directory), against which the
            config's relative local paths resolve (`grid.experiment.resolve_paths`); None: the working directory.

    Raises:
        ValueError: A dependency has no finished run in `deps`.
        BadInputError: Bad data, a model that does not match the experiment, a missing artifact.
    """
    missing = [dep for dep in cell.deps if dep not in deps]
    if missing:
        raise ValueError(f"cell {cell.id} ({cell.kind}): no finished run given for dependencies {missing}")
    workdir.mkdir(parents=True, exist_ok=True)
    root = "." if root is None else root
    config = resolve_paths(cell.config, root)
    before = backbones.encoder_use()
    _STAGES[cell.kind](_Context(cell, config, run, deps, store, workdir, backbones, root))
    log_encoder_use(run, backbones, before)


def log_encoder_use(run: CellRun | None, backbones: Backbones, before: tuple[int, int]) -> None:
    """Log what a cell's encoding cost: metrics `features.encoded` (utterances run through the encoder) and
    `features.cached` (read from the feature cache instead), counted since `before` (`Backbones.encoder_use`).

    In a DDP group (`torch.distributed` initialised) every rank calls this and the counts of all ranks are added up.

    Args:
        run: The cell's run in the reporting process; None in the other ranks.
        backbones: The backbones the cell ran on.
        before: Their `encoder_use()` when the cell began.
    """
    encoded, cached = (now - then for now, then in zip(backbones.encoder_use(), before, strict=True))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        counts = torch.tensor([encoded, cached], dtype=torch.long, device=backbones.device)
        torch.distributed.all_reduce(counts)
        encoded, cached = (int(count) for count in counts.tolist())
    if run is not None and encoded + cached > 0:
        run.log_metrics({"features.encoded": encoded, "features.cached": cached})


def train_speech_llm(config: Mapping[str, Any], workdir: Path, backbones: Backbones, run: CellRun | None) -> None:
    """Train a `train` cell's SpeechLLM in this process and report it to the cell's run.

    In a worker this is the whole training; in each process of a DDP group (`torch.distributed` initialised,
    as Ray Train does) it is one rank of it, `slam.train.train` taking the rank's slice of every global batch.
    The reporting process (the only one, or rank 0) streams `train.loss` and `train.lr` while training, then
    logs the model artifact `model/` and the metrics `train.loss` (unless the last step already logged it),
    `trainable_params`, `peak_memory_mb`, `train.resumed_from` and `train.skipped` (the samples left out
    under `on_bad_sample: skip`, listed in `train_skipped.json` when there are any).

    Args:
        config: The train cell's config.
        workdir: The cell's directory; its `train/checkpoints` resume an interrupted attempt (under DDP rank 0
            reads and writes them).
        backbones: Where the encoder and decoder come from.
        run: The cell's run in the reporting process; None in the other ranks, which report nothing.

    Raises:
        BadInputError: Bad data, a decoder whose depth is not the experiment's, an unfitting checkpoint.
    """
    cfg = from_dict(SpeechLLMConfig, config["speech_llm"], "speech_llm")
    train_cfg = from_dict(TrainConfig, config["train"], "train")
    device = backbones.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = backbones.speech_llm(cfg, seed=train_cfg.seed)
    _check_layers(model.decoder, config["layers"], cfg.decoder.name)
    dataset = load_dataset(from_dict(DataConfig, config["data"], "data"))
    result = train(model, dataset.for_training(), train_cfg, out_dir=workdir / "train", tracker=run or NullTracker())
    if run is None:
        return
    saved = save_speech_llm(model, cfg, workdir / MODEL_ARTIFACT)
    run.log_artifacts(saved, MODEL_ARTIFACT)
    if result.steps % train_cfg.log_every != 0:
        run.log_metrics({"train.loss": float(np.mean(result.losses[-train_cfg.log_every :]))}, step=result.steps)
    run.log_metrics({"trainable_params": _trainable(model), "peak_memory_mb": _peak_memory_mb(device)})
    _log_training(run, result)


def distance_heatmap(distance: np.ndarray, path: Iterable[PathStep] = ()) -> Figure:
    """The paper's Figure 1 for one model: D[l][l+n] with layer l on x and block size n on y.

    Args:
        distance: (m+1, m+1) mean angular distances over h_0..h_m.
        path: Optimal pruning path steps to mark (l*(n), n).

    Returns:
        The figure; cells with l + n > m are blank.
    """
    figure = Figure(figsize=(5.5, 4.5))
    draw_distance_heatmap(figure.subplots(), distance, path)
    return figure


def draw_distance_heatmap(
    axes: Axes,
    distance: np.ndarray,
    path: Iterable[PathStep | dict] = (),
    vmin: float = 0.0,
    vmax: float | None = None,
    colorbar: bool = True,
) -> AxesImage:
    """Draw D[l][l+n] (layer l on x, block size n on y), with its colour bar unless told not to, on `axes`.

    Args:
        axes: Where to draw.
        distance: (m+1, m+1) mean angular distances over h_0..h_m.
        path: Optimal pruning path steps to mark (l*(n), n): `PathStep`s or their `to_dict()` form.
        vmin: The distance at the bottom of the colour scale.
        vmax: The distance at its top; None: the largest drawn.
        colorbar: Draw the colour bar beside `axes`; False when several panels share one scale and one bar.

    Returns:
        The image, for a colour bar shared with other panels.
    """
    m = distance.shape[0] - 1
    grid = np.full((m, m), np.nan)  # (n - 1, l): row n-1 holds D[l][l+n] for l = 0..m-n
    for n in range(1, m + 1):
        for layer in range(0, m - n + 1):
            grid[n - 1, layer] = distance[layer, layer + n]
    extent = (-0.5, m - 0.5, 0.5, m + 0.5)
    image = axes.imshow(grid, origin="lower", cmap="viridis", vmin=vmin, vmax=vmax, extent=extent)
    if colorbar:
        axes.figure.colorbar(image, ax=axes, label="angular distance $d(h_l, h_{l+n})$")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    steps = [step.to_dict() if isinstance(step, PathStep) else step for step in path]
    if steps:
        axes.scatter([s["start"] for s in steps], [s["n"] for s in steps], marker="x", color="red", label="l*(n)")
        axes.legend(loc="upper right")
    axes.set_xlabel("layer l")
    axes.set_ylabel("block size n")
    return image


def metric_key(*parts: str) -> str:
    """An MLflow metric key from names: joined by dots, characters MLflow refuses replaced by `_`."""
    return ".".join(_METRIC_KEY_UNSAFE.sub("_", part) for part in parts)


def study_table(store: GridStore, config: dict, deps: Mapping[str, str]) -> dict[str, Any]:
    """A study's results, read back from its dependencies' runs: baselines, pruned scores, removable fractions.

    `config` is a summary cell's config (`study`, `task`, `path_cells`, `eval_cells`, `prune_cells`); `deps` maps
    each listed cell to its FINISHED run. Every prune cell's baseline (the eval cell of its train cell) must be
    listed too.

    Each result is one (model, path, healing): its baseline (the eval cell of the same trained SpeechLLM), one
    row per pruned depth, and the removable fraction (`slam.metrics.removable_fraction`); the fraction is None
    when a baseline score is 0, where the relative change is undefined.
    """
    metric = TASK_METRICS[config["task"]]
    runs = store.runs(deps[cell] for key in ("eval_cells", "prune_cells", "path_cells") for cell in config[key])
    baselines: dict[str, dict[str, float]] = {}
    baseline_costs: dict[str, dict[str, Any]] = {}
    for cell in config["eval_cells"]:
        run = runs[deps[cell]]
        baselines[run.data.params["train_cell"]] = set_scores(run.data.metrics, metric)
        baseline_costs[run.data.params["train_cell"]] = _costs(run.data.metrics)
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for cell in config["prune_cells"]:
        run = runs[deps[cell]]
        tags, metrics = run.data.tags, run.data.metrics
        label = prune_path_label(tags)
        group = groups.setdefault(
            (tags["model"], label, tags["healing"]),
            {
                "model": tags["model"],
                "path": {
                    "source": tags["path.source"],
                    "task": tags["path.task"],
                    "model": tags["path.model"],
                    "convention": tags.get("path.convention", "paper"),
                },
                "path_label": label,
                "healing": tags["healing"],
                "baseline": baselines[run.data.params["train_cell"]],
                "rows": [],
            },
        )
        costs, base = _costs(metrics), baseline_costs[run.data.params["train_cell"]]
        group["rows"].append(
            {
                "n": int(metrics["n"]),
                "fraction": metrics["fraction"],
                "removed": json.loads(tags["removed"]),
                "scores": set_scores(metrics, metric),
                # The paper's speed and memory claim, per depth: decoding throughput and peak memory against the
                # baseline's (a speedup > 1 is faster; CPU memory is the worker's peak resident size, less telling).
                "speedup": {
                    name: tps / base["tokens_per_s"][name] if base["tokens_per_s"].get(name) else None
                    for name, tps in costs["tokens_per_s"].items()
                },
                "peak_memory_ratio": (
                    costs["peak_memory_mb"] / base["peak_memory_mb"] if base["peak_memory_mb"] else None
                ),
                "cell_id": cell,
            }
        )
    results = [_result(group, metric) for group in groups.values()]
    paths, reports = [], []
    for cell in config["path_cells"]:
        run = runs[deps[cell]]
        report = store.load_json_artifact(run.info.run_id, DISTANCE_ARTIFACT)
        reports.append(report)
        paths.append(
            {
                "model": run.data.tags.get("model"),
                "task": run.data.tags.get("task"),
                "source": report["source"],
                "convention": report["convention"],
                "token": report["token"],
                "n_layers": report["n_layers"],
                "num_samples": report["num_samples"],
                "path": report["path"],
                "cell_id": cell,
            }
        )
    return {
        "study": config["study"],
        "task": config["task"],
        "search": config.get("search", "sweep"),
        "metric": metric,
        "threshold": _THRESHOLDS[metric],
        "results": results,
        "paths": paths,
        "agreement": path_comparisons(paths, reports),
    }


def path_step(report: dict, n: int, path_cell: str) -> PathStep:
    """The step of block size `n` of a path cell's report (`distance.json`): the layers a prune cell removes.

    Raises:
        BadInputError: The report has no step `n`.
    """
    for step in report["path"]:
        if step["n"] == n:
            return PathStep.from_dict(step, report["convention"])
    raise BadInputError(f"path cell {path_cell}: its distance.json has no step n={n}")


def path_cell_label(path: Mapping[str, str]) -> str:
    """`{source}-{task}` of a path cell, plus `-gromov` in Gromov et al.'s convention (how summaries name paths)."""
    label = f"{path['source']}-{path['task']}"
    return label if path["convention"] == "paper" else f"{label}-{path['convention']}"


def path_comparisons(paths: list[dict[str, Any]], reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Paper Figure 1 (a) vs (b): every text path against every speech path of the same model and convention.

    Args:
        paths: A study's path entries (`study_table`'s `paths`), each with `model`, `task`, `source`, `convention`.
        reports: Their `distance.json` reports, in the same order.

    Returns:
        One entry per (text, speech) pair: `model`, `text` and `speech` (path labels `{source}-{task}`, plus
        `-gromov`), `convention`, and `slam.redundancy.path_agreement`'s `mean_abs_diff`, `same_block`, `depths`
        and `blocks`.
    """
    entries = list(zip(paths, reports))
    comparisons = []
    for text, text_report in entries:
        for speech, speech_report in entries:
            if (text["source"], speech["source"]) != ("text", "speech"):
                continue
            if (text["model"], text["convention"]) != (speech["model"], speech["convention"]):
                continue
            comparisons.append(
                {
                    "model": text["model"],
                    "text": path_cell_label(text),
                    "speech": path_cell_label(speech),
                    "convention": text["convention"],
                    **path_agreement(text_report, speech_report),
                }
            )
    return comparisons


@dataclass
class _Context:
    """What one cell's stage works with."""

    cell: Cell
    config: dict
    """The cell's config with its local paths resolved for this process."""
    run: CellRun | None
    """The cell's run; None when a model is rebuilt outside it (an export)."""
    deps: Mapping[str, str]
    store: GridStore
    workdir: Path
    backbones: Backbones
    root: str | Path = "."
    """The experiment's directory, against which `cell.config`'s local paths resolve."""

    def restored_speech_llm(self) -> tuple[SpeechLLM, SpeechLLMConfig]:
        """A fresh copy of the SpeechLLM trained by this cell's `train_cell`, its trained weights restored."""
        cfg = from_dict(SpeechLLMConfig, self.config["speech_llm"], "speech_llm")
        train_cell = self.config["train_cell"]
        # A scratch copy of the artifact, gone once restored: cells would otherwise keep one trained model each.
        with tempfile.TemporaryDirectory(dir=self.workdir) as scratch:
            saved = self.store.download_artifacts(self.deps[train_cell], MODEL_ARTIFACT, scratch)
            # Local backbones may sit elsewhere on the worker that trained (another node, another checkout):
            # the train cell's id, not their location, says which model it is.
            if _located_anywhere(read_speech_llm_config(saved)) != _located_anywhere(cfg):
                raise BadInputError(f"the model of train cell {train_cell} was saved from another SpeechLLM config")
            # The seed is moot: every initialised weight (projector, decoder LoRA) is overwritten by the restore.
            model = self.backbones.speech_llm(cfg)
            restore_trained(model, cfg, saved)
        _check_layers(model.decoder, self.config["layers"], cfg.decoder.name)
        return model.eval(), cfg

    def evaluate_sets(self, model: SpeechLLM) -> None:
        """Evaluate on every set of the config's `eval`: metrics `{set}.{wer|bleu}`, `hypotheses/{set}.json`."""
        task = self.config["task"]
        decode = from_dict(DecodeConfig, self.config["decode"], "decode")
        for name, data in _data_sets(self.config["eval"], "eval").items():
            result = evaluate(model, load_dataset(data), task, decode)
            self.run.log_metrics(
                {
                    f"{name}.{result.metric}": result.score,
                    f"{name}.num_samples": result.num_samples,
                    f"{name}.skipped": len(result.skipped),
                    f"{name}.excluded": len(result.excluded),
                    f"{name}.decode_tokens_per_s": result.decode.tokens_per_second,
                    f"{name}.decode_seconds": result.decode.decode_seconds,
                    f"{name}.encode_seconds": result.decode.encode_seconds,
                }
            )
            hypotheses = {
                "ids": result.ids,
                "hypotheses": result.hypotheses,
                "references": result.references,
                "skipped": [list(item) for item in result.skipped],
                "excluded": result.excluded,
            }
            if result.bleu is not None:
                hypotheses["signature"] = result.bleu.signature
                self.run.set_tags({f"{name}.bleu_signature": result.bleu.signature})
            self.run.log_json(f"hypotheses/{name}.json", hypotheses)


def _run_train(ctx: _Context) -> None:
    workers = ctx.config.get("train_workers", 1)
    if workers > 1:
        raise ValueError(
            f"train cell {ctx.cell.id} is DDP in {workers} processes: grid.runner runs it through Ray Train, "
            "not in one worker"
        )
    train_speech_llm(ctx.config, ctx.workdir, ctx.backbones, ctx.run)


def _run_path(ctx: _Context) -> None:
    distance_cfg = from_dict(DistanceConfig, ctx.config["distance"], "distance")
    # As `slamgrid path --speech`: the sample limit applies to each dev set, so every set is in the pooled mean.
    dev = _data_sets(ctx.config["dev"], "dev")
    sets = [load_dataset(_limited(data, distance_cfg.max_samples)) for data in dev.values()]
    pooled = replace(distance_cfg, max_samples=None)
    if ctx.config["source"] == "speech":
        model, _ = ctx.restored_speech_llm()
        # As the experiment file names it (the resolved directory may differ between workers).
        name = ctx.cell.config["speech_llm"]["decoder"]["name"]
        task = ctx.config["task"]
        pairs = ((sample.audio, sample.target(task)) for dataset in sets for sample in dataset.samples())
        result = speech_layer_distances(model, pairs, pooled)
    else:
        decoder_cfg = from_dict(DecoderConfig, ctx.config["decoder"], "decoder")
        name = ctx.cell.config["decoder"]["name"]
        master, tokenizer = ctx.backbones.decoder(decoder_cfg)
        texts = [text for dataset in sets for text in dataset.texts()]
        decoder = copy.deepcopy(master).to(ctx.backbones.device)
        result = text_layer_distances(decoder, tokenizer, texts, pooled)
    if result.n_layers != ctx.config["layers"]:
        raise BadInputError(
            f"{name}: the decoder has {result.n_layers} layers but the experiment says layers: {ctx.config['layers']}"
        )
    report = path_report(name, result, ctx.config["source"], ctx.config["convention"])
    path = [PathStep.from_dict(step, report["convention"]) for step in report["path"]]
    ctx.run.log_json(DISTANCE_ARTIFACT, report)
    ctx.run.set_tags({"measured_token": result.token, "layout": result.layout})
    ctx.run.log_figure(HEATMAP_ARTIFACT, distance_heatmap(result.distance, path))
    skipped = sum(len(dataset.skipped) for dataset in sets)
    ctx.run.log_metrics({"num_samples": result.num_samples, "n_layers": result.n_layers, "skipped": skipped})


def _run_eval(ctx: _Context) -> None:
    device = ctx.backbones.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, _ = ctx.restored_speech_llm()
    ctx.evaluate_sets(model)
    # The pruned cells' memory is judged against this (`study_table`'s `peak_memory_ratio`).
    ctx.run.log_metrics({"peak_memory_mb": _peak_memory_mb(device)})


def pruned_speech_llm(
    cell: Cell, store: GridStore, deps: Mapping[str, str], workdir: Path, backbones: Backbones, root: str
) -> PrunedModel:
    """A prune cell's model as it was before healing trained: the baseline restored, pruned, healing set up.

    `_run_prune` heals it and evaluates it; an export (`grid.export`) restores what healing trained from the cell's
    `healed/` artifact instead, and so gets the model the cell evaluated.

    Args:
        cell: A prune cell.
        store: Its experiment's store.
        deps: Its dependencies' FINISHED run ids (the train cell's model, the path cell's path).
        workdir: A directory for scratch copies of artifacts.
        backbones: Where the encoder and decoder come from.
        root: The experiment's directory, against which the cell's local paths resolve.

    Raises:
        BadInputError: The path is for another depth, or the trained model for another config.
    """
    ctx = _Context(cell, resolve_paths(cell.config, root), None, deps, store, workdir, backbones, root)
    report = store.load_json_artifact(deps[cell.config["path_cell"]], DISTANCE_ARTIFACT)
    if report["n_layers"] != cell.config["layers"]:
        raise BadInputError(
            f"path cell {cell.config['path_cell']}: its path is for {report['n_layers']} layers, "
            f"this model has {cell.config['layers']}"
        )
    step = path_step(report, cell.config["n"], cell.config["path_cell"])
    model, cfg = ctx.restored_speech_llm()
    drop_layers(model.decoder, step.removed)
    heal = from_dict(HealConfig, cell.config["heal"], "heal")
    trainable = 0
    if heal.strategy != "none":
        # Seeds the healing LoRA's initialisation, which happens before `train` seeds everything else.
        torch.manual_seed(cell.config["heal_train"]["seed"])
        trainable = add_healing(model, step.receiving_layer, heal).trainable
    return PrunedModel(model, cfg, step, heal, trainable)


@dataclass
class PrunedModel:
    """A prune cell's SpeechLLM (`pruned_speech_llm`) and what it was made of."""

    model: SpeechLLM
    cfg: SpeechLLMConfig
    """The baseline's SpeechLLM config."""
    step: PathStep
    """The path step whose layers are removed."""
    heal: HealConfig
    trainable: int
    """Parameters healing trains (0 for `none`)."""


def _run_prune(ctx: _Context) -> None:
    device = ctx.backbones.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pruned = pruned_speech_llm(ctx.cell, ctx.store, ctx.deps, ctx.workdir, ctx.backbones, ctx.root)
    model, step, trainable = pruned.model, pruned.step, pruned.trainable
    if pruned.heal.strategy != "none":
        heal_train = from_dict(TrainConfig, ctx.config["heal_train"], "heal_train")
        dataset = load_dataset(from_dict(DataConfig, ctx.config["data"], "data"))
        healed = train(model, dataset.for_training(), heal_train, out_dir=ctx.workdir / "heal", tracker=ctx.run)
        # Named as a train cell's: the healing training streams `train.loss` to this run too.
        _log_training(ctx.run, healed)
        # What healing trained, for `slamgrid export`: the cell's model is the baseline's, pruned, and this.
        with tempfile.TemporaryDirectory(dir=ctx.workdir) as scratch:
            if save_healed(model, scratch) is not None:
                ctx.run.log_artifacts(scratch, HEALED_ARTIFACT)
    ctx.run.set_tags({"removed": json.dumps(list(step.removed)), "receiving_layer": str(step.receiving_layer)})
    ctx.run.log_metrics(
        {
            "n": step.n,
            "fraction": step.fraction,
            "removed_layers": len(step.removed),
            "trainable_params": trainable,
        }
    )
    ctx.evaluate_sets(model)
    ctx.run.log_metrics({"peak_memory_mb": _peak_memory_mb(device)})


def _run_summary(ctx: _Context) -> None:
    table = study_table(ctx.store, ctx.config, ctx.deps)
    figures = {"degradation": _degradation_figure(table)} if table["results"] else {}
    ctx.store.log_summary(ctx.config["study"], table, figures)
    ctx.run.log_json(SUMMARY_ARTIFACT, table)
    metrics = {
        metric_key("removable_fraction", row["model"], row["path_label"], row["healing"]): row["removable_fraction"]
        for row in table["results"]
        if row["removable_fraction"] is not None
    }
    for pair in table["agreement"]:
        key = ("path_agreement", pair["model"], pair["text"], pair["speech"])
        metrics[metric_key(*key, "mean_abs_diff")] = pair["mean_abs_diff"]
        metrics[metric_key(*key, "same_block")] = len(pair["same_block"])
        metrics[metric_key(*key, "depths")] = len(pair["depths"])
    if metrics:
        ctx.run.log_metrics(metrics)
    _log_prune_deltas(ctx.store, table, ctx.deps)


def _log_prune_deltas(store: GridStore, table: dict[str, Any], deps: Mapping[str, str]) -> None:
    """Log on each pruned cell's run what the study found of it, so that MLflow's runs table sorts and charts by
    it: `{set}.delta` (the relative change of the set's score against the baseline) and `within_threshold` (1 when
    every set meets the study's threshold, 0 otherwise; left out where a baseline score is 0, the change undefined).

    Args:
        store: The grid's store.
        table: The study's table (`study_table`).
        deps: Each listed cell's FINISHED run, the pruned cells' among them.
    """
    for result in table["results"]:
        for row in result["rows"]:
            deltas = {name: delta for name, delta in row["delta"].items() if delta is not None}
            metrics: dict[str, float] = {f"{name}.delta": delta for name, delta in deltas.items()}
            if deltas and len(deltas) == len(row["delta"]):
                passes = within_threshold(result["baseline"], row["scores"], table["metric"], table["threshold"])
                metrics["within_threshold"] = float(passes)
            if metrics:
                store.log_metrics(deps[row["cell_id"]], metrics)


_STAGES: dict[str, Callable[[_Context], None]] = {
    "train": _run_train,
    "path": _run_path,
    "eval": _run_eval,
    "prune": _run_prune,
    "summary": _run_summary,
}


def _result(group: dict[str, Any], metric: str) -> dict[str, Any]:
    baseline = group["baseline"]
    rows = sorted(group["rows"], key=lambda row: row["n"])
    for row in rows:
        row["delta"] = {
            name: relative_change(row["scores"][name], base) if base != 0 and name in row["scores"] else None
            for name, base in baseline.items()
        }
    zero = sorted(name for name, base in baseline.items() if base == 0)
    if zero:
        fraction, note = None, f"baseline {metric} is 0 on {', '.join(zero)}: the relative change is undefined"
    else:
        fraction = removable_fraction(baseline, {row["fraction"]: row["scores"] for row in rows}, metric)
        note = None
    return {**group, "rows": rows, "removable_fraction": fraction, "note": note}


def _degradation_figure(table: dict[str, Any]) -> Figure:
    """Figure 2 in small: each set's score against the fraction of layers removed, per (model, path, healing)."""
    figure = Figure(figsize=(6.5, 4.5))
    axes = figure.subplots()
    for result in table["results"]:
        for name, base in result["baseline"].items():
            points = [(0.0, base)] + [(row["fraction"], row["scores"][name]) for row in result["rows"]]
            label = f"{result['model']} {result['path_label']} {result['healing']} {name}"
            axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    axes.set_xlabel("fraction of decoder layers removed")
    axes.set_ylabel(f"{table['metric'].upper()}{' (%)' if table['metric'] == 'wer' else ''}")
    axes.set_title(f"{table['study']}")
    axes.legend(fontsize="small")
    return figure


def _log_training(run: CellRun, result: TrainResult) -> None:
    """`train.resumed_from`, `train.skipped`, `train.unreadable_checkpoints`, and what these counted, if anything:
    `train_skipped.json` (the samples left out), the tag `train.unreadable_checkpoints` (those moved aside)."""
    run.log_metrics(
        {
            "train.resumed_from": result.resumed_from,
            "train.skipped": len(result.skipped),
            "train.unreadable_checkpoints": len(result.unreadable),
        }
    )
    if result.skipped:
        run.log_json("train_skipped.json", [list(item) for item in result.skipped])
    if result.unreadable:
        run.set_tags({"train.unreadable_checkpoints": " ".join(str(path) for path in result.unreadable)})


def _costs(metrics: Mapping[str, float]) -> dict[str, Any]:
    """An evaluated cell's decoding throughput per set and its peak memory (None when not logged)."""
    suffix = ".decode_tokens_per_s"
    rates = {key[: -len(suffix)]: value for key, value in metrics.items() if key.endswith(suffix)}
    return {"tokens_per_s": rates, "peak_memory_mb": metrics.get("peak_memory_mb")}


def _data_sets(raw: Mapping[str, dict], where: str) -> dict[str, DataConfig]:
    return {name: from_dict(DataConfig, data, f"{where}.{name}") for name, data in raw.items()}


def _limited(data: DataConfig, max_samples: int | None) -> DataConfig:
    if max_samples is None:
        return data
    return replace(data, max_samples=min(data.max_samples or math.inf, max_samples))


def _located_anywhere(cfg: SpeechLLMConfig) -> SpeechLLMConfig:
    """`cfg` with the location of each local backbone directory left out (a hub id is kept)."""
    encoder, decoder = cfg.encoder, cfg.decoder
    if is_local_path(encoder.name):
        encoder = replace(encoder, name="<local>")
    if is_local_path(decoder.name):
        decoder = replace(decoder, name="<local>")
    return replace(cfg, encoder=encoder, decoder=decoder)


def _check_layers(decoder: nn.Module, layers: int, name: str) -> None:
    """The experiment's `layers` (m, from which depths were expanded) against the decoder actually loaded."""
    m = len(decoder_stack(decoder).layers)
    if m != layers:
        raise BadInputError(f"{name}: the decoder has {m} layers but the experiment says layers: {layers}")


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by this cell; on CPU the process's peak resident size (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
