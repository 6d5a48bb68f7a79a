"""Explain why two runs differ: every manifest difference, ranked by its effect on the output bits.

The categories, most decisive first:

- ``noise``: the initial noise differs (seed, generator device or state, a used global RNG);
- ``input``: a different computation (arguments, model weights, the function's source);
- ``arithmetic``: the same computation, rounded differently (threads, CPU kernels, GPU, TF32,
  library versions, deterministic algorithms, environment variables that steer kernels);
- ``cosmetic``: recorded, but no effect on the bits (times, git bookkeeping, run kind).

Each difference matches the first entry of ``EXPLANATIONS`` whose pattern fits its path.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Callable

CATEGORIES = ("noise", "input", "arithmetic", "cosmetic")

# Paths never compared: derived digests, raw states (their sha256 is compared instead), outputs
# (compared by value separately) and timestamps.
_IGNORED = re.compile(
    r"^(manifest_digest|outputs(\..*)?|call\.(started_at|ended_at|duration_s)"
    r"|randomness\.generators\.\d+\.state_b64|randomness\.global\..*\.(state_b64|state)(\..*)?"
    r"|randomness\.global\.torch_cuda\.devices\.\d+\.state_b64|repro_track_version)$")

Explain = Callable[[str, Any, Any, dict, dict], str]


def _words(template: str) -> Explain:
    return lambda path, a, b, ma, mb: template.format(path=path, a=_short(a), b=_short(b))


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _global_rng(path: str, a: Any, b: Any, ma: dict, mb: dict) -> str:
    which = path.split(".")[2]
    used = _consumed(ma, which) or _consumed(mb, which)
    label = {"torch_cpu": "torch's global CPU", "torch_cuda": "torch's global CUDA", "numpy": "numpy's global",
             "python": "Python's random"}[which]
    if used:
        return f"{label} RNG state differs and the call drew from it, so the random numbers differ"
    return f"{label} RNG state differs, but the call did not draw from it"


def _state_words(path: str, a: Any, b: Any, ma: dict, mb: dict) -> str:
    index = int(path.split(".")[2])
    ga, gb = ma["randomness"]["generators"], mb["randomness"]["generators"]
    if index < len(ga) and index < len(gb) and ga[index]["initial_seed"] != gb[index]["initial_seed"]:
        return "seed: {} in A, {} in B; a different seed draws different initial noise".format(
            ga[index]["initial_seed"], gb[index]["initial_seed"])
    return ("generator state at the call differs: the generator had been used before the call in "
            "one run, so the same seed gave other noise")


def _consumed(m: dict, which: str) -> bool:
    section = m["randomness"]["global"][which]
    if which == "torch_cuda":
        return any(d["consumed"] for d in section["devices"])
    return bool(section.get("consumed"))


def _global_category(path: str, ma: dict, mb: dict) -> str:
    which = path.split(".")[2]
    return "noise" if _consumed(ma, which) or _consumed(mb, which) else "cosmetic"


def _trajectory_words(path: str, a: Any, b: Any, ma: dict, mb: dict) -> str:
    from .trajectory import divergence_words

    words = divergence_words(ma.get("trajectory"), mb.get("trajectory"))
    if words is None:
        return "only one of the runs recorded its denoising trajectory"
    return f"denoising trajectory: {words}"


def _trajectory_category(path: str, ma: dict, mb: dict) -> str:
    # Where the latents first parted: at the noise, or later in the computation (the noise agreed).
    from .trajectory import first_divergence

    found = first_divergence(ma.get("trajectory"), mb.get("trajectory"))
    return "noise" if found is not None and found[1] == 0 else "arithmetic" if found else "cosmetic"


# (pattern, category or a function deciding it, explanation)
EXPLANATIONS: tuple[tuple[str, Any, Explain], ...] = (
    (r"trajectory(\..*)?", _trajectory_category, _trajectory_words),
    (r"randomness\.generators\.\d+\.device", "noise", _words(
        "generator device: {a} in A, {b} in B; CPU and CUDA generators draw different numbers from "
        "the same seed, so the initial noise differs")),
    (r"randomness\.generators\.\d+\.initial_seed", "noise", _words(
        "seed: {a} in A, {b} in B; a different seed draws different initial noise")),
    (r"randomness\.primary\.seed|randomness\.seeds\..*", "noise", _words(
        "seed: {a} in A, {b} in B; a different seed draws different initial noise")),
    (r"randomness\.primary\.generator_device", "noise", _words(
        "generator device: {a} in A, {b} in B; CPU and CUDA generators draw different numbers")),
    (r"randomness\.generators\.\d+\.(state_sha256|fresh)", "noise", _state_words),
    (r"randomness\.generators(\..*)?", "noise", _words("generators differ ({path}: {a} vs {b})")),
    (r"randomness\.global\.[a-z_]+\..*", _global_category, _global_rng),
    (r"gpu\.devices\.\d+\.sm_count", "noise", _words(
        "GPU SM count: {a} in A, {b} in B; CUDA generators draw large tensors differently on GPUs "
        "with other SM counts, and kernels split work differently")),
    (r"arguments\.[^.]+\.pipeline\..*weights_sha256", "input", _words(
        "model weights differ ({path}); the same inputs give another image")),
    (r"(arguments\.[^.]+\.pipeline|pipelines\.\d+\.identity)\.(revision|repo_id)", "input", _words(
        "model {path}: {a} in A, {b} in B; another commit of the model repo may hold other weights")),
    (r"(arguments\.[^.]+\.pipeline|pipelines\.\d+\.identity)\.(adapters|adapter_weights|fused)(\..*)?",
     "input", _words("LoRA adapters differ ({path}: {a} vs {b}); the adapted weights compute another image")),
    (r"pipelines\.\d+\.identity\..*weights_sha256", "input", _words(
        "weights of a pipeline the call loaded differ ({path}); the same inputs give another image")),
    (r"pipelines(\..*)?", "input", _words("a pipeline the call used differs ({path}: {a} vs {b})")),
    (r"arguments\.[^.]+\.pipeline\..*", "input", _words("pipeline differs ({path}: {a} vs {b})")),
    (r"arguments\.([^.]+)\.(value|sha256)(\..*)?", "input", _words(
        "argument {path}: {a} in A, {b} in B; the call computed something else")),
    (r"arguments\..*", "input", _words("argument {path}: {a} in A, {b} in B")),
    (r"code\.files(\..*)?", "input", _words(
        "the project's source files differ ({path}); the call ran other code")),
    (r"code\.(commit|diff_sha256|module_sha256)", "input", _words(
        "the project's code differs ({path}: {a} in A, {b} in B)")),
    (r"call\.source_sha256", "input", _words(
        "the function's source code differs between the runs")),
    (r"call\.(module|qualname|source_file)", "input", _words("another function: {a} vs {b}")),
    (r"determinism\.num_threads", "arithmetic", _words(
        "threads: {a} in A, {b} in B; CPU kernels split sums across threads, so they round "
        "differently")),
    (r"determinism\.num_interop_threads", "arithmetic", _words(
        "inter-op threads: {a} in A, {b} in B")),
    (r"cpu\.torch_capability", "arithmetic", _words(
        "CPU kernels: {a} in A, {b} in B; vectorised kernels of another width round differently")),
    (r"determinism\.(deterministic_algorithms|warn_only|cudnn_deterministic|cudnn_benchmark)",
     "arithmetic", _words("{path}: {a} in A, {b} in B; nondeterministic or autotuned GPU kernels may "
                          "give other bits")),
    (r"determinism\.(cudnn_allow_tf32|matmul_allow_tf32|float32_matmul_precision|matmul_allow_.*)",
     "arithmetic", _words("{path}: {a} in A, {b} in B; reduced-precision (TF32/fp16) math on the GPU "
                          "rounds differently")),
    (r"determinism\.(default_dtype)", "arithmetic", _words("default dtype: {a} vs {b}")),
    (r"determinism\.autocast(\..*)?", "arithmetic", _words(
        "torch.autocast: {a} in A, {b} in B; autocast runs matmuls and convolutions in lower precision")),
    (r"determinism\.cuda_used", "arithmetic", _words("ran on GPU: {a} in A, {b} in B")),
    (r"determinism\..*", "arithmetic", _words("{path}: {a} in A, {b} in B")),
    (r"gpu\.devices\.\d+\.name", "arithmetic", _words("GPU: {a} in A, {b} in B")),
    (r"gpu\.(driver_version|cuda_driver_version)", "arithmetic", _words("{path}: {a} in A, {b} in B")),
    (r"software\.torch\..*", "arithmetic", _words("{path}: {a} in A, {b} in B")),
    (r"software\.packages\.(diffusers|transformers|accelerate|xformers)", "arithmetic", _words(
        "{path}: {a} in A, {b} in B; model code may have changed")),
    (r"env_vars\.captured\.(CUBLAS_WORKSPACE_CONFIG|NVIDIA_TF32_OVERRIDE|ATEN_CPU_CAPABILITY|"
     r"ONEDNN_MAX_CPU_ISA|DNNL_MAX_CPU_ISA|MKL_.*|OMP_NUM_THREADS|CUDA_VISIBLE_DEVICES)",
     "arithmetic", _words("environment variable {path}: {a} in A, {b} in B; it steers kernels")),
    (r"cpu\.(isa_flags|model|vendor|architecture)(\..*)?", "arithmetic", _words(
        "CPU: {path} {a} in A, {b} in B")),
    (r".*", "cosmetic", _words("{path}: {a} in A, {b} in B")),
)


@dataclass(frozen=True)
class Difference:
    """One differing field, its category and what it means."""

    path: str
    category: str
    a: Any
    b: Any
    explanation: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths to leaves; empty containers are leaves."""
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(obj, list) and obj and not all(isinstance(v, (str, int, float)) for v in obj):
        out = {}
        for index, value in enumerate(obj):
            out.update(flatten(value, f"{prefix}.{index}"))
        return out
    return {prefix: obj}


