"""Typed configs of the science stages, one dataclass per stage.

Every field holds a serialisable value (str, int, float, bool, tuple, nested config) so that a
config can be hashed into a cell id and logged flattened (`heal.lora_rank`). Each `__post_init__`
rejects bad values with a `ValueError` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

ENCODER_KINDS = ("auto", "wavlm", "whisper")
DATA_SOURCES = ("librispeech", "loquacious", "covost2", "manifest")
TASKS = ("asr", "ast")
TASK_METRICS = {"asr": "wer", "ast": "bleu"}
"""The score each task is evaluated and summarised by."""
BAD_SAMPLE_POLICIES = ("error", "skip")
HEAL_STRATEGIES = ("none", "decoder", "projector", "decoder+projector")
PATH_CONVENTIONS = ("paper", "gromov")
"""Block conventions of a pruning path (`slam.redundancy.pruning_path`): the paper's eq. 2 and Gromov et al.'s."""
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class EncoderConfig:
    """The frozen speech encoder."""

    name: str
    """Hub id or local directory saved with `save_pretrained` (a WavLM or a Whisper model)."""
    kind: str = "auto"
    """`wavlm`, `whisper`, or `auto` to read it from the model's config."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "encoder.name", self.name, "a hub id or a local directory")
        _choice("encoder.kind", self.kind, ENCODER_KINDS)


@dataclass(frozen=True)
class ProjectorConfig:
    """The MLP projector Linear(k*d_e -> hidden) - GELU - Linear(hidden -> d_llm)."""

    stack: int = 5
    """k: consecutive encoder frames concatenated into one speech position (50 Hz -> 10 Hz)."""
    hidden: int = 2048
    """Width of the projector's hidden layer."""

    def __post_init__(self) -> None:
        _positive("projector.stack", self.stack)
        _positive("projector.hidden", self.hidden)


