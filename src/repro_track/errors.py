"""The error classes of repro-track.

Every error derives from :class:`ReproTrackError`. Each also subclasses the builtin that matches its
meaning (a missing run is a ``LookupError``, a corrupt manifest a ``ValueError``), so callers that
already catch builtins keep working. Each message says what failed, where, and how to fix it.
"""

from __future__ import annotations


class ReproTrackError(Exception):
    """Root of every error raised by repro-track."""


class ManifestError(ReproTrackError, ValueError):
    """A manifest is missing, malformed, of an unknown schema version, or fails validation."""

    def __init__(self, message: str, *, field: str | None = None, run_id: str | None = None):
        super().__init__(message)
        self.field = field
        self.run_id = run_id


class IntegrityError(ReproTrackError, ValueError):
    """A run's manifest or outputs do not match their recorded digests (tampered or corrupt)."""

    def __init__(self, message: str, *, run_id: str | None = None, item: str | None = None):
        super().__init__(message)
        self.run_id = run_id
        self.item = item


class RunNotFoundError(ReproTrackError, LookupError):
    """The run reference names no run in the tracking store, or the run holds no manifest."""

    def __init__(self, message: str, *, run_ref: str | None = None):
        super().__init__(message)
        self.run_ref = run_ref


class EntryPointRefused(ReproTrackError, PermissionError):
    """A manifest names an entry point the replayer will not run (not decorated, outside the project)."""


class UntrustedManifestError(ReproTrackError, PermissionError):
    """A manifest asks the replay for something repro-track never records or never takes from a
    manifest: a loader or path variable, a pipeline class outside diffusers, remote code."""

    def __init__(self, message: str, *, run_id: str | None = None, item: str | None = None):
        super().__init__(message)
        self.run_id = run_id
        self.item = item


class NotReplayableError(ReproTrackError, RuntimeError):
    """A recorded call cannot be rebuilt here: an argument, a pipeline or the function is missing."""

    def __init__(self, message: str, *, argument: str | None = None):
        super().__init__(message)
        self.argument = argument


class StoreError(ReproTrackError, ConnectionError):
    """The MLflow tracking store could not be reached or refused a write."""


class StoreAuthError(StoreError):
    """The tracking server answered but refused the credentials (HTTP 401 or 403)."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class SignatureError(ReproTrackError, PermissionError):
    """A run that must be signed is unsigned, or its signature does not verify with a trusted key."""

    def __init__(self, message: str, *, run_id: str | None = None, key_id: str | None = None):
        super().__init__(message)
        self.run_id = run_id
        self.key_id = key_id


class SigningKeyError(ReproTrackError, ValueError):
    """A signing key or trusted-key file is missing, unreadable or not an Ed25519 key."""

    def __init__(self, message: str, *, path: str | None = None):
        super().__init__(message)
        self.path = path
