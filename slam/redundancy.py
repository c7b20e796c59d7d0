"""Decoder-layer redundancy: the angular-distance matrix over h_0..h_m and the optimal pruning path.

Conventions (DESIGN section 2): h_0 is the input of the first decoder layer (the input
embeddings), h_l the output of layer l (1-based), taken before the final norm; the state of a
sequence is the one at its last non-padding token, for left and right padding alike. The angular
distance d(a, b) = arccos(cos(a, b)) / pi is computed in float32 as 2 asin(|a/|a| - b/|b||/2) / pi,
the same quantity without arccos' loss of precision near 0 (identical states give exactly 0).
The matrix is averaged over samples (the mean of per-sample distances); per-sample matrices are kept.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from slam.config import DistanceConfig
from slam.errors import BadInputError
from slam.model import DecoderInputs, SpeechLLM, decoder_stack, position_ids_from_mask


@dataclass
class DistanceResult:
    """The distance matrix of one model over a set of inputs.

    Attributes:
        distance: (m+1, m+1) mean over samples of the per-sample angular distances.
        per_sample: (S, m+1, m+1) the per-sample matrices, in input order.
    """

    distance: np.ndarray
    per_sample: np.ndarray

    @property
    def n_layers(self) -> int:
        """m, the number of decoder layers."""
        return self.distance.shape[0] - 1

    @property
    def num_samples(self) -> int:
        """S, the number of samples averaged."""
        return self.per_sample.shape[0]


@dataclass(frozen=True)
class PathStep:
    """One point of the optimal pruning path (paper eq. 2).

    Attributes:
        n: Block size: h_start and h_{start+n} are compared.
        start: l*(n), 1-based: the last layer kept before the removed block.
        removed: 1-based numbers of the removed layers, start+1 .. start+n-1.
        fraction: (n-1)/m, the fraction of decoder layers removed.
        distance: D[start][start+n].
    """

    n: int
    start: int
    removed: tuple[int, ...]
    fraction: float
    distance: float

    @property
    def receiving_layer(self) -> int:
        """1-based number, in the pruned decoder, of the layer that receives h_start (originally start+n)."""
        return self.start + 1

    def to_dict(self) -> dict:
        """The JSON form of the `slamgrid path` contract."""
        return {
            "n": self.n,
            "start": self.start,
            "removed": list(self.removed),
            "fraction": self.fraction,
            "distance": self.distance,
        }


def layer_distances(decoder: nn.Module, batches: Iterable[DecoderInputs]) -> DistanceResult:
    """The (m+1)x(m+1) angular-distance matrix over decoder inputs, one forward pass per batch.

    Args:
        decoder: A causal LM (plain or PEFT-wrapped); only its decoder layers run, no LM head.
        batches: Decoder inputs (embeddings, attention mask, positions); labels are ignored.

    Returns:
        The mean and per-sample distance matrices.
    """
    per_sample = [_batch_distances(decoder, batch) for batch in batches]
    if not per_sample:
        raise BadInputError("no samples to measure distances on")
    stacked = torch.cat(per_sample).numpy()  # (S, m+1, m+1)
    return DistanceResult(distance=stacked.astype(np.float64).mean(axis=0), per_sample=stacked)


def text_layer_distances(decoder: nn.Module, tokenizer, texts: Sequence[str], cfg: DistanceConfig) -> DistanceResult:
    """Distances over text: each text tokenised with the model's tokenizer (its default special tokens).

    Args:
        decoder: A causal LM.
        tokenizer: Its tokenizer; needs a pad token (any: padding is masked).
        texts: One sample each, in order; `cfg.max_samples` keeps the first N.
        cfg: Batch size, sample limit and truncation length.

    Returns:
        The distance matrices over the texts.
    """
    texts = list(texts)[: cfg.max_samples]
    if not texts:
        raise BadInputError("no text samples")
    embed = decoder.get_input_embeddings()
    device = embed.weight.device

    def batches() -> Iterable[DecoderInputs]:
        for i in range(0, len(texts), cfg.batch_size):
            tokens = tokenizer(
                texts[i : i + cfg.batch_size],
                padding=True,
                truncation=True,
                max_length=cfg.max_length,
                return_tensors="pt",
            )
            mask = tokens["attention_mask"].to(device)  # (B, L)
            empty = torch.nonzero(mask.sum(dim=1) == 0)
            if len(empty):
                raise BadInputError(f"text sample {i + int(empty[0, 0])} tokenises to no tokens")
            embeds = embed(tokens["input_ids"].to(device))  # (B, L, D)
            yield DecoderInputs(embeds, mask, position_ids_from_mask(mask))

    return layer_distances(decoder, batches())


def speech_layer_distances(
    model: SpeechLLM, samples: Iterable[tuple[np.ndarray, str]], cfg: DistanceConfig
) -> DistanceResult:
    """Distances over SpeechLLM inputs (speech, prompt, target and EOS, teacher-forced).

    The measured token is the last non-padding one, the EOS after the target, as in training.
    Samples are streamed: only one batch of audio is held at a time.

    Args:
        model: The SpeechLLM.
        samples: (16 kHz mono waveform, target text) pairs; `cfg.max_samples` keeps the first N.
        cfg: Batch size and sample limit.

    Returns:
        The distance matrices over the samples.
    """

    def batches() -> Iterable[DecoderInputs]:
        chunk: list[tuple[np.ndarray, str]] = []
        for sample in itertools.islice(samples, cfg.max_samples):
            chunk.append(sample)
            if len(chunk) == cfg.batch_size:
                yield _speech_batch(model, chunk)
                chunk = []
        if chunk:
            yield _speech_batch(model, chunk)

    return layer_distances(model.decoder, batches())


def angular_distance_matrix(states: torch.Tensor) -> torch.Tensor:
    """Pairwise angular distances between the rows of each sample's states.

    Args:
        states: (B, K, D) K vectors per sample.

    Returns:
        (B, K, K) distances in [0, 1], float32, symmetric with an exact zero diagonal.
    """
    unit = nn.functional.normalize(states.float(), dim=-1)  # (B, K, D)
    chord = torch.cdist(unit, unit, compute_mode="donot_use_mm_for_euclid_dist")  # (B, K, K)
    return 2.0 * torch.asin((chord / 2.0).clamp(0.0, 1.0)) / math.pi


def pruning_path(distance: Sequence[Sequence[float]] | np.ndarray) -> list[PathStep]:
    """The optimal pruning path {l*(n)} for n = 2..m-1 (paper eq. 2).

    l*(n) = argmin over l in 1..m-n of D[l][l+n], ties to the smallest l; layers l*+1..l*+n-1 are
    removed (n-1 of them) and layer l*+n then receives h_{l*}.

    Args:
        distance: (m+1, m+1) matrix over h_0..h_m.

    Returns:
        One step per n, in increasing n (empty when m < 3).
    """
    matrix = np.asarray(distance, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise BadInputError(f"distance matrix must be square (m+1)x(m+1) with m >= 1, got shape {matrix.shape}")
    m = matrix.shape[0] - 1
    steps = []
    for n in range(2, m):
        start = min(range(1, m - n + 1), key=lambda layer: (matrix[layer, layer + n], layer))
        steps.append(
            PathStep(
                n=n,
                start=start,
                removed=tuple(range(start + 1, start + n)),
                fraction=(n - 1) / m,
                distance=float(matrix[start, start + n]),
            )
        )
    return steps


@torch.no_grad()
def _speech_batch(model: SpeechLLM, chunk: list[tuple[np.ndarray, str]]) -> DecoderInputs:
    return model.decoder_inputs([wave for wave, _ in chunk], [text for _, text in chunk])


@torch.no_grad()
def _batch_distances(decoder: nn.Module, batch: DecoderInputs) -> torch.Tensor:
    """(B, m+1, m+1) per-sample distances of one batch, from one pass through the decoder layers."""
    stack = decoder_stack(decoder)
    mask = batch.attention_mask
    # Index of the last real token of each row; positions increase, so argmax works for both paddings.
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask.bool() * positions).argmax(dim=1)  # (B,)
    rows = torch.arange(mask.shape[0], device=mask.device)
    states: list[torch.Tensor] = []

    def grab_input(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        states.append(hidden[rows, last].float())  # (B, D)

    def grab_output(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        states.append(hidden[rows, last].float())  # (B, D)

    handles = [stack.layers[0].register_forward_pre_hook(grab_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(grab_output) for layer in stack.layers]
    try:
        stack(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
    finally:
        for handle in handles:
            handle.remove()
    return angular_distance_matrix(torch.stack(states, dim=1)).cpu()  # (B, m+1, m+1)
