"""The replay child: runs in a fresh interpreter whose environment the parent rebuilt.

``python -m repro_track.replay.child PLAN.json OUT_DIR``. It restores the knobs, imports the entry point
(checking again that it is a recorded function from the planned file), rebuilds the arguments,
restores the global RNG states and runs the call through the recorder's capture, writing the replay's
own manifest and outputs to OUT_DIR/artifacts and a status to OUT_DIR/result.json.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from ..errors import EntryPointRefused, NotReplayableError, ReproTrackError, UntrustedManifestError

SCRIPT_MODULE = "__repro_track_replayed_script__"


def load_entry(plan: dict[str, Any]) -> Any:
    """The Recorder of the planned function, imported from the planned file and nowhere else."""
    from ..recorder import recorder_of

    if plan["manifest"]["call"].get("entry") == "pipeline_call":
        return load_pipeline_entry(plan["manifest"]["call"])
    source = Path(plan["source_path"]).resolve()
    sys.path.insert(0, plan["import_root"])
    if plan["is_script"]:
        # A script recorded as __main__ is loaded by path under another name: its main block stays unrun.
        spec = importlib.util.spec_from_file_location(SCRIPT_MODULE, source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[SCRIPT_MODULE] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(plan["module"])
    if Path(getattr(module, "__file__", "") or "").resolve() != source:
        raise EntryPointRefused(f"module {plan['module']!r} resolved to {module.__file__}, not {source}")
    target: Any = module
    for part in plan["qualname"].split("."):
        target = getattr(target, part, None)
    recorder = recorder_of(target)
    if recorder is None:
        raise EntryPointRefused(f"{plan['qualname']} in {source} is not decorated with repro_track.record")
    return recorder


def load_pipeline_entry(call: dict[str, Any]) -> Any:
    """The recorder of a pipeline call recorded by autolog: a diffusers pipeline class only, looked up
    among diffusers' exports and defined where the manifest says (nothing else is imported)."""
    from ..autologging import PipelineRecorder, entry_function
    from ..records import RecordOptions
    from .trust import pipeline_class

    name = call["qualname"].rpartition(".")[0]
    cls = pipeline_class(f"{call['module']}.{name}")
    if cls.__module__ != call["module"] or cls.__qualname__ != name:
        raise EntryPointRefused(f"{call['module']}.{name} is not where diffusers defines "
                                f"{cls.__qualname__}; refusing to run it")
    return PipelineRecorder(entry_function(cls), RecordOptions())


def _pipeline(identity: dict[str, Any], force: bool, where: "Rebuild") -> Any:
    from ..capture.arguments import pipeline_identity
    from .trust import pipeline_class

    location = load_location(identity, where.project_dir)
    if location is None:
        raise NotReplayableError("the recorded pipeline has no name_or_path to load it from")
    # A diffusers class loads as itself; remote or custom code is never enabled from a manifest.
    cls = pipeline_class(identity["class"])
    try:
        pipe = cls.from_pretrained(location, revision=identity["revision"] if location == identity.get("repo_id")
                                   else None, variant=identity.get("variant"),
                                   torch_dtype=_dtype(identity["dtype"]), trust_remote_code=False,
                                   custom_pipeline=None)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:400]  # one line, whatever diffusers wrote
        raise NotReplayableError(f"the recorded pipeline {cls.__name__} could not be loaded from "
                                 f"{identity['name_or_path']!r} (a replay never enables remote or custom "
                                 f"code): {reason}") from None
    _restore_scheduler(pipe, identity)
    _restore_adapters(pipe, identity, where)
    pipe = pipe.to(identity["device"])
    _restore_component_dtypes(pipe, identity)
    _restore_attention_processors(pipe, identity)
    rebuilt = pipeline_identity(pipe)
    for name, comp in identity["components"].items():
        now = rebuilt["components"].get(name, {})
        if comp["weights_sha256"] != now.get("weights_sha256"):
            text = (f"pipeline component {name!r} loaded from {location!r} has other weights than recorded "
                    f"(sha256 {str(now.get('weights_sha256'))[:12]}... vs {str(comp['weights_sha256'])[:12]}...)")
            if not force:
                raise NotReplayableError(f"{text}; use --force to replay anyway", argument=name)
            where.notes.append(f"{text}; replayed anyway (--force)")
    return pipe


