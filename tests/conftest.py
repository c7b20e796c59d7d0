"""Shared fixtures: tiny random backbones saved to disk once per session, and the shipped text."""

from __future__ import annotations

from pathlib import Path

import pytest

from slam.tiny import build_tiny_lm, build_tiny_wavlm, build_tiny_whisper

REPO = Path(__file__).resolve().parents[1]
SENTENCES = REPO / "experiments" / "data" / "sentences.txt"


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    return [line for line in SENTENCES.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session", params=["qwen2", "llama"])
def lm_dir(request, tmp_path_factory, sentences) -> Path:
    """A 6-layer tiny causal LM of each family, with its own tokenizer."""
    return build_tiny_lm(tmp_path_factory.mktemp(f"lm-{request.param}"), sentences, family=request.param, layers=6)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory, sentences) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("qwen"), sentences, family="qwen2", layers=6)


@pytest.fixture(scope="session")
def wavlm_dir(tmp_path_factory) -> Path:
    return build_tiny_wavlm(tmp_path_factory.mktemp("wavlm"))


@pytest.fixture(scope="session")
def whisper_dir(tmp_path_factory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper"))
