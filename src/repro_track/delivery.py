"""Delivery: stage a recording in the spool, upload it under a deadline, report where it went.

If the server is down, slow or fails midway, the recording stays spooled and the call returns; the
MLflow writes themselves live in ``store``.
"""

from __future__ import annotations

import threading
import uuid
import warnings
from typing import Any, Callable

from . import settings, spool
from .context import ParentRun
from .errors import StoreError
from .manifest import Manifest
from .records import Recording, RecordingWarning, RecordOptions, RecordOutcome
from .store import client_for, probe, resolve_tracking_uri, upload


def _upload_owned(client_factory: Callable[[], Any], entry: spool.SpoolEntry) -> dict[str, Any]:
    """Upload in a worker thread that also settles the spool entry, however late it finishes.

    While the worker runs, the entry stays owned by this (live) process, so ``repro-track sync``
    leaves it alone: a slow upload and a sync can never both create the run.
    """
    box: dict[str, Any] = {"done": threading.Event()}

    def target() -> None:
        try:
            box["run_id"] = upload(client_factory(), entry)
            spool.delivered(entry)
        except BaseException as exc:  # reported to the caller's thread if it still waits
            box["error"] = exc
            spool.release(entry, repr(exc))
        finally:
            box["done"].set()

    threading.Thread(target=target, name="repro-track-upload", daemon=True).start()
    return box


def _parent_run(uri: str, group: ParentRun | None) -> tuple[str | None, str | None]:
    """The enclosing repro_track.parent_run, else the caller's active MLflow run (read only),
    as (run id, experiment id) when it lives in the same store."""
    import mlflow

    if group is not None and group.tracking_uri == uri:
        return group.run_id, group.experiment_id
    active = mlflow.active_run()
    if active is None or mlflow.get_tracking_uri() != uri:
        return None, None
    return active.info.run_id, active.info.experiment_id


def deliver(recording: Recording, options: RecordOptions, *, parent: ParentRun | None = None,
            extra_tags: dict[str, str] | None = None) -> RecordOutcome:
    """Stage in the spool, upload under a deadline, and report where the recording went.

    ``parent`` is the caller's ``repro_track.parent_run`` context, passed down by the recorder.
    """
    import os

    uri = resolve_tracking_uri(options.tracking_uri)
    parent_id, parent_experiment = _parent_run(uri, parent)
    experiment = options.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or None
    meta = {
        "recording_id": uuid.uuid4().hex,
        "tracking_uri": uri,
        "experiment": experiment or "repro-track",
        "parent_experiment_id": parent_experiment if experiment is None else None,
        "run_name": options.run_name or _default_run_name(recording.manifest),
        "tags": {**options.tags, **(extra_tags or {})},
        "parent_run_id": parent_id,
    }
    if meta["parent_experiment_id"]:
        meta["experiment"] = _experiment_name(uri, parent_experiment) or meta["experiment"]
    entry = spool.create(recording, meta)
    digest = recording.manifest.digest
    try:
        probe(uri)
    except StoreError as exc:
        spool.release(entry, repr(exc))
        return _spooled(uri, entry, digest, str(exc))
    box = _upload_owned(lambda: client_for(uri), entry)
    seconds = settings.LOG_TIMEOUT.get()
    if not box["done"].wait(seconds):
        return _spooled(uri, entry, digest,
                        f"logging took longer than {seconds:.0f} s (set {settings.LOG_TIMEOUT.name} to "
                        "wait longer); it goes on in the background", background=True)
    if "error" in box:
        return _spooled(uri, entry, digest, str(box["error"]))
    return RecordOutcome(box["run_id"], uri, None, digest)


def _spooled(uri: str, entry: spool.SpoolEntry, digest: str, problem: str,
             background: bool = False) -> RecordOutcome:
    where = ("stays in " if background else "is kept in ") + str(entry.path)
    warnings.warn(f"repro-track could not log to MLflow at {uri}: {problem}. The recording {where}; "
                  "upload it later with `repro-track sync`.", RecordingWarning, stacklevel=6)
    return RecordOutcome(None, uri, entry.path, digest, problem)


def _experiment_name(uri: str, experiment_id: str) -> str | None:
    try:
        return client_for(uri).get_experiment(experiment_id).name
    except Exception:
        return None


def _default_run_name(manifest: Manifest) -> str:
    seed = manifest.randomness["primary"]["seed"]
    name = manifest.call["qualname"].split(".")[-1]
    prefix = "replay-" if manifest.kind == "replay" else ""
    return f"{prefix}{name}-seed{seed}" if seed is not None else f"{prefix}{name}"
