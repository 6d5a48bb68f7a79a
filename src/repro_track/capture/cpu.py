"""CPU identity and the instruction-set facts that decide which numeric kernels run.

Two machines with the same software can still produce different bits on CPU because
ATen, oneDNN and MKL each pick kernels at run time from the instruction sets the CPU
offers. This module records those instruction sets and maps ATen's capability level to
the environment variables that pin each library to one level on replay.

What the pinning variables do (looked up in the upstream sources and docs, and checked
on an AMD EPYC (Zen 4, AVX-512) with torch 2.13.0+cpu, MKL 2024.2, oneDNN 3.12):

* ``ATEN_CPU_CAPABILITY`` is read once, at the first dispatch, by
  ``at::native::compute_cpu_capability`` (aten/src/ATen/native/DispatchStub.cpp). The
  value is compared case-sensitively with "default", "avx2", "avx512" (x86),
  "sve256" (aarch64), "vsx" (ppc64le), "zvector" (s390x); anything else is ignored with
  a warning. On x86 the requested level is NOT checked against the hardware, so forcing a
  level the CPU lacks crashes with SIGILL; hence :func:`supports_capability`. On aarch64
  "sve256" falls back to DEFAULT with a warning unless the SVE vector length is 256 bits
  and BF16 is present. Checked here: it changes softmax, exp, tanh, sum, matmul and conv
  bits between DEFAULT, AVX2 and AVX512.
* ``ONEDNN_MAX_CPU_ISA`` (legacy name ``DNNL_MAX_CPU_ISA``, also honoured) caps the ISA
  oneDNN's JIT may generate code for ("SSE41" < "AVX" < "AVX2" < "AVX512_CORE" < ...).
  It is read before the first JIT kernel and ignored afterwards. Checked here: torch's
  oneDNN paths (larger fp32 convolutions, bf16 matmul) give different bits under
  AVX512_CORE, AVX2 and SSE41; small fp32 ops do not touch oneDNN at all.
* ``MKL_ENABLE_INSTRUCTIONS`` caps the ISA oneMKL dispatches to ("SSE4_2", "AVX2",
  "AVX512", ...). Intel documents it as not available on non-Intel processors; checked
  here on AMD it indeed changes nothing.
* ``MKL_CBWR`` (Conditional Numerical Reproducibility) is the MKL knob that matters for
  bit-exactness: it fixes the code branch, cache-size assumptions and reduction order, and
  must be set before the first MKL call. Only "AUTO" and "COMPATIBLE" (SSE2 without the
  approximate rcpps/rsqrtps) are honoured on non-Intel CPUs; an unsupported branch silently
  falls back to AUTO. Results are reproducible only with a fixed thread count. Checked
  here on AMD: MKL_CBWR=COMPATIBLE changes torch's fp32 matmul and convolution bits
  (MKL_VERBOSE reports "CNR:COMPATIBLE"), so it must be recorded and replayed alongside
  the thread counts; it is in the env-var allow-list.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess
import sys
from typing import Any

log = logging.getLogger(__name__)

# The flags whose presence changes which numeric kernels a library may pick; the rest of
# /proc/cpuinfo (virtualisation, security mitigations, ...) does not affect results.
RELEVANT_ISA_FLAGS: frozenset[str] = frozenset(
    {
        "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c",
        "avx512f", "avx512bw", "avx512vl", "avx512dq",
        "avx512_vnni", "avx512_bf16", "avx512_fp16",
        "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
        "asimd", "sve", "sve2", "neon",
    }
)

_SYSCTL_TIMEOUT_S = 2.0

# Arm "CPU implementer" codes (Linux arch/arm64 cputype.h); only for a readable vendor.
_ARM_IMPLEMENTERS: dict[str, str] = {
    "0x41": "ARM",
    "0x42": "Broadcom",
    "0x43": "Cavium",
    "0x46": "Fujitsu",
    "0x48": "HiSilicon",
    "0x4e": "NVIDIA",
    "0x50": "APM",
    "0x51": "Qualcomm",
    "0x61": "Apple",
    "0x6d": "Microsoft",
    "0xc0": "Ampere",
}

# (implementer, part) of common server/desktop cores, so aarch64 gets a model name too.
_ARM_PARTS: dict[tuple[str, str], str] = {
    ("0x41", "0xd0c"): "Neoverse-N1",
    ("0x41", "0xd40"): "Neoverse-V1",
    ("0x41", "0xd49"): "Neoverse-N2",
    ("0x41", "0xd4f"): "Neoverse-V2",
    ("0x41", "0xd8e"): "Neoverse-N3",
    ("0x41", "0xd84"): "Neoverse-V3",
    ("0x41", "0xd08"): "Cortex-A72",
    ("0x41", "0xd0b"): "Cortex-A76",
    ("0xc0", "0xac3"): "AmpereOne",
}

# macOS sysctl feature spellings -> the Linux flag names used in RELEVANT_ISA_FLAGS.
_MACOS_X86_FLAGS: dict[str, str] = {
    "SSE4.1": "sse4_1",
    "SSE4.2": "sse4_2",
    "AVX1.0": "avx",
    "AVX2": "avx2",
    "FMA": "fma",
    "F16C": "f16c",
    "AVX512F": "avx512f",
    "AVX512BW": "avx512bw",
    "AVX512VL": "avx512vl",
    "AVX512DQ": "avx512dq",
    "AVX512VNNI": "avx512_vnni",
}
_MACOS_ARM_FLAGS: dict[str, str] = {
    "hw.optional.neon": "neon",
    "hw.optional.AdvSIMD": "asimd",
    "hw.optional.arm.FEAT_SVE": "sve",
    "hw.optional.arm.FEAT_SVE2": "sve2",
}

# Canonical ATen capability -> (flags the CPU must have, ATEN_CPU_CAPABILITY value,
# ONEDNN_MAX_CPU_ISA value, MKL_ENABLE_INSTRUCTIONS value). AVX512 also needs avx2+fma:
# ATen's own AVX512 check includes FMA3, and kernels without an AVX512 variant fall back
# to the AVX2 ones. VSX and ZVECTOR have no flags in RELEVANT_ISA_FLAGS, so support can't
# be shown from a flag list; SVE256 also needs a 256-bit vector length and BF16, which
# flags do not show, so "sve" is only the necessary part (ATen falls back to DEFAULT
# with a warning, it does not crash).
_CAPABILITIES: dict[str, tuple[frozenset[str] | None, str, str | None, str | None]] = {
    "DEFAULT": (frozenset(), "default", "SSE41", "SSE4_2"),
    "AVX": (frozenset({"avx"}), "avx", None, None),
    "AVX2": (frozenset({"avx2", "fma"}), "avx2", "AVX2", "AVX2"),
    "AVX512": (
        frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma"}),
        "avx512",
        "AVX512_CORE",
        "AVX512",
    ),
    "SVE256": (frozenset({"sve"}), "sve256", None, None),
    "VSX": (None, "vsx", None, None),
    "ZVECTOR": (None, "zvector", None, None),
}
# torch.backends.cpu.get_cpu_capability() spellings that differ from the enum name once
# upper-cased and stripped of spaces: older x86 builds reported DEFAULT as "NO AVX"
# (s390x's "Z VECTOR" needs no alias).
_ALIASES: dict[str, str] = {"NOAVX": "DEFAULT"}


def capture_cpu() -> dict[str, Any]:
    """Return the CPU section: model, vendor, architecture, core counts and ISA flags.

    Never raises; facts that cannot be read are ``None`` (or an empty flag list).
    """
    static = _static_cpu()
    return {
        "model": static["model"],
        "vendor": static["vendor"],
        "architecture": static["architecture"],
        "logical_cores": static["logical_cores"],
        # Affinity can be changed while the process runs (taskset, cgroups), so it is
        # read on every call rather than cached with the hardware identity.
        "usable_cores": _usable_cores(),
        "isa_flags": list(static["isa_flags"]),
    }


def clear_cache() -> None:
    """Forget the cached CPU identity (for tests)."""
    _static_cpu.cache_clear()


def supports_capability(capability: str, isa_flags: list[str]) -> bool:
    """Whether a CPU with ``isa_flags`` can run ATen's ``capability`` level.

    ``capability`` is spelled as ``torch.backends.cpu.get_cpu_capability()`` returns it,
    case-insensitively. DEFAULT is always supported; unknown levels, and levels that a
    flag list cannot vouch for (VSX, ZVECTOR), are not.
    """
    entry = _CAPABILITIES.get(_canonical(capability))
    if entry is None or entry[0] is None:
        return False
    flags = {flag.lower() for flag in isa_flags}
    return entry[0] <= flags


def aten_capability_env_value(capability: str) -> str | None:
    """The ``ATEN_CPU_CAPABILITY`` value that pins ATen to ``capability``, or None."""
    entry = _CAPABILITIES.get(_canonical(capability))
    return entry[1] if entry else None


def likely_capability(isa_flags: list[str], architecture: str) -> str | None:
    """The ATen level torch most likely picks on an x86 CPU with ``isa_flags`` (the best of AVX512,
    AVX2, DEFAULT it supports), without importing torch; None elsewhere. A guess: only for choices
    that are checked later against the real value."""
    if architecture.lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return None
    return next(level for level in ("AVX512", "AVX2", "DEFAULT")
                if supports_capability(level, isa_flags))


def onednn_max_isa_for(capability: str) -> str | None:
    """The ``ONEDNN_MAX_CPU_ISA`` value capping oneDNN at ``capability``'s level, or None."""
    entry = _CAPABILITIES.get(_canonical(capability))
    return entry[2] if entry else None


