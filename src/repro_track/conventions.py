"""MLflow's own conventions, read (never changed) so a recording lands where MLflow's logging would.

Which experiment: the one the user chose through MLflow (``mlflow.set_experiment``,
``MLFLOW_EXPERIMENT_NAME``, ``MLFLOW_EXPERIMENT_ID``), as MLflow's fluent API resolves it, when the
recording goes to the fluent API's store. Which context tags: those of MLflow's run-context registry
(user, source, git commit, branch and repository URL), resolved in the recording process so that a
later ``repro-track sync`` elsewhere uploads the recording's own context.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "repro-track"


def followed_experiment(uri: str) -> dict[str, str]:
    """The user's MLflow experiment choice for a store, as a spool-meta fragment.

    ``{"experiment_id": ...}`` for ``mlflow.set_experiment`` or ``MLFLOW_EXPERIMENT_ID``,
    ``{"experiment": name}`` for ``MLFLOW_EXPERIMENT_NAME``, ``{}`` when the user chose nothing
    (the recording then goes to the documented ``repro-track`` experiment). The fluent choice applies
    to the fluent API's store only, as in MLflow; the name variable is honoured for any store.
    """
    import mlflow
    from mlflow.tracking import fluent

    same_store = mlflow.get_tracking_uri() == uri
    active = getattr(fluent, "_active_experiment_id", None)  # read only: set by mlflow.set_experiment
    if active and same_store:
        return {"experiment_id": str(active)}
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        return {"experiment": name}
    env_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if env_id and same_store:
        return {"experiment_id": env_id}
    return {}


_CONTEXT_TTL_S = 30.0
_context_cache: tuple[float, dict[str, str]] | None = None


def context_tags() -> dict[str, str]:
    """MLflow's run-context tags for this process (user, source, git), through its own registry.

    They describe the process, not the call, and resolving them costs milliseconds (MLflow probes
    for notebook and Databricks contexts each time), so a recording reuses those resolved in the last
    30 seconds; the manifest's own git section is captured per call. Each provider is isolated by
    MLflow; a registry that fails as a whole is logged, never raised: context tags are a convenience
    and must not cost a recording. MLflow strips credentials from the repository URL; the values are
    scrubbed again as any string leaving the process.
    """
    global _context_cache
    import time

    cached = _context_cache
    if cached is not None and time.monotonic() - cached[0] < _CONTEXT_TTL_S:
        return dict(cached[1])
    tags = _resolve_context_tags()
    _context_cache = (time.monotonic(), tags)
    return dict(tags)


def _resolve_context_tags() -> dict[str, str]:
    try:
        from mlflow.tracking.context.registry import resolve_tags

        resolved: dict[str, Any] = resolve_tags()
    except Exception:
        log.debug("MLflow's run-context registry failed", exc_info=True)
        return {}
    from .scrub import blank

    return {str(key): blank(str(value)) for key, value in resolved.items() if value is not None}
