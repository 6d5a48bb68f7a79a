"""NVIDIA GPU identity through NVML (``pynvml`` from the nvidia-ml-py package).

NVML is used instead of ``torch.cuda`` because querying torch would initialise CUDA in
the user's process, which changes state their generation may depend on (the CUDA context,
memory pools, lazily loaded modules). torch is only read when the caller's code has
already initialised CUDA.

Init/shutdown policy: NVML reference-counts ``nvmlInit``/``nvmlShutdown`` (both in the C
library and in pynvml's ``_nvmlLib_refcount``), so each capture makes one balanced
init/shutdown pair. Keeping our own session open would be cheaper, but it would hold NVML
for the life of the process and could be torn down under us by a third party calling
``nvmlShutdown`` more often than it initialised; a balanced pair never disturbs anyone
else's session. Because the identity is cached per process, the pair runs only once.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

_NOT_INSTALLED = "pynvml is not installed (pip install nvidia-ml-py)"

# NVML error class name -> readable cause for the "NVML could not start" reason.
_START_FAILURES: dict[str, str] = {
    "NVMLError_LibraryNotFound": "no NVIDIA driver on this machine",
    "NVMLError_DriverNotLoaded": "the NVIDIA kernel driver is not loaded",
    "NVMLError_NoPermission": "no permission to use the NVIDIA driver",
    "NVMLError_LibRmVersionMismatch": "the NVML library and the kernel driver versions differ",
    "NVMLError_FunctionNotFound": "the NVML library is too old for pynvml",
}


def capture_gpu() -> dict[str, Any]:
    """Return the GPU section: driver, CUDA driver version and one entry per NVIDIA GPU.

    Never raises and never initialises CUDA. Without NVML the section says why, with
    ``available`` False.
    """
    section = copy.deepcopy(_static_gpu())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    torch_uuids: list[str | None] | None = None
    current: int | None = None
    if section["available"] and section["devices"]:
        try:
            torch_uuids, current = _fill_from_torch(section["devices"])
        except Exception as exc:  # torch is optional extra detail, never a failure
            log.debug("could not read device properties from torch: %r", exc)
    order = cuda_order(section["devices"], visible, os.environ.get("CUDA_DEVICE_ORDER"), torch_uuids)
    section["cuda_visible_devices"] = visible
    section["cuda_order"] = order
    used = order[current] if current is not None and current < len(order) else None
    section["used"] = [] if used is None else [used]
    return section


def cuda_order(devices: list[dict[str, Any]], visible: str | None, device_order: str | None,
               torch_uuids: list[str | None] | None = None) -> list[int | None]:
    """The NVML index of each CUDA device index (``cuda:k`` is NVML device ``order[k]``), None where
    it cannot be told.

    With torch's UUIDs (CUDA already started) the match is exact. Otherwise ``CUDA_VISIBLE_DEVICES``
    is read as CUDA reads it: UUIDs (or unique prefixes) name devices, integers are positions in
    CUDA's own enumeration, which is NVML's PCI order only under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
    or when all GPUs are the same model (then any of them has the same facts); enumeration stops at
    the first entry that names nothing.
    """
    by_key = {_uuid_key(d.get("uuid")): d["index"] for d in devices if _uuid_key(d.get("uuid"))}
    if torch_uuids is not None and all(torch_uuids):
        return [by_key.get(_uuid_key(u)) for u in torch_uuids]
    pci_order = device_order == "PCI_BUS_ID" or len({d.get("name") for d in devices}) <= 1
    positions = [d["index"] for d in devices]
    if visible is None:
        return [i if pci_order else None for i in positions]
    order: list[int | None] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit():
            if int(entry) >= len(positions):
                break
            order.append(positions[int(entry)] if pci_order else None)
            continue
        key = _uuid_key(entry)
        matches = [index for k, index in by_key.items() if key and k.startswith(key)]
        if len(matches) != 1 or not entry.lower().startswith(("gpu-", "mig-")):
            break
        order.append(matches[0])
    return order


def clear_cache() -> None:
    """Forget the cached NVML identity (for tests that swap the ``pynvml`` module)."""
    _static_gpu.cache_clear()


def _nvml() -> Any:
    """Import and return the ``pynvml`` module: the single seam tests replace."""
    import pynvml

    return pynvml


def _unavailable(reason: str) -> dict[str, Any]:
    return {
        "available": False,
        "reason": reason,
        "driver_version": None,
        "cuda_driver_version": None,
        "devices": [],
    }


def _text(value: Any) -> str:
    """pynvml returns bytes before 11.5 and str after; the manifest wants str."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _error_name(exc: BaseException) -> str:
    return type(exc).__name__


