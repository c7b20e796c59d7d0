"""Tests for slam.pruning: physical removal of decoder layers, exact KV-cache generation, save and reload."""

import gc
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from slam.config import DecoderConfig
from slam.errors import BadInputError
from slam.model import load_decoder
from slam.pruning import drop_layers
from slam.redundancy import pruning_path

M = 6  # depth of the tiny LMs of conftest
NEW_TOKENS = 20
MIXED_TYPES = [
    "full_attention",
    "sliding_attention",
    "full_attention",
    "full_attention",
    "sliding_attention",
    "sliding_attention",
]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _sharpen(model: nn.Module, factor: float = 10.0) -> None:
    """Scale every weight matrix so that the random model's greedy output is not one repeated token."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.mul_(factor)


def _prompts(tokenizer, sentences):
    tokenizer.padding_side = "left"
    batch = tokenizer([sentences[0], sentences[1][:15]], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][0].all()  # really left-padded
    return batch


def _greedy(model, tokenizer, batch, use_cache: bool) -> torch.Tensor:
    out = model.generate(
        **batch,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[:, batch["input_ids"].shape[1] :]  # (B, NEW_TOKENS)


def _logits(model, tokenizer, sentences) -> torch.Tensor:
    tokenizer.padding_side = "right"
    batch = tokenizer(sentences[2:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def _path_step(start: int, n: int):
    """The step for block size n of a path computed from a matrix whose minimum D[l][l+n] is at l=start."""
    index = np.arange(M + 1)
    matrix = np.abs(index[:, None] - index[None, :]) / 10.0
    matrix[start, start + n] = matrix[start + n, start] = 0.01
    step = pruning_path(matrix)[n - 2]
    assert (step.n, step.start) == (n, start)
    return step


@pytest.mark.parametrize("removed", [[2, 5], [3, 4, 5], [1], [6]])
def test_drop_layers_frees_exactly_the_removed_layers(lm_dir, removed):
    model, _ = load_decoder(DecoderConfig(str(lm_dir)))
    before = _numel(model)
    gone = [model.model.layers[i - 1] for i in removed]
    gone_params = sum(_numel(layer) for layer in gone)
    kept = [layer for i, layer in enumerate(model.model.layers, start=1) if i not in removed]

    assert drop_layers(model, removed) is model
    assert _numel(model) == before - gone_params
    assert gone_params > 0
    modules = list(model.modules())
    assert not any(module is layer for layer in gone for module in modules)
    assert len(model.model.layers) == M - len(removed)
    assert all(new is old for new, old in zip(model.model.layers, kept, strict=True))

    refs = [weakref.ref(layer) for layer in gone]
    del gone, modules
    gc.collect()
    assert all(ref() is None for ref in refs)  # nothing else holds the removed layers


@pytest.mark.parametrize("removed", [[2, 5], [3, 4, 5]])
def test_drop_layers_updates_config_and_layer_idx(lm_dir, removed):
    model, _ = load_decoder(DecoderConfig(str(lm_dir)))
    old_types = getattr(model.config, "layer_types", None)
    keep = [i for i in range(M) if i + 1 not in removed]
    weights = {i: model.model.layers[i].mlp.down_proj.weight.detach().clone() for i in keep}

    drop_layers(model, removed)

    assert model.config.num_hidden_layers == M - len(removed)
    assert model.model.config.num_hidden_layers == M - len(removed)
    if old_types is None:
        assert getattr(model.config, "layer_types", None) is None
    else:
        assert model.config.layer_types == [old_types[i] for i in keep]
    for position, (layer, old) in enumerate(zip(model.model.layers, keep, strict=True)):
        assert layer.self_attn.layer_idx == position
        assert all(m.layer_idx == position for m in layer.modules() if hasattr(m, "layer_idx"))
        assert torch.equal(layer.mlp.down_proj.weight, weights[old])
    # The kept layers are different layers: their weights tell them apart.
    assert not torch.equal(weights[keep[0]], weights[keep[1]])


def test_drop_layers_keeps_mixed_layer_types_exact(qwen_dir, sentences, tmp_path):
    """Sliding and full attention layers: config.layer_types picks each layer's mask and cache kind."""
    config = AutoConfig.from_pretrained(qwen_dir)
    config.use_sliding_window, config.sliding_window, config.layer_types = True, 4, list(MIXED_TYPES)
    model = AutoModelForCausalLM.from_pretrained(qwen_dir, config=config).eval()
    _, tokenizer = load_decoder(DecoderConfig(str(qwen_dir)))
    _sharpen(model)

    drop_layers(model, [2, 5])

    expected = ["full_attention", "full_attention", "full_attention", "sliding_attention"]
    assert model.config.layer_types == expected
    assert [layer.self_attn.layer_type for layer in model.model.layers] == expected
    batch = _prompts(tokenizer, sentences)
    assert torch.equal(_greedy(model, tokenizer, batch, True), _greedy(model, tokenizer, batch, False))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == expected
    assert torch.allclose(_logits(model, tokenizer, sentences), _logits(reloaded, tokenizer, sentences), atol=1e-6)


