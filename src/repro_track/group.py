"""``parent_run``: record a loop of calls (a seed sweep, a batch of prompts) as children of one run.

MLflow's fluent API would make the parent the caller's active run; repro-track never touches that
state, so the parent lives in a context variable that only recordings read.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
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
def parent_run(name: str | None = None, *, experiment: str | None = None,
               tracking_uri: str | None = None, tags: dict[str, str] | None = None) -> Iterator[ParentRun]:
    """Create one MLflow run; every recording made inside becomes its child run.

    Recordings in the same tracking store nest under it (and go to its experiment unless they name
    another). Threads started inside do not inherit it (use ``contextvars.copy_context``). The parent
    ends FINISHED, or FAILED if the block raised.
    """
    import os

    from . import store, tags as tag_keys

    uri = store.resolve_tracking_uri(tracking_uri)
    client = store.client_for(uri)
    experiment_id = store.ensure_experiment(
        client, experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "repro-track")
    run = client.create_run(experiment_id, run_name=name,
                            tags={tag_keys.KIND: "group", **(tags or {})})
    parent = ParentRun(run.info.run_id, experiment_id, uri)
    token = _current.set(parent)
    status = "FAILED"
    try:
        yield parent
        status = "FINISHED"
    finally:
        _current.reset(token)
        store.set_terminated(client, parent.run_id, status, int(time.time() * 1000))
