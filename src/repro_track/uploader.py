"""The uploader process: uploads claimed spool entries for a recording process's delivery worker.

A thread uploading with MLflow competes with the caller's recording calls for the GIL; a process does
not. The delivery worker runs this module as a script (the caller's working directory left off
sys.path) with its first recording and, once the uploader says it is ready, hands each staged entry over in turn: it lets go of the entry's claim,
sends one JSON line (the entry's folder, whether it is fresh, the tracking URI, the caller's working
directory and environment at that moment), and reads one JSON line back: the run id, an error, or
that another process had claimed the entry first. The uploader claims the entry itself before
anything is sent, so the one delivery protocol (``delivery.deliver_claimed``) holds: a recording is
uploaded once, and one whose upload was cut short is finished by ``sync``.

The uploader ends when its input closes (the recording process ended or was killed): it finishes
the upload it is doing, never starts another, and leaves the rest to ``repro-track sync``. It ignores
Ctrl-C, which the terminal sends to the recording process's whole group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, BinaryIO

from . import delivery, spool

READY = {"ready": True}


def serve(job: dict[str, Any], clients: dict[str, Any]) -> dict[str, str]:
    """Claim and upload one handed-over entry; the reply sent back to the worker."""
    listed = spool.SpoolEntry(Path(job["path"]), {})
    try:
        entry = spool.claim(listed)
    except OSError as exc:  # the spool folder went away: nothing to upload, and nothing to keep
        return {"error": f"could not claim {listed.path}: {exc}"}
    if entry is None:
        return {"skipped": f"another process claimed {listed.path} first (a `repro-track sync`?)"}
    entry = dataclasses.replace(entry, fresh=bool(job.get("fresh")))
    try:
        return {"run_id": delivery.deliver_claimed(entry, job["uri"], clients)}
    except Exception as exc:  # released for sync by deliver_claimed; the worker warns the caller
        return {"error": str(exc) or repr(exc)}


def _take_on(job: dict[str, Any]) -> None:
    # The caller's settings at the time of its call: credentials, tracking and signing variables,
    # and the working directory a relative store path is read against.
    os.environ.clear()
    os.environ.update(job["env"])
    os.chdir(job["cwd"])


def main(requests: BinaryIO | None = None) -> None:
    """Serve jobs from stdin until it closes; replies on the original stdout, one JSON line each."""
    # Replies get a descriptor of their own; anything else printed to stdout goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    requests = requests or sys.stdin.buffer
    # Ctrl-C in the caller's terminal reaches this process too: it must not cut an upload short. It
    # ends when its input closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Background work: the recording process (and the git it runs per call) goes first for a core.
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)
    importlib.import_module("mlflow.tracking")  # before saying ready: the worker uploads itself until then
    try:
        _reply(replies, READY)
        clients: dict[str, Any] = {}
        for line in requests:
            job = json.loads(line)
            try:
                _take_on(job)
            except OSError as exc:  # the folder went away since: the entry stays for sync
                _reply(replies, {"error": f"could not enter the working directory {job['cwd']}: {exc}"})
                continue
            _reply(replies, serve(job, clients))
    except BrokenPipeError:  # the recording process is gone: what is left is for `repro-track sync`
        return


def _reply(replies: Any, message: dict[str, Any]) -> None:
    replies.write(json.dumps(message) + "\n")
    replies.flush()


if __name__ == "__main__":
    main()
    sys.stderr.flush()
    os._exit(0)  # nothing left to write; the interpreter's teardown would only keep the worker waiting
