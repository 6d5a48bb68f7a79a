"""Tests for repro_track.capture.gpu: NVML identity, failures that explain themselves, no CUDA init."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from repro_track.capture import gpu

NOT_SUPPORTED = 3
LIBRARY_NOT_FOUND = 12
MIG_ENABLE = 1


class FakeNVMLError(Exception):
    """Like pynvml.NVMLError: carries the NVML return code in ``value``."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


class NVMLError_NotSupported(FakeNVMLError):  # noqa: N801 - pynvml's own class name
    def __init__(self) -> None:
        super().__init__(NOT_SUPPORTED)


class NVMLError_LibraryNotFound(FakeNVMLError):  # noqa: N801 - pynvml's own class name
    def __init__(self) -> None:
        super().__init__(LIBRARY_NOT_FOUND)

    def __str__(self) -> str:
        return "NVML Shared Library Not Found"


@dataclass
class FakeGpu:
    """One GPU as the stand-in NVML reports it."""

    name: Any
    uuid: Any
    capability: tuple[int, int]
    memory: int
    mig: int | None  # None: NOT_SUPPORTED
    sm_count: int | None = None  # None: nvmlDeviceGetAttributes is NOT_SUPPORTED


@dataclass
class FakeNvml:
    """State behind a stand-in ``pynvml`` module, recording init/shutdown balance."""

    gpus: list[FakeGpu]
    driver: Any = "550.54.15"
    cuda_version: int = 12040
    init_error: Exception | None = None
    inits: int = 0
    shutdowns: int = 0
    calls: list[str] = field(default_factory=list)

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        mod.NVMLError = FakeNVMLError
        mod.NVMLError_NotSupported = NVMLError_NotSupported
        mod.NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
        mod.NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED
        mod.NVML_DEVICE_MIG_ENABLE = MIG_ENABLE

        def init() -> None:
            self.calls.append("nvmlInit")
            if self.init_error is not None:
                raise self.init_error
            self.inits += 1

        def shutdown() -> None:
            self.calls.append("nvmlShutdown")
            self.shutdowns += 1

        def handle(index: int) -> FakeGpu:
            return self.gpus[index]

        def mig(dev: FakeGpu) -> list[int]:
            if dev.mig is None:
                raise NVMLError_NotSupported()
            return [dev.mig, dev.mig]

        def attributes(dev: FakeGpu) -> Any:
            if dev.sm_count is None:
                raise NVMLError_NotSupported()
            return types.SimpleNamespace(multiprocessorCount=dev.sm_count)

        mod.nvmlInit = init
        mod.nvmlShutdown = shutdown
        mod.nvmlSystemGetDriverVersion = lambda: self.driver
        mod.nvmlSystemGetCudaDriverVersion_v2 = lambda: self.cuda_version
        mod.nvmlDeviceGetCount = lambda: len(self.gpus)
        mod.nvmlDeviceGetHandleByIndex = handle
        mod.nvmlDeviceGetName = lambda dev: dev.name
        mod.nvmlDeviceGetUUID = lambda dev: dev.uuid
        mod.nvmlDeviceGetCudaComputeCapability = lambda dev: dev.capability
        mod.nvmlDeviceGetMemoryInfo = lambda dev: types.SimpleNamespace(total=dev.memory, free=0, used=0)
        mod.nvmlDeviceGetMigMode = mig
        mod.nvmlDeviceGetAttributes = attributes
        return mod


H100_UUID = "GPU-6f2a4e5c-1111-2222-3333-444455556666"
A100_UUID = "GPU-0a0b0c0d-aaaa-bbbb-cccc-ddddeeeeffff"


