"""Where a diffusers pipeline came from, and which pipelines a call loaded or used.

The hub commit a pipeline was loaded at is read from the Hugging Face cache layout its components were
loaded from (``models--org--name/snapshots/<commit>/``): diffusers never stores it in the config. A
light hook on ``DiffusionPipeline.from_pretrained`` (installed only once diffusers is imported, like an
MLflow autolog patch: it calls straight through) notes what each load asked for (repo, revision,
variant, dtype), tells an active recording which pipelines the call loaded, and, in a replay child,
pins a repo id to the commit the recording used.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import sys
from pathlib import Path
from typing import Any, Iterator

LOAD_ATTR = "_repro_track_load"
_SNAPSHOT = re.compile(r"(?:^|[/\\])models--(?P<repo>[^/\\]+)[/\\]snapshots[/\\](?P<commit>[0-9a-f]{40})(?:[/\\]|$)")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

# Pipelines loaded while a recorded call runs (a list per active call), and repo id -> commit pins
# that a replay child applies to loads that name no revision of their own.
_loaded: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("repro_track_loaded", default=None)
_pins: dict[str, str] = {}


def hub_origin(pipe: Any) -> tuple[str | None, str | None]:
    """(repo id, commit) when the pipeline's files came from a Hugging Face cache snapshot."""
    for path in _component_paths(pipe):
        match = _SNAPSHOT.search(path)
        if match:
            return match.group("repo").replace("--", "/"), match.group("commit")
    return None, None


def _component_paths(pipe: Any) -> Iterator[str]:
    name = getattr(pipe, "name_or_path", None)
    if name:
        yield str(name)
    for component in getattr(pipe, "components", {}).values():
        config = getattr(component, "config", None)
        for value in (getattr(config, "_name_or_path", None),
                      config.get("_name_or_path") if isinstance(config, dict) else None,
                      getattr(component, "name_or_path", None)):
            if value:
                yield str(value)


def attention_processors(component: Any) -> list[str] | None:
    """The attention processor classes a component runs (``AttnProcessor2_0``, ``AttnProcessor``...),
    or None for components without attention processors."""
    try:
        processors = component.attn_processors
    except Exception:  # not a diffusers model, or one without attention
        return None
    if not isinstance(processors, dict):
        return None
    return sorted({f"{type(p).__module__}.{type(p).__qualname__}" for p in processors.values()})


def placement(component: Any) -> dict[str, str | None]:
    """A component's dtype and device (None for schedulers, tokenizers and other weightless parts)."""
    dtype = getattr(component, "dtype", None)
    device = getattr(component, "device", None)
    if not hasattr(component, "parameters"):
        return {"dtype": None, "device": None}
    return {"dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
            "device": str(device) if device is not None else None}


def origin(pipe: Any, project_root: Path | None = None) -> dict[str, Any]:
    """The fields a pipeline identity adds: repo id, commit, variant, how it was loaded, and for a
    local folder inside the project its project-relative path (so another checkout finds it)."""
    repo_id, commit = hub_origin(pipe)
    load = dict(getattr(pipe, LOAD_ATTR, None) or {})
    requested = load.get("requested")
    folder = None
    name = str(getattr(pipe, "name_or_path", "") or "")
    if repo_id is None and name and Path(name).is_dir() and project_root is not None:
        try:
            folder = Path(name).resolve().relative_to(project_root.resolve()).as_posix()
        except ValueError:
            folder = None
    source = "hub" if repo_id else ("folder" if name and Path(name).is_dir() else "memory")
    return {"repo_id": repo_id or (requested if requested and not Path(requested).exists() else None),
            "revision": commit or (load.get("revision") if _COMMIT.match(str(load.get("revision"))) else None),
            "variant": load.get("variant"), "source": source, "project_folder": folder}


# ---------------------------------------------------------------- the load hook

