"""The shipped demo world: its text, audio and backbones are what `slam.demo` builds, and the SLAM recipe learns on it.

The slow test trains the projector exactly as `experiments/demo.yaml` does and checks the baseline targets.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from slam import demo
from slam.config import (
    DataConfig,
    DecodeConfig,
    DecoderConfig,
    DistanceConfig,
    EncoderConfig,
    ProjectorConfig,
    SpeechLLMConfig,
    TrainConfig,
    from_dict,
)
from slam.data import load_dataset
from slam.evaluate import evaluate
from slam.metrics import corpus_wer
from slam.model import build_speech_llm, decoder_stack, load_decoder
from slam.redundancy import pruning_path, text_layer_distances
from slam.train import train

DEMO_DIR = demo.DEMO_DIR
REPO = DEMO_DIR.parents[1]


@pytest.fixture(scope="module")
def rows() -> list[demo.Sentence]:
    return demo.read_sentences(DEMO_DIR / "sentences.tsv")


def test_the_shipped_sentences_are_the_seeded_grammar_draw(rows):
    assert rows == demo.generate_sentences(demo.TextConfig())


def test_splits_hold_unseen_sentences_of_seen_words(rows):
    by_split = {split: [row.english for row in rows if row.split == split] for split in demo.SPLITS}
    assert {split: len(texts) for split, texts in by_split.items()} == {"train": 380, "dev": 40, "test": 300}
    assert len({row.english for row in rows}) == len(rows)
    train_words = {word for text in by_split["train"] for word in text.split()}
    for text in by_split["dev"] + by_split["test"]:
        assert set(text.split()) <= train_words, text
    assert all(4 <= len(row.english.split()) <= 8 for row in rows)
    assert [row.id for row in rows if row.split == "test"][:2] == ["test-0001", "test-0002"]


def test_the_lm_never_learnt_a_dev_or_test_sentence_and_the_added_test_sentences_left_its_text_as_it_was(rows):
    lm = demo.DecoderTrainConfig()
    learnt = demo.draw_extra_sentences(lm.extra_sentences, [row.english for row in rows], lm.seed)
    held_out = {row.english for row in rows if row.split != "train"}
    assert not held_out & set(learnt)
    # `train_decoder` draws its text excluding every corpus sentence; without the 240 test sentences added after
    # the LM was built it draws the same text, so the shipped LM is still what the builder makes.
    first = [row.english for row in rows if row.split != "test" or int(row.id.split("-")[1]) <= demo.TextConfig().test]
    assert len(first) == 480
    assert demo.draw_extra_sentences(lm.extra_sentences, first, lm.seed) == learnt


def test_toy_is_a_dictionary_with_adjectives_after_their_noun(rows):
    toy = demo.toy_dictionary()
    assert len(set(toy.values())) == len(toy) == sum(len(words) for words in demo.LEXICON.values())
    assert not set(toy.values()) & set(toy)
    assert demo.translate("the green dog sleeps") == " ".join(toy[w] for w in ("the", "dog", "green", "sleeps"))
    assert demo.translate("my cat sits in the old garden") == " ".join(
        toy[w] for w in ("my", "cat", "sits", "in", "the", "garden", "old")
    )
    assert all(row.toy == demo.translate(row.english) for row in rows)
    with pytest.raises(ValueError, match="'zebra' .* is not a word of the demo lexicon"):
        demo.translate("the zebra runs")


def test_the_manifests_list_every_sentence_with_its_audio(rows):
    for split in demo.SPLITS:
        lines = [json.loads(line) for line in (DEMO_DIR / f"{split}.jsonl").read_text().splitlines()]
        expected = [row for row in rows if row.split == split]
        assert [line["id"] for line in lines] == [row.id for row in expected]
        for line, row in zip(lines, expected):
            assert line == {
                "id": row.id,
                "audio": f"audio/{row.id}.flac",
                "text": row.english,
                "translation": row.toy,
                "language": "en",
            }
    assert sorted(p.name for p in (DEMO_DIR / "audio").iterdir()) == sorted(f"{row.id}.flac" for row in rows)


def test_the_audio_is_16k_mono_flac_within_its_budget(rows):
    total = 0
    step = 2 ** (16 - demo.AUDIO_BITS)
    for row in rows:
        path = DEMO_DIR / "audio" / f"{row.id}.flac"
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.format, info.subtype) == (16_000, 1, "FLAC", "PCM_16")
        assert 0.8 <= info.duration <= 6.0, (row.id, info.duration)
        samples, _ = sf.read(path, dtype="int16")
        assert np.all(samples % step == 0) and np.abs(samples).max() > 0.8 * 32767
        total += path.stat().st_size
    assert total <= demo.AudioConfig().max_bytes


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_espeak_reproduces_the_shipped_audio(rows, tmp_path):
    for row in (rows[0], rows[-1]):
        seconds = demo.synthesise_utterance(row, tmp_path / f"{row.id}.flac", demo.AudioConfig())
        again, _ = sf.read(tmp_path / f"{row.id}.flac", dtype="int16")
        shipped, _ = sf.read(DEMO_DIR / "audio" / f"{row.id}.flac", dtype="int16")
        np.testing.assert_array_equal(again, shipped)
        assert seconds == len(shipped) / 16_000


def test_the_backbones_load_passed_their_gates_and_fit_the_budget():
    models = DEMO_DIR / "models"
    size = sum(p.stat().st_size for p in models.rglob("*") if p.is_file())
    assert size <= 20_000_000
    for name, limits in (("encoder", {"dev_cer": demo.MAX_ENCODER_DEV_CER}), ("decoder", {})):
        record = json.loads((models / name / "demo_pretraining.json").read_text())
        assert record["gate"]["passed"] is True
        for key, limit in limits.items():
            assert record["gate"]["metrics"][key] <= limit
    model = build_speech_llm(_speech_llm_config("asr"))
    assert len(decoder_stack(model.decoder).layers) == 8
    assert model.encoder.model.config.hidden_size == demo.EncoderTrainConfig().hidden
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert not any(p.requires_grad for p in model.decoder.parameters())


def test_the_two_block_conventions_pick_different_blocks_on_the_demo_decoder():
    decoder, tokenizer = load_decoder(DecoderConfig(str(DEMO_DIR / "models" / "decoder")))
    texts = load_dataset(DataConfig(source="manifest", path=str(DEMO_DIR / "dev.jsonl"))).texts()
    distance = text_layer_distances(decoder, tokenizer, texts, DistanceConfig()).distance
    paper = {len(step.removed): step.removed for step in pruning_path(distance, "paper")}
    gromov = {len(step.removed): step.removed for step in pruning_path(distance, "gromov")}
    assert sorted(paper) == sorted(gromov) == [1, 2, 3, 4, 5, 6]
    # At equal numbers of removed layers (as the README says), and gromov alone removes the last layer.
    assert [count for count in paper if paper[count] != gromov[count]] == [2, 5, 6]
    assert 8 in gromov[6] and all(8 not in removed for removed in paper.values())


def test_builder_configs_name_the_bad_field():
    with pytest.raises(ValueError, match="text.dev=0 is not allowed"):
        demo.TextConfig(dev=0)
    with pytest.raises(ValueError, match="encoder.heads=3 is not allowed: expected a divisor of encoder.hidden"):
        demo.EncoderTrainConfig(heads=3)
    with pytest.raises(ValueError, match="decoder.task_fraction=1.5"):
        demo.DecoderTrainConfig(task_fraction=1.5)


def test_demo_recipe_smoke_projector_learns_and_decodes():
    """The demo recipe in small: 40 projector steps on 16 utterances lower the loss; 4 test utterances decode."""
    torch.manual_seed(0)
    model = build_speech_llm(_speech_llm_config("asr"))
    data = load_dataset(DataConfig(source="manifest", path=str(DEMO_DIR / "train.jsonl"), max_samples=16))
    result = train(model, data, TrainConfig(steps=40, batch_size=4, task="asr", lr=2e-3))
    assert np.mean(result.losses[-10:]) < 0.8 * np.mean(result.losses[:10])
    test = load_dataset(DataConfig(source="manifest", path=str(DEMO_DIR / "test.jsonl"), max_samples=4))
    scored = evaluate(model, test, "asr", DecodeConfig(batch_size=4, max_new_tokens=20))
    assert scored.num_samples == 4 and all(scored.hypotheses)
    assert scored.score == pytest.approx(100 * corpus_wer(scored.hypotheses, scored.references).wer)


@pytest.mark.slow
@pytest.mark.parametrize(("task", "limit"), [("asr", 30.0), ("ast", 20.0)])
def test_projector_only_slam_reaches_the_demo_baseline(task, limit):
    """`experiments/demo.yaml`'s training: WER <= 30% (ASR) and BLEU >= 20 (AST) on the demo test split."""
    doc = yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text())
    train_cfg = replace(from_dict(TrainConfig, doc["defaults"]["train"], "train"), task=task)
    projector = from_dict(ProjectorConfig, doc["defaults"]["projector"], "projector")
    torch.manual_seed(train_cfg.seed)
    model = build_speech_llm(replace(_speech_llm_config(task), projector=projector))
    train(model, load_dataset(DataConfig(source="manifest", path=str(DEMO_DIR / "train.jsonl"))), train_cfg)
    test = load_dataset(DataConfig(source="manifest", path=str(DEMO_DIR / "test.jsonl")))
    scored = evaluate(model, test, task, from_dict(DecodeConfig, doc["defaults"]["decode"], "decode"))
    if task == "asr":
        assert scored.score <= limit
    else:
        assert scored.score >= limit


def _speech_llm_config(task: str) -> SpeechLLMConfig:
    prompt = demo.ASR_PROMPT if task == "asr" else demo.AST_PROMPT
    return SpeechLLMConfig(
        encoder=EncoderConfig(name=str(DEMO_DIR / "models" / "encoder"), kind="wavlm"),
        decoder=DecoderConfig(name=str(DEMO_DIR / "models" / "decoder")),
        projector=ProjectorConfig(stack=5, hidden=256),
        prompt=prompt,
    )
