"""The store: MLflow writes (runs, params, tags, artifacts) through an explicit ``MlflowClient``.

Never MLflow's active-run state. Staging and deadlines live in ``delivery``; reading runs back and
verifying them in ``runs``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from . import settings, signing, spool, tags
from .errors import StoreAuthError, StoreError
from .runs import LoadedRun, artifact_repo, get_run

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
MAX_TAG_CHARS = 8000
_BATCH_PARAMS = 100
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The argument, else MLFLOW_TRACKING_URI, else MLflow's own default (sqlite:///mlflow.db)."""
    if uri:
        return uri
    import mlflow

    return mlflow.get_tracking_uri()


def client_for(uri: str | None = None) -> Any:
    """An explicit MlflowClient for the resolved URI (a new SQLite file is created safely)."""
    from mlflow.tracking import MlflowClient

    resolved = resolve_tracking_uri(uri)
    if resolved.startswith("sqlite:"):
        _sqlite_ready(resolved)  # before the client: constructing one may already touch the tables
    return MlflowClient(tracking_uri=resolved)


@functools.lru_cache(maxsize=32)
def _sqlite_ready(uri: str) -> None:
    # MLflow creates or migrates a SQLite store's tables on first use in each process; several
    # processes doing that at once collide ("table ... already exists"). A file lock beside the
    # database lets one process create the tables while the others wait, once per process.
    from mlflow.tracking import MlflowClient

    path = uri.split(":///", 1)[-1] if ":///" in uri else ""
    if not path or path == ":memory:":
        return
    try:
        import fcntl
    except ImportError:  # Windows: no flock; MLflow's own behaviour applies
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        return
    with open(f"{path}.repro-track.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _retry(lambda: MlflowClient(tracking_uri=uri).search_experiments(max_results=1))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _retry(fn: Callable[[], T], attempts: int = 8) -> T:
    # SQLite stores refuse concurrent writers with "database is locked"; back off and retry.
    delay = 0.05
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if "database is locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


_AUTH_HINT = ("set MLFLOW_TRACKING_TOKEN (bearer token) or MLFLOW_TRACKING_USERNAME and "
              "MLFLOW_TRACKING_PASSWORD, or the MLFLOW_TRACKING_AUTH plugin, as for MLflow itself")


def probe(uri: str) -> None:
    """Raise StoreError quickly when an HTTP tracking server does not answer its health check.

    The request goes through MLflow's own machinery (its host credentials: token or basic auth, TLS
    settings, client certificate, request-header plugins) with no retries and repro-track's short
    deadline. Any HTTP answer means the server is up; 401 or 403 raises StoreAuthError.
    """
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0,
                                backoff_factor=0, backoff_jitter=0, retry_codes=(),
                                timeout=settings.PROBE_TIMEOUT.get(), raise_on_status=False)
    except Exception as exc:  # MLflow wraps connection, TLS and timeout failures alike
        problem = _first_line(exc)
        hint = ("; for a private CA set MLFLOW_TRACKING_SERVER_CERT_PATH to its certificate"
                if "SSL" in problem or "certificate" in problem else "")
        raise StoreError(f"tracking server {uri} is not reachable ({problem}){hint}") from None
    if response.status_code in (401, 403):
        raise StoreAuthError(f"tracking server {uri} refused the credentials (HTTP "
                             f"{response.status_code} on /health): {_AUTH_HINT}",
                             status=response.status_code)


def _first_line(exc: BaseException) -> str:
    # MLflow's message wraps urllib3's; the cause ("Connection refused", the TLS error) is the news.
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    if "(Caused by " in text:
        text = text.split("(Caused by ", 1)[1].removesuffix(")")
    return text[:400]


# ---------------------------------------------------------------- writing runs

def _param_key(name: str) -> str:
    return _KEY_BAD.sub("_", name)[:250]


