"""Training whatever a SpeechLLM makes trainable (projector, LoRA, healing adapters), resumable exactly.

`train(model, samples, cfg, out_dir)` runs Adam with gradient clipping and a constant-then-linear
LR schedule (`lr_at`) over a data order that is a function of `(cfg.seed, step)` only
(`batch_indices`). Checkpoints are named by step, `out_dir/checkpoints/step-000123/`, and hold
`trainable.safetensors` (trainable parameters by name), `optimizer.pt` and `state.json` (step,
per-step losses, the config, the number of processes and every process's RNG states). They are written
atomically, the last two are kept, and a run started on a directory that has them resumes from the newest
readable one, so that an interrupted and resumed run ends bit-identical to an uninterrupted one.

Data-parallel training: called in every process of an initialised `torch.distributed` process group of W > 1
processes (as Ray Train's workers are), `train` is DDP with a global batch of `cfg.batch_size * W` samples,
the batch single-process training with `batch_size * W` takes, each rank a slice of `cfg.batch_size`. The
loss is averaged over the target tokens of the whole global batch, so the gradient is the single-process one
up to floating-point summation order. Rank 0 alone logs to the tracker and writes checkpoints; every rank
resumes from the checkpoint rank 0 reads, with its own RNG states.
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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

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
        losses: Training loss of every step 1..steps (restored from the checkpoint on resume); under DDP the
            mean over the target tokens of the global batch, the same on every rank.
        checkpoint: The last checkpoint written (or resumed from); None without an output directory.
        resumed_from: Step the run resumed from; 0 for a fresh run.
        skipped: `(where, reason)` of the samples left out (a `SpeechDataset.for_training()` under `skip`
            reports them): at load time, and those training met, before a resume too and on every rank.
        unreadable: Checkpoints this run found unreadable (truncated, corrupt) and moved aside as `*.corrupt`,
            newest first; when none was readable, training started over from step 0.
    """

    steps: int
    losses: list[float]
    checkpoint: Path | None
    resumed_from: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    unreadable: list[Path] = field(default_factory=list)


