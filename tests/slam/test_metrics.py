"""Tests for slam.metrics: normalised corpus WER, corpus BLEU and the removable fraction from the paper."""

import math
from decimal import ROUND_HALF_UP, Decimal

import jiwer
import pytest
import sacrebleu

from slam.metrics import (
    BLEU_THRESHOLD,
    WER_THRESHOLD,
    BLEUResult,
    WERResult,
    bisect_depth,
    corpus_bleu,
    corpus_wer,
    format_percent,
    normalize_english,
    relative_change,
    removable_fraction,
    within_threshold,
)

LIBRISPEECH_SETS = ("test-clean", "test-other", "loquacious")

# Table 1 of the paper: baseline WERs, WERs of the pruned model, layers removed and decoder depth, and the
# reported removable percentage.
TABLE_1 = {
    "Qwen2.5-7B": ((2.01, 4.77, 12.21), (2.36, 4.83, 14.91), 8, 28, 28.6),
    "Qwen2.5-7B+LoRA": ((1.70, 3.56, 10.99), (2.02, 4.26, 13.01), 5, 28, 17.9),
    "Qwen2.5-3B": ((2.22, 4.83, 17.24), (2.53, 5.12, 16.69), 11, 36, 30.6),
    "Qwen2.5-1.5B": ((2.59, 5.05, 16.94), (2.83, 5.97, 19.79), 7, 28, 25.0),
    "Llama-3.1-8B": ((2.65, 5.03, 20.50), (3.28, 6.28, 18.92), 14, 32, 43.8),
    "Llama-3.2-3B": ((2.25, 5.30, 25.47), (2.71, 6.32, 25.72), 11, 28, 39.3),
    "Llama-3.2-1B": ((2.61, 5.52, 28.05), (2.73, 6.28, 32.05), 1, 16, 6.3),
}

# Table 2 of the paper: BLEU of the unpruned model and after removing 3, 6, 9 and 12 of 28 layers.
TABLE_2_BASELINE = {"fr-en": 39.03, "en-de": 27.66}
TABLE_2_PRUNED = {
    3 / 28: {"fr-en": 37.23, "en-de": 27.46},
    6 / 28: {"fr-en": 36.09, "en-de": 25.57},
    9 / 28: {"fr-en": 36.12, "en-de": 25.40},
    12 / 28: {"fr-en": 32.87, "en-de": 17.08},
}


def test_normalize_english_handles_numbers_punctuation_case_and_spelling():
    assert normalize_english("The colour is twenty-five.") == "the color is 25"
    assert normalize_english("HELLO, World!") == "hello world"


def test_corpus_wer_applies_whisper_normaliser():
    hypotheses = ["The colour is twenty-five."]
    references = ["the color is 25"]

    assert corpus_wer(hypotheses, references).wer == 0.0
    assert corpus_wer(hypotheses, references, normalize=False).wer > 0.0


def test_corpus_wer_is_corpus_level_not_mean_of_utterances():
    hypotheses = ["the quick brown fox jumped over the lazy dog", "Hello."]
    references = ["The quick brown fox jumps over the lazy dog.", "Hello there!"]
    normalised_hyps = [normalize_english(h) for h in hypotheses]
    normalised_refs = [normalize_english(r) for r in references]

    result = corpus_wer(hypotheses, references)

    assert result.wer == pytest.approx(jiwer.wer(normalised_refs, normalised_hyps))
    assert result.wer == pytest.approx(2 / 11)
    per_utterance_mean = sum(jiwer.wer(r, h) for r, h in zip(normalised_refs, normalised_hyps)) / 2
    assert per_utterance_mean == pytest.approx((1 / 9 + 1 / 2) / 2)
    assert result.wer != pytest.approx(per_utterance_mean)


def test_corpus_wer_hand_counted_edit_operations():
    # "sat" -> "sit" is a substitution, the second "the" is deleted, "big" is inserted.
    hypotheses = ["the cat sit on mat", "hello big world"]
    references = ["the cat sat on the mat", "hello world"]

    result = corpus_wer(hypotheses, references, normalize=False)

    assert result == WERResult(
        wer=pytest.approx(3 / 8), substitutions=1, deletions=1, insertions=1, hits=6, num_ref_words=8
    )


def test_corpus_wer_empty_hypothesis_counts_all_deletions():
    result = corpus_wer(["", "a b"], ["a b c", "a b"])

    assert result.deletions == 3
    assert result.wer == pytest.approx(3 / 5)


def test_corpus_wer_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_wer(["a", "b"], ["a"])


