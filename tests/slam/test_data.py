"""Tests for slam.data: manifests, LibriSpeech directories, `datasets` tables, resampling, subsetting, bad input."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf

from slam.config import DataConfig
from slam.data import MIN_SECONDS, Sample, length_batches, load_dataset, read_audio
from slam.errors import BadInputError
from slam.model import SAMPLE_RATE


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep the arrow files `datasets.load_dataset` writes out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def sine(seconds: float, rate: int = SAMPLE_RATE, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    """A sine of `freq` Hz; channel c has amplitude 0.5 / (c + 1), so the channel mean is known."""
    t = np.arange(round(seconds * rate)) / rate
    wave = np.sin(2 * np.pi * freq * t)
    data = np.stack([0.5 / (c + 1) * wave for c in range(channels)], axis=1)  # (T, C)
    return (data[:, 0] if channels == 1 else data).astype(np.float32)


def write_audio(path: Path, seconds: float, rate: int = SAMPLE_RATE, freq: float = 440.0, channels: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subtype = "FLOAT" if path.suffix == ".wav" else None  # float WAV: exact samples for the mono check
    sf.write(path, sine(seconds, rate, freq, channels), rate, subtype=subtype)
    return path


def flac_bytes(seconds: float, rate: int = SAMPLE_RATE) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, sine(seconds, rate), rate, format="FLAC")
    return buffer.getvalue()


def write_manifest(path: Path, records: list[dict | str]) -> Path:
    """One line per record: a dict is written as JSON, a str as is."""
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def manifest_config(path: Path, **kwargs) -> DataConfig:
    return DataConfig(source="manifest", path=str(path), **kwargs)


def peak_frequency(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)[np.argmax(spectrum)])


@pytest.fixture
def manifest(tmp_path) -> Path:
    """Three entries: relative FLAC, absolute WAV at 8 kHz with a translation, FLAC with id and language."""
    write_audio(tmp_path / "audio" / "a.flac", 0.5)
    absolute = write_audio(tmp_path / "elsewhere" / "b.wav", 1.0, rate=8000)
    write_audio(tmp_path / "audio" / "c.flac", 1.5, rate=44100)
    return write_manifest(
        tmp_path / "set.jsonl",
        [
            {"audio": "audio/a.flac", "text": " hello world "},
            {"audio": str(absolute), "text": "good morning", "translation": "guten Morgen"},
            "",
            {"audio": "audio/c.flac", "text": "bonjour", "translation": "hello", "language": "fr", "id": "utt-c"},
        ],
    )


def test_manifest_fields_paths_ids_and_order(manifest):
    ds = load_dataset(manifest_config(manifest))

    assert len(ds) == 3
    samples = list(ds.samples())
    assert [s.id for s in samples] == ["set.jsonl:1", "set.jsonl:2", "utt-c"]
    assert [s.text for s in samples] == ["hello world", "good morning", "bonjour"]
    assert [s.translation for s in samples] == [None, "guten Morgen", "hello"]
    assert [s.language for s in samples] == ["en", "en", "fr"]
    assert [len(s.audio) for s in samples] == [8000, 16000, 24000]
    assert all(s.audio.dtype == np.float32 and s.audio.ndim == 1 for s in samples)
    assert ds.durations() == pytest.approx([0.5, 1.0, 1.5])
    assert ds.skipped == []


def test_sample_target_by_task(manifest):
    ds = load_dataset(manifest_config(manifest))

    assert ds[1].target("asr") == "good morning"
    assert ds[1].target("ast") == "guten Morgen"
    with pytest.raises(BadInputError, match="set.jsonl:1"):
        ds[0].target("ast")
    with pytest.raises(ValueError, match="asr, ast"):
        ds[0].target("translate")


def test_getitem_decodes_lazily_and_supports_negative_indices(manifest):
    ds = load_dataset(manifest_config(manifest))

    assert ds[-1].id == "utt-c"
    with pytest.raises(IndexError):
        ds[3]


def test_read_audio_resamples_8k_to_16k_keeping_length_and_frequency(tmp_path):
    audio = read_audio(write_audio(tmp_path / "x.wav", 1.0, rate=8000, freq=440.0), "x.wav")

    assert abs(len(audio) - SAMPLE_RATE) <= 1
    assert peak_frequency(audio) == pytest.approx(440.0, abs=1.0)


def test_read_audio_resamples_44k1_to_16k_keeping_length_and_frequency(tmp_path):
    audio = read_audio(write_audio(tmp_path / "x.flac", 2.0, rate=44100, freq=1000.0), "x.flac")

    assert abs(len(audio) - 2 * SAMPLE_RATE) <= 1
    assert peak_frequency(audio) == pytest.approx(1000.0, abs=1.0)


def test_16k_audio_needs_no_torchaudio_and_resampling_without_one_is_a_clear_error(tmp_path, monkeypatch):
    # A CPU-only torch that torchaudio cannot load beside (README, "Installing"): importing it fails.
    monkeypatch.setitem(sys.modules, "torchaudio.functional", None)
    audio = read_audio(write_audio(tmp_path / "x.wav", 1.0, rate=SAMPLE_RATE, freq=440.0), "x.wav")
    assert len(audio) == SAMPLE_RATE
    with pytest.raises(BadInputError, match=r"audio that is not at 16000 Hz needs torchaudio to resample it"):
        read_audio(write_audio(tmp_path / "y.wav", 1.0, rate=8000, freq=440.0), "y.wav")
    # Nothing on the way to 16 kHz data imports it.
    code = "import sys, slam.data, slam.model, slam.train, slam.evaluate; assert 'torchaudio' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0


def test_read_audio_mixes_stereo_to_the_channel_mean(tmp_path):
    path = write_audio(tmp_path / "stereo.wav", 0.5, channels=2)

    audio = read_audio(path, "stereo.wav")

    np.testing.assert_allclose(audio, sine(0.5, channels=2).mean(axis=1), atol=1e-7)
    assert np.abs(audio).max() == pytest.approx((0.5 + 0.25) / 2, abs=1e-3)


def test_read_audio_decodes_bytes(tmp_path):
    audio = read_audio(flac_bytes(0.25, rate=8000), "bytes")

    assert len(audio) == 4000
    assert audio.dtype == np.float32


@pytest.fixture
def ten_manifest(tmp_path) -> Path:
    for i in range(10):
        write_audio(tmp_path / f"{i}.flac", 0.2)
    return write_manifest(
        tmp_path / "ten.jsonl", [{"audio": f"{i}.flac", "text": f"t{i}", "id": f"u{i}"} for i in range(10)]
    )


def _ids(path: Path, **kwargs) -> list[str]:
    return [s.id for s in load_dataset(manifest_config(path, **kwargs)).samples()]


def test_subsetting_without_seed_keeps_corpus_order(ten_manifest):
    assert _ids(ten_manifest) == [f"u{i}" for i in range(10)]
    assert _ids(ten_manifest, max_samples=3) == ["u0", "u1", "u2"]
    assert _ids(ten_manifest, max_samples=50) == [f"u{i}" for i in range(10)]


def test_seeded_shuffle_is_deterministic_and_subsets_take_its_prefix(ten_manifest):
    first = _ids(ten_manifest, shuffle_seed=1)

    assert first == _ids(ten_manifest, shuffle_seed=1)
    assert sorted(first) == sorted(f"u{i}" for i in range(10))
    assert first != [f"u{i}" for i in range(10)]
    assert first != _ids(ten_manifest, shuffle_seed=2)
    assert _ids(ten_manifest, shuffle_seed=1, max_samples=4) == first[:4]


def test_length_batches_cover_every_index_once_in_sorted_chunks():
    durations = [3.0, 1.0, 2.0, 1.0, 5.0, 0.5, 4.0]

    batches = length_batches(durations, 3)

    assert batches == [[5, 1, 3], [2, 0, 6], [4]]
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(durations)))
    assert [durations[i] for i in flat] == sorted(durations)
    assert all(len(batch) <= 3 for batch in batches)
    assert length_batches(durations, 3) == batches
    assert length_batches([], 4) == []
    with pytest.raises(ValueError, match="batch_size"):
        length_batches(durations, 0)


def test_length_batches_on_random_durations():
    durations = np.random.default_rng(0).uniform(0.5, 20.0, size=101).tolist()

    batches = length_batches(durations, 8)

    assert [len(b) for b in batches] == [8] * 12 + [5]
    assert sorted(i for b in batches for i in b) == list(range(101))
    for earlier, later in zip(batches, batches[1:]):
        assert max(durations[i] for i in earlier) <= min(durations[i] for i in later)


def write_librispeech(root: Path, bad_line: str | None = None) -> Path:
    """Two speakers' chapters of a LibriSpeech split, with optional extra line in the first transcript."""
    utterances = {
        ("1089", "134686"): ["HE HOPED THERE WOULD BE STEW", "STUFF IT INTO YOU"],
        ("121", "121726"): ["ALSO"],
    }
    for (speaker, chapter), texts in utterances.items():
        folder = root / speaker / chapter
        lines = []
        for n, text in enumerate(texts):
            utterance = f"{speaker}-{chapter}-{n:04d}"
            write_audio(folder / f"{utterance}.flac", 0.3 + 0.1 * n)
            lines.append(f"{utterance} {text}")
        if bad_line is not None and speaker == "1089":
            lines.append(bad_line)
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("split_dir", ["test-clean", None])
def test_librispeech_directory_layout(tmp_path, split_dir):
    corpus = tmp_path / "LibriSpeech"
    write_librispeech(corpus / "test-clean")
    write_librispeech(corpus / "dev-clean")  # another split beside it, never read
    path = corpus if split_dir else corpus / "test-clean"

    ds = load_dataset(DataConfig(source="librispeech", path=str(path), split="test.clean"))

    samples = list(ds.samples())
    assert [s.id for s in samples] == ["1089-134686-0000", "1089-134686-0001", "121-121726-0000"]
    assert [s.text for s in samples] == ["HE HOPED THERE WOULD BE STEW", "STUFF IT INTO YOU", "ALSO"]
    assert {s.language for s in samples} == {"en"}
    assert {s.translation for s in samples} == {None}
    assert [len(s.audio) for s in samples] == [4800, 6400, 4800]


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [("1089-134686-0009 NO AUDIO HERE", "missing audio file"), ("1089-134686-0001", "empty transcript")],
)
def test_librispeech_directory_bad_lines(tmp_path, bad_line, reason):
    root = write_librispeech(tmp_path / "test-clean", bad_line=bad_line)
    transcript = root / "1089" / "134686" / "1089-134686.trans.txt"

    with pytest.raises(BadInputError, match=f"1089-134686.trans.txt line 3: {reason}"):
        load_dataset(DataConfig(source="librispeech", path=str(root)))
    ds = load_dataset(DataConfig(source="librispeech", path=str(root), on_bad_sample="skip"))

    assert len(ds) == 3
    assert len(ds.skipped) == 1
    assert ds.skipped[0][0] == f"{transcript} line 3"
    assert reason in ds.skipped[0][1]


