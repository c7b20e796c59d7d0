"""Training whatever a SpeechLLM makes trainable (projector, LoRA, healing adapters), resumable exactly.

`train(model, samples, cfg, out_dir)` runs Adam with gradient clipping and a constant-then-linear
LR schedule (`lr_at`) over a data order that is a function of `(cfg.seed, step)` only
(`batch_indices`). Checkpoints are named by step, `out_dir/checkpoints/step-000123/`, and hold
`trainable.safetensors` (trainable parameters by name), `optimizer.pt` and `state.json` (step,
per-step losses, the config and every RNG state). They are written atomically, the last two are
kept, and a run started on a directory that has them resumes from the newest readable one, so
that an interrupted and resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import json
import logging
import math
import pickle
import random
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from slam.config import TrainConfig
from slam.errors import BadInputError
from slam.model import SpeechLLM
from slam.track import NullTracker, Tracker

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
# Fields that may change between an interrupted run and its resumption without changing the result.
RESUMABLE_CHANGES = ("checkpoint_every", "log_every")
_STEP_DIR = re.compile(r"step-(\d+)")
# What reading a damaged checkpoint raises: bad JSON, a truncated safetensors or torch file, a missing file.
_UNREADABLE = (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)


@dataclass
class TrainResult:
    """What a training run did.

    Attributes:
        steps: Steps done in total, including those before a resume.
        losses: Training loss of every step 1..steps (restored from the checkpoint on resume).
        checkpoint: The last checkpoint written (or resumed from); None without an output directory.
        resumed_from: Step the run resumed from; 0 for a fresh run.
    """

    steps: int
    losses: list[float]
    checkpoint: Path | None
    resumed_from: int


def train(
    model: SpeechLLM,
    samples: Sequence,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    tracker: Tracker = NullTracker(),  # noqa: B008 - stateless no-op default
    stop_after: int | None = None,
) -> TrainResult:
    """Train the parameters of `model` that require grad, resuming from `out_dir` if it holds checkpoints.

    A fresh run seeds python `random`, numpy and torch with `cfg.seed`; a resumed run restores the RNG
    states saved with the checkpoint instead, so LoRA dropout draws the same masks either way. On CUDA
    the forward pass runs under bf16 autocast, on CPU in float32; the model stays on its device. The
    model is left in eval mode.

    Args:
        model: The SpeechLLM; its trainable parameters (projector, LoRA, healing adapters) are updated in place.
        samples: Items with `.audio` (mono 16 kHz float32 waveform) and `.target(task)` (the target text).
        cfg: Steps, batch size, optimiser, schedule, seed, checkpoint and logging intervals, task.
        out_dir: Directory for `checkpoints/`; None trains without checkpoints.
        tracker: Receives `train.loss` (mean over the last `cfg.log_every` steps) and `train.lr`.
        stop_after: Stop after this step without a checkpoint (simulates an interruption); None runs to `cfg.steps`.

    Returns:
        Steps done, per-step losses, the last checkpoint and the step resumed from.

    Raises:
        BadInputError: No samples, nothing to train, a checkpoint that does not fit the model or the
            config, or no readable checkpoint in a directory that has some.
        FloatingPointError: A step's loss is not finite (the weights are left as they were before it).
    """
    if len(samples) == 0:
        raise BadInputError("no training samples")
    params = dict(sorted((name, p) for name, p in model.named_parameters() if p.requires_grad))
    if not params:
        raise BadInputError("the model has no trainable parameters")
    # Sorted by name, so a checkpoint's optimizer state maps onto parameters by name, not by module order.
    optimizer = torch.optim.Adam(list(params.values()), lr=cfg.lr, betas=cfg.betas)
    device = next(iter(params.values())).device
    ckpt_root = Path(out_dir) / CHECKPOINT_DIR if out_dir is not None else None
    checkpoint, losses = _resume(ckpt_root, params, optimizer, cfg) if ckpt_root is not None else (None, [])
    resumed_from = len(losses)
    if checkpoint is None:
        _seed_everything(cfg.seed)

    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    last = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    try:
        for step in range(resumed_from + 1, last + 1):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = [samples[i] for i in batch_indices(step, cfg, len(samples))]
            with autocast:
                loss = model([s.audio for s in batch], [s.target(cfg.task) for s in batch])  # ()
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"step {step}: the training loss is {value}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip)
            optimizer.step()
            losses.append(value)
            if step % cfg.log_every == 0:
                tracker.log_metrics({"train.loss": float(np.mean(losses[-cfg.log_every :])), "train.lr": lr}, step=step)
            if ckpt_root is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                checkpoint = _save_checkpoint(ckpt_root, step, params, optimizer, cfg, losses)
    finally:
        model.eval()
    return TrainResult(steps=len(losses), losses=losses, checkpoint=checkpoint, resumed_from=resumed_from)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate used by the optimiser step numbered `step` (1-based).

    With W = round(cfg.warmdown * cfg.steps) warmdown steps, steps 1..steps-W run at the peak
    `cfg.lr` and the last W steps decay linearly: `lr * (steps + 1 - step) / (W + 1)`. The last step
    therefore gets `lr / (W + 1) > 0` and the line reaches 0 at step `steps + 1`, just after the run.
    Example, steps=10, warmdown=0.6, lr=1: steps 1..4 at 1, then 6/7, 5/7, ..., 1/7 at step 10.

    Args:
        step: 1-based step number, 1..cfg.steps (+1 gives 0).
        cfg: Peak LR, number of steps and warmdown fraction.

    Returns:
        The learning rate.
    """
    if not 1 <= step <= cfg.steps + 1:
        raise ValueError(f"step={step} is out of range 1..{cfg.steps + 1}")
    warmdown_steps = round(cfg.warmdown * cfg.steps)
    return cfg.lr * min(1.0, (cfg.steps + 1 - step) / (warmdown_steps + 1))