@dataclasses.dataclass
class Rebuild:
    """What rebuilding arguments needs beyond the manifest: the project folder, and notes for the parent."""

    project_dir: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def load_location(identity: dict[str, Any], project_dir: str | None) -> str | None:
    """Where to load a recorded pipeline from: its hub repo (at the recorded commit), else the recorded
    folder, else the same project-relative folder in this checkout (identified by content afterwards)."""
    if identity.get("source") == "hub" and identity.get("repo_id"):
        return identity["repo_id"]
    name = identity["name_or_path"]
    if name and Path(name).is_dir():
        return name
    folder = identity.get("project_folder")
    if folder and project_dir and not Path(folder).is_absolute():
        root = Path(project_dir).resolve()
        candidate = (root / folder).resolve()
        if candidate.is_relative_to(root) and candidate.is_dir():  # never outside the project
            return str(candidate)
    return name


def _restore_adapters(pipe: Any, identity: dict[str, Any], where: Rebuild) -> None:
    """Load the recorded LoRA adapters again (safetensors only), set their weights, fuse as recorded."""
    for adapter in identity.get("adapters") or []:
        source = adapter["source"]
        if not source:
            raise NotReplayableError(
                f"LoRA adapter {adapter['name']!r} was loaded from an in-memory state dict, so it cannot be "
                "loaded again; load it from a file or hub repo when recording", argument=adapter["name"])
        options = {k: adapter[k] for k in ("weight_name", "subfolder") if adapter.get(k)}
        try:
            pipe.load_lora_weights(source, adapter_name=adapter["name"], use_safetensors=True, **options)
        except (OSError, ValueError, KeyError) as exc:
            raise NotReplayableError(f"LoRA adapter {adapter['name']!r} could not be loaded from {source!r}: "
                                     f"{' '.join(str(exc).split())[:300]}", argument=adapter["name"]) from None
    weights = identity.get("adapter_weights")
    if weights and weights.get("names"):
        pipe.set_adapters(weights["names"], weights.get("weights"))
    fused = identity.get("fused")
    if fused:
        pipe.fuse_lora(**{k: v for k, v in fused.items() if v is not None})


def _restore_attention_processors(pipe: Any, identity: dict[str, Any]) -> None:
    # One diffusers processor class throughout (AttnProcessor vs AttnProcessor2_0, a user's
    # set_attn_processor) is set again; anything else is left as loaded and named by the comparison.
    from diffusers.models import attention_processor

    for name, comp in identity["components"].items():
        recorded = comp.get("attention_processors") or []
        part = getattr(pipe, name, None)
        if len(recorded) != 1 or not hasattr(part, "set_attn_processor"):
            continue
        module, _, cls_name = recorded[0].rpartition(".")
        cls = getattr(attention_processor, cls_name, None)
        if module.startswith("diffusers.") and isinstance(cls, type):
            part.set_attn_processor(cls())


def _restore_component_dtypes(pipe: Any, identity: dict[str, Any]) -> None:
    # A pipeline loaded in one dtype with one part cast afterwards (a VAE kept in float32).
    for name, comp in identity["components"].items():
        part = getattr(pipe, name, None)
        if comp.get("dtype") and hasattr(part, "parameters") and str(part.dtype).removeprefix("torch.") != comp["dtype"]:
            part.to(_dtype(comp["dtype"]))


def _restore_scheduler(pipe: Any, identity: dict[str, Any]) -> None:
    # Users often swap the scheduler after loading; the recorded class and config rebuild it.
    import diffusers

    recorded = identity["components"].get("scheduler")
    if not recorded or not recorded["class"] or recorded["config"] is None:
        return
    cls = getattr(diffusers, recorded["class"].rsplit(".", 1)[-1], None)
    if isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin):
        pipe.scheduler = cls.from_config(recorded["config"])


def _dtype(name: str) -> Any:
    """The torch dtype a manifest names; refuses any other torch attribute (torch.load...)."""
    import torch

    value = getattr(torch, name, None) if not name.startswith("_") else None
    if not isinstance(value, torch.dtype):
        raise NotReplayableError(f"{name!r} is not a torch dtype")
    return value


