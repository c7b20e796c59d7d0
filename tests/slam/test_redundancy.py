"""Distance matrix and optimal pruning path: every convention of DESIGN section 2 pinned by a test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from slam.config import DecoderConfig, DistanceConfig, EncoderConfig, ProjectorConfig, SpeechLLMConfig
from slam.errors import BadInputError
from slam.model import build_speech_llm, load_decoder
from slam.redundancy import (
    SPEECH_TOKEN,
    TEXT_TOKEN,
    angular_distance_matrix,
    depth_range,
    layer_distances,
    path_agreement,
    path_report,
    pruning_path,
    speech_layer_distances,
    text_layer_distances,
)

ATOL = 1e-5


class IdentityLayer(nn.Module):
    """A decoder layer that returns its input unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@pytest.fixture
def lm(lm_dir):
    return load_decoder(DecoderConfig(str(lm_dir)))


def test_identity_layers_give_zero_distance_across_their_block(lm, sentences):
    decoder, tokenizer = lm
    decoder.model.layers[2] = IdentityLayer()  # layer 3 (1-based)
    decoder.model.layers[3] = IdentityLayer()  # layer 4
    result = text_layer_distances(decoder, tokenizer, sentences[:6], DistanceConfig(batch_size=3))
    d = result.distance
    assert d[2, 3] == 0.0 and d[3, 4] == 0.0 and d[2, 4] == 0.0  # h_2 = h_3 = h_4 exactly
    assert d[1, 2] > 0.01 and d[4, 5] > 0.01
    assert (result.per_sample[:, 2, 4] == 0.0).all()


def test_hand_computed_two_sample_example():
    states = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]],
            [[3.0, 4.0, 0.0], [-3.0, -4.0, 0.0], [0.0, 1.0, 1.0]],
        ]
    )
    per_sample = angular_distance_matrix(states).numpy()
    expected = np.zeros((2, 3, 3))
    for s in range(2):
        for i in range(3):
            for j in range(3):
                a, b = states[s, i].double().numpy(), states[s, j].double().numpy()
                cos = np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1.0, 1.0)
                expected[s, i, j] = math.acos(cos) / math.pi
    np.testing.assert_allclose(per_sample, expected, atol=1e-6)
    assert per_sample[0, 0, 1] == pytest.approx(0.25, abs=1e-6)  # 45 degrees
    assert per_sample[1, 0, 1] == pytest.approx(1.0, abs=1e-6)  # opposite vectors
    assert per_sample[0, 0, 2] == pytest.approx(0.5, abs=1e-6)  # orthogonal
    np.testing.assert_allclose(per_sample.mean(axis=0)[0, 1], (0.25 + 1.0) / 2, atol=1e-6)


def test_matrix_is_symmetric_with_zero_diagonal_and_mean_of_samples(lm, sentences):
    decoder, tokenizer = lm
    result = text_layer_distances(decoder, tokenizer, sentences[:5], DistanceConfig(batch_size=2))
    m = decoder.config.num_hidden_layers
    assert result.distance.shape == (m + 1, m + 1)
    assert result.per_sample.shape == (5, m + 1, m + 1)
    assert np.array_equal(result.distance, result.distance.T)
    assert np.all(np.diag(result.distance) == 0.0)
    assert np.all((result.distance >= 0) & (result.distance <= 1))
    np.testing.assert_allclose(result.distance, result.per_sample.astype(np.float64).mean(axis=0), atol=1e-12)


def test_left_and_right_padding_give_the_same_matrix(lm, sentences):
    decoder, tokenizer = lm
    texts = [sentences[0], "a cat", sentences[5] + " " + sentences[6]]  # very different lengths
    cfg = DistanceConfig(batch_size=3)
    tokenizer.padding_side = "right"
    right = text_layer_distances(decoder, tokenizer, texts, cfg)
    tokenizer.padding_side = "left"
    left = text_layer_distances(decoder, tokenizer, texts, cfg)
    np.testing.assert_allclose(left.per_sample, right.per_sample, atol=ATOL)
    assert right.per_sample[1, 0, -1] != pytest.approx(right.per_sample[0, 0, -1], abs=1e-3)


