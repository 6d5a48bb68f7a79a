"""Plan a replay: check the entry point statically, describe this machine, rebuild the environment.

Nothing here runs the user's code: the entry point is checked from its source text (decorated with
``repro_track.record``, inside the project dir, the module really is that file) before any import.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..entrypoint import function_source, import_root, module_matches_path, resolve_source
from ..errors import EntryPointRefused
from ..manifest import Manifest
from ..rules import Here


@dataclass(frozen=True)
class ReplayPlan:
    """Everything the child process needs, and what the dry run shows."""

    run_id: str
    project_dir: str
    source_path: str
    module: str
    qualname: str
    is_script: bool
    import_root: str
    env_set: dict[str, str]
    env_unset: list[str]
    knobs: dict[str, Any]
    manifest: dict[str, Any]
    inputs_path: str | None
    force: bool = False
    notes: list[str] = field(default_factory=list)
    interpreter: str = ""  # a rebuilt environment's python (--env recorded); empty: this one

    def to_dict(self) -> dict[str, Any]:
        """JSON form (written for the child)."""
        return asdict(self)

    def describe(self) -> list[str]:
        """Human-readable steps, for ``--dry-run``."""
        k = self.knobs
        lines = [
            f"entry point: {self.source_path if self.is_script else self.module} : {self.qualname}",
            f"fresh process: {sys.executable} -m repro_track.replay.child (cwd: a scratch folder)",
            f"threads: {k['num_threads']} intra-op, {k['num_interop_threads']} inter-op",
            f"determinism: deterministic_algorithms={k['deterministic_algorithms']}, "
            f"cudnn.deterministic={k['cudnn_deterministic']}, cudnn.benchmark={k['cudnn_benchmark']}, "
            f"TF32 matmul={k['matmul_allow_tf32']}",
        ]
        lines += [f"set {name}={value}" for name, value in sorted(self.env_set.items())]
        lines += [f"unset {name}" for name in self.env_unset]
        for name, arg in self.manifest["arguments"].items():
            lines.append(f"argument {name}: {_arg_words(arg, self.manifest)}")
        return lines + self.notes


def _arg_words(arg: dict[str, Any], m: dict[str, Any]) -> str:
    if arg["kind"] in ("generator", "generators"):
        gens = [m["randomness"]["generators"][i] for i in arg["generators"]]
        return "; ".join(f"{g['device']} generator, seed {g['initial_seed']}, recorded state "
                         f"{g['state_sha256'][:12]}" for g in gens)
    if arg["kind"] == "pipeline":
        p = arg["pipeline"]
        return f"{p['class'].rsplit('.', 1)[-1]}.from_pretrained({p['name_or_path']!r}) on {p['device']}"
    if arg["kind"] == "image":
        return f"PIL image {arg['mode']} {arg['size'][0]}x{arg['size'][1]}, sha256 {arg['sha256'][:12]}"
    if arg["kind"] == "images":
        return f"{len(arg['items'])} PIL images ({', '.join(sorted({i['mode'] for i in arg['items']}))})"
    if arg["kind"] == "rng":
        return f"{arg['rng']['type']} at its recorded state"
    if arg["kind"] == "json":
        text = repr(tuple(arg["value"]) if arg.get("container") == "tuple" else arg["value"])
        return text if len(text) < 80 else text[:77] + "..."
    return f"{arg['kind']} {arg.get('dtype', '')} {arg.get('shape', '')}".strip()


def check_entry_point(m: Manifest, project_dir: Path) -> tuple[Path | None, Path, str | None]:
    """(source file, import root, current source digest); refuse anything not decorated here.

    A pipeline call recorded by autolog has no source file: its entry point is a diffusers pipeline
    class's own ``__call__`` (checked here by name, and again in the child among diffusers' exports)."""
    call = m.call
    if call.get("entry") == "pipeline_call":
        check_pipeline_entry(call, m.arguments)
        return None, project_dir, None
    if not call["source_file"]:
        raise EntryPointRefused(
            f"the manifest names {call['module']}:{call['qualname']} without a project source file; "
            "only functions decorated with repro_track.record in the project can be replayed")
    path = resolve_source(project_dir, call["source_file"])
    if not call["is_script"] and not module_matches_path(call["module"], call["source_file"]):
        raise EntryPointRefused(
            f"module {call['module']!r} does not live in {call['source_file']!r}; refusing to import it")
    source = function_source(path.read_text("utf-8", errors="replace"), call["qualname"])
    if source is None or not source.decorated:
        raise EntryPointRefused(
            f"{call['source_file']}:{call['qualname']} is not a function decorated with "
            "repro_track.record; refusing to run it")
    root = path.parent if call["is_script"] else import_root(project_dir, call["source_file"],
                                                              call["module"])
    return path, root, source.sha256


def check_pipeline_entry(call: dict[str, Any], arguments: dict[str, Any]) -> None:
    """Refuse a pipeline-call entry point unless it is ``diffusers...Class.__call__`` and its first
    argument is a recorded pipeline of a diffusers class."""
    import re

    name, _, method = call["qualname"].rpartition(".")
    positional = [a for a in arguments.values() if a.get("parameter") == "positional_only"]
    first = positional[0] if len(positional) == 1 else None  # the pipeline the call was made on
    if (method != "__call__" or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,99}", name)
            or not call["module"].startswith("diffusers.") or call["source_file"] is not None):
        raise EntryPointRefused(
            f"the manifest names {call['module']}:{call['qualname']} as a pipeline call; only the call "
            "of a diffusers pipeline class can be replayed without a source file")
    if first is None or first.get("kind") != "pipeline" or first.get("parameter") != "positional_only" \
            or not str(first["pipeline"].get("class", "")).startswith("diffusers."):
        raise EntryPointRefused(
            f"the manifest names {call['module']}:{call['qualname']} as a pipeline call, but its first "
            "argument is not a recorded diffusers pipeline")
    from ..errors import UntrustedManifestError
    from .trust import pipeline_class

    try:
        cls = pipeline_class(f"{call['module']}.{name}")  # looked up among diffusers' exports
    except UntrustedManifestError as exc:
        raise EntryPointRefused(f"{exc} (the manifest names it as the pipeline call to replay)") from None
    if cls.__module__ != call["module"] or cls.__qualname__ != name:
        raise EntryPointRefused(f"{call['module']}.{name} is not where diffusers defines the pipeline "
                                f"{cls.__qualname__}; refusing to run it")


def describe_here(source_sha256: str | None, manifest: dict[str, Any] | None = None) -> Here:
    """This machine, for the prediction rules (reads facts only; CUDA is not started here).

    When ``manifest`` drew noise on a CUDA device, the SM counts come from the CUDA runtime in a
    short child process, so that the SM-count rule can compare them (NVML has them for MIG only).
    """
    import torch

    from ..capture import envvars, gpu, static_facts
    from ..rules import uses_cuda_noise

    software, cpu, _ = static_facts()
    cuda_usable = bool(torch.cuda.is_available())
    section = gpu.capture_gpu()
    if manifest is not None and cuda_usable and uses_cuda_noise(manifest):
        props = gpu.probe_cuda_properties()
        if props:
            section = gpu.with_cuda_properties(section, props, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return Here(cpu=cpu, gpu=section, software=software,
                cuda_usable=cuda_usable, num_threads=torch.get_num_threads(),
                source_sha256=source_sha256, env_vars=envvars.capture_env_vars(),
                accelerators=_accelerators(torch, cuda_usable))


def _accelerators(torch: Any, cuda_usable: bool) -> tuple[str, ...]:
    """The non-CPU device types usable here, asked without starting any of them."""
    found = ["cuda"] if cuda_usable else []
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found.append("xpu")
    return tuple(found)


def child_environment(m: Manifest, here: Here) -> tuple[dict[str, str], list[str], list[str]]:
    """(variables to set, variables to unset, notes): this machine's environment with the recorded
    bit-deciding variables restored and the ISA pinned. Machine-local variables (which GPUs, which
    hub, which caches) keep this machine's values whatever was recorded."""
    from ..capture import cpu, envvars

    recorded = m.env_vars
    keep = set(recorded["redacted"]) | set(recorded["dropped"])
    unset = sorted(n for n in os.environ if envvars.is_bit_deciding(n) and n not in recorded["captured"]
                   and n not in keep)
    env_set = {k: v for k, v in recorded["captured"].items()
               if envvars.is_bit_deciding(k) and k not in recorded["redacted"]}
    local = sorted(k for k, v in recorded["captured"].items()
                   if not envvars.is_bit_deciding(k) and os.environ.get(k) != v)
    notes = [f"keep this machine's {', '.join(local)} (recorded for information, never imposed)"] \
        if local else []
    capability = m.cpu.get("torch_capability")
    supported = bool(capability) and cpu.supports_capability(capability, here.cpu.get("isa_flags", []))
    if capability and not supported:
        # Also when the recording set ATEN_CPU_CAPABILITY itself (or is a replay, which pins it): x86
        # does not check the level against the hardware, so kernels this CPU lacks crash with SIGILL.
        env_set.pop("ATEN_CPU_CAPABILITY", None)
        notes.append(f"ATen CPU kernels cannot be pinned to {capability} on this CPU")
    elif capability and "ATEN_CPU_CAPABILITY" not in env_set:
        value = cpu.aten_capability_env_value(capability)
        if value:
            env_set["ATEN_CPU_CAPABILITY"] = value
            if "ATEN_CPU_CAPABILITY" in unset:
                unset.remove("ATEN_CPU_CAPABILITY")
    return env_set, unset, notes


def build_plan(m: Manifest, run_id: str, project_dir: Path, here: Here, source: Path, root: Path,
               inputs_path: Path | None, force: bool) -> ReplayPlan:
    """Assemble the plan from a checked manifest."""
    env_set, env_unset, notes = child_environment(m, here)
    return ReplayPlan(
        run_id=run_id, project_dir=str(project_dir.resolve()), source_path=str(source) if source else "",
        module=m.call["module"], qualname=m.call["qualname"], is_script=m.call["is_script"],
        import_root=str(root), env_set=env_set, env_unset=env_unset, knobs=m.determinism,
        manifest=m.to_dict(), inputs_path=str(inputs_path) if inputs_path else None, force=force,
        notes=notes,
    )
