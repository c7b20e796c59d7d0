"""Tests for slam.healing: which parameters train under each strategy, the counts, and the LoRA-adapted case."""

import numpy as np
import pytest
import torch
from torch import nn

from slam.config import DecoderConfig, EncoderConfig, HealConfig, LoRAConfig, ProjectorConfig, SpeechLLMConfig
from slam.errors import BadInputError
from slam.healing import add_healing
from slam.model import build_speech_llm, decoder_stack
from slam.pruning import drop_layers
from slam.redundancy import pruning_path

M = 6  # depth of the tiny LMs of conftest
RANK = 64
MLP = ("gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGETS = ["the river ran cold", "she opened the window"]


def _step(start: int = 2, n: int = 3):
    """The path step for block size n of a matrix whose minimum D[l][l+n] is at l=start."""
    index = np.arange(M + 1)
    matrix = np.abs(index[:, None] - index[None, :]) / 10.0
    matrix[start, start + n] = matrix[start + n, start] = 0.01
    step = pruning_path(matrix)[n - 2]
    assert (step.start, step.removed, step.receiving_layer) == (start, tuple(range(start + 1, start + n)), start + 1)
    return step


def _pruned(encoder_dir, decoder_dir, step, lora: LoRAConfig | None = None):
    model = build_speech_llm(
        SpeechLLMConfig(
            EncoderConfig(str(encoder_dir)), DecoderConfig(str(decoder_dir), lora=lora), ProjectorConfig(hidden=32)
        )
    )
    drop_layers(model.decoder, step.removed)
    return model


def _waveforms() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16_000, 12_000)]


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _healing_names(model: nn.Module, index: int) -> set[str]:
    """Names of the healing LoRA weights on the MLP of the 0-based layer `index`, found by name suffix."""
    suffixes = tuple(f"layers.{index}.mlp.{proj}.lora_{ab}.default.weight" for proj in MLP for ab in "AB")
    names = {name for name, _ in model.named_parameters() if name.endswith(suffixes)}
    assert len(names) == len(suffixes)
    return names


def _projector_names(model: nn.Module) -> set[str]:
    names = {f"projector.{name}" for name, _ in model.projector.named_parameters()}
    assert names == {"projector.net.0.weight", "projector.net.0.bias", "projector.net.2.weight", "projector.net.2.bias"}
    return names


@pytest.mark.parametrize("strategy", ["none", "projector", "decoder", "decoder+projector"])
def test_strategy_trains_exactly_the_intended_parameters(lm_dir, wavlm_dir, strategy):
    step = _step()
    model = _pruned(wavlm_dir, lm_dir, step)
    total = sum(p.numel() for p in model.parameters())

    report = add_healing(model, step.receiving_layer, HealConfig(strategy=strategy))

    index = step.receiving_layer - 1
    expected = set()
    if "projector" in strategy:
        expected |= _projector_names(model)
    if "decoder" in strategy:
        expected |= _healing_names(model, index)
        assert not any(".lora_" in name for name in _trainable(model) - _healing_names(model, index))
    assert _trainable(model) == expected
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert len(decoder_stack(model.decoder).layers) == M - len(step.removed)

    config = decoder_stack(model.decoder).config
    hidden, intermediate = config.hidden_size, config.intermediate_size
    projector = sum(p.numel() for p in model.projector.parameters())
    assert report.strategy == strategy
    assert report.receiving_layer == step.receiving_layer
    assert report.decoder_trainable == (3 * RANK * (hidden + intermediate) if "decoder" in strategy else 0)
    assert report.projector_trainable == (projector if "projector" in strategy else 0)
    assert report.total == sum(p.numel() for p in model.parameters())
    assert report.total == total + report.decoder_trainable  # the healing LoRA is the only addition
    assert report.trainable == report.decoder_trainable + report.projector_trainable
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_healing_lora_shapes_follow_the_receiving_layer(qwen_dir, wavlm_dir):
    step = _step(start=1)
    model = _pruned(wavlm_dir, qwen_dir, step)

    report = add_healing(model, step.receiving_layer, HealConfig(strategy="decoder"))

    layers = decoder_stack(model.decoder).layers
    adapted = [i for i, layer in enumerate(layers) if any("lora_" in name for name, _ in layer.named_modules())]
    assert adapted == [step.receiving_layer - 1]
    mlp = layers[step.receiving_layer - 1].mlp
    expected = 0
    for proj in MLP:
        module = getattr(mlp, proj)
        base = module.base_layer
        assert module.lora_A["default"].weight.shape == (RANK, base.in_features)
        assert module.lora_B["default"].weight.shape == (base.out_features, RANK)
        expected += RANK * (base.in_features + base.out_features)
    assert report.decoder_trainable == expected