@pytest.mark.parametrize("batch_size", [2, 5])
def test_batch_size_does_not_change_the_matrix(lm, sentences, batch_size):
    decoder, tokenizer = lm
    texts = sentences[:5] + ["tea", "the old man told stories about the war and the sea"]
    alone = text_layer_distances(decoder, tokenizer, texts, DistanceConfig(batch_size=1))
    batched = text_layer_distances(decoder, tokenizer, texts, DistanceConfig(batch_size=batch_size))
    np.testing.assert_allclose(batched.per_sample, alone.per_sample, atol=ATOL)


def test_last_layer_state_is_taken_before_the_final_norm(lm, sentences):
    decoder, tokenizer = lm
    cfg = DistanceConfig(batch_size=4)
    before = text_layer_distances(decoder, tokenizer, sentences[:4], cfg).distance
    with torch.no_grad():
        torch.manual_seed(0)
        decoder.model.norm.weight.mul_(torch.rand_like(decoder.model.norm.weight) * 4 + 0.1)
    after = text_layer_distances(decoder, tokenizer, sentences[:4], cfg).distance
    np.testing.assert_array_equal(before, after)
    # HF's hidden_states[-1] is after the final norm, so it moves with the norm weights.
    tokens = tokenizer(sentences[:1], return_tensors="pt")
    with torch.no_grad():
        normed = decoder(**tokens, output_hidden_states=True).hidden_states[-1][0, -1]
        first = decoder(**tokens, output_hidden_states=True).hidden_states[0][0, -1]
    hf_d0m = angular_distance_matrix(torch.stack([first, normed])[None])[0, 0, 1].item()
    ours = text_layer_distances(decoder, tokenizer, sentences[:1], cfg).distance[0, -1]
    assert abs(hf_d0m - ours) > 1e-3


def test_states_match_hf_hidden_states_for_inner_layers(lm, sentences):
    decoder, tokenizer = lm
    tokens = tokenizer(sentences[:1], return_tensors="pt")
    with torch.no_grad():
        hidden = decoder(**tokens, output_hidden_states=True).hidden_states
    m = decoder.config.num_hidden_layers
    states = torch.stack([hidden[i][0, -1] for i in range(m)])[None]  # h_0..h_{m-1}
    expected = angular_distance_matrix(states)[0].numpy()
    ours = text_layer_distances(decoder, tokenizer, sentences[:1], DistanceConfig()).distance
    np.testing.assert_allclose(ours[:m, :m], expected, atol=ATOL)


def test_max_samples_and_truncation(lm, sentences):
    decoder, tokenizer = lm
    result = text_layer_distances(decoder, tokenizer, sentences, DistanceConfig(batch_size=4, max_samples=3))
    assert result.num_samples == 3
    long = " ".join(sentences[:4])
    short = tokenizer.decode(tokenizer(long, add_special_tokens=False)["input_ids"][:5])
    cut = text_layer_distances(decoder, tokenizer, [long], DistanceConfig(max_length=5 + _specials(tokenizer)))
    plain = text_layer_distances(decoder, tokenizer, [short], DistanceConfig())
    np.testing.assert_allclose(cut.distance, plain.distance, atol=ATOL)


def test_speech_distances_are_padding_aware(qwen_dir, whisper_dir):
    model = build_speech_llm(
        SpeechLLMConfig(EncoderConfig(str(whisper_dir)), DecoderConfig(str(qwen_dir)), ProjectorConfig(hidden=32))
    )
    rng = np.random.default_rng(0)
    samples = [
        (rng.standard_normal(16_000).astype(np.float32), "the river ran cold"),
        (rng.standard_normal(4_000).astype(np.float32), "a cat"),
        (rng.standard_normal(9_000).astype(np.float32), "she kept a diary for many years"),
    ]
    alone = speech_layer_distances(model, samples, DistanceConfig(batch_size=1))
    batched = speech_layer_distances(model, samples, DistanceConfig(batch_size=3))
    m = model.decoder.config.num_hidden_layers
    assert batched.distance.shape == (m + 1, m + 1)
    np.testing.assert_allclose(batched.per_sample, alone.per_sample, atol=ATOL)
    assert batched.num_samples == 3


