"""The store: the only code that talks to MLflow.

Writes go through an explicit ``MlflowClient`` (never MLflow's active-run state); the caller's active
run is only read, to nest a recording under it. A recording is staged in the spool first and uploaded
under a deadline; if the server is down, slow or fails midway, it stays spooled and the call returns.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from . import settings, spool, tags
from .errors import IntegrityError, ManifestError, RunNotFoundError, StoreError
from .manifest import Manifest

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


def probe(uri: str) -> None:
    """Raise StoreError quickly when an HTTP tracking server does not answer its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=settings.PROBE_TIMEOUT.get()) as response:
            response.read(64)
    except (urllib.error.URLError, OSError) as exc:
        raise StoreError(f"tracking server {uri} is not reachable ({exc})") from None


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
        return _retry(lambda: client.create_experiment(name))
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _ms(iso: str) -> int:
    import datetime as dt

    return int(dt.datetime.fromisoformat(iso).timestamp() * 1000)


def upload(client: Any, entry: spool.SpoolEntry, *, dedupe: bool = False) -> str:
    """Create the run for a staged recording and log everything; returns the run id."""
    meta = entry.meta
    m = json.loads((entry.artifacts / tags.MANIFEST_PATH).read_text("utf-8"))
    experiment_id = experiment_id_for(client, meta["experiment"])
    try:
        return _upload(client, entry, m, experiment_id, dedupe)
    except Exception:
        forget_experiment(client, meta["experiment"])
        raise


def _upload(client: Any, entry: spool.SpoolEntry, m: dict[str, Any], experiment_id: str,
            dedupe: bool) -> str:
    from mlflow.entities import Param, RunTag

    from .card import record_card

    meta = entry.meta
    if dedupe:
        done = find_recording(client, experiment_id, entry.recording_id)
        if done is not None:
            return done
    run_tags_ = {**run_tags(m, m["manifest_digest"]), **meta.get("tags", {}),
                 tags.SPOOL_ID: entry.recording_id}
    if meta.get("parent_run_id"):
        run_tags_[tags.MLFLOW_PARENT_RUN_ID] = meta["parent_run_id"]
    run = _retry(lambda: client.create_run(experiment_id, start_time=_ms(m["call"]["started_at"]),
                                           tags=run_tags_, run_name=meta.get("run_name")))
    run_id = run.info.run_id
    images = sorted(p.relative_to(entry.artifacts).as_posix()
                    for p in (entry.artifacts / tags.IMAGES_DIR).glob("*.png"))
    card = meta.get("card") or record_card(m, run_id, images=images)
    params = [Param(k, v) for k, v in sorted(run_params(m).items())]
    metrics = _metrics(m, meta.get("metrics", {}), _ms(m["call"]["ended_at"]))
    note = [RunTag(tags.MLFLOW_NOTE, card.replace("{run_id}", run_id))]
    for start in range(0, max(len(params), 1), _BATCH_PARAMS):
        chunk = params[start:start + _BATCH_PARAMS]
        _retry(lambda: client.log_batch(run_id, metrics=metrics if start == 0 else [], params=chunk,
                                        tags=note if start == 0 else []))
    _retry(lambda: client.log_artifacts(run_id, str(entry.artifacts)))
    _retry(lambda: set_terminated(client, run_id, m["call"]["status"], _ms(m["call"]["ended_at"])))
    return run_id


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


def find_recording(client: Any, experiment_id: str, recording_id: str) -> str | None:
    """The complete run holding a recording id, if one exists; partial ones are deleted."""
    runs = _retry(lambda: client.search_runs(
        [experiment_id], filter_string=f"tags.`{tags.SPOOL_ID}` = '{recording_id}'", max_results=10))
    for run in runs:
        if run.info.status in ("FINISHED", "FAILED"):
            return run.info.run_id
        client.delete_run(run.info.run_id)  # a partial upload: start over
    return None


def _upload_owned(client_factory: Callable[[], Any], entry: spool.SpoolEntry) -> dict[str, Any]:
    """Upload in a worker thread that also settles the spool entry, however late it finishes.

    While the worker runs, the entry stays owned by this (live) process, so ``repro-track sync``
    leaves it alone: a slow upload and a sync can never both create the run.
    """
    box: dict[str, Any] = {"done": threading.Event()}

    def target() -> None:
        try:
            box["run_id"] = upload(client_factory(), entry)
            spool.delivered(entry)
        except BaseException as exc:  # reported to the caller's thread if it still waits
            box["error"] = exc
            spool.release(entry, repr(exc))
        finally:
            box["done"].set()

    threading.Thread(target=target, name="repro-track-upload", daemon=True).start()
    return box


