"""Delivery: stage a recording in the spool, then upload it behind the caller's work, exactly once.

One protocol for every upload: an entry is *claimed* (``spool``) before anything is sent, the upload
looks for an earlier interrupted one by recording id and finishes it (``store.upload``), and only then
is the entry removed. The recording process's worker, ``repro-track sync`` and a process that comes
after a crash all go through :func:`deliver_claimed`.

Each process has one delivery worker with a bounded queue. A call stages its recording (crash-safe,
on disk), hands it to the worker and returns; when the queue is full the call waits for room instead
of piling up. :func:`flush` waits for the queue; an exit handler does so with a bounded wait and
leaves the rest in the spool for ``sync``. ``REPRO_TRACK_DELIVERY=sync`` makes each call wait for its
own upload (up to ``REPRO_TRACK_LOG_TIMEOUT``), so the run exists when the call returns.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from . import conventions, settings, spool
from .context import ParentRun
from .manifest import Manifest, validate
from .records import Recording, RecordingWarning, RecordOptions, RecordOutcome
from .store import client_for, probe, resolve_tracking_uri, upload
from .tags import MANIFEST_PATH


# ---------------------------------------------------------------- the one upload path

def deliver_claimed(entry: spool.SpoolEntry, uri: str, clients: dict[str, Any],
                    make_client: Callable[[str], Any] = client_for) -> str:
    """Upload a claimed spool entry to ``uri`` and remove it; on any failure release it for a later
    sync and raise. Returns the run id. The manifest is validated here, off the recording call's path.

    ``clients`` caches one MlflowClient per tracking URI for the caller (made by ``make_client``).
    """
    try:
        client = clients.get(uri) or clients.setdefault(uri, make_client(uri))
        probe(uri)
        validate(json.loads((entry.artifacts / MANIFEST_PATH).read_text("utf-8")))
        run_id = upload(client, entry)
    except BaseException as exc:
        spool.release(entry, repr(exc))
        raise
    spool.delivered(entry)
    return run_id


@dataclass(frozen=True)
class SyncReport:
    """What one ``repro-track sync`` did: uploaded, failed, and skipped (claimed by another process)."""

    uploaded: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``sync --json`` prints."""
        return {"uploaded": self.uploaded, "failed": self.failed, "skipped": self.skipped,
                "spool": self.roots}


def sync(tracking_uri: str | None = None) -> SyncReport:
    """Upload every unclaimed spooled recording, each exactly once, to where it was going (or to
    ``tracking_uri``). Entries another process is uploading are skipped, not waited for."""
    report = SyncReport(roots=[str(root) for root in spool.roots()])
    clients: dict[str, Any] = {}
    for listed in spool.pending():
        entry = spool.claim(listed)
        if entry is None:
            report.skipped.append(listed.path.name)
            continue
        uri = resolve_tracking_uri(tracking_uri or entry.meta.get("tracking_uri"))
        try:
            run_id = deliver_claimed(entry, uri, clients)
        except Exception as exc:
            report.failed.append({"recording_id": entry.recording_id, "path": str(entry.path),
                                  "error": str(exc) or repr(exc)})
            continue
        report.uploaded.append({"recording_id": entry.recording_id, "run_id": run_id,
                                "tracking_uri": uri})
    return report


# ---------------------------------------------------------------- giving way to recording calls

