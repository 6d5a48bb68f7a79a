"""MLflow 3's native places for what a recording used: the pipeline as a logged model, images as inputs.

A run's pipelines (each recorded identity: class, origin, weights digest) become ``LoggedModel``
entries of the run's experiment, one per identity (found again by the ``repro.pipeline`` tag, so a
seed sweep shares one model), linked to the run as model inputs; image arguments become the run's
dataset inputs (named by argument, with their digest), so the run page's Inputs list and MLflow's
model view show what went in. Part of the store: it talks to MLflow through an explicit client.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from . import tags

MODEL_TYPE = "diffusers-pipeline"
_NAME_BAD = re.compile(r"[/:.%\"']")  # characters MLflow refuses in a logged model's name
_PARAMS = ("class", "repo_id", "name_or_path", "revision", "variant", "dtype", "weights_sha256")


def pipeline_identities(m: dict[str, Any]) -> list[dict[str, Any]]:
    """Every distinct pipeline identity a manifest names (used globals, loaded ones, arguments)."""
    found = [p["identity"] for p in m.get("pipelines") or [] if isinstance(p.get("identity"), dict)]
    found += [a["pipeline"] for a in m["arguments"].values()
              if a.get("kind") == "pipeline" and isinstance(a.get("pipeline"), dict)]
    unique: dict[str, dict[str, Any]] = {}
    for identity in found:
        unique.setdefault(identity_digest(identity), identity)
    return list(unique.values())


def identity_digest(identity: dict[str, Any]) -> str:
    """What makes two pipelines the same model: the identity without where it ran (device)."""
    kept = {k: v for k, v in identity.items() if k != "device"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def image_inputs(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The image arguments of a manifest, one entry per image (key, digest, size, mode)."""
    items = []
    for arg in m["arguments"].values():
        if arg.get("kind") == "image":
            items.append(arg)
        elif arg.get("kind") == "images":
            items += arg.get("items") or []
    return [item for item in items if item.get("key") and item.get("sha256")]


def model_name(identity: dict[str, Any]) -> str:
    """A logged model's name for a pipeline: its hub id or folder, else its class."""
    if identity.get("repo_id"):
        source = str(identity["repo_id"])  # "org/name" -> "org_name"
    elif identity.get("name_or_path"):
        source = str(identity["name_or_path"]).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    else:
        source = str(identity.get("class") or "pipeline").rsplit(".", 1)[-1]
    return _NAME_BAD.sub("_", source)[:200] or "pipeline"


def link(client: Any, run_id: str, experiment_id: str, m: dict[str, Any]) -> None:
    """Link a run to its pipelines (logged models) and image arguments (dataset inputs).

    Idempotent: models are found again by identity, and MLflow keeps one input per dataset digest
    and per model, so an upload that is adopted and finished does not duplicate them.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput

    models = [LoggedModelInput(_model_for(client, experiment_id, run_id, identity))
              for identity in pipeline_identities(m)]
    datasets = [DatasetInput(Dataset(
        name=item["key"], digest=item["sha256"][:32], source_type="repro-track",
        source=json.dumps({"artifact": tags.INPUTS_PATH, "key": item["key"]}) if item.get("saved")
        else json.dumps({"not_saved": item["key"]}),
        profile=json.dumps({k: item.get(k) for k in ("mode", "size", "shape", "dtype", "sha256")},
                           default=str)),
        [InputTag("mlflow.data.context", "input")]) for item in image_inputs(m)]
    if models or datasets:
        client.log_inputs(run_id, datasets=datasets or None, models=models or None)


def _model_for(client: Any, experiment_id: str, run_id: str, identity: dict[str, Any]) -> str:
    digest = identity_digest(identity)
    found = client.search_logged_models(
        [experiment_id], filter_string=f"tags.`{tags.PIPELINE}` = '{digest}'", max_results=1)
    if found:
        return found[0].model_id
    params = {k: str(identity[k]) for k in _PARAMS if identity.get(k) is not None}
    model = client.create_logged_model(experiment_id, name=model_name(identity), source_run_id=run_id,
                                       tags={tags.PIPELINE: digest}, params=params, model_type=MODEL_TYPE)
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id