def _parent_run(uri: str) -> tuple[str | None, str | None]:
    """The enclosing repro_track.parent_run, else the caller's active MLflow run (read only),
    as (run id, experiment id) when it lives in the same store."""
    import mlflow

    from .group import current_parent

    group = current_parent()
    if group is not None and group.tracking_uri == uri:
        return group.run_id, group.experiment_id
    active = mlflow.active_run()
    if active is None or mlflow.get_tracking_uri() != uri:
        return None, None
    return active.info.run_id, active.info.experiment_id


def deliver(recording: Any, options: Any, *, extra_tags: dict[str, str] | None = None) -> Any:
    """Stage in the spool, upload under a deadline, and report where the recording went."""
    import os

    uri = resolve_tracking_uri(options.tracking_uri)
    parent_id, parent_experiment = _parent_run(uri)
    experiment = options.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or None
    meta = {
        "recording_id": uuid.uuid4().hex,
        "tracking_uri": uri,
        "experiment": experiment or "repro-track",
        "parent_experiment_id": parent_experiment if experiment is None else None,
        "run_name": options.run_name or _default_run_name(recording.manifest),
        "tags": {**options.tags, **(extra_tags or {})},
        "parent_run_id": parent_id,
    }
    if meta["parent_experiment_id"]:
        meta["experiment"] = _experiment_name(uri, parent_experiment) or meta["experiment"]
    entry = spool.create(recording, meta)
    digest = recording.manifest.digest
    try:
        probe(uri)
    except StoreError as exc:
        spool.release(entry, repr(exc))
        return _spooled(uri, entry, digest, str(exc))
    box = _upload_owned(lambda: client_for(uri), entry)
    seconds = settings.LOG_TIMEOUT.get()
    if not box["done"].wait(seconds):
        return _spooled(uri, entry, digest,
                        f"logging took longer than {seconds:.0f} s (set {settings.LOG_TIMEOUT.name} to "
                        "wait longer); it goes on in the background", background=True)
    if "error" in box:
        return _spooled(uri, entry, digest, str(box["error"]))
    return _outcome()(box["run_id"], uri, None, digest)


def _outcome() -> Any:
    from .recorder import RecordOutcome

    return RecordOutcome


def _spooled(uri: str, entry: spool.SpoolEntry, digest: str, problem: str, background: bool = False) -> Any:
    from .recorder import RecordingWarning

    where = ("stays in " if background else "is kept in ") + str(entry.path)
    warnings.warn(f"repro-track could not log to MLflow at {uri}: {problem}. The recording {where}; "
                  "upload it later with `repro-track sync`.", RecordingWarning, stacklevel=6)
    return _outcome()(None, uri, entry.path, digest, problem)


def _experiment_name(uri: str, experiment_id: str) -> str | None:
    try:
        return client_for(uri).get_experiment(experiment_id).name
    except Exception:
        return None


def _default_run_name(manifest: Manifest) -> str:
    seed = manifest.randomness["primary"]["seed"]
    name = manifest.call["qualname"].split(".")[-1]
    prefix = "replay-" if manifest.kind == "replay" else ""
    return f"{prefix}{name}-seed{seed}" if seed is not None else f"{prefix}{name}"


# ---------------------------------------------------------------- reading runs

_RUN_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


def parse_run_ref(ref: str) -> str:
    """A run id from an id, a ``runs:/<id>[/path]`` URI, or a run URL copied from the MLflow UI."""
    text = ref.strip()
    match = re.match(r"^runs:/([^/]+)", text) or re.search(r"/runs/([0-9A-Za-z_-]+)", text)
    run_id = match.group(1) if match else text
    if not _RUN_ID.match(run_id):
        raise RunNotFoundError(f"{ref!r} is not a run id, a runs:/ URI or an MLflow run URL", run_ref=ref)
    return run_id


@dataclass(frozen=True)
class LoadedRun:
    """A recorded run fetched and checked: its manifest and where its files were downloaded."""

    run_id: str
    experiment_id: str
    manifest: Manifest
    outputs_path: Path | None
    inputs_path: Path | None
    run_tags: dict[str, str]


def _download(client: Any, run_id: str, path: str, dest: Path) -> Path | None:
    folder, _, name = path.rpartition("/")
    try:
        listed = {Path(f.path).name for f in client.list_artifacts(run_id, folder)}
    except Exception as exc:
        raise StoreError(f"run {run_id}: cannot list artifacts under {folder}/ ({exc})") from None
    if name not in listed:
        return None
    return Path(client.download_artifacts(run_id, path, str(dest)))


