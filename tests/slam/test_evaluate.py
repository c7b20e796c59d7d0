"""Evaluation: the scores are the corpus metrics of the kept hypotheses and references."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from slam.config import DecodeConfig, DecoderConfig, EncoderConfig, LoRAConfig, ProjectorConfig, SpeechLLMConfig
from slam.decode import greedy_decode
from slam.evaluate import evaluate
from slam.metrics import corpus_bleu, corpus_wer
from slam.model import build_speech_llm, load_speech_llm, save_speech_llm


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: np.ndarray
    text: str
    translation: str

    def target(self, task: str) -> str:
        return self.text if task == "asr" else self.translation


@pytest.fixture(scope="module")
def model(request, tmp_path_factory):
    qwen_dir = request.getfixturevalue("qwen_dir")
    wavlm_dir = request.getfixturevalue("wavlm_dir")
    torch.manual_seed(0)
    cfg = SpeechLLMConfig(EncoderConfig(str(wavlm_dir)), DecoderConfig(str(qwen_dir)), ProjectorConfig(hidden=32))
    return build_speech_llm(cfg)


@pytest.fixture(scope="module")
def utterances():
    rng = np.random.default_rng(0)
    texts = ["the river ran cold", "a cat sat on the mat", "she kept a diary", "tea", "the old clock struck nine"]
    return [
        Utterance(f"u{i}", 0.1 * rng.standard_normal(int(n)).astype(np.float32), t, t.upper())
        for i, (t, n) in enumerate(zip(texts, rng.integers(5_000, 20_000, size=len(texts))))
    ]


@pytest.mark.parametrize("task", ["asr", "ast"])
def test_scores_are_the_corpus_metrics_of_the_kept_texts(model, utterances, task):
    cfg = DecodeConfig(batch_size=2, max_new_tokens=6)
    result = evaluate(model, utterances, task, cfg)
    assert result.ids == [u.id for u in utterances]
    assert result.references == [u.target(task) for u in utterances]
    assert result.hypotheses == greedy_decode(model, [u.audio for u in utterances], cfg)
    assert result.num_samples == 5 and result.skipped == []
    if task == "asr":
        assert (result.metric, result.bleu) == ("wer", None)
        assert result.score == pytest.approx(100 * corpus_wer(result.hypotheses, result.references).wer)
        assert result.score > 50  # an untrained projector does not transcribe
    else:
        assert (result.metric, result.wer) == ("bleu", None)
        assert result.score == pytest.approx(corpus_bleu(result.hypotheses, result.references).bleu)
        assert "tok:13a" in result.bleu.signature


def test_evaluate_reads_skips_from_a_dataset(model, utterances):
    class Set:
        skipped: list[tuple[str, str]] = []

        def samples(self):
            self.skipped = [("bad.flac", "unreadable audio")]
            yield from utterances[:2]

    result = evaluate(model, Set(), "asr", DecodeConfig(max_new_tokens=3))
    assert result.ids == ["u0", "u1"] and result.skipped == [("bad.flac", "unreadable audio")]
    with pytest.raises(ValueError, match="task='mt'"):
        evaluate(model, utterances, "mt", DecodeConfig())


def test_a_reference_the_normaliser_empties_is_excluded_and_listed_not_an_error(model, utterances):
    # "Um." is a filler the Whisper normaliser removes: that utterance has no word to score.
    filler = Utterance("um", utterances[0].audio, "Um.", "UM.")
    cfg = DecodeConfig(batch_size=2, max_new_tokens=6)

    result = evaluate(model, [utterances[1], filler, utterances[2]], "asr", cfg)

    assert result.ids == ["u1", "um", "u2"] and result.excluded == ["um"]
    kept = [0, 2]
    expected = corpus_wer([result.hypotheses[i] for i in kept], [result.references[i] for i in kept])
    assert result.score == pytest.approx(100 * expected.wer)
    assert result.wer.num_ref_words == 6 + 4  # "a cat sat on the mat", "she kept a diary"


@pytest.mark.parametrize("lora", [None, LoRAConfig(rank=4, alpha=8)])
def test_saved_speech_llm_reloads_with_its_trained_weights(qwen_dir, wavlm_dir, tmp_path, utterances, lora):
    cfg = SpeechLLMConfig(
        EncoderConfig(str(wavlm_dir)), DecoderConfig(str(qwen_dir), lora=lora), ProjectorConfig(hidden=32), prompt="Hi."
    )
    torch.manual_seed(1)
    model = build_speech_llm(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)  # stand-in for training, LoRA B included
    save_speech_llm(model, cfg, tmp_path / "slam")
    torch.manual_seed(2)  # a different initialisation, overwritten by the load
    loaded, loaded_cfg = load_speech_llm(tmp_path / "slam")
    assert loaded_cfg == cfg
    waves, texts = [u.audio for u in utterances[:2]], [u.text for u in utterances[:2]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(waves, texts), model(waves, texts))
    (tmp_path / "slam" / "trained.safetensors").unlink()
    from slam.errors import BadInputError

    with pytest.raises(BadInputError, match="not a saved SpeechLLM"):
        load_speech_llm(tmp_path / "slam")
