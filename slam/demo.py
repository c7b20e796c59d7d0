"""Builds the shipped demo world: a tiny spoken corpus and two tiny pretrained backbones.

    python -m slam.demo corpus      # audio + manifests from experiments/demo/sentences.tsv
    python -m slam.demo backbones   # pretrain the speech encoder and the decoder LM, check their gates
    python -m slam.demo all         # both (add --regenerate-text to redraw sentences.tsv first)

Everything lands in `experiments/demo/` (or `--out DIR`):

- `sentences.tsv` (id, split, english, toy): the source of truth for the text. It was drawn once
  from the small grammar below (`generate_sentences`, seeded) and is committed; `corpus` reads it
  and only `--regenerate-text` redraws it. 380 train, 40 dev and 60 test sentences of 4-8 words
  over a 123-word vocabulary; dev and test sentences never occur in train, but every word they
  use does. `toy` is the Toy translation, `translate(english)`: a fixed word-by-word dictionary of
  made-up words plus one reordering rule (an adjective follows its noun).
- `audio/<id>.flac`: espeak-ng speech (voice, variant, speed and pitch drawn per utterance),
  resampled from 22.05 kHz to 16 kHz, silence trimmed, 16-bit mono FLAC with the samples rounded
  to `AUDIO_BITS` significant bits so that 480 utterances (about 14 minutes) fit in 5 MB.
- `train.jsonl`, `dev.jsonl`, `test.jsonl`: one utterance per line,
  `{"id", "audio" (relative to the manifest), "text", "translation", "language": "en"}`.
- `models/encoder/`: a tiny WavLM (WavLM Large's convolutional front end, narrowed: total stride
  320, so 50 Hz frames) pretrained with a character CTC head on the train audio, with speed and
  noise augmentation. The head is dropped; the body is saved with its `Wav2Vec2FeatureExtractor`,
  so `slam.model.load_encoder` loads it.
- `models/decoder/`: a tiny Qwen2-shaped causal LM (8 layers, so that pruning has depth to work
  on) with a byte-level BPE tokenizer, pretrained on the train sentences plus 20,000 more drawn
  from the grammar (never a dev or test sentence), each with its Toy translation. Besides plain
  English and Toy sentences it learns the two SLAM tasks in the SLAM input layout, with a stand-in
  for the speech in the speech slot: `[slot] Transcribe speech to text. <english><eos>` and
  `[slot] Translate speech to Toy. <toy><eos>`. The slot holds the English sentence either as its
  tokens (sometimes repeated, with gaps, as speech holds a word for several 10 Hz positions) or
  spelled out: letters and spaces in chunks of 1-3, each chunk one position (the mean of its
  letters' embeddings), which is about what a character-level encoder carries at 10 Hz. Gaussian
  noise blurs the slot.

Why the decoder learns more than the train text, and spelled slots. SLAM trains only the projector,
here on 380 utterances, so the frozen LM must already read whatever the projector can learn to
write. An LM that has seen only the train sentences memorises them: a projector trained on their
audio then merely cues a memorised sentence (train WER 0, test WER 68% in our check). One that only
reads word tokens asks the projector to turn 100 ms of character-level features into whole words,
which 380 utterances do not teach it to do on unseen sentences (test WER 52%). Reading spelled
chunks leaves the projector a local job, "the letters heard in these 100 ms", that does carry over.

Each backbone build reports its quality gate on dev and the command fails if one is missed: the
encoder's greedy CTC character error rate, and an oracle check of the LM (dev English tokens in the
speech slot, then each prompt, greedy decoding: WER and BLEU; spelled slots reported beside them).

Runtime on 2 free CPU cores: about 10 s for the corpus, 8 minutes for the encoder and 10 for the
decoder. Everything is seeded: the text and the audio are reproduced exactly (given espeak-ng
1.51); the weights are repeatable on the same machine and thread count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import jiwer
import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import nn
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    Wav2Vec2FeatureExtractor,
    WavLMConfig,
    WavLMModel,
)

from slam.config import DataConfig
from slam.data import Sample, load_dataset
from slam.metrics import corpus_bleu, corpus_wer
from slam.model import position_ids_from_mask
from slam.tiny import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "experiments" / "demo"
SAMPLE_RATE = 16_000
SPLITS = ("train", "dev", "test")
ASR_PROMPT = "Transcribe speech to text."
"""The SLAM prompt of the demo's ASR task (target: the English transcript)."""
AST_PROMPT = "Translate speech to Toy."
"""The SLAM prompt of the demo's AST task (target: the Toy translation)."""

