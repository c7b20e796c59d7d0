"""SpeechLLM assembly: encoders, frame stacking, input layout, labels, loss, configs, layering."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from slam.config import (
    DecoderConfig,
    DistanceConfig,
    EncoderConfig,
    HealConfig,
    LoRAConfig,
    ProjectorConfig,
    SpeechLLMConfig,
)
from slam.errors import BadInputError
from slam.model import IGNORE_INDEX, assemble_inputs, build_speech_llm, load_decoder, load_encoder, stack_frames

RNG = np.random.default_rng(0)
WAVES = [RNG.standard_normal(n).astype(np.float32) for n in (16_000, 6_400, 11_000)]
TARGETS = ["the river ran cold", "a cat", "she kept a diary for many years"]


def _speech_llm(encoder_dir, decoder_dir, **decoder_kwargs):
    cfg = SpeechLLMConfig(
        EncoderConfig(str(encoder_dir)), DecoderConfig(str(decoder_dir), **decoder_kwargs), ProjectorConfig(hidden=32)
    )
    return build_speech_llm(cfg)


def test_stack_frames_derives_positions_from_length_and_k():
    frames = torch.arange(2 * 12 * 3, dtype=torch.float32).reshape(2, 12, 3)
    stacked, lengths = stack_frames(frames, torch.tensor([12, 7]), k=5)
    assert lengths.tolist() == [2, 1]  # 12 // 5, 7 // 5: the remainder is dropped
    assert stacked.shape == (2, 2, 15)
    assert torch.equal(stacked[0, 1], frames[0, 5:10].reshape(-1))  # frames 5..9 side by side
    with pytest.raises(BadInputError, match="sample 1: 4 encoder frames are fewer than k=5"):
        stack_frames(frames, torch.tensor([12, 4]), k=5)


@pytest.mark.parametrize("kind, samples, frames", [("wavlm", 16_000, 49), ("whisper", 16_000, 50)])
def test_encoder_lengths_cover_only_real_audio(kind, samples, frames, wavlm_dir, whisper_dir):
    encoder = load_encoder(EncoderConfig(str(wavlm_dir if kind == "wavlm" else whisper_dir)))
    assert encoder.kind == kind
    out, lengths = encoder([np.zeros(samples, np.float32), np.zeros(samples // 2, np.float32)])
    assert lengths.tolist() == [frames, frames // 2]
    # Whisper encodes 30 s (1,500 frames); only those covering the audio are kept, and the batch is padded with zeros.
    assert out.shape[1] == frames
    assert not out[1, frames // 2 :].any()


@pytest.mark.parametrize("kind", ["wavlm", "whisper"])
def test_speech_embeddings_do_not_depend_on_batch_padding(kind, wavlm_dir, whisper_dir, qwen_dir):
    model = _speech_llm(wavlm_dir if kind == "wavlm" else whisper_dir, qwen_dir)
    batched, lengths = model.speech_embeddings(WAVES)
    frames, _ = model.encoder(WAVES)
    for i, wave in enumerate(WAVES):
        alone, alone_len = model.speech_embeddings([wave])
        assert int(lengths[i]) == int(alone_len[0])
        # Bit for bit: each utterance is encoded on its own, whatever it is batched with.
        alone_frames, alone_frame_lengths = model.encoder([wave])
        assert torch.equal(alone_frames[0], frames[i, : int(alone_frame_lengths[0])])
        torch.testing.assert_close(batched[i, : int(lengths[i])], alone[0], atol=1e-6, rtol=1e-6)


def test_whisper_rejects_audio_over_30_seconds(whisper_dir):
    encoder = load_encoder(EncoderConfig(str(whisper_dir)))
    with pytest.raises(BadInputError, match="longer than Whisper's 30 s window"):
        encoder([np.zeros(16_000 * 31, np.float32)])


def test_layout_and_labels_only_on_target_and_eos(lm_dir, wavlm_dir):
    model = _speech_llm(wavlm_dir, lm_dir)
    tok = model.tokenizer
    inputs = model.decoder_inputs(WAVES, TARGETS)
    _, speech_lengths = model.speech_embeddings(WAVES)
    has_bos = tok.bos_token_id is not None
    assert has_bos == (model.decoder.config.model_type == "llama")
    embed = model.decoder.get_input_embeddings()
    for i, target in enumerate(TARGETS):
        ids = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n_context = int(has_bos) + int(speech_lengths[i]) + len(model.prompt_ids)
        length = n_context + len(ids)
        assert int(inputs.attention_mask[i].sum()) == length
        assert inputs.attention_mask[i, :length].all()  # right padding
        assert inputs.labels[i, :n_context].eq(IGNORE_INDEX).all()
        assert inputs.labels[i, n_context:length].tolist() == ids
        assert inputs.labels[i, length:].eq(IGNORE_INDEX).all()
        assert inputs.position_ids[i, :length].tolist() == list(range(length))
        prompt_span = slice(n_context - len(model.prompt_ids), n_context)
        torch.testing.assert_close(inputs.inputs_embeds[i, prompt_span], embed(torch.tensor(model.prompt_ids)))
        if has_bos:
            torch.testing.assert_close(inputs.inputs_embeds[i, 0], embed.weight[tok.bos_token_id])


def test_left_padding_holds_the_same_rows_at_the_end():
    embed = torch.nn.Embedding(10, 4)
    speech = torch.randn(2, 3, 4)
    right = assemble_inputs(speech, torch.tensor([3, 1]), embed, [5, 6], None, bos_id=None, eos_id=2)
    left = assemble_inputs(speech, torch.tensor([3, 1]), embed, [5, 6], None, None, 2, padding_side="left")
    assert right.labels is None and left.labels is None
    assert left.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert left.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    torch.testing.assert_close(left.inputs_embeds[1, 2:], right.inputs_embeds[1, :3])
    with pytest.raises(ValueError, match="padding_side='middle'"):
        assemble_inputs(speech, torch.tensor([3, 1]), embed, [5], None, None, 2, padding_side="middle")


def test_loss_is_target_nll_and_independent_of_batching(qwen_dir, wavlm_dir):
    model = _speech_llm(wavlm_dir, qwen_dir).eval()
    with torch.no_grad():
        inputs = model.decoder_inputs(WAVES, TARGETS)
        hf = model.decoder(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            labels=inputs.labels,
        ).loss
        ours = model(WAVES, TARGETS)
        torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-5)
        # Token-weighted mean of single-sample losses equals the batch loss (padding contributes nothing).
        n_tokens = [(model.decoder_inputs([w], [t]).labels != IGNORE_INDEX).sum() for w, t in zip(WAVES, TARGETS)]
        singles = [model([w], [t]) * n for w, t, n in zip(WAVES, TARGETS, n_tokens)]
        torch.testing.assert_close(ours, sum(singles) / sum(n_tokens), atol=1e-5, rtol=1e-5)


def test_only_the_projector_trains_in_the_slam_recipe(qwen_dir, wavlm_dir):
    model = _speech_llm(wavlm_dir, qwen_dir)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"projector.net.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert model.projector.net[0].in_features == 5 * model.encoder.dim
    model.train()
    assert not model.encoder.model.training  # the frozen encoder never enters train mode
    loss = model(WAVES[:2], TARGETS[:2])
    loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())


def test_lora_adds_adapters_on_attention_projections_only(qwen_dir, wavlm_dir):
    model = _speech_llm(wavlm_dir, qwen_dir, lora=LoRAConfig())
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" in name]
    m = model.decoder.config.num_hidden_layers
    assert len(trainable) == m * 4 * 2  # q, k, v, o x (A, B) in every layer
    assert {name.split(".")[-4] for name in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert model.decoder.peft_config["default"].r == 64
    assert model.decoder.peft_config["default"].lora_alpha == 64
    assert model.decoder.peft_config["default"].lora_dropout == 0.05


def test_decoder_is_usable_on_text(lm_dir):
    decoder, tokenizer = load_decoder(DecoderConfig(str(lm_dir)))
    out = decoder(**tokenizer(["the river ran cold"], return_tensors="pt"))
    assert out.logits.shape[-1] == decoder.config.vocab_size
    assert tokenizer.pad_token is not None


def test_missing_and_wrong_models_are_clear_errors(tmp_path, wavlm_dir, qwen_dir):
    with pytest.raises(BadInputError, match="no such model directory"):
        load_decoder(DecoderConfig(str(tmp_path / "missing")))
    with pytest.raises(BadInputError, match="no config.json"):
        load_decoder(DecoderConfig(str(tmp_path)))
    with pytest.raises(BadInputError, match="'wavlm' is not a causal LM"):
        load_decoder(DecoderConfig(str(wavlm_dir)))
    with pytest.raises(BadInputError, match=r"'qwen2' is not a speech encoder \(wavlm or whisper\)"):
        load_encoder(EncoderConfig(str(qwen_dir)))


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: EncoderConfig("x", kind="hubert"), "encoder.kind"),
        (lambda: ProjectorConfig(stack=0), "projector.stack"),
        (lambda: LoRAConfig(dropout=1.5), "lora.dropout"),
        (lambda: DecoderConfig("x", dtype="int8"), "decoder.dtype"),
        (lambda: DistanceConfig(batch_size=0), "distance.batch_size"),
        (lambda: HealConfig(strategy="all"), "heal.strategy"),
        (lambda: HealConfig(lora_rank=-1), "heal.lora_rank"),
    ],
)
def test_configs_name_the_bad_field(build, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build()


def test_heal_config_defaults_are_the_papers():
    cfg = HealConfig()
    assert (cfg.strategy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) == ("decoder+projector", 64, 64, 0.05)
    assert cfg.lora_targets == ("gate_proj", "up_proj", "down_proj")
    assert (HealConfig("decoder").heals_decoder, HealConfig("decoder").heals_projector) == (True, False)


def test_slam_imports_neither_ray_nor_mlflow():
    import slam

    modules = sorted(f"slam.{module.name}" for module in pkgutil.walk_packages(slam.__path__))
    assert {"slam.export", "slam.features", "slam.demo", "slam.train"} <= set(modules)  # every module, found
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
        "bad = [m for m in ('ray', 'mlflow') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "[]"