def test_speech_states_are_read_at_the_last_target_token_the_one_a_text_path_ends_on(qwen_dir, wavlm_dir):
    model = build_speech_llm(
        SpeechLLMConfig(EncoderConfig(str(wavlm_dir)), DecoderConfig(str(qwen_dir)), ProjectorConfig(hidden=32))
    ).eval()
    rng = np.random.default_rng(0)
    texts = ["the river ran cold", "a cat"]
    waves = [rng.standard_normal(n).astype(np.float32) for n in (16_000, 6_000)]
    result = speech_layer_distances(model, list(zip(waves, texts)), DistanceConfig(batch_size=2))
    assert (result.token, result.layout) == (SPEECH_TOKEN, "[BOS if the tokenizer has one] speech prompt target")
    with torch.no_grad():
        inputs = model.decoder_inputs(waves, texts, eos=False)
        expected = layer_distances(model.decoder, [inputs])
        with_eos = model.decoder_inputs(waves, texts)
    np.testing.assert_allclose(result.per_sample, expected.per_sample, atol=ATOL)
    embed = model.decoder.get_input_embeddings()
    lengths = inputs.attention_mask.sum(dim=1)
    for row, text in enumerate(texts):
        last_text_token = model.tokenizer(text)["input_ids"][-1]  # what the text path ends on (Qwen adds nothing)
        torch.testing.assert_close(inputs.inputs_embeds[row, lengths[row] - 1], embed.weight[last_text_token])
        # The training layout has one more token, the EOS, which the measurement leaves out.
        assert int(with_eos.attention_mask[row].sum()) == int(lengths[row]) + 1
    text = text_layer_distances(model.decoder, model.tokenizer, texts, DistanceConfig())
    assert (text.token, text.layout) == (TEXT_TOKEN, "[the tokenizer's special tokens] text")


def test_gromov_convention_removes_the_n_layers_each_block_spans():
    m = 6
    d = _random_distances(m)
    d[0, 1] = d[1, 0] = 0.01  # n=1: h_0 is a candidate start under gromov: remove layer 1
    d[3, 5] = d[5, 3] = 0.02  # n=2: start 3, remove 4, 5 (the paper's n=2 would remove 4 alone)
    d[3, 6] = d[6, 3] = 0.03  # n=3: start 3, remove 4..6, the last layers: layer 3 gets the healing LoRA
    d[0, 4] = d[4, 0] = 0.04  # n=4: start 0, remove 1..4
    gromov = pruning_path(d, "gromov")
    assert [s.n for s in gromov] == list(depth_range(m, "gromov")) == [1, 2, 3, 4]
    assert [s.start for s in gromov] == [0, 3, 3, 0]
    assert [s.removed for s in gromov] == [(1,), (4, 5), (4, 5, 6), (1, 2, 3, 4)]
    assert [s.fraction for s in gromov] == [1 / 6, 2 / 6, 3 / 6, 4 / 6]
    assert [s.receiving_layer for s in gromov] == [1, 4, 3, 1]
    assert [s.distance for s in gromov] == [0.01, 0.02, 0.03, 0.04]
    assert {s.convention for s in gromov} == {"gromov"}
    paper = pruning_path(d)
    assert [s.n for s in paper] == list(depth_range(m)) == [2, 3, 4, 5]
    assert [s.removed for s in paper][:2] == [(4,), (4, 5)]  # paper n=3 from start 3 spans h_3..h_6
    assert [s.receiving_layer for s in paper] == [s.start + 1 for s in paper]
    with pytest.raises(ValueError, match="path.convention=.prune-me. is not allowed: expected one of paper, gromov"):
        pruning_path(d, "prune-me")


def test_path_report_records_the_convention_and_round_trips_its_steps(lm, sentences):
    decoder, tokenizer = lm
    result = text_layer_distances(decoder, tokenizer, sentences[:4], DistanceConfig())
    for convention in ("paper", "gromov"):
        report = path_report("lm", result, "text", convention)
        assert report["convention"] == convention and report["token"] == TEXT_TOKEN
        assert report["path"] == [step.to_dict() for step in pruning_path(result.distance, convention)]
        assert report["distance"] == result.distance.tolist() and report["n_layers"] == result.n_layers