def get_run(client: Any, run_id: str) -> Any:
    """The MLflow run, or RunNotFoundError with a one-line message."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
            raise RunNotFoundError(f"no run {run_id} in the tracking store {client.tracking_uri}",
                                   run_ref=run_id) from None
        raise StoreError(f"could not read run {run_id}: {exc.message}") from None


def load_run(client: Any, ref: str, dest: Path) -> LoadedRun:
    """Fetch a run's manifest and arrays, validate the manifest, check every digest."""
    run_id = parse_run_ref(ref)
    run = get_run(client, run_id)
    manifest_file = _download(client, run_id, tags.MANIFEST_PATH, dest)
    if manifest_file is None:
        raise RunNotFoundError(f"run {run_id} has no {tags.MANIFEST_PATH}: it was not recorded by "
                               "repro-track", run_ref=ref)
    manifest = Manifest.from_json(manifest_file.read_bytes(), run_id)
    outputs_path = _download(client, run_id, tags.OUTPUTS_PATH, dest)
    inputs_path = _download(client, run_id, tags.INPUTS_PATH, dest)
    saved = [o for o in manifest.outputs if o["saved"]]
    if saved and outputs_path is None:
        raise IntegrityError(f"run {run_id}: {tags.OUTPUTS_PATH} is missing", run_id=run_id, item="outputs")
    if outputs_path is not None:
        verify_arrays(outputs_path, saved, run_id, "output")
    saved_inputs = [{"name": n, **a} for n, a in manifest.arguments.items() if a.get("saved")]
    if saved_inputs:
        if inputs_path is None:
            raise IntegrityError(f"run {run_id}: {tags.INPUTS_PATH} is missing", run_id=run_id,
                                 item="inputs")
        verify_arrays(inputs_path, saved_inputs, run_id, "input")
    return LoadedRun(run_id, run.info.experiment_id, manifest, outputs_path, inputs_path,
                     dict(run.data.tags))


def verify_arrays(path: Path, records: list[dict[str, Any]], run_id: str, what: str) -> dict[str, Any]:
    """Load a safetensors file and check each recorded array's dtype, shape and sha256."""
    from . import outputs

    try:
        arrays = outputs.load_arrays(path)
    except Exception as exc:
        raise IntegrityError(f"run {run_id}: {path.name} is unreadable or truncated ({exc})",
                             run_id=run_id, item=path.name) from None
    for rec in records:
        name = rec["name"]
        if name not in arrays:
            raise IntegrityError(f"run {run_id}: {what} {name!r} is missing from {path.name}",
                                 run_id=run_id, item=name)
        arr = arrays[name]
        if outputs.dtype_name(arr) != rec["dtype"] or list(arr.shape) != rec["shape"]:
            raise IntegrityError(
                f"run {run_id}: {what} {name!r} is {outputs.dtype_name(arr)} {list(arr.shape)} in "
                f"{path.name} but the manifest says {rec['dtype']} {rec['shape']}", run_id=run_id, item=name)
        if outputs.sha256_of(arr) != rec["sha256"]:
            raise IntegrityError(
                f"run {run_id}: {what} {name!r} does not match its recorded sha256 "
                f"({rec['sha256'][:12]}...): the file was modified or corrupted", run_id=run_id, item=name)
    return arrays


def add_replay_link(client: Any, original: LoadedRun, replay_run_id: str, summary: str) -> None:
    """Link an original run to a replay: the ``repro.replays`` tag and the card's replay list."""
    from .card import record_card

    run = get_run(client, original.run_id)
    previous = run.data.tags.get(tags.REPLAYS, "")
    ids = [i for i in previous.split(",") if i] + [replay_run_id]
    client.set_tag(original.run_id, tags.REPLAYS, ",".join(ids)[-MAX_TAG_CHARS:])
    lines = json.loads(run.data.tags.get(tags.REPLAY_LINES, "[]"))
    lines.append(summary)
    client.set_tag(original.run_id, tags.REPLAY_LINES, json.dumps(lines[-20:])[:MAX_TAG_CHARS])
    try:
        images = sorted(f.path for f in client.list_artifacts(original.run_id, tags.IMAGES_DIR))
    except Exception:  # the card is a convenience; a listing failure must not fail the replay
        images = []
    card = record_card(original.manifest.to_dict(), original.run_id, lines, images=images)
    client.set_tag(original.run_id, tags.MLFLOW_NOTE, card)
