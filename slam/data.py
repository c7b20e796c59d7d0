"""Speech data: LibriSpeech, Loquacious, CoVoST2 and JSONL manifests as lazy sequences of 16 kHz samples.

`load_dataset(DataConfig)` validates the cheap metadata (fields, transcripts, that audio files exist) at load
time and returns a `SpeechDataset` that decodes audio only when a sample is accessed: soundfile decodes, the
channels are averaged to mono and `torchaudio.functional.resample` brings any rate to 16 kHz (torchaudio is imported
only then, so that 16 kHz data needs none: a CPU-only torch that torchaudio cannot load beside runs the demo).

Bad input is never dropped silently. Under `on_bad_sample="error"` the first bad sample raises a
`BadInputError` naming the file (and line, for text files) at fault; under `"skip"` it is left out and
recorded in `SpeechDataset.skipped` as `(where, reason)`. Metadata problems are found at load time, audio
problems (corrupt, unreadable, too short, too long) when `samples()` reaches the sample.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import soundfile as sf
import torch

from slam.config import TASKS, DataConfig
from slam.errors import BadInputError
from slam.model import SAMPLE_RATE

MIN_SECONDS = 0.1
"""Audio shorter than this (after resampling) is bad input: too short for the encoder to see speech."""

# Columns of each `datasets` source: our field -> the column names accepted for it, preferred first.
_LIBRISPEECH_COLUMNS = {"audio": ("audio",), "text": ("text",), "id": ("id",)}
_LOQUACIOUS_COLUMNS = {"audio": ("wav", "audio"), "text": ("text",), "id": ("ID", "id")}
_COVOST2_COLUMNS = {
    "audio": ("audio", "file"),
    "text": ("sentence",),
    "translation": ("translation",),
    "id": ("id", "path"),
}
_COLUMNS = {"librispeech": _LIBRISPEECH_COLUMNS, "loquacious": _LOQUACIOUS_COLUMNS, "covost2": _COVOST2_COLUMNS}
_COVOST2_NAME = re.compile(r"^([A-Za-z-]+)_([A-Za-z-]+)$")


@dataclass(frozen=True, eq=False)  # eq=False: comparing samples field by field would compare arrays
class Sample:
    """One utterance, decoded.

    Attributes:
        id: Stable id: the LibriSpeech utterance id, the dataset's id column, the manifest's `id` or
            `<manifest file name>:<line number>`.
        audio: (T,) float32 mono waveform at 16 kHz.
        text: Transcript in the source language.
        translation: Target-language text for speech translation, None where the source has none.
        language: Source language code, e.g. `en`, `fr`.
    """

    id: str
    audio: np.ndarray
    text: str
    translation: str | None
    language: str

    def target(self, task: str) -> str:
        """The text a model should produce for this sample.

        Args:
            task: `asr` (the transcript) or `ast` (the translation).

        Returns:
            The transcript or the translation.

        Raises:
            BadInputError: For `ast` when the sample has no translation.
        """
        if task == "asr":
            return self.text
        if task == "ast":
            if self.translation is None:
                raise BadInputError(f"sample {self.id!r} has no translation, so it cannot be used for task 'ast'")
            return self.translation
        raise ValueError(f"task={task!r} is not allowed: expected one of {', '.join(TASKS)}")


class SpeechDataset(Sequence[Sample]):
    """A lazy, ordered sequence of samples: metadata in memory, audio decoded on access.

    `ds[i]` always raises `BadInputError` for a sample whose audio is bad, whatever `on_bad_sample` says;
    `samples()` (and iteration) applies the policy: under `skip` such a sample is left out and recorded in
    `skipped`, so iteration may yield fewer than `len(ds)` samples.
    """

    def __init__(
        self,
        entries: Sequence[_Entry],
        *,
        max_seconds: float,
        on_bad_sample: str,
        skipped: Sequence[tuple[str, str]] = (),
        table: datasets.Dataset | None = None,
        audio_column: str | None = None,
    ) -> None:
        """Wrap validated entries; use `load_dataset` rather than calling this directly.

        Args:
            entries: Metadata of the samples, in order.
            max_seconds: Samples longer than this are bad input.
            on_bad_sample: `error` or `skip`.
            skipped: `(where, reason)` of the samples already left out at load time.
            table: The `datasets` table that integer `_Entry.audio` rows point into.
            audio_column: The column of `table` holding the audio.
        """
        self._entries = list(entries)
        self._max_seconds = max_seconds
        self._on_bad_sample = on_bad_sample
        self._load_skipped = list(skipped)
        # Keyed by index so that iterating twice does not record a bad sample twice.
        self._access_skipped: dict[int, tuple[str, str]] = {}
        self._table = table
        self._audio_column = audio_column
        self._durations: list[float] | None = None

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """`(where, reason)` of every sample left out so far: at load time, then by `samples()`."""
        return self._load_skipped + list(self._access_skipped.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]  # no slices: each item decodes audio
        """Decode sample `i`.

        Args:
            i: Index in `range(-len(self), len(self))`.

        Returns:
            The sample with its audio as (T,) float32 at 16 kHz.

        Raises:
            BadInputError: If the audio cannot be decoded or is shorter than `MIN_SECONDS` or longer than
                `max_seconds`, whatever `on_bad_sample` says.
        """
        entry = self._entries[i]
        source, where = self._audio_source(entry)
        audio = read_audio(source, where)
        seconds = len(audio) / SAMPLE_RATE
        if seconds > self._max_seconds:
            raise _BadSample(where, f"{seconds:.2f} s of audio is longer than max_seconds={self._max_seconds:g}")
        if seconds < MIN_SECONDS:
            raise _BadSample(where, f"{seconds:.3f} s of audio is shorter than {MIN_SECONDS} s")
        return Sample(entry.id, audio, entry.text, entry.translation, entry.language)

    def __iter__(self) -> Iterator[Sample]:
        return self.samples()

    def samples(self, indices: Iterable[int] | None = None) -> Iterator[Sample]:
        """Decode samples in order, applying `on_bad_sample` to bad audio.

        Args:
            indices: Which samples, in which order (e.g. one batch of `length_batches`); None for all in order.

        Yields:
            The decoded samples. Under `skip` a bad one is left out and added to `skipped`.

        Raises:
            BadInputError: Under `error`, at the first sample with bad audio.
        """
        for i in range(len(self)) if indices is None else indices:
            try:
                yield self[i]
            except _BadSample as bad:
                if self._on_bad_sample == "error":
                    raise
                self._access_skipped[i] = (bad.where, bad.reason)

    def for_training(self) -> Sequence[Sample]:
        """The samples as training reads them, by index, each index giving a readable sample.

        Under `error` item i is `self[i]`. Under `skip` a sample whose audio is bad is recorded in `skipped`
        (once) and replaced by the next readable one in index order (wrapping round), so a batch keeps its
        size and stays a function of the training seed; that neighbour is seen twice per epoch.

        Returns:
            A sequence of `len(self)` samples with this dataset's `skipped`.
        """
        return _TrainingView(self)

    def texts(self) -> list[str]:
        """The transcript of every sample, from the metadata alone: no audio is decoded, and none is checked.

        For text-only work (a text-derived pruning path) on the transcripts of a speech corpus.
        """
        return [entry.text for entry in self._entries]

    def durations(self) -> list[float]:
        """Length in seconds of every sample, read from the audio headers once and cached.

        Returns:
            One duration per index. Under `skip`, a sample whose header cannot be read counts 0.0 s; it is
            left out (and recorded) when `samples()` reaches it.

        Raises:
            BadInputError: Under `error`, for the first header that cannot be read.
        """
        if self._durations is None:
            self._durations = [self._duration(entry) for entry in self._entries]
        return list(self._durations)

    def _duration(self, entry: _Entry) -> float:
        try:
            return _header_seconds(*self._audio_source(entry))
        except _BadSample:
            if self._on_bad_sample == "error":
                raise
            return 0.0

    def _audio_source(self, entry: _Entry) -> tuple[str | bytes, str]:
        """The audio file or bytes of an entry, and the `where` naming it in errors."""
        if isinstance(entry.audio, str):
            return entry.audio, entry.where
        value = self._table[entry.audio][self._audio_column]
        if isinstance(value, str):
            return value, f"{entry.where}, file {value}"
        if not value or (value.get("bytes") is None and not value.get("path")):
            raise _BadSample(entry.where, f"no audio in column {self._audio_column!r}")
        where = f"{entry.where}, file {value['path']}" if value.get("path") else entry.where
        return (value["bytes"] if value.get("bytes") is not None else value["path"]), where


def load_dataset(cfg: DataConfig) -> SpeechDataset:
    """Load one speech set lazily, validate its metadata, then shuffle and subset it deterministically.

    Sources and the local layouts that work without a hub:

    - `manifest`: a JSONL file, one object a line with `audio` (path relative to the manifest's directory, or
      absolute), `text`, and optional `translation`, `language` (default `en`) and `id` (default
      `<manifest file name>:<line number>`). Blank lines are ignored.
    - `librispeech` from a plain LibriSpeech directory (`<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`
      beside the `.flac` files) at `<path>/<split>` (the split may be spelt `test.clean` for `test-clean`)
      or at `<path>` itself.
    - `librispeech`, `loquacious`, `covost2` through `datasets`: `path` is a hub id or a local directory that
      `datasets.load_dataset(path, name, split=split)` reads (a hub snapshot with its README configs, or
      parquet/arrow files named by split such as `data/test-00000-of-00001.parquet`), or a directory written
      by `save_to_disk` (a `DatasetDict`, from which `split` is taken, or a single `Dataset`, used whole).
      Audio is read undecoded and decoded here with soundfile (FLAC, WAV, OGG, MP3).
      Columns: LibriSpeech `audio`, `text`, `id`; Loquacious `wav` or `audio`, `text`, `ID` or `id`;
      CoVoST2 `audio` or `file`, `sentence`, `translation`, `id` or `path`, with the source language read
      from `name` (`en_de` -> `en`, `fr_en` -> `fr`).

    Args:
        cfg: The data config.

    Returns:
        The dataset: `shuffle_seed` (None keeps corpus order) permutes the valid samples, then the first
        `max_samples` are kept. The same config gives the same ids in the same order.

    Raises:
        BadInputError: If the source cannot be read or lacks a column (whatever the policy), or, under
            `on_bad_sample="error"`, at the first sample with bad metadata.
    """
    skipped: list[tuple[str, str]] = []
    table, audio_column = None, None
    if cfg.source == "manifest":
        entries = _manifest_entries(Path(cfg.path), cfg.on_bad_sample, skipped)
    elif (root := _librispeech_root(cfg)) is not None:
        entries = _librispeech_dir_entries(root, cfg.on_bad_sample, skipped)
    else:
        table, audio_column, entries = _datasets_entries(cfg, skipped)
    entries = _without_duplicate_ids(entries, cfg.on_bad_sample, skipped)
    if cfg.shuffle_seed is not None:
        entries = [entries[i] for i in np.random.default_rng(cfg.shuffle_seed).permutation(len(entries))]
    if cfg.max_samples is not None:
        entries = entries[: cfg.max_samples]
    return SpeechDataset(
        entries,
        max_seconds=cfg.max_seconds,
        on_bad_sample=cfg.on_bad_sample,
        skipped=skipped,
        table=table,
        audio_column=audio_column,
    )


def read_audio(path_or_bytes: str | os.PathLike[str] | bytes, where: str) -> np.ndarray:
    """Decode an audio file to mono 16 kHz.

    Args:
        path_or_bytes: A file path, or the bytes of a whole audio file (FLAC, WAV, OGG, MP3, ...).
        where: Names the audio in error messages (file, line, row, id).

    Returns:
        (T,) float32 waveform at 16 kHz: the mean of the channels, resampled from the file's rate.

    Raises:
        BadInputError: If the file is missing, cannot be decoded, holds no samples or non-finite values.
    """
    if not isinstance(path_or_bytes, bytes) and not Path(path_or_bytes).is_file():
        raise _BadSample(where, f"missing audio file {os.fspath(path_or_bytes)}")
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)  # (T, C)
    except (sf.SoundFileError, OSError) as error:
        raise _BadSample(where, f"cannot decode audio: {error}") from error
    if data.shape[0] == 0:
        raise _BadSample(where, "the audio holds no samples")
    if not np.isfinite(data).all():
        raise _BadSample(where, "the audio holds NaN or infinite values")
    mono = data.mean(axis=1)  # (T,)
    if rate != SAMPLE_RATE:
        mono = _resample()(torch.from_numpy(mono), rate, SAMPLE_RATE).numpy()  # (T * 16k / rate,)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _resample():
    """`torchaudio.functional.resample`, or why it cannot be had."""
    try:
        from torchaudio.functional import resample
    except (ImportError, OSError) as error:
        raise BadInputError(
            f"audio that is not at {SAMPLE_RATE} Hz needs torchaudio to resample it, which does not load here "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); install a torchaudio "
            "that matches this torch"
        ) from error
    return resample


def length_batches(durations: Sequence[float], batch_size: int) -> list[list[int]]:
    """Group indices into batches of similar length, so that little of a padded batch is padding.

    Args:
        durations: Length of each sample, e.g. `SpeechDataset.durations()`.
        batch_size: Largest batch.

    Returns:
        Batches of indices, every index exactly once: indices sorted by duration (ties by index, so the
        result is deterministic), then cut into consecutive chunks of `batch_size` (the last may be smaller).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} is not allowed: expected a positive integer")
    order = sorted(range(len(durations)), key=lambda i: (durations[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@dataclass(frozen=True)
class _Entry:
    """What is known about a sample before its audio is decoded."""

    id: str
    text: str
    translation: str | None
    language: str
    where: str
    """Names the sample in error messages: file and line, or dataset, split and row."""
    audio: str | int
    """An audio file path, or a row of the `datasets` table whose audio column holds the audio."""


class _TrainingView(Sequence):
    """`SpeechDataset.for_training()`: every index a readable sample, bad ones replaced under `skip`."""

    def __init__(self, dataset: SpeechDataset) -> None:
        self._dataset = dataset

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self._dataset.skipped

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]  # no slices, as SpeechDataset
        ds = self._dataset
        if ds._on_bad_sample == "error":
            return ds[i]
        n = len(ds)
        for j in ((i + k) % n for k in range(n)):
            if j in ds._access_skipped:
                continue
            try:
                return ds[j]
            except _BadSample as bad:
                ds._access_skipped[j] = (bad.where, bad.reason)
        raise BadInputError(f"none of the {n} samples has readable audio: {ds.skipped[-1][0]}: {ds.skipped[-1][1]}")


class _BadSample(BadInputError):
    """A `BadInputError` about one sample, keeping `where` and `reason` apart for `SpeechDataset.skipped`."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason

    def __reduce__(self):
        # Exceptions pickle as `cls(*self.args)`, which is one argument here: Ray sends errors between processes.
        return (type(self), (self.where, self.reason))


def _header_seconds(source: str | bytes, where: str) -> float:
    """Duration of an audio file or its bytes from the header alone, without decoding."""
    try:
        info = sf.info(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (sf.SoundFileError, OSError) as error:
        raise _BadSample(where, f"cannot read the audio header: {error}") from error
    return info.frames / info.samplerate


def _reject(where: str, reason: str, on_bad_sample: str, skipped: list[tuple[str, str]]) -> None:
    """Raise for a sample with bad metadata under `error`, record it under `skip`."""
    if on_bad_sample == "error":
        raise _BadSample(where, reason)
    skipped.append((where, reason))


def _manifest_entries(manifest: Path, on_bad_sample: str, skipped: list[tuple[str, str]]) -> list[_Entry]:
    """Parse and check every line of a JSONL manifest; see `load_dataset` for the fields."""
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"cannot read manifest {manifest}: {error}") from error
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{manifest} line {number}"
        entry_or_reason = _manifest_entry(line, manifest, number, where)
        if isinstance(entry_or_reason, str):
            _reject(where, entry_or_reason, on_bad_sample, skipped)
        else:
            entries.append(entry_or_reason)
    return entries


def _manifest_entry(line: str, manifest: Path, number: int, where: str) -> _Entry | str:
    """One manifest line as an entry, or the reason it is bad."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return f"invalid JSON ({error})"
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key in ("audio", "text"):
        if key not in record:
            return f"missing field {key!r} (fields present: {', '.join(sorted(record)) or 'none'})"
    for key, optional in (("audio", False), ("text", False), ("translation", True), ("language", True), ("id", True)):
        value = record.get(key)
        if (value is not None or not optional) and not isinstance(value, str):
            return f"field {key!r} must be a string, got {json.dumps(value)}"
    for key in ("text", "translation", "language", "id"):
        if key in record and record[key] is not None and not record[key].strip():
            return f"empty {'transcript' if key == 'text' else key}"
    audio = Path(record["audio"])
    audio = audio if audio.is_absolute() else manifest.parent / audio
    if not audio.is_file():
        return f"missing audio file {audio}"
    return _Entry(
        id=record.get("id") or f"{manifest.name}:{number}",
        text=record["text"].strip(),
        translation=record["translation"].strip() if record.get("translation") is not None else None,
        language=record.get("language") or "en",
        where=f"{where} ({audio})",
        audio=str(audio),
    )


def _librispeech_root(cfg: DataConfig) -> Path | None:
    """The plain LibriSpeech directory `cfg` points at, or None when it is not one."""
    if cfg.source != "librispeech" or not Path(cfg.path).is_dir():
        return None
    path = Path(cfg.path)
    # Only transcripts exactly at <root>/<speaker>/<chapter>/ count, so that a corpus root holding every
    # split is never read whole when `split` names none of them.
    for root in (path / cfg.split, path / cfg.split.replace(".", "-"), path):
        if root.is_dir() and any(root.glob("*/*/*.trans.txt")):
            return root
    return None


def _librispeech_dir_entries(root: Path, on_bad_sample: str, skipped: list[tuple[str, str]]) -> list[_Entry]:
    """Read the transcripts of a LibriSpeech directory in path order, checking that each `.flac` exists."""
    entries = []
    for transcript in sorted(root.glob("*/*/*.trans.txt")):
        for number, line in enumerate(transcript.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{transcript} line {number}"
            utterance, _, text = line.strip().partition(" ")
            audio = transcript.parent / f"{utterance}.flac"
            if not text.strip():
                _reject(where, f"empty transcript for {utterance}", on_bad_sample, skipped)
            elif not audio.is_file():
                _reject(where, f"missing audio file {audio}", on_bad_sample, skipped)
            else:
                entries.append(_Entry(utterance, text.strip(), None, "en", str(audio), str(audio)))
    return entries


def _datasets_entries(cfg: DataConfig, skipped: list[tuple[str, str]]) -> tuple[datasets.Dataset, str, list[_Entry]]:
    """Load a `datasets` table with its audio undecoded and turn its metadata columns into entries."""
    table = _load_table(cfg)
    columns = {field: _column(table, cfg, field, accepted) for field, accepted in _COLUMNS[cfg.source].items()}
    if isinstance(table.features[columns["audio"]], datasets.Audio):
        table = table.cast_column(columns["audio"], datasets.Audio(decode=False))
    language = _covost2_language(cfg) if cfg.source == "covost2" else "en"
    ids = list(table[columns["id"]])
    texts = list(table[columns["text"]])
    translations = list(table[columns["translation"]]) if "translation" in columns else [None] * len(ids)
    entries = []
    for row, (sample_id, text, translation) in enumerate(zip(ids, texts, translations, strict=True)):
        where = f"{cfg.path} [{cfg.split}] row {row} (id {sample_id})"
        if sample_id is None or not str(sample_id).strip():
            _reject(where, f"empty id in column {columns['id']!r}", cfg.on_bad_sample, skipped)
        elif not isinstance(text, str) or not text.strip():
            _reject(where, f"empty transcript in column {columns['text']!r}", cfg.on_bad_sample, skipped)
        elif "translation" in columns and (not isinstance(translation, str) or not translation.strip()):
            _reject(where, f"empty translation in column {columns['translation']!r}", cfg.on_bad_sample, skipped)
        else:
            translation = translation.strip() if isinstance(translation, str) else None
            entries.append(_Entry(str(sample_id), text.strip(), translation, language, where, row))
    return table, columns["audio"], entries


def _load_table(cfg: DataConfig) -> datasets.Dataset:
    """`datasets.load_dataset(path, name, split=split)`, or `load_from_disk` for a `save_to_disk` directory."""
    path = Path(cfg.path)
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split)
    except (ValueError, OSError) as error:
        raise BadInputError(
            f"cannot load {cfg.source} data from {cfg.path!r} (name={cfg.name!r}, split={cfg.split!r}): {error}"
        ) from error
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if cfg.split not in loaded:
        raise BadInputError(f"{cfg.path}: no split {cfg.split!r} (splits present: {', '.join(sorted(loaded))})")
    return loaded[cfg.split]


def _column(table: datasets.Dataset, cfg: DataConfig, field: str, accepted: tuple[str, ...]) -> str:
    """The first of the `accepted` column names that `table` has."""
    for name in accepted:
        if name in table.column_names:
            return name
    raise BadInputError(
        f"{cfg.path} [{cfg.split}]: {cfg.source} data needs a {field} column named "
        f"{' or '.join(repr(name) for name in accepted)}; columns present: {', '.join(table.column_names)}"
    )


def _covost2_language(cfg: DataConfig) -> str:
    """The source language of a CoVoST2 pair named `<source>_<target>`."""
    match = _COVOST2_NAME.match(cfg.name or "")
    if match is None:
        raise BadInputError(
            f"covost2 data.name={cfg.name!r}: expected a language pair '<source>_<target>' such as 'en_de' or 'fr_en'"
        )
    return match.group(1)


def _without_duplicate_ids(entries: list[_Entry], on_bad_sample: str, skipped: list[tuple[str, str]]) -> list[_Entry]:
    """Keep the first entry of each id: results are joined by id, so two samples may not share one."""
    first: dict[str, _Entry] = {}
    kept = []
    for entry in entries:
        if entry.id in first:
            _reject(
                entry.where, f"duplicate id {entry.id!r} (first at {first[entry.id].where})", on_bad_sample, skipped
            )
        else:
            first[entry.id] = entry
            kept.append(entry)
    return kept
