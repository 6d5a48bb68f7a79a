"""Arguments of a recorded call: what each one is, and whether the replayer can rebuild it.

JSON-safe values are kept verbatim; generators become references into the randomness section;
tensors and arrays are described by dtype, shape and sha256 and saved beside the outputs (up to a
size cap) so they replay; a diffusers pipeline is kept by identity (class, name_or_path, each
component's class, config and weights digest); anything else is marked not replayable.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import outputs, scrub
from . import host_rngs, images, pipelines
from .torch_state import generator_record

_MAX_JSON_CHARS = 1_000_000


@dataclass
class CapturedArguments:
    """The arguments section plus what goes elsewhere: generator records and input arrays."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    generators: list[dict[str, Any]] = field(default_factory=list)
    generator_objects: list[Any] = field(default_factory=list)
    seeds: dict[str, int] = field(default_factory=dict)
    inputs: list[outputs.NamedArray] = field(default_factory=list)


def _type_name(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_generator(value: Any) -> bool:
    return _type_name(value) == "torch._C.Generator" or _type_name(value) == "torch.Generator"


def _is_pipeline(value: Any) -> bool:
    return any(
        f"{c.__module__}.{c.__qualname__}" == "diffusers.pipelines.pipeline_utils.DiffusionPipeline"
        for c in type(value).__mro__
    )


def _json_safe(value: Any, depth: int = 0) -> bool:
    if depth > 32:
        return False
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_json_safe(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_safe(v, depth + 1) for k, v in value.items())
    return False


def to_jsonable(value: Any, depth: int = 0) -> Any:
    """Configs and similar plain structures as JSON: tuples to lists, NaN to None, odd leaves to str."""
    if depth > 32:
        return str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, depth + 1) for k, v in value.items()}
    return str(value)


# ---------------------------------------------------------------- pipelines

_weights_cache: "weakref.WeakKeyDictionary[Any, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def _fingerprint(module: Any) -> tuple:
    # A tensor's version counter moves on every in-place write, so (storage, version) identifies
    # unchanged weights without reading them; the digest is then served from the cache.
    return tuple(
        (name, t.data_ptr(), t._version, str(t.dtype), str(t.device))
        for name, t in module.state_dict(keep_vars=True).items()
    )


