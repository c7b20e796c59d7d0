"""grid.provenance: the code version (commit, dirty or not), the package versions and the device of a run."""

from __future__ import annotations

import subprocess
from importlib.metadata import version

from grid.provenance import (
    COMMIT_TAG,
    DEVICE_TAG,
    DIRTY_TAG,
    MLFLOW_COMMIT_TAG,
    PACKAGES,
    VERSION_TAG,
    code_tags,
    describe,
    device_tags,
)


def _git(root, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_commit_and_whether_tracked_files_changed(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    commit = _git(tmp_path, "rev-parse", "HEAD")
    tags = code_tags(tmp_path)
    assert (tags[COMMIT_TAG], tags[DIRTY_TAG], tags[MLFLOW_COMMIT_TAG]) == (commit, "false", commit)
    assert describe(tags) == commit[:8]
    (tmp_path / "new.txt").write_text("untracked: not the code that ran\n")
    assert code_tags(tmp_path)[DIRTY_TAG] == "false"
    (tmp_path / "a.py").write_text("x = 2\n")
    dirty = code_tags(tmp_path)
    assert dirty[DIRTY_TAG] == "true" and describe(dirty) == f"{commit[:8]}+dirty"


def test_package_versions_are_those_installed_and_no_checkout_is_unknown(tmp_path):
    tags = code_tags(tmp_path)
    assert (tags[COMMIT_TAG], tags[DIRTY_TAG], describe(tags)) == ("unknown", "unknown", "unknown")
    assert MLFLOW_COMMIT_TAG not in tags
    assert tags[VERSION_TAG] == version("slamgrid")
    assert {f"versions.{p}": tags[f"versions.{p}"] for p in PACKAGES} == {f"versions.{p}": version(p) for p in PACKAGES}


def test_the_device_is_named():
    import torch

    tags = device_tags()
    assert tags[DEVICE_TAG].startswith("cuda (" if torch.cuda.is_available() else "cpu (")
    assert tags["versions.torch"] == torch.__version__  # with its build, which the package metadata leaves out