def _flatten(prefix: str, value: Any, out: dict[str, str], depth: int = 0) -> None:
    if isinstance(value, dict) and depth < 4 and value:
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out, depth + 1)
        return
    text = value if isinstance(value, str) else json.dumps(value)
    out[_param_key(prefix)] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def run_params(m: dict[str, Any]) -> dict[str, str]:
    """The user's JSON arguments (flattened), the seed and the generator device."""
    params: dict[str, str] = {}
    for name, arg in m["arguments"].items():
        if arg["kind"] == "json":
            _flatten(tags.PARAM_ARG_PREFIX + name, arg["value"], params)
        elif arg["kind"] in ("dtype", "device"):
            params[_param_key(tags.PARAM_ARG_PREFIX + name)] = arg["value"]
    primary = m["randomness"]["primary"]
    if primary["seed"] is not None:
        params[tags.PARAM_SEED] = str(primary["seed"])
    if primary["generator_device"]:
        params[tags.PARAM_GENERATOR_DEVICE] = primary["generator_device"]
    return params


def run_tags(m: dict[str, Any], digest: str) -> dict[str, str]:
    """The searchable ``repro.*`` tags and MLflow's own source tags."""
    from .rules import risks

    gpu = m["gpu"]["devices"][0] if m["gpu"]["available"] and m["gpu"]["devices"] else None
    sw = m["software"]
    call = m["call"]
    where = call["source_file"] if call["is_script"] and call["source_file"] else call["module"]
    out = {
        tags.KIND: m["kind"],
        tags.ENTRY_POINT: f"{where}:{call['qualname']}",
        tags.GPU: gpu["name"] if gpu else "none",
        tags.TORCH: sw["torch"]["version"],
        tags.CUDA: sw["torch"]["cuda"] or "none",
        tags.CUDNN: sw["torch"]["cudnn"] or "none",
        tags.DIFFUSERS: sw["packages"].get("diffusers") or "none",
        tags.CPU_CAPABILITY: m["cpu"].get("torch_capability") or "unknown",
        tags.THREADS: str(m["determinism"]["num_threads"]),
        tags.DETERMINISTIC: "on" if m["determinism"]["fully_deterministic"] else "off",
        tags.MANIFEST_DIGEST: digest,
        tags.SCHEMA_VERSION: str(m["schema_version"]),
        tags.STATUS: call["status"],
        tags.RISKS: str(len(risks(m))),
        tags.MLFLOW_SOURCE_TYPE: "LOCAL",
    }
    if gpu and gpu.get("sm_count"):
        out[tags.SM_COUNT] = str(gpu["sm_count"])
    primary = m["randomness"]["primary"]
    if primary["seed"] is not None:
        out[tags.SEED] = str(primary["seed"])
    out[tags.GENERATOR_DEVICE] = primary["generator_device"] or "none"
    if call["source_file"]:
        out[tags.MLFLOW_SOURCE_NAME] = call["source_file"]
    if m["git"].get("commit"):
        out[tags.MLFLOW_GIT_COMMIT] = m["git"]["commit"]
    if m.get("replay_of"):
        out[tags.REPLAY_OF] = m["replay_of"]
    return out


def _metrics(m: dict[str, Any], extra: dict[str, float], now_ms: int) -> list[Any]:
    from mlflow.entities import Metric

    values = {"duration_s": m["call"]["duration_s"], **extra}
    for o in m["outputs"]:
        if o["abs_sum"] is not None:
            values[f"abs_sum.{o['name']}"] = o["abs_sum"]
    return [Metric(_param_key(k), float(v), now_ms, 0) for k, v in values.items() if v is not None]


_experiment_ids: dict[tuple[str, str], str] = {}


def experiment_id_for(client: Any, name: str) -> str:
    """ensure_experiment, remembered per store and name for this process (one lookup per run saved)."""
    key = (client.tracking_uri, name)
    if key not in _experiment_ids:
        _experiment_ids[key] = ensure_experiment(client, name)
    return _experiment_ids[key]


def forget_experiment(client: Any, name: str) -> None:
    """Drop a remembered id (after a failed write: the experiment may have been deleted)."""
    _experiment_ids.pop((client.tracking_uri, name), None)