def write_parquet(directory: Path, relative: str, columns: dict) -> Path:
    """A parquet file with an `Audio(decode=False)` column, laid out as on the hub."""
    table = datasets.Dataset.from_dict(columns)
    audio = next(name for name in ("audio", "wav") if name in columns)
    table = table.cast_column(audio, datasets.Audio(decode=False))
    (directory / relative).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(directory / relative))
    return directory


def test_datasets_parquet_in_librispeech_columns(tmp_path):
    rows = {
        "audio": [{"bytes": flac_bytes(0.5), "path": "a.flac"}, {"bytes": flac_bytes(0.25, 8000), "path": "b.flac"}],
        "text": ["MISTER QUILTER", "NOR IS MISTER"],
        "id": ["1089-1-0000", "1089-1-0001"],
        "speaker_id": [1089, 1089],
    }
    path = write_parquet(tmp_path / "libri", "data/test.clean-00000-of-00001.parquet", rows)

    ds = load_dataset(DataConfig(source="librispeech", path=str(path), split="test.clean"))

    samples = list(ds.samples())
    assert [s.id for s in samples] == ["1089-1-0000", "1089-1-0001"]
    assert [s.text for s in samples] == ["MISTER QUILTER", "NOR IS MISTER"]
    assert [len(s.audio) for s in samples] == [8000, 4000]
    assert ds.durations() == pytest.approx([0.5, 0.25])


