"""The records passed between the recorder, delivery and the store.

Kept in a module of their own, below all three, so that delivery and the store never import the
recorder: options in, a staged recording through, an outcome back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .outputs import NamedArray
from .manifest import Manifest


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


@dataclass(frozen=True)
class RecordOutcome:
    """Where one recording went: an MLflow run, or the spool folder when MLflow was unreachable."""

    run_id: str | None
    tracking_uri: str
    spool_path: Path | None
    manifest_digest: str | None
    error: str | None = None