def ensure_experiment(client: Any, name: str) -> str:
    """The experiment id for a name, creating it (tolerating a concurrent creator)."""
    found = _retry(lambda: client.get_experiment_by_name(name))
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise StoreError(f"experiment {name!r} is deleted; restore it in MLflow or pick another name")
        return found.experiment_id
    try:
        # Tagged so that the MLflow 3 UI opens it in its model-development view, not the GenAI one.
        return _retry(lambda: client.create_experiment(
            name, tags={tags.MLFLOW_EXPERIMENT_KIND: tags.EXPERIMENT_KIND_MODEL_DEVELOPMENT}))
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _ms(iso: str) -> int:
    import datetime as dt

    return int(dt.datetime.fromisoformat(iso).timestamp() * 1000)


def upload(client: Any, entry: spool.SpoolEntry) -> str:
    """Log a claimed, staged recording as one run and finish it; returns the run id.

    Exactly once per recording id: unless the entry was staged by this process just now (``fresh``),
    the store is searched first. A finished run means an earlier upload completed (its spool entry
    just was not removed); a RUNNING one is an upload interrupted midway, which is adopted and
    completed. No run is ever deleted.
    """
    meta = entry.meta
    m = json.loads(entry.texts[tags.MANIFEST_PATH])
    experiment_id = _experiment_of(client, meta)
    try:
        found = None if entry.fresh else find_recording(client, experiment_id, entry.recording_id)
        if found is not None and found.info.status != "RUNNING":
            return found.info.run_id
        return _upload(client, entry, spool.prepare_upload(entry), m, experiment_id, found)
    except Exception:
        forget_experiment(client, meta["experiment"])
        raise


def _experiment_of(client: Any, meta: dict[str, Any]) -> str:
    # Inside a parent run of the same store, the recording joins the parent's experiment.
    # An experiment id the user chose through MLflow (set_experiment, MLFLOW_EXPERIMENT_ID) names an
    # experiment of that store only.
    same_store = meta.get("tracking_uri") == client.tracking_uri
    parent_experiment = meta.get("parent_experiment_id")
    if parent_experiment and same_store:
        return parent_experiment
    if meta.get("experiment_id") and same_store:
        return meta["experiment_id"]
    return experiment_id_for(client, meta["experiment"])


def _upload(client: Any, entry: spool.SpoolEntry, tree: Path, m: dict[str, Any], experiment_id: str,
            adopted: Any = None) -> str:
    from mlflow.entities import Param, RunTag

    from .card import record_card
    from .run_images import full_images

    meta = entry.meta
    # MLflow's context tags (user, git branch, repository) first: the manifest's own facts win.
    run_tags_ = {**meta.get("context_tags", {}), **run_tags(m, m["manifest_digest"]),
                 **meta.get("tags", {}), tags.SPOOL_ID: entry.recording_id}
    if meta.get("parent_run_id"):
        run_tags_[tags.MLFLOW_PARENT_RUN_ID] = meta["parent_run_id"]
    signature = signing.check_tree(tree)
    if signature.signed and signature.key_id:
        run_tags_[tags.SIGNED_BY] = signature.key_id
    images = full_images([p.relative_to(tree).as_posix() for p in (tree / tags.IMAGES_DIR).glob("*.png")])
    if images:  # staged in log_image's layout; this tag is the rest of what log_image does
        run_tags_[tags.MLFLOW_LOGGED_IMAGES] = "True"
    if adopted is None:
        run = _retry(lambda: client.create_run(experiment_id, start_time=_ms(m["call"]["started_at"]),
                                               tags=run_tags_, run_name=meta.get("run_name")))
    else:
        run = adopted
    run_id = run.info.run_id
    card = meta.get("card") or record_card(m, run_id, images=images, signature=signature)
    logged = run.data.params if adopted is not None else {}
    params = [Param(k, v) for k, v in sorted(run_params(m).items()) if k not in logged]
    metrics = _metrics(m, meta.get("metrics", {}), _ms(m["call"]["ended_at"]))
    if adopted is not None and run.data.metrics:
        metrics = []  # logged before the interruption; logging again would double their history
    note = [RunTag(tags.MLFLOW_NOTE, card.replace("{run_id}", run_id))]
    if adopted is not None:  # create_run set the tags atomically, but set them again to be sure
        note += [RunTag(k, v) for k, v in run_tags_.items()]
    for start in range(0, max(len(params), 1), _BATCH_PARAMS):
        chunk = params[start:start + _BATCH_PARAMS]
        _retry(lambda: client.log_batch(run_id, metrics=metrics if start == 0 else [], params=chunk,
                                        tags=note if start == 0 else []))
    # Straight to the run's artifact store: the client would look the run up again to find it.
    repo = artifact_repo(client, run)
    _retry(lambda: repo.log_artifacts(str(tree)))
    _link_inputs(client, run_id, experiment_id, m)
    _retry(lambda: set_terminated(client, run_id, m["call"]["status"], _ms(m["call"]["ended_at"])))
    return run_id