# One part of speech per word, and no two words that espeak-ng pronounces alike (checked with
# `espeak-ng -x`), so that a transcript is recoverable from the audio.
LEXICON: dict[str, tuple[str, ...]] = {
    "det": ("the", "my", "your", "this", "that", "his", "her"),
    "adj": (
        "big", "small", "old", "young", "green", "black", "white", "brown", "happy", "quiet", "little", "tall",
        "warm", "cold", "yellow", "heavy", "clever", "lazy", "angry", "gentle", "purple", "silver", "golden", "tiny",
    ),
    "noun": (
        "dog", "cat", "horse", "bird", "fish", "farmer", "teacher", "doctor", "baker", "girl", "boy", "king",
        "queen", "tiger", "rabbit", "mouse", "monkey", "lion", "spider", "sailor", "painter", "child", "robot",
        "dragon", "wizard", "pirate", "soldier", "turtle", "parrot", "goat", "frog", "duck", "camel", "donkey",
        "apple", "ball", "book", "box", "cup", "chair", "basket", "letter", "hat",
    ),
    "place": ("garden", "river", "bridge", "forest", "mountain", "village", "castle", "kitchen", "market", "school"),
    "vt": (
        "likes", "finds", "follows", "watches", "helps", "carries", "paints", "pushes", "pulls", "catches",
        "visits", "calls", "chases", "feeds",
    ),
    "vi": (
        "sleeps", "sings", "runs", "jumps", "dances", "smiles", "walks", "swims", "laughs", "hides", "works",
        "plays", "sits",
    ),
    "prep": ("in", "near", "under", "behind", "inside", "beside"),
    "adv": ("quickly", "slowly", "loudly", "softly", "today", "again"),
}  # fmt: skip

# Sentence shapes (4-8 words) with their drawing weights; short ones are favoured to fit more
# utterances into the audio budget. A `place` only follows a preposition.
TEMPLATES: tuple[tuple[tuple[str, ...], int], ...] = (
    (("det", "noun", "vi", "adv"), 3),
    (("det", "adj", "noun", "vi", "adv"), 3),
    (("det", "noun", "vi", "prep", "det", "place"), 2),
    (("det", "adj", "noun", "vt", "det", "noun"), 3),
    (("det", "noun", "vt", "det", "adj", "noun"), 3),
    (("det", "adj", "noun", "vi", "prep", "det", "place"), 2),
    (("det", "adj", "noun", "vt", "det", "adj", "noun"), 2),
    (("det", "noun", "vt", "det", "noun", "prep", "det", "place"), 1),
)
NOUN_LIKE = ("noun", "place")

AUDIO_BITS = 7
"""Significant bits kept per sample. The FLAC files are 16-bit, but with samples rounded to 7 bits
FLAC stores about 6 kB per second instead of 20 kB, which is what fits 480 utterances into 5 MB.
The rounding noise sits 25-30 dB below the speech, which stays clearly intelligible."""
VOICES = (
    "en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc",
)  # fmt: skip
VARIANTS = ("", "+m1", "+m2", "+m3", "+m4", "+f1", "+f2", "+f3", "+f4")
CHARACTERS = " abcdefghijklmnopqrstuvwxyz"
"""The encoder's CTC alphabet; id 0 is the CTC blank, so character i has id i + 1."""

MAX_ENCODER_DEV_CER = 0.15
"""Gate: greedy CTC character error rate of the pretrained encoder on dev audio."""
MAX_ORACLE_DEV_WER = 0.05
"""Gate: WER of the LM on dev with the English in the speech slot (as tokens, and spelled out)."""
MIN_ORACLE_DEV_BLEU = 80.0
"""Gate: BLEU of the LM's Toy translations on dev with the English in the speech slot (both ways)."""


@dataclass(frozen=True)
class Sentence:
    """One row of `sentences.tsv`."""

    id: str
    """Utterance id, `<split>-<number>`; also the audio file's stem."""
    split: str
    """`train`, `dev` or `test`."""
    english: str
    """The English sentence: lower case, no punctuation; the transcript of the audio."""
    toy: str
    """Its Toy translation, `translate(english)`."""


@dataclass(frozen=True)
class TextConfig:
    """The sentence list: how many sentences per split, drawn from the grammar with which seed."""

    train: int = 380
    """Sentences in the training split."""
    dev: int = 40
    """Sentences in the dev split, none of them in train."""
    test: int = 60
    """Sentences in the test split, none of them in train or dev."""
    more_test: int = 240
    """Test sentences drawn after `test` and after the LM's pretraining text, none of them in that text: 60 test
    utterances (356 words) measure a WER to about +-1.5 points, too coarse for a 25% threshold at 9%."""
    seed: int = 0
    """Seeds the grammar draws."""

    def __post_init__(self) -> None:
        for name in SPLITS:
            _positive(f"text.{name}", getattr(self, name))
        _require(self.more_test >= 0, "text.more_test", self.more_test, "a non-negative integer")


@dataclass(frozen=True)
class AudioConfig:
    """Speech synthesis with espeak-ng: a voice, speed and pitch drawn per utterance."""

    min_speed: int = 160
    """Slowest speaking rate, words per minute."""
    max_speed: int = 210
    """Fastest speaking rate, words per minute."""
    min_pitch: int = 25
    """Lowest pitch on espeak-ng's 0-99 scale."""
    max_pitch: int = 75
    """Highest pitch on espeak-ng's 0-99 scale."""
    seed: int = 0
    """Seeds the per-utterance voice, speed and pitch."""
    max_bytes: int = 8_000_000
    """Budget of all FLAC files together; the build fails above it."""

    def __post_init__(self) -> None:
        _require(0 < self.min_speed <= self.max_speed, "audio.min_speed", self.min_speed, "0 < min <= max_speed")
        _require(
            0 <= self.min_pitch <= self.max_pitch <= 99, "audio.min_pitch", self.min_pitch, "0 <= min <= max <= 99"
        )
        _positive("audio.max_bytes", self.max_bytes)