@dataclass(frozen=True)
class LoRAConfig:
    """A LoRA adapter on the decoder (paper: rank 64, alpha 64, dropout 0.05)."""

    rank: int = 64
    """Rank r of the low-rank update."""
    alpha: int = 64
    """Scaling numerator: the update is scaled by alpha / rank."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    targets: tuple[str, ...] = ATTENTION_PROJECTIONS
    """Names of the linear layers adapted in every decoder layer."""

    def __post_init__(self) -> None:
        _positive("lora.rank", self.rank)
        _positive("lora.alpha", self.alpha)
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "a float in [0, 1)")
        _require(len(self.targets) > 0, "lora.targets", self.targets, "at least one module name")


@dataclass(frozen=True)
class DecoderConfig:
    """The frozen LLM decoder."""

    name: str
    """Hub id or local directory of a causal LM (Qwen2 and Llama families)."""
    dtype: str = "float32"
    """Weights dtype: `float32`, `bfloat16` or `float16`."""
    lora: LoRAConfig | None = None
    """Optional LoRA on the attention projections (the paper's LoRA-adapted Qwen2.5-7B)."""
    trust_remote_code: bool = False
    """Let transformers run code shipped with the model; off unless asked for."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "decoder.name", self.name, "a hub id or a local directory")
        _choice("decoder.dtype", self.dtype, DTYPES)


@dataclass(frozen=True)
class SpeechLLMConfig:
    """A SLAM-style SpeechLLM: encoder, projector, decoder and the text prompt."""

    encoder: EncoderConfig
    """The frozen speech encoder."""
    decoder: DecoderConfig
    """The LLM decoder."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """The trained projector."""
    prompt: str = "Transcribe speech to text."
    """Instruction placed between the speech embeddings and the target."""

    def __post_init__(self) -> None:
        _require(isinstance(self.prompt, str), "prompt", self.prompt, "a string")


@dataclass(frozen=True)
class DistanceConfig:
    """Measuring the layer-distance matrix over a set of inputs."""

    batch_size: int = 8
    """Samples per forward pass."""
    max_samples: int | None = None
    """Use only the first N samples; None uses all of them."""
    max_length: int = 512
    """Truncate each tokenised text to this many tokens."""

    def __post_init__(self) -> None:
        _positive("distance.batch_size", self.batch_size)
        _positive("distance.max_length", self.max_length)
        if self.max_samples is not None:
            _positive("distance.max_samples", self.max_samples)


@dataclass(frozen=True)
class HealConfig:
    """Post-pruning healing (paper 3.3)."""

    strategy: str = "decoder+projector"
    """`none`, `decoder` (LoRA on the receiving layer's MLP), `projector` (unfrozen) or both."""
    lora_rank: int = 64
    """Rank of the healing LoRA."""
    lora_alpha: int = 64
    """Alpha of the healing LoRA."""
    lora_dropout: float = 0.05
    """Dropout of the healing LoRA."""
    lora_targets: tuple[str, ...] = MLP_PROJECTIONS
    """Linear layers of the receiving block's MLP that get the healing LoRA."""

    def __post_init__(self) -> None:
        _choice("heal.strategy", self.strategy, HEAL_STRATEGIES)
        _positive("heal.lora_rank", self.lora_rank)
        _positive("heal.lora_alpha", self.lora_alpha)
        _require(0.0 <= self.lora_dropout < 1.0, "heal.lora_dropout", self.lora_dropout, "a float in [0, 1)")
        _require(len(self.lora_targets) > 0, "heal.lora_targets", self.lora_targets, "at least one module name")

    @property
    def heals_decoder(self) -> bool:
        """Whether the receiving block gets a LoRA adapter."""
        return "decoder" in self.strategy

    @property
    def heals_projector(self) -> bool:
        """Whether the projector is unfrozen."""
        return "projector" in self.strategy


@dataclass(frozen=True)
class DataConfig:
    """One evaluation or training set of speech samples."""

    source: str
    """`librispeech`, `loquacious`, `covost2` (through `datasets`) or `manifest` (a local JSONL file)."""
    path: str
    """Hub id or local directory of the dataset, or the manifest file."""
    split: str = "test"
    """Split name as the dataset spells it (`train.960`, `test.clean`, `validation`, ...); unused for manifests."""
    name: str | None = None
    """Dataset configuration, e.g. CoVoST2's `en_de` or `fr_en`; None for the dataset's default."""
    max_samples: int | None = None
    """Keep the first N samples after the optional shuffle; None keeps all."""
    shuffle_seed: int | None = None
    """Shuffle with this seed before taking `max_samples`; None keeps corpus order."""
    max_seconds: float = 30.0
    """Samples longer than this are bad input."""
    on_bad_sample: str = "error"
    """`error` stops at the first bad sample naming it; `skip` leaves it out and counts it."""

    def __post_init__(self) -> None:
        _choice("data.source", self.source, DATA_SOURCES)
        _require(bool(self.path), "data.path", self.path, "a hub id, a directory or a manifest file")
        if self.max_samples is not None:
            _positive("data.max_samples", self.max_samples)
        _require(self.max_seconds > 0, "data.max_seconds", self.max_seconds, "a positive number")
        _choice("data.on_bad_sample", self.on_bad_sample, BAD_SAMPLE_POLICIES)


@dataclass(frozen=True)
class TrainConfig:
    """Training whatever the model makes trainable (projector, LoRA, healing adapters); paper section 4."""

    steps: int = 50_000
    """Optimiser steps (paper: 50,000; 75,000 for Llama-3.1-8B; 5,000 for healing)."""
    batch_size: int = 8
    """Samples per step per process."""
    lr: float = 5e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas."""
    clip: float = 1.0
    """Gradient-norm clipping."""
    warmdown: float = 0.6
    """Fraction of the steps, at the end, over which the LR decays linearly to 0 (0.8 for Llama-3.1-8B)."""
    seed: int = 0
    """Seeds the data order and every random draw, so a resumed run repeats an uninterrupted one."""
    checkpoint_every: int = 1_000
    """Save a checkpoint every N steps (and at the end)."""
    log_every: int = 50
    """Report the mean training loss every N steps."""
    task: str = "asr"
    """`asr` trains on transcripts, `ast` on translations."""

    def __post_init__(self) -> None:
        _positive("train.steps", self.steps)
        _positive("train.batch_size", self.batch_size)
        _require(self.lr > 0, "train.lr", self.lr, "a positive number")
        _require(
            all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2,
            "train.betas",
            self.betas,
            "(b1, b2) in [0, 1)",
        )
        _require(self.clip > 0, "train.clip", self.clip, "a positive number")
        _require(0.0 <= self.warmdown <= 1.0, "train.warmdown", self.warmdown, "a fraction in [0, 1]")
        _positive("train.checkpoint_every", self.checkpoint_every)
        _positive("train.log_every", self.log_every)
        _choice("train.task", self.task, TASKS)


@dataclass(frozen=True)
class DecodeConfig:
    """Greedy decoding."""

    batch_size: int = 16
    """Utterances decoded together."""
    max_new_tokens: int = 200
    """Stop a hypothesis after this many tokens if it has not produced EOS."""

    def __post_init__(self) -> None:
        _positive("decode.batch_size", self.batch_size)
        _positive("decode.max_new_tokens", self.max_new_tokens)


def depth_range(m: int, convention: str = "paper") -> range:
    """The block sizes n of a pruning path in `convention` for a decoder of m layers (`slam.redundancy`).

    `paper` (eq. 2) has n = 2..m-1, block n removing n-1 layers; `gromov` has n = 1..m-2, block n removing n.
    Both remove 1..m-2 layers, so that at least two layers are kept.

    Raises:
        ValueError: An unknown convention.
    """
    _choice("path.convention", convention, PATH_CONVENTIONS)
    return range(2, m) if convention == "paper" else range(1, m - 1)


def to_dict(cfg: Any) -> dict:
    """A config as plain JSON/YAML data (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build a config dataclass from plain data, recursively, checking every key.

    Args:
        cls: The config class.
        data: A mapping of field names to values (nested configs as mappings).
        where: Dotted prefix naming this config in error messages (e.g. `heal`).

    Returns:
        The config; its `__post_init__` validates the values.

    Raises:
        ValueError: An unknown key (named, with the allowed ones) or a value of the wrong type.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{_join(where, unknown[0])}: unknown key; allowed keys: {', '.join(fields)}")
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    missing = [name for name, f in fields.items() if name not in kwargs and _required(f)]
    if missing:
        raise ValueError(f"{_join(where, missing[0])}: missing required key")
    return cls(**kwargs)


def json_ready(value: Any) -> Any:
    """Tuples to lists, recursively, so that values round-trip through JSON and YAML."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _coerce(options[0], value, where) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}={value!r}: expected a list")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, where) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and type(value) is not hint:
        raise ValueError(f"{where}={value!r}: expected {hint.__name__}")
    return value


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: expected {allowed}")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, name, value, "one of " + ", ".join(allowed))


def _positive(name: str, value: object) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value, "a positive integer")
