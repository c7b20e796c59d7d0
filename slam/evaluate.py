"""ASR and AST evaluation: greedy hypotheses for an evaluation set, scored by corpus WER or BLEU.

Evaluation returns numbers and the texts behind them; it never logs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from slam.config import TASKS, DecodeConfig
from slam.decode import DecodeStats, greedy_decode
from slam.metrics import BLEUResult, WERResult, corpus_bleu, corpus_wer
from slam.model import SpeechLLM

BLOCK_BATCHES = 8
"""Samples are read in blocks of this many batches and sorted by length inside a block, bounding memory."""


@dataclass
class EvalResult:
    """Scores of one model on one evaluation set.

    Attributes:
        task: `asr` or `ast`.
        metric: `wer` (ASR) or `bleu` (AST).
        score: WER in percent (as in the paper's tables) or BLEU on sacrebleu's 0-100 scale.
        ids: Sample ids, in set order.
        hypotheses: Greedy hypotheses, aligned with `ids`.
        references: References (transcripts or translations), aligned with `ids`.
        skipped: (where, reason) of samples left out under `on_bad_sample: skip`.
        excluded: Ids of the decoded samples left out of the WER because their reference is empty after
            normalisation (`slam.metrics.corpus_wer`); always empty for BLEU.
        wer: The corpus WER details (ASR).
        bleu: The corpus BLEU details and signature (AST).
        decode: Where decoding's time went and the tokens it generated (its throughput).
    """

    task: str
    metric: str
    score: float
    ids: list[str]
    hypotheses: list[str]
    references: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    wer: WERResult | None = None
    bleu: BLEUResult | None = None
    decode: DecodeStats = field(default_factory=DecodeStats)

    @property
    def num_samples(self) -> int:
        """Samples decoded (those `excluded` from the WER included)."""
        return len(self.ids)


def evaluate(model: SpeechLLM, samples: Iterable, task: str, cfg: DecodeConfig) -> EvalResult:
    """Decode an evaluation set greedily and score it.

    Args:
        model: The SpeechLLM to evaluate.
        samples: The set: a `SpeechDataset` (its `samples()` stream is used, which applies its
            bad-sample policy and records skips) or any iterable of samples with `.id`, `.audio` and
            `.target(task)`.
        task: `asr` (WER against transcripts) or `ast` (BLEU against translations).
        cfg: Decoding settings.

    Returns:
        The score with hypotheses and references.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not allowed: expected one of {', '.join(TASKS)}")
    stream = samples.samples() if hasattr(samples, "samples") else iter(samples)
    ids, hypotheses, references = [], [], []
    block: list = []
    stats = DecodeStats()

    def flush() -> None:
        hypotheses.extend(greedy_decode(model, [s.audio for s in block], cfg, stats))
        ids.extend(s.id for s in block)
        references.extend(s.target(task) for s in block)
        block.clear()

    for sample in stream:
        block.append(sample)
        if len(block) == cfg.batch_size * BLOCK_BATCHES:
            flush()
    if block:
        flush()
    skipped = list(getattr(samples, "skipped", []))
    if task == "asr":
        wer = corpus_wer(hypotheses, references)
        excluded = [ids[index] for index in wer.excluded]
        return EvalResult(
            task, "wer", 100.0 * wer.wer, ids, hypotheses, references, skipped, excluded, wer=wer, decode=stats
        )
    bleu = corpus_bleu(hypotheses, references)
    return EvalResult(task, "bleu", bleu.bleu, ids, hypotheses, references, skipped, bleu=bleu, decode=stats)