@dataclass(frozen=True)
class EncoderTrainConfig:
    """The tiny WavLM and its CTC pretraining on the train audio."""

    hidden: int = 128
    """Transformer width d_e."""
    layers: int = 4
    """Transformer layers."""
    heads: int = 4
    """Attention heads."""
    conv_dim: int = 32
    """Channels of each of the 7 convolutions of the waveform front end."""
    steps: int = 3000
    """Optimiser steps."""
    batch_size: int = 8
    """Utterances per step."""
    lr: float = 2e-3
    """Peak learning rate (AdamW), reached after `warmup` steps, then cosine decay to 0."""
    warmup: int = 150
    """Linear warm-up steps."""
    speeds: tuple[float, ...] = (0.9, 1.0, 1.1)
    """Speed-perturbation factors, one drawn per utterance and step."""
    min_snr_db: float = 15.0
    """Lowest signal-to-noise ratio of the white noise added to each training utterance."""
    seed: int = 0
    """Seeds the initialisation, the batches and the augmentation."""

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "conv_dim", "steps", "batch_size", "warmup"):
            _positive(f"encoder.{name}", getattr(self, name))
        _require(self.hidden % self.heads == 0, "encoder.heads", self.heads, "a divisor of encoder.hidden")
        _require(self.lr > 0, "encoder.lr", self.lr, "a positive number")
        _require(all(s > 0 for s in self.speeds) and self.speeds, "encoder.speeds", self.speeds, "positive factors")


@dataclass(frozen=True)
class DecoderTrainConfig:
    """The tiny Qwen2-shaped LM, its tokenizer and its pretraining on train-split text."""

    layers: int = 8
    """Decoder layers m."""
    hidden: int = 128
    """Model width d_llm."""
    heads: int = 4
    """Attention heads."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention, as in Qwen2.5)."""
    intermediate: int = 384
    """Width of each MLP."""
    vocab_size: int = 1024
    """BPE vocabulary size, large enough for most corpus words to be one token."""
    extra_sentences: int = 20_000
    """Grammar sentences learnt besides the train split (never a dev or test sentence)."""
    steps: int = 4000
    """Optimiser steps."""
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW), reached after `warmup` steps, then cosine decay to 0."""
    warmup: int = 200
    """Linear warm-up steps."""
    task_fraction: float = 0.85
    """Fraction of sequences in the SLAM layout (half ASR, half AST); the rest are plain sentences."""
    max_repeat: int = 4
    """In half of the word slots each token is repeated 1..max_repeat times, as speech lasts."""
    spelled_fraction: float = 0.75
    """Fraction of task sequences whose slot spells the sentence out in chunks of 1-3 characters."""
    slot_noise: float = 0.5
    """Up to this much Gaussian noise, relative to the embeddings' RMS, is added to the slot."""
    seed: int = 0
    """Seeds the initialisation and the batches."""

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab_size", "steps"):
            _positive(f"decoder.{name}", getattr(self, name))
        for name in ("batch_size", "warmup", "max_repeat"):
            _positive(f"decoder.{name}", getattr(self, name))
        _require(self.hidden % self.heads == 0, "decoder.heads", self.heads, "a divisor of decoder.hidden")
        _require(self.heads % self.kv_heads == 0, "decoder.kv_heads", self.kv_heads, "a divisor of decoder.heads")
        _require(self.lr > 0, "decoder.lr", self.lr, "a positive number")
        _require(0 <= self.task_fraction <= 1, "decoder.task_fraction", self.task_fraction, "a fraction in [0, 1]")
        _require(self.slot_noise >= 0, "decoder.slot_noise", self.slot_noise, "a non-negative number")


@dataclass(frozen=True)
class GateResult:
    """What a backbone build measured on dev, and whether it passed its gate."""

    name: str
    """`encoder` or `decoder`."""
    metrics: dict[str, float]
    """The gate's numbers (dev CER; oracle dev WER and BLEU)."""
    passed: bool
    """Whether every number is within its limit."""
    seconds: float
    """Wall-clock build time."""


@lru_cache(maxsize=1)
def toy_dictionary() -> dict[str, str]:
    """The fixed English -> Toy word dictionary: made-up CV-syllable words derived from a hash.

    Function words get one syllable, content words two; collisions (with each other or with an
    English word) are resolved by rehashing, in lexicon order.
    """
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    taken = {w for words in LEXICON.values() for w in words}
    table = {}
    for pos, words in LEXICON.items():
        syllables = 1 if pos in ("det", "prep") else 2
        for word in words:
            salt = 0
            while True:
                digest = hashlib.sha256(f"{word}/{salt}".encode()).digest()
                toy = "".join(
                    consonants[digest[2 * i] % len(consonants)] + vowels[digest[2 * i + 1] % len(vowels)]
                    for i in range(syllables)
                )
                if toy not in taken:
                    break
                salt += 1
            taken.add(toy)
            table[word] = toy
    return table


def translate(english: str) -> str:
    """The Toy translation of an English corpus sentence.

    Word by word through `toy_dictionary`, except that an adjective moves after the noun it precedes:
    "the green dog" becomes the Toy words for "the dog green".

    Raises:
        ValueError: A word is not in the lexicon.
    """
    pos, toy = _part_of_speech(), toy_dictionary()
    words = english.split()
    for word in words:
        if word not in pos:
            raise ValueError(f"{word!r} (in {english!r}) is not a word of the demo lexicon")
    out, i = [], 0
    while i < len(words):
        if pos[words[i]] == "adj" and i + 1 < len(words) and pos[words[i + 1]] in NOUN_LIKE:
            out += [toy[words[i + 1]], toy[words[i]]]
            i += 2
        else:
            out.append(toy[words[i]])
            i += 1
    return " ".join(out)