def mkl_instructions_for(capability: str) -> str | None:
    """The ``MKL_ENABLE_INSTRUCTIONS`` value capping oneMKL at ``capability``, or None.

    oneMKL honours it on Intel CPUs only.
    """
    entry = _CAPABILITIES.get(_canonical(capability))
    return entry[3] if entry else None


# oneDNN's x86 ISA levels, best first: (ONEDNN_MAX_CPU_ISA spelling, CPU flags it needs). oneDNN picks
# the best level the CPU offers (src/cpu/x64/cpu_isa_traits.hpp, mayiuse) unless the variable caps it;
# checked here: the verbose "isa:" line on an AVX-512 + BF16 EPYC names AVX512_CORE_BF16 uncapped,
# and AVX2 under ONEDNN_MAX_CPU_ISA=AVX2.
_AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
_ONEDNN_LEVELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("AVX512_CORE_AMX_FP16", _AVX512_CORE | {"amx_tile", "amx_bf16", "amx_int8", "amx_fp16"}),
    ("AVX512_CORE_AMX", _AVX512_CORE | {"amx_tile", "amx_bf16", "amx_int8"}),
    ("AVX512_CORE_FP16", _AVX512_CORE | {"avx512_fp16", "avx512_bf16", "avx512_vnni"}),
    ("AVX512_CORE_BF16", _AVX512_CORE | {"avx512_bf16", "avx512_vnni"}),
    ("AVX512_CORE_VNNI", _AVX512_CORE | {"avx512_vnni"}),
    ("AVX512_CORE", _AVX512_CORE),
    ("AVX2_VNNI", frozenset({"avx2", "fma", "avx_vnni"})),
    ("AVX2", frozenset({"avx2", "fma"})),
    ("AVX", frozenset({"avx"})),
    ("SSE41", frozenset({"sse4_1"})),
)
# oneMKL's dispatch levels on Intel CPUs, best first (MKL_ENABLE_INSTRUCTIONS spellings).
_MKL_LEVELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("AVX512", _AVX512_CORE),
    ("AVX2", frozenset({"avx2", "fma"})),
    ("AVX", frozenset({"avx"})),
    ("SSE4_2", frozenset({"sse4_2"})),
)


