"""A content-addressed on-disk cache of frozen speech-encoder outputs, shared by every stage that encodes speech.

The encoder is frozen (DESIGN section 2): what it computes for an utterance depends on that utterance and the
encoder alone. `slam.model.SpeechEncoder` encodes each utterance on its own (so that its frames never depend on
what it is batched with) and, given a `FeatureCache`, computes each utterance once: baseline training, every epoch
of it, path measurement, evaluation and every pruned or healed cell read the frames back.

Addressing. An entry is named by the SHA-256 of the waveform the encoder sees (decoded, mixed to mono, resampled to
16 kHz: the audio preprocessing is in the bytes), in a directory named by the encoder's fingerprint
(`encoder_fingerprint`): its kind, model and feature-extractor configs, every weight and buffer, the dtype it
computes in, the device type, and the torch and transformers versions. The same audio in two datasets is one entry;
a different encoder, dtype, device type or library version is another directory; nothing is invalidated in place.
`<root>/<fingerprint>/encoder.json` says which encoder a directory holds.

Format. One `.npy` file per utterance, the (T', d_e) frames that cover the real audio, in the dtype the encoder
computes in (bfloat16 stored as its raw 16-bit patterns), read memory-mapped: frames are bit-identical to a fresh
computation on the same device.

Concurrent fill (several workers, several nodes on a shared filesystem). `fetch` computes each entry once: the
worker that misses first claims the entry with a lock file created exclusively beside it (`O_EXCL`, atomic on local
filesystems and NFS), and the others wait for its result instead of computing it again. A lock whose holder died
is broken: at once on the holder's own host (its pid is gone), after `STALE_SECONDS` from elsewhere. The entry is
written to a temporary file and published with a hard link, which fails when the name exists (the first writer
wins), so a reader never sees a partly written file. An entry that does not read back (a crash mid-write on a
filesystem without ordered writes, a full disk) counts as missing and is replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn

ENCODER_FILE = "encoder.json"
"""What a fingerprint directory holds: the encoder's kind, name, dtype, device type, width and library versions."""
STALE_SECONDS = 300.0
"""A lock older than this, held from another host, is taken to be a dead worker's (encoding one utterance takes
well under a second on a GPU, seconds on a CPU)."""
_POLL_SECONDS = 0.02
_STORED = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16, torch.float64: np.float64}
"""The numpy dtype each torch dtype's frames are stored as (numpy has no bfloat16: its bit patterns as uint16)."""


