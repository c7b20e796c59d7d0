"""Tests for slam.export: what healing trained saved and restored, one pruned and healed SpeechLLM exported and
reloaded (plain transformers for the decoder, `load_speech_llm` for the whole), and several tasks on one backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from slam.config import DecodeConfig, DecoderConfig, EncoderConfig, HealConfig, ProjectorConfig, SpeechLLMConfig
from slam.decode import greedy_token_ids
from slam.errors import BadInputError
from slam.export import (
    ADAPTER_DIR,
    DECODER_DIR,
    MANIFEST_FILE,
    TASKS_DIR,
    SharedBackbone,
    export_speech_llm,
    export_tasks,
    restore_healed,
    save_healed,
)
from slam.healing import add_healing
from slam.model import build_speech_llm, load_speech_llm
from slam.pruning import drop_layers

M = 6  # depth of the tiny LMs of conftest
REMOVED = (3, 4)  # block l=2, n=3: layer 5 receives h_2 and is layer 3 of the pruned decoder
RECEIVING = 3
TARGETS = ["the river ran cold", "she opened the window"]
DECODE = DecodeConfig(batch_size=2, max_new_tokens=8)


def _waveforms() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16_000, 12_000)]


def _healed(wavlm_dir, qwen_dir, strategy: str, prompt: str, seed: int):
    """A pruned SpeechLLM with healing set up and its trainable weights set to random values (as if trained)."""
    torch.manual_seed(seed)
    cfg = SpeechLLMConfig(
        EncoderConfig(str(wavlm_dir)), DecoderConfig(str(qwen_dir)), ProjectorConfig(hidden=32), prompt=prompt
    )
    model = build_speech_llm(cfg)
    drop_layers(model.decoder, REMOVED)
    add_healing(model, RECEIVING, HealConfig(strategy=strategy))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))  # LoRA B starts at 0: without this merging would change nothing
    return model.eval(), cfg


def _nll(model) -> float:
    with torch.no_grad():
        total, count = model.nll(_waveforms(), TARGETS)
    return float(total / count)


def test_healed_weights_are_restored_into_a_model_pruned_the_same_way(wavlm_dir, qwen_dir, tmp_path):
    model, _ = _healed(wavlm_dir, qwen_dir, "decoder+projector", "Transcribe.", seed=0)
    file = save_healed(model, tmp_path)
    fresh, _ = _healed(wavlm_dir, qwen_dir, "decoder+projector", "Transcribe.", seed=1)
    assert _nll(fresh) != pytest.approx(_nll(model))
    restore_healed(fresh, file)
    assert _nll(fresh) == _nll(model)
    none, _ = _healed(wavlm_dir, qwen_dir, "none", "Transcribe.", seed=0)
    assert save_healed(none, tmp_path / "none") is None  # nothing trained, nothing to keep
    projector_only, _ = _healed(wavlm_dir, qwen_dir, "projector", "Transcribe.", seed=0)
    with pytest.raises(BadInputError, match=r"healed weights do not match the model"):
        restore_healed(projector_only, file)


def test_an_exported_speech_llm_reloads_with_transformers_and_load_speech_llm(wavlm_dir, qwen_dir, tmp_path):
    model, cfg = _healed(wavlm_dir, qwen_dir, "decoder+projector", "Transcribe.", seed=0)
    out = export_speech_llm(model, cfg, tmp_path / "export", {"cell_id": "abc", "removed": list(REMOVED)})
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest == {"cell_id": "abc", "removed": [3, 4], "kind": "speech_llm", "num_hidden_layers": M - 2}
    # The decoder alone, with plain transformers: the kept layers, the healing LoRA merged in.
    decoder = AutoModelForCausalLM.from_pretrained(out / DECODER_DIR).eval()
    assert decoder.config.num_hidden_layers == M - 2 and len(decoder.model.layers) == M - 2
    assert not any("lora" in name for name, _ in decoder.named_parameters())
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        np.testing.assert_allclose(decoder(ids).logits, model.decoder(input_ids=ids).logits, atol=1e-5)
    # The whole SpeechLLM, from anywhere: its decoder is named relative to the export.
    moved = tmp_path / "moved"
    out.rename(moved)
    reloaded, reloaded_cfg = load_speech_llm(moved)
    assert reloaded_cfg.decoder.name == str(moved / DECODER_DIR) and reloaded_cfg.prompt == "Transcribe."
    reloaded.eval()
    assert _nll(reloaded) == pytest.approx(_nll(model), abs=1e-5)
    assert greedy_token_ids(reloaded, _waveforms(), DECODE) == greedy_token_ids(model, _waveforms(), DECODE)
    with pytest.raises(BadInputError, match=r"exists and is not an empty directory"):
        export_speech_llm(model, cfg, moved, {})


def test_tasks_on_one_backbone_are_served_from_it_each_as_its_own_model(wavlm_dir, qwen_dir, tmp_path):
    asr = _healed(wavlm_dir, qwen_dir, "decoder+projector", "Transcribe.", seed=0)
    ast = _healed(wavlm_dir, qwen_dir, "decoder", "Translate.", seed=1)
    plain = _healed(wavlm_dir, qwen_dir, "projector", "Repeat.", seed=2)
    out = export_tasks({"asr": asr, "ast": ast, "repeat": plain}, tmp_path / "bundle", {"removed": list(REMOVED)})
    assert sorted(p.name for p in (out / TASKS_DIR).iterdir()) == ["asr", "ast", "repeat"]
    assert (out / TASKS_DIR / "ast" / ADAPTER_DIR).is_dir() and not (out / TASKS_DIR / "repeat" / ADAPTER_DIR).exists()
    # The backbone is the pruned decoder without any healing adapter.
    backbone = AutoModelForCausalLM.from_pretrained(out / DECODER_DIR)
    assert backbone.config.num_hidden_layers == M - 2
    served = SharedBackbone(out)
    assert served.tasks == ["asr", "ast", "repeat"]
    for task, (model, _) in (("asr", asr), ("ast", ast), ("repeat", plain), ("asr", asr)):
        mine = served.model(task)
        assert mine.prompt == model.prompt
        assert _nll(mine) == pytest.approx(_nll(model), abs=1e-5), task
        assert greedy_token_ids(mine, _waveforms(), DECODE) == greedy_token_ids(model, _waveforms(), DECODE)
    assert served.model("asr").decoder is served.model("ast").decoder  # one backbone in memory
    with pytest.raises(KeyError, match=r"no task 'x' in this export: asr, ast, repeat"):
        served.model("x")


def test_tasks_whose_backbones_differ_are_refused(wavlm_dir, qwen_dir, tmp_path):
    asr = _healed(wavlm_dir, qwen_dir, "decoder", "Transcribe.", seed=0)
    other, cfg = _healed(wavlm_dir, qwen_dir, "decoder", "Translate.", seed=1)
    with torch.no_grad():
        next(p for p in other.decoder.parameters() if not p.requires_grad).add_(1.0)
    with pytest.raises(BadInputError, match=r"tasks asr and ast do not share one pruned backbone"):
        export_tasks({"asr": asr, "ast": (other, cfg)}, tmp_path / "bundle", {})
    with pytest.raises(BadInputError, match=r"at least two tasks"):
        export_tasks({"asr": asr}, tmp_path / "single", {})
