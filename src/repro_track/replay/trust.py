"""What a replay takes from a manifest, and what it refuses before anything is imported or run.

A manifest is data that anyone who can log a run can write: its digest is an unkeyed sha256 that an
editor recomputes. So a replay takes from it only what decides the bits (a short list of environment
variables) and what names a model (a diffusers pipeline class and a hub id or a folder). Loader,
interpreter and path variables, classes outside diffusers and the project, and remote code are never
taken from a manifest: a manifest that asks for them was written by hand and is refused.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from ..errors import UntrustedManifestError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")
_MAX_ENV_VALUE = 4096
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}(?:\.[A-Za-z_][A-Za-z0-9_]{0,99}){1,20}$")
# A Hugging Face repo id: "name" or "owner/name"; no scheme, no "..", no leading dot or dash.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,199}$")
_DTYPE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_DEVICE = re.compile(r"^(?:cpu|cuda|mps|xpu|meta)(?::[0-9]{1,3})?$")


def _names(items: Any, limit: int = 5) -> str:
    """Names for a one-line message: quoted, shortened, at most ``limit`` of them."""
    shown = [repr(str(n)[:60]) for n in list(items)[:limit]]
    more = len(items) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def _refuse(run_id: str, what: str, item: str) -> UntrustedManifestError:
    return UntrustedManifestError(
        f"run {run_id}: {what}; repro-track never records that, so the manifest was edited by hand "
        "and the replay is refused (replay only runs you trust)", run_id=run_id, item=item)


def check_environment(env_vars: dict[str, Any], run_id: str) -> None:
    """Refuse a manifest whose environment names a variable repro-track would never record.

    Older manifests that hold machine-local variables (CUDA_VISIBLE_DEVICES, HF_ENDPOINT, cache
    folders) stay readable: those are recorded for information and never imposed.
    """
    from ..capture import envvars

    named = list(env_vars["captured"]) + list(env_vars["redacted"]) + list(env_vars["dropped"])
    bad = sorted({n for n in named if not _ENV_NAME.match(n) or not envvars.is_recordable(n)})
    if bad:
        raise _refuse(run_id, f"its recorded environment holds {_names(bad)}, a loader, interpreter "
                              "or path variable (or no variable name at all)", bad[0])
    odd = sorted(n for n, v in env_vars["captured"].items() if not v.isprintable() or len(v) > _MAX_ENV_VALUE)
    if odd:
        raise _refuse(run_id, f"its recorded value of {_names(odd)} holds a control character or is over "
                              f"{_MAX_ENV_VALUE} characters", odd[0])


def check_arguments(arguments: dict[str, Any], run_id: str, import_root: Path, project_dir: Path, *,
                    look_up_classes: bool = True) -> None:
    """Refuse pipelines, dtypes and devices that name anything but what a recording could hold.

    ``look_up_classes=False`` leaves out importing diffusers to check that a ``diffusers.*`` class is a
    pipeline: the replay child makes that check itself (:func:`pipeline_class`) before it loads one.
    """
    for name, arg in arguments.items():
        kind = arg.get("kind")
        if kind == "pipeline":
            check_pipeline_identity(arg["pipeline"], run_id, name, import_root, project_dir,
                                    look_up_class=look_up_classes)
        elif kind == "dtype" and not is_torch_dtype(arg.get("value")):
            raise _refuse(run_id, f"argument {_names([name])} names {_names([str(arg.get('value'))])} "
                                  "as a torch dtype", name)
        elif kind == "device" and not (isinstance(arg.get("value"), str) and _DEVICE.match(arg["value"])):
            raise _refuse(run_id, f"argument {_names([name])} names {_names([str(arg.get('value'))])} "
                                  "as a torch device", name)


def check_pipeline_identity(identity: dict[str, Any], run_id: str, argument: str, import_root: Path,
                            project_dir: Path, *, look_up_class: bool = True) -> None:
    """A diffusers (or project) pipeline class, a hub id or a folder, a plain revision, dtype, device."""
    cls = identity["class"]
    where = f"pipeline argument {_names([argument])}"
    if not _DOTTED.match(cls) or not (cls.startswith("diffusers.")
                                      or project_class_file(cls, import_root, project_dir)):
        raise _refuse(run_id, f"{where} names the class {_names([cls])}, which is neither a diffusers "
                              "pipeline nor a class defined in the project", argument)
    if cls.startswith("diffusers.") and look_up_class:
        pipeline_class(cls)  # looked up among diffusers' exports, nothing is run
    source = identity["name_or_path"]
    if source is not None and not (_HUB_ID.match(source) or (project_dir / source).is_dir()):
        raise _refuse(run_id, f"{where} loads from {_names([source])}, which is neither a hub model id "
                              "nor a folder here", argument)
    revision = identity.get("revision")
    if revision is not None and not _REVISION.match(revision):
        raise _refuse(run_id, f"{where} names the revision {_names([revision])}", argument)
    if not is_torch_dtype(identity["dtype"]) or not _DEVICE.match(identity["device"]):
        raise _refuse(run_id, f"{where} names the dtype {_names([identity['dtype']])} on the device "
                              f"{_names([identity['device']])}", argument)
    for part, comp in identity["components"].items():
        if comp.get("class") is not None and not _DOTTED.match(comp["class"]):
            raise _refuse(run_id, f"{where}: component {_names([part])} names the class "
                                  f"{_names([comp['class']])}", argument)


def is_torch_dtype(name: Any) -> bool:
    """Whether ``name`` names a torch dtype (``float16``), not any other torch attribute (``load``)."""
    import torch

    return isinstance(name, str) and bool(_DTYPE.match(name)) and isinstance(getattr(torch, name, None),
                                                                             torch.dtype)


def project_class_file(dotted: str, import_root: Path, project_dir: Path) -> Path | None:
    """The project file that defines the class ``module.Class`` at its top level, or None."""
    module, _, name = dotted.rpartition(".")
    base = import_root.resolve().joinpath(*module.split("."))
    root = project_dir.resolve()
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        resolved = path.resolve()
        if resolved.is_relative_to(root) and resolved.is_file():
            try:
                tree = ast.parse(resolved.read_text("utf-8", errors="replace"))
            except (SyntaxError, ValueError):
                return None
            if any(isinstance(n, ast.ClassDef) and n.name == name for n in tree.body):
                return resolved
            return None
    return None


def pipeline_class(dotted: str) -> Any:
    """The class that loads a recorded pipeline, always a ``diffusers.DiffusionPipeline``.

    A diffusers class is looked up among diffusers' exports and checked to be a pipeline. A project
    class (which the plan checked is defined in the project) loads through ``DiffusionPipeline``,
    which instantiates only the diffusers class the model folder names: the replay child imports no
    module a manifest names. Runs in the replay child.
    """
    import diffusers

    if not dotted.startswith("diffusers."):
        return diffusers.DiffusionPipeline
    cls = getattr(diffusers, dotted.rpartition(".")[2], None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise UntrustedManifestError(f"{dotted!r} is not a diffusers pipeline class (a subclass of "
                                     "diffusers.DiffusionPipeline); refusing to load it", item=dotted)
    return cls
