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

# Imported eagerly: the subpackage shares the function's name, and importing it lazily would leave
# `repro_track.replay` bound to the module. It needs only the standard library at import.
from .replay import ReplayReport, replay

__all__ = [
    "EntryPointRefused", "IntegrityError", "ManifestError", "NotReplayableError", "RecordOutcome",
    "RecordingWarning", "ReplayReport", "ReproTrackError", "RunNotFoundError", "StoreError", "__version__",
    "autolog", "deterministic", "flush", "last_recording", "parent_run", "record", "replay",
]


def __getattr__(name: str) -> Any:
    # Heavy entry points load on first use so that the import itself stays cheap.
    if name == "parent_run":
        from .group import parent_run

        return parent_run
    if name == "flush":
        from .delivery import flush

        return flush
    if name == "autolog":
        from .autologging import autolog  # not .autolog: a submodule would shadow the function

        return autolog
    if name == "deterministic":
        from .determinism import deterministic

        return deterministic
    raise AttributeError(f"module 'repro_track' has no attribute {name!r}")
