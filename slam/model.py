"""The SLAM-style SpeechLLM: frozen speech encoder, k-frame stacking, MLP projector, LLM decoder.

`SpeechLLM(encoder, projector, decoder)` is composed, not inherited. The decoder is a plain
`AutoModelForCausalLM` (Qwen2 and Llama families), so it stays usable on text alone.

Input layout of one sample (DESIGN section 2):
`[BOS if the tokenizer has one] [speech N positions] [prompt tokens] [target tokens] [EOS]`.
Labels are set on the target tokens and EOS only. Training batches are right-padded, generation
batches left-padded; position ids always count real tokens only, so both paddings give the
same states for the real tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    WavLMModel,
    WhisperModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from slam.config import DecoderConfig, EncoderConfig, LoRAConfig, ProjectorConfig, SpeechLLMConfig, from_dict, to_dict
from slam.errors import BadInputError
from slam.features import FeatureCache, audio_key, encoder_fingerprint

SAMPLE_RATE = 16_000
IGNORE_INDEX = -100
CONFIG_FILE = "speechllm.json"
TRAINED_FILE = "trained.safetensors"
WHISPER_WINDOW_SECONDS = 30.0


@dataclass
class DecoderInputs:
    """What the decoder consumes for one batch.

    Attributes:
        inputs_embeds: (B, L, D) input embeddings, padding positions hold the pad embedding.
        attention_mask: (B, L) 1 on real positions, 0 on padding.
        position_ids: (B, L) index of each real position among the real positions of its row.
        labels: (B, L) target ids on target tokens and EOS, IGNORE_INDEX elsewhere; None for generation.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None = None


