"""Facts about torch: versions, the determinism knobs, and the RNG states (read without consuming).

Everything here is read-only with respect to the process: no RNG is advanced, no flag is changed,
and CUDA is never initialised (reading a CUDA RNG state only happens when CUDA already started).
The ``apply_*``/``restore_*`` functions are the replayer's side: they set what was recorded.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import random
import re
import sys
from typing import Any

log = logging.getLogger(__name__)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


# ---------------------------------------------------------------- versions (static, once per process)

@functools.lru_cache(maxsize=1)
def _build_config() -> str:
    import torch

    try:
        return torch.__config__.show()
    except Exception as exc:  # pragma: no cover - defensive: exotic builds
        log.debug("torch.__config__.show() failed: %s", exc)
        return ""


def _config_version(pattern: str) -> str | None:
    match = re.search(pattern, _build_config())
    return match.group(1) if match else None


@functools.lru_cache(maxsize=1)
def _torch_software() -> dict[str, Any]:
    import torch

    try:
        cudnn = torch.backends.cudnn.version()  # loads the library; does not start CUDA
    except Exception as exc:
        log.debug("cudnn version unavailable: %s", exc)
        cudnn = None
    return {
        "version": torch.__version__,
        "git_version": getattr(torch.version, "git_version", None),
        "cuda": torch.version.cuda,
        "cudnn": str(cudnn) if cudnn else None,
        "hip": getattr(torch.version, "hip", None),
        "debug": bool(getattr(torch.version, "debug", False)),
    }


def torch_software() -> dict[str, Any]:
    """torch's version, git commit, and the CUDA/cuDNN/HIP it was built with."""
    return dict(_torch_software())


@functools.lru_cache(maxsize=1)
def _torch_cpu_facts() -> dict[str, Any]:
    import torch

    return {
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl_version": _config_version(r"Math Kernel Library Version ([\d.]+)"),
        "onednn_version": _config_version(r"(?:MKL-DNN|oneDNN)\s+v([\w.]+)"),
        "openmp": _config_version(r"OpenMP (\d+)"),
    }


def torch_cpu_facts() -> dict[str, Any]:
    """The CPU ISA torch dispatches to and the oneDNN/MKL/OpenMP it was built with."""
    return dict(_torch_cpu_facts())


# ---------------------------------------------------------------- determinism knobs (per call)

def _sdp_flags(torch: Any) -> dict[str, bool]:
    cuda = torch.backends.cuda
    flags = {}
    for name in ("flash", "mem_efficient", "math", "cudnn"):
        getter = getattr(cuda, f"{name}_sdp_enabled", None)
        flags[name] = bool(getter()) if getter else False
    return flags


def determinism_knobs() -> dict[str, Any]:
    """Every global switch that changes which kernels run or how they round."""
    import torch

    matmul = torch.backends.cuda.matmul
    knobs = {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_enabled": bool(torch.backends.cudnn.enabled),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(matmul.allow_tf32),
        "matmul_allow_fp16_reduced_precision_reduction": bool(
            matmul.allow_fp16_reduced_precision_reduction
        ),
        "matmul_allow_bf16_reduced_precision_reduction": bool(
            matmul.allow_bf16_reduced_precision_reduction
        ),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "sdp": _sdp_flags(torch),
        "fill_uninitialized_memory": bool(torch.utils.deterministic.fill_uninitialized_memory),
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "default_dtype": str(torch.get_default_dtype()).removeprefix("torch."),
        "cuda_used": cuda_started(),
    }
    knobs["fully_deterministic"] = is_fully_deterministic(knobs)
    return knobs