COVOST_README = """---
configs:
- config_name: en_de
  data_files:
  - split: test
    path: en_de/test-*
- config_name: fr_en
  data_files:
  - split: test
    path: fr_en/test-*
---
"""


@pytest.mark.parametrize(("name", "language"), [("en_de", "en"), ("fr_en", "fr")])
def test_datasets_hub_snapshot_in_covost2_columns(tmp_path, name, language):
    root = tmp_path / "covost2"
    for config in ("en_de", "fr_en"):
        write_parquet(
            root,
            f"{config}/test-00000-of-00001.parquet",
            {
                "client_id": ["c1", "c2"],
                "file": [f"{config}_1.mp3", f"{config}_2.mp3"],
                "audio": [{"bytes": flac_bytes(0.5), "path": "1.flac"}, {"bytes": flac_bytes(0.75), "path": "2.flac"}],
                "sentence": [f"{config} one", f"{config} two"],
                "translation": [f"{config} eins", f"{config} zwei"],
                "id": [f"{config}-1", f"{config}-2"],
            },
        )
    (root / "README.md").write_text(COVOST_README)

    ds = load_dataset(DataConfig(source="covost2", path=str(root), name=name, split="test"))

    samples = list(ds.samples())
    assert [s.id for s in samples] == [f"{name}-1", f"{name}-2"]
    assert [s.text for s in samples] == [f"{name} one", f"{name} two"]
    assert [s.target("ast") for s in samples] == [f"{name} eins", f"{name} zwei"]
    assert [s.language for s in samples] == [language, language]
    assert [len(s.audio) for s in samples] == [8000, 12000]