def batch_indices(step: int, cfg: TrainConfig, n: int) -> list[int]:
    """Indices into the samples of the batch of step `step`, a function of `(cfg.seed, step)` only.

    Epoch e visits the samples in the order `np.random.default_rng([cfg.seed, e]).permutation(n)`;
    the epochs are concatenated and step s takes positions `(s-1)*B .. s*B-1` of that stream
    (B = `cfg.batch_size`), so a batch may straddle two epochs. A distributed run would take a global
    batch the same way and give each rank its slice.

    Args:
        step: 1-based step number.
        cfg: Seed and batch size.
        n: Number of samples.

    Returns:
        `cfg.batch_size` sample indices.
    """
    if step < 1:
        raise ValueError(f"step={step} is out of range: steps are numbered from 1")
    if n < 1:
        raise ValueError(f"n={n} is not allowed: expected at least one sample")
    start = (step - 1) * cfg.batch_size
    return [int(_epoch_order(cfg.seed, pos // n, n)[pos % n]) for pos in range(start, start + cfg.batch_size)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint of the highest step under `out_dir/checkpoints/`, or None; its contents are not checked."""
    found = _checkpoints(Path(out_dir) / CHECKPOINT_DIR)
    return found[-1] if found else None


def _resume(
    root: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> tuple[Path | None, list[float]]:
    """Load the newest readable checkpoint under `root` into params, optimizer and RNGs; return it and its losses."""
    # Resume precedence:
    # 1. the newest `step-*` checkpoint whose state.json, trainable.safetensors and optimizer.pt all read;
    # 2. an unreadable one is skipped with a warning and the next older one is tried; once one loads, the
    #    skipped ones are renamed `*.corrupt` (kept as evidence, out of the way of keep-last-2);
    # 3. no checkpoint at all: a fresh run; checkpoints but none readable: an error, never a silent restart.
    # A readable checkpoint that does not fit the model or the config is an error, not a fallback.
    candidates = _checkpoints(root)
    unreadable = []
    for path in reversed(candidates):
        try:
            state, tensors, optim_state = _read_checkpoint(path)
        except _UNREADABLE as err:
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, err)
            unreadable.append(path)
            continue
        _check_compatible(path, state, tensors, params, cfg)
        for bad in unreadable:
            corrupt = bad.with_name(f"{bad.name}.corrupt")
            shutil.rmtree(corrupt, ignore_errors=True)
            bad.rename(corrupt)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[name])
        optimizer.load_state_dict(optim_state)
        _set_rng_states(state["rng"])
        log.info("resumed from %s", path)
        return path, list(state["losses"])
    if candidates:
        raise BadInputError(f"{root}: none of the checkpoints {[p.name for p in candidates]} is readable")
    return None, []


def _read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    state = json.loads((path / STATE_FILE).read_text())
    step = int(_STEP_DIR.fullmatch(path.name).group(1))
    if state["step"] != step or len(state["losses"]) != step:
        raise ValueError(f"state.json says step {state['step']} with {len(state['losses'])} losses")
    tensors = load_file(path / TRAINABLE_FILE)
    optim_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return state, tensors, optim_state


def _check_compatible(
    path: Path, state: dict, tensors: dict[str, torch.Tensor], params: dict[str, torch.nn.Parameter], cfg: TrainConfig
) -> None:
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise BadInputError(
            f"{path}: the checkpoint does not fit the model's trainable parameters; "
            f"missing from the checkpoint: {missing}; not trainable in the model: {unexpected}"
        )
    for name, p in params.items():
        if tensors[name].shape != p.shape or tensors[name].dtype != p.dtype:
            raise BadInputError(
                f"{path}: {name} is {tuple(tensors[name].shape)} {tensors[name].dtype} in the checkpoint "
                f"but {tuple(p.shape)} {p.dtype} in the model"
            )
    saved, now = state["cfg"], _cfg_dict(cfg)
    changed = sorted(k for k in saved.keys() | now.keys() if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if changed:
        diffs = ", ".join(f"train.{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise BadInputError(f"{path}: the checkpoint was written with a different config ({diffs})")


def _save_checkpoint(
    root: Path,
    step: int,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    losses: list[float],
) -> Path:
    """Write `root/step-{step:06d}` through a temporary directory and a rename; keep the newest two."""
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({name: p.detach().cpu().contiguous() for name, p in params.items()}, tmp / TRAINABLE_FILE)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    state = {"step": step, "losses": losses, "cfg": _cfg_dict(cfg), "rng": _rng_states()}
    (tmp / STATE_FILE).write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in _checkpoints(root)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old)
    return final


def _checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _cfg_dict(cfg: TrainConfig) -> dict:
    """The config as JSON gives it back (tuples become lists), so saved and current configs compare."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _rng_states() -> dict:
    """Python, numpy, torch CPU and (when present) CUDA RNG states, as JSON values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": _encode(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        states["cuda"] = [_encode(s) for s in torch.cuda.get_rng_state_all()]
    return states


def _set_rng_states(states: dict) -> None:
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_decode(states["torch"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode(s) for s in states["cuda"]])


def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