class _GiveWay:
    """Recording calls that are staging, counted; the worker waits for none before each store call.

    A thread uploading with MLflow competes with the recording thread for the GIL, and every file a
    staging call writes hands the GIL over: getting it back can take a whole switch interval (5 ms),
    which is where a call's time went while the worker was busy. So the worker starts each store
    call only when no call is staging, waiting at most ``max_wait_s`` so that a steady stream of
    calls from many threads still gets its uploads through.
    """

    def __init__(self, max_wait_s: float = 0.02):
        self.max_wait_s = max_wait_s
        self._staging = 0
        self._quiet = threading.Condition()
        self._held = threading.local()  # how many staging() blocks this thread is inside

    def _add(self, n: int) -> None:
        with self._quiet:
            self._staging += n
            if not self._staging:
                self._quiet.notify_all()

    @contextlib.contextmanager
    def staging(self) -> Iterator[None]:
        """Mark a recording call (the function, its capture and its staging)."""
        self._held.depth = getattr(self._held, "depth", 0) + 1
        self._add(1)
        try:
            yield
        finally:
            self._held.depth -= 1
            self._add(-1)

    @contextlib.contextmanager
    def stepping_aside(self) -> Iterator[None]:
        """Inside a call, while it waits for the worker (a full queue, sync delivery): let it run."""
        depth = getattr(self._held, "depth", 0)
        self._add(-depth)
        try:
            yield
        finally:
            self._add(depth)

    def wait(self) -> None:
        """Return once no call is staging, or after ``max_wait_s``."""
        with self._quiet:
            if self._staging:
                self._quiet.wait_for(lambda: not self._staging, self.max_wait_s)


give_way = _GiveWay()
staging = give_way.staging


class _PoliteClient:
    """An MlflowClient whose calls each first give way to recording calls that are staging."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            give_way.wait()
            return value(*args, **kwargs)

        return call


# ---------------------------------------------------------------- the worker

@dataclass
class _Job:
    entry: spool.SpoolEntry
    outcome: RecordOutcome
    announce: bool  # warn from the worker if it fails (background); sync-mode callers warn themselves


class _Worker:
    """One thread uploading staged recordings in order; a bounded queue gives back-pressure."""

    def __init__(self, bound: int):
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max(1, bound))
        self._idle = threading.Condition()
        self._unfinished = 0
        self._clients: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, name="repro-track-delivery", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        """Queue a job; waits while the queue is full."""
        with self._idle:
            self._unfinished += 1
        self._queue.put(job)

    def try_submit(self, job: _Job) -> bool:
        """Queue a job if there is room now; False (nothing queued) when the queue is full."""
        with self._idle:
            self._unfinished += 1
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._idle:
                self._unfinished -= 1
                self._idle.notify_all()
            return False
        return True

    def flush(self, timeout: float | None) -> bool:
        """Wait until every submitted job is settled; False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._unfinished:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    @property
    def unfinished(self) -> int:
        """Jobs submitted and not yet settled."""
        with self._idle:
            return self._unfinished

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                self._deliver(job)
            except BaseException as exc:  # never let one job end the worker or leave a caller waiting
                if not job.outcome.done:
                    job.outcome.settle(error=repr(exc))
            finally:
                with self._idle:
                    self._unfinished -= 1
                    self._idle.notify_all()

    def _deliver(self, job: _Job) -> None:
        uri = job.outcome.tracking_uri
        give_way.wait()  # the schema check in deliver_claimed is pure Python too
        try:
            run_id = deliver_claimed(job.entry, uri, self._clients,
                                     make_client=lambda u: _PoliteClient(client_for(u)))
        except Exception as exc:
            job.outcome.settle(error=str(exc) or repr(exc))
            if job.announce:
                _warn_spooled(uri, job.entry, job.outcome.error or "", stacklevel=1)
            return
        job.outcome.settle(run_id=run_id)


_lock = threading.Lock()
_worker_now: _Worker | None = None


def _worker() -> _Worker:
    global _worker_now
    with _lock:
        if _worker_now is None:
            _worker_now = _Worker(settings.QUEUE_SIZE.get())
        return _worker_now


def _forget_worker() -> None:
    # A forked child has no worker thread; it starts its own on its first recording.
    global _worker_now, _lock
    _worker_now, _lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker)


def flush(timeout: float | None = None) -> bool:
    """Wait for this process's pending uploads; True when all are settled (uploaded or spooled).

    ``timeout`` in seconds (None: no limit). A recording whose upload failed is settled too: it
    waits in the spool for ``repro-track sync``.
    """
    worker = _worker_now
    if worker is None:
        return True
    with give_way.stepping_aside():  # called inside a recorded function: the worker must not wait for it
        return worker.flush(timeout)


