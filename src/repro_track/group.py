"""``parent_run``: record a loop of calls (a seed sweep, a batch of prompts) as children of one run.

The parent is held in ``context`` (a context variable that only recordings read), never in MLflow's
active-run state.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from .context import ParentRun, attached


@contextlib.contextmanager
def parent_run(name: str | None = None, *, experiment: str | None = None,
               tracking_uri: str | None = None, tags: dict[str, str] | None = None) -> Iterator[ParentRun]:
    """Create one MLflow run; every recording made inside becomes its child run.

    Recordings in the same tracking store nest under it (and go to its experiment unless they name
    another). Threads started inside do not inherit it (use ``contextvars.copy_context``). The parent
    ends FINISHED, or FAILED if the block raised.
    """
    from . import conventions, store, tags as tag_keys

    uri = store.resolve_tracking_uri(tracking_uri)
    client = store.client_for(uri)
    followed = {} if experiment else conventions.followed_experiment(uri)
    experiment_id = followed.get("experiment_id") or store.ensure_experiment(
        client, experiment or followed.get("experiment") or conventions.DEFAULT_EXPERIMENT)
    run = client.create_run(experiment_id, run_name=name,
                            tags={**conventions.context_tags(), tag_keys.KIND: "group", **(tags or {})})
    parent = ParentRun(run.info.run_id, experiment_id, uri)
    status = "FAILED"
    try:
        with attached(parent):
            yield parent
        status = "FINISHED"
    finally:
        from . import delivery, settings

        # The children upload in the background: give them the logging deadline to land first, so
        # the parent does not end (in the UI) before its children exist.
        delivery.flush(settings.LOG_TIMEOUT.get())
        store.set_terminated(client, parent.run_id, status, int(time.time() * 1000))
