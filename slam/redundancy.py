"""Decoder-layer redundancy: the angular-distance matrix over h_0..h_m and the optimal pruning path.

Conventions (DESIGN section 2): h_0 is the input of the first decoder layer (the input
embeddings), h_l the output of layer l (1-based), taken before the final norm; the state of a
sequence is the one at its last non-padding token, for left and right padding alike. Text and speech
inputs end on the same token, so that their matrices compare (paper Figure 1 (a) vs (b)): a text sample
is the text as the model's tokenizer encodes it (Qwen2.5 adds nothing, Llama a BOS in front), so its last
token is the text's last token; a speech sample is `[BOS] speech prompt target` without the EOS that
training appends, so its last token is the target's last token, the same token of the same transcript. The angular
distance d(a, b) = arccos(cos(a, b)) / pi is computed in float32 as 2 asin(|a/|a| - b/|b||/2) / pi,
the same quantity without arccos' loss of precision near 0 (identical states give exactly 0).
The matrix is averaged over samples (the mean of per-sample distances); per-sample matrices are kept.

A pruning path follows one of two block conventions, named in every path and never mixed:

- `paper` (eq. 2, the default): for n = 2..m-1, l*(n) = argmin over l in 1..m-n of D[l][l+n]; the n-1 layers
  l*+1..l*+n-1 are removed and layer l*+n, kept, receives h_{l*}. Fraction (n-1)/m.
- `gromov` (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers", and PruneMe): D[l][l+n]
  compares the inputs of layers l+1 and l+n+1, so the n layers l*+1..l*+n it spans are removed; for
  n = 1..m-2 (the same counts of removed layers as the paper's), l*(n) = argmin over l in 0..m-n. Fraction n/m.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from slam.config import DistanceConfig, depth_range
from slam.errors import BadInputError
from slam.metrics import format_percent
from slam.model import DecoderInputs, SpeechLLM, decoder_stack, position_ids_from_mask

TEXT_TOKEN = "the last token of the text, tokenised with the model's default special tokens"
"""Where a text sample's states are read (`text_layer_distances`)."""
TEXT_LAYOUT = "[the tokenizer's special tokens] text"
"""The input of a text sample."""
SPEECH_TOKEN = "the last target token (EOS is not appended)"
"""Where a speech sample's states are read (`speech_layer_distances`): the transcript's (or translation's) last
token, the token a text path on the same transcript ends on."""
SPEECH_LAYOUT = "[BOS if the tokenizer has one] speech prompt target"
"""The input of a speech sample: the training layout without its final EOS."""


@dataclass
class DistanceResult:
    """The distance matrix of one model over a set of inputs.

    Attributes:
        distance: (m+1, m+1) mean over samples of the per-sample angular distances.
        per_sample: (S, m+1, m+1) the per-sample matrices, in input order.
        token: Which token of each sample the states were read at (`TEXT_TOKEN`, `SPEECH_TOKEN`).
        layout: What each sample's input was (`TEXT_LAYOUT`, `SPEECH_LAYOUT`).
    """

    distance: np.ndarray
    per_sample: np.ndarray
    token: str = "the last non-padding token"
    layout: str = "as given"

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
    """One point of an optimal pruning path (paper eq. 2, or Gromov et al.'s convention).

    Attributes:
        n: Block size: h_start and h_{start+n} are compared.
        start: l*(n): the last layer kept before the removed block (0: the embeddings, `gromov` only).
        removed: 1-based numbers of the removed layers: start+1 .. start+n-1 (`paper`) or start+1 .. start+n
            (`gromov`).
        fraction: The fraction of decoder layers removed, len(removed) / m.
        distance: D[start][start+n].
        receiving_layer: 1-based number, in the pruned decoder, of the layer healing adapts: the first kept layer
            after the removed block, which now receives h_start (start+1); when a `gromov` block ends at the
            last layer, none follows it and the last kept layer, whose output now reaches the final norm
            (start), is adapted instead.
        convention: `paper` or `gromov`.
    """

    n: int
    start: int
    removed: tuple[int, ...]
    fraction: float
    distance: float
    receiving_layer: int
    convention: str = "paper"

    def to_dict(self) -> dict:
        """The JSON form of a step of the `slamgrid path` contract (its `convention` is the path's)."""
        return {
            "n": self.n,
            "start": self.start,
            "removed": list(self.removed),
            "fraction": self.fraction,
            "distance": self.distance,
            "receiving_layer": self.receiving_layer,
        }

    @classmethod
    def from_dict(cls, data: dict, convention: str) -> PathStep:
        """A step of a path's JSON (`to_dict`), in the path's convention."""
        return cls(
            n=data["n"],
            start=data["start"],
            removed=tuple(data["removed"]),
            fraction=data["fraction"],
            distance=data["distance"],
            receiving_layer=data["receiving_layer"],
            convention=convention,
        )


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

    return replace(layer_distances(decoder, batches()), token=TEXT_TOKEN, layout=TEXT_LAYOUT)


