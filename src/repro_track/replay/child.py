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

from ..errors import EntryPointRefused, NotReplayableError, ReproTrackError

SCRIPT_MODULE = "__repro_track_replayed_script__"


def load_entry(plan: dict[str, Any]) -> Any:
    """The Recorder of the planned function, imported from the planned file and nowhere else."""
    from ..recorder import recorder_of

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


def _pipeline(identity: dict[str, Any], force: bool) -> Any:
    import torch
    from diffusers import DiffusionPipeline

    from ..capture.arguments import pipeline_identity

    if not identity["name_or_path"]:
        raise NotReplayableError("the recorded pipeline has no name_or_path to load it from")
    pipe = DiffusionPipeline.from_pretrained(identity["name_or_path"], revision=identity["revision"],
                                             torch_dtype=getattr(torch, identity["dtype"]))
    _restore_scheduler(pipe, identity)
    pipe = pipe.to(identity["device"])
    rebuilt = pipeline_identity(pipe)
    for name, comp in identity["components"].items():
        now = rebuilt["components"].get(name, {})
        if comp["weights_sha256"] != now.get("weights_sha256") and not force:
            raise NotReplayableError(
                f"pipeline component {name!r} loaded from {identity['name_or_path']!r} has other weights "
                f"than recorded (sha256 {str(now.get('weights_sha256'))[:12]}... vs "
                f"{str(comp['weights_sha256'])[:12]}...); use --force to replay anyway", argument=name)
    return pipe


def _restore_scheduler(pipe: Any, identity: dict[str, Any]) -> None:
    # Users often swap the scheduler after loading; the recorded class and config rebuild it.
    import diffusers

    recorded = identity["components"].get("scheduler")
    if not recorded or not recorded["class"] or recorded["config"] is None:
        return
    cls = getattr(diffusers, recorded["class"].rsplit(".", 1)[-1], None)
    if cls is not None:
        pipe.scheduler = cls.from_config(recorded["config"])


def _value(name: str, arg: dict[str, Any], m: dict[str, Any], inputs: dict[str, Any], force: bool) -> Any:
    import torch

    from ..capture.torch_state import rebuild_generator

    kind = arg["kind"]
    if kind == "json":
        return arg["value"]
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
        return _pipeline(arg["pipeline"], force)
    if kind == "dtype":
        return getattr(torch, arg["value"])
    if kind == "device":
        return torch.device(arg["value"])
    raise NotReplayableError(f"argument {name!r} cannot be rebuilt: {arg['reason']}", argument=name)


def build_arguments(m: dict[str, Any], signature: Any, inputs: dict[str, Any],
                    force: bool) -> tuple[list, dict]:
    """Positional and keyword arguments, in the function's parameter order (JSON keys are sorted)."""
    recorded = m["arguments"]
    order = [n for n in signature.parameters if n in recorded]
    order += [n for n in recorded if n not in signature.parameters]  # **kwargs entries
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for name in order:
        arg = recorded[name]
        value = _value(name, arg, m, inputs, force)
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
    from ..capture.torch_state import apply_knobs, restore_global_rng
    from ..outputs import load_arrays
    from ..recorder import Recorder
    from ..spool import stage

    apply_knobs(plan["knobs"])
    recorder = load_entry(plan)
    replayer = Recorder(recorder.fn, dataclasses.replace(recorder.options, log_outputs=True))
    m = plan["manifest"]
    inputs = load_arrays(Path(plan["inputs_path"])) if plan["inputs_path"] else {}
    args, kwargs = build_arguments(m, recorder.signature, inputs, plan["force"])
    restore_global_rng(m["randomness"]["global"])
    _, error, recording = replayer.capture(tuple(args), kwargs, kind="replay", replay_of=plan["run_id"])
    if recording is None:
        raise ReproTrackError("the replayed call could not be captured (see the warning above)")
    if plan["is_script"]:
        recording = _as_script(recording)
    stage(recording, out_dir / "artifacts")
    return {"status": "ran", "call_error": f"{type(error).__name__}: {error}" if error else None}


def _as_script(recording: Any) -> Any:
    """The recording with its call named as the original's (``__main__``, a script), not by the module
    name the child loaded the script under, so that the replay run can be replayed in turn."""
    call = {**recording.manifest.call, "module": "__main__", "is_script": True}
    return dataclasses.replace(recording, manifest=dataclasses.replace(recording.manifest, call=call))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child process; exit 0 ran, 2 refused or not rebuildable, 1 crashed."""
    argv = sys.argv[1:] if argv is None else argv
    plan_path, out_dir = Path(argv[0]), Path(argv[1])
    plan = json.loads(plan_path.read_text("utf-8"))
    try:
        result, code = run(plan, out_dir), 0
    except (EntryPointRefused, NotReplayableError) as exc:
        result, code = {"status": "refused", "error": str(exc), "type": type(exc).__name__}, 2
    except Exception as exc:  # reported to the parent, which prints one line
        traceback.print_exc()
        result, code = {"status": "crashed", "error": f"{type(exc).__name__}: {exc}"}, 1
    (out_dir / "result.json").write_text(json.dumps(result), "utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main())
