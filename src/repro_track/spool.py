"""The local spool: recordings wait here until MLflow has them, so nothing is ever lost.

Every recording is staged in ``<spool>/<recording id>/`` first (``artifacts/`` as uploaded, plus
``meta.json`` saying where it was going, written last). Whoever uploads an entry first *claims* it: an
exclusive ``filelock`` on ``<entry>/claim.lock``. The recording process holds the claim from staging
until its delivery worker is done; ``repro-track sync`` claims without waiting and skips what another
process holds. The kernel drops a claim when its process dies (even by SIGKILL), so a killed
process's recordings become claimable at once. After a successful upload the entry is renamed out of
sight and removed; what stays is what failed, for ``sync`` (runs carry the recording id as the
``repro.spool_id`` tag, so an interrupted upload is found and finished, never repeated).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import outputs, settings
from .errors import StoreError
from .tags import (ARTIFACT_DIR, GIT_DIFF_FILE, INPUTS_FILE, MANIFEST_FILE, OUTPUTS_FILE,
                   REQUIREMENTS_FILE)

log = logging.getLogger(__name__)
META_FILE = "meta.json"
CLAIM_FILE = "claim.lock"
_TRASH_PREFIX = ".delivered-"
_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: also safe inside the store's search filter
_TRASH = re.compile(re.escape(_TRASH_PREFIX) + r"[0-9a-f]{32}-[0-9a-f]{8}")
UNFINISHED_AFTER_S = 3600.0  # an entry without meta.json this old was cut off while staging


@dataclass(frozen=True)
class SpoolEntry:
    """One staged recording: its folder, where its artifacts are, and where it was going.

    ``fresh`` marks an entry this process has just staged: nobody can have uploaded any of it, so the
    upload need not look for an earlier, interrupted one. ``claim`` is the held lock, if any.
    """

    path: Path
    meta: dict[str, Any]
    fresh: bool = False
    claim: Any = field(default=None, compare=False, repr=False)

    @property
    def artifacts(self) -> Path:
        """The folder uploaded as the run's artifacts."""
        return self.path / "artifacts"

    @property
    def recording_id(self) -> str:
        """The id that makes uploads idempotent."""
        return self.meta["recording_id"]


def stage(recording: Any, artifacts: Path, *, images: bool = True, validate: bool = True,
          sign: bool = True) -> str:
    """Write a recording's artifact tree: repro/{manifest,outputs,inputs,requirements,git.diff}, images/.

    Returns the manifest digest. ``sign=False`` leaves signing to :func:`complete`."""
    repro = artifacts / ARTIFACT_DIR
    repro.mkdir(parents=True, exist_ok=True)
    text, digest = recording.manifest.serialise(validate=validate)
    (repro / MANIFEST_FILE).write_text(text, "utf-8")
    if recording.outputs:
        # The manifest's records hold each output's digest, computed moments ago from the same arrays.
        described = {o["name"]: o["sha256"] for o in recording.manifest.outputs if o.get("sha256")}
        outputs.save_arrays(recording.outputs, repro / OUTPUTS_FILE, digests=described)
    if recording.inputs:
        outputs.save_arrays(recording.inputs, repro / INPUTS_FILE)
    (repro / REQUIREMENTS_FILE).write_text(recording.requirements, "utf-8")
    if recording.git_diff:
        (repro / GIT_DIFF_FILE).write_text(recording.git_diff, "utf-8")
    if images and recording.outputs:  # in MLflow's log_image layout (key = output name, step set)
        from .outputs import image_frames
        from .run_images import final_step, stage_images

        m = recording.manifest
        stage_images(image_frames(recording.outputs), artifacts,
                     step=final_step(m.arguments), timestamp_ms=_ms(m.call["ended_at"]))
    if sign:
        from .signing import sign_staged  # last: the signature covers every file written above
        sign_staged(artifacts, digest)
    return digest