def test_corpus_wer_rejects_empty_input():
    with pytest.raises(ValueError, match="empty"):
        corpus_wer([], [])


def test_corpus_wer_excludes_a_reference_empty_after_normalisation_and_lists_it():
    # The Whisper normaliser drops filler words, so "Um." normalises to the empty string: the utterance has no
    # word to recognise, so it leaves the score (its hypothesis "uh huh" adds no insertion) and is listed.
    result = corpus_wer(["a b", "uh huh", "c x"], ["a b", "Um.", "c d"])

    assert result.excluded == (1,)
    assert (result.num_ref_words, result.substitutions, result.insertions) == (4, 1, 0)
    assert result.wer == pytest.approx(1 / 4)
    without = corpus_wer(["a b", "c x"], ["a b", "c d"])
    assert (result.wer, result.hits, result.deletions) == (without.wer, without.hits, without.deletions)


def test_corpus_wer_excludes_an_empty_reference_without_normalisation():
    result = corpus_wer(["a", "b"], ["  ", "b"], normalize=False)

    assert (result.excluded, result.wer, result.num_ref_words) == ((0,), 0.0, 1)


def test_corpus_wer_rejects_a_corpus_whose_every_reference_is_empty():
    with pytest.raises(ValueError, match="every one of the 2 references is empty after normalisation"):
        corpus_wer(["um", "a"], ["Um.", "Uh!"])


@pytest.mark.parametrize("model", list(TABLE_1))
def test_format_percent_prints_every_table_1_fraction_as_the_paper(model):
    _, _, removed, depth, percentage = TABLE_1[model]

    assert format_percent(removed / depth) == f"{percentage:.1f}"


@pytest.mark.parametrize(("fraction", "text"), [(1 / 16, "6.3"), (1 / 80, "1.3"), (3 / 16, "18.8"), (0.0, "0.0"),
                                                (1.0, "100.0"), (1 / 32, "3.1"), (2 / 7, "28.6")])  # fmt: skip
def test_format_percent_rounds_half_up(fraction, text):
    assert format_percent(fraction) == text


def test_corpus_bleu_matches_sacrebleu():
    hypotheses = ["the cat sat on a mat today", "a dog barked loudly at the postman"]
    references = ["the cat sat on the mat today", "the dog barked loudly at the mailman"]

    result = corpus_bleu(hypotheses, references)

    assert isinstance(result, BLEUResult)
    assert result.bleu == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)
    assert 0.0 < result.bleu < 100.0
    assert "tok:13a" in result.signature


def test_corpus_bleu_perfect_match_is_100():
    sentences = ["the quick brown fox jumps over the lazy dog", "all work and no play makes jack a dull boy"]

    assert corpus_bleu(sentences, sentences).bleu == pytest.approx(100.0)


def test_corpus_bleu_signature_records_tokeniser():
    assert "tok:intl" in corpus_bleu(["a b c d"], ["a b c d"], tokenize="intl").signature


def test_corpus_bleu_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="1 hypotheses but 2 references"):
        corpus_bleu(["a"], ["a", "b"])


def test_relative_change():
    assert relative_change(2.5, 2.0) == pytest.approx(0.25)
    assert relative_change(36.0, 40.0) == pytest.approx(-0.10)


def test_relative_change_rejects_zero_baseline():
    with pytest.raises(ValueError, match="baseline"):
        relative_change(1.0, 0.0)


def test_thresholds_match_paper():
    assert WER_THRESHOLD == 0.25
    assert BLEU_THRESHOLD == -0.10


@pytest.mark.parametrize("pair", ["fr-en", "en-de"])
def test_removable_fraction_table_2_per_pair(pair):
    baseline = {pair: TABLE_2_BASELINE[pair]}
    pruned = {fraction: {pair: scores[pair]} for fraction, scores in TABLE_2_PRUNED.items()}

    fraction = removable_fraction(baseline, pruned, "bleu")

    assert fraction == pytest.approx(9 / 28)
    assert round(100 * fraction, 1) == 32.1


def test_removable_fraction_table_2_joint():
    fraction = removable_fraction(TABLE_2_BASELINE, TABLE_2_PRUNED, "bleu")

    assert fraction == pytest.approx(9 / 28)
    assert round(100 * fraction, 1) == 32.1


@pytest.mark.parametrize("model", list(TABLE_1))
def test_removable_fraction_table_1(model):
    baseline_wers, pruned_wers, removed, depth, percentage = TABLE_1[model]
    baseline = dict(zip(LIBRISPEECH_SETS, baseline_wers))
    pruned = {removed / depth: dict(zip(LIBRISPEECH_SETS, pruned_wers))}

    fraction = removable_fraction(baseline, pruned, "wer")

    assert fraction == pytest.approx(removed / depth)
    assert _round_half_up(100 * fraction) == percentage