def library_isa(cpu_section: dict[str, Any], env: Any = None) -> dict[str, Any]:
    """The instruction sets oneDNN and oneMKL use on this CPU under ``env`` (default: os.environ).

    ``onednn_isa``/``mkl_isa`` are the levels in effect (the best the CPU's flags offer, capped by
    ``ONEDNN_MAX_CPU_ISA``/``DNNL_MAX_CPU_ISA`` and ``MKL_ENABLE_INSTRUCTIONS``); ``mkl_isa`` is None
    off Intel, where oneMKL ignores the cap and picks its own code path by CPU model. ``mkl_cbwr`` is
    ``MKL_CBWR``, MKL's fixed code branch. A level is None when the library is not in this torch build
    or the architecture is not x86.
    """
    env = os.environ if env is None else env
    flags = {flag.lower() for flag in cpu_section.get("isa_flags") or []}
    x86 = str(cpu_section.get("architecture") or "").lower() in ("x86_64", "amd64", "i686", "x86")
    onednn_cap = env.get("ONEDNN_MAX_CPU_ISA") or env.get("DNNL_MAX_CPU_ISA") or None
    mkl_cap = env.get("MKL_ENABLE_INSTRUCTIONS") or None
    intel = cpu_section.get("vendor") == "GenuineIntel"
    onednn = _capped(_ONEDNN_LEVELS, flags, onednn_cap) if x86 and cpu_section.get("onednn_version") else None
    mkl = _capped(_MKL_LEVELS, flags, mkl_cap) if x86 and intel and cpu_section.get("mkl_version") else None
    return {"onednn_isa": onednn, "onednn_isa_cap": onednn_cap, "mkl_isa": mkl,
            "mkl_enable_instructions": mkl_cap, "mkl_cbwr": env.get("MKL_CBWR") or None}