def test_path_agreement_over_the_candidate_blocks():
    m = 4
    a, b = np.full((m + 1, m + 1), 0.5), np.full((m + 1, m + 1), 0.5)
    a[1, 3] = a[3, 1] = 0.1
    b[2, 4] = b[4, 2] = 0.2
    first, second = (
        {"n_layers": m, "convention": "paper", "distance": x.tolist(), "path": [s.to_dict() for s in pruning_path(x)]}
        for x in (a, b)
    )
    agreement = path_agreement(first, second)
    # |0.1 - 0.5| at (1, 3), |0.5 - 0.2| at (2, 4), 0 at (1, 4): the only candidate blocks for m = 4.
    assert agreement["mean_abs_diff"] == pytest.approx((0.4 + 0.3 + 0.0) / 3)
    assert agreement["depths"] == [2, 3] and agreement["same_block"] == [3]
    assert agreement["blocks"]["2"] == [[2], [3]]
    with pytest.raises(ValueError, match="do not compare"):
        path_agreement(first, {**second, "convention": "gromov"})


def test_path_picks_the_known_argmin_and_removes_n_minus_1_layers():
    m = 6
    d = _random_distances(m)
    d[3, 5] = d[5, 3] = 0.01  # n=2: start 3
    d[2, 5] = d[5, 2] = 0.02  # n=3: start 2
    d[1, 5] = d[5, 1] = 0.03  # n=4: start 1
    d[0, 5] = d[5, 0] = 0.0  # l=0 is never a candidate start (h_0 is the input, not a layer)
    path = pruning_path(d)
    assert [s.n for s in path] == [2, 3, 4, 5]
    assert [s.start for s in path] == [3, 2, 1, 1]
    assert [s.removed for s in path] == [(4,), (3, 4), (2, 3, 4), (2, 3, 4, 5)]
    assert [s.fraction for s in path] == [1 / 6, 2 / 6, 3 / 6, 4 / 6]
    assert [s.distance for s in path[:3]] == [0.01, 0.02, 0.03]
    assert path[4 - 2].receiving_layer == 2  # originally layer 5, first after the kept layer 1
    for step in path:
        assert len(step.removed) == step.n - 1
        assert step.start + step.n <= m


def test_path_ties_go_to_the_smallest_start():
    m = 8
    d = np.full((m + 1, m + 1), 0.5)
    np.fill_diagonal(d, 0.0)
    for start in (2, 4, 5):
        d[start, start + 3] = d[start + 3, start] = 0.1
    step = next(s for s in pruning_path(d) if s.n == 3)
    assert step.start == 2 and step.removed == (3, 4)
    assert pruning_path(d)[0].start == 1  # all n=2 candidates tie at 0.5


def test_path_every_n_of_a_real_matrix(lm, sentences):
    decoder, tokenizer = lm
    d = text_layer_distances(decoder, tokenizer, sentences[:4], DistanceConfig()).distance
    m = d.shape[0] - 1
    path = pruning_path(d)
    assert [s.n for s in path] == list(range(2, m))
    for step in path:
        candidates = [d[layer, layer + step.n] for layer in range(1, m - step.n + 1)]
        assert step.start == 1 + int(np.argmin(candidates))
        assert step.removed == tuple(range(step.start + 1, step.start + step.n))
        assert step.fraction == (step.n - 1) / m
        assert step.to_dict()["removed"] == list(step.removed)


def test_path_rejects_bad_matrices_and_small_models():
    with pytest.raises(BadInputError, match="square"):
        pruning_path(np.zeros((3, 4)))
    assert pruning_path(np.zeros((3, 3))) == []  # m = 2: no n in 2..m-1


def _random_distances(m: int) -> np.ndarray:
    """A symmetric (m+1, m+1) matrix of distances in [0.3, 0.9] with a zero diagonal, to plant minima in."""
    d = np.random.default_rng(1).uniform(0.3, 0.9, size=(m + 1, m + 1))
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return d


def _specials(tokenizer) -> int:
    return len(tokenizer("a")["input_ids"]) - len(tokenizer("a", add_special_tokens=False)["input_ids"])