def generate_sentences(cfg: TextConfig, lm: DecoderTrainConfig | None = None) -> list[Sentence]:
    """Draw unique sentences from the grammar: train first, then dev and test from what is left.

    A dev or test sentence is redrawn when it uses a word that train does not, so held-out
    sentences are unseen combinations of seen words. No content word repeats within a sentence.
    The last `cfg.more_test` test sentences are drawn on from there, and also never one of the LM's
    pretraining text (`draw_extra_sentences`, which excludes every corpus sentence): adding them leaves
    that text, and so the LM built from it, as it was.

    Args:
        cfg: Split sizes and seed.
        lm: The LM whose pretraining text the added test sentences avoid; None: `DecoderTrainConfig()`.

    Returns:
        The sentences of all splits, train then dev then test, ids numbered per split.
    """
    rng = random.Random(cfg.seed)
    decks: dict[str, list[str]] = {pos: [] for pos in LEXICON}
    seen: set[str] = set()
    train_words: set[str] = set()
    rows = []
    for split in SPLITS:
        count = 0
        while count < getattr(cfg, split):
            english = _draw_sentence(rng, decks)
            if english in seen or (split != "train" and not set(english.split()) <= train_words):
                continue
            seen.add(english)
            if split == "train":
                train_words.update(english.split())
            count += 1
            rows.append(Sentence(f"{split}-{count:04d}", split, english, translate(english)))
    lm = lm or DecoderTrainConfig()
    learnt = set(draw_extra_sentences(lm.extra_sentences, [row.english for row in rows], lm.seed))
    count = cfg.test
    while count < cfg.test + cfg.more_test:
        english = _draw_sentence(rng, decks)
        if english in seen or english in learnt or not set(english.split()) <= train_words:
            continue
        seen.add(english)
        count += 1
        rows.append(Sentence(f"test-{count:04d}", "test", english, translate(english)))
    return rows


def draw_extra_sentences(count: int, exclude: Sequence[str], seed: int) -> list[str]:
    """`count` more unique grammar sentences, none of them in `exclude` (text only, no audio)."""
    rng = random.Random(seed)
    decks: dict[str, list[str]] = {pos: [] for pos in LEXICON}
    seen, sentences = set(exclude), []
    while len(sentences) < count:
        english = _draw_sentence(rng, decks)
        if english not in seen:
            seen.add(english)
            sentences.append(english)
    return sentences


def write_sentences(rows: Sequence[Sentence], path: str | Path) -> None:
    """Write `rows` as a tab-separated file with a header (id, split, english, toy)."""
    lines = ["id\tsplit\tenglish\ttoy"] + [f"{r.id}\t{r.split}\t{r.english}\t{r.toy}" for r in rows]
    Path(path).write_text("\n".join(lines) + "\n")


def read_sentences(path: str | Path) -> list[Sentence]:
    """Read `sentences.tsv`.

    Raises:
        ValueError: The header or a row is malformed, or a split name is unknown.
    """
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0].split("\t") != ["id", "split", "english", "toy"]:
        raise ValueError(f"{path}: expected the header 'id<TAB>split<TAB>english<TAB>toy'")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 4 or fields[1] not in SPLITS:
            raise ValueError(f"{path}:{number}: expected 4 tab-separated fields with a split in {SPLITS}")
        rows.append(Sentence(*fields))
    return rows


def build_corpus(
    rows: Sequence[Sentence], out_dir: str | Path = DEMO_DIR, cfg: AudioConfig | None = None
) -> dict[str, float]:
    """Synthesise every sentence with espeak-ng and write the FLAC files and the split manifests.

    Args:
        rows: The sentences (`read_sentences`).
        out_dir: Where `audio/` and `<split>.jsonl` go; stale files in `audio/` are removed.
        cfg: Voices, speeds, pitches and the size budget.

    Returns:
        Summary numbers: utterances per split, total seconds and total bytes of audio.

    Raises:
        RuntimeError: espeak-ng fails, or the audio exceeds `cfg.max_bytes`.
    """
    cfg = cfg or AudioConfig()
    out = Path(out_dir)
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    wanted = {f"{row.id}.flac" for row in rows}
    for stale in audio_dir.glob("*.flac"):
        if stale.name not in wanted:
            stale.unlink()
    with ThreadPoolExecutor(max_workers=4) as pool:
        seconds = list(pool.map(lambda row: synthesise_utterance(row, audio_dir / f"{row.id}.flac", cfg), rows))
    for split in SPLITS:
        lines = [
            json.dumps(
                {
                    "id": row.id,
                    "audio": f"audio/{row.id}.flac",
                    "text": row.english,
                    "translation": row.toy,
                    "language": "en",
                }
            )
            for row in rows
            if row.split == split
        ]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    total_bytes = sum((audio_dir / name).stat().st_size for name in wanted)
    if total_bytes > cfg.max_bytes:
        raise RuntimeError(f"the audio takes {total_bytes:,} bytes, over the {cfg.max_bytes:,}-byte budget")
    summary = {split: sum(row.split == split for row in rows) for split in SPLITS}
    return {**summary, "seconds": round(sum(seconds), 1), "bytes": total_bytes}


