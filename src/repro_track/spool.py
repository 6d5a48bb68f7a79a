"""The local spool: recordings wait here until MLflow has them, so nothing is ever lost.

Every recording is staged in ``<spool>/<recording id>/`` first (``artifacts/`` as uploaded, plus
``meta.json`` saying where it was going). A live process holds an ``owner`` file with its pid while it
uploads; after a successful upload the folder is removed. What stays is what failed: ``repro-track
sync`` uploads it later, exactly once (runs carry the recording id as the ``repro.spool_id`` tag).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from . import outputs, settings
from .tags import (ARTIFACT_DIR, GIT_DIFF_FILE, IMAGES_DIR, INPUTS_FILE, MANIFEST_FILE, OUTPUTS_FILE,
                   REQUIREMENTS_FILE)

META_FILE = "meta.json"
OWNER_FILE = "owner"


@dataclass(frozen=True)
class SpoolEntry:
    """One staged recording: its folder, where its artifacts are, and where it was going."""

    path: Path
    meta: dict[str, Any]

    @property
    def artifacts(self) -> Path:
        """The folder uploaded as the run's artifacts."""
        return self.path / "artifacts"

    @property
    def recording_id(self) -> str:
        """The id that makes uploads idempotent."""
        return self.meta["recording_id"]


def stage(recording: Any, artifacts: Path, *, images: bool = True) -> None:
    """Write a recording's artifact tree: repro/{manifest,outputs,inputs,requirements,git.diff}, images/."""
    repro = artifacts / ARTIFACT_DIR
    repro.mkdir(parents=True, exist_ok=True)
    (repro / MANIFEST_FILE).write_text(recording.manifest.to_json(), "utf-8")
    if recording.outputs:
        outputs.save_arrays(recording.outputs, repro / OUTPUTS_FILE)
    if recording.inputs:
        outputs.save_arrays(recording.inputs, repro / INPUTS_FILE)
    (repro / REQUIREMENTS_FILE).write_text(recording.requirements, "utf-8")
    if recording.git_diff:
        (repro / GIT_DIFF_FILE).write_text(recording.git_diff, "utf-8")
    if images and recording.outputs:
        folder = artifacts / IMAGES_DIR
        folder.mkdir(exist_ok=True)
        if not outputs.image_files(recording.outputs, folder):
            folder.rmdir()
    from .signing import sign_staged  # last: the signature covers every file written above
    sign_staged(artifacts, recording.manifest.digest)


def _writable_root() -> Path:
    root = settings.spool_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "repro-track-spool"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def create(recording: Any, meta: dict[str, Any]) -> SpoolEntry:
    """Stage a recording in the spool, owned by this process until released or delivered."""
    path = _writable_root() / meta["recording_id"]
    path.mkdir(parents=True, exist_ok=False)
    (path / OWNER_FILE).write_text(str(os.getpid()), "utf-8")
    entry = SpoolEntry(path, meta)
    try:
        stage(recording, entry.artifacts)
        _write_meta(entry)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # a half-staged entry would never be synced
        raise
    return entry


def _write_meta(entry: SpoolEntry) -> None:
    tmp = entry.path / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(entry.meta, indent=1, sort_keys=True), "utf-8")
    os.replace(tmp, entry.path / META_FILE)


def delivered(entry: SpoolEntry) -> None:
    """The upload succeeded: the spool copy is no longer needed."""
    shutil.rmtree(entry.path, ignore_errors=True)


def release(entry: SpoolEntry, error: str) -> None:
    """The upload failed: leave the entry for ``repro-track sync``, noting why."""
    entry.meta["last_error"] = error[:2000]
    _write_meta(entry)
    (entry.path / OWNER_FILE).unlink(missing_ok=True)


def _owner_alive(path: Path) -> bool:
    try:
        pid = int((path / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pending(root: Path | None = None) -> Iterator[SpoolEntry]:
    """Spooled recordings waiting for upload, oldest first (skips ones a live process still owns)."""
    root = root or settings.spool_dir()
    if not root.is_dir():
        return
    for path in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime):
        if not (path / META_FILE).is_file() or _owner_alive(path):
            continue
        try:
            meta = json.loads((path / META_FILE).read_text("utf-8"))
        except (OSError, ValueError):
            continue
        yield SpoolEntry(path, meta)
