"""The local spool: recordings wait here until MLflow has them, so nothing is ever lost.

Every recording is staged in ``<spool>/<recording id>/`` first, in as few files as it takes, since a
call waits for them: its arrays (``outputs.safetensors``, ``inputs.safetensors``) and images
(``images/``) as uploaded, and ``meta.json``, written last, holding where it was going and the small
files of the run (manifest, requirements, git diff, signature) by artifact path (``"format": 2``). The
artifact tree itself is built in ``<entry>/upload/`` just before an upload (files linked, not copied).
Entries staged before that format hold the tree as ``artifacts/``; they are uploaded as they are.

Whoever uploads an entry first *claims* it: an
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
from .tags import (ARTIFACT_DIR, GIT_DIFF_FILE, IMAGES_DIR, INPUTS_FILE, MANIFEST_PATH, OUTPUTS_FILE,
                   REQUIREMENTS_FILE, SIGNATURE_PATH)

log = logging.getLogger(__name__)
META_FILE = "meta.json"
CLAIM_FILE = "claim.lock"
_TRASH_PREFIX = ".delivered-"
_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: also safe inside the store's search filter
_TRASH = re.compile(re.escape(_TRASH_PREFIX) + r"[0-9a-f]{32}-[0-9a-f]{8}")
UNFINISHED_AFTER_S = 3600.0  # an entry without meta.json this old was cut off while staging
FORMAT = 2  # meta.json's "format": small files inside it, the tree built at upload (absent: artifacts/)
UPLOAD_DIR = "upload"
ARRAY_FILES = (OUTPUTS_FILE, INPUTS_FILE)  # beside meta.json, uploaded under repro/
_REQUIREMENTS_PATH, _GIT_DIFF_PATH = f"{ARTIFACT_DIR}/{REQUIREMENTS_FILE}", f"{ARTIFACT_DIR}/{GIT_DIFF_FILE}"
TEXT_PATHS = frozenset({MANIFEST_PATH, SIGNATURE_PATH, _REQUIREMENTS_PATH, _GIT_DIFF_PATH})  # in meta.json


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
        """The folder uploaded as the run's artifacts: built by :func:`prepare_upload` (or, in an
        entry staged before ``FORMAT`` 2, staged as such)."""
        return self.path / (UPLOAD_DIR if _format(self) == FORMAT else "artifacts")

    @property
    def texts(self) -> dict[str, str]:
        """The small files of the run by artifact path (manifest, requirements, git diff, signature)."""
        if _format(self) == FORMAT:
            texts = self.meta.get("files")
            if not isinstance(texts, dict):
                raise StoreError(f"{self.path / META_FILE} does not list a recording's files")
            return texts
        return {rel: (self.artifacts / rel).read_text("utf-8") for rel in sorted(TEXT_PATHS)
                if (self.artifacts / rel).is_file()}

    @property
    def recording_id(self) -> str:
        """The id that makes uploads idempotent."""
        return self.meta["recording_id"]


def stage(recording: Any, artifacts: Path) -> str:
    """Write a recording's artifact tree: repro/{manifest,outputs,inputs,requirements,git.diff}, images/.

    Returns the manifest digest. (Replays stage their recording so; the spool keeps fewer files.)"""
    repro = artifacts / ARTIFACT_DIR
    repro.mkdir(parents=True, exist_ok=True)
    texts, digest = _texts(recording, validate=True)
    _write_files(recording, repro, artifacts)
    for rel, text in texts.items():
        (artifacts / rel).write_text(text, "utf-8")
    from .signing import sign_staged  # last: the signature covers every file written above

    sign_staged(artifacts, digest)
    return digest


def _texts(recording: Any, *, validate: bool) -> tuple[dict[str, str], str]:
    """A recording's small files by artifact path, and its manifest digest."""
    text, digest = recording.manifest.serialise(validate=validate)
    texts = {MANIFEST_PATH: text, _REQUIREMENTS_PATH: recording.requirements}
    if recording.git_diff:
        texts[_GIT_DIFF_PATH] = recording.git_diff
    return texts, digest


def _write_files(recording: Any, arrays: Path, images: Path) -> None:
    """Write the arrays into the folder ``arrays``, and the image outputs into an ``images/`` folder
    under ``images`` (in MLflow's log_image layout: key = output name, step set)."""
    if recording.outputs:
        # The manifest's records hold each output's digest, computed moments ago from the same arrays.
        described = {o["name"]: o["sha256"] for o in recording.manifest.outputs if o.get("sha256")}
        outputs.save_arrays(recording.outputs, arrays / OUTPUTS_FILE, digests=described)
    if recording.inputs:
        outputs.save_arrays(recording.inputs, arrays / INPUTS_FILE)
    frames = outputs.image_frames(recording.outputs) if recording.outputs else []
    if frames:
        from .run_images import final_step, stage_images

        m = recording.manifest
        stage_images(frames, images, step=final_step(m.arguments), timestamp_ms=_ms(m.call["ended_at"]))