@atexit.register
def _flush_at_exit() -> None:
    worker = _worker_now
    if worker is None or worker.flush(settings.EXIT_TIMEOUT.get()):
        return
    message = (f"repro-track: {worker.unfinished} recording(s) were not uploaded before the process "
               f"ended (waited {settings.EXIT_TIMEOUT.get():g} s, {settings.EXIT_TIMEOUT.name}); they stay "
               f"in {settings.spool_dir()}; upload them with `repro-track sync`.")
    warnings.warn(message, RecordingWarning, stacklevel=1)


# ---------------------------------------------------------------- a call's recording

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


def _mode() -> str:
    try:
        return settings.DELIVERY.get()
    except ValueError as exc:  # a mistyped setting must not lose the recording; waiting is the safe reading
        warnings.warn(f"{exc}; delivering synchronously", RecordingWarning, stacklevel=4)
        return "sync"


def deliver(recording: Recording, options: RecordOptions, *, parent: ParentRun | None = None,
            extra_tags: dict[str, str] | None = None) -> RecordOutcome:
    """Stage in the spool and hand to the delivery worker; in sync mode, wait for the upload.

    ``parent`` is the caller's ``repro_track.parent_run`` context, passed down by the recorder.
    """
    uri = resolve_tracking_uri(options.tracking_uri)
    parent_id, parent_experiment = _parent_run(uri, parent)
    # The decorator's experiment, else the user's MLflow choice, else "repro-track"; a named
    # experiment wins over the parent run's, an experiment id set through MLflow does not.
    followed = {} if options.experiment else conventions.followed_experiment(uri)
    experiment = options.experiment or followed.get("experiment")
    meta = {
        "recording_id": uuid.uuid4().hex,
        "tracking_uri": uri,
        "experiment": experiment or conventions.DEFAULT_EXPERIMENT,
        "experiment_id": followed.get("experiment_id"),
        "parent_experiment_id": parent_experiment if experiment is None else None,
        "run_name": options.run_name or _default_run_name(recording.manifest),
        "tags": {**options.tags, **(extra_tags or {})},
        "context_tags": conventions.context_tags(),
        "parent_run_id": parent_id,
    }
    entry = spool.create(recording, meta, validate=False)
    outcome = RecordOutcome(None, uri, entry.path, entry.meta["manifest_digest"],
                            recording_id=entry.recording_id, pending=True)
    waits = _mode() == "sync"
    job = _Job(entry, outcome, announce=not waits)
    worker = _worker()
    if not waits and worker.try_submit(job):
        return outcome
    with give_way.stepping_aside():  # waiting for the worker: it must not wait for us
        worker.submit(job)
        if not waits:
            return outcome
        seconds = settings.LOG_TIMEOUT.get()
        outcome.wait(seconds)
    if not outcome.done:
        job.announce = True
        _warn_spooled(uri, entry, f"logging took longer than {seconds:.0f} s (set "
                      f"{settings.LOG_TIMEOUT.name} to wait longer); it goes on in the background",
                      background=True)
    elif outcome.error:
        _warn_spooled(uri, entry, outcome.error)
    return outcome


def _warn_spooled(uri: str, entry: spool.SpoolEntry, problem: str, background: bool = False,
                  stacklevel: int = 6) -> None:
    # 6 points at the user's call: _warn_spooled <- deliver <- _log <- __call__ <- wrapper <- caller.
    where = ("stays in " if background else "is kept in ") + str(entry.path)
    warnings.warn(f"repro-track could not log to MLflow at {uri}: {problem}. The recording {where}; "
                  "upload it later with `repro-track sync`.", RecordingWarning, stacklevel=stacklevel)


def _default_run_name(manifest: Manifest) -> str:
    seed = manifest.randomness["primary"]["seed"]
    name = manifest.call["qualname"].split(".")[-1]
    prefix = "replay-" if manifest.kind == "replay" else ""
    return f"{prefix}{name}-seed{seed}" if seed is not None else f"{prefix}{name}"
