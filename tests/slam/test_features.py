"""The frozen-encoder feature cache: each utterance encoded once, read back bit for bit, safe to fill concurrently."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from slam.config import DecoderConfig, EncoderConfig, ProjectorConfig, SpeechLLMConfig
from slam.features import STALE_SECONDS, FeatureCache, audio_key, encoder_fingerprint
from slam.model import build_speech_llm, load_encoder

RNG = np.random.default_rng(1)
WAVES = [RNG.standard_normal(n).astype(np.float32) for n in (16_000, 6_400, 11_000, 8_000, 9_600, 12_800)]


def _cached_encoder(encoder_dir, root):
    encoder = load_encoder(EncoderConfig(str(encoder_dir)))
    encoder.cache = FeatureCache(root)
    return encoder


@pytest.mark.parametrize("kind", ["wavlm", "whisper"])
def test_each_utterance_is_encoded_once_and_read_back_bit_for_bit(kind, wavlm_dir, whisper_dir, tmp_path):
    encoder_dir = wavlm_dir if kind == "wavlm" else whisper_dir
    plain = load_encoder(EncoderConfig(str(encoder_dir)))
    expected, expected_lengths = plain(WAVES[:3])
    first = _cached_encoder(encoder_dir, tmp_path)
    frames, lengths = first(WAVES[:3])
    assert (first.encoded, first.cached) == (3, 0)
    assert torch.equal(frames, expected) and torch.equal(lengths, expected_lengths)
    # Another process's encoder (a new object, loaded again) reads every utterance back, in any batch.
    second = _cached_encoder(encoder_dir, tmp_path)
    frames, lengths = second([WAVES[2], WAVES[0], WAVES[1], WAVES[0]])
    assert (second.encoded, second.cached) == (0, 4)
    assert torch.equal(frames[0, : lengths[0]], expected[2, : expected_lengths[2]])
    assert torch.equal(frames[3], frames[1]) and torch.equal(frames[1, : lengths[1]], expected[0])
    fingerprint, _ = encoder_fingerprint(second.model, second.feature_extractor, kind)
    assert second.cache.entries(fingerprint) == 3
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".lock"))]


def test_a_speech_llm_computes_the_same_loss_with_and_without_the_cache(wavlm_dir, qwen_dir, tmp_path):
    cfg = SpeechLLMConfig(EncoderConfig(str(wavlm_dir)), DecoderConfig(str(qwen_dir)), ProjectorConfig(hidden=32))
    torch.manual_seed(0)
    model = build_speech_llm(cfg)
    targets = ["the river ran cold", "a cat", "she kept a diary"]
    without = model(WAVES[:3], targets)
    model.encoder.cache = FeatureCache(tmp_path)
    filling, reading = model(WAVES[:3], targets), model(WAVES[:3], targets)
    assert model.encoder.encoded == 3 + 3 and model.encoder.cached == 3  # 3 without the cache, 3 to fill it
    assert torch.equal(without, filling) and torch.equal(without, reading)


def test_bfloat16_frames_are_stored_in_their_own_dtype(wavlm_dir, tmp_path):
    encoder = _cached_encoder(wavlm_dir, tmp_path).to(torch.bfloat16)
    computed, _ = encoder(WAVES[:2])
    read, _ = encoder(WAVES[:2])
    assert computed.dtype == read.dtype == torch.bfloat16
    assert torch.equal(computed, read) and encoder.cached == 2
    # float32 frames of the same encoder are another entry: the dtype is part of the fingerprint.
    encoder.to(torch.float32)
    encoder(WAVES[:1])
    assert encoder.encoded == 3


def test_the_fingerprint_covers_the_weights_and_not_where_the_files_are(wavlm_dir, tmp_path):
    encoder = load_encoder(EncoderConfig(str(wavlm_dir)))
    fingerprint, describe = encoder_fingerprint(encoder.model, encoder.feature_extractor, "wavlm")
    assert describe["dim"] == encoder.dim and describe["dtype"] == "float32" and describe["device"] == "cpu"
    encoder.model.save_pretrained(tmp_path / "moved")
    encoder.feature_extractor.save_pretrained(tmp_path / "moved")
    moved = load_encoder(EncoderConfig(str(tmp_path / "moved")))
    assert encoder_fingerprint(moved.model, moved.feature_extractor, "wavlm")[0] == fingerprint
    with torch.no_grad():
        next(moved.model.parameters()).view(-1)[0] += 1e-6
    assert encoder_fingerprint(moved.model, moved.feature_extractor, "wavlm")[0] != fingerprint


def test_the_key_is_the_audio_itself():
    assert audio_key(WAVES[0]) == audio_key(WAVES[0].copy()) == audio_key(WAVES[0].astype(np.float64))
    assert audio_key(WAVES[0]) != audio_key(WAVES[0][:-1])
    changed = WAVES[0].copy()
    changed[100] = np.nextafter(changed[100], np.float32(2))
    assert audio_key(changed) != audio_key(WAVES[0])


def test_an_unreadable_entry_is_computed_again_and_replaced(wavlm_dir, tmp_path):
    encoder = _cached_encoder(wavlm_dir, tmp_path)
    expected, _ = encoder(WAVES[:1])
    (entry,) = tmp_path.rglob("*.npy")
    entry.write_bytes(entry.read_bytes()[:100])  # truncated, as by a crash mid-write
    again, _ = encoder(WAVES[:1])
    assert encoder.encoded == 2 and torch.equal(again, expected)
    assert encoder(WAVES[:1])[0].equal(expected) and encoder.cached == 1


def test_a_lock_left_by_a_dead_worker_does_not_stop_the_others(wavlm_dir, tmp_path):
    encoder = _cached_encoder(wavlm_dir, tmp_path)
    fingerprint, _ = encoder_fingerprint(encoder.model, encoder.feature_extractor, "wavlm")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    key = audio_key(WAVES[0])
    lock = tmp_path / fingerprint / key[:2] / f"{key}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{socket.gethostname()} {dead.pid}\n")  # killed while it encoded this utterance
    other = tmp_path / fingerprint / audio_key(WAVES[1])[:2] / f"{audio_key(WAVES[1])}.lock"
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_text("gpu-node-7 4242\n")  # another host's, silent for longer than STALE_SECONDS
    os.utime(other, (time.time() - STALE_SECONDS - 1,) * 2)
    began = time.monotonic()
    encoder(WAVES[:2])
    assert encoder.encoded == 2 and time.monotonic() - began < 30
    assert not lock.exists() and not other.exists()


def test_two_processes_filling_the_cache_at_once_encode_each_utterance_once(wavlm_dir, tmp_path):
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)  # both loaded, then both encode the same utterances in the same order
    results = context.Queue()
    workers = [context.Process(target=_fill, args=(str(wavlm_dir), str(tmp_path), start, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    counts = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    # Together they ran the encoder once per utterance (often one of them all six, the other waiting on its locks
    # each time); each read the rest back.
    assert sum(encoded for encoded, _ in counts) == len(WAVES)
    assert all(encoded + cached == len(WAVES) for encoded, cached in counts)
    plain = load_encoder(EncoderConfig(str(wavlm_dir)))
    reader = _cached_encoder(wavlm_dir, tmp_path)
    for wave in WAVES:
        assert torch.equal(reader([wave])[0], plain([wave])[0])
    assert reader.encoded == 0
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".lock"))]


def _fill(encoder_dir: str, root: str, start, results) -> None:
    encoder = _cached_encoder(encoder_dir, root)
    encoder([np.zeros(4_000, np.float32)])  # the fingerprint is hashed before the race
    encoded, cached = encoder.encoded, encoder.cached
    start.wait()
    for wave in WAVES:
        encoder([wave])
    results.put((encoder.encoded - encoded, encoder.cached - cached))
