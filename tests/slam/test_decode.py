"""Batched greedy decoding: equal to one-by-one decoding, stops at EOS or the token limit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slam.config import DecodeConfig, DecoderConfig, EncoderConfig, HealConfig, ProjectorConfig, SpeechLLMConfig
from slam.decode import greedy_decode, greedy_token_ids
from slam.healing import add_healing
from slam.pruning import drop_layers

LIMIT = 12


@pytest.fixture
def model(lm_dir, wavlm_dir):
    from slam.model import build_speech_llm

    torch.manual_seed(0)
    llm = build_speech_llm(
        SpeechLLMConfig(EncoderConfig(str(wavlm_dir)), DecoderConfig(str(lm_dir)), ProjectorConfig(hidden=32))
    )
    with torch.no_grad():  # sharper random weights, so greedy outputs vary across tokens and utterances
        for p in llm.decoder.parameters():
            if p.ndim >= 2:
                p.mul_(8.0)
    return llm


@pytest.fixture
def waves():
    rng = np.random.default_rng(0)
    return [0.1 * rng.standard_normal(n).astype(np.float32) for n in rng.integers(4_000, 24_000, size=7)]


def _one_by_one(model, waves, limit):
    return [greedy_token_ids(model, [w], DecodeConfig(batch_size=1, max_new_tokens=limit))[0] for w in waves]


def test_batched_equals_one_by_one_at_the_token_limit(model, waves):
    batched = greedy_token_ids(model, waves, DecodeConfig(batch_size=4, max_new_tokens=LIMIT))
    assert batched == _one_by_one(model, waves, LIMIT)
    assert all(len(ids) == LIMIT for ids in batched)
    assert len({tuple(ids) for ids in batched}) > 1  # the utterances really decode differently


def test_rows_stop_at_eos_and_leave_the_batch(model, waves):
    free = greedy_token_ids(model, waves, DecodeConfig(batch_size=8, max_new_tokens=LIMIT))
    # Make a token the model emits at different steps in different rows the EOS, so rows end unevenly.
    eos = max(
        {tok for ids in free for tok in ids},
        key=lambda tok: len({ids.index(tok) for ids in free if tok in ids}),
    )
    model.tokenizer.eos_token = model.tokenizer.convert_ids_to_tokens(eos)
    assert model.tokenizer.eos_token_id == eos
    batched = greedy_token_ids(model, waves, DecodeConfig(batch_size=8, max_new_tokens=LIMIT))
    expected = [ids[: ids.index(eos)] if eos in ids else ids for ids in free]
    assert batched == expected
    assert len({len(ids) for ids in batched}) > 1  # rows ended at different steps
    assert batched == _one_by_one(model, waves, LIMIT)


def test_pruned_and_healed_model_decodes_the_same_batched(model, waves):
    drop_layers(model.decoder, [3, 4])
    add_healing(model, 3, HealConfig("decoder+projector"))
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a healing adapter that changes the output
    batched = greedy_token_ids(model, waves, DecodeConfig(batch_size=3, max_new_tokens=LIMIT))
    assert batched == _one_by_one(model, waves, LIMIT)


def test_decode_returns_text_in_input_order_and_restores_train_mode(model, waves):
    model.train()
    texts = greedy_decode(model, waves, DecodeConfig(batch_size=3, max_new_tokens=LIMIT))
    ids = _one_by_one(model, waves, LIMIT)
    assert texts == [model.tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]
    assert model.training and model.projector.training