def complete(entry: "SpoolEntry", recording: Any) -> str:
    """Bring a staged entry up to date with a recording completed after staging (its git state came
    later): the manifest (replaced atomically), the git diff, the signature and the noted digest.
    Returns the new manifest digest. A process killed before this leaves the staged manifest, which
    says that git had not answered."""
    repro = entry.artifacts / ARTIFACT_DIR
    text, digest = recording.manifest.serialise(validate=False)
    if recording.git_diff:
        (repro / GIT_DIFF_FILE).write_text(recording.git_diff, "utf-8")
    tmp = entry.path / (MANIFEST_FILE + ".tmp")  # outside artifacts/: never uploaded half-written
    tmp.write_text(text, "utf-8")
    os.replace(tmp, repro / MANIFEST_FILE)
    return _signed(entry, digest)


def _ms(iso: str) -> int:
    import datetime as dt

    return int(dt.datetime.fromisoformat(iso).timestamp() * 1000)


def fallback_root() -> Path:
    """Where recordings go when the spool folder is not writable; ``sync`` reads it too."""
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"repro-track-spool-{uid}"


def roots() -> list[Path]:
    """Every folder ``sync`` reads: the configured spool, then the fallback (when different)."""
    configured = settings.spool_dir()
    fallback = fallback_root()
    if fallback == configured or not _ours(fallback):
        return [configured]
    return [configured, fallback]


def _ours(folder: Path) -> bool:
    # A shared temp folder: never upload what another account planted under the fallback's name.
    try:
        return not hasattr(os, "getuid") or folder.stat().st_uid == os.getuid()
    except OSError:
        return False


def _writable_root() -> Path:
    root = settings.spool_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        return root
    except OSError as exc:
        problem = exc
    fallback = fallback_root()
    try:
        fallback.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"the recording could not be kept: neither the spool {root} ({problem}) nor "
                         f"{fallback} ({exc}) is writable; set {settings.SPOOL_DIR.name} to a writable "
                         "folder") from None
    if not _ours(fallback):
        raise StoreError(f"the recording could not be kept: the spool {root} is not writable ({problem}) "
                         f"and the fallback {fallback} belongs to another user; set "
                         f"{settings.SPOOL_DIR.name} to a writable folder")
    log.warning("spool %s is not writable (%s); keeping recordings in %s, which `repro-track sync` "
                "also reads", root, problem, fallback)
    return fallback


def _lock(path: Path) -> Any:
    from filelock import FileLock

    # thread_local=False: the call's thread takes the claim and the delivery worker releases it.
    return FileLock(str(path / CLAIM_FILE), timeout=0, thread_local=False)


def _lock_if_free(path: Path) -> Any:
    """The held lock on an entry folder, or None when another process holds it or the folder is gone."""
    from filelock import Timeout

    lock = _lock(path)
    try:
        lock.acquire()
    except (Timeout, FileNotFoundError, NotADirectoryError):
        return None
    return lock


def _try_claim(path: Path) -> Any:
    """The held lock on an entry, or None when another process holds it or the entry is gone."""
    lock = _lock_if_free(path)
    if lock is not None and not (path / META_FILE).is_file():  # delivered (or never staged) meanwhile
        lock.release()
        return None
    return lock


def seal(entry: "SpoolEntry") -> str:
    """Sign a staged entry as it is on disk and note its manifest's digest: for an entry staged to be
    completed later (see :func:`complete`) when that did not happen. Returns the digest."""
    m = json.loads((entry.artifacts / ARTIFACT_DIR / MANIFEST_FILE).read_text("utf-8"))
    return _signed(entry, m["manifest_digest"])


def _signed(entry: "SpoolEntry", digest: str) -> str:
    """Sign the entry's artifacts as they are now and note the manifest digest in its meta."""
    from .signing import sign_staged

    sign_staged(entry.artifacts, digest)
    entry.meta["manifest_digest"] = digest
    _write_meta(entry)
    return digest


def create(recording: Any, meta: dict[str, Any], *, validate: bool = True, sign: bool = True) -> SpoolEntry:
    """Stage a recording in the spool, claimed by this process until delivered or released.

    ``validate=False`` leaves the schema check of the manifest to the upload (off the call path);
    ``sign=False`` leaves signing to :func:`complete`.
    """
    path = _writable_root() / meta["recording_id"]
    path.mkdir(parents=True, exist_ok=False)
    lock = _lock(path)
    lock.acquire()  # a new folder: nobody else can hold it yet
    entry = SpoolEntry(path, meta, fresh=True, claim=lock)
    try:
        meta["manifest_digest"] = stage(recording, entry.artifacts, validate=validate, sign=sign)
        _write_meta(entry)
    except BaseException:
        lock.release()
        shutil.rmtree(path, ignore_errors=True)  # a half-staged entry would never be synced
        raise
    return entry


