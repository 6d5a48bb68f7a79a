"""The prediction rules: what lowers the chance of a bit-exact replay, in one readable table.

Each rule looks at the recorded manifest and at this machine (``Here``) and, when it applies, returns a
plain-language reason. Its level says how far the expectation drops:

- ``none``: the initial noise (or the call itself) cannot be regenerated here;
- ``close``: the noise is reproducible but the arithmetic may not be bit-identical;
- ``info``: a difference the replayer restores (thread count, env vars...), reported, no drop.

``predict`` takes the worst level that applies; ``diff`` ranks differences with the same table. To add
a rule, write a small function and add a line to ``RULES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

LEVELS = ("exact", "close", "none")  # best first
_DROP = {"info": "exact", "close": "close", "none": "none"}


@dataclass(frozen=True)
class Here:
    """The facts about this machine that the rules compare with a recording."""

    cpu: dict[str, Any]
    gpu: dict[str, Any]
    software: dict[str, Any]
    cuda_usable: bool
    num_threads: int = 0
    source_sha256: Optional[str] = None
    env_vars: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reason:
    """One rule that applied: which, how much it lowers the expectation, and why in words."""

    rule: str
    level: str
    text: str


@dataclass(frozen=True)
class Rule:
    """A named check with the level it drops to."""

    name: str
    level: str
    check: Callable[[dict[str, Any], Here], Optional[str]]


def _cuda_generators(m: dict) -> list[dict]:
    return [g for g in m["randomness"]["generators"] if g["device"].startswith("cuda")]


def _gpu0(section: dict) -> Optional[dict]:
    return section["devices"][0] if section.get("available") and section["devices"] else None


def _gpu_words(dev: Optional[dict]) -> str:
    if dev is None:
        return "none"
    sms = f"{dev['sm_count']} SMs" if dev.get("sm_count") else "SM count unknown"
    return f"{dev['name']} ({sms})"


def _gpu_used(m: dict) -> bool:
    return bool(m["determinism"]["cuda_used"] or _cuda_generators(m))


def _version(section: dict, name: str) -> Optional[str]:
    return section["packages"].get(name)


# ---------------------------------------------------------------- "none": the noise cannot come back

def cuda_generator_without_gpu(m: dict, here: Here) -> Optional[str]:
    gens = _cuda_generators(m)
    if gens and not here.cuda_usable:
        return (f"generator {gens[0]['argument']!r} is a CUDA generator (seed {gens[0]['initial_seed']}) "
                f"and this machine has no usable CUDA GPU; GPU: {_gpu_words(_gpu0(m['gpu']))} recorded, "
                "none here")
    return None


def cuda_generator_sm_count(m: dict, here: Here) -> Optional[str]:
    rec, now = _gpu0(m["gpu"]), _gpu0(here.gpu)
    if not _cuda_generators(m) or not here.cuda_usable or rec is None or now is None:
        return None
    if rec.get("sm_count") and now.get("sm_count") and rec["sm_count"] != now["sm_count"]:
        return (f"CUDA generator: GPU {_gpu_words(rec)} recorded, {_gpu_words(now)} here; torch draws "
                "large random tensors with a launch grid sized by the SM count, so the noise differs")
    return None


def gpu_run_without_gpu(m: dict, here: Here) -> Optional[str]:
    if m["determinism"]["cuda_used"] and not here.cuda_usable and not _cuda_generators(m):
        return f"the call ran on a GPU ({_gpu_words(_gpu0(m['gpu']))}); this machine has none usable"
    return None


def argument_not_replayable(m: dict, here: Here) -> Optional[str]:
    bad = [(n, a) for n, a in sorted(m["arguments"].items()) if not a["replayable"]]
    if bad:
        return "; ".join(a["reason"] or f"argument {n!r} cannot be rebuilt" for n, a in bad)
    return None


def entry_point_not_replayable(m: dict, here: Here) -> Optional[str]:
    call = m["call"]
    if not call["replayable"]:
        return f"{call['qualname']} cannot be imported again: {call['reason'] or 'unknown source'}"
    return None


# ---------------------------------------------------------------- "close": the arithmetic may differ

def gpu_model_differs(m: dict, here: Here) -> Optional[str]:
    rec, now = _gpu0(m["gpu"]), _gpu0(here.gpu)
    if _gpu_used(m) and rec and now and rec["name"] != now["name"]:
        return f"GPU: {_gpu_words(rec)} recorded, {_gpu_words(now)} here; kernels round differently"
    return None


def _software_rule(label: str, get: Callable[[dict], Optional[str]], gpu_only: bool = False):
    def check(m: dict, here: Here) -> Optional[str]:
        if gpu_only and not _gpu_used(m):
            return None
        recorded, now = get(m["software"]) if "software" in m else None, get(here.software)
        if recorded != now:
            return f"{label}: {recorded or 'none'} recorded, {now or 'none'} here"
        return None
    return check


def driver_differs(m: dict, here: Here) -> Optional[str]:
    if _gpu_used(m) and here.gpu.get("available") and m["gpu"]["driver_version"] != here.gpu["driver_version"]:
        return f"NVIDIA driver: {m['gpu']['driver_version']} recorded, {here.gpu['driver_version']} here"
    return None


def cpu_capability_unpinnable(m: dict, here: Here) -> Optional[str]:
    from .capture.cpu import supports_capability

    recorded = m["cpu"].get("torch_capability")
    if recorded and not supports_capability(recorded, here.cpu.get("isa_flags", [])):
        return (f"CPU: kernels for {recorded} recorded; this CPU ({here.cpu.get('model') or '?'}) cannot run "
                f"them, so CPU arithmetic may round differently")
    return None


def architecture_differs(m: dict, here: Here) -> Optional[str]:
    if m["cpu"]["architecture"] != here.cpu["architecture"]:
        return f"CPU architecture: {m['cpu']['architecture']} recorded, {here.cpu['architecture']} here"
    return None


def nondeterministic_gpu_kernels(m: dict, here: Here) -> Optional[str]:
    knobs = m["determinism"]
    if _gpu_used(m) and not knobs["deterministic_algorithms"]:
        return ("nondeterministic GPU kernels were allowed (torch.use_deterministic_algorithms was off): "
                "even the same GPU may give other bits")
    if _gpu_used(m) and knobs["cudnn_benchmark"]:
        return "cudnn.benchmark was on: cuDNN may pick another algorithm on replay"
    return None


def source_changed(m: dict, here: Here) -> Optional[str]:
    if here.source_sha256 is not None and here.source_sha256 != m["call"]["source_sha256"]:
        return f"the function {m['call']['qualname']} changed since it was recorded (source digest differs)"
    return None


# ---------------------------------------------------------------- "info": restored by the replayer

def cpu_capability_pinned(m: dict, here: Here) -> Optional[str]:
    recorded, now = m["cpu"].get("torch_capability"), here.cpu.get("torch_capability")
    if recorded and now and recorded != now and not cpu_capability_unpinnable(m, here):
        return f"CPU kernels: {recorded} recorded, {now} here; the replay pins {recorded}"
    return None


def threads_differ(m: dict, here: Here) -> Optional[str]:
    if here.num_threads and m["determinism"]["num_threads"] != here.num_threads:
        return (f"threads: {m['determinism']['num_threads']} recorded, {here.num_threads} here; "
                "the replay restores the recorded count")
    return None


def env_vars_differ(m: dict, here: Here) -> Optional[str]:
    recorded, now = m["env_vars"]["captured"], here.env_vars.get("captured", {})
    names = sorted(n for n in set(recorded) | set(now) if recorded.get(n) != now.get(n))
    if names:
        return f"environment variables differ ({', '.join(names[:6])}); the replay restores them"
    return None


RULES: tuple[Rule, ...] = (
    Rule("cuda_generator_without_gpu", "none", cuda_generator_without_gpu),
    Rule("cuda_generator_sm_count", "none", cuda_generator_sm_count),
    Rule("gpu_run_without_gpu", "none", gpu_run_without_gpu),
    Rule("argument_not_replayable", "none", argument_not_replayable),
    Rule("entry_point_not_replayable", "none", entry_point_not_replayable),
    Rule("gpu_model_differs", "close", gpu_model_differs),
    Rule("torch_version", "close", _software_rule("torch", lambda s: s["torch"]["version"])),
    Rule("cuda_version", "close", _software_rule("CUDA", lambda s: s["torch"]["cuda"], gpu_only=True)),
    Rule("cudnn_version", "close", _software_rule("cuDNN", lambda s: s["torch"]["cudnn"], gpu_only=True)),
    Rule("driver_version", "close", driver_differs),
    Rule("diffusers_version", "close", _software_rule("diffusers", lambda s: _version(s, "diffusers"))),
    Rule("transformers_version", "close",
         _software_rule("transformers", lambda s: _version(s, "transformers"))),
    Rule("cpu_capability_unpinnable", "close", cpu_capability_unpinnable),
    Rule("architecture", "close", architecture_differs),
    Rule("nondeterministic_gpu_kernels", "close", nondeterministic_gpu_kernels),
    Rule("source_changed", "close", source_changed),
    Rule("cpu_capability_pinned", "info", cpu_capability_pinned),
    Rule("threads", "info", threads_differ),
    Rule("env_vars", "info", env_vars_differ),
)


@dataclass(frozen=True)
class Prediction:
    """The expected outcome of a replay here and every reason behind it (worst first)."""

    expected: str
    reasons: tuple[Reason, ...]


def predict(manifest: dict[str, Any], here: Here) -> Prediction:
    """Apply every rule; the expectation is the worst level among those that applied."""
    reasons = []
    for rule in RULES:
        text = rule.check(manifest, here)
        if text:
            reasons.append(Reason(rule.name, rule.level, text))
    order = {"none": 0, "close": 1, "info": 2}
    reasons.sort(key=lambda r: order[r.level])
    expected = max((_DROP[r.level] for r in reasons), key=LEVELS.index, default="exact")
    return Prediction(expected, tuple(reasons))


def risks(m: dict[str, Any]) -> list[str]:
    """What would stop an exact replay of this recording on another machine, in words."""
    out = []
    gens = _cuda_generators(m)
    gpu = _gpu0(m["gpu"])
    if gens:
        out.append(f"CUDA generator: the noise depends on the GPU's SM count ({_gpu_words(gpu)}); "
                   "a CPU generator gives portable noise")
    if _gpu_used(m):
        sw = m["software"]["torch"]
        out.append(f"GPU arithmetic: needs {_gpu_words(gpu)}, driver {m['gpu']['driver_version']}, "
                   f"CUDA {sw['cuda']}, cuDNN {sw['cudnn']}")
        knobs = m["determinism"]
        if not knobs["fully_deterministic"]:
            out.append("determinism off: nondeterministic kernels, TF32 or cudnn.benchmark were allowed")
    cap = m["cpu"].get("torch_capability")
    if cap and not _gpu_used(m):
        out.append(f"CPU kernels {cap} with {m['determinism']['num_threads']} threads: the replayer "
                   "restores both where the CPU supports them")
    for name, arg in sorted(m["arguments"].items()):
        if not arg["replayable"]:
            out.append(f"argument {name!r} cannot be rebuilt")
    if m["git"].get("dirty"):
        out.append("uncommitted changes in the repository (saved as repro/git.diff)")
    return out
