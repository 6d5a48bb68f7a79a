"""Typed settings read from environment variables, each read when used (never cached at import)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One environment-variable setting with a type and a default."""

    name: str
    parse: Callable[[str], T]
    default: T
    doc: str

    def get(self) -> T:
        """The current value: the parsed variable, or the default when unset or empty."""
        raw = os.environ.get(self.name, "")
        if raw == "":
            return self.default
        try:
            return self.parse(raw)
        except ValueError as exc:
            raise ValueError(f"{self.name}={raw!r} is not valid: {exc}") from None


def _bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _default_spool() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "repro-track" / "spool"


SPOOL_DIR = Setting(
    "REPRO_TRACK_SPOOL_DIR", Path, None,  # type: ignore[arg-type]
    "Folder for recordings that could not reach MLflow (default: $XDG_CACHE_HOME/repro-track/spool).",
)
DISABLED = Setting(
    "REPRO_TRACK_DISABLE", _bool, False, "Turn recording off: decorated functions run bare."
)
LOG_TIMEOUT = Setting(
    "REPRO_TRACK_LOG_TIMEOUT", float, 15.0,
    "Seconds a call waits for MLflow logging before it spools the recording and returns.",
)
PROBE_TIMEOUT = Setting(
    "REPRO_TRACK_PROBE_TIMEOUT", float, 2.0,
    "Seconds to wait for an HTTP tracking server's /health before treating it as down.",
)
MAX_INPUT_BYTES = Setting(
    "REPRO_TRACK_MAX_INPUT_BYTES", int, 256 * 1024 * 1024,
    "Largest tensor/array argument saved with a run so it can be replayed.",
)
DEBUG = Setting("REPRO_TRACK_DEBUG", _bool, False, "Show full tracebacks from the CLI.")


def _delivery(raw: str) -> str:
    if raw.lower() not in ("sync", "background"):
        raise ValueError("expected sync or background")
    return raw.lower()


DELIVERY = Setting(
    "REPRO_TRACK_DELIVERY", _delivery, "background",
    "background: a call stages its recording and returns while a worker uploads it; sync: the call "
    f"waits for the upload (up to {LOG_TIMEOUT.name}) so the run exists when it returns.",
)


def _uploader(raw: str) -> str:
    if raw.lower() not in ("process", "thread"):
        raise ValueError("expected process or thread")
    return raw.lower()


UPLOADER = Setting(
    "REPRO_TRACK_UPLOADER", _uploader, "process" if os.name == "posix" else "thread",
    "process: background uploads run in a helper process (started with the first recording), so their "
    "Python work does not compete with the caller's for the GIL; thread: they run in a thread of the "
    "recording process (the default where there is no POSIX select on pipes).",
)
QUEUE_SIZE = Setting(
    "REPRO_TRACK_QUEUE_SIZE", int, 64,
    "Staged recordings waiting for the delivery worker before a call waits for room (back-pressure).",
)
EXIT_TIMEOUT = Setting(
    "REPRO_TRACK_EXIT_TIMEOUT", float, 30.0,
    "Seconds the exit handler waits for pending uploads; what is left stays spooled for `repro-track sync`.",
)


def _seconds(raw: str) -> float | None:
    value = float(raw)
    if value < 0 or value != value:
        raise ValueError("expected a number of seconds, 0 for no limit")
    return value or None


REPLAY_TIMEOUT = Setting(
    "REPRO_TRACK_REPLAY_TIMEOUT", _seconds, 3 * 3600.0,  # type: ignore[arg-type]
    "Seconds a replay's child process may run before it is ended and the replay is unverified "
    "(0: no limit). Generous by default: a CPU-only generation can take an hour.",
)
SIGNING_KEY = Setting(
    "REPRO_TRACK_SIGNING_KEY", Path, None,  # type: ignore[arg-type]
    "PEM file of an Ed25519 private key: every recording is signed with it (`repro-track keygen`).",
)
TRUSTED_KEYS = Setting(
    "REPRO_TRACK_TRUSTED_KEYS", Path, None,  # type: ignore[arg-type]
    "A file of PEM Ed25519 public keys, or a folder of such files: signatures they verify are trusted.",
)
REQUIRE_SIGNED = Setting(
    "REPRO_TRACK_REQUIRE_SIGNED", _bool, False,
    "Replay only runs signed by a trusted key (as `repro-track replay --require-signed`).",
)


def spool_dir() -> Path:
    """The spool folder, from ``REPRO_TRACK_SPOOL_DIR`` or the per-user cache."""
    return SPOOL_DIR.get() or _default_spool()