def weights_sha256(module: Any) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes), cached per module."""
    fingerprint = _fingerprint(module)
    cached = _weights_cache.get(module)
    if cached and cached[0] == fingerprint:
        return cached[1]
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{outputs.dtype_name(tensor)}|{list(tensor.shape)}|".encode())
        digest.update(bytes.fromhex(outputs.sha256_of(tensor)))
    result = digest.hexdigest()
    _weights_cache[module] = (fingerprint, result)
    return result


def _component_record(component: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"class": _type_name(component) if component is not None else None,
                              "config": None, "weights_sha256": None, "name_or_path": None}
    config = getattr(component, "config", None)
    if config is not None and hasattr(config, "items") and hasattr(component, "register_to_config"):
        record["config"] = to_jsonable({k: v for k, v in dict(config).items() if not k.startswith("_")})
    elif config is not None and hasattr(config, "to_dict"):  # transformers models
        record["config"] = to_jsonable(
            {k: v for k, v in config.to_dict().items() if not k.startswith("_")
             and k not in ("transformers_version", "name_or_path")}
        )
    if hasattr(component, "state_dict") and hasattr(component, "parameters"):
        record["weights_sha256"] = weights_sha256(component)
        record.update(pipelines.placement(component))
        processors = pipelines.attention_processors(component)
        if processors is not None:
            record["attention_processors"] = processors
    name = getattr(component, "name_or_path", None)
    record["name_or_path"] = str(name) if name else None
    return record


def pipeline_identity(pipe: Any) -> dict[str, Any]:
    """How to rebuild a diffusers pipeline: class, where it came from, its parts and their weights."""
    components = {
        name: _component_record(component) for name, component in sorted(pipe.components.items())
    }
    overall = hashlib.sha256()
    for name, comp in components.items():
        overall.update(f"{name}={comp['weights_sha256']};".encode())
    # Configs, paths and load arguments may carry what a user put there (an endpoint with a password, a
    # key): blanked in place, so the identity keeps every other value (digests and commits included).
    return scrub.blank_json({
        "class": _type_name(pipe),
        "name_or_path": str(pipe.name_or_path) if getattr(pipe, "name_or_path", None) else None,
        **pipelines.origin(pipe, Path.cwd()),
        **pipelines.adapters(pipe),
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "components": components,
        "weights_sha256": overall.hexdigest(),
    })


# ---------------------------------------------------------------- one argument

def _describe(name: str, value: Any, captured: CapturedArguments, max_input_bytes: int) -> dict:
    if scrub.is_secret_argument(name) and value is not None:
        return {"kind": "redacted", "replayable": False,
                "reason": f"argument {name!r} looks like a credential and was not recorded"}
    if _is_generator(value):
        return {"kind": "generator", "replayable": True, "reason": None,
                "generators": [_add_generator(captured, value, name, None)]}
    if isinstance(value, (list, tuple)) and value and all(_is_generator(v) for v in value):
        refs = [_add_generator(captured, v, name, i) for i, v in enumerate(value)]
        return {"kind": "generators", "replayable": True, "reason": None, "generators": refs}
    value = _numpy_scalar(value)
    if _json_safe(value):
        if scrub.json_holds_secret(value):
            return {"kind": "redacted", "replayable": False,
                    "reason": f"argument {name!r} holds a value that looks like a credential; "
                              "it was not recorded"}
        text = json.dumps(value)
        if len(text) > _MAX_JSON_CHARS:
            return {"kind": "opaque", "replayable": False, "type": _type_name(value),
                    "reason": f"argument {name!r} is {len(text)} characters of JSON, over the cap"}
        if name == "seed" or name.endswith("_seed"):
            if isinstance(value, int) and not isinstance(value, bool):
                captured.seeds[name] = value
        record = {"kind": "json", "replayable": True, "reason": None, "value": value}
        if isinstance(value, tuple):
            record["container"] = "tuple"  # JSON has no tuples; the replay rebuilds one
        return record
    if outputs._is_tensor(value) or outputs._is_ndarray(value):
        return _describe_array(name, value, captured, max_input_bytes)
    if images.is_pil_image(value):
        item = _describe_image(name, value, captured, max_input_bytes)
        return {"kind": "image", **item, "replayable": item["saved"],
                "reason": None if item["saved"] else _not_saved(name, item["nbytes"], max_input_bytes)}
    if isinstance(value, (list, tuple)) and value and all(images.is_pil_image(v) for v in value):
        items = [_describe_image(f"{name}.{i}", v, captured, max_input_bytes) for i, v in enumerate(value)]
        unsaved = [_not_saved(i["key"], i["nbytes"], max_input_bytes) for i in items if not i["saved"]]
        return {"kind": "images", "replayable": not unsaved, "reason": unsaved[0] if unsaved else None,
                "items": items, **({"container": "tuple"} if isinstance(value, tuple) else {})}
    if host_rngs.rng_kind(value) is not None:
        return {"kind": "rng", "replayable": True, "reason": None, "rng": host_rngs.rng_record(value)}
    if _is_pipeline(value):
        return {"kind": "pipeline", "replayable": bool(getattr(value, "name_or_path", None)),
                "reason": None if getattr(value, "name_or_path", None)
                else "pipeline has no name_or_path to load it from",
                "pipeline": pipeline_identity(value)}
    if _type_name(value) == "torch.dtype":
        return {"kind": "dtype", "replayable": True, "reason": None,
                "value": str(value).removeprefix("torch.")}
    if _type_name(value) == "torch.device":
        return {"kind": "device", "replayable": True, "reason": None, "value": str(value)}
    return {"kind": "opaque", "replayable": False, "type": _type_name(value),
            "reason": f"argument {name!r} of type {_type_name(value)} cannot be rebuilt"}


def _add_generator(captured: CapturedArguments, gen: Any, name: str, position: int | None) -> int:
    captured.generators.append(generator_record(gen, name, position))
    captured.generator_objects.append(gen)
    return len(captured.generators) - 1


def _describe_array(name: str, value: Any, captured: CapturedArguments, max_bytes: int) -> dict:
    record = outputs.describe(outputs.NamedArray(name, value, "tensor"), saved=False)
    kind = "tensor" if outputs._is_tensor(value) else "ndarray"
    saved = record["nbytes"] <= max_bytes and outputs.savable(value)
    if saved:
        # A copy taken now: the call may write into its inputs (latents updated in place), and the
        # saved bytes must be the ones the digest above describes.
        captured.inputs.append(outputs.NamedArray(name, _snapshot(value), kind))
    return {
        "kind": kind, "replayable": saved,
        "reason": None if saved else _not_saved(name, record["nbytes"], max_bytes),
        "dtype": record["dtype"], "shape": record["shape"], "sha256": record["sha256"],
        "device": record["device"], "saved": saved,
    }


def _not_saved(name: str, nbytes: int, max_bytes: int) -> str:
    if nbytes > max_bytes:
        return (f"argument {name!r} ({nbytes} bytes) was not saved: over the {max_bytes}-byte cap "
                "(raise REPRO_TRACK_MAX_INPUT_BYTES to record it)")
    return f"argument {name!r} ({nbytes} bytes) was not saved: its dtype cannot be stored"


def _snapshot(value: Any) -> Any:
    if outputs._is_tensor(value):
        return value.detach().to("cpu", copy=True)
    return value.copy()


def _describe_image(name: str, image: Any, captured: CapturedArguments, max_bytes: int) -> dict:
    """One PIL image: its raw bytes saved under ``name`` (a snapshot), mode, size and digest."""
    raw, meta = images.snapshot(image)
    record = outputs.describe(outputs.NamedArray(name, raw, "ndarray"), saved=False)
    saved = record["nbytes"] <= max_bytes
    if saved:
        captured.inputs.append(outputs.NamedArray(name, raw, "ndarray"))
    return {"key": name, **meta, "dtype": record["dtype"], "shape": record["shape"],
            "sha256": record["sha256"], "nbytes": record["nbytes"], "saved": saved}


def _numpy_scalar(value: Any) -> Any:
    """numpy scalars (a seed drawn with numpy) as the Python numbers they stand for."""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        item = value.item()
        if isinstance(item, (bool, int, float)):
            return item
    return value


def capture_arguments(bound: inspect.BoundArguments, max_input_bytes: int) -> CapturedArguments:
    """Describe every bound argument (``**kwargs`` entries each as their own argument)."""
    captured = CapturedArguments()
    params = bound.signature.parameters
    for name, value in bound.arguments.items():
        kind = params[name].kind if name in params else inspect.Parameter.KEYWORD_ONLY
        if kind is inspect.Parameter.VAR_KEYWORD:
            for key, item in value.items():
                record = _describe(key, item, captured, max_input_bytes)
                captured.records[key] = {**record, "parameter": "var_keyword"}
            continue
        record = _describe(name, value, captured, max_input_bytes)
        parameter = {
            inspect.Parameter.VAR_POSITIONAL: "var_positional",
            inspect.Parameter.POSITIONAL_ONLY: "positional_only",
            inspect.Parameter.KEYWORD_ONLY: "keyword_only",
        }.get(kind, "positional_or_keyword")
        captured.records[name] = {**record, "parameter": parameter}
    return captured
