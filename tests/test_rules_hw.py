"""The GPU and CPU prediction rules, fed with facts from real captures.

The manifest is a real CPU recording made in this process; GPU sections come from the real
``capture_gpu`` reading a stand-in ``pynvml`` module (the only stand-in: no NVIDIA driver here), with
the SM counts the CUDA runtime reports filled in by the same code the replay's probe feeds. What needs
a real GPU carries the ``gpu`` marker.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import types
from typing import Any

import pytest
import torch

import repro_track
from repro_track import capture
from repro_track.capture import cpu, gpu, torch_state
from repro_track.recorder import recorder_of
from repro_track.rules import RULES, Here, largest_cuda_draw, predict, same_cuda_noise

RULES_BY_NAME = {rule.name: rule for rule in RULES}
# The rules this file tests; tests/test_rules.py checks that every rule is tested somewhere.
HW_RULES = frozenset({"device_generator_elsewhere", "onednn_isa", "mkl_code_path", "numpy_version",
                      "peft_version", "accelerate_version", "xformers_version", "python_version"})

H200 = ("NVIDIA H200", "GPU-5b5c8a3e-1f0e-4c33-9f5e-6d1b2a7c9e01", 132, 2048)
H100_PCIE = ("NVIDIA H100 PCIe", "GPU-0a0b0c0d-aaaa-bbbb-cccc-ddddeeeeffff", 114, 2048)
A10G = ("NVIDIA A10G", "GPU-77777777-8888-9999-aaaa-bbbbccccdddd", 80, 1536)


@repro_track.record
def draw(n: int, *, generator=None, latents=None):
    return torch.randn(n, generator=generator)


@repro_track.record
def run_pipeline(pipe, kwargs: dict, *, generator=None):
    return pipe(num_inference_steps=1, generator=generator, **kwargs).images


def nvml_module(gpus: list[tuple[str, str, int, int]]) -> types.ModuleType:
    """A stand-in pynvml for a machine with these (name, uuid, SMs, threads per SM) GPUs, which
    like real NVML on a whole GPU does not know the SM count."""

    class NVMLError_NotSupported(Exception):  # noqa: N801 - pynvml's own class name
        value = 3

    def attributes(handle: int) -> Any:
        raise NVMLError_NotSupported()

    mod = types.ModuleType("pynvml")
    mod.NVML_ERROR_NOT_SUPPORTED = 3
    mod.nvmlInit = mod.nvmlShutdown = lambda: None
    mod.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    mod.nvmlSystemGetCudaDriverVersion_v2 = lambda: 12040
    mod.nvmlDeviceGetCount = lambda: len(gpus)
    mod.nvmlDeviceGetHandleByIndex = lambda index: index
    mod.nvmlDeviceGetName = lambda h: gpus[h][0]
    mod.nvmlDeviceGetUUID = lambda h: gpus[h][1]
    mod.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 * 2**30)
    mod.nvmlDeviceGetAttributes = attributes
    mod.nvmlDeviceGetMigMode = lambda h: (0, 0)
    return mod


def gpu_section(gpus: list[tuple[str, str, int, int]], visible: str | None = None,
                probed: bool = True) -> dict[str, Any]:
    """The GPU section captured on such a machine under CUDA_VISIBLE_DEVICES=visible, with the SM
    counts the CUDA runtime gives for the visible devices (what the replay's probe reads)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "pynvml", nvml_module(gpus))
        mp.delenv("CUDA_DEVICE_ORDER", raising=False)
        if visible is None:
            mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            mp.setenv("CUDA_VISIBLE_DEVICES", visible)
        gpu.clear_cache()
        try:
            section = gpu.capture_gpu()
        finally:
            gpu.clear_cache()
    if not probed:
        return section
    shown = range(len(gpus)) if visible is None else [int(v) for v in visible.split(",")]
    props = [{"index": k, "uuid": gpus[i][1][4:], "name": gpus[i][0], "sm_count": gpus[i][2],
              "max_threads_per_sm": gpus[i][3]} for k, i in enumerate(shown)]
    return gpu.with_cuda_properties(section, props, visible)


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    """The manifest of one real CPU call with a CPU generator, captured without logging."""
    _, error, recording = recorder_of(draw).capture((4,), {"generator": torch.Generator().manual_seed(1)})
    assert error is None and recording is not None
    return recording.manifest.to_dict()


@pytest.fixture
def base(recorded) -> tuple[dict[str, Any], Here]:
    """A fresh copy of the manifest and a Here that is the machine that recorded it."""
    m = copy.deepcopy(recorded)
    same = copy.deepcopy(m)
    here = Here(cpu=same["cpu"], gpu=same["gpu"], software=same["software"], cuda_usable=False,
                num_threads=m["determinism"]["num_threads"], source_sha256=m["call"]["source_sha256"],
                env_vars=same["env_vars"])
    return m, here


def on_cuda(m: dict, recorded_gpu: dict, device: str = "cuda:0") -> None:
    """Turn the recording into one whose generator was a CUDA generator on ``device``."""
    m["randomness"]["generators"][0]["device"] = device
    m["determinism"].update(cuda_used=True, deterministic_algorithms=True, cudnn_deterministic=True)
    m["gpu"] = recorded_gpu


def with_latents(m: dict, shape: tuple[int, ...]) -> None:
    m["arguments"]["latents"] = {"kind": "tensor", "replayable": True, "reason": None, "dtype": "float32",
                                 "shape": list(shape), "device": "cuda:0", "parameter": "keyword_only"}


def reasons(m: dict, here: Here) -> dict[str, str]:
    return {r.rule: r.text for r in predict(m, here).reasons}


class TestSmCount:
    """A CUDA generator's noise is predicted lost exactly when the launch grids differ."""

    def test_sm_counts_known_on_both_sides(self, base):
        m, here = base
        on_cuda(m, gpu_section([H200]))
        here = dataclasses.replace(here, cuda_usable=True, gpu=gpu_section([H100_PCIE]))
        prediction = predict(m, here)
        found = reasons(m, here)
        assert prediction.expected == "none"
        assert "NVIDIA H200 (132 SMs) recorded, NVIDIA H100 PCIe (114 SMs) here" in found["cuda_generator_sm_count"]
        assert "the size of the call's draws is not known" in found["cuda_generator_sm_count"]

    def test_nvml_alone_leaves_sm_count_unknown_and_different_models_stay_conservative(self, base):
        m, here = base
        on_cuda(m, gpu_section([H200]))
        here = dataclasses.replace(here, cuda_usable=True, gpu=gpu_section([H100_PCIE], probed=False))
        assert here.gpu["devices"][0]["sm_count"] is None
        assert "without both SM counts" in reasons(m, here)["cuda_generator_sm_count"]

    def test_same_model_is_exact(self, base):
        m, here = base
        on_cuda(m, gpu_section([H200]))
        here = dataclasses.replace(here, cuda_usable=True, gpu=gpu_section([H200]))
        assert predict(m, here).expected == "exact"

    # H100 PCIe: 114 SMs x 8 blocks x 256 threads = 233472 elements in one wave; the H200 has more.
    @pytest.mark.parametrize("shape, fires", [
        ((1, 4, 64, 64), False),       # SD 1.5 latents: 16384
        ((1, 4, 128, 128), False),     # SDXL latents: 65536
        ((233472,), False),            # exactly one wave of the smaller GPU
        ((233473,), True),             # one element more: the grids differ
        ((1, 16, 128, 128), True),     # 262144
    ])
    def test_threshold_from_latents(self, base, shape, fires):
        m, here = base
        on_cuda(m, gpu_section([H200]))
        with_latents(m, shape)
        here = dataclasses.replace(here, cuda_usable=True, gpu=gpu_section([H100_PCIE]))
        found = reasons(m, here)
        assert ("cuda_generator_sm_count" in found) is fires
        assert predict(m, here).expected == ("none" if fires else "close")  # other GPU model: close
        if fires:
            assert "233472 elements" in found["cuda_generator_sm_count"]

    @pytest.mark.parametrize("numel, same", [(80 * 6 * 256, True), (80 * 6 * 256 + 1, False), (1, True)])
    def test_threads_per_sm_count_too(self, numel, same):
        # An A10G has 80 SMs of 1536 threads: 6 blocks per SM, not 8.
        a10g = {"sm_count": 80, "max_threads_per_sm": 1536}
        h100 = {"sm_count": 114, "max_threads_per_sm": 2048}
        assert same_cuda_noise(numel, a10g, h100) is same

    @pytest.mark.parametrize("model, kwargs", [
        ("tiny-text2image", {"prompt": ["a cat", "a dog"], "num_images_per_prompt": 2, "output_type": "np"}),
        ("tiny-text2image", {"prompt": "a cat", "height": 48, "width": 64, "output_type": "pil"}),
        ("tiny-text2image", {"prompt": "a cat", "output_type": "latent"}),
        ("tiny-ddim", {"batch_size": 3, "output_type": "np"}),
    ])
    def test_draw_size_from_a_real_pipeline_call(self, model_dir, model, kwargs):
        """The size the rule derives equals the largest randn the pipeline really drew."""
        from torch.overrides import TorchFunctionMode

        from repro_track.testing import load_pipeline

        class Draws(TorchFunctionMode):
            def __init__(self) -> None:
                super().__init__()
                self.sizes: list[int] = []

            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func in (torch.randn, torch.rand, torch.Tensor.normal_):
                    self.sizes.append(out.numel())
                return out

        pipe = load_pipeline(model_dir / model, progress=False)
        with Draws() as draws:
            _, error, recording = recorder_of(run_pipeline).capture(
                (pipe, kwargs), {"generator": torch.Generator().manual_seed(0)})
        assert error is None and recording is not None
        numel, how = largest_cuda_draw(recording.manifest.to_dict())
        assert numel == max(draws.sizes), how
        assert "from the pipeline's UNet config and the returned images" in how

    def test_unknown_draw_without_pipeline_or_latents(self, base):
        assert largest_cuda_draw(base[0]) is None


class TestVisibleDevices:
    """The rules look at the device the call used, through CUDA_VISIBLE_DEVICES, not at device 0."""

    def test_recorded_on_device_1(self, base):
        m, here = base
        section = gpu_section([A10G, H200], visible="1")
        assert section["cuda_order"] == [1] and section["cuda_visible_devices"] == "1"
        on_cuda(m, section)
        # Replayed on a machine whose only GPU is an H200: the same model as the one used.
        here = dataclasses.replace(here, cuda_usable=True, gpu=gpu_section([H200]))
        assert predict(m, here).expected == "exact"
        # ...and on the recording machine with device 0 visible: the A10G, another model and grid.
        here = dataclasses.replace(here, gpu=gpu_section([A10G, H200], visible="0"))
        found = reasons(m, here)
        assert "NVIDIA H200 (132 SMs) recorded, NVIDIA A10G (80 SMs) here" in found["cuda_generator_sm_count"]

    def test_uuid_prefix_selects_the_device(self):
        order = gpu.cuda_order(gpu_section([A10G, H200], probed=False)["devices"], "GPU-5b5c8a3e", None)
        assert order == [1]

    def test_integer_order_unknown_among_different_models(self):
        devices = gpu_section([A10G, H200], probed=False)["devices"]
        assert gpu.cuda_order(devices, "1", None) == [None]
        assert gpu.cuda_order(devices, "1", "PCI_BUS_ID") == [1]
        assert gpu.cuda_order(devices, "1,7,0", "PCI_BUS_ID") == [1]  # CUDA stops at an invalid entry


class TestCudaStartedInCall:
    """A call that starts CUDA itself and draws from the default CUDA generator keeps its state."""

    def test_started_states_are_filled_in(self, recorded):
        states = copy.deepcopy(recorded["randomness"]["global"])
        assert states["torch_cuda"]["available"] is False  # CUDA had not started at call entry
        raw = torch.Generator().manual_seed(7).get_state().numpy().tobytes()  # any bytes stand in
        at_start = [{"index": 0, "state_b64": torch_state._b64(raw), "sha256": torch_state._sha(raw),
                     "consumed": False}]
        after = {"torch_cpu": states["torch_cpu"]["sha256"], "numpy": states["numpy"]["sha256"],
                 "python": states["python"]["sha256"], "torch_cuda": {0: "f" * 64},
                 "torch_cuda_at_start": at_start}
        torch_state.mark_consumed(states, after)
        cuda = states["torch_cuda"]
        assert cuda["available"] and cuda["started_in_call"]
        assert cuda["devices"][0]["consumed"] and cuda["devices"][0]["state_b64"] == at_start[0]["state_b64"]

    def test_default_generator_noise_needs_a_gpu(self, base):
        m, here = base
        m["randomness"]["generators"] = []
        m["determinism"]["cuda_used"] = True
        m["gpu"] = gpu_section([H200])
        m["randomness"]["global"]["torch_cuda"] = {
            "available": True, "reason": None, "started_in_call": True,
            "devices": [{"index": 0, "state_b64": "AA==", "sha256": "0" * 64, "consumed": True}]}
        found = reasons(m, here)
        assert "CUDA default generator" in found["cuda_generator_without_gpu"]
        here = dataclasses.replace(here, cuda_usable=True, gpu=gpu_section([A10G]))
        assert "NVIDIA A10G (80 SMs) here" in reasons(m, here)["cuda_generator_sm_count"]

    def test_manifest_with_started_states_is_valid(self, base):
        from repro_track.manifest import validate

        m, _ = base
        m["randomness"]["global"]["torch_cuda"]["started_in_call"] = True
        validate(m)

    @pytest.mark.gpu
    def test_real_cuda_started_inside_the_call(self):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        code = (
            "import json, torch, repro_track\n"
            "from repro_track.recorder import recorder_of\n"
            "@repro_track.record\n"
            "def noise(n):\n"
            "    return torch.randn(n, device='cuda').cpu()\n"
            "torch.manual_seed(7)\n"
            "_, err, rec = recorder_of(noise).capture((8,), {})\n"
            "m = rec.manifest.to_dict()\n"
            "expected = torch.Generator(device='cuda').manual_seed(7).get_state().numpy().tobytes()\n"
            "import base64\n"
            "dev = m['randomness']['global']['torch_cuda']['devices'][0]\n"
            "print(json.dumps([m['randomness']['global']['torch_cuda'].get('started_in_call'),\n"
            "                  base64.b64decode(dev['state_b64']) == expected, dev['consumed']]))\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1]) == [True, True, True]


class TestOtherDeviceGenerators:
    """An mps or xpu generator's noise can only come back on that device type."""

    @pytest.mark.parametrize("device", ["mps", "xpu:0"])
    def test_needs_the_device_type(self, base, device):
        m, here = base
        m["randomness"]["generators"][0]["device"] = device
        found = reasons(m, here)
        assert predict(m, here).expected == "none"
        assert f"can only be regenerated on an {device.partition(':')[0]} device" in \
            found["device_generator_elsewhere"]
        here = dataclasses.replace(here, accelerators=(device.partition(":")[0],))
        assert "device_generator_elsewhere" not in reasons(m, here)


SAPPHIRE_RAPIDS = {"vendor": "GenuineIntel", "model": "Intel(R) Xeon(R) Platinum 8480+",
                   "isa_flags": ["amx_bf16", "amx_int8", "amx_tile", "avx", "avx2", "avx512_bf16", "avx512_fp16",
                                 "avx512_vnni", "avx512bw", "avx512dq", "avx512f", "avx512vl", "fma", "sse4_1",
                                 "sse4_2"]}


def here_cpu(here: Here, **cpu_facts: Any) -> Here:
    return dataclasses.replace(here, cpu={**here.cpu, **cpu_facts})


def recorded_env(m: dict, **env: str) -> None:
    """Record as if these variables had been set: the env section and the CPU facts they change."""
    m["env_vars"]["captured"].update(env)
    m["cpu"].update(cpu.library_isa(m["cpu"], {**os.environ, **env}))


class TestOneDnn:
    """oneDNN picks its instruction set by CPU: a different one here predicts close unless capped."""

    def test_recorded_facts(self, recorded):
        facts = recorded["cpu"]
        if facts["onednn_version"] and facts["architecture"] == "x86_64":
            assert facts["onednn_isa"] == cpu.library_isa(facts, os.environ)["onednn_isa"]
            assert facts["onednn_isa"] != "DEFAULT"

    def test_amx_here(self, base):
        m, here = base
        if not m["cpu"]["onednn_isa"]:
            pytest.skip("this torch build has no oneDNN")
        here = here_cpu(here, **SAPPHIRE_RAPIDS)
        found = reasons(m, here)
        assert f"oneDNN: {m['cpu']['onednn_isa']} kernels recorded (not capped), AVX512_CORE_AMX here" \
            in found["onednn_isa"]
        assert predict(m, here).expected == "close"

    def test_capped_recording_is_portable(self, base):
        m, here = base
        if not m["cpu"]["onednn_isa"]:
            pytest.skip("this torch build has no oneDNN")
        recorded_env(m, ONEDNN_MAX_CPU_ISA="AVX2", MKL_CBWR="COMPATIBLE")
        here = here_cpu(here, **SAPPHIRE_RAPIDS)
        found = reasons(m, here)
        assert "onednn_isa" not in found and "mkl_code_path" not in found

    def test_cap_above_this_cpu(self, base):
        m, here = base
        if not m["cpu"]["onednn_isa"]:
            pytest.skip("this torch build has no oneDNN")
        recorded_env(m, ONEDNN_MAX_CPU_ISA="AVX512_CORE")
        here = here_cpu(here, isa_flags=["avx", "avx2", "fma", "sse4_1", "sse4_2"])
        assert "AVX512_CORE kernels recorded (capped at AVX512_CORE), AVX2 here" in reasons(m, here)["onednn_isa"]

    @pytest.mark.parametrize("flags, cap, isa", [
        (SAPPHIRE_RAPIDS["isa_flags"], None, "AVX512_CORE_AMX"),
        (SAPPHIRE_RAPIDS["isa_flags"], "AVX512_CORE_VNNI", "AVX512_CORE_VNNI"),
        (SAPPHIRE_RAPIDS["isa_flags"], "avx10_1_512", "AVX512_CORE_AMX"),  # newer than the table
        (["avx", "avx2", "fma", "sse4_1"], "AVX512_CORE", "AVX2"),  # a cap never raises the level
        (["sse4_1"], None, "SSE41"),
    ])
    def test_level_in_effect(self, flags, cap, isa):
        section = {"isa_flags": flags, "architecture": "x86_64", "vendor": "GenuineIntel",
                   "onednn_version": "3.12.0", "mkl_version": "2024.2"}
        assert cpu.library_isa(section, {"ONEDNN_MAX_CPU_ISA": cap} if cap else {})["onednn_isa"] == isa

    @pytest.mark.slow
    def test_cap_changes_bits_here(self):
        """The premise, measured: capping oneDNN alone changes a convolution's bits on this CPU."""
        facts = capture.static_facts()[1]
        if facts["onednn_isa"] in (None, "AVX2", "AVX", "SSE41", "DEFAULT"):
            pytest.skip("this CPU runs oneDNN at AVX2 or below already")
        code = ("import sys, torch, hashlib\n"
                "g = torch.Generator().manual_seed(0)\n"
                "x = torch.randn(1, 64, 32, 32, generator=g); w = torch.randn(64, 64, 3, 3, generator=g)\n"
                "y = torch.nn.functional.conv2d(x, w, padding=1)\n"
                "print(hashlib.sha256(y.numpy().tobytes()).hexdigest())\n")
        digests = []
        for cap in (None, "AVX2"):
            env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
            if cap:
                env["ONEDNN_MAX_CPU_ISA"] = cap
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                  timeout=120, check=True)
            digests.append(done.stdout.strip())
        assert digests[0] != digests[1]


class TestMkl:
    """oneMKL picks its code path by CPU model unless MKL_CBWR fixes a branch it honours there."""

    def test_other_model(self, base):
        m, here = base
        if not m["cpu"]["mkl_version"]:
            pytest.skip("this torch build has no MKL")
        here = here_cpu(here, model="Some Other CPU 9000")
        assert "MKL_CBWR did not fix its code branch" in reasons(m, here)["mkl_code_path"]
        assert predict(m, here).expected == "close"

    @pytest.mark.parametrize("branch, recording_vendor, fires", [
        ("COMPATIBLE", "AuthenticAMD", False),
        ("AVX2", "GenuineIntel", False),
        ("AVX2", "AuthenticAMD", True),   # oneMKL falls back to AUTO on AMD for Intel-only branches
        ("AUTO", "GenuineIntel", True),
    ])
    def test_fixed_branch(self, base, branch, recording_vendor, fires):
        m, here = base
        if not m["cpu"]["mkl_version"]:
            pytest.skip("this torch build has no MKL")
        m["cpu"]["vendor"] = recording_vendor
        recorded_env(m, MKL_CBWR=branch)
        here = here_cpu(here, vendor=recording_vendor, model="Some Other CPU 9000")
        assert ("mkl_code_path" in reasons(m, here)) is fires

    def test_gpu_run_is_not_judged_by_cpu_libraries(self, base):
        m, here = base
        m["determinism"]["cuda_used"] = True
        here = here_cpu(here, **SAPPHIRE_RAPIDS)
        found = reasons(m, here)
        assert "mkl_code_path" not in found and "onednn_isa" not in found


class TestVersions:
    """numpy, peft, accelerate, xformers (on GPU) and the Python version are named when they differ."""

    @pytest.mark.parametrize("rule, path, label", [
        ("numpy_version", ("packages", "numpy"), "numpy"),
        ("peft_version", ("packages", "peft"), "peft"),
        ("accelerate_version", ("packages", "accelerate"), "accelerate"),
        ("xformers_version", ("packages", "xformers"), "xformers"),
        ("python_version", ("python", "version"), "Python"),
    ])
    def test_named(self, base, rule, path, label):
        m, here = base
        if rule == "xformers_version":
            m["determinism"]["cuda_used"] = True
        assert rule not in reasons(m, here)
        m["software"][path[0]][path[1]] = "0.0.1"
        assert reasons(m, here)[rule].startswith(f"{label}: 0.0.1 recorded")
        assert predict(m, here).expected in ("close", "none")


class TestDescribeHere:
    """This machine's facts for the rules, read without starting CUDA."""

    def test_cpu_machine(self, recorded):
        from repro_track.replay.plan import describe_here

        here = describe_here(None, recorded)
        assert "cuda_order" in here.gpu and here.cpu["onednn_isa"] == recorded["cpu"]["onednn_isa"]
        assert ("cuda" in here.accelerators) is torch.cuda.is_available()
        assert not torch.cuda.is_initialized()

    @pytest.mark.gpu
    def test_probe_reads_the_cuda_runtime(self):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        props = gpu.probe_cuda_properties()
        assert props and all(p["sm_count"] > 0 and p["max_threads_per_sm"] >= 1024 for p in props)
        section = gpu.with_cuda_properties(gpu.capture_gpu(), props, os.environ.get("CUDA_VISIBLE_DEVICES"))
        used = section["devices"][section["cuda_order"][0]]
        assert used["sm_count"] == props[0]["sm_count"]
        assert not torch.cuda.is_initialized()  # the probe ran in a child


class TestDoctorLines:
    """doctor prints the exact lines that make CPU recordings portable, and accepts them once set."""

    LINES = ("export ONEDNN_MAX_CPU_ISA=AVX2", "export MKL_CBWR=COMPATIBLE", "export ATEN_CPU_CAPABILITY=avx2")

    def test_unset_prints_the_lines(self, monkeypatch):
        from repro_track.doctor import checks, fix_lines

        for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_CBWR", "ATEN_CPU_CAPABILITY"):
            monkeypatch.delenv(name, raising=False)
        lines = fix_lines(checks())
        x86 = capture.static_facts()[1]["architecture"] in ("x86_64", "AMD64")
        for expected in self.LINES[:2] + (self.LINES[2:] if x86 else ()):
            assert any(line.startswith(expected) for line in lines), (expected, lines)

    def test_set_lines_are_accepted_and_make_the_recording_portable(self, monkeypatch, base):
        from repro_track.doctor import checks

        env = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        found = {c.name: c for c in checks()}
        assert all(found[n].ok for n in ("oneDNN ISA cap", "MKL code branch", "ATen CPU kernels cap"))
        m, here = base
        recorded_env(m, **env)
        here = here_cpu(here, **SAPPHIRE_RAPIDS)
        assert not {"onednn_isa", "mkl_code_path"} & set(reasons(m, here))


class TestRisks:
    """The risks listed for a recording name the CPU libraries left to pick their own kernels."""

    def test_uncapped_cpu_libraries_are_named(self, base):
        from repro_track.rules import risks

        m, _ = base
        m["cpu"].update(onednn_isa="AVX512_CORE_BF16", onednn_isa_cap=None, mkl_version="2024.2",
                        mkl_cbwr=None)
        found = " | ".join(risks(m))
        assert "oneDNN ran AVX512_CORE_BF16 kernels, not capped" in found and "MKL_CBWR" in found
        recorded_env(m, ONEDNN_MAX_CPU_ISA="AVX2", MKL_CBWR="COMPATIBLE")
        found = " | ".join(risks(m))
        assert "oneDNN" not in found and "MKL_CBWR" not in found

    def test_cuda_default_generator_is_named(self, base):
        from repro_track.rules import risks

        m, _ = base
        m["randomness"]["generators"] = []
        m["determinism"]["cuda_used"] = True
        m["gpu"] = gpu_section([H200])
        m["randomness"]["global"]["torch_cuda"] = {
            "available": True, "reason": None, "started_in_call": True,
            "devices": [{"index": 0, "state_b64": "AA==", "sha256": "0" * 64, "consumed": True}]}
        assert any(r.startswith("CUDA default generator (no generator argument)") and "NVIDIA H200 (132 SMs)" in r
                   for r in risks(m))


class TestOlderRecordings:
    """A recording made before the CPU library facts were captured is judged from its CPU flags."""

    def test_facts_derived_from_flags(self, base):
        m, here = base
        if not m["cpu"]["onednn_isa"]:
            pytest.skip("this torch build has no oneDNN")
        for key in ("onednn_isa", "onednn_isa_cap", "mkl_isa", "mkl_enable_instructions", "mkl_cbwr"):
            del m["cpu"][key]
        assert "onednn_isa" not in reasons(m, here)
        assert "onednn_isa" in reasons(m, here_cpu(here, **SAPPHIRE_RAPIDS))