def two_gpu_machine() -> FakeNvml:
    return FakeNvml(
        gpus=[
            # Older pynvml returned bytes; the section must still hold str.
            FakeGpu(b"NVIDIA H100 80GB HBM3", H100_UUID.encode(), (9, 0), 85_520_809_984, mig=0),
            FakeGpu("NVIDIA A100-SXM4-40GB", A100_UUID, (8, 0), 42_949_672_960, mig=MIG_ENABLE, sm_count=108),
        ],
        driver=b"550.54.15",
    )


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Put a stand-in pynvml into sys.modules (the only seam) with a cold cache."""

    def _install(fake: FakeNvml) -> FakeNvml:
        monkeypatch.setitem(sys.modules, "pynvml", fake.module())
        gpu.clear_cache()
        return fake

    gpu.clear_cache()
    yield _install
    gpu.clear_cache()


class TestTwoGpuMachine:
    """A machine with two different GPUs is described device by device."""

    def test_section(self, install: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
        install(two_gpu_machine())
        section = gpu.capture_gpu()
        assert section == {
            "available": True,
            "reason": None,
            "driver_version": "550.54.15",
            "cuda_driver_version": "12.4",
            "devices": [
                {"index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": H100_UUID, "compute_capability": "9.0",
                 "sm_count": None, "max_threads_per_sm": None, "memory_total_bytes": 85_520_809_984,
                 "mig_mode": "disabled"},
                {"index": 1, "name": "NVIDIA A100-SXM4-40GB", "uuid": A100_UUID, "compute_capability": "8.0",
                 "sm_count": 108, "max_threads_per_sm": None, "memory_total_bytes": 42_949_672_960,
                 "mig_mode": "enabled"},
            ],
            # Two models and CUDA's default fastest-first order: which NVML device is cuda:0 is unknown
            # until CUDA starts (then torch's UUIDs tell).
            "cuda_visible_devices": None,
            "cuda_order": [None, None],
            "used": [],
        }
        json.dumps(section)

    def test_mig_not_supported(self, install: Any) -> None:
        fake = two_gpu_machine()
        fake.gpus[0].mig = None
        install(fake)
        assert gpu.capture_gpu()["devices"][0]["mig_mode"] == "unsupported"

    def test_init_and_shutdown_are_balanced_and_cached(self, install: Any) -> None:
        fake = install(two_gpu_machine())
        first = gpu.capture_gpu()
        second = gpu.capture_gpu()
        assert first == second
        assert (fake.inits, fake.shutdowns) == (1, 1)

    def test_callers_cannot_mutate_the_cache(self, install: Any) -> None:
        install(two_gpu_machine())
        gpu.capture_gpu()["devices"][0]["name"] = "changed"
        assert gpu.capture_gpu()["devices"][0]["name"] == "NVIDIA H100 80GB HBM3"

    def test_unreadable_device_is_left_out(self, install: Any) -> None:
        fake = two_gpu_machine()
        fake.gpus[0].capability = None  # type: ignore[assignment]  # unpacking fails
        install(fake)
        section = gpu.capture_gpu()
        assert section["available"] is True
        assert [d["uuid"] for d in section["devices"]] == [A100_UUID]
        assert fake.shutdowns == fake.inits == 1

    def test_query_failure_explains_itself_and_shuts_down(self, install: Any) -> None:
        fake = two_gpu_machine()
        install(fake)

        def lost() -> int:
            raise FakeNVMLError(15)

        sys.modules["pynvml"].nvmlDeviceGetCount = lost
        section = gpu.capture_gpu()
        assert section["available"] is False
        assert section["reason"].startswith("NVML query failed")
        assert fake.shutdowns == fake.inits == 1


class TestStartFailures:
    """Without a usable NVML the section says why instead of raising."""

    def test_library_not_found(self, install: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        fake = install(FakeNvml(gpus=[], init_error=NVMLError_LibraryNotFound()))
        section = gpu.capture_gpu()
        assert section == {
            "available": False,
            "reason": "NVML could not start: no NVIDIA driver on this machine (NVMLError_LibraryNotFound)",
            "driver_version": None,
            "cuda_driver_version": None,
            "devices": [],
            "cuda_visible_devices": None,
            "cuda_order": [],
            "used": [],
        }
        assert fake.calls == ["nvmlInit"]  # no shutdown without a successful init

    def test_pynvml_missing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        gpu.clear_cache()
        monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
        try:
            section = gpu.capture_gpu()
        finally:
            gpu.clear_cache()
        assert section["available"] is False
        assert section["reason"] == "pynvml is not installed (pip install nvidia-ml-py)"
        assert section["devices"] == []

    def test_real_pynvml_on_this_machine(self) -> None:
        pynvml = pytest.importorskip("pynvml")
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            pass
        else:
            pynvml.nvmlShutdown()
            pytest.skip("this machine has an NVIDIA driver")
        gpu.clear_cache()
        section = gpu.capture_gpu()
        gpu.clear_cache()
        assert section["available"] is False
        assert "driver" in section["reason"]
        assert section["devices"] == []


class TestCudaVersionFormat:
    """NVML's integer CUDA version is written as major.minor."""

    @pytest.mark.parametrize(("value", "text"), [(12040, "12.4"), (11080, "11.8"), (12000, "12.0"), (13010, "13.1")])
    def test_format(self, value: int, text: str) -> None:
        assert gpu._format_cuda_version(value) == text