def _value(name: str, arg: dict[str, Any], m: dict[str, Any], inputs: dict[str, Any], force: bool,
           where: Rebuild) -> Any:
    import torch

    from ..capture.torch_state import rebuild_generator

    kind = arg["kind"]
    if kind == "json":
        return tuple(arg["value"]) if arg.get("container") == "tuple" else arg["value"]
    if kind in ("image", "images", "rng"):
        return _host_value(name, arg, inputs)
    if kind in ("generator", "generators"):
        records = [m["randomness"]["generators"][i] for i in arg["generators"]]
        for record in records:
            if record["device"].startswith("cuda") and not torch.cuda.is_available():
                raise NotReplayableError(
                    f"argument {name!r} is a CUDA generator ({record['device']}) and this machine has "
                    "no usable CUDA device, so it cannot be rebuilt", argument=name)
        gens = [rebuild_generator(record) for record in records]
        return gens[0] if kind == "generator" else gens
    if kind in ("tensor", "ndarray") and name in inputs:
        tensor = inputs[name]
        return tensor.to(arg["device"]) if kind == "tensor" else tensor.numpy()
    if kind == "pipeline":
        return _pipeline(arg["pipeline"], force, where)
    if kind == "dtype":
        return _dtype(arg["value"])
    if kind == "device":
        return torch.device(arg["value"])
    raise NotReplayableError(f"argument {name!r} cannot be rebuilt: {arg['reason']}", argument=name)


def _host_value(name: str, arg: dict[str, Any], inputs: dict[str, Any]) -> Any:
    """PIL images from their raw-byte snapshots, and numpy/Python generators at their recorded state."""
    from ..capture import host_rngs, images

    if arg["kind"] == "rng":
        return host_rngs.rebuild(arg["rng"])
    items = [arg] if arg["kind"] == "image" else arg["items"]
    missing = [item["key"] for item in items if item["key"] not in inputs]
    if missing:
        raise NotReplayableError(f"argument {name!r} cannot be rebuilt: {arg['reason'] or 'its image was not saved'}",
                                 argument=name)
    rebuilt = [images.rebuild(inputs[item["key"]].numpy(), item) for item in items]
    if arg["kind"] == "image":
        return rebuilt[0]
    return tuple(rebuilt) if arg.get("container") == "tuple" else rebuilt


def build_arguments(m: dict[str, Any], signature: Any, inputs: dict[str, Any],
                    force: bool, where: Rebuild | None = None) -> tuple[list, dict]:
    """Positional and keyword arguments, in the function's parameter order (JSON keys are sorted)."""
    recorded = m["arguments"]
    where = where or Rebuild()
    order = [n for n in signature.parameters if n in recorded]
    order += [n for n in recorded if n not in signature.parameters]  # **kwargs entries
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for name in order:
        arg = recorded[name]
        value = _value(name, arg, m, inputs, force, where)
        kind = arg["parameter"]
        if kind in ("positional_only", "positional_or_keyword"):
            args.append(value)
        elif kind == "var_positional":
            args.extend(value)
        else:
            kwargs[name] = value
    return args, kwargs