def train(
    model: SpeechLLM,
    samples: Sequence,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    tracker: Tracker = NullTracker(),  # noqa: B008 - stateless no-op default
    stop_after: int | None = None,
) -> TrainResult:
    """Train the parameters of `model` that require grad, resuming from `out_dir` if it holds checkpoints.

    A fresh run seeds python `random`, numpy and torch with `cfg.seed` (rank r > 0 of a DDP run with a seed
    derived from `(cfg.seed, r)`, so that ranks draw different dropout masks); a resumed run restores the RNG
    states saved with the checkpoint instead, so LoRA dropout draws the same masks either way. On CUDA the
    forward pass runs under bf16 autocast, on CPU in float32; the model stays on its device. The model is
    left in eval mode.

    Under an initialised `torch.distributed` process group of W > 1 processes, every rank calls this with the
    same samples and config: step s trains on `batch_indices(s, cfg with batch_size * W, n)`, rank r on
    positions `r*B .. (r+1)*B - 1` of it (B = `cfg.batch_size`), through `DistributedDataParallel` over the
    trainable parameters (which it also makes equal on every rank at the start, to rank 0's).

    Args:
        model: The SpeechLLM; its trainable parameters (projector, LoRA, healing adapters) are updated in place.
        samples: Items with `.audio` (mono 16 kHz float32 waveform) and `.target(task)` (the target text); if
            it has a `skipped` list (`SpeechDataset.for_training()`), the result reports what it holds.
        cfg: Steps, batch size (per process), optimiser, schedule, seed, checkpoint and logging intervals, task.
        out_dir: Directory for `checkpoints/` (under DDP only rank 0 reads and writes it; the other ranks get what
            it read); None trains without checkpoints.
        tracker: Receives, every `cfg.log_every` steps and only on rank 0, `train.loss` (the mean over those steps),
            `train.lr`, `train.step` (the step, so that a progress display reads it as a value) and
            `train.steps_per_s` (over those steps, as the clock on this process measured them).
        stop_after: Stop after this step without a checkpoint (simulates an interruption); None runs to `cfg.steps`.

    Returns:
        Steps done, per-step losses, the last checkpoint and the step resumed from (the same on every rank).

    Raises:
        BadInputError: No samples, nothing to train, or a checkpoint that does not fit the model, the config or
            the number of processes.
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
    group = _Group.current(device)
    ckpt_root = Path(out_dir) / CHECKPOINT_DIR if out_dir is not None else None
    checkpoint, losses, skipped, unreadable = (
        _resume(ckpt_root, params, optimizer, cfg, group) if ckpt_root is not None else (None, [], [], [])
    )
    resumed_from = len(losses)
    if checkpoint is None:
        _seed_everything(_rank_seed(cfg.seed, group.rank))
    if group.rank != 0:
        tracker = NullTracker()

    model.train()
    nll = _data_parallel_nll(model) if group.world > 1 else model.nll
    global_cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size * group.world)
    mine = slice(group.rank * cfg.batch_size, (group.rank + 1) * cfg.batch_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    last = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    since = time.monotonic()
    try:
        for step in range(resumed_from + 1, last + 1):
            lr = lr_at(step, cfg)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            batch = [samples[i] for i in batch_indices(step, global_cfg, len(samples))[mine]]
            with autocast:
                total, count = nll([s.audio for s in batch], [s.target(cfg.task) for s in batch])  # (), ()
            # One all-reduce gives the global token count (to scale this rank's loss) and the global loss (to log).
            global_total, global_count = group.sum(torch.stack([total.detach().double(), count.double()])).tolist()
            value = global_total / global_count
            if not math.isfinite(value):
                raise FloatingPointError(f"step {step}: the training loss is {value}")
            optimizer.zero_grad(set_to_none=True)
            # DDP averages the ranks' gradients: W * d(total_r) / N averaged over r is d(sum of totals) / N, the
            # gradient of the mean NLL over the N target tokens of the global batch.
            (total * group.world / global_count).backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip)
            optimizer.step()
            losses.append(value)
            if step % cfg.log_every == 0:
                now = time.monotonic()
                logged = min(cfg.log_every, step - resumed_from)  # the first log after a resume spans fewer steps
                metrics = {
                    "train.loss": float(np.mean(losses[-cfg.log_every :])),
                    "train.lr": lr,
                    "train.step": float(step),
                    "train.steps_per_s": logged / max(now - since, 1e-9),
                }
                tracker.log_metrics(metrics, step=step)
                since = now
            if ckpt_root is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                skipped = _skipped(samples, skipped, group)
                checkpoint = _save_checkpoint(ckpt_root, step, params, optimizer, cfg, losses, skipped, group)
    finally:
        model.eval()
    skipped = _skipped(samples, skipped, group)
    return TrainResult(len(losses), losses, checkpoint, resumed_from, skipped, unreadable)


def _skipped(samples: Sequence, earlier: list[tuple[str, str]], group: _Group) -> list[tuple[str, str]]:
    """What every rank's samples report as left out, after what was reported `earlier`; each once."""
    reported = group.gather([tuple(item) for item in getattr(samples, "skipped", ())])
    merged = dict.fromkeys(tuple(item) for item in earlier)
    for items in reported:
        merged.update(dict.fromkeys(items))
    return list(merged)


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
    (B = `cfg.batch_size`), so a batch may straddle two epochs. DDP training (`train`) takes the global
    batch of its W processes this way, with B = `cfg.batch_size * W`, and gives each rank a slice.

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


@dataclass(frozen=True)
class _Group:
    """The processes training together: the initialised `torch.distributed` group, or this process alone."""

    rank: int = 0
    """This process's rank."""
    world: int = 1
    """The number of processes."""
    device: torch.device = torch.device("cpu")
    """Where collective operations' tensors live: the GPU under NCCL, else the CPU."""

    @classmethod
    def current(cls, device: torch.device) -> _Group:
        """The initialised process group (its collectives on `device` under NCCL), or this process alone."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return cls()
        comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), comm)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks (a copy on this group's device)."""
        values = values.to(self.device)
        if self.world > 1:
            dist.all_reduce(values)
        return values

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class _NLL(nn.Module):
    """A SpeechLLM whose forward is its `nll`, so that DDP can wrap it."""

    def __init__(self, model: SpeechLLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, waveforms: Sequence, targets: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.nll(waveforms, targets)


def _data_parallel_nll(model: SpeechLLM) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """`model.nll` through DDP: gradients of the trainable parameters are averaged over the ranks in backward."""
    module = _NLL(model)
    # Frozen weights (the encoder, the decoder) and buffers are loaded from the same files by every rank: DDP
    # neither broadcasts them at the start (gigabytes for a 7B decoder) nor syncs them.
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        module, frozen + [name for name, _ in module.named_buffers()]
    )
    return DistributedDataParallel(module, broadcast_buffers=False)