def speech_layer_distances(
    model: SpeechLLM, samples: Iterable[tuple[np.ndarray, str]], cfg: DistanceConfig
) -> DistanceResult:
    """Distances over SpeechLLM inputs (speech, prompt and target, teacher-forced).

    The measured token is the target's last token: the input is the training layout without the EOS after the
    target, so that a text path on the same transcripts (`text_layer_distances`) ends on the same token.
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

    return replace(layer_distances(model.decoder, batches()), token=SPEECH_TOKEN, layout=SPEECH_LAYOUT)


def path_report(model: str, result: DistanceResult, source: str, convention: str = "paper") -> dict:
    """The `slamgrid path` JSON (DESIGN section 4) of a measured matrix, with its path in `convention`.

    Args:
        model: The model's id or directory, as given.
        result: The measured matrices.
        source: `text` or `speech`.
        convention: The path's block convention (`pruning_path`).

    Returns:
        `model`, `n_layers`, `source`, `num_samples`, `token` and `layout` (where and on what the states were
        read), `convention`, `distance` ((m+1) x (m+1) lists) and `path` (`PathStep.to_dict` per n).
    """
    return {
        "model": model,
        "n_layers": result.n_layers,
        "source": source,
        "num_samples": result.num_samples,
        "token": result.token,
        "layout": result.layout,
        "convention": convention,
        "distance": result.distance.tolist(),
        "path": [step.to_dict() for step in pruning_path(result.distance, convention)],
    }


def path_table(report: dict) -> str:
    """A path report (`path_report`) as the answer a person reads: per fraction, the block to drop and its distance.

    Args:
        report: A `path_report`.

    Returns:
        Aligned text, one row per block size n: the fraction of layers removed (a percentage, rounded as the
        paper's tables), n, the first layer l of the block, the layers removed (1-based), and D[l][l+n].
    """
    header = ["drop %", "n", "block l", "layers removed", "distance"]
    rows = [
        [
            format_percent(step["fraction"]),
            str(step["n"]),
            str(step["start"]),
            _layer_span(step["removed"]),
            f"{step['distance']:.4f}",
        ]
        for step in report["path"]
    ]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(widths[i]) for i, cell in enumerate(line)) for line in [header, *rows])


def path_agreement(a: dict, b: dict) -> dict:
    """How two path reports (`path_report`) of one decoder agree: paper Figure 1 (a) vs (b).

    Args:
        a: One report, e.g. the text-derived one.
        b: The other, e.g. the speech-derived one; same depth and convention.

    Returns:
        `mean_abs_diff`: the mean of |D_a[l][l+n] - D_b[l][l+n]| over the candidate blocks of the path (every
        n of the convention, every l it searches); `same_block`: the depths whose steps remove the same layers;
        `depths`: all depths compared; `blocks`: per depth, the layers each removes.
    """
    if a["n_layers"] != b["n_layers"] or a["convention"] != b["convention"]:
        raise ValueError(
            f"paths of {a['n_layers']} and {b['n_layers']} layers in conventions {a['convention']} and "
            f"{b['convention']} do not compare"
        )
    m, convention = a["n_layers"], a["convention"]
    first = 1 if convention == "paper" else 0
    da, db = np.asarray(a["distance"]), np.asarray(b["distance"])
    diffs = [
        abs(da[layer, layer + n] - db[layer, layer + n])
        for n in depth_range(m, convention)
        for layer in range(first, m - n + 1)
    ]
    steps_a = {step["n"]: step["removed"] for step in a["path"]}
    steps_b = {step["n"]: step["removed"] for step in b["path"]}
    depths = sorted(steps_a.keys() & steps_b.keys())
    return {
        "mean_abs_diff": float(np.mean(diffs)) if diffs else 0.0,
        "same_block": [n for n in depths if steps_a[n] == steps_b[n]],
        "depths": depths,
        "blocks": {str(n): [steps_a[n], steps_b[n]] for n in depths},
    }


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


def pruning_path(distance: Sequence[Sequence[float]] | np.ndarray, convention: str = "paper") -> list[PathStep]:
    """The optimal pruning path {l*(n)}, one step per block size n (see the module docstring for the conventions).

    `paper` (eq. 2): for n = 2..m-1, l*(n) = argmin over l in 1..m-n of D[l][l+n], ties to the smallest l;
    layers l*+1..l*+n-1 are removed (n-1 of them) and layer l*+n then receives h_{l*}.
    `gromov`: for n = 1..m-2, l*(n) = argmin over l in 0..m-n of D[l][l+n], ties to the smallest l; the n layers
    l*+1..l*+n are removed.

    Args:
        distance: (m+1, m+1) matrix over h_0..h_m.
        convention: `paper` or `gromov`.

    Returns:
        One step per n, in increasing n (empty when m < 3).
    """
    matrix = np.asarray(distance, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise BadInputError(f"distance matrix must be square (m+1)x(m+1) with m >= 1, got shape {matrix.shape}")
    m = matrix.shape[0] - 1
    first = 1 if convention == "paper" else 0
    steps = []
    for n in depth_range(m, convention):
        start = min(range(first, m - n + 1), key=lambda layer: (matrix[layer, layer + n], layer))
        last = start + n - 1 if convention == "paper" else start + n
        removed = tuple(range(start + 1, last + 1))
        steps.append(
            PathStep(
                n=n,
                start=start,
                removed=removed,
                fraction=len(removed) / m,
                distance=float(matrix[start, start + n]),
                receiving_layer=start if last == m else start + 1,
                convention=convention,
            )
        )
    return steps


@torch.no_grad()
def _speech_batch(model: SpeechLLM, chunk: list[tuple[np.ndarray, str]]) -> DecoderInputs:
    return model.decoder_inputs([wave for wave, _ in chunk], [text for _, text in chunk], eos=False)


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


def _layer_span(layers: list[int]) -> str:
    """`5` or `4-7`: a run of consecutive 1-based layer numbers."""
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
