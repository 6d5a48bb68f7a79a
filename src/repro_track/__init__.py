"""repro-track: record, replay and explain diffusion-model generations bit for bit.

``import repro_track`` stays light: torch, mlflow and diffusers load only when a recorded function is
called or a run is replayed.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import Any

try:
    __version__ = _metadata.version("repro-track")
except _metadata.PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

from .errors import (EntryPointRefused, IntegrityError, ManifestError, NotReplayableError,
                     ReproTrackError, RunNotFoundError, StoreError)
from .recorder import RecordOutcome, RecordingWarning, last_recording, record

__all__ = [
    "EntryPointRefused", "IntegrityError", "ManifestError", "NotReplayableError", "RecordOutcome",
    "RecordingWarning", "ReproTrackError", "RunNotFoundError", "StoreError", "__version__",
    "deterministic", "last_recording", "parent_run", "record", "replay",
]


def __getattr__(name: str) -> Any:
    # Heavy entry points load on first use so that the import itself stays cheap.
    if name == "replay":
        from .replay import replay

        return replay
    if name == "parent_run":
        from .group import parent_run

        return parent_run
    if name == "deterministic":
        from .determinism import deterministic

        return deterministic
    raise AttributeError(f"module 'repro_track' has no attribute {name!r}")