def cuda_started() -> bool:
    """Whether CUDA has been initialised in this process (read without starting it)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def is_fully_deterministic(knobs: dict[str, Any]) -> bool:
    """Whether the knobs rule out nondeterministic kernels and TF32 rounding."""
    return bool(
        knobs["deterministic_algorithms"]
        and not knobs["warn_only"]
        and knobs["cudnn_deterministic"]
        and not knobs["cudnn_benchmark"]
        and not knobs["cudnn_allow_tf32"]
        and not knobs["matmul_allow_tf32"]
    )


def apply_knobs(knobs: dict[str, Any]) -> None:
    """Set the recorded knobs in this process (the replay child calls this before any work)."""
    import torch

    # Inter-op threads can only be set before the first inter-op parallel work, so first.
    if torch.get_num_interop_threads() != knobs["num_interop_threads"]:
        try:
            torch.set_num_interop_threads(knobs["num_interop_threads"])
        except RuntimeError as exc:
            log.warning("could not restore %d inter-op threads: %s", knobs["num_interop_threads"], exc)
    torch.set_num_threads(knobs["num_threads"])
    # Setting this switch imports torch's compiler stack (about a second): only when it changes.
    if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) \
            != (knobs["deterministic_algorithms"], knobs["warn_only"]):
        torch.use_deterministic_algorithms(knobs["deterministic_algorithms"], warn_only=knobs["warn_only"])
    torch.backends.cudnn.deterministic = knobs["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = knobs["cudnn_benchmark"]
    torch.backends.cudnn.enabled = knobs["cudnn_enabled"]
    torch.backends.cudnn.allow_tf32 = knobs["cudnn_allow_tf32"]
    matmul = torch.backends.cuda.matmul
    matmul.allow_tf32 = knobs["matmul_allow_tf32"]
    matmul.allow_fp16_reduced_precision_reduction = knobs["matmul_allow_fp16_reduced_precision_reduction"]
    matmul.allow_bf16_reduced_precision_reduction = knobs["matmul_allow_bf16_reduced_precision_reduction"]
    torch.set_float32_matmul_precision(knobs["float32_matmul_precision"])
    for name, enabled in knobs["sdp"].items():
        setter = getattr(torch.backends.cuda, f"enable_{name}_sdp", None)
        if setter:
            setter(enabled)
    torch.utils.deterministic.fill_uninitialized_memory = knobs["fill_uninitialized_memory"]
    torch.set_default_dtype(getattr(torch, knobs["default_dtype"]))


# ---------------------------------------------------------------- generators

def generator_record(gen: Any, argument: str, position: int | None) -> dict[str, Any]:
    """A generator's device, seed and FULL current state (so a consumed one still replays)."""
    import torch

    state = gen.get_state().numpy().tobytes()
    device = str(gen.device)
    seed = gen.initial_seed()
    fresh = torch.Generator(device=gen.device).manual_seed(seed).get_state().numpy().tobytes()
    return {
        "argument": argument,
        "position": position,
        "device": device,
        "initial_seed": int(seed),
        "state_b64": _b64(state),
        "state_sha256": _sha(state),
        "fresh": state == fresh,
        "consumed_by_call": False,
    }


def generator_state_digest(gen: Any) -> str:
    """The sha256 of a generator's current state, to tell later whether the call consumed it."""
    return _sha(gen.get_state().numpy().tobytes())


def rebuild_generator(record: dict[str, Any]) -> Any:
    """A generator on the recorded device holding exactly the recorded state."""
    import torch

    gen = torch.Generator(device=record["device"])
    state = torch.frombuffer(bytearray(_unb64(record["state_b64"])), dtype=torch.uint8)
    gen.set_state(state)
    return gen


# ---------------------------------------------------------------- global RNGs

def _torch_cpu_state() -> bytes:
    import torch

    return torch.get_rng_state().numpy().tobytes()


def _torch_cuda_states() -> dict[str, Any]:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {"available": False, "reason": "CUDA was not initialised in this process", "devices": []}
    devices = []
    for index, state in enumerate(torch.cuda.get_rng_state_all()):
        raw = state.numpy().tobytes()
        devices.append({"index": index, "state_b64": _b64(raw), "sha256": _sha(raw), "consumed": False})
    return {"available": True, "reason": None, "devices": devices}


