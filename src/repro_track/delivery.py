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
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import conventions, settings, spool
from .context import ParentRun
from .manifest import Manifest, validate
from .process import SerialThread, module_command
from .records import GIT_WAIT_S, Recording, RecordingWarning, RecordOptions, RecordOutcome
from .store import client_for, probe, resolve_tracking_uri, upload
from .tags import MANIFEST_PATH

log = logging.getLogger(__name__)


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
        validate(json.loads(entry.texts[MANIFEST_PATH]))
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
    removed: list[str] = field(default_factory=list)  # leftovers of killed processes (spool.sweep)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``sync --json`` prints."""
        return {"uploaded": self.uploaded, "failed": self.failed, "skipped": self.skipped,
                "removed": self.removed, "spool": self.roots}


def sync(tracking_uri: str | None = None) -> SyncReport:
    """Upload every unclaimed spooled recording, each exactly once, to where it was going (or to
    ``tracking_uri``). Entries another process is uploading are skipped, not waited for."""
    report = SyncReport(roots=[str(root) for root in spool.roots()], removed=spool.sweep())
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
    # Set once the staged recording is final (at once, or when git answers: see _complete).
    completed: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    abandoned: bool = False  # git took longer than GIT_WAIT_S: uploaded as staged

    def wait_complete(self) -> None:
        """Wait for the recording's git state, at most ``GIT_WAIT_S``; then upload it as staged."""
        if self.completed.wait(GIT_WAIT_S):
            return
        with self.lock:
            if not self.completed.is_set():
                self.abandoned = True
                log.warning("repro-track: git did not answer within %g s; recording %s is uploaded "
                            "without its git state", GIT_WAIT_S, self.entry.recording_id)
                _seal(self)


# Staged entries are brought up to date here as soon as git answers: not in the caller's thread (a
# future's callback runs there when git answered first), and not behind earlier uploads in the worker
# (an entry left in the spool at exit, or after a kill, then still has git's answer and its signature).
_COMPLETER = SerialThread("repro-track-complete")


def _complete(job: _Job, recording: Future) -> None:
    """Git answered after the call returned: bring the staged entry up to date before its upload."""
    give_way.wait()  # rewriting the manifest is pure Python: not while a call is recording
    with job.lock:
        if job.abandoned:
            return
        try:
            job.outcome.completed(spool.complete(job.entry, recording.result()))
        except Exception as exc:  # the staged recording says git had not answered: still true to upload
            log.warning("repro-track: could not add the git state to recording %s (%r)",
                        job.entry.recording_id, exc)
            _seal(job)
        finally:
            job.completed.set()


def _seal(job: _Job) -> None:
    """Upload the entry as staged: signed (when a key is set) and with its own digest."""
    digest = None
    try:
        digest = spool.seal(job.entry)
    except Exception as exc:  # uploaded unsigned; a replay that requires signatures says so
        log.warning("repro-track: could not sign recording %s (%r)", job.entry.recording_id, exc)
    job.outcome.completed(digest)


class _UploaderGone(Exception):
    """The uploader process ended (or never answered) without a reply."""


class _ClaimedElsewhere(Exception):
    """Another process has the entry (a ``repro-track sync``), or the uploader delivered it and ended
    before saying so: not a failure to warn about, as it is (being) uploaded."""


_FORKED_AWAY: list[Any] = []  # a forked child's copies of the uploader pipes, never closed (see forget)