def _device(uuid: str, name: str = "NVIDIA H100", sm: int | None = None) -> dict[str, Any]:
    return {"index": 0, "name": name, "uuid": uuid, "compute_capability": "9.0", "sm_count": sm,
            "max_threads_per_sm": None, "memory_total_bytes": 1, "mig_mode": "disabled"}


class TestMergeTorchProperties:
    """torch's SM facts land on the right NVML device, or nowhere when the match is unsure."""

    def test_matches_by_uuid_regardless_of_order(self) -> None:
        devices = [_device(H100_UUID), _device(A100_UUID)]
        props = [
            {"index": 0, "uuid": A100_UUID[4:].upper(), "name": "NVIDIA H100", "sm_count": 132,
             "max_threads_per_sm": 2048},
            {"index": 1, "uuid": H100_UUID[4:], "name": "NVIDIA H100", "sm_count": 114, "max_threads_per_sm": 1536},
        ]
        gpu._merge_torch_properties(devices, props, cuda_visible_devices="1,0")
        assert [(d["sm_count"], d["max_threads_per_sm"]) for d in devices] == [(114, 1536), (132, 2048)]

    @pytest.mark.parametrize(
        ("visible", "torch_name", "expected"),
        [(None, "NVIDIA H100", 132), ("0", "NVIDIA H100", None), (None, "NVIDIA A100", None)],
    )
    def test_index_fallback_only_when_safe(self, visible: str | None, torch_name: str, expected: int | None) -> None:
        devices = [_device(H100_UUID)]
        props = [{"index": 0, "uuid": None, "name": torch_name, "sm_count": 132, "max_threads_per_sm": 2048}]
        gpu._merge_torch_properties(devices, props, cuda_visible_devices=visible)
        assert devices[0]["sm_count"] == expected

    def test_nonpositive_values_are_ignored(self) -> None:
        devices = [_device(H100_UUID, sm=100)]
        props = [{"index": 0, "uuid": H100_UUID[4:], "name": "NVIDIA H100", "sm_count": 0, "max_threads_per_sm": None}]
        gpu._merge_torch_properties(devices, props, cuda_visible_devices=None)
        assert devices[0]["sm_count"] == 100


class TestNeverInitialisesCuda:
    """Capturing reads torch only when CUDA is already initialised, and never imports it."""

    def test_torch_not_imported(self) -> None:
        code = (
            "import sys; from repro_track.capture import gpu; gpu.capture_gpu(); "
            "print('torch' in sys.modules)"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                timeout=60)
        assert result.stdout.strip() == "False"

    def test_uninitialised_cuda_is_left_alone(self, install: Any) -> None:
        torch = pytest.importorskip("torch")
        install(two_gpu_machine())
        was_initialised = torch.cuda.is_initialized()
        section = gpu.capture_gpu()
        assert torch.cuda.is_initialized() == was_initialised
        if not was_initialised:
            assert section["devices"][0]["sm_count"] is None
