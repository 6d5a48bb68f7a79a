"""The parent-run context: which ``repro_track.parent_run`` encloses the current call, if any.

MLflow's fluent API would make the parent the caller's active run; repro-track never touches that
state, so the parent lives in a context variable. The recorder reads it and passes it down.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class ParentRun:
    """The run that recordings made inside ``parent_run`` attach to."""

    run_id: str
    experiment_id: str
    tracking_uri: str


_current: contextvars.ContextVar[ParentRun | None] = contextvars.ContextVar(
    "repro_track_parent_run", default=None)


def current_parent() -> ParentRun | None:
    """The innermost active ``parent_run`` in this context, if any."""
    return _current.get()


@contextlib.contextmanager
def attached(parent: ParentRun) -> Iterator[ParentRun]:
    """Make ``parent`` the enclosing parent run for the duration of the block."""
    token = _current.set(parent)
    try:
        yield parent
    finally:
        _current.reset(token)
