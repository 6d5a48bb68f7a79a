"""Which pipeline part differed: a replay never reports a difference without naming it.

Compares the pipelines of the recorded and the replayed manifest (those passed as arguments, loaded
inside the call, or used from module level), part by part: commit, variant, class, dtype, device,
scheduler config and weights; and collects the notes the child wrote (parts replayed with --force).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _pipelines(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {f"argument {name!r}": a["pipeline"] for name, a in m["arguments"].items()
             if a.get("kind") == "pipeline"}
    for used in m.get("pipelines") or []:
        where = "loaded in the call" if used["origin"] == "loaded" else "module-level"
        found[f"pipeline {used['name']!r} ({where})"] = used["identity"]
    return found


def pipeline_differences(recorded: dict[str, Any], replayed: dict[str, Any]) -> list[str]:
    """One line per pipeline part that the replay ran with differently from the recording."""
    lines = []
    now = _pipelines(replayed)
    for label, was in _pipelines(recorded).items():
        got = now.get(label)
        if got is None:
            lines.append(f"{label}: the replayed call did not use it")
            continue
        lines += [f"{label}: {text}" for text in _identity_differences(was, got)]
    return lines


def _identity_differences(was: dict[str, Any], got: dict[str, Any]) -> list[str]:
    out = []
    for key in ("class", "repo_id", "revision", "variant", "dtype", "device"):
        if was.get(key) != got.get(key):
            out.append(f"{key} {got.get(key)!r}, recorded {was.get(key)!r}")
    for name, comp in sorted(was["components"].items()):
        other = got["components"].get(name)
        if other is None:
            out.append(f"component {name!r} is missing")
            continue
        for key in ("class", "dtype", "device", "attention_processors"):
            if comp.get(key) != other.get(key):
                out.append(f"component {name!r} {key} {other.get(key)!r}, recorded {comp.get(key)!r}")
        if comp.get("weights_sha256") != other.get("weights_sha256"):
            out.append(f"component {name!r} has other weights (sha256 {str(other.get('weights_sha256'))[:12]}..., "
                       f"recorded {str(comp.get('weights_sha256'))[:12]}...)")
        elif comp.get("config") != other.get("config"):
            keys = sorted(set(comp.get("config") or {}) | set(other.get("config") or {}))
            changed = [k for k in keys if (comp.get("config") or {}).get(k) != (other.get("config") or {}).get(k)]
            out.append(f"component {name!r} config differs in {', '.join(changed[:5])}")
    out += [f"component {name!r} was added" for name in sorted(set(got["components"]) - set(was["components"]))]
    return out


def child_notes(out_dir: Path) -> list[str]:
    """Notes the replay child wrote beside its status (parts it replayed anyway under --force)."""
    try:
        notes = json.loads((out_dir / "result.json").read_text("utf-8")).get("notes") or []
    except (OSError, ValueError):
        return []
    return [str(n) for n in notes]


def unavailable(m: dict[str, Any], project_dir: Path) -> list[str]:
    """Pipeline parts that cannot be had here, said before anything runs (the replay is then `none`)."""
    import os

    from .child import load_location

    lines = []
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    for label, identity in _pipelines(m).items():
        location = load_location(identity, str(project_dir))
        if identity.get("source") == "hub" and identity.get("repo_id"):
            if offline and not _cached(identity["repo_id"], identity.get("revision")):
                lines.append(f"{label}: commit {identity.get('revision') or '(unknown)'} of "
                             f"{identity['repo_id']!r} is not in the Hugging Face cache here and "
                             "HF_HUB_OFFLINE is set, so it cannot be loaded")
        elif identity.get("source") == "folder" and not (location and Path(location).is_dir()):
            lines.append(f"{label}: the model folder {identity['name_or_path']!r} does not exist here"
                         + (f" (nor {identity['project_folder']!r} in the project)"
                            if identity.get("project_folder") else "")
                         + "; copy it there or replay where it exists")
    return lines + unavailable_adapters(m)


def _cached(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo_id, "model_index.json", revision=revision, cache_dir=_hub_cache())
    return isinstance(found, str)


def _hub_cache() -> str:
    # huggingface_hub reads these once at import; a replay must see the environment as it is now.
    import os

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(home, "hub")


def unavailable_adapters(m: dict[str, Any]) -> list[str]:
    """LoRA adapters whose source is not here: an in-memory state dict, or a folder that is gone."""
    lines = []
    for label, identity in _pipelines(m).items():
        for adapter in identity.get("adapters") or []:
            source = adapter.get("source")
            if not source:
                lines.append(f"{label}: LoRA adapter {adapter['name']!r} was loaded from an in-memory state "
                             "dict and cannot be loaded again")
            elif Path(source).is_absolute() and not Path(source).exists():
                lines.append(f"{label}: LoRA adapter {adapter['name']!r} came from {source!r}, which does not "
                             "exist here")
    return lines