class _Uploader:
    """The worker's side of the uploader process (``repro_track.uploader``): started at once, used
    once it says it is ready (until then the worker uploads in its own thread)."""

    def __init__(self) -> None:
        # This package, should the caller have imported it from a folder on sys.path only: after the
        # caller's own PYTHONPATH, so that both processes load the same libraries.
        package_parent = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), package_parent) if p)
        self._proc = subprocess.Popen([sys.executable, *module_command("repro_track.uploader")], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._fds = (self._proc.stdin.fileno(), self._proc.stdout.fileno())  # type: ignore[union-attr]
        self._ready = False
        self.served = 0  # uploads it completed

    def ready(self) -> bool:
        """Whether it has said it is ready; never waits. Raises _UploaderGone if it cannot be used."""
        if not self._ready and self._proc.poll() is None:
            try:
                readable, _, _ = select.select([self._proc.stdout], [], [], 0)
                self._ready = bool(readable) and self._read() == {"ready": True}
            except (OSError, ValueError) as exc:  # no select on pipes here, or a garbled line
                raise _UploaderGone(f"the uploader process cannot be used ({exc})") from None
        return self._ready and self._proc.poll() is None

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise _UploaderGone(f"the uploader process ended (exit status {self._proc.wait()})")
        try:
            return json.loads(line)
        except ValueError:
            raise _UploaderGone(f"the uploader process answered {line[:200]!r}") from None

    def deliver(self, entry: spool.SpoolEntry, uri: str) -> dict[str, Any]:
        """Hand a claimed entry over and wait for the reply: run_id, error or skipped."""
        assert self._proc.stdin is not None
        job = {"path": str(entry.path.resolve()), "fresh": entry.fresh, "uri": uri, "cwd": os.getcwd(),
               "env": os.environ.copy()}
        spool.hand_over(entry)
        try:
            self._proc.stdin.write(json.dumps(job).encode("utf-8") + b"\n")
            self._proc.stdin.flush()
        except OSError as exc:
            raise _UploaderGone(f"the uploader process is gone ({exc})") from None
        return self._read()

    def close(self, busy: bool) -> None:
        """Close its input: it ends after the upload it may be doing (``busy``: not waited for); one
        still starting is stopped."""
        if not self._ready:
            self._proc.kill()
        with contextlib.suppress(OSError):
            self._proc.stdin.close()  # type: ignore[union-attr]
        if not busy:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(0.5)

    def forget(self) -> None:
        """In a forked child: point this process's copies of the pipes at /dev/null, so the uploader
        still sees its input close when the parent ends. The file objects are never closed (nor
        collected): a worker thread of the parent may have held their locks at the fork, and no thread
        here would ever release them."""
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            for fd in self._fds:
                with contextlib.suppress(OSError):
                    os.dup2(devnull, fd)
        finally:
            os.close(devnull)
        _FORKED_AWAY.append(self)


class _Worker:
    """One thread uploading staged recordings in order; a bounded queue gives back-pressure.

    The uploads themselves go to the uploader process when ``REPRO_TRACK_UPLOADER=process`` (the
    default on POSIX) and it is ready; otherwise, and if it ever fails, they run in this thread.
    """

    def __init__(self, bound: int):
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=max(1, bound))
        self._idle = threading.Condition()
        self._unfinished = 0
        self._clients: dict[str, Any] = {}
        self._uploader: _Uploader | None = None
        self._uploader_failed = False
        self.handed_over = False  # the uploader process is doing a job now
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

    def _start_uploader(self) -> _Uploader | None:
        if self._uploader is None and not self._uploader_failed:
            try:
                self._uploader = _Uploader()
            except OSError as exc:
                self._uploader_failed = True
                log.warning("repro-track: could not start the uploader process (%s); uploading in a "
                            "thread instead", exc)
        return self._uploader

    def _uploader_gone(self, why: Any) -> None:
        self._uploader, self._uploader_failed = None, True
        log.warning("repro-track: %s; uploading in a thread from now on", why)

    def _upload_in_uploader(self, job: _Job, uploader: _Uploader, uri: str) -> str | None:
        """The run id, or None when the uploader is gone and the entry is this thread's again."""
        try:
            self.handed_over = True
            reply = uploader.deliver(job.entry, uri)
        except _UploaderGone as exc:
            self._uploader_gone(exc)
            entry = spool.claim(job.entry)  # not fresh now: the upload may have begun
            if entry is None:
                raise _ClaimedElsewhere(
                    "the uploader process ended before saying which run it made" if not job.entry.path.exists()
                    else f"another process is uploading {job.entry.path}") from None
            job.entry = entry
            return None
        finally:
            self.handed_over = False
        if "run_id" in reply:
            uploader.served += 1
            return reply["run_id"]
        if "skipped" in reply:
            raise _ClaimedElsewhere(reply["skipped"])
        raise RuntimeError(reply.get("error") or f"unexpected reply {reply!r}")

    def close(self) -> None:
        """Let the uploader process go (at exit, after the bounded flush)."""
        if self._uploader is not None:
            self._uploader.close(busy=self.handed_over)

    def _deliver(self, job: _Job) -> None:
        job.wait_complete()
        uri = job.outcome.tracking_uri
        try:
            run_id = None
            uploader = self._start_uploader() if _uploader_mode() == "process" else None
            try:
                usable = uploader is not None and uploader.ready()
            except _UploaderGone as exc:
                self._uploader_gone(exc)
                usable = False
            if usable and _cwd() is not None:  # MLflow may resolve paths against it: the thread's own
                run_id = self._upload_in_uploader(job, uploader, uri)  # type: ignore[arg-type]
            if run_id is None:
                give_way.wait()  # the schema check in deliver_claimed is pure Python too
                run_id = deliver_claimed(job.entry, uri, self._clients,
                                         make_client=lambda u: _PoliteClient(client_for(u)))
        except _ClaimedElsewhere as exc:  # uploaded, or being uploaded, by another process
            job.outcome.settle(error=str(exc))
            return
        except Exception as exc:
            claim = job.entry.claim
            if claim is not None and claim.is_locked:  # failed before anyone uploaded: for sync now
                spool.release(job.entry, repr(exc))
            job.outcome.settle(error=str(exc) or repr(exc))
            if job.announce:
                _warn_spooled(uri, job.entry, job.outcome.error or "", stacklevel=1)
            return
        job.outcome.settle(run_id=run_id)