_MISSING = object()


def _classify(path: str, a: Any, b: Any, ma: dict, mb: dict) -> Difference:
    for pattern, category, explain in EXPLANATIONS:
        if re.fullmatch(pattern, path):
            cat = category(path, ma, mb) if callable(category) else category
            return Difference(path, cat, a, b, explain(path, a, b, ma, mb))
    raise AssertionError("the catch-all pattern matches every path")


def differences(ma: dict[str, Any], mb: dict[str, Any]) -> list[Difference]:
    """Every difference between two manifests, most decisive category first."""
    fa, fb = flatten(ma), flatten(mb)
    found = []
    for path in sorted(set(fa) | set(fb)):
        if _IGNORED.match(path):
            continue
        a, b = fa.get(path, _MISSING), fb.get(path, _MISSING)
        if a == b:
            continue
        found.append(_classify(path, None if a is _MISSING else a, None if b is _MISSING else b, ma, mb))
    found = _dedupe(found)
    return sorted(found, key=lambda d: CATEGORIES.index(d.category))


def _dedupe(found: list[Difference]) -> list[Difference]:
    # One cause often shows under several paths (the seed in the generator and in "primary"):
    # keep the first explanation of each kind.
    seen: set[str] = set()
    out = []
    for diff in found:
        if diff.explanation in seen:
            continue
        seen.add(diff.explanation)
        out.append(diff)
    return out


def output_differences(ma: dict, mb: dict, arrays_a: dict[str, Any],
                       arrays_b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """For outputs of the same name, dtype and shape: bitwise equality and absolute differences."""
    by_b = {o["name"]: o for o in mb["outputs"]}
    out = {}
    for rec in ma["outputs"]:
        other = by_b.get(rec["name"])
        if other is None or other["shape"] != rec["shape"] or other["dtype"] != rec["dtype"]:
            continue
        entry: dict[str, Any] = {"bitwise_equal": rec["sha256"] == other["sha256"],
                                 "max_abs_diff": None, "mean_abs_diff": None}
        x, y = arrays_a.get(rec["name"]), arrays_b.get(rec["name"])
        if x is not None and y is not None:
            diff = (x.double() - y.double()).abs()
            entry["max_abs_diff"] = float(diff.max()) if diff.numel() else 0.0
            entry["mean_abs_diff"] = float(diff.mean()) if diff.numel() else 0.0
        out[rec["name"]] = entry
    return out
