"""Reading runs back: resolve a run reference, download its manifest and arrays, verify every digest.

Read-only: nothing here writes to the store. Replay, show, diff and export start from a LoadedRun.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import tags
from .errors import IntegrityError, RunNotFoundError, StoreError
from .manifest import Manifest
from .signing import UNSIGNED, SignatureCheck, check_run

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
    signature: SignatureCheck = UNSIGNED


def artifact_repo(client: Any, run: Any) -> Any:
    """The store of one run's artifacts, reached directly: MLflow's ``runs:/`` indirection looks the
    run up again, and searches logged models, for every file it lists or downloads."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(run.info.artifact_uri, tracking_uri=client.tracking_uri)


def _fetch(repo: Any, run_id: str, path: str, dest: Path) -> Path | None:
    """Download one artifact from the run's store; None when absent; refuse a symlink in a local store
    (it would read a file of this machine, or /dev/zero forever, as the run's artifact)."""
    folder, _, name = path.rpartition("/")
    try:
        listed = {Path(f.path).name for f in repo.list_artifacts(folder or None)}
    except Exception as exc:
        raise StoreError(f"run {run_id}: cannot list artifacts under {folder}/ ({exc})") from None
    if name not in listed:
        return None
    root = getattr(repo, "artifact_dir", None)  # a LocalArtifactRepository
    if root is not None:
        stored = Path(root)
        for part in path.split("/"):
            stored = stored / part
            if stored.is_symlink():
                break
        if stored.is_symlink() or not stored.is_file():
            raise IntegrityError(f"run {run_id}: {path} is a symbolic link or not a regular file in the "
                                 "artifact store; refusing to read it", run_id=run_id, item=path)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        return Path(repo.download_artifacts(path, str(dest)))
    except Exception as exc:
        raise StoreError(f"run {run_id}: cannot download {path} ({exc})") from None


def fetch_artifact(client: Any, run_id: str, path: str, dest: Path) -> Path | None:
    """Download one artifact of a run under dest; None when the run has no such artifact. A symbolic
    link in a local store is refused (IntegrityError), as for the manifest and arrays."""
    return _fetch(artifact_repo(client, get_run(client, run_id)), run_id, path, dest)


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
    repo = artifact_repo(client, run)
    manifest_file = _fetch(repo, run_id, tags.MANIFEST_PATH, dest)
    if manifest_file is None:
        raise RunNotFoundError(f"run {run_id} has no {tags.MANIFEST_PATH}: it was not recorded by "
                               "repro-track", run_ref=ref)
    manifest = Manifest.from_json(manifest_file.read_bytes(), run_id)
    outputs_path = _fetch(repo, run_id, tags.OUTPUTS_PATH, dest)
    inputs_path = _fetch(repo, run_id, tags.INPUTS_PATH, dest)
    saved = [o for o in manifest.outputs if o["saved"]]
    if saved and outputs_path is None:
        raise IntegrityError(f"run {run_id}: {tags.OUTPUTS_PATH} is missing", run_id=run_id, item="outputs")
    if outputs_path is not None:
        verify_arrays(outputs_path, saved, run_id, "output")
    saved_inputs = [{"name": n, **a} for n, a in manifest.arguments.items() if a.get("saved")]
    saved_inputs += [{"name": item["key"], **item} for a in manifest.arguments.values()
                     if a.get("kind") == "images" for item in a["items"] if item["saved"]]
    if saved_inputs:
        if inputs_path is None:
            raise IntegrityError(f"run {run_id}: {tags.INPUTS_PATH} is missing", run_id=run_id,
                                 item="inputs")
        verify_arrays(inputs_path, saved_inputs, run_id, "input")
    # Checked last, on the very files read above; replay refuses a bad one when signing is required.
    signature = check_run(run_id, _fetch(repo, run_id, tags.SIGNATURE_PATH, dest), dest,
                          list_folder=repo.list_artifacts, fetch=lambda rel: _fetch(repo, run_id, rel, dest))
    return LoadedRun(run_id, run.info.experiment_id, manifest, outputs_path, inputs_path,
                     dict(run.data.tags), signature)


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