def _capped(levels: tuple[tuple[str, frozenset[str]], ...], flags: set[str], cap: str | None) -> str:
    """The best level whose flags are all present, at or below ``cap`` (an unknown cap is ignored,
    as the libraries ignore it)."""
    names = [name for name, _ in levels]
    key = (cap or "").strip().upper()
    # "ALL", or a level newer than the table (AVX10_1_512, ...): the best the CPU offers applies.
    start = names.index(key) if key in names else 0
    for name, needed in levels[start:]:
        if needed <= flags:
            return name
    return "DEFAULT"


def _canonical(capability: str) -> str:
    key = "".join(ch for ch in str(capability).upper() if ch.isalnum())
    return _ALIASES.get(key, key)


@functools.lru_cache(maxsize=1)
def _static_cpu() -> dict[str, Any]:
    """The parts of the CPU section that cannot change while the process runs."""
    model: str | None = None
    vendor: str | None = None
    flags: list[str] = []
    try:
        if sys.platform.startswith("linux"):
            model, vendor, flags = _from_linux()
        elif sys.platform == "darwin":
            model, vendor, flags = _from_macos()
        else:
            model = platform.processor() or None
    except Exception as exc:  # a probe must never break the caller's generation
        log.debug("could not read the CPU description: %r", exc)
    return {
        "model": model,
        "vendor": vendor,
        "architecture": platform.machine(),
        "logical_cores": os.cpu_count(),
        "isa_flags": tuple(flags),
    }


def _usable_cores() -> int | None:
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is None:
        return None
    try:
        return len(getaffinity(0)) or None
    except OSError as exc:
        log.debug("sched_getaffinity failed: %r", exc)
        return None


def _from_linux() -> tuple[str | None, str | None, list[str]]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError as exc:
        log.debug("could not read /proc/cpuinfo: %r", exc)
        return None, None, []
    return _parse_proc_cpuinfo(text)


def _parse_proc_cpuinfo(text: str) -> tuple[str | None, str | None, list[str]]:
    """(model, vendor, relevant ISA flags) from the text of Linux's /proc/cpuinfo.

    Only the first processor block is read: heterogeneous cores share one ISA as far as
    the kernel reports it.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    # x86 uses "flags"; aarch64 and 32-bit ARM use "Features".
    raw_flags = fields.get("flags") or fields.get("features") or ""
    flags = sorted(RELEVANT_ISA_FLAGS.intersection(raw_flags.lower().split()))

    vendor = fields.get("vendor_id") or None
    model = fields.get("model name") or None
    implementer = fields.get("cpu implementer", "").lower() or None
    if implementer is not None:
        vendor = vendor or _ARM_IMPLEMENTERS.get(implementer, implementer)
        part = fields.get("cpu part", "").lower() or None
        if model is None and part is not None:
            model = _ARM_PARTS.get((implementer, part), f"{vendor} part {part}")
    return model, vendor, flags


def _from_macos() -> tuple[str | None, str | None, list[str]]:
    output = _sysctl(
        "machdep.cpu.brand_string",
        "machdep.cpu.vendor",
        "machdep.cpu.features",
        "machdep.cpu.leaf7_features",
        *_MACOS_ARM_FLAGS,
    )
    return _parse_macos_sysctl(output)


def _sysctl(*names: str) -> dict[str, str]:
    """Run ``sysctl`` once for all names; a name the kernel lacks is simply absent."""
    try:
        completed = subprocess.run(
            ["sysctl", *names],
            capture_output=True,
            text=True,
            timeout=_SYSCTL_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("sysctl failed: %r", exc)
        return {}
    values: dict[str, str] = {}
    for line in completed.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    return values


def _parse_macos_sysctl(values: dict[str, str]) -> tuple[str | None, str | None, list[str]]:
    """(model, vendor, relevant ISA flags) from ``sysctl`` name/value pairs on macOS."""
    model = values.get("machdep.cpu.brand_string") or None
    vendor = values.get("machdep.cpu.vendor") or None
    if vendor is None and model is not None and model.startswith("Apple"):
        vendor = "Apple"
    flags: set[str] = set()
    for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
        for word in values.get(key, "").split():
            mapped = _MACOS_X86_FLAGS.get(word.upper())
            if mapped:
                flags.add(mapped)
    for key, flag in _MACOS_ARM_FLAGS.items():
        if values.get(key, "0").strip() == "1":
            flags.add(flag)
    return model, vendor, sorted(flags)