def test_covost2_needs_a_language_pair_name(tmp_path):
    write_parquet(
        tmp_path / "c",
        "data/test-00000-of-00001.parquet",
        {"audio": [{"bytes": flac_bytes(0.5), "path": "1.flac"}], "sentence": ["a"], "translation": ["b"], "id": ["1"]},
    )

    with pytest.raises(BadInputError, match="en_de"):
        load_dataset(DataConfig(source="covost2", path=str(tmp_path / "c"), split="test"))


def test_datasets_save_to_disk_in_loquacious_columns(tmp_path):
    table = datasets.Dataset.from_dict(
        {
            "ID": ["loq-1", "loq-2"],
            "wav": [{"bytes": flac_bytes(0.5), "path": None}, {"bytes": flac_bytes(0.5, 44100), "path": None}],
            "text": ["first one", "second one"],
            "duration": [0.5, 0.5],
        }
    ).cast_column("wav", datasets.Audio(decode=False))
    datasets.DatasetDict({"dev": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "loq"))

    ds = load_dataset(DataConfig(source="loquacious", path=str(tmp_path / "loq"), split="dev"))

    samples = list(ds.samples())
    assert [(s.id, s.text, s.language) for s in samples] == [
        ("loq-1", "first one", "en"),
        ("loq-2", "second one", "en"),
    ]
    assert [len(s.audio) for s in samples] == [8000, 8000]
    with pytest.raises(BadInputError, match="splits present: dev, test"):
        load_dataset(DataConfig(source="loquacious", path=str(tmp_path / "loq"), split="train"))


def test_missing_column_names_it_and_the_columns_present(tmp_path):
    path = write_parquet(
        tmp_path / "libri",
        "data/test-00000-of-00001.parquet",
        {"audio": [{"bytes": flac_bytes(0.5), "path": "a.flac"}], "transcript": ["A"], "id": ["1"]},
    )

    with pytest.raises(BadInputError, match=r"text column named 'text'; columns present: audio, transcript, id"):
        load_dataset(DataConfig(source="librispeech", path=str(path), on_bad_sample="skip"))


