"""Where a result came from: the code version, the versions of the packages that decide a number, and the device.

Every cell run is tagged with `code_tags()` (taken once by the driver, which has the repository: under `ray job
submit --working-dir .` the workers' copies have no `.git`; it imports no torch, so `status` stays light) and
`device_tags()` (taken by the process that runs the cell, with torch's own version string and build). `slamgrid
status` compares the finished cells' `code.commit` with this checkout's and warns when they differ.
"""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

COMMIT_TAG = "code.commit"
"""The git commit of the code that ran the cell (`unknown` outside a git checkout)."""
DIRTY_TAG = "code.dirty"
"""`true` when tracked files differed from that commit, `false` when not, `unknown` outside a git checkout."""
VERSION_TAG = "code.version"
"""The installed `slamgrid` package's version."""
DEVICE_TAG = "device"
"""What the cell ran on: the GPU's name, or `cpu` and the processor."""
PACKAGES = ("torch", "transformers", "peft", "jiwer", "sacrebleu", "whisper-normalizer")
"""The packages whose versions decide a result: the models' kernels, the metrics, the WER normaliser."""
MLFLOW_COMMIT_TAG = "mlflow.source.git.commit"
"""The tag MLflow's UI shows as a run's source version."""
UNKNOWN = "unknown"
_ROOT = Path(__file__).resolve().parents[1]


def code_tags(root: Path = _ROOT) -> dict[str, str]:
    """The code version and the package versions, as run tags.

    Args:
        root: The repository the code runs from (this package's parent directory).

    Returns:
        `code.commit`, `code.dirty`, `code.version`, `versions.{package}` per `PACKAGES` (`unknown` if missing),
        and MLflow's own source-version tag.
    """
    commit, dirty = _git(root, "rev-parse", "HEAD"), UNKNOWN
    if commit != UNKNOWN:
        changes = _git(root, "status", "--porcelain", "--untracked-files=no")
        dirty = UNKNOWN if changes == UNKNOWN else ("true" if changes else "false")
    tags = {COMMIT_TAG: commit, DIRTY_TAG: dirty, VERSION_TAG: _version("slamgrid")}
    tags |= {f"versions.{package}": _version(package) for package in PACKAGES}
    if commit != UNKNOWN:
        tags[MLFLOW_COMMIT_TAG] = commit
    return tags


def device_tags() -> dict[str, str]:
    """The device this process computes on, as run tags: `device` (the CUDA device's name, else `cpu (<processor>,
    <threads> threads)`) and `versions.torch` as torch itself gives it, with its build (`2.14.1+cu130`, `2.13.0+cpu`:
    two builds of one release compute with other kernels)."""
    import torch

    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(torch.cuda.current_device())})"
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {DEVICE_TAG: device, "versions.torch": torch.__version__}


def describe(tags: dict[str, str]) -> str:
    """`1a2b3c4d` or `1a2b3c4d+dirty` (or `unknown`): a code version as `slamgrid status` prints it."""
    commit = tags.get(COMMIT_TAG, UNKNOWN)
    short = commit[:8] if commit != UNKNOWN else UNKNOWN
    return f"{short}+dirty" if tags.get(DIRTY_TAG) == "true" else short


def _git(root: Path, *args: str) -> str:
    """A git command's output in `root`; `unknown` when `root` is no git checkout or git is missing."""
    if not (root / ".git").exists():
        return UNKNOWN
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return UNKNOWN
    return done.stdout.strip() if done.returncode == 0 else UNKNOWN


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return UNKNOWN