def _files(entry: "SpoolEntry") -> dict[str, Path]:
    """A format-2 entry's arrays and images by artifact path."""
    found = {f"{ARTIFACT_DIR}/{name}": entry.path / name for name in ARRAY_FILES
             if (entry.path / name).is_file()}
    images = entry.path / IMAGES_DIR
    if images.is_dir():
        found.update((p.relative_to(entry.path).as_posix(), p) for p in sorted(images.rglob("*"))
                     if p.is_file() and not p.is_symlink())
    return found


def prepare_upload(entry: "SpoolEntry") -> Path:
    """The claimed entry's artifact tree, ready to upload: built afresh in ``upload/`` (format 2:
    small files written out, arrays and images linked), or as staged (older entries)."""
    if _format(entry) != FORMAT:
        return entry.artifacts
    texts = entry.texts
    if not (set(texts) <= TEXT_PATHS and MANIFEST_PATH in texts and all(isinstance(t, str) for t in texts.values())):
        raise StoreError(f"{entry.path / META_FILE} does not list a recording's files")
    tree = entry.artifacts
    if tree.exists():  # what an interrupted try left; should it not go, nothing is uploaded
        shutil.rmtree(tree)
    for rel, content in [*texts.items(), *_files(entry).items()]:
        target = tree / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            target.write_bytes(content.encode("utf-8"))
            continue
        try:
            os.link(content, target)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links
            shutil.copyfile(content, target)
    return tree


def _format(entry: "SpoolEntry") -> int | None:
    """The entry's layout: FORMAT, or None for entries staged before formats were numbered."""
    found = entry.meta.get("format")
    if found not in (None, FORMAT):
        raise StoreError(f"{entry.path} was staged by a newer repro-track (spool format {found!r}); "
                         "upload it with that version")
    return found


def complete(entry: "SpoolEntry", recording: Any) -> str:
    """Bring a staged entry up to date with a recording completed after staging (its git state came
    later): its small files, the signature and the noted digest, in one replacement of meta.json.
    Returns the new manifest digest. A process killed before this leaves the staged manifest, which
    says that git had not answered. Should signing fail, the completed files are kept unsigned and
    the error raised."""
    texts, digest = _texts(recording, validate=False)
    return _signed(entry, texts, digest)


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
    """Sign a staged entry as it is and note its manifest's digest: for an entry staged to be
    completed later (see :func:`complete`) when that did not happen. Returns the digest."""
    texts = entry.texts
    return _signed(entry, texts, json.loads(texts[MANIFEST_PATH])["manifest_digest"])


def _signed(entry: "SpoolEntry", texts: dict[str, str], digest: str) -> str:
    """Note ``texts`` and the manifest digest in the entry's meta.json, signed with the entry's arrays
    and images when a key is set. The entry's meta in memory changes only once meta.json has; if
    signing fails, the texts are written unsigned and the error raised."""
    from .signing import signature_for

    texts = {rel: text for rel, text in texts.items() if rel != SIGNATURE_PATH}
    meta = {**entry.meta, "files": texts, "manifest_digest": digest}
    try:
        document = signature_for({**{rel: text.encode("utf-8") for rel, text in texts.items()},
                                  **_files(entry)}, digest)
    except Exception:
        _replace_meta(entry, meta)
        raise
    if document is not None:
        meta["files"] = {**texts, SIGNATURE_PATH: document}
    _replace_meta(entry, meta)
    return digest


def create(recording: Any, meta: dict[str, Any], *, validate: bool = True, sign: bool = True) -> SpoolEntry:
    """Stage a recording in the spool, claimed by this process until delivered or released.

    ``validate=False`` leaves the schema check of the manifest to the upload (off the call path);
    ``sign=False`` leaves signing to :func:`complete` (or :func:`seal`).
    """
    path = _writable_root() / meta["recording_id"]
    path.mkdir(parents=True, exist_ok=False)
    lock = _lock(path)
    lock.acquire()  # a new folder: nobody else can hold it yet
    entry = SpoolEntry(path, meta, fresh=True, claim=lock)
    try:
        _write_files(recording, path, path)
        meta["format"] = FORMAT
        texts, digest = _texts(recording, validate=validate)
        if sign:
            _signed(entry, texts, digest)  # writes meta.json, last
        else:
            _replace_meta(entry, {**meta, "files": texts, "manifest_digest": digest})
    except BaseException:
        lock.release()
        shutil.rmtree(path, ignore_errors=True)  # a half-staged entry would never be synced
        raise
    return entry


def _replace_meta(entry: SpoolEntry, meta: dict[str, Any]) -> None:
    """Write ``meta`` as the entry's meta.json (atomically), then make it the entry's meta in memory."""
    tmp = entry.path / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, sort_keys=True), "utf-8")  # json encodes in C only without indent
    os.replace(tmp, entry.path / META_FILE)
    if meta is not entry.meta:
        entry.meta.clear()
        entry.meta.update(meta)


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
    if entry.meta.get("format") == FORMAT:  # built again, from the entry, by the next try
        shutil.rmtree(entry.path / UPLOAD_DIR, ignore_errors=True)
    try:
        _replace_meta(entry, entry.meta)
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
