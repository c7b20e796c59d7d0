"""Typed configs of the science stages, one dataclass per stage.

Every field holds a serialisable value (str, int, float, bool, tuple, nested config) so that a
config can be hashed into a cell id and logged flattened (`heal.lora_rank`). Each `__post_init__`
rejects bad values with a `ValueError` naming the field and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ENCODER_KINDS = ("auto", "wavlm", "whisper")
HEAL_STRATEGIES = ("none", "decoder", "projector", "decoder+projector")
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


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: expected {allowed}")


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, name, value, "one of " + ", ".join(allowed))


def _positive(name: str, value: object) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value, "a positive integer")