def test_removable_fraction_non_monotone_curve_returns_largest_passing():
    baseline = {"clean": 2.0}
    pruned = {0.1: {"clean": 2.1}, 0.2: {"clean": 3.0}, 0.3: {"clean": 2.4}, 0.4: {"clean": 4.0}}

    assert removable_fraction(baseline, pruned, "wer") == pytest.approx(0.3)


def test_removable_fraction_one_failing_set_blocks_fraction():
    baseline = {"clean": 2.0, "other": 5.0}
    pruned = {0.1: {"clean": 2.1, "other": 5.1}, 0.2: {"clean": 2.1, "other": 7.0}}

    assert removable_fraction(baseline, pruned, "wer") == pytest.approx(0.1)


def test_removable_fraction_threshold_is_inclusive():
    # (3.0 - 2.4) / 2.4 is 0.25 up to float rounding; a score exactly on the threshold passes.
    assert removable_fraction({"clean": 2.4}, {0.5: {"clean": 3.0}}, "wer") == 0.5
    assert removable_fraction({"fr-en": 30.0}, {0.5: {"fr-en": 27.0}}, "bleu") == 0.5


def test_removable_fraction_no_passing_fraction_returns_zero():
    baseline = {"fr-en": 30.0}
    pruned = {0.1: {"fr-en": 20.0}, 0.2: {"fr-en": 10.0}}

    assert removable_fraction(baseline, pruned, "bleu") == 0.0


def test_removable_fraction_threshold_override():
    baseline = {"clean": 2.0}
    pruned = {0.1: {"clean": 2.1}, 0.2: {"clean": 2.4}}

    assert removable_fraction(baseline, pruned, "wer") == pytest.approx(0.2)
    assert removable_fraction(baseline, pruned, "wer", threshold=0.1) == pytest.approx(0.1)


def test_removable_fraction_missing_set_raises():
    baseline = {"clean": 2.0, "other": 5.0}
    pruned = {0.25: {"clean": 2.1}}

    with pytest.raises(ValueError, match=r"fraction 0\.25 .*other"):
        removable_fraction(baseline, pruned, "wer")


def test_removable_fraction_unknown_metric_raises():
    with pytest.raises(ValueError, match="'bleu', 'wer'"):
        removable_fraction({"clean": 2.0}, {0.1: {"clean": 2.0}}, "cer")


def test_removable_fraction_rejects_empty_baseline():
    with pytest.raises(ValueError, match="baseline"):
        removable_fraction({}, {0.1: {"clean": 2.0}}, "wer")


def test_removable_fraction_rejects_fraction_outside_unit_interval():
    with pytest.raises(ValueError, match="outside"):
        removable_fraction({"clean": 2.0}, {8: {"clean": 2.0}}, "wer")


def _round_half_up(value: float) -> float:
    """Rounds to one decimal half-up, as the paper reports 1/16 = 6.25% as 6.3% (Python's round gives 6.2)."""
    return float(Decimal(str(value)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


@pytest.mark.parametrize("deepest", [None, *range(2, 32)])
def test_bisect_finds_the_sweeps_answer_on_a_32_layer_curve_in_log2_steps(deepest):
    depths = list(range(2, 32))  # n = 2..m-1 for m = 32
    baseline = {"test": 10.0}
    last = 1 if deepest is None else deepest  # a monotone curve whose deepest passing depth is `deepest`
    scores = {n: {"test": 10.0 * (1.2 if n <= last else 1.3)} for n in depths}
    asked = []

    def passes(n):
        asked.append(n)
        return within_threshold(baseline, scores[n], "wer")

    answer, needed = bisect_depth(depths, passes)
    sweep = removable_fraction(baseline, {(n - 1) / 32: scores[n] for n in depths}, "wer")
    assert needed is None and answer == deepest
    assert sweep == ((deepest - 1) / 32 if deepest else 0.0)
    assert len(asked) <= 5 == math.ceil(math.log2(len(depths) + 1))


def test_bisect_names_the_depth_it_needs_next():
    depths = list(range(2, 18))
    assert bisect_depth(depths, lambda n: None) == (None, 9)  # the middle first
    assert bisect_depth(depths, {9: True}.get) == (None, 13)  # 9 passes: the deeper half
    assert bisect_depth(depths, {9: False}.get) == (None, 5)  # 9 fails: the shallower half
    assert bisect_depth([], lambda n: None) == (None, None)
