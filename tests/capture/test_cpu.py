"""Tests for repro_track.capture.cpu: CPU identity, ISA flags and ATen capability pinning."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from repro_track.capture import cpu

X86_CPUINFO = textwrap.dedent(
    """\
    processor\t: 0
    vendor_id\t: GenuineIntel
    model name\t: Intel(R) Xeon(R) Platinum 8480+
    flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 amx_tile amx_bf16 amx_int8 hypervisor

    processor\t: 1
    vendor_id\t: SomethingElse
    model name\t: second block is ignored
    flags\t\t: fpu
    """
)

AARCH64_CPUINFO = textwrap.dedent(
    """\
    processor\t: 0
    BogoMIPS\t: 2100.00
    Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp sve sve2 svebf16 bf16 i8mm
    CPU implementer\t: 0x41
    CPU architecture: 8
    CPU variant\t: 0x0
    CPU part\t: 0xd4f
    CPU revision\t: 1
    """
)


class TestParseProcCpuinfo:
    """/proc/cpuinfo text becomes model, vendor and only the numerically relevant flags."""

    def test_x86_first_block(self) -> None:
        model, vendor, flags = cpu._parse_proc_cpuinfo(X86_CPUINFO)
        assert model == "Intel(R) Xeon(R) Platinum 8480+"
        assert vendor == "GenuineIntel"
        assert flags == sorted(
            ["fma", "sse4_1", "sse4_2", "avx", "f16c", "avx2", "avx512f", "avx512dq", "avx512bw",
             "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"]
        )

    def test_aarch64_features_and_implementer(self) -> None:
        model, vendor, flags = cpu._parse_proc_cpuinfo(AARCH64_CPUINFO)
        assert (model, vendor, flags) == ("Neoverse-V2", "ARM", ["asimd", "sve", "sve2"])

    def test_unknown_arm_part_keeps_the_codes(self) -> None:
        text = "processor : 0\nFeatures : fp asimd\nCPU implementer : 0x99\nCPU part : 0x123\n"
        assert cpu._parse_proc_cpuinfo(text) == ("0x99 part 0x123", "0x99", ["asimd"])

    @pytest.mark.parametrize("text", ["", "garbage without colons\n", "processor : 0\n"])
    def test_missing_fields_are_none(self, text: str) -> None:
        assert cpu._parse_proc_cpuinfo(text) == (None, None, [])


class TestParseMacosSysctl:
    """sysctl output on Intel and Apple-silicon Macs maps to the Linux flag names."""

    def test_intel_mac(self) -> None:
        values = {
            "machdep.cpu.brand_string": "Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz",
            "machdep.cpu.vendor": "GenuineIntel",
            "machdep.cpu.features": "FPU SSE SSE2 SSE3 SSE4.1 SSE4.2 AVX1.0 FMA F16C",
            "machdep.cpu.leaf7_features": "SMEP AVX2 BMI2",
        }
        assert cpu._parse_macos_sysctl(values) == (
            "Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz",
            "GenuineIntel",
            ["avx", "avx2", "f16c", "fma", "sse4_1", "sse4_2"],
        )

    def test_apple_silicon(self) -> None:
        values = {"machdep.cpu.brand_string": "Apple M2", "hw.optional.neon": "1",
                  "hw.optional.AdvSIMD": "1", "hw.optional.arm.FEAT_SVE": "0"}
        assert cpu._parse_macos_sysctl(values) == ("Apple M2", "Apple", ["asimd", "neon"])


class TestCaptureCpu:
    """The live section has the documented shape, matches this machine and is cached safely."""

    def test_shape_and_values(self) -> None:
        section = cpu.capture_cpu()
        assert set(section) == {"model", "vendor", "architecture", "logical_cores", "usable_cores", "isa_flags"}
        assert section["architecture"] == platform.machine()
        assert section["logical_cores"] == os.cpu_count()
        if hasattr(os, "sched_getaffinity"):
            assert section["usable_cores"] == len(os.sched_getaffinity(0))
        assert section["isa_flags"] == sorted(section["isa_flags"])
        assert set(section["isa_flags"]) <= cpu.RELEVANT_ISA_FLAGS
        json.dumps(section)

    @pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="Linux /proc only")
    def test_flags_agree_with_proc_cpuinfo(self) -> None:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            expected = cpu._parse_proc_cpuinfo(handle.read())[2]
        assert cpu.capture_cpu()["isa_flags"] == expected

    def test_callers_cannot_mutate_the_cache(self) -> None:
        first = cpu.capture_cpu()
        first["isa_flags"].append("made_up")
        first["model"] = "changed"
        second = cpu.capture_cpu()
        assert "made_up" not in second["isa_flags"]
        assert second["model"] != "changed"

    def test_identity_is_read_once(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cpu.clear_cache()
        calls: list[int] = []
        real = cpu._from_linux
        monkeypatch.setattr(cpu, "_from_linux", lambda: calls.append(1) or real())
        monkeypatch.setattr(cpu, "_from_macos", lambda: calls.append(1) or (None, None, []))
        cpu.capture_cpu()
        cpu.capture_cpu()
        cpu.clear_cache()
        assert len(calls) == (1 if sys.platform.startswith(("linux", "darwin")) else 0)

    def test_usable_cores_follows_affinity_changes(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
        assert cpu.capture_cpu()["usable_cores"] == 1

    def test_unreadable_description_does_not_raise(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def boom() -> None:
            raise RuntimeError("no /proc")

        cpu.clear_cache()
        monkeypatch.setattr(cpu, "_from_linux", boom)
        monkeypatch.setattr(cpu, "_from_macos", boom)
        try:
            section = cpu.capture_cpu()
        finally:
            cpu.clear_cache()
        if sys.platform.startswith(("linux", "darwin")):
            assert (section["model"], section["vendor"], section["isa_flags"]) == (None, None, [])


AVX512_FLAGS = ["avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"]


class TestSupportsCapability:
    """A capability is supported only when every flag ATen relies on for it is present."""

    @pytest.mark.parametrize(
        ("capability", "flags", "expected"),
        [
            ("DEFAULT", [], True),
            ("default", ["sse4_2"], True),
            ("NO AVX", [], True),
            ("AVX2", ["avx", "avx2", "fma"], True),
            ("avx2", ["avx2"], False),
            ("AVX2", ["fma"], False),
            ("AVX512", AVX512_FLAGS, True),
            ("AVX512", [f for f in AVX512_FLAGS if f != "avx512dq"], False),
            ("AVX512", [f for f in AVX512_FLAGS if f != "avx512vl"], False),
            ("AVX512", ["avx2", "fma"], False),
            ("SVE256", ["asimd", "sve"], True),
            ("SVE256", ["asimd"], False),
            ("VSX", AVX512_FLAGS, False),
            ("Z VECTOR", [], False),
            ("AMX", AVX512_FLAGS + ["amx_tile"], False),
            ("", [], False),
        ],
    )
    def test_table(self, capability: str, flags: list[str], expected: bool) -> None:
        assert cpu.supports_capability(capability, flags) is expected

    def test_this_machine_supports_what_torch_detects(self) -> None:
        torch = pytest.importorskip("torch")
        detected = torch.backends.cpu.get_cpu_capability()
        assert cpu.supports_capability(detected, cpu.capture_cpu()["isa_flags"])


class TestPinningValues:
    """Each capability maps to the env-var values that pin ATen, oneDNN and oneMKL to it."""

    @pytest.mark.parametrize(
        ("capability", "aten", "onednn", "mkl"),
        [
            ("DEFAULT", "default", "SSE41", "SSE4_2"),
            ("NO AVX", "default", "SSE41", "SSE4_2"),
            ("AVX2", "avx2", "AVX2", "AVX2"),
            ("avx512", "avx512", "AVX512_CORE", "AVX512"),
            ("SVE256", "sve256", None, None),
            ("VSX", "vsx", None, None),
            ("Z VECTOR", "zvector", None, None),
            ("QUANTUM", None, None, None),
        ],
    )
    def test_table(self, capability: str, aten: str | None, onednn: str | None, mkl: str | None) -> None:
        assert cpu.aten_capability_env_value(capability) == aten
        assert cpu.onednn_max_isa_for(capability) == onednn
        assert cpu.mkl_instructions_for(capability) == mkl


def _torch_capability_under(env_value: str) -> str:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": env_value}
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=True, timeout=120)
    return result.stdout.strip()


class TestAtenPinningWithTorch:
    """The env value we produce really pins torch's dispatch level in a fresh process."""

    def test_default_pins_default(self) -> None:
        pytest.importorskip("torch")
        assert _torch_capability_under(cpu.aten_capability_env_value("DEFAULT") or "") == "DEFAULT"

    def test_detected_level_round_trips(self) -> None:
        torch = pytest.importorskip("torch")
        detected = torch.backends.cpu.get_cpu_capability()
        value = cpu.aten_capability_env_value(detected)
        assert value is not None
        assert _torch_capability_under(value) == detected


class TestNoHeavyImports:
    """Importing and running the probe does not import torch."""

    def test_subprocess(self) -> None:
        code = (
            "import sys; from repro_track.capture import cpu; cpu.capture_cpu(); "
            "print('torch' in sys.modules)"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                timeout=60)
        assert result.stdout.strip() == "False"
