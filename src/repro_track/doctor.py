"""``doctor``: judge this process's environment for reproducibility before anything is recorded.

Each check says what is set now, what exact reproduction needs, what the change costs, and the line
that makes it. Checks only read state.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Check:
    """One knob: current value, whether it is fine for exact reproduction, the cost and the fix."""

    name: str
    ok: bool
    current: str
    wanted: str
    cost: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def _check(name: str, ok: bool, current: Any, wanted: Any, cost: str, fix: str) -> Check:
    return Check(name, ok, str(current), str(wanted), cost, "" if ok else fix)


def checks() -> list[Check]:
    """Every check, in the order a person should fix them."""
    import torch

    from .capture.torch_state import determinism_knobs, torch_cpu_facts

    k = determinism_knobs()
    env = os.environ
    cuda_started = torch.cuda.is_initialized()
    return [
        _check("deterministic algorithms", k["deterministic_algorithms"] and not k["warn_only"],
               k["deterministic_algorithms"], True,
               "some GPU ops get slower; ops without a deterministic kernel raise an error",
               "torch.use_deterministic_algorithms(True)"),
        _check("cudnn.deterministic", k["cudnn_deterministic"], k["cudnn_deterministic"], True,
               "convolutions may be slower", "torch.backends.cudnn.deterministic = True"),
        _check("cudnn.benchmark", not k["cudnn_benchmark"], k["cudnn_benchmark"], False,
               "no autotuning of convolution algorithms (slower for fixed shapes)",
               "torch.backends.cudnn.benchmark = False"),
        _check("TF32 in matmuls", not k["matmul_allow_tf32"], k["matmul_allow_tf32"], False,
               "fp32 matmuls several times slower on Ampere and newer GPUs",
               "torch.backends.cuda.matmul.allow_tf32 = False"),
        _check("TF32 in cuDNN", not k["cudnn_allow_tf32"], k["cudnn_allow_tf32"], False,
               "fp32 convolutions slower on Ampere and newer GPUs",
               "torch.backends.cudnn.allow_tf32 = False"),
        _check("CUBLAS_WORKSPACE_CONFIG", env.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8"),
               env.get("CUBLAS_WORKSPACE_CONFIG", "unset"), ":4096:8",
               "about 24 MiB more GPU memory per stream",
               "export CUBLAS_WORKSPACE_CONFIG=:4096:8   # before Python starts"
               + ("; CUDA already started in this process, so it is too late here" if cuda_started else "")),
        _check("PYTHONHASHSEED", "PYTHONHASHSEED" in env, env.get("PYTHONHASHSEED", "unset"), "0",
               "none (hash randomisation only protects servers)",
               "export PYTHONHASHSEED=0   # set iteration order of str sets becomes stable"),
        *_cpu_portability_checks(env),
        Check("threads", True, f"{k['num_threads']} intra-op, {k['num_interop_threads']} inter-op",
              "recorded", "none: replay restores the recorded counts", ""),
        Check("CPU kernels", True, str(torch_cpu_facts()["torch_capability"]), "recorded",
              "none: replay pins ATEN_CPU_CAPABILITY where the CPU supports it", ""),
    ]


def _cpu_portability_checks(env: Any) -> list[Check]:
    """oneDNN, oneMKL and ATen each pick kernels by CPU model; these lines fix them for every x86 CPU
    with AVX2, so a CPU recording replays bit-exactly on another CPU model or vendor."""
    from .capture import cpu, static_facts
    from .rules import mkl_branch_fixed

    section = static_facts()[1]
    libs = cpu.library_isa(section, env)
    cap = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA")
    aten = env.get("ATEN_CPU_CAPABILITY")
    return [
        _check("oneDNN ISA cap", bool(cap),
               f"{libs['onednn_isa'] or 'no oneDNN'} ({'capped' if cap else 'not capped'})",
               "AVX2 (the same kernels on every x86 CPU with AVX2)",
               "CPU convolutions and bf16 matmuls may be slower on CPUs with AVX-512 or AMX",
               "export ONEDNN_MAX_CPU_ISA=AVX2   # before Python starts"),
        _check("MKL code branch", mkl_branch_fixed(env.get("MKL_CBWR"), section.get("vendor")),
               env.get("MKL_CBWR", "unset (chosen by CPU model)"), "COMPATIBLE",
               "MKL BLAS several times slower (SSE2 code)",
               "export MKL_CBWR=COMPATIBLE   # Intel and AMD alike; MKL_CBWR=AVX2 is faster but Intel-only"),
        _check("ATen CPU kernels cap",
               aten is not None or section.get("architecture") not in ("x86_64", "AMD64"),
               aten or f"{section.get('torch_capability')} (not capped)", "avx2",
               "vectorised CPU ops may be slower on CPUs with AVX-512",
               "export ATEN_CPU_CAPABILITY=avx2   # replays on CPUs without AVX-512 stay exact"),
    ]


def fix_lines(found: list[Check]) -> list[str]:
    """The Python and shell lines that turn on everything that is off."""
    return [c.fix for c in found if not c.ok and c.fix]