def test_healing_defaults_are_the_papers(qwen_dir, wavlm_dir):
    step = _step()
    model = _pruned(wavlm_dir, qwen_dir, step)

    add_healing(model, step.receiving_layer, HealConfig())

    peft_config = model.decoder.peft_config["default"]
    assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (64, 64, 0.05)
    assert set(peft_config.target_modules) == set(MLP)
    assert list(peft_config.layers_to_transform) == [step.receiving_layer - 1]
    gate = decoder_stack(model.decoder).layers[step.receiving_layer - 1].mlp.gate_proj
    assert gate.scaling["default"] == 1.0
    assert gate.lora_dropout["default"].p == 0.05
    assert torch.count_nonzero(gate.lora_B["default"].weight) == 0  # zero-init: healing starts from the pruned model


def test_lora_adapted_speech_llm_heals_on_merged_weights(qwen_dir, wavlm_dir, sentences):
    step = _step()
    model = _pruned(wavlm_dir, qwen_dir, step, lora=LoRAConfig())
    assert any("q_proj.lora_A" in name for name in _trainable(model))
    # A trained-looking baseline LoRA: random B, so that merging it really changes the weights.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.decoder.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    batch = model.tokenizer(sentences[:2], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        before = model.decoder(**batch).logits
    q_weight = decoder_stack(model.decoder).layers[0].self_attn.q_proj.base_layer.weight.detach().clone()

    add_healing(model, step.receiving_layer, HealConfig(strategy="decoder"))

    stack = decoder_stack(model.decoder)
    for layer in stack.layers:
        for proj in ATTENTION:
            module = getattr(layer.self_attn, proj)
            assert type(module) is nn.Linear
            assert not any("lora" in name for name, _ in module.named_modules())
    assert not torch.allclose(stack.layers[0].self_attn.q_proj.weight, q_weight, atol=1e-4)  # merged in
    assert _trainable(model) == _healing_names(model, step.receiving_layer - 1)
    assert set(model.decoder.peft_config) == {"default"}
    assert set(model.decoder.peft_config["default"].target_modules) == set(MLP)
    model.eval()
    with torch.no_grad():
        after = model.decoder(**batch).logits
    assert torch.allclose(before, after, atol=1e-5)


@pytest.mark.parametrize("receiving_layer", [0, -1, 5])
@pytest.mark.parametrize("strategy", ["none", "decoder+projector"])
@pytest.mark.parametrize("lora", [None, LoRAConfig()])
def test_receiving_layer_out_of_range_is_rejected(qwen_dir, wavlm_dir, receiving_layer, strategy, lora):
    step = _step()
    model = _pruned(wavlm_dir, qwen_dir, step, lora=lora)  # 4 layers left; a baseline LoRA stays unmerged
    trainable = _trainable(model)

    with pytest.raises(BadInputError, match="out of range 1..4"):
        add_healing(model, receiving_layer, HealConfig(strategy=strategy))

    assert _trainable(model) == trainable


@pytest.mark.parametrize("strategy", ["decoder+projector", "decoder", "projector"])
def test_backward_reaches_exactly_the_trainable_parameters(qwen_dir, wavlm_dir, strategy):
    step = _step()
    model = _pruned(wavlm_dir, qwen_dir, step)
    add_healing(model, step.receiving_layer, HealConfig(strategy=strategy))
    trainable = _trainable(model)

    loss = model(_waveforms(), TARGETS)
    loss.backward()

    assert torch.isfinite(loss)
    assert {name for name, p in model.named_parameters() if p.grad is not None} == trainable
    # The gradient really flows: lora_B (A is multiplied by the zero-init B) and the projector get non-zero grads.
    for name, param in model.named_parameters():
        if name in trainable and ".lora_A." not in name:
            assert torch.count_nonzero(param.grad) > 0, name