def _numpy_state() -> dict[str, Any]:
    try:
        import numpy as np
    except ImportError:
        return {"available": False, "reason": "numpy is not installed", "state": None, "sha256": None,
                "consumed": False}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "bit_generator": str(name),
        "key_b64": _b64(np.asarray(keys, dtype="<u4").tobytes()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    return {"available": True, "reason": None, "state": state, "sha256": _json_sha(state),
            "consumed": False}


def _python_state() -> dict[str, Any]:
    import array

    version, internal, gauss_next = random.getstate()
    # 624 Mersenne Twister words and the position: packed, not 625 JSON integers (smaller, faster).
    words = array.array("I", internal[:-1])
    if sys.byteorder != "little":
        words.byteswap()
    state = {"version": version, "key_b64": _b64(words.tobytes()), "pos": internal[-1],
             "gauss_next": gauss_next}
    return {"state": state, "sha256": _json_sha(state), "consumed": False}


def _json_sha(obj: Any) -> str:
    import json

    return _sha(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def global_rng_states() -> dict[str, Any]:
    """The global RNG states: torch CPU, each started CUDA device, numpy's global, Python's random."""
    cpu = _torch_cpu_state()
    return {
        "torch_cpu": {"state_b64": _b64(cpu), "sha256": _sha(cpu), "consumed": False},
        "torch_cuda": _torch_cuda_states(),
        "numpy": _numpy_state(),
        "python": _python_state(),
    }


def global_rng_digests() -> dict[str, Any]:
    """Digests of the global states only, cheap enough to take at call exit."""
    states = global_rng_states()
    return {
        "torch_cpu": states["torch_cpu"]["sha256"],
        "torch_cuda": {d["index"]: d["sha256"] for d in states["torch_cuda"]["devices"]},
        "torch_cuda_at_start": _cuda_states_at_start(),
        "numpy": states["numpy"]["sha256"],
        "python": states["python"]["sha256"],
    }


def _cuda_states_at_start() -> list[dict[str, Any]]:
    """Each CUDA default generator's state as it was when CUDA started, rebuilt from its seed.

    CUDA starts lazily (``pipe.to("cuda")`` inside the call); until then ``torch.manual_seed`` only
    queues the CUDA seed, and a default generator starts at that seed (or torch's fixed default)
    with offset 0, so its seed alone gives the state the call's first draw began from.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return []
    out = []
    for index, gen in enumerate(torch.cuda.default_generators):
        fresh = torch.Generator(device=f"cuda:{index}").manual_seed(gen.initial_seed())
        raw = fresh.get_state().numpy().tobytes()
        out.append({"index": index, "state_b64": _b64(raw), "sha256": _sha(raw), "consumed": False})
    return out


def mark_consumed(states: dict[str, Any], after: dict[str, Any]) -> None:
    """Set each ``consumed`` flag by comparing entry states with the digests taken at exit.

    When CUDA was not started at entry but is at exit, the call started it: the CUDA default
    generators' states at that moment are filled in (``started_in_call``), so a replay restores them.
    """
    cuda = states["torch_cuda"]
    if not cuda["available"] and after.get("torch_cuda_at_start"):
        cuda.update(available=True, reason=None, started_in_call=True,
                    devices=[dict(d) for d in after["torch_cuda_at_start"]])
    states["torch_cpu"]["consumed"] = states["torch_cpu"]["sha256"] != after["torch_cpu"]
    for device in states["torch_cuda"]["devices"]:
        device["consumed"] = device["sha256"] != after["torch_cuda"].get(device["index"])
    states["numpy"]["consumed"] = states["numpy"]["sha256"] != after["numpy"]
    states["python"]["consumed"] = states["python"]["sha256"] != after["python"]


def restore_global_rng(states: dict[str, Any]) -> None:
    """Put back the recorded global RNG states (replay child, right before the call)."""
    import torch

    cpu = bytearray(_unb64(states["torch_cpu"]["state_b64"]))
    torch.set_rng_state(torch.frombuffer(cpu, dtype=torch.uint8))
    cuda = states["torch_cuda"]
    if cuda["available"] and torch.cuda.is_available():
        for device in cuda["devices"]:
            raw = bytearray(_unb64(device["state_b64"]))
            torch.cuda.set_rng_state(torch.frombuffer(raw, dtype=torch.uint8), device["index"])
    if states["numpy"]["available"]:
        import numpy as np

        npst = states["numpy"]["state"]
        keys = np.frombuffer(_unb64(npst["key_b64"]), dtype="<u4").astype(np.uint32)
        np.random.set_state(
            (npst["bit_generator"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
        )
    import array

    py = states["python"]["state"]
    words = array.array("I")
    words.frombytes(_unb64(py["key_b64"]))
    if sys.byteorder != "little":
        words.byteswap()
    random.setstate((py["version"], tuple(words) + (py["pos"],), py["gauss_next"]))