def test_unloadable_sources_are_bad_input(tmp_path):
    with pytest.raises(BadInputError, match="cannot load loquacious data"):
        load_dataset(DataConfig(source="loquacious", path=str(tmp_path / "nowhere")))
    with pytest.raises(BadInputError, match="cannot read manifest .*nowhere.jsonl"):
        load_dataset(manifest_config(tmp_path / "nowhere.jsonl"))


def test_corrupt_audio_in_a_datasets_row(tmp_path):
    rows = {
        "audio": [{"bytes": b"\x00garbage" * 50, "path": "broken.flac"}, {"bytes": flac_bytes(0.5), "path": "ok.flac"}],
        "text": ["A", "B"],
        "id": ["1", "2"],
    }
    path = write_parquet(tmp_path / "libri", "data/test-00000-of-00001.parquet", rows)

    strict = load_dataset(DataConfig(source="librispeech", path=str(path)))
    with pytest.raises(BadInputError, match=r"row 0 \(id 1\), file broken.flac: cannot decode audio"):
        list(strict.samples())
    with pytest.raises(BadInputError, match="broken.flac: cannot read the audio header"):
        strict.durations()
    lenient = load_dataset(DataConfig(source="librispeech", path=str(path), on_bad_sample="skip"))

    assert lenient.durations() == pytest.approx([0.0, 0.5])
    assert [s.id for s in lenient.samples()] == ["2"]
    assert [where for where, _ in lenient.skipped] == [f"{path} [test] row 0 (id 1), file broken.flac"]


# Each bad manifest line 2: (what to write, whether it is caught at load time, reason, an extra name in the message).
BAD_LINES = {
    "corrupt audio": ({"audio": "bad.flac", "text": "x"}, False, "cannot decode audio", "bad.flac"),
    "missing audio file": ({"audio": "missing.flac", "text": "x"}, True, "missing audio file", "missing.flac"),
    "empty transcript": ({"audio": "ok.flac", "text": "  "}, True, "empty transcript", None),
    "missing field": ({"audio": "ok.flac", "sentence": "x"}, True, "missing field 'text'", None),
    "invalid JSON": ('{"audio": "ok.flac", "text": ', True, "invalid JSON", None),
    "too short": ({"audio": "short.wav", "text": "x"}, False, f"shorter than {MIN_SECONDS} s", "short.wav"),
    "too long": ({"audio": "long.flac", "text": "x"}, False, "longer than max_seconds=1", "long.flac"),
}


@pytest.fixture
def bad_manifest(tmp_path, request) -> Path:
    """Good line 1, the bad line 2 named by the test's parameter, good line 3."""
    write_audio(tmp_path / "ok.flac", 0.5)
    write_audio(tmp_path / "short.wav", 0.09, rate=8000)  # 720 samples at 8 kHz, 1440 at 16 kHz
    write_audio(tmp_path / "long.flac", 1.5)
    (tmp_path / "bad.flac").write_bytes(np.random.default_rng(0).bytes(2000))
    line = BAD_LINES[request.param][0]
    return write_manifest(
        tmp_path / "bad.jsonl",
        [{"audio": "ok.flac", "text": "one", "id": "a"}, line, {"audio": "ok.flac", "text": "three", "id": "c"}],
    )


@pytest.mark.parametrize("bad_manifest", list(BAD_LINES), indirect=True)
def test_bad_manifest_line_raises_naming_file_and_line(bad_manifest, request):
    _, at_load, reason, name = BAD_LINES[request.node.callspec.params["bad_manifest"]]
    cfg = manifest_config(bad_manifest, max_seconds=1.0)

    with pytest.raises(BadInputError) as caught:
        list(load_dataset(cfg).samples())

    message = str(caught.value)
    assert "bad.jsonl line 2" in message
    assert reason in message
    # The error crosses process boundaries (Ray workers) intact.
    again = pickle.loads(pickle.dumps(caught.value))
    assert (type(again), str(again)) == (type(caught.value), message)
    if name is not None:
        assert name in message
    if not at_load:
        with pytest.raises(BadInputError, match=reason):
            load_dataset(cfg)[1]