def run(plan: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Rebuild, call, and stage the replay's recording; returns the status written for the parent."""
    _quiet_libraries()  # first: tqdm reads its switches when it is imported
    from ..capture.torch_state import apply_knobs, restore_global_rng
    from ..outputs import load_arrays
    from ..spool import stage

    from ..capture import dispatch
    from ..trajectory import STEP_OUTPUT_PREFIX

    apply_knobs(plan["knobs"])
    m = plan["manifest"]
    pin_recorded_revisions(m)  # before the entry module loads: it may load a pipeline at import
    recorder = load_entry(plan)
    replayer = type(recorder)(recorder.fn, dataclasses.replace(recorder.options, log_outputs=True))
    # A recording that kept each step's latents (autolog's log_every_step) is compared step by step.
    replayer.keep_steps = any(o["name"].startswith(STEP_OUTPUT_PREFIX) for o in m["outputs"])
    inputs = load_arrays(Path(plan["inputs_path"])) if plan["inputs_path"] else {}
    where = Rebuild(project_dir=plan.get("project_dir"))
    args, kwargs = build_arguments(m, recorder.signature, inputs, plan["force"], where)
    _quiet_pipelines()
    restore_global_rng(m["randomness"]["global"])
    with dispatch.autocast(m["determinism"].get("autocast") or []):
        _, error, recording = replayer.capture(tuple(args), kwargs, kind="replay", replay_of=plan["run_id"])
    if recording is None:
        raise ReproTrackError("the replayed call could not be captured (see the warning above)")
    if plan["is_script"]:
        recording = _as_script(recording)
    stage(recording, out_dir / "artifacts")
    from ..scrub import blank

    # The reason line reaches the replay's report and card in the store: blanked like the manifest's error.
    return {"status": "ran", "call_error": blank(f"{type(error).__name__}: {error}"[:10000]) if error else None,
            "notes": where.notes}


def pin_recorded_revisions(m: dict[str, Any]) -> None:
    """Loads of a recorded hub repo id that name no revision get the commit the recording used."""
    from ..capture import pipelines

    identities = [a["pipeline"] for a in m["arguments"].values() if a.get("kind") == "pipeline"]
    identities += [p["identity"] for p in m.get("pipelines") or []]
    revisions = {i["repo_id"]: i["revision"] for i in identities if i.get("repo_id") and i.get("revision")}
    if revisions:
        importlib.import_module("diffusers.pipelines.pipeline_utils")  # the hook wraps its from_pretrained
        pipelines.pin(revisions)


def _quiet_pipelines() -> None:
    """Pipelines pass tqdm an explicit ``disable``, so TQDM_DISABLE alone does not silence their step
    bars: in this child (a process of repro-track's own) every pipeline's bar is turned off."""
    module = sys.modules.get("diffusers.pipelines.pipeline_utils")
    if module is None or getattr(module.DiffusionPipeline.progress_bar, "__repro_track_quiet__", False):
        return
    original = module.DiffusionPipeline.progress_bar

    def progress_bar(self: Any, iterable: Any = None, total: Any = None) -> Any:
        self._progress_bar_config = {**(getattr(self, "_progress_bar_config", None) or {}), "disable": True}
        return original(self, iterable=iterable, total=total)

    progress_bar.__repro_track_quiet__ = True  # type: ignore[attr-defined]
    module.DiffusionPipeline.progress_bar = progress_bar


def _quiet_libraries() -> None:
    """No deprecation noise or progress bars from the libraries in the replay's output."""
    import os
    import warnings

    os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it per bar: diffusers' loading and step bars
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in ("diffusers", "transformers"):
        os.environ.setdefault(f"{name.upper()}_VERBOSITY", "error")


def _as_script(recording: Any) -> Any:
    """The recording with its call named as the original's (``__main__``, a script), not by the module
    name the child loaded the script under, so that the replay run can be replayed in turn."""
    call = {**recording.manifest.call, "module": "__main__", "is_script": True}
    return dataclasses.replace(recording, manifest=dataclasses.replace(recording.manifest, call=call))


# What a replay imports, heaviest last, for a child started early (``--wait``): torch and this package,
# diffusers' pipeline machinery with its models and schedulers (what any pipeline class pulls in), and
# MLflow's image helpers (the replay's recording stages its images). Library modules only: nothing of
# the project or of the run.
PREWARM = ("torch", "repro_track.outputs", "repro_track.recorder", "repro_track.spool",
           "repro_track.capture.torch_state", "diffusers.pipelines.pipeline_utils", "diffusers.models.unets",
           "diffusers.schedulers", "mlflow.tracking.multimedia")


def _wait_for_go() -> bool:
    """Started early: import what a replay imports (``PREWARM``) while the parent loads the run and
    plans, until it says "go" (the plan is written); what is not imported by then the run imports
    itself. Then stdin is /dev/null, as for any replay."""
    import os
    import select

    _quiet_libraries()
    for name in PREWARM:
        if select.select([sys.stdin], [], [], 0)[0]:  # "go" (or the end of input) is waiting
            break
        try:
            importlib.import_module(name)
        except Exception:  # not installed, or broken: the run imports what it needs and reports it
            pass
    line = sys.stdin.buffer.readline()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return line.strip() == b"go"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process; exit 0 ran, 2 refused or not rebuildable, 1 crashed.

    With ``--wait`` (started early) it imports its libraries first, then waits for "go" on stdin;
    at the end of input without it, it exits 0 having run nothing.
    """
    argv = sys.argv[1:] if argv is None else argv
    plan_path, out_dir = Path(argv[0]), Path(argv[1])
    if "--wait" in argv[2:] and not _wait_for_go():
        return 0
    plan = json.loads(plan_path.read_text("utf-8"))
    try:
        result, code = run(plan, out_dir), 0
    except (EntryPointRefused, NotReplayableError, UntrustedManifestError) as exc:
        result, code = {"status": "refused", "error": str(exc), "type": type(exc).__name__}, 2
    except Exception as exc:  # reported to the parent, which prints one line
        traceback.print_exc()
        result, code = {"status": "crashed", "error": f"{type(exc).__name__}: {exc}"}, 1
    (out_dir / "result.json").write_text(json.dumps(result), "utf-8")
    return code


if __name__ == "__main__":
    # Once its result is written, nothing of this dedicated process is needed: it ends without the
    # teardown of torch and the rest, which the replay would wait for.
    from repro_track.process import exit_now

    exit_now(main())