def _link_inputs(client: Any, run_id: str, experiment_id: str, m: dict[str, Any]) -> None:
    # The pipeline as a logged model and image arguments as dataset inputs (MLflow 3). The recording
    # is complete without them: a server that lacks these endpoints costs a log line, not the upload.
    from .lineage import link

    try:
        _retry(lambda: link(client, run_id, experiment_id, m))
    except Exception as exc:
        log.warning("run %s: its pipeline and image inputs were not linked in MLflow (%s)", run_id, exc)


_SUPPRESS_URL = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
_env_lock = threading.Lock()


def set_terminated(client: Any, run_id: str, status: str, end_ms: int) -> None:
    """End a run without MLflow printing its URL to stdout."""
    # Against an HTTP server, MlflowClient.set_terminated writes "View run ... at: URL" to stdout:
    # that would land in the user's output (and break `--json`). MLflow reads this switch at call
    # time, so it is turned on for just this call, unless the user set it themselves.
    import os

    with _env_lock:
        if _SUPPRESS_URL in os.environ:
            client.set_terminated(run_id, status, end_time=end_ms)
            return
        os.environ[_SUPPRESS_URL] = "true"
        try:
            client.set_terminated(run_id, status, end_time=end_ms)
        finally:
            os.environ.pop(_SUPPRESS_URL, None)


def find_recording(client: Any, experiment_id: str, recording_id: str) -> Any | None:
    """The run holding a recording id, if any: a finished one first, else the oldest in progress.

    Nothing is deleted: a run in progress is an interrupted upload that the caller, holding the
    recording's spool claim, adopts and finishes.
    """
    runs = _retry(lambda: client.search_runs(
        [experiment_id], filter_string=f"tags.`{tags.SPOOL_ID}` = '{recording_id}'", max_results=10,
        order_by=["attributes.start_time ASC"]))
    done = [run for run in runs if run.info.status != "RUNNING"]
    return (done or list(runs) or [None])[0]


def add_replay_link(client: Any, original: LoadedRun, replay_run_id: str, summary: str) -> None:
    """Link an original run to a replay: the ``repro.replays`` tag and the card's replay list."""
    from .card import record_card
    from .run_images import full_images

    run = get_run(client, original.run_id)
    previous = run.data.tags.get(tags.REPLAYS, "")
    ids = [i for i in previous.split(",") if i] + [replay_run_id]
    client.set_tag(original.run_id, tags.REPLAYS, ",".join(ids)[-MAX_TAG_CHARS:])
    lines = json.loads(run.data.tags.get(tags.REPLAY_LINES, "[]"))
    lines.append(summary)
    client.set_tag(original.run_id, tags.REPLAY_LINES, json.dumps(lines[-20:])[:MAX_TAG_CHARS])
    try:
        images = full_images([f.path for f in client.list_artifacts(original.run_id, tags.IMAGES_DIR)])
    except Exception:  # the card is a convenience; a listing failure must not fail the replay
        images = []
    card = record_card(original.manifest.to_dict(), original.run_id, lines, images=images,
                       signature=original.signature)
    client.set_tag(original.run_id, tags.MLFLOW_NOTE, card)