def _is_not_supported(exc: BaseException, nvml: Any) -> bool:
    code = getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", None)
    return _error_name(exc) == "NVMLError_NotSupported" or (
        code is not None and getattr(exc, "value", None) == code
    )


@functools.lru_cache(maxsize=1)
def _static_gpu() -> dict[str, Any]:
    """Driver and device identity, read once per process through NVML."""
    try:
        nvml = _nvml()
    except ImportError as exc:
        log.debug("pynvml import failed: %r", exc)
        return _unavailable(_NOT_INSTALLED)
    except Exception as exc:
        log.debug("pynvml import failed: %r", exc)
        return _unavailable(f"pynvml could not be imported ({_error_name(exc)})")

    try:
        nvml.nvmlInit()
    except Exception as exc:
        log.debug("nvmlInit failed: %r", exc)
        name = _error_name(exc)
        cause = _START_FAILURES.get(name) or str(exc) or "unknown error"
        return _unavailable(f"NVML could not start: {cause} ({name})")

    try:
        return _read_identity(nvml)
    except Exception as exc:
        log.debug("NVML query failed: %r", exc)
        return _unavailable(f"NVML query failed: {exc} ({_error_name(exc)})")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvmlShutdown failed: %r", exc)


def _read_identity(nvml: Any) -> dict[str, Any]:
    driver = _text(nvml.nvmlSystemGetDriverVersion())
    count = int(nvml.nvmlDeviceGetCount())
    devices = []
    for index in range(count):
        try:
            devices.append(_read_device(nvml, index))
        except Exception as exc:
            # One unreadable GPU (fallen off the bus, reset in progress) should not hide
            # the others; it is left out of the list.
            log.debug("could not read GPU %d: %r", index, exc)
    return {
        "available": True,
        "reason": None,
        "driver_version": driver,
        "cuda_driver_version": _cuda_driver_version(nvml),
        "devices": devices,
    }


def _cuda_driver_version(nvml: Any) -> str | None:
    """'12.4' from NVML's integer 12040; older pynvml only has the non-_v2 call."""
    getter = getattr(nvml, "nvmlSystemGetCudaDriverVersion_v2", None) or getattr(
        nvml, "nvmlSystemGetCudaDriverVersion", None
    )
    if getter is None:
        return None
    try:
        return _format_cuda_version(int(getter()))
    except Exception as exc:
        log.debug("CUDA driver version unavailable: %r", exc)
        return None


def _format_cuda_version(version: int) -> str:
    """Format NVML/CUDA's ``1000 * major + 10 * minor`` integer as "major.minor"."""
    return f"{version // 1000}.{(version % 1000) // 10}"


def _read_device(nvml: Any, index: int) -> dict[str, Any]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    return {
        "index": index,
        "name": _text(nvml.nvmlDeviceGetName(handle)),
        "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
        "compute_capability": f"{int(major)}.{int(minor)}",
        "sm_count": _sm_count(nvml, handle),
        "max_threads_per_sm": None,
        "memory_total_bytes": int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
        "mig_mode": _mig_mode(nvml, handle),
    }


def _sm_count(nvml: Any, handle: Any) -> int | None:
    # nvmlDeviceGetAttributes is documented for MIG devices; on full GPUs some drivers
    # answer NOT_SUPPORTED or 0, so anything but a positive count means "unknown".
    getter = getattr(nvml, "nvmlDeviceGetAttributes", None)
    if getter is None:
        return None
    try:
        count = int(getter(handle).multiprocessorCount)
    except Exception as exc:
        log.debug("nvmlDeviceGetAttributes unavailable: %r", exc)
        return None
    return count if count > 0 else None


def _mig_mode(nvml: Any, handle: Any) -> str:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except Exception as exc:
        if not _is_not_supported(exc, nvml):
            log.debug("nvmlDeviceGetMigMode failed: %r", exc)
        return "unsupported"
    enabled = getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1)
    return "enabled" if current == enabled else "disabled"