def _write_meta(entry: SpoolEntry) -> None:
    tmp = entry.path / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(entry.meta, indent=1, sort_keys=True), "utf-8")
    os.replace(tmp, entry.path / META_FILE)


def delivered(entry: SpoolEntry) -> None:
    """The upload succeeded: the spool copy is no longer needed (removed before the claim ends)."""
    trash = entry.path.with_name(f"{_TRASH_PREFIX}{entry.path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(entry.path, trash)  # atomic: no other process can claim it from here on
    except OSError:
        trash = entry.path
    shutil.rmtree(trash, ignore_errors=True)
    _unclaim(entry)


def release(entry: SpoolEntry, error: str) -> None:
    """The upload failed: leave the entry for ``repro-track sync``, noting why."""
    entry.meta["last_error"] = error[:2000]
    try:
        _write_meta(entry)
    except OSError:  # the folder went away; nothing left to keep
        log.debug("could not note the error in %s", entry.path, exc_info=True)
    finally:
        _unclaim(entry)


def hand_over(entry: SpoolEntry) -> None:
    """Let go of a claim so that this process's uploader process can take it (``claim`` there)."""
    _unclaim(entry)


def _unclaim(entry: SpoolEntry) -> None:
    if entry.claim is not None and entry.claim.is_locked:
        entry.claim.release()


def claim(entry: SpoolEntry) -> SpoolEntry | None:
    """Claim a listed entry for upload (fresh meta, read under the lock); None if another has it."""
    lock = _try_claim(entry.path)
    if lock is None:
        return None
    try:
        meta = json.loads((entry.path / META_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("recording_id") != entry.path.name:
        lock.release()
        return None
    return SpoolEntry(entry.path, meta, fresh=False, claim=lock)


def _claimed_elsewhere(path: Path) -> bool:
    lock = _try_claim(path)
    if lock is None:
        return True
    lock.release()
    return False


def pending(root: Path | None = None) -> Iterator[SpoolEntry]:
    """Spooled recordings waiting for upload, oldest first, in every spool root (or just ``root``).

    Entries a live process has claimed (its delivery worker, or another sync) are skipped. Listing
    claims nothing: use :func:`claim` before uploading.
    """
    for folder in [root] if root else roots():
        if not folder.is_dir():
            continue
        paths = [p for p in folder.iterdir() if _ID.fullmatch(p.name) and (p / META_FILE).is_file()]
        for path in sorted(paths, key=_mtime):
            if _claimed_elsewhere(path):
                continue
            try:
                meta = json.loads((path / META_FILE).read_text("utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and meta.get("recording_id") == path.name:
                yield SpoolEntry(path, meta)


def sweep(root: Path | None = None) -> list[str]:
    """Remove what a killed process left behind in every spool root (or just ``root``): delivered
    entries it had not finished deleting, and entries cut off while staging (no ``meta.json`` after
    :data:`UNFINISHED_AFTER_S`, claimed by nobody), which name no destination and can never be
    uploaded. Returns the folder names removed; nothing else in a spool folder is touched."""
    import time

    now, removed = time.time(), []
    for folder in [root] if root else roots():
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if _TRASH.fullmatch(path.name):  # out of sight already: nobody can claim it
                shutil.rmtree(path, ignore_errors=True)
                gone = not path.exists()
            else:
                gone = bool(_ID.fullmatch(path.name)) and _remove_if_cut_off(path, now) and not path.exists()
            if gone:
                removed.append(path.name)
    return removed


def _remove_if_cut_off(path: Path, now: float) -> bool:
    """Remove an entry that never finished staging, if it is old and unclaimed; whether it was."""
    if (path / META_FILE).exists() or now - _mtime(path) < UNFINISHED_AFTER_S:
        return False
    lock = _lock_if_free(path)
    if lock is None:
        return False
    try:
        if (path / META_FILE).exists():  # finished staging after all, while we looked
            return False
        shutil.rmtree(path, ignore_errors=True)
        return True
    finally:
        lock.release()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
