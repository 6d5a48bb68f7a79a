"""The records passed between the recorder, delivery and the store.

Kept in a module of their own, below all three, so that delivery and the store never import the
recorder: options in, a staged recording through, an outcome back.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .outputs import NamedArray
from .manifest import Manifest


# How long a staged recording waits for its git state (git runs beside the call; a call quicker than git
# returns first) before it is uploaded as staged, saying that git had not answered.
GIT_WAIT_S = 120.0


class RecordingWarning(UserWarning):
    """Recording or logging failed; the generation itself was not affected."""


@dataclass(frozen=True)
class RecordOptions:
    """How and where a decorated function's calls are recorded."""

    experiment: str | None = None
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    tracking_uri: str | None = None
    log_outputs: bool = True
    deterministic: bool = False


@dataclass(frozen=True)
class Recording:
    """One captured call: its manifest and the arrays and texts that go beside it."""

    manifest: Manifest
    outputs: list[NamedArray]
    inputs: list[NamedArray]
    requirements: str
    git_diff: str | None
    # For a call that returned before git answered: a concurrent.futures.Future of this recording with
    # its git state (the manifest above says git had not answered, which is what a process killed in
    # between leaves behind). None when the recording is complete.
    complete: Any = field(default=None, compare=False, repr=False)


class RecordOutcome:
    """Where one recording went: known at once by its recording id, later by its MLflow run.

    MLflow chooses run ids itself, so with background delivery ``run_id`` is ``None`` until the
    upload is done; :meth:`wait` blocks until then and returns it. If the upload fails, ``error``
    says why and ``spool_path`` is where the recording waits for ``repro-track sync``. Not a frozen
    record: the delivery worker settles it once, after the call has returned.
    """

    def __init__(self, run_id: str | None, tracking_uri: str, spool_path: Path | None,
                 manifest_digest: str | None, error: str | None = None, *,
                 recording_id: str | None = None, pending: bool = False, completing: bool = False):
        self.tracking_uri = tracking_uri
        self.recording_id = recording_id
        self._digest = manifest_digest
        self._run_id, self._spool_path, self._error = run_id, spool_path, error
        self._settled = threading.Event()
        self._completed = threading.Event()  # the manifest is final (git has answered)
        if not pending:
            self._settled.set()
        if not completing:
            self._completed.set()

    @property
    def manifest_digest(self) -> str | None:
        """The digest of the recording's manifest. A call returns before git has answered when git is
        slower than the call; the manifest, and so its digest, is final a few milliseconds later:
        this waits for that, at most ``GIT_WAIT_S`` (when git hangs, the staged digest)."""
        self._completed.wait(GIT_WAIT_S)
        return self._digest

    def completed(self, digest: str | None) -> None:
        """The manifest is final (called by delivery); ``digest`` None keeps the staged one."""
        if digest is not None:
            self._digest = digest
        self._completed.set()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once the upload is done; None while pending or when it failed."""
        return self._run_id

    @property
    def spool_path(self) -> Path | None:
        """The spool folder holding the recording while it is not (yet) uploaded."""
        return self._spool_path

    @property
    def error(self) -> str | None:
        """Why the upload failed (the recording then stays in the spool)."""
        return self._error

    @property
    def done(self) -> bool:
        """Whether delivery has settled: uploaded, or left in the spool with an error."""
        return self._settled.is_set()

    def wait(self, timeout: float | None = None) -> str | None:
        """Wait up to ``timeout`` seconds (None: no limit) for the upload; the run id, else None."""
        self._settled.wait(timeout)
        return self._run_id

    def settle(self, run_id: str | None = None, error: str | None = None) -> None:
        """Record how delivery ended (called once, by delivery)."""
        self._run_id, self._error = run_id, error
        if run_id is not None:
            self._spool_path = None
        self._completed.set()
        self._settled.set()

    def __repr__(self) -> str:
        state = "uploaded" if self._run_id else ("failed" if self._error else
                                                 "settled" if self.done else "pending")
        return (f"RecordOutcome(recording_id={self.recording_id!r}, run_id={self._run_id!r}, "
                f"state={state!r}, tracking_uri={self.tracking_uri!r})")
