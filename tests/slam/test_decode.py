"""Batched greedy decoding: equal to one-by-one decoding, stops at EOS or the token limit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slam.config import DecodeConfig, DecoderConfig, EncoderConfig, HealConfig, ProjectorConfig, SpeechLLMConfig
from slam.decode import DecodeStats, greedy_decode, greedy_token_ids
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

    # The tokens generated: each hypothesis's, plus the EOS of each row that stopped before the limit.
    stats = DecodeStats()
    greedy_token_ids(model, waves[:3], DecodeConfig(batch_size=2, max_new_tokens=LIMIT), stats)
    greedy_token_ids(model, waves[3:], DecodeConfig(batch_size=2, max_new_tokens=LIMIT), stats)
    assert stats.tokens == sum(len(ids) + (len(ids) < LIMIT) for ids in batched)
    assert stats.encode_seconds > 0 and stats.decode_seconds > 0
    assert stats.tokens_per_second == stats.tokens / stats.decode_seconds


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


def test_own_masks_match_the_masks_transformers_builds(model, waves, monkeypatch):
    import slam.decode as decode

    inputs = model.decoder_inputs(waves[:5], None, "left")
    assert not bool(inputs.attention_mask.bool().all())  # the batch is padded
    with torch.no_grad():
        own_logits = decode.prefill(model.decoder, inputs)[0]
        own = decode.greedy_from_inputs(model.decoder, inputs, eos_id=-1, max_new_tokens=LIMIT)
        monkeypatch.setattr(decode, "_builds_own_masks", lambda config: False)
        hf_logits = decode.prefill(model.decoder, inputs)[0]
        hf = decode.greedy_from_inputs(model.decoder, inputs, eos_id=-1, max_new_tokens=LIMIT)
    assert torch.isfinite(own_logits).all()
    torch.testing.assert_close(own_logits, hf_logits, rtol=1e-5, atol=1e-5)
    assert own == hf


def test_eager_attention_decodes_through_the_padding_mask(model, waves):
    from slam.decode import _builds_own_masks
    from slam.model import decoder_stack

    model.decoder.set_attn_implementation("eager")
    assert not _builds_own_masks(decoder_stack(model.decoder).config)
    batched = greedy_token_ids(model, waves, DecodeConfig(batch_size=4, max_new_tokens=LIMIT))
    assert batched == _one_by_one(model, waves, LIMIT)


def test_sliding_window_layers_get_the_masks_transformers_builds():
    from transformers import Qwen2Config

    from slam.decode import _builds_own_masks

    full = Qwen2Config(num_hidden_layers=2)
    sliding = Qwen2Config(num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"])
    for config in (full, sliding):
        config._attn_implementation = "sdpa"
    assert _builds_own_masks(full)
    assert not _builds_own_masks(sliding)


def test_reserved_cache_equals_a_concatenating_cache():
    from transformers.cache_utils import DynamicLayer

    from slam.decode import _ReservedLayer

    torch.manual_seed(0)
    reserved, plain = _ReservedLayer(room=2), DynamicLayer()
    chunks = [torch.randn(3, 2, n, 4) for n in (5, 1, 1, 1, 1)]  # the last two steps pass the reserve
    for i, chunk in enumerate(chunks):
        if i == 2:  # a row finished: both keep rows 0 and 2
            for layer in (reserved, plain):
                layer.batch_select_indices(torch.tensor([0, 2]))
        chunk = chunk if i < 2 else chunk[[0, 2]]
        got = reserved.update(chunk, -chunk)
        want = plain.update(chunk, -chunk)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert reserved.get_seq_length() == plain.get_seq_length()
    assert reserved.get_seq_length() == 9
    assert reserved._keys.shape[-2] >= 9  # it grew past the reserve of 5 + 2