def synthesise_utterance(row: Sentence, path: str | Path, cfg: AudioConfig) -> float:
    """Speak `row.english` with espeak-ng and write it to `path` as 16 kHz FLAC; returns its seconds.

    The voice, speed and pitch are drawn from a generator seeded by `cfg.seed` and the row's id, so
    an utterance does not depend on the others. Silence at both ends is trimmed, the peak is set to
    0.9 and the samples are rounded to `AUDIO_BITS` bits.
    """
    rng = random.Random(f"{cfg.seed}/{row.id}")
    voice = rng.choice(VOICES) + rng.choice(VARIANTS)
    speed = rng.randint(cfg.min_speed, cfg.max_speed)
    pitch = rng.randint(cfg.min_pitch, cfg.max_pitch)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(wav), row.english]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wav.exists():
            raise RuntimeError(f"{row.id}: {' '.join(cmd)} failed: {done.stderr.strip()}")
        audio, rate = sf.read(wav, dtype="float32")
    audio = torchaudio.functional.resample(torch.from_numpy(audio), rate, SAMPLE_RATE).numpy()  # (T,)
    audio = _trim_silence(audio)
    step = 2 ** (16 - AUDIO_BITS)
    peak = float(np.abs(audio).max())
    samples = np.round(audio / peak * 0.9 * 32767 / step).astype(np.int16) * step  # (T,)
    sf.write(path, samples, SAMPLE_RATE, format="FLAC", subtype="PCM_16", compression_level=1.0)
    return len(samples) / SAMPLE_RATE


def train_encoder(
    train: Sequence[Sample],
    dev: Sequence[Sample],
    out_dir: str | Path,
    cfg: EncoderTrainConfig | None = None,
    log=print,
) -> GateResult:
    """Pretrain a tiny WavLM with a character CTC head on `train`, save its body, gate it on `dev`.

    Args:
        train: Utterances (`slam.data`) whose audio and `text` train the encoder.
        dev: Utterances on which the greedy CTC character error rate is measured.
        out_dir: Where the WavLM body and its `Wav2Vec2FeatureExtractor` are saved (the head is dropped).
        cfg: Model size, augmentation and optimisation.
        log: Receives progress lines.

    Returns:
        The gate: `dev_cer` against `MAX_ENCODER_DEV_CER`.
    """
    cfg = cfg or EncoderTrainConfig()
    start = time.time()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    body = WavLMModel(_wavlm_config(cfg))
    head = nn.Linear(cfg.hidden, len(CHARACTERS) + 1)
    waves = [sample.audio for sample in train]
    perturbed = [[_change_speed(wave, speed) for speed in cfg.speeds] for wave in waves]
    labels = [torch.tensor(_char_ids(sample.text)) for sample in train]
    params = list(body.parameters()) + list(head.parameters())
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _warmup_cosine(cfg.warmup, cfg.steps))
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    body.train()
    running = 0.0
    for step in range(1, cfg.steps + 1):
        batch = rng.choice(len(train), size=min(cfg.batch_size, len(train)), replace=False)
        audio = [_add_noise(perturbed[i][rng.integers(len(cfg.speeds))], rng, cfg.min_snr_db) for i in batch]
        hidden, lengths = _encode(body, extractor, audio)  # (B, T', d_e), (B,)
        log_probs = head(hidden).log_softmax(dim=-1).transpose(0, 1)  # (T', B, C)
        targets = [labels[i] for i in batch]
        loss = ctc(log_probs, torch.cat(targets), lengths, torch.tensor([len(t) for t in targets]))
        optimiser.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        running += loss.item()
        if step % 100 == 0:
            log(f"encoder step {step}/{cfg.steps}: CTC loss {running / 100:.3f} ({time.time() - start:.0f} s)")
            running = 0.0
    body.eval()
    hypotheses = ctc_transcribe(body, head, extractor, [sample.audio for sample in dev])
    cer = float(jiwer.cer([sample.text for sample in dev], hypotheses))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body.save_pretrained(out)
    extractor.save_pretrained(out)
    gate = GateResult("encoder", {"dev_cer": round(cer, 4)}, cer <= MAX_ENCODER_DEV_CER, round(time.time() - start, 1))
    (out / "demo_pretraining.json").write_text(json.dumps({"config": asdict(cfg), "gate": asdict(gate)}, indent=2))
    return gate


@torch.no_grad()
def ctc_transcribe(
    body: WavLMModel, head: nn.Module, extractor, waves: Sequence[np.ndarray], batch_size: int = 16
) -> list[str]:
    """Greedy CTC transcripts: the best class per frame, repeats merged, blanks dropped.

    Args:
        body: The WavLM.
        head: Linear CTC head over the blank and `CHARACTERS`.
        extractor: The WavLM's feature extractor.
        waves: Mono 16 kHz waveforms.
        batch_size: Utterances per forward pass.

    Returns:
        One transcript per waveform, spaces normalised.
    """
    texts = []
    for first in range(0, len(waves), batch_size):
        hidden, lengths = _encode(body, extractor, waves[first : first + batch_size])  # (B, T', d_e), (B,)
        for best, length in zip(head(hidden).argmax(-1), lengths):
            ids = torch.unique_consecutive(best[: int(length)]).tolist()
            texts.append(" ".join("".join(CHARACTERS[i - 1] for i in ids if i > 0).split()))
    return texts