def _rank_seed(seed: int, rank: int) -> int:
    """Rank 0 draws what a single process draws; every other rank its own stream."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _resume(
    root: Path,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    group: _Group,
) -> tuple[Path | None, list[float], list[tuple[str, str]], list[Path]]:
    """Load the newest readable checkpoint under `root` into params, optimizer and RNGs.

    Returns it (None for a fresh start), its losses, the samples it had recorded as skipped, and the checkpoints
    found unreadable and moved aside.
    """
    # Resume precedence (rank 0 decides and reads; every rank loads what rank 0 read, so all resume alike):
    # 1. the newest `step-*` checkpoint whose state.json, trainable.safetensors and optimizer.pt all read;
    # 2. an unreadable one is skipped with a warning naming it and the next older one is tried; the skipped ones
    #    are renamed `*.corrupt` (kept as evidence, out of the way of keep-last-2);
    # 3. no checkpoint at all, or none readable (with a warning saying so): a fresh start from step 0.
    # A readable checkpoint that does not fit the model, the config or the number of processes (which sets the
    # global batch) is an error, not a fallback.
    found: tuple[tuple[Path, dict, dict[str, torch.Tensor], dict] | None, list[Path]] | BaseException | None = None
    if group.rank == 0:
        try:
            found = _read_newest(root, params, cfg, group.world)
        except Exception as err:  # every rank raises it, rather than the others waiting for rank 0 forever
            found = err
    found = group.share(found)
    if isinstance(found, BaseException):
        raise found
    newest, unreadable = found
    if newest is None:
        return None, [], [], unreadable
    path, state, tensors, optim_state = newest
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    optimizer.load_state_dict(optim_state)
    _set_rng_states(state["rng"][group.rank])
    log.info("resumed from %s", path)
    # Checkpoints written before `skipped` was saved have none.
    return path, list(state["losses"]), [tuple(item) for item in state.get("skipped", [])], unreadable


def _read_newest(
    root: Path, params: dict[str, torch.nn.Parameter], cfg: TrainConfig, world: int
) -> tuple[tuple[Path, dict, dict[str, torch.Tensor], dict] | None, list[Path]]:
    """The newest readable checkpoint under `root` (path, state, tensors, optimizer state), checked, or None; and
    the unreadable ones, moved aside."""
    candidates = _checkpoints(root)
    unreadable: list[Path] = []
    newest = None
    for path in reversed(candidates):
        try:
            state, tensors, optim_state = _read_checkpoint(path)
        except _UNREADABLE as err:
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, err)
            unreadable.append(path)
            continue
        _check_compatible(path, state, tensors, params, cfg, world)
        newest = path, state, tensors, optim_state
        break
    if unreadable and newest is None:
        log.warning("no checkpoint under %s is readable (%s): training starts over from step 0", root,
                    ", ".join(p.name for p in unreadable))  # fmt: skip
    for bad in unreadable:
        corrupt = bad.with_name(f"{bad.name}.corrupt")
        shutil.rmtree(corrupt, ignore_errors=True)
        bad.rename(corrupt)
    return newest, unreadable


def _read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    state = json.loads((path / STATE_FILE).read_text())
    if "world_size" not in state:  # written before DDP training: one process, its RNG states alone
        state["world_size"], state["rng"] = 1, [state["rng"]]
    step = int(_STEP_DIR.fullmatch(path.name).group(1))
    if state["step"] != step or len(state["losses"]) != step:
        raise ValueError(f"state.json says step {state['step']} with {len(state['losses'])} losses")
    if len(state["rng"]) != state["world_size"]:
        raise ValueError(f"state.json has the RNG states of {len(state['rng'])} of {state['world_size']} processes")
    tensors = load_file(path / TRAINABLE_FILE)
    optim_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return state, tensors, optim_state


def _check_compatible(
    path: Path,
    state: dict,
    tensors: dict[str, torch.Tensor],
    params: dict[str, torch.nn.Parameter],
    cfg: TrainConfig,
    world: int,
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
    if state["world_size"] != world:
        raise BadInputError(
            f"{path}: the checkpoint was written by {state['world_size']} training processes but this run has "
            f"{world}; the global batch (batch_size x processes) would change"
        )


def _save_checkpoint(
    root: Path,
    step: int,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    losses: list[float],
    skipped: list[tuple[str, str]],
    group: _Group,
) -> Path:
    """Write `root/step-{step:06d}` through a temporary directory and a rename; keep the newest two.

    Every rank takes part (its RNG states are saved); rank 0 writes, the others wait until it has.
    """
    final = root / f"step-{step:06d}"
    rng = group.gather(_rng_states())
    if group.rank == 0:
        tmp = root / f".tmp-{final.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({name: p.detach().cpu().contiguous() for name, p in params.items()}, tmp / TRAINABLE_FILE)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        state = {
            "step": step,
            "losses": losses,
            "cfg": _cfg_dict(cfg),
            "world_size": group.world,
            "rng": rng,
            "skipped": [list(item) for item in skipped],
        }
        (tmp / STATE_FILE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in _checkpoints(root)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)
    group.barrier()
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