@pytest.mark.parametrize("removed", [[2, 5], [3, 4, 5]])
def test_pruned_model_cached_generation_equals_uncached(lm_dir, sentences, removed):
    model, tokenizer = load_decoder(DecoderConfig(str(lm_dir)))
    _sharpen(model)
    batch = _prompts(tokenizer, sentences)
    drop_layers(model, removed)

    cached = _greedy(model, tokenizer, batch, use_cache=True)
    uncached = _greedy(model, tokenizer, batch, use_cache=False)

    assert cached.shape == (2, NEW_TOKENS)
    assert torch.equal(cached, uncached)
    assert max(len(set(row.tolist())) for row in cached) > 1  # not one repeated token: the check can fail


def test_pruning_without_renumbering_breaks_the_cache(lm_dir, sentences):
    """The pitfall drop_layers avoids: a bare ModuleList slice keeps the old layer_idx values (0, 2, 3, 5)."""
    model, tokenizer = load_decoder(DecoderConfig(str(lm_dir)))
    _sharpen(model)
    batch = _prompts(tokenizer, sentences)
    keep = [0, 2, 3, 5]
    model.model.layers = nn.ModuleList([model.model.layers[i] for i in keep])
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in keep]

    assert [layer.self_attn.layer_idx for layer in model.model.layers] == keep
    # Without a cache the stale indices do no harm.
    assert _greedy(model, tokenizer, batch, use_cache=False).shape == (2, NEW_TOKENS)
    with pytest.raises(IndexError):
        _greedy(model, tokenizer, batch, use_cache=True)


@pytest.mark.parametrize("removed", [[2, 5], [3, 4, 5]])
def test_save_and_reload_gives_same_logits(lm_dir, sentences, tmp_path, removed):
    model, tokenizer = load_decoder(DecoderConfig(str(lm_dir)))
    drop_layers(model, removed)
    model.save_pretrained(tmp_path)

    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    reloaded.eval()

    assert reloaded.config.num_hidden_layers == M - len(removed)
    assert AutoConfig.from_pretrained(tmp_path).num_hidden_layers == M - len(removed)
    assert len(reloaded.model.layers) == M - len(removed)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.dtype == torch.float32
    before, after = _logits(model, tokenizer, sentences), _logits(reloaded, tokenizer, sentences)
    assert torch.allclose(before, after, atol=1e-6)
    # A different pruning of the same model does not give the same logits: the comparison can fail.
    other, _ = load_decoder(DecoderConfig(str(lm_dir)))
    drop_layers(other, [1])
    assert not torch.allclose(_logits(other, tokenizer, sentences), after, atol=1e-3)


@pytest.mark.parametrize(
    ("removed", "match"),
    [
        ([0], "out of range"),
        ([M + 1], "out of range"),
        ([-1], "out of range"),
        ([True], "out of range"),
        ([2.0], "out of range"),
        ([3, 3], "repeat"),
        ([2, 4, 2], "repeat"),
        (list(range(1, M + 1)), "no decoder layer"),
    ],
)
def test_drop_layers_rejects_bad_layer_numbers(lm_dir, removed, match):
    model, _ = load_decoder(DecoderConfig(str(lm_dir)))
    layers = list(model.model.layers)

    with pytest.raises(BadInputError, match=match):
        drop_layers(model, removed)

    # Nothing changed.
    assert model.config.num_hidden_layers == M
    assert all(new is old for new, old in zip(model.model.layers, layers, strict=True))
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(M))


def test_drop_layers_takes_numpy_integers(lm_dir):
    model, _ = load_decoder(DecoderConfig(str(lm_dir)))
    drop_layers(model, np.array([2, 3]))
    assert model.config.num_hidden_layers == M - 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(M - 2))


def test_drop_no_layer_is_a_no_op(lm_dir):
    model, _ = load_decoder(DecoderConfig(str(lm_dir)))
    before = _numel(model)
    layers = list(model.model.layers)
    types = getattr(model.config, "layer_types", None)

    assert drop_layers(model, []) is model

    assert _numel(model) == before
    assert model.config.num_hidden_layers == M
    assert getattr(model.config, "layer_types", None) == types
    assert len(model.model.layers) == M
    assert all(new is old for new, old in zip(model.model.layers, layers, strict=True))
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(M))


@pytest.mark.parametrize("start", [1, 2, 3])
def test_pruning_along_the_path_removes_the_step(lm_dir, start):
    step = _path_step(start, n=3)
    model, _ = load_decoder(DecoderConfig(str(lm_dir)))
    original = list(model.model.layers)

    drop_layers(model, step.removed)

    assert step.removed == (start + 1, start + 2)
    assert step.fraction == pytest.approx(2 / M)
    assert (M - model.config.num_hidden_layers) / M == pytest.approx(step.fraction)
    expected = [layer for i, layer in enumerate(original, start=1) if i not in step.removed]
    assert all(new is old for new, old in zip(model.model.layers, expected, strict=True))
    # The receiving layer (1-based, pruned numbering) is the original layer start+n, right after h_start.
    assert model.model.layers[step.receiving_layer - 1] is original[step.start + step.n - 1]
    assert model.model.layers[step.receiving_layer - 2] is original[step.start - 1]
