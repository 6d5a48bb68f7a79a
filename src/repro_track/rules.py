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
    # Non-CPU device types a generator can be rebuilt on here ("cuda", "mps", "xpu").
    accelerators: tuple[str, ...] = ()
    # Which code the replay runs and what differs from the recorded code identity
    # (replay.code.CodePlan.facts()); None when not compared.
    code: Optional[dict[str, Any]] = None


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


def _cuda_default_consumed(m: dict) -> list[dict]:
    """The CUDA default generators the call drew from (generator=None with CUDA on)."""
    cuda = m["randomness"]["global"]["torch_cuda"]
    return [d for d in cuda["devices"] if d["consumed"]] if cuda["available"] else []


def uses_cuda_noise(m: dict) -> bool:
    """Whether the call drew random numbers on a CUDA device (its own generator or the default one)."""
    return bool(_cuda_generators(m) or _cuda_default_consumed(m))


def _cuda_index(m: dict) -> int:
    """The CUDA device index the call drew its noise on (cuda:k), 0 when it does not say."""
    for gen in _cuda_generators(m):
        _, _, index = gen["device"].partition(":")
        return int(index) if index.isdigit() else 0
    consumed = _cuda_default_consumed(m)
    return int(consumed[0].get("index", 0)) if consumed else 0


def _used_gpu(section: dict, cuda_index: int) -> Optional[dict]:
    """The device behind ``cuda:cuda_index`` in a GPU section, through its CUDA order (which honours
    CUDA_VISIBLE_DEVICES); sections without one (older recordings) fall back to device 0."""
    if not section.get("available") or not section["devices"]:
        return None
    order = section.get("cuda_order")
    if order is None:
        return _gpu0(section)
    nvml = order[cuda_index] if cuda_index < len(order) else None
    return next((d for d in section["devices"] if d["index"] == nvml), None)


def _rec_gpu(m: dict) -> Optional[dict]:
    return _used_gpu(m["gpu"], _cuda_index(m))


def _here_gpu(m: dict, here: Here) -> Optional[dict]:
    return _used_gpu(here.gpu, _cuda_index(m))


# torch's CUDA sampling kernels (aten/src/ATen/native/cuda/DistributionTemplates.h,
# calc_execution_policy) launch min(ceil(n / 256), SMs * (threads per SM / 256)) blocks of 256
# threads, and element i's Philox counter depends on the grid: two GPUs give the same noise for a
# draw of n elements when the grid is the same on both (PyTorch issue 196613). Every CUDA GPU has
# at least 1024 threads per SM, so an unknown count is taken as 1024 (the smallest grid cap).
_BLOCK = 256
_MIN_THREADS_PER_SM = 1024