def train_decoder(
    rows: Sequence[Sentence], out_dir: str | Path, cfg: DecoderTrainConfig | None = None, log=print
) -> GateResult:
    """Pretrain a tiny Qwen2-shaped LM and its tokenizer on text, save it, gate it on dev.

    The text is the train split plus `cfg.extra_sentences` further grammar sentences, none of them a
    dev or test sentence: with the train split alone the LM memorises those sentences, and a projector
    trained on the same utterances then only has to cue a memorised sentence instead of conveying
    every word. Sequences are plain English or Toy sentences, or the two SLAM tasks in the SLAM input
    layout with the English tokens in the speech slot (see the module docstring); each is tokenised
    piece by piece exactly as `slam.model.SpeechLLM` does, and the task loss covers the target and
    EOS only.

    Args:
        rows: All corpus sentences; train text is learnt, dev is the oracle gate, test is kept out.
        out_dir: Where the model and its tokenizer are saved.
        cfg: Model size, text, optimisation and slot emulation.
        log: Receives progress lines.

    Returns:
        The gate: the oracle scores of `oracle_scores`; token and spelled slots must both be within
        `MAX_ORACLE_DEV_WER` and `MIN_ORACLE_DEV_BLEU`.
    """
    cfg = cfg or DecoderTrainConfig()
    start = time.time()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    english = [row.english for row in rows if row.split == "train"]
    english += draw_extra_sentences(cfg.extra_sentences, [row.english for row in rows], cfg.seed)
    pairs = [(text, translate(text)) for text in english]
    texts = [text for pair in pairs for text in pair] + [ASR_PROMPT, AST_PROMPT]
    tokenizer = build_tokenizer(texts, "qwen2", vocab_size=cfg.vocab_size)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden,
            intermediate_size=cfg.intermediate,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=512,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            tie_word_embeddings=True,
        )
    )
    chars = _char_token_ids(tokenizer)
    encoded = [(_ids(tokenizer, text), _ids(tokenizer, toy), [chars[c] for c in text]) for text, toy in pairs]
    prompts = {"asr": _ids(tokenizer, ASR_PROMPT), "ast": _ids(tokenizer, AST_PROMPT)}
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, _warmup_cosine(cfg.warmup, cfg.steps))
    model.train()
    running = 0.0
    for step in range(1, cfg.steps + 1):
        batch = [_training_sequence(encoded, prompts, tokenizer.eos_token_id, rng, cfg) for _ in range(cfg.batch_size)]
        loss = _lm_loss(model, batch, tokenizer.pad_token_id, cfg.slot_noise, rng)
        optimiser.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        running += loss.item()
        if step % 100 == 0:
            log(f"decoder step {step}/{cfg.steps}: loss {running / 100:.3f} ({time.time() - start:.0f} s)")
            running = 0.0
    model.eval()
    metrics = oracle_scores(model, tokenizer, [row for row in rows if row.split == "dev"])
    passed = all(
        metrics[f"dev_wer{slot}"] <= MAX_ORACLE_DEV_WER and metrics[f"dev_bleu{slot}"] >= MIN_ORACLE_DEV_BLEU
        for slot in ("", "_spelled")
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    gate = GateResult("decoder", metrics, passed, round(time.time() - start, 1))
    (out / "demo_pretraining.json").write_text(json.dumps({"config": asdict(cfg), "gate": asdict(gate)}, indent=2))
    return gate


@torch.no_grad()
def oracle_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[Sentence]) -> dict:
    """The LM's ASR WER and AST BLEU with each sentence's English in the speech slot.

    `dev_wer`/`dev_bleu` put the English tokens in the slot, once each; `*_repeated` three times
    each, as a 10 Hz speech prefix holds a word for several positions; `*_spelled` put the letters
    and spaces, two per position (the mean of their embeddings).

    Returns:
        WERs as fractions and BLEUs on the 0-100 scale.
    """
    chars = _char_token_ids(tokenizer)
    slots = {
        "": lambda text: [(i,) for i in _ids(tokenizer, text)],
        "_repeated": lambda text: [(i,) for i in _ids(tokenizer, text) for _ in range(3)],
        "_spelled": lambda text: [tuple(chars[c] for c in text[k : k + 2]) for k in range(0, len(text), 2)],
    }
    scores = {}
    for suffix, slot in slots.items():
        transcripts, translations = [], []
        for row in rows:
            for prompt, out in ((ASR_PROMPT, transcripts), (AST_PROMPT, translations)):
                out.append(_greedy(model, tokenizer, slot(row.english) + [(i,) for i in _ids(tokenizer, prompt)]))
        scores[f"dev_wer{suffix}"] = round(corpus_wer(transcripts, [row.english for row in rows]).wer, 4)
        scores[f"dev_bleu{suffix}"] = round(corpus_bleu(translations, [row.toy for row in rows]).bleu, 2)
    return scores