def _fill_from_torch(devices: list[dict[str, Any]]) -> tuple[list[str | None] | None, int | None]:
    """Add torch's SM facts, but only if the caller's code already initialised CUDA.

    Returns torch's device UUIDs in CUDA order and its current device, or (None, None).
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None, None
    cuda = getattr(torch, "cuda", None)
    if cuda is None or not cuda.is_initialized():
        return None, None
    props = []
    for index in range(cuda.device_count()):
        prop = cuda.get_device_properties(index)
        uuid = getattr(prop, "uuid", None)
        props.append(
            {
                "index": index,
                "uuid": None if uuid is None else str(uuid),
                "name": str(getattr(prop, "name", "")),
                "sm_count": getattr(prop, "multi_processor_count", None),
                "max_threads_per_sm": getattr(prop, "max_threads_per_multi_processor", None),
            }
        )
    _merge_torch_properties(devices, props, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return [p["uuid"] for p in props], int(cuda.current_device())


def _uuid_key(uuid: str | None) -> str | None:
    # NVML says "GPU-6f2a4e5c-...", torch's str(props.uuid) has no prefix; compare the
    # hex digits only so prefix, dashes and case cannot break a match.
    if not uuid:
        return None
    key = uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return "".join(ch for ch in key if ch in "0123456789abcdef") or None


def _merge_torch_properties(
    devices: list[dict[str, Any]],
    torch_props: list[dict[str, Any]],
    cuda_visible_devices: str | None,
) -> None:
    """Fill ``sm_count``/``max_threads_per_sm`` of NVML ``devices`` from torch's view.

    Devices are matched by UUID. Without UUIDs, torch's index is trusted only when it
    must equal NVML's: CUDA_VISIBLE_DEVICES unset, the same number of devices, and the
    same name at that index (CUDA orders devices fastest-first, NVML by PCI bus, so
    indices agree reliably only among identical GPUs, where the values agree anyway).
    """
    by_uuid = {_uuid_key(p.get("uuid")): p for p in torch_props if _uuid_key(p.get("uuid"))}
    index_ok = cuda_visible_devices is None and len(torch_props) == len(devices)
    for position, device in enumerate(devices):
        match = by_uuid.get(_uuid_key(device.get("uuid")))
        if match is None and not by_uuid and index_ok:
            candidate = torch_props[position]
            if candidate.get("name") == device.get("name"):
                match = candidate
        if match is None:
            continue
        for key in ("sm_count", "max_threads_per_sm"):
            value = match.get(key)
            if isinstance(value, int) and value > 0:
                device[key] = value


# A short child that starts CUDA where the caller must not: the replay parent, to learn this
# machine's SM counts from the CUDA runtime (NVML gives them for MIG slices only).
_PROBE = (
    "import json, torch\n"
    "out = []\n"
    "for i in range(torch.cuda.device_count()):\n"
    "    p = torch.cuda.get_device_properties(i)\n"
    "    u = getattr(p, 'uuid', None)\n"
    "    out.append({'index': i, 'uuid': None if u is None else str(u), 'name': str(p.name),\n"
    "                'sm_count': p.multi_processor_count,\n"
    "                'max_threads_per_sm': getattr(p, 'max_threads_per_multi_processor', None)})\n"
    "print(json.dumps(out))\n"
)
PROBE_TIMEOUT_S = 120.0


def probe_cuda_properties(env: dict[str, str] | None = None,
                          timeout: float = PROBE_TIMEOUT_S) -> list[dict[str, Any]] | None:
    """Each CUDA device's SM count and threads per SM, read by the CUDA runtime in a child process
    (so this process never starts CUDA); None when the probe fails, with the cause logged."""
    import json
    import subprocess

    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                              timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("CUDA property probe failed: %r", exc)
        return None
    if done.returncode != 0:
        log.debug("CUDA property probe exited %d: %s", done.returncode, done.stderr[-2000:])
        return None
    try:
        props = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        log.debug("CUDA property probe printed no JSON: %r", exc)
        return None
    return props if isinstance(props, list) else None


def with_cuda_properties(section: dict[str, Any], props: list[dict[str, Any]],
                         visible: str | None) -> dict[str, Any]:
    """A copy of a GPU section with SM facts and the CUDA order filled from probed properties."""
    section = copy.deepcopy(section)
    if not section.get("available"):
        return section
    _merge_torch_properties(section["devices"], props, visible)
    uuids = [p.get("uuid") for p in props]
    section["cuda_visible_devices"] = visible
    section["cuda_order"] = cuda_order(section["devices"], visible, None, uuids)
    return section