def _grid_cap(dev: dict) -> int:
    threads = dev.get("max_threads_per_sm") or _MIN_THREADS_PER_SM
    return dev["sm_count"] * (threads // _BLOCK)


def same_cuda_noise(numel: int, rec: dict, now: dict) -> bool:
    """Whether a CUDA draw of ``numel`` elements gives the same values on both devices."""
    blocks = -(-numel // _BLOCK)
    return min(blocks, _grid_cap(rec)) == min(blocks, _grid_cap(now))


def _numel(shape: list[int]) -> int:
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel


def _images(outputs: list[dict], channels: int) -> Optional[tuple[int, int, int, bool]]:
    """(images, height, width, are latents) the call returned, when all its images have one size."""
    count, size, latents = 0, None, False
    for out in outputs:
        shape = [int(n) for n in out["shape"]]
        if len(shape) == 4 and shape[1] == channels and shape[3] not in (1, 3, 4):
            batch, hw, latents = shape[0], (shape[2], shape[3]), True  # output_type="latent"
        elif len(shape) == 4:
            batch, hw = shape[0], (shape[1], shape[2]) if shape[3] in (1, 3, 4) else (shape[2], shape[3])
        elif len(shape) == 3 and shape[2] in (1, 3, 4):
            batch, hw = 1, (shape[0], shape[1])  # one PIL image or HWC array
        else:
            continue
        if size not in (None, hw):
            return None
        count, size = count + batch, hw
    return (count, size[0], size[1], latents) if size else None


def largest_cuda_draw(m: dict) -> Optional[tuple[int, str]]:
    """(elements, how it is known) of the call's largest CUDA draw, the latents; None when unknown.

    Known from a ``latents`` tensor argument (the scheduler's noise has its shape), or, for a call
    given a diffusers pipeline with a UNet, from the images it returned: diffusers draws the latents
    of a batch at once, ``(images, unet.in_channels, height / s, width / s)`` with ``s`` the VAE's
    downscaling (1 without a VAE). Several calls of the pipeline only make this an overestimate.
    """
    args = m["arguments"]
    latents = args.get("latents")
    if latents and latents["kind"] == "tensor" and latents.get("shape"):
        return _numel(latents["shape"]), f"the latents argument's shape {tuple(latents['shape'])}"
    pipe = next((a["pipeline"] for a in args.values() if a["kind"] == "pipeline"), None)
    components = (pipe or {}).get("components") or {}
    channels = ((components.get("unet") or {}).get("config") or {}).get("in_channels")
    images = _images(m["outputs"], channels) if isinstance(channels, int) else None
    if images is None:
        return None
    count, height, width, are_latents = images
    vae = (components.get("vae") or {}).get("config") or {}
    blocks = vae.get("block_out_channels")
    scale = 1 if are_latents or not blocks else 2 ** (len(blocks) - 1)
    shape = (count, channels, height // scale, width // scale)
    return _numel(list(shape)), f"latents {shape} from the pipeline's UNet config and the returned images"


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
    if here.cuda_usable:
        return None
    if gens:
        return (f"generator {gens[0]['argument']!r} is a CUDA generator (seed {gens[0]['initial_seed']}) "
                f"and this machine has no usable CUDA GPU; GPU: {_gpu_words(_rec_gpu(m))} recorded, "
                "none here")
    if _cuda_default_consumed(m):
        return (f"the call drew noise from the CUDA default generator (no generator argument; GPU "
                f"{_gpu_words(_rec_gpu(m))}) and this machine has no usable CUDA GPU")
    return None


def device_generator_elsewhere(m: dict, here: Here) -> Optional[str]:
    for gen in m["randomness"]["generators"]:
        kind = gen["device"].partition(":")[0]
        if kind in ("mps", "xpu") and kind not in here.accelerators:
            return (f"generator {gen['argument']!r} is an {kind} generator (seed {gen['initial_seed']}); "
                    f"its noise can only be regenerated on an {kind} device, and this machine has none")
    return None


def cuda_generator_sm_count(m: dict, here: Here) -> Optional[str]:
    rec, now = _rec_gpu(m), _here_gpu(m, here)
    if not uses_cuda_noise(m) or not here.cuda_usable or rec is None or now is None:
        return None
    words = f"CUDA generator: GPU {_gpu_words(rec)} recorded, {_gpu_words(now)} here"
    if not rec.get("sm_count") or not now.get("sm_count"):
        if rec["name"] == now["name"]:
            return None  # the same model has the same SM count
        return (f"{words}; without both SM counts the launch grid of torch's CUDA sampling cannot be "
                "compared, so the noise may differ")
    if _grid_cap(rec) == _grid_cap(now):
        return None
    draw = largest_cuda_draw(m)
    if draw is not None and same_cuda_noise(draw[0], rec, now):
        return None
    size = (f"the largest draw ({draw[0]} elements, {draw[1]}) is above" if draw else
            "the size of the call's draws is not known, so it may be above")
    limit = min(_grid_cap(rec), _grid_cap(now)) * _BLOCK
    return (f"{words}; torch draws CUDA random tensors with a launch grid capped by the SM count, and "
            f"{size} the {limit} elements below which both GPUs give the same noise")


def gpu_run_without_gpu(m: dict, here: Here) -> Optional[str]:
    if m["determinism"]["cuda_used"] and not here.cuda_usable and not _cuda_generators(m):
        return f"the call ran on a GPU ({_gpu_words(_rec_gpu(m))}); this machine has none usable"
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
    rec, now = _rec_gpu(m), _here_gpu(m, here)
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


def _replay_library_isa(m: dict, here: Here) -> tuple[dict, dict]:
    """oneDNN/MKL facts (recorded, here): here as the replay child will run, with the recorded
    environment variables restored (those that pin the libraries among them). Recordings made
    before these facts were captured get them from their recorded CPU flags and variables."""
    from .capture.cpu import library_isa

    env = m["env_vars"]["captured"]
    recorded = m["cpu"] if "onednn_isa" in m["cpu"] else {**m["cpu"], **library_isa(m["cpu"], env)}
    return recorded, library_isa(here.cpu, env)


_PORTABLE_CPU = "ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=COMPATIBLE (see repro-track doctor)"


def onednn_isa_differs(m: dict, here: Here) -> Optional[str]:
    rec, now = _replay_library_isa(m, here)
    if _gpu_used(m) or not rec.get("onednn_isa") or not now.get("onednn_isa"):
        return None
    if rec["onednn_isa"] != now["onednn_isa"]:
        pinned = f"capped at {rec['onednn_isa_cap']}" if rec.get("onednn_isa_cap") else "not capped"
        return (f"oneDNN: {rec['onednn_isa']} kernels recorded ({pinned}), {now['onednn_isa']} here "
                f"({here.cpu.get('model') or '?'}); CPU convolutions and matmuls may round differently. "
                f"Record with {_PORTABLE_CPU} for portable CPU runs")
    return None


def mkl_branch_fixed(value: Optional[str], vendor: Optional[str]) -> bool:
    """Whether ``MKL_CBWR=value`` fixes oneMKL's code branch on a CPU of ``vendor``: a branch other
    than AUTO on Intel; elsewhere only COMPATIBLE (others fall back to AUTO silently)."""
    branch = (value or "").split(",")[0].strip().upper()
    return bool(branch) and branch != "AUTO" and (vendor == "GenuineIntel" or branch == "COMPATIBLE")


def mkl_code_path_differs(m: dict, here: Here) -> Optional[str]:
    rec, now = _replay_library_isa(m, here)
    if _gpu_used(m) or "mkl_cbwr" not in rec or not rec.get("mkl_version") or not here.cpu.get("mkl_version"):
        return None
    if mkl_branch_fixed(rec["mkl_cbwr"], rec.get("vendor")) \
            and mkl_branch_fixed(now["mkl_cbwr"], here.cpu.get("vendor")):
        return None
    path_rec = (rec.get("vendor"), rec.get("model"), rec.get("mkl_isa"))
    path_now = (here.cpu.get("vendor"), here.cpu.get("model"), now.get("mkl_isa"))
    if path_rec != path_now:
        def words(vendor: Any, model: Any, isa: Any) -> str:
            return f"{model or '?'} ({vendor or '?'}{', ' + isa if isa else ''})"
        return (f"oneMKL: {words(*path_rec)} recorded, {words(*path_now)} here, and MKL_CBWR did not fix "
                "its code branch, so MKL picks kernels and blocking by CPU model and BLAS sums may round "
                f"differently. Record with {_PORTABLE_CPU} for portable CPU runs")
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


def _changes(code: dict) -> str:
    names = code["changes"]
    return "; ".join(names[:8]) + (f"; and {len(names) - 8} more" if len(names) > 8 else "")


def code_changed(m: dict, here: Here) -> Optional[str]:
    code = here.code
    if code and code["mode"] == "current" and code["changes"]:
        return f"the project's code changed since recording ({_changes(code)}); {code['why']}"
    return None


def recorded_diff_not_applied(m: dict, here: Here) -> Optional[str]:
    code = here.code
    if code and code["mode"] == "recorded" and code["diff_problem"]:
        return (f"the recording had uncommitted changes (diff sha256 {code['diff_sha256'][:12]}) that "
                f"the replay does not apply: {code['diff_problem']}")
    return None


def untracked_file_changed(m: dict, here: Here) -> Optional[str]:
    code = here.code
    if code and code["mode"] == "recorded" and code["untracked_changed"]:
        names = ", ".join(code["untracked_changed"][:8])
        return (f"untracked source files changed since recording ({names}); git does not hold their "
                "recorded version, so today's copy is used")
    return None


# ---------------------------------------------------------------- "info": restored by the replayer

def recorded_code_rebuilt(m: dict, here: Here) -> Optional[str]:
    code = here.code
    if code and code["mode"] == "recorded":
        diff = " with the recorded uncommitted diff" if code["apply_diff"] else ""
        return (f"the project's code changed since recording ({_changes(code)}); the replay runs the "
                f"recorded commit {code['commit'][:12]}{diff} in a temporary git worktree "
                "(--current-code runs today's code)")
    return None


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
    from .capture.envvars import is_bit_deciding

    # Only bit-deciding variables reach the child from a recording; machine-local ones (devices,
    # hub, caches) keep this machine's values and change no bits, so they are no reason here.
    recorded, now = m["env_vars"]["captured"], here.env_vars.get("captured", {})
    names = sorted(n for n in set(recorded) | set(now)
                   if is_bit_deciding(n) and recorded.get(n) != now.get(n))
    if names:
        return f"environment variables differ ({', '.join(names[:6])}); the replay restores them"
    return None


RULES: tuple[Rule, ...] = (
    Rule("cuda_generator_without_gpu", "none", cuda_generator_without_gpu),
    Rule("cuda_generator_sm_count", "none", cuda_generator_sm_count),
    Rule("device_generator_elsewhere", "none", device_generator_elsewhere),
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
    Rule("numpy_version", "close", _software_rule("numpy", lambda s: _version(s, "numpy"))),
    Rule("peft_version", "close", _software_rule("peft", lambda s: _version(s, "peft"))),
    Rule("accelerate_version", "close", _software_rule("accelerate", lambda s: _version(s, "accelerate"))),
    Rule("xformers_version", "close",
         _software_rule("xformers", lambda s: _version(s, "xformers"), gpu_only=True)),
    Rule("python_version", "close", _software_rule("Python", lambda s: s["python"]["version"])),
    Rule("cpu_capability_unpinnable", "close", cpu_capability_unpinnable),
    Rule("onednn_isa", "close", onednn_isa_differs),
    Rule("mkl_code_path", "close", mkl_code_path_differs),
    Rule("architecture", "close", architecture_differs),
    Rule("nondeterministic_gpu_kernels", "close", nondeterministic_gpu_kernels),
    Rule("source_changed", "close", source_changed),
    Rule("code_changed", "close", code_changed),
    Rule("recorded_diff_not_applied", "close", recorded_diff_not_applied),
    Rule("untracked_file_changed", "close", untracked_file_changed),
    Rule("recorded_code_rebuilt", "info", recorded_code_rebuilt),
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
    gpu = _rec_gpu(m)
    if gens or _cuda_default_consumed(m):
        source = "CUDA generator" if gens else "CUDA default generator (no generator argument)"
        out.append(f"{source}: draws above the GPU's launch grid depend on its SM count "
                   f"({_gpu_words(gpu)}); a CPU generator gives portable noise")
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
        cpu = m["cpu"]
        if cpu.get("onednn_isa") and not cpu.get("onednn_isa_cap"):
            out.append(f"oneDNN ran {cpu['onednn_isa']} kernels, not capped: another CPU may pick others")
        if cpu.get("mkl_version") and "mkl_cbwr" in cpu \
                and not mkl_branch_fixed(cpu["mkl_cbwr"], cpu.get("vendor")):
            out.append("oneMKL code branch not fixed (MKL_CBWR): another CPU model may round differently")
    for name, arg in sorted(m["arguments"].items()):
        if not arg["replayable"]:
            out.append(f"argument {name!r} cannot be rebuilt")
    if m["git"].get("dirty"):
        out.append("uncommitted changes in the repository (saved as repro/git.diff)")
    return out