def build_backbones(
    demo_dir: str | Path = DEMO_DIR,
    encoder_cfg: EncoderTrainConfig | None = None,
    decoder_cfg: DecoderTrainConfig | None = None,
    log=print,
) -> list[GateResult]:
    """Pretrain both backbones from the corpus in `demo_dir` into `demo_dir/models/{encoder,decoder}`.

    Returns:
        The encoder's and the decoder's gate results.
    """
    demo = Path(demo_dir)
    rows = read_sentences(demo / "sentences.tsv")
    train, dev = (
        list(load_dataset(DataConfig(source="manifest", path=str(demo / f"{split}.jsonl"))).samples())
        for split in ("train", "dev")
    )
    encoder = train_encoder(train, dev, demo / "models" / "encoder", encoder_cfg, log)
    log(_gate_line(encoder))
    decoder = train_decoder(rows, demo / "models" / "decoder", decoder_cfg, log)
    log(_gate_line(decoder))
    return [encoder, decoder]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `python -m slam.demo {corpus,backbones,all} [--regenerate-text] [--out DIR]`."""
    parser = argparse.ArgumentParser(prog="python -m slam.demo", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("corpus", "backbones", "all"))
    parser.add_argument("--out", default=str(DEMO_DIR), help="the demo directory (default: %(default)s)")
    parser.add_argument(
        "--regenerate-text", action="store_true", help="redraw sentences.tsv from the grammar before the audio"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    tsv = out / "sentences.tsv"
    start = time.time()
    if args.command in ("corpus", "all"):
        if args.regenerate_text:
            out.mkdir(parents=True, exist_ok=True)
            write_sentences(generate_sentences(TextConfig()), tsv)
        elif not tsv.is_file():
            parser.error(f"{tsv} does not exist: pass --regenerate-text to draw it from the grammar")
        summary = build_corpus(read_sentences(tsv), out)
        print(f"corpus: {summary} ({time.time() - start:.0f} s)")
    if args.command in ("backbones", "all"):
        for name in ("sentences.tsv", "train.jsonl", "dev.jsonl"):
            if not (out / name).is_file():
                parser.error(f"{out / name} does not exist: build the corpus first (python -m slam.demo corpus)")
        gates = build_backbones(out)
        print(f"done in {time.time() - start:.0f} s")
        if not all(gate.passed for gate in gates):
            print("a quality gate failed", file=sys.stderr)
            return 1
    return 0


def _trim_silence(audio: np.ndarray, margin_s: float = 0.03) -> np.ndarray:
    frame = SAMPLE_RATE // 100
    rms = np.sqrt(np.mean(audio[: len(audio) // frame * frame].reshape(-1, frame) ** 2, axis=1))  # (frames,)
    voiced = np.nonzero(rms > 0.03 * rms.max())[0]
    margin = int(margin_s * SAMPLE_RATE)
    start = max(int(voiced[0]) * frame - margin, 0)
    end = min((int(voiced[-1]) + 1) * frame + margin, len(audio))
    return audio[start:end]


def _wavlm_config(cfg: EncoderTrainConfig) -> WavLMConfig:
    # WavLM Large's front end (kernels 10,3,3,3,3,2,2; strides 5,2,2,2,2,2,2: total stride 320, 50 Hz),
    # narrowed; pre-norm transformer with gated relative position bias.
    return WavLMConfig(
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=4 * cfg.hidden,
        conv_dim=(cfg.conv_dim,) * 7,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=32,
        num_conv_pos_embedding_groups=8,
        num_buckets=64,
        max_bucket_distance=200,
        layerdrop=0.0,
        mask_time_prob=0.05,
        mask_time_length=5,
    )


def _encode(body, extractor, waves) -> tuple[torch.Tensor, torch.Tensor]:
    feats = extractor(
        list(waves), sampling_rate=SAMPLE_RATE, padding=True, return_attention_mask=True, return_tensors="pt"
    )
    mask = feats["attention_mask"]  # (B, T)
    hidden = body(feats["input_values"], attention_mask=mask).last_hidden_state  # (B, T', d_e)
    lengths = body._get_feat_extract_output_lengths(mask.sum(dim=1)).to(torch.long).clamp(max=hidden.shape[1])
    return hidden, lengths


def _char_ids(text: str) -> list[int]:
    unknown = set(text) - set(CHARACTERS)
    if unknown:
        raise ValueError(f"{text!r}: characters {sorted(unknown)} are outside the CTC alphabet")
    return [CHARACTERS.index(c) + 1 for c in text]


def _change_speed(wave: np.ndarray, factor: float) -> np.ndarray:
    # Playing `factor` times faster is resampling as if the audio had been recorded at factor * 16 kHz.
    if factor == 1.0:
        return wave
    return torchaudio.functional.resample(torch.from_numpy(wave), round(100 * factor), 100).numpy()


def _add_noise(wave: np.ndarray, rng: np.random.Generator, min_snr_db: float) -> np.ndarray:
    snr_db = rng.uniform(min_snr_db, min_snr_db + 30.0)
    scale = np.sqrt(np.mean(wave**2) / 10 ** (snr_db / 10))
    return (wave + scale * rng.standard_normal(len(wave))).astype(np.float32)


def _warmup_cosine(warmup: int, steps: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    return factor


def _char_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    # The byte-level alphabet holds every letter, and the space as "Ġ".
    return {c: tokenizer.convert_tokens_to_ids("Ġ" if c == " " else c) for c in CHARACTERS}


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _training_sequence(encoded, prompts, eos: int, rng: random.Random, cfg: DecoderTrainConfig):
    # (positions, labels, slot length). Each position is a tuple of token ids whose embeddings are
    # averaged (a single id is a plain token; an empty tuple is a zero vector); labels are -100
    # outside targets and the slot is the first `slot length` positions.
    english, toy, spelled = rng.choice(encoded)
    if rng.random() >= cfg.task_fraction:
        text = (english if rng.random() < 0.5 else toy) + [eos]
        return [(i,) for i in text], text, 0
    task = "asr" if rng.random() < 0.5 else "ast"
    slot = _spelled_slot(spelled, rng, cfg) if rng.random() < cfg.spelled_fraction else _word_slot(english, rng, cfg)
    target = (english if task == "asr" else toy) + [eos]
    context = slot + [(i,) for i in prompts[task]]
    return context + [(i,) for i in target], [-100] * len(context) + target, len(slot)


def _word_slot(ids: list[int], rng: random.Random, cfg: DecoderTrainConfig) -> list[tuple[int, ...]]:
    # Word tokens, once each or (as speech holds a word for several positions) repeated, with gaps.
    repeat = cfg.max_repeat if rng.random() < 0.5 else 1
    slot: list[tuple[int, ...]] = []
    for i in ids:
        slot += [(i,)] * rng.randint(1, repeat)
        if repeat > 1 and rng.random() < 0.3:
            slot.append(())
    return slot


def _spelled_slot(chars: list[int], rng: random.Random, cfg: DecoderTrainConfig) -> list[tuple[int, ...]]:
    # The sentence spelled out (letters and spaces) in consecutive chunks of 1-3 characters, some
    # positions empty: what a character-level speech encoder gives at 10 Hz, about two characters
    # per position.
    rate = rng.uniform(0.0, 1.0)
    blank = rng.uniform(0.0, 0.3)
    slot: list[tuple[int, ...]] = []
    i = 0
    while i < len(chars):
        if rng.random() < blank:
            slot.append(())
            continue
        size = 1 + (rng.random() < rate) + (rng.random() < rate / 2)
        slot.append(tuple(chars[i : i + size]))
        i += size
    return slot


def _lm_loss(model, batch, pad_id: int, slot_noise: float, rng: random.Random) -> torch.Tensor:
    length = max(len(positions) for positions, _, _ in batch)
    ids, weights, labels, noise = [], [], [], []
    for positions, row_labels, slot_length in batch:
        padding = length - len(positions)
        ids.append([list(c) + [pad_id] * (3 - len(c)) for c in positions] + [[pad_id] * 3] * padding)
        weights.append(
            [[1 / max(len(c), 1)] * len(c) + [0.0] * (3 - len(c)) for c in positions] + [[0.0] * 3] * padding
        )
        labels.append(list(row_labels) + [-100] * padding)
        noise.append([rng.uniform(0.0, slot_noise)] * slot_length + [0.0] * (length - slot_length))
    mask = torch.tensor([[1] * len(p) + [0] * (length - len(p)) for p, _, _ in batch])  # (B, L)
    embed = model.get_input_embeddings()
    chunks = embed(torch.tensor(ids)) * torch.tensor(weights).unsqueeze(-1)  # (B, L, 3, D)
    embeds = chunks.sum(dim=2)  # (B, L, D): the mean over each position's ids, zero for an empty one
    rms = embed.weight.detach().pow(2).mean().sqrt()
    embeds = embeds + torch.tensor(noise).unsqueeze(-1) * rms * torch.randn_like(embeds)  # noise on the slot only
    out = model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        labels=torch.tensor(labels),
    )
    return out.loss


@torch.no_grad()
def _greedy(model, tokenizer, context: list[tuple[int, ...]], max_new_tokens: int = 40) -> str:
    embed = model.get_input_embeddings()
    inputs = torch.stack(
        [embed(torch.tensor(c)).mean(0) if c else embed.weight.new_zeros(embed.embedding_dim) for c in context]
    )
    out = model(inputs_embeds=inputs[None], use_cache=True)  # prefill with the context
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        generated.append(token)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokenizer.decode(generated, skip_special_tokens=True).strip()


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: expected {allowed}")


def _positive(name: str, value: object) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value, "a positive integer")


def _draw_sentence(rng: random.Random, decks: dict[str, list[str]]) -> str:
    # One grammar sentence in which no content word repeats.
    shapes = [shape for shape, _ in TEMPLATES]
    weights = [weight for _, weight in TEMPLATES]
    while True:
        shape = rng.choices(shapes, weights)[0]
        words = [_deal(decks, pos, rng) for pos in shape]
        content = [word for word, pos in zip(words, shape) if pos not in ("det", "prep")]
        if len(set(content)) == len(content):
            return " ".join(words)


def _deal(decks: dict[str, list[str]], pos: str, rng: random.Random) -> str:
    # Words of a part of speech are dealt from a shuffled deck, so that each is used about equally.
    if not decks[pos]:
        decks[pos] = rng.sample(LEXICON[pos], len(LEXICON[pos]))
    return decks[pos].pop()


@lru_cache(maxsize=1)
def _part_of_speech() -> dict[str, str]:
    return {word: pos for pos, words in LEXICON.items() for word in words}


def _gate_line(gate: GateResult) -> str:
    return f"{gate.name} gate {'passed' if gate.passed else 'FAILED'}: {gate.metrics} ({gate.seconds:.0f} s)"


if __name__ == "__main__":
    sys.exit(main())