class FeatureCache:
    """Encoder frames on disk under `root`, by encoder fingerprint and waveform hash."""

    def __init__(self, root: str | Path) -> None:
        """Use (and create on first write) the cache at `root`, a local or shared directory."""
        self.root = Path(root).expanduser()

    def fetch(
        self,
        fingerprint: str,
        key: str,
        dim: int,
        dtype: torch.dtype,
        compute: Callable[[], torch.Tensor],
        describe: dict | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """The frames of one utterance: read from the cache, or computed by `compute` once and stored.

        While another process computes the same entry, this one waits for it rather than computing it too.

        Args:
            fingerprint: The encoder's `encoder_fingerprint`.
            key: The utterance's `audio_key`.
            dim: d_e, the width of a frame.
            dtype: The dtype the encoder computes in.
            compute: Encodes the utterance: (T', d_e) frames in `dtype`.
            describe: The encoder's description (`encoder.json`).

        Returns:
            The frames, and whether `compute` produced them here.
        """
        lock = self._entry(fingerprint, key).with_suffix(".lock")
        while True:
            frames = self.get(fingerprint, key, dim, dtype)
            if frames is not None:
                return frames, False
            if _claim(lock):
                try:
                    # Another process may have published it between the lookup and the claim.
                    frames = self.get(fingerprint, key, dim, dtype)
                    if frames is not None:
                        return frames, False
                    frames = compute()
                    self.put(fingerprint, key, frames, describe)
                    return frames, True
                finally:
                    lock.unlink(missing_ok=True)
            while lock.exists() and not _stale(lock):
                time.sleep(_POLL_SECONDS)

    def get(self, fingerprint: str, key: str, dim: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The frames of one utterance, or None when the cache has no readable entry for it.

        Args:
            fingerprint: The encoder's `encoder_fingerprint`.
            key: The utterance's `audio_key`.
            dim: d_e, the width of a frame.
            dtype: The dtype the encoder computes in.

        Returns:
            (T', d_e) frames on the CPU, or None (missing, or unreadable and to be replaced).
        """
        path = self._entry(fingerprint, key)
        try:
            stored = np.load(path, mmap_mode="r", allow_pickle=False)  # (T', d_e), memory-mapped
        except (OSError, ValueError, EOFError):  # missing, or truncated
            return None
        if stored.ndim != 2 or stored.shape[1] != dim or stored.shape[0] < 1 or stored.dtype != _stored_dtype(dtype):
            return None
        frames = torch.from_numpy(np.array(stored))  # a copy: the mapping closes with `stored`
        return frames.view(dtype) if dtype == torch.bfloat16 else frames

    def put(self, fingerprint: str, key: str, frames: torch.Tensor, describe: dict | None = None) -> None:
        """Store one utterance's frames, unless an identical entry is already there.

        Args:
            fingerprint: The encoder's `encoder_fingerprint`.
            key: The utterance's `audio_key`.
            frames: (T', d_e) frames, in the encoder's dtype.
            describe: Written once as the directory's `encoder.json` (which encoder it holds).
        """
        path = self._entry(fingerprint, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensor = frames.detach().cpu().contiguous()
        stored = _stored_dtype(tensor.dtype)
        array = tensor.view(torch.int16).numpy().view(stored) if tensor.dtype == torch.bfloat16 else tensor.numpy()
        _publish(path, lambda file: np.save(file, array, allow_pickle=False), self._readable)
        if describe is not None and not (path.parents[1] / ENCODER_FILE).exists():
            text = json.dumps(describe, indent=2) + "\n"
            _publish(path.parents[1] / ENCODER_FILE, lambda file: file.write(text.encode()), lambda _: True)

    def entries(self, fingerprint: str) -> int:
        """How many utterances the cache holds for one encoder."""
        return sum(1 for _ in (self.root / fingerprint).glob("*/*.npy"))

    def _entry(self, fingerprint: str, key: str) -> Path:
        return self.root / fingerprint / key[:2] / f"{key}.npy"

    @staticmethod
    def _readable(path: Path) -> bool:
        try:
            stored = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return False
        return stored.ndim == 2 and stored.shape[0] >= 1


def audio_key(waveform: np.ndarray) -> str:
    """The cache key of an utterance: SHA-256 of its float32 16 kHz samples (shape and values)."""
    samples = np.ascontiguousarray(waveform, dtype=np.float32)
    return hashlib.sha256(samples.tobytes()).hexdigest()


def encoder_fingerprint(model: nn.Module, feature_extractor, kind: str) -> tuple[str, dict]:
    """What decides an encoder's outputs, hashed: the name of its directory in a `FeatureCache`.

    Args:
        model: The encoder (WavLM, or Whisper's encoder), on the device it computes on.
        feature_extractor: Its feature extractor.
        kind: `wavlm` or `whisper`.

    Returns:
        The fingerprint (32 hex digits) and a description of the encoder (`encoder.json`).
    """
    first = next(model.parameters())
    config = model.config.to_dict()
    config.pop("_name_or_path", None)  # where the files are does not change what they compute
    config.pop("transformers_version", None)  # the version that runs them is hashed below
    extractor = feature_extractor.to_dict()
    extractor.pop("processor_class", None)
    describe = {
        "kind": kind,
        "name": getattr(model.config, "_name_or_path", ""),
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": first.device.type,
        "dim": int(model.config.d_model if kind == "whisper" else model.config.hidden_size),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    digest = hashlib.sha256()
    head = {key: value for key, value in describe.items() if key != "name"}
    digest.update(json.dumps([head, config, extractor], sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().data)
    return digest.hexdigest()[:32], describe


def _stored_dtype(dtype: torch.dtype) -> np.dtype:
    if dtype not in _STORED:
        raise ValueError(f"encoder dtype {dtype} cannot be cached: expected one of {', '.join(map(str, _STORED))}")
    return np.dtype(_STORED[dtype])


def _claim(lock: Path) -> bool:
    """Create `lock` if no live process holds it (a dead holder's lock is removed first); True if this one holds it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    if lock.exists() and _stale(lock):
        lock.unlink(missing_ok=True)
    try:
        handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(handle, "w") as file:
        file.write(f"{socket.gethostname()} {os.getpid()}\n")
    return True


def _stale(lock: Path) -> bool:
    """Whether `lock`'s holder is gone: a dead pid (or this process's own, left by a pid's former owner) on this
    host, or an old lock from another host or one its creator never wrote."""
    try:
        age = time.time() - lock.stat().st_mtime
        text = lock.read_text()
    except OSError:  # gone already
        return False
    holder = text.split()
    if len(holder) != 2 or not holder[1].isdigit() or holder[0] != socket.gethostname():
        return age > STALE_SECONDS
    pid = int(holder[1])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _publish(path: Path, write, readable) -> None:
    """Write a file through `write(file)` to a temporary name beside `path`, then give it `path`'s name.

    A hard link publishes it only if `path` does not exist yet (the first writer wins, and the content is the same
    whoever wrote it); an existing `path` that is not `readable` is replaced. Where hard links are not supported,
    an atomic rename publishes it.
    """
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        try:
            os.link(temporary, path)
        except FileExistsError:
            if not readable(path):
                os.replace(temporary, path)
        except OSError:
            os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