@pytest.mark.parametrize("bad_manifest", list(BAD_LINES), indirect=True)
def test_bad_manifest_line_is_skipped_and_recorded(bad_manifest, request):
    _, at_load, reason, _ = BAD_LINES[request.node.callspec.params["bad_manifest"]]

    ds = load_dataset(manifest_config(bad_manifest, max_seconds=1.0, on_bad_sample="skip"))

    assert len(ds) == (2 if at_load else 3)
    assert len(ds.skipped) == (1 if at_load else 0)
    if not at_load:
        with pytest.raises(BadInputError, match=reason):
            ds[1]  # random access raises whatever the policy
    assert [s.id for s in ds.samples()] == ["a", "c"]
    assert len(ds.skipped) == 1
    where, why = ds.skipped[0]
    assert where.startswith(f"{bad_manifest} line 2")
    assert reason in why
    list(ds.samples())  # a second pass records nothing new
    assert len(ds.skipped) == 1


def test_duplicate_manifest_ids(tmp_path):
    write_audio(tmp_path / "ok.flac", 0.5)
    path = write_manifest(tmp_path / "dup.jsonl", [{"audio": "ok.flac", "text": "x", "id": "same"}] * 2)

    with pytest.raises(BadInputError, match=r"dup.jsonl line 2 .*duplicate id 'same' \(first at .*dup.jsonl line 1"):
        load_dataset(manifest_config(path))
    assert len(load_dataset(manifest_config(path, on_bad_sample="skip"))) == 1


def test_sample_is_frozen(manifest):
    sample = load_dataset(manifest_config(manifest))[0]

    assert isinstance(sample, Sample)
    with pytest.raises(AttributeError):
        sample.text = "changed"


@pytest.mark.parametrize("bad_manifest", ["corrupt audio"], indirect=True)
def test_texts_come_from_the_metadata_without_decoding_audio(bad_manifest):
    ds = load_dataset(manifest_config(bad_manifest))
    assert ds.texts() == ["one", "x", "three"]
    with pytest.raises(BadInputError, match="cannot decode audio"):
        list(ds.samples())


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_training_view_replaces_bad_audio_with_the_next_readable_sample_under_skip(tmp_path, policy):
    write_audio(tmp_path / "ok.flac", 0.5)
    (tmp_path / "bad.flac").write_bytes(np.random.default_rng(0).bytes(2000))
    records = [{"audio": name, "text": text} for name, text in (("ok.flac", "a"), ("bad.flac", "b"), ("ok.flac", "c"))]
    records.append({"audio": "bad.flac", "text": "d"})  # the last one is bad too: its next readable one wraps round
    ds = load_dataset(manifest_config(write_manifest(tmp_path / "m.jsonl", records), on_bad_sample=policy))
    view = ds.for_training()
    assert len(view) == 4
    if policy == "error":
        assert view[0].text == "a"
        with pytest.raises(BadInputError, match=r"m\.jsonl line 2.*bad\.flac"):
            view[1]
        return
    assert [view[i].text for i in range(4)] == ["a", "c", "c", "a"]
    assert [view[i].text for i in range(4)] == ["a", "c", "c", "a"]  # the same again, each bad one recorded once
    manifest, bad = tmp_path / "m.jsonl", tmp_path / "bad.flac"
    assert [where for where, _ in view.skipped] == [f"{manifest} line 2 ({bad})", f"{manifest} line 4 ({bad})"]
    assert all("cannot decode audio" in reason for _, reason in view.skipped)
    assert view.skipped == ds.skipped


def test_training_view_with_no_readable_audio_is_an_error(tmp_path):
    (tmp_path / "bad.flac").write_bytes(np.random.default_rng(0).bytes(2000))
    records = [{"audio": "bad.flac", "text": "a"}, {"audio": "bad.flac", "text": "b"}]
    ds = load_dataset(manifest_config(write_manifest(tmp_path / "m.jsonl", records), on_bad_sample="skip"))
    with pytest.raises(BadInputError, match="none of the 2 samples has readable audio"):
        ds.for_training()[0]
    assert len(ds.skipped) == 2