class SpeechEncoder(nn.Module):
    """A frozen WavLM or Whisper encoder that maps 16 kHz waveforms to frames and valid lengths.

    Each utterance is encoded on its own, so that its frames are the same whatever it is batched with (and
    whichever cell asks), which is what lets a `slam.features.FeatureCache` (set as `cache`) compute each one once.
    """

    def __init__(self, model: nn.Module, feature_extractor, kind: str, cache: FeatureCache | None = None):
        super().__init__()
        self.model = model
        self.feature_extractor = feature_extractor
        self.kind = kind
        self.cache = cache
        """Where frames computed once are kept; None computes every utterance every time."""
        self.encoded = 0
        """Utterances run through the encoder so far (its forward calls)."""
        self.cached = 0
        """Utterances whose frames were read from `cache` instead."""
        self._fingerprint: tuple[torch.device, torch.dtype, str, dict] | None = None
        self.model.requires_grad_(False)
        self.model.eval()

    @property
    def dim(self) -> int:
        """d_e, the width of one encoder frame."""
        return self.model.config.d_model if self.kind == "whisper" else self.model.config.hidden_size

    def train(self, mode: bool = True) -> SpeechEncoder:
        # Frozen: dropout and masking stay off even while the projector trains.
        return super().train(False)

    @torch.no_grad()
    def forward(self, waveforms: Sequence[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of mono 16 kHz waveforms, each on its own (or read from the cache).

        Args:
            waveforms: B one-dimensional float arrays of varying lengths.

        Returns:
            frames (B, T', d_e), zero past each utterance's frames, and lengths (B,): the number of frames that
            cover each real audio (T' is the longest).
        """
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        frames = [self._utterance(_as_numpy(w), device, dtype) for w in waveforms]  # each (T'_i, d_e)
        lengths = torch.tensor([f.shape[0] for f in frames], dtype=torch.long, device=device)
        return nn.utils.rnn.pad_sequence(frames, batch_first=True), lengths

    def _utterance(self, audio: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(T', d_e) frames covering one utterance's audio: from the cache, or computed (and then cached)."""
        if self.cache is None:
            return self._encode(audio, device, dtype)
        fingerprint, describe = self._fingerprint_on(device, dtype)
        compute = lambda: self._encode(audio, device, dtype)  # noqa: E731
        frames, computed = self.cache.fetch(fingerprint, audio_key(audio), self.dim, dtype, compute, describe)
        self.cached += not computed
        return frames.to(device)

    def _encode(self, audio: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        encode = self._encode_whisper if self.kind == "whisper" else self._encode_wavlm
        out, lengths = encode([audio], device, dtype)
        self.encoded += 1
        return out[0, : int(lengths[0])]

    def _fingerprint_on(self, device: torch.device, dtype: torch.dtype) -> tuple[str, dict]:
        """The encoder's fingerprint where it computes now, hashed once (again only if it moves or is cast)."""
        if self._fingerprint is None or self._fingerprint[:2] != (device, dtype):
            fingerprint, describe = encoder_fingerprint(self.model, self.feature_extractor, self.kind)
            self._fingerprint = (device, dtype, fingerprint, describe)
        return self._fingerprint[2], self._fingerprint[3]

    def _encode_wavlm(self, audio, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.feature_extractor(
            audio, sampling_rate=SAMPLE_RATE, padding=True, return_attention_mask=True, return_tensors="pt"
        )
        values = feats["input_values"].to(device=device, dtype=dtype)  # (B, T)
        mask = feats["attention_mask"].to(device)  # (B, T)
        use_mask = getattr(self.model.config, "feat_extract_norm", "layer") == "layer"
        out = self.model(values, attention_mask=mask if use_mask else None).last_hidden_state  # (B, T', d_e)
        lengths = self.model._get_feat_extract_output_lengths(mask.sum(dim=1)).to(torch.long)
        return out, lengths.clamp(max=out.shape[1])

    def _encode_whisper(self, audio, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        for i, wav in enumerate(audio):
            if len(wav) > WHISPER_WINDOW_SECONDS * SAMPLE_RATE:
                raise BadInputError(
                    f"sample {i}: {len(wav) / SAMPLE_RATE:.1f} s of audio is longer than Whisper's "
                    f"{WHISPER_WINDOW_SECONDS:.0f} s window"
                )
        # Whisper always sees a 30 s window (3,000 mel frames -> 1,500 outputs); only the outputs
        # that cover real audio are kept, so padding never reaches the projector.
        feats = self.feature_extractor(
            audio, sampling_rate=SAMPLE_RATE, padding="max_length", return_attention_mask=True, return_tensors="pt"
        )
        mel = feats["input_features"].to(device=device, dtype=dtype)  # (B, n_mels, 3000)
        mel_frames = feats["attention_mask"].sum(dim=1).to(device)  # (B,)
        out = self.model(mel).last_hidden_state  # (B, 1500, d_e)
        lengths = (mel_frames + 1) // 2  # conv2 has stride 2: ceil(frames / 2)
        return out, lengths.to(torch.long).clamp(max=out.shape[1])


class Projector(nn.Module):
    """Stack k frames, then Linear(k*d_e -> hidden) - GELU - Linear(hidden -> d_llm) (paper eq. 1)."""

    def __init__(self, encoder_dim: int, decoder_dim: int, cfg: ProjectorConfig):
        super().__init__()
        self.stack = cfg.stack
        self.net = nn.Sequential(
            nn.Linear(cfg.stack * encoder_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, decoder_dim)
        )

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project encoder frames into the decoder's embedding space.

        Args:
            frames: (B, T', d_e) encoder outputs.
            lengths: (B,) valid frames per row.

        Returns:
            embeddings (B, N, d_llm) and their valid lengths (B,) with N_i = lengths_i // k.
        """
        stacked, speech_lengths = stack_frames(frames, lengths, self.stack)
        weight = self.net[0].weight
        return self.net(stacked.to(weight.dtype)), speech_lengths


class SpeechLLM(nn.Module):
    """Encoder -> projector -> decoder, with the prompt and the tokenizer needed to assemble inputs."""

    def __init__(
        self,
        encoder: SpeechEncoder,
        projector: Projector,
        decoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompt: str,
    ):
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []

    def speech_embeddings(self, waveforms: Sequence[np.ndarray | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Speech embeddings E^S (B, N, d_llm) and their lengths (B,)."""
        frames, lengths = self.encoder(waveforms)
        return self.projector(frames, lengths)

    def decoder_inputs(
        self,
        waveforms: Sequence[np.ndarray | torch.Tensor],
        targets: Sequence[str] | None = None,
        padding_side: str = "right",
        eos: bool = True,
    ) -> DecoderInputs:
        """Assemble speech, prompt and (teacher-forced) target into decoder inputs.

        Args:
            waveforms: B mono 16 kHz waveforms.
            targets: B target texts (transcripts or translations); None for generation.
            padding_side: `right` for training and measurement, `left` for batched generation.
            eos: Append EOS after each target (training); False ends each row at its last target token (the
                layout the layer distances are measured in, `slam.redundancy.speech_layer_distances`).

        Returns:
            The assembled `DecoderInputs`; labels are set when targets are given.
        """
        speech, speech_lengths = self.speech_embeddings(waveforms)
        target_ids = None
        if targets is not None:
            if len(targets) != len(waveforms):
                raise ValueError(f"{len(waveforms)} waveforms but {len(targets)} targets")
            target_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in targets]
        return assemble_inputs(
            speech,
            speech_lengths,
            self.decoder.get_input_embeddings(),
            self.prompt_ids,
            target_ids,
            bos_id=self.tokenizer.bos_token_id,
            eos_id=self.tokenizer.eos_token_id if eos else None,
            padding_side=padding_side,
        )

    def forward(self, waveforms: Sequence[np.ndarray | torch.Tensor], targets: Sequence[str]) -> torch.Tensor:
        """Teacher-forced NLL over target tokens and EOS, averaged over those tokens.

        Args:
            waveforms: B mono 16 kHz waveforms.
            targets: B target texts.

        Returns:
            The scalar loss, `nll`'s sum divided by its count.
        """
        total, count = self.nll(waveforms, targets)
        return total / count

    def nll(
        self, waveforms: Sequence[np.ndarray | torch.Tensor], targets: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced NLL over target tokens and EOS, summed, and the number of those tokens.

        The sum and the count, rather than their ratio, let data-parallel training average over the tokens of
        the whole global batch (`slam.train`), so that its gradient is the one of a single process.

        Args:
            waveforms: B mono 16 kHz waveforms.
            targets: B target texts.

        Returns:
            The summed NLL, a float32 scalar, and the token count, an int64 scalar.
        """
        inputs = self.decoder_inputs(waveforms, targets, padding_side="right")
        logits = self.decoder(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            use_cache=False,
        ).logits  # (B, L, V)
        shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B*(L-1), V)
        labels = inputs.labels[:, 1:].reshape(-1)  # (B*(L-1),)
        total = nn.functional.cross_entropy(shifted, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return total, (labels != IGNORE_INDEX).sum()


def build_speech_llm(cfg: SpeechLLMConfig) -> SpeechLLM:
    """Build a SpeechLLM from its config: encoder and decoder frozen, projector trainable.

    Args:
        cfg: The SpeechLLM config; `cfg.decoder.lora` adds trainable LoRA on the attention projections.

    Returns:
        The assembled model, on CPU, in train mode for the projector.
    """
    encoder = load_encoder(cfg.encoder)
    decoder, tokenizer = load_decoder(cfg.decoder)
    return assemble_speech_llm(cfg, encoder, decoder, tokenizer)


def assemble_speech_llm(
    cfg: SpeechLLMConfig, encoder: SpeechEncoder, decoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> SpeechLLM:
    """Compose a SpeechLLM from backbones already loaded (e.g. kept by a worker across cells).

    The decoder is frozen in place and, with `cfg.decoder.lora`, wrapped with LoRA: pass a copy when
    the same decoder object serves other models. The projector is freshly initialised.

    Args:
        cfg: The SpeechLLM config the backbones were loaded from.
        encoder: The frozen speech encoder.
        decoder: The causal LM.
        tokenizer: Its tokenizer.

    Returns:
        The composed model.
    """
    decoder.requires_grad_(False)
    if cfg.decoder.lora is not None:
        decoder = add_decoder_lora(decoder, cfg.decoder.lora)
    projector = Projector(encoder.dim, decoder.get_input_embeddings().embedding_dim, cfg.projector)
    return SpeechLLM(encoder, projector, decoder, tokenizer, cfg.prompt)


def save_speech_llm(model: SpeechLLM, cfg: SpeechLLMConfig, out_dir: str | Path) -> Path:
    """Save a trained (unpruned) SpeechLLM: its config and the weights it trained.

    The frozen encoder and decoder are referenced by `cfg` (hub ids or directories), not copied;
    the projector and, for a LoRA-adapted decoder, the LoRA weights go to `trained.safetensors`.

    Args:
        model: The model built from `cfg`.
        cfg: Its config.
        out_dir: Directory to write.

    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained = {name: p.detach().cpu().contiguous() for name, p in _trained_parameters(model, cfg).items()}
    save_file(trained, out / TRAINED_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    return out


def load_speech_llm(path: str | Path) -> tuple[SpeechLLM, SpeechLLMConfig]:
    """Load a SpeechLLM saved by `save_speech_llm` (or exported by `slam.export.export_speech_llm`).

    Args:
        path: The directory.

    Returns:
        The model (projector and LoRA restored) and its config.

    Raises:
        BadInputError: The directory, its config or its weights are missing or do not match.
    """
    root = Path(path)
    cfg = resolve_saved_names(read_speech_llm_config(root), root)
    model = build_speech_llm(cfg)
    restore_trained(model, cfg, root)
    return model, cfg


def resolve_saved_names(cfg: SpeechLLMConfig, root: str | Path) -> SpeechLLMConfig:
    """A saved SpeechLLM's config with backbone names written `./x` or `../x` made relative to its directory.

    An export (`slam.export`) names its own pruned decoder `./decoder`, so that the directory can move; hub ids and
    absolute paths are left as they are.
    """

    def resolved(name: str) -> str:
        return str((Path(root) / name).resolve()) if name.startswith(("./", "../")) else name

    encoder = replace(cfg.encoder, name=resolved(cfg.encoder.name))
    decoder = replace(cfg.decoder, name=resolved(cfg.decoder.name))
    return replace(cfg, encoder=encoder, decoder=decoder)


def read_speech_llm_config(path: str | Path) -> SpeechLLMConfig:
    """The config of a SpeechLLM saved by `save_speech_llm`."""
    root = Path(path)
    for name in (CONFIG_FILE, TRAINED_FILE):
        if not (root / name).is_file():
            raise BadInputError(f"{root}: not a saved SpeechLLM (no {name})")
    try:
        return from_dict(SpeechLLMConfig, json.loads((root / CONFIG_FILE).read_text()))
    except (ValueError, json.JSONDecodeError) as err:
        raise BadInputError(f"{root / CONFIG_FILE}: {err}") from err


def restore_trained(model: SpeechLLM, cfg: SpeechLLMConfig, path: str | Path) -> None:
    """Copy the trained weights saved by `save_speech_llm` into a model composed from `cfg`, in place.

    Raises:
        BadInputError: The saved weights do not match the model's trained parameters.
    """
    from safetensors.torch import load_file

    file = Path(path) / TRAINED_FILE
    params = _trained_parameters(model, cfg)
    state = load_file(file)
    if set(state) != set(params):
        diff = sorted(set(state) ^ set(params))
        raise BadInputError(f"{file}: weights do not match the model ({diff[0]} and others)")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def load_decoder(cfg: DecoderConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a hub id or a local directory.

    Args:
        cfg: Which model, in which dtype.

    Returns:
        The model in eval mode and its tokenizer (with a pad token: EOS when the model has none).

    Raises:
        BadInputError: The directory is missing, or the model is not a causal LM.
    """
    config = load_config(cfg.name, cfg.trust_remote_code)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise BadInputError(f"{cfg.name}: model type {config.model_type!r} is not a causal LM")
    tokenizer = AutoTokenizer.from_pretrained(cfg.name, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        cfg.name, dtype=getattr(torch, cfg.dtype), trust_remote_code=cfg.trust_remote_code
    )
    return model.eval(), tokenizer


def load_encoder(cfg: EncoderConfig) -> SpeechEncoder:
    """Load a frozen WavLM or Whisper encoder and its feature extractor.

    Args:
        cfg: Which encoder; `kind="auto"` reads it from the model's config.

    Returns:
        The frozen encoder.

    Raises:
        BadInputError: The directory is missing or the model is neither WavLM nor Whisper.
    """
    config = load_config(cfg.name, trust_remote_code=False)
    kind = config.model_type if cfg.kind == "auto" else cfg.kind
    if kind != config.model_type or kind not in ("wavlm", "whisper"):
        wanted = "wavlm or whisper" if cfg.kind == "auto" else cfg.kind
        raise BadInputError(f"{cfg.name}: model type {config.model_type!r} is not a speech encoder ({wanted})")
    feature_extractor = AutoFeatureExtractor.from_pretrained(cfg.name)
    if kind == "whisper":
        model = WhisperModel.from_pretrained(cfg.name).get_encoder()
    else:
        model = WavLMModel.from_pretrained(cfg.name)
    return SpeechEncoder(model, feature_extractor, kind)


def load_config(name: str, trust_remote_code: bool):
    """Read a model's config, telling a missing local directory apart from an unreachable hub id."""
    looks_local = os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise BadInputError(f"{name}: no such model directory")
    if looks_local and not os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
        raise BadInputError(f"{name}: not a model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise BadInputError(f"{name}: cannot load the model config ({_first_line(err)})") from err


def add_decoder_lora(decoder: PreTrainedModel, cfg: LoRAConfig) -> PreTrainedModel:
    """Wrap the decoder with trainable LoRA adapters on `cfg.targets` of every layer."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets))
    return get_peft_model(decoder, lora)


def decoder_stack(decoder: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (the module holding `layers`), through any PEFT wrapper."""
    base = decoder.get_base_model() if hasattr(decoder, "get_base_model") else decoder
    stack = base.get_decoder()
    if not isinstance(getattr(stack, "layers", None), nn.ModuleList):
        raise BadInputError(f"{type(base).__name__}: no decoder layer list found")
    return stack


def stack_frames(frames: torch.Tensor, lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate k consecutive frames: (B, T', d) -> (B, N, k*d), N_i = lengths_i // k.

    A remainder of fewer than k frames at the end of an utterance (under 100 ms at 50 Hz) is dropped.

    Raises:
        BadInputError: An utterance is too short to give one speech position.
    """
    speech_lengths = lengths // k  # (B,)
    if bool((speech_lengths < 1).any()):
        short = int(torch.nonzero(speech_lengths < 1)[0, 0])
        raise BadInputError(
            f"sample {short}: {int(lengths[short])} encoder frames are fewer than k={k}, too short to encode"
        )
    n_max = int(speech_lengths.max())
    batch, _, dim = frames.shape
    stacked = frames[:, : n_max * k].reshape(batch, n_max, k * dim)  # (B, N, k*d)
    return stacked, speech_lengths


def assemble_inputs(
    speech: torch.Tensor,
    speech_lengths: torch.Tensor,
    embed: nn.Embedding,
    prompt_ids: Sequence[int],
    target_ids: Sequence[Sequence[int]] | None,
    bos_id: int | None,
    eos_id: int | None,
    padding_side: str = "right",
) -> DecoderInputs:
    """Concatenate [BOS] speech prompt [target EOS] per sample and pad the batch.

    Args:
        speech: (B, N, D) speech embeddings; row i is valid up to speech_lengths[i].
        speech_lengths: (B,) valid speech positions per row.
        embed: The decoder's token embedding table.
        prompt_ids: Prompt token ids, shared by every sample.
        target_ids: Per-sample target token ids (without EOS), or None for generation.
        bos_id: Id placed first when the tokenizer has a BOS token, else None.
        eos_id: Id appended after each target; None appends nothing.
        padding_side: `right` or `left`.

    Returns:
        The padded `DecoderInputs`.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r} is not allowed: expected left or right")
    device = speech.device
    head = [bos_id] if bos_id is not None else []
    head_emb = embed(torch.tensor(head, dtype=torch.long, device=device))  # (H, D)
    prompt_emb = embed(torch.tensor(list(prompt_ids), dtype=torch.long, device=device))  # (P, D)
    speech = speech.to(prompt_emb.dtype)
    rows, labels = [], []
    for i in range(speech.shape[0]):
        parts = [head_emb, speech[i, : int(speech_lengths[i])], prompt_emb]
        n_context = sum(p.shape[0] for p in parts)
        row_labels = [IGNORE_INDEX] * n_context
        if target_ids is not None:
            target = list(target_ids[i]) + ([eos_id] if eos_id is not None else [])
            parts.append(embed(torch.tensor(target, dtype=torch.long, device=device)))
            row_labels += target
        rows.append(torch.cat(parts))  # (L_i, D)
        labels.append(row_labels)
    length = max(r.shape[0] for r in rows)
    dim = speech.shape[-1]
    inputs_embeds = speech.new_zeros(len(rows), length, dim)  # (B, L, D)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
    label_tensor = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        span = slice(0, row.shape[0]) if padding_side == "right" else slice(length - row.shape[0], length)
        inputs_embeds[i, span] = row
        attention_mask[i, span] = 1
        label_tensor[i, span] = torch.tensor(labels[i], dtype=torch.long, device=device)
    return DecoderInputs(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        labels=label_tensor if target_ids is not None else None,
    )


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) positions counting real tokens only, so left and right padding agree; 0 on padding."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _trained_parameters(model: SpeechLLM, cfg: SpeechLLMConfig) -> dict[str, nn.Parameter]:
    params = {f"projector.{name}": p for name, p in model.projector.named_parameters()}
    if cfg.decoder.lora is not None:
        params |= {f"decoder.{name}": p for name, p in model.decoder.named_parameters() if "lora_" in name}
    return params


def _as_numpy(wave: np.ndarray | torch.Tensor) -> np.ndarray:
    array = wave.detach().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    if array.ndim != 1:
        raise BadInputError(f"expected a mono waveform (1-D), got shape {tuple(array.shape)}")
    return array.astype(np.float32, copy=False)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