def install() -> None:
    """Wrap ``DiffusionPipeline.from_pretrained`` once, if diffusers is already imported."""
    module = sys.modules.get("diffusers.pipelines.pipeline_utils")
    if module is None:
        return
    install_adapter_hooks()
    cls = module.DiffusionPipeline
    current = cls.__dict__.get("from_pretrained")
    if current is None or getattr(current.__func__, "__repro_track_hook__", False):
        return
    original = current.__func__

    @functools.wraps(original)
    def from_pretrained(klass: Any, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        requested = str(pretrained_model_name_or_path)
        if kwargs.get("revision") is None and requested in _pins:
            kwargs["revision"] = _pins[requested]
        pipe = original(klass, pretrained_model_name_or_path, *args, **kwargs)
        dtype = kwargs.get("torch_dtype")
        info = {"requested": requested, "revision": kwargs.get("revision"), "variant": kwargs.get("variant"),
                "torch_dtype": str(dtype).removeprefix("torch.") if dtype is not None else None}
        with contextlib.suppress(AttributeError, TypeError):
            object.__setattr__(pipe, LOAD_ATTR, info)
        install_adapter_hooks()  # the pipeline class, and so its LoRA loaders, are imported now
        loaded = _loaded.get()
        if loaded is not None:
            loaded.append(pipe)
        return pipe

    from_pretrained.__repro_track_hook__ = True  # type: ignore[attr-defined]
    cls.from_pretrained = classmethod(from_pretrained)


@contextlib.contextmanager
def collecting() -> Iterator[list[Any]]:
    """Collect the pipelines loaded inside the block (this context only)."""
    install()
    found: list[Any] = []
    token = _loaded.set(found)
    try:
        yield found
    finally:
        _loaded.reset(token)


def recording() -> bool:
    """Whether a recorded call is running in this context (its pipeline calls are part of it)."""
    return _loaded.get() is not None


def pin(revisions: dict[str, str]) -> None:
    """In a replay child: loads of these repo ids that name no revision get the recorded commit."""
    _pins.update({repo: commit for repo, commit in revisions.items() if _COMMIT.match(commit)})
    install()


def used_globals(fn: Any) -> dict[str, Any]:
    """Module-level pipelines the function's code refers to by name (``PIPE(...)`` in its body)."""
    code = getattr(fn, "__code__", None)
    namespace = getattr(fn, "__globals__", {})
    found = {}
    for name in getattr(code, "co_names", ()):
        value = namespace.get(name)
        if value is not None and is_pipeline(value):
            found[name] = value
    return found


def is_pipeline(value: Any) -> bool:
    """Whether ``value`` is a diffusers pipeline (by class name, without importing diffusers)."""
    return any(f"{c.__module__}.{c.__qualname__}" == "diffusers.pipelines.pipeline_utils.DiffusionPipeline"
               for c in type(value).__mro__)


# ---------------------------------------------------------------- LoRA adapters

ADAPTERS_ATTR = "_repro_track_adapters"
ADAPTER_WEIGHTS_ATTR = "_repro_track_adapter_weights"
FUSED_ATTR = "_repro_track_fused"


def install_adapter_hooks() -> None:
    """Note where each LoRA adapter was loaded from, its set weights and fusing, on the pipeline itself
    (PEFT keeps the weights but not their source). Installed once diffusers' LoRA loaders are imported."""
    loaders = sys.modules.get("diffusers.loaders.lora_pipeline")
    base = sys.modules.get("diffusers.loaders.lora_base")
    if loaders is None or base is None:
        return
    for cls in list(vars(loaders).values()):
        if isinstance(cls, type) and "load_lora_weights" in cls.__dict__:
            _wrap(cls, "load_lora_weights", _note_load)
    _wrap(base.LoraBaseMixin, "set_adapters", _note_weights)
    _wrap(base.LoraBaseMixin, "fuse_lora", _note_fuse)


def _wrap(cls: type, name: str, note: Any) -> None:
    original = cls.__dict__.get(name)
    if original is None or getattr(original, "__repro_track_hook__", False):
        return

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        before = _adapter_names(self)
        result = original(self, *args, **kwargs)
        with contextlib.suppress(Exception):  # noting must never break the user's call
            note(self, before, args, kwargs)
        return result

    wrapper.__repro_track_hook__ = True  # type: ignore[attr-defined]
    setattr(cls, name, wrapper)


def _adapter_names(pipe: Any) -> set[str]:
    try:
        listed = pipe.get_list_adapters()
    except Exception:  # no PEFT installed, or no adapter-capable component
        return set()
    return {name for names in listed.values() for name in names}


def _note_load(pipe: Any, before: set[str], args: tuple, kwargs: dict) -> None:
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path_or_dict")
    notes = dict(getattr(pipe, ADAPTERS_ATTR, None) or {})
    for name in sorted(_adapter_names(pipe) - before):
        notes[name] = {"source": str(source) if isinstance(source, (str, Path)) else None,
                       "weight_name": kwargs.get("weight_name"), "subfolder": kwargs.get("subfolder")}
    object.__setattr__(pipe, ADAPTERS_ATTR, notes)


def _note_weights(pipe: Any, before: set[str], args: tuple, kwargs: dict) -> None:
    names = args[0] if args else kwargs.get("adapter_names")
    weights = args[1] if len(args) > 1 else kwargs.get("adapter_weights")
    names = [names] if isinstance(names, str) else list(names or [])
    plain = weights if isinstance(weights, (int, float, list, dict, type(None))) else None
    object.__setattr__(pipe, ADAPTER_WEIGHTS_ATTR, {"names": names, "weights": plain})


def _note_fuse(pipe: Any, before: set[str], args: tuple, kwargs: dict) -> None:
    object.__setattr__(pipe, FUSED_ATTR, {"lora_scale": float(kwargs.get("lora_scale", 1.0)),
                                          "components": kwargs.get("components"),
                                          "adapter_names": kwargs.get("adapter_names")})


def adapters(pipe: Any) -> dict[str, Any]:
    """The pipeline's LoRA adapters as recorded: name, source, active, the weights set, fusing."""
    names = _adapter_names(pipe)
    if not names:
        return {}
    try:
        active = set(pipe.get_active_adapters())
    except Exception:
        active = set()
    notes = getattr(pipe, ADAPTERS_ATTR, None) or {}
    listed = pipe.get_list_adapters()
    found = [{"name": name, "components": sorted(c for c, ns in listed.items() if name in ns),
              "active": name in active, **notes.get(name, {"source": None, "weight_name": None, "subfolder": None})}
             for name in sorted(names)]
    return {"adapters": found, "adapter_weights": getattr(pipe, ADAPTER_WEIGHTS_ATTR, None),
            "fused": getattr(pipe, FUSED_ATTR, None)}
