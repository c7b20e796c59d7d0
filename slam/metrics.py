"""Evaluation metrics for the layer-redundancy study: corpus WER, corpus BLEU and the removable fraction.

ASR is scored by corpus-level word error rate (jiwer) after applying the Whisper English text normaliser to
both hypotheses and references. AST is scored by sacrebleu corpus BLEU, keeping the metric signature. The
paper's summary statistic is the largest fraction of decoder layers that can be removed while the relative
change of the score against the unpruned baseline stays within a threshold on every evaluation set at once.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache

import jiwer
from sacrebleu.metrics import BLEU
from whisper_normalizer.english import EnglishTextNormalizer

WER_THRESHOLD = 0.25
"""Largest allowed relative WER increase, (WER - WER0) / WER0, for a pruned model to count as lossless."""

BLEU_THRESHOLD = -0.10
"""Smallest allowed relative BLEU change, (BLEU - BLEU0) / BLEU0, for a pruned model to count as lossless."""

_DEFAULT_THRESHOLDS = {"wer": WER_THRESHOLD, "bleu": BLEU_THRESHOLD}

_TOLERANCE = 1e-9
"""Slack on threshold comparisons so that scores exactly on the threshold are not rejected by float noise."""


@dataclass(frozen=True)
class WERResult:
    """Corpus-level word error rate with its alignment counts.

    Attributes:
        wer: (substitutions + deletions + insertions) / num_ref_words, as a fraction (0.05 means 5%).
        substitutions: Number of substituted words over the corpus.
        deletions: Number of reference words missing from the hypotheses.
        insertions: Number of hypothesis words not in the references.
        hits: Number of correctly recognised words.
        num_ref_words: Total number of reference words (hits + substitutions + deletions).
        excluded: Indices of the utterances left out of the score because their reference is empty (after
            normalisation, when normalising): a filler-only utterance such as "Um." has no word to recognise.
    """

    wer: float
    substitutions: int
    deletions: int
    insertions: int
    hits: int
    num_ref_words: int
    excluded: tuple[int, ...] = ()


@dataclass(frozen=True)
class BLEUResult:
    """Corpus BLEU score with the sacrebleu signature that makes it reproducible.

    Attributes:
        bleu: Corpus BLEU on sacrebleu's 0-100 scale.
        signature: sacrebleu metric signature, e.g. ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:...``.
    """

    bleu: float
    signature: str


def normalize_english(text: str) -> str:
    """Normalises English text with the Whisper English text normaliser.

    Lower-cases, removes punctuation and filler words, standardises numbers ("twenty five" -> "25") and
    British spellings ("colour" -> "color").

    Args:
        text: Raw transcript.

    Returns:
        The normalised transcript.
    """
    return _normalizer()(text)


def corpus_wer(hypotheses: Sequence[str], references: Sequence[str], normalize: bool = True) -> WERResult:
    """Computes the corpus-level word error rate.

    The WER is the total number of errors divided by the total number of reference words over the whole
    corpus; it is not the mean of per-utterance WERs. Empty hypotheses are allowed (all their reference words
    count as deletions). An utterance whose reference is empty (after normalisation when ``normalize`` is
    true; the Whisper normaliser empties filler-only references such as "Um.") has no word to recognise and
    no defined error rate: it is left out of the corpus score and its index is listed in ``excluded``,
    whatever its hypothesis says.

    Args:
        hypotheses: Model transcripts, one per utterance.
        references: Ground-truth transcripts, aligned with ``hypotheses``.
        normalize: Whether to apply the Whisper English normaliser to both sides before scoring.

    Returns:
        The corpus WER as a fraction together with its substitution, deletion, insertion and hit counts, and
        the utterances left out.

    Raises:
        ValueError: If the inputs are empty or differ in length, or if every reference is empty.
    """
    _check_lengths(hypotheses, references)
    if normalize:
        hypotheses = [normalize_english(h) for h in hypotheses]
        references = [normalize_english(r) for r in references]
    excluded = tuple(index for index, reference in enumerate(references) if not reference.strip())
    if len(excluded) == len(references):
        empty = " after normalisation" if normalize else ""
        raise ValueError(f"every one of the {len(references)} references is empty{empty}: no word to score")
    kept = [index for index in range(len(references)) if index not in excluded]
    output = jiwer.process_words([references[i] for i in kept], [hypotheses[i] for i in kept])
    return WERResult(
        wer=output.wer,
        substitutions=output.substitutions,
        deletions=output.deletions,
        insertions=output.insertions,
        hits=output.hits,
        num_ref_words=output.hits + output.substitutions + output.deletions,
        excluded=excluded,
    )


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], tokenize: str = "13a") -> BLEUResult:
    """Computes sacrebleu corpus BLEU against a single reference per segment.

    Args:
        hypotheses: Model translations, one per segment.
        references: Reference translations, aligned with ``hypotheses``.
        tokenize: sacrebleu tokeniser name ("13a" is sacrebleu's default for most languages).

    Returns:
        The corpus BLEU (0-100) and the sacrebleu signature describing how it was computed.

    Raises:
        ValueError: If the inputs are empty or differ in length.
    """
    _check_lengths(hypotheses, references)
    metric = BLEU(tokenize=tokenize)
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return BLEUResult(bleu=score.score, signature=str(metric.get_signature()))


def relative_change(score: float, baseline: float) -> float:
    """Computes the relative change delta = (score - baseline) / baseline.

    Args:
        score: Score of the pruned model.
        baseline: Score of the unpruned model.

    Returns:
        The relative change as a fraction (0.25 means 25% higher than the baseline).

    Raises:
        ValueError: If ``baseline`` is zero.
    """
    if baseline == 0:
        raise ValueError("relative change is undefined for a baseline score of 0")
    return (score - baseline) / baseline


def removable_fraction(
    baseline: Mapping[str, float],
    pruned: Mapping[float, Mapping[str, float]],
    metric: str,
    threshold: float | None = None,
) -> float:
    """Finds the largest fraction of removed layers whose scores stay within the threshold on every set.

    A fraction passes when, for every evaluation set in ``baseline``, the relative change of its score meets
    the threshold: delta_WER <= ``WER_THRESHOLD`` for "wer", delta_BLEU >= ``BLEU_THRESHOLD`` for "bleu".
    Degradation curves need not be monotone, so this returns the LARGEST passing fraction, not the fraction
    just before the first failure: a fraction may fail while a larger one passes, and the larger one counts.
    Comparisons allow a slack of 1e-9 so that a score exactly on the threshold is not rejected by float noise.

    Args:
        baseline: Unpruned model's score per evaluation set name.
        pruned: Scores per evaluation set name, keyed by the fraction of layers removed, (n - 1) / m.
        metric: "wer" or "bleu".
        threshold: Overrides the metric's default threshold (``WER_THRESHOLD`` or ``BLEU_THRESHOLD``).

    Returns:
        The largest passing fraction, or 0.0 if no pruned fraction passes.

    Raises:
        ValueError: If ``metric`` is unknown, ``baseline`` is empty, a fraction lies outside [0, 1], a
            baseline set is missing from a fraction's scores, or a baseline score is zero.
    """
    if metric not in _DEFAULT_THRESHOLDS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(_DEFAULT_THRESHOLDS)}")
    if not baseline:
        raise ValueError("baseline has no evaluation sets")
    best = 0.0
    for fraction, scores in pruned.items():
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction {fraction} is outside [0, 1]")
        missing = [name for name in baseline if name not in scores]
        if missing:
            raise ValueError(f"fraction {fraction} has no score for evaluation set(s) {missing}")
        if within_threshold(baseline, scores, metric, threshold):
            best = max(best, fraction)
    return best


def within_threshold(
    baseline: Mapping[str, float], scores: Mapping[str, float], metric: str, threshold: float | None = None
) -> bool:
    """Whether a pruned model's scores stay within the threshold of the baseline's on every evaluation set.

    Args:
        baseline: Unpruned model's score per evaluation set name (none zero).
        scores: The pruned model's score per set (every baseline set present).
        metric: "wer" or "bleu".
        threshold: Overrides the metric's default threshold.

    Returns:
        delta_WER <= the threshold (or delta_BLEU >= it) on every set of `baseline`.
    """
    limit = _DEFAULT_THRESHOLDS[metric] if threshold is None else threshold
    return all(_meets_threshold(relative_change(scores[name], base), limit, metric) for name, base in baseline.items())


def bisect_depth(depths: Sequence[int], passes: Callable[[int], bool | None]) -> tuple[int | None, int | None]:
    """Binary search for the deepest pruning that passes, assuming degradation grows with depth.

    Assumes monotone outcomes: if a depth passes, every shallower one does. Then ceil(log2(len(depths) + 1))
    outcomes decide, instead of one per depth; where the curve is not monotone, the answer is a passing depth
    beyond which the depths looked at failed, not necessarily the deepest passing one (a sweep finds that).

    Args:
        depths: Candidate depths, shallowest (fewest layers removed) first.
        passes: The outcome of a depth: True (within the threshold), False, or None when not known yet.

    Returns:
        `(answer, needed)`: while an outcome is missing, `(None, depth)` names the one to get next; once decided,
        `(deepest passing depth, None)`, the answer None when even the shallowest fails.
    """
    low, high = -1, len(depths)  # depths[low] passes (-1: nothing removed), depths[high] fails (len: beyond all)
    while high - low > 1:
        middle = (low + high) // 2
        outcome = passes(depths[middle])
        if outcome is None:
            return None, depths[middle]
        low, high = (middle, high) if outcome else (low, middle)
    return (depths[low] if low >= 0 else None), None


def set_scores(metrics: Mapping[str, float], metric: str) -> dict[str, float]:
    """An evaluated cell's scores by set, from its `{set}.{metric}` metrics (`{"test-clean": 3.1}`)."""
    suffix = f".{metric}"
    return {key[: -len(suffix)]: value for key, value in metrics.items() if key.endswith(suffix)}


def format_percent(fraction: float) -> str:
    """A fraction of layers as the paper prints it: a percentage rounded half up to one decimal (1/16 -> "6.3").

    Python's own rounding (`f"{6.25:.1f}"` gives "6.2") rounds half to even; the paper rounds half up.
    The percentage is first rounded to 9 decimals, so that float noise (1/80 as 1.2499999...) does not
    decide the last digit.

    Args:
        fraction: A fraction in [0, 1], e.g. (n - 1) / m.

    Returns:
        The percentage with one decimal, e.g. "28.6" for 8/28.
    """
    percent = Decimal(f"{100 * fraction:.9f}")
    return str(percent.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


@lru_cache(maxsize=1)
def _normalizer() -> EnglishTextNormalizer:
    """Builds the Whisper English normaliser once, on first use.

    Returns:
        The shared normaliser instance.
    """
    return EnglishTextNormalizer()


def _check_lengths(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    """Checks that hypotheses and references are non-empty and aligned.

    Args:
        hypotheses: Model outputs.
        references: Ground truth, one per hypothesis.

    Raises:
        ValueError: If either is empty or their lengths differ.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"got {len(hypotheses)} hypotheses but {len(references)} references")
    if not references:
        raise ValueError("hypotheses and references are empty")


def _meets_threshold(delta: float, limit: float, metric: str) -> bool:
    """Tells whether a relative change is within the threshold for the metric.

    Args:
        delta: Relative change of the pruned score against the baseline.
        limit: Threshold on ``delta``.
        metric: "wer" (lower is better: delta must not exceed ``limit``) or "bleu" (higher is better: delta
            must not fall below ``limit``).

    Returns:
        True if ``delta`` meets the threshold.
    """
    if metric == "wer":
        return delta <= limit + _TOLERANCE
    return delta >= limit - _TOLERANCE