def _cwd() -> str | None:
    """The working directory, None when it was removed (the upload then runs in the worker's thread,
    where MLflow finds it missing just as the caller would)."""
    try:
        return os.getcwd()
    except OSError:
        return None


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
    if _worker_now is not None and _worker_now._uploader is not None:
        _worker_now._uploader.forget()
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
    if worker is None:
        return
    flushed = worker.flush(settings.EXIT_TIMEOUT.get())
    finishing = int(worker.handed_over)  # the uploader process finishes it after we end
    worker.close()
    if flushed:
        return
    message = (f"repro-track: {worker.unfinished - finishing} recording(s) were not uploaded before the "
               f"process ended (waited {settings.EXIT_TIMEOUT.get():g} s, {settings.EXIT_TIMEOUT.name}); they "
               f"stay in {settings.spool_dir()}; upload them with `repro-track sync`."
               + (" One more is being finished by the uploader process (if it fails, it stays there too)."
                  if finishing else ""))
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


def _uploader_mode() -> str:
    try:
        return settings.UPLOADER.get()
    except ValueError as exc:
        log.warning("repro-track: %s; uploading in a thread", exc)
        return "thread"


def waits_for_upload() -> bool:
    """Whether a recorded call waits for its own upload (``REPRO_TRACK_DELIVERY=sync``, or a
    mistyped setting, which :func:`deliver` reads as sync too and warns about)."""
    try:
        return settings.DELIVERY.get() == "sync"
    except ValueError:
        return True


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
    later = recording.complete  # git had not answered when the call ended
    if later is not None and later.done() and later.exception() is None:
        recording, later = later.result(), None  # it has by now: staged complete, in one pass
    entry = spool.create(recording, meta, validate=False, sign=later is None)
    outcome = RecordOutcome(None, uri, entry.path, entry.meta["manifest_digest"],
                            recording_id=entry.recording_id, pending=True, completing=later is not None)
    waits = _mode() == "sync"
    job = _Job(entry, outcome, announce=not waits)
    if later is None:
        job.completed.set()
    else:
        _COMPLETER.start()  # now: git may answer while the interpreter exits, too late to start a thread
        later.add_done_callback(lambda done: _COMPLETER.submit(_complete, job, done))
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
