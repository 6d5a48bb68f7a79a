"""Tests for repro_track.rules: each prediction rule, and how predict ranks and orders them.

The base case is a real manifest captured in this process by the recorder (nothing logged) and a
``Here`` describing the same machine, so that no rule applies; each case changes one fact.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import pytest
import torch

import repro_track
from repro_track.recorder import recorder_of
from repro_track.replay.code import CURRENT, RECORDED, CodePlan
from repro_track.rules import RULES, Here, predict

RULES_BY_NAME = {rule.name: rule for rule in RULES}
DROP = {"none": "none", "close": "close", "info": "exact"}


@repro_track.record
def draw(n: int, *, generator=None):
    return torch.randn(n, generator=generator)


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    """The manifest of one real CPU call, captured without logging."""
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


def gpu(name: str = "NVIDIA H200", sm_count: int = 132, driver: str = "550.54.15") -> dict[str, Any]:
    """A GPU section as the recorder writes it (one device)."""
    return {"available": True, "reason": None, "driver_version": driver, "cuda_driver_version": "12.4",
            "devices": [{"index": 0, "name": name, "uuid": "GPU-5b5c8a3e-1f0e-4c33-9f5e-6d1b2a7c9e01",
                         "compute_capability": "9.0", "sm_count": sm_count, "max_threads_per_sm": 2048,
                         "memory_total_bytes": 150_754_820_096, "mig_mode": "disabled"}]}


Tweak = Callable[[dict, Here], Here]


def cuda_generator(m: dict, here: Here) -> Here:
    m["randomness"]["generators"][0]["device"] = "cuda"
    m["gpu"] = gpu()
    return here


def sm_count(m: dict, here: Here) -> Here:
    cuda_generator(m, here)
    return dataclasses.replace(here, cuda_usable=True, gpu=gpu(sm_count=114))


def gpu_run(m: dict, here: Here) -> Here:
    m["determinism"]["cuda_used"] = True
    m["gpu"] = gpu()
    return here


def on_gpu(change: Callable[[dict], None], here_gpu: dict | None = None) -> Tweak:
    """A GPU call replayed on a usable GPU, with one more change."""
    def tweak(m: dict, here: Here) -> Here:
        gpu_run(m, here)
        m["determinism"].update(deterministic_algorithms=True, cudnn_deterministic=True)
        change(m)
        return dataclasses.replace(here, cuda_usable=True, gpu=here_gpu or gpu())
    return tweak


def manifest(change: Callable[[dict], None]) -> Tweak:
    def tweak(m: dict, here: Here) -> Here:
        change(m)
        return here
    return tweak


def opaque_argument(m: dict) -> None:
    m["arguments"]["thing"] = {"kind": "opaque", "type": "x.Thing", "replayable": False,
                               "reason": "argument 'thing' of type x.Thing cannot be rebuilt",
                               "parameter": "keyword_only"}


def unknown_source(m: dict) -> None:
    m["call"].update(replayable=False,
                     reason="the function's source file is unknown (defined interactively?)")


def kernels(recorded: str, here_level: str, here_flags: list[str]) -> Tweak:
    def tweak(m: dict, here: Here) -> Here:
        m["cpu"]["torch_capability"] = recorded
        # Recorded with oneDNN capped at AVX2, so that only ATen's level differs (oneDNN's own rule
        # is tested in test_rules_hw.py).
        m["env_vars"]["captured"]["ONEDNN_MAX_CPU_ISA"] = m["cpu"]["onednn_isa_cap"] = "AVX2"
        m["cpu"]["onednn_isa"] = "AVX2" if m["cpu"].get("onednn_isa") else None
        return dataclasses.replace(here, cpu={**here.cpu, "torch_capability": here_level,
                                              "isa_flags": here_flags})
    return tweak


def here_with(**changes: Any) -> Tweak:
    return lambda m, h: dataclasses.replace(h, **changes)


def put(path: tuple[str, ...], value: Any) -> Callable[[dict], None]:
    def change(m: dict) -> None:
        for key in path[:-1]:
            m = m[key]
        m[path[-1]] = value
    return change


AVX512_FLAGS = ["avx", "avx2", "avx512bw", "avx512dq", "avx512f", "avx512vl", "fma", "sse4_1", "sse4_2"]

CASES = [
    pytest.param("cuda_generator_without_gpu", "none", cuda_generator,
                 "generator 'generator' is a CUDA generator (seed 1) and this machine has no usable CUDA "
                 "GPU; GPU: NVIDIA H200 (132 SMs) recorded, none here", id="cuda-generator-without-gpu"),
    pytest.param("cuda_generator_sm_count", "none", sm_count,
                 "NVIDIA H200 (132 SMs) recorded, NVIDIA H200 (114 SMs) here", id="cuda-generator-sm-count"),
    pytest.param("gpu_run_without_gpu", "none", gpu_run, "the call ran on a GPU (NVIDIA H200 (132 SMs))",
                 id="gpu-run-without-gpu"),
    pytest.param("argument_not_replayable", "none", manifest(opaque_argument),
                 "argument 'thing' of type x.Thing cannot be rebuilt", id="argument-not-replayable"),
    pytest.param("entry_point_not_replayable", "none", manifest(unknown_source),
                 "draw cannot be imported again: the function's source file is unknown",
                 id="entry-point-not-replayable"),
    pytest.param("gpu_model_differs", "close", on_gpu(lambda m: None, gpu("NVIDIA A100-SXM4-80GB", 108)),
                 "NVIDIA H200 (132 SMs) recorded, NVIDIA A100-SXM4-80GB (108 SMs) here", id="gpu-model"),
    pytest.param("torch_version", "close", manifest(put(("software", "torch", "version"), "1.13.1")),
                 "torch: 1.13.1 recorded", id="torch-version"),
    pytest.param("cuda_version", "close", on_gpu(put(("software", "torch", "cuda"), "11.8")),
                 "CUDA: 11.8 recorded", id="cuda-version"),
    pytest.param("cudnn_version", "close", on_gpu(put(("software", "torch", "cudnn"), "8700")),
                 "cuDNN: 8700 recorded", id="cudnn-version"),
    pytest.param("driver_version", "close", on_gpu(put(("gpu", "driver_version"), "535.104.05")),
                 "NVIDIA driver: 535.104.05 recorded, 550.54.15 here", id="driver-version"),
    pytest.param("diffusers_version", "close", manifest(put(("software", "packages", "diffusers"), "0.1.0")),
                 "diffusers: 0.1.0 recorded", id="diffusers-version"),
    pytest.param("transformers_version", "close",
                 manifest(put(("software", "packages", "transformers"), "0.0.1")),
                 "transformers: 0.0.1 recorded", id="transformers-version"),
    pytest.param("cpu_capability_unpinnable", "close", kernels("AVX512", "DEFAULT", ["sse4_1", "sse4_2"]),
                 "kernels for AVX512 recorded; this CPU", id="cpu-kernels-unavailable-here"),
    pytest.param("architecture", "close", manifest(put(("cpu", "architecture"), "riscv64")),
                 "CPU architecture: riscv64 recorded", id="architecture"),
    pytest.param("nondeterministic_gpu_kernels", "close",
                 on_gpu(put(("determinism", "deterministic_algorithms"), False)),
                 "nondeterministic GPU kernels were allowed", id="nondeterministic-gpu-kernels"),
    pytest.param("nondeterministic_gpu_kernels", "close",
                 on_gpu(put(("determinism", "cudnn_benchmark"), True)), "cudnn.benchmark was on",
                 id="cudnn-benchmark"),
    pytest.param("source_changed", "close", here_with(source_sha256="0" * 64),
                 "the function draw changed since it was recorded", id="source-changed"),
    pytest.param("code_changed", "close",
                 here_with(code=CodePlan(CURRENT, ("helpers.py changed",), why="--current-code runs today's "
                                         "code").facts()),
                 "code changed since recording (helpers.py changed); --current-code", id="code-changed"),
    pytest.param("recorded_diff_not_applied", "close",
                 here_with(code=CodePlan(RECORDED, ("x.py changed",), "ab" * 20, diff_sha256="cd" * 32,
                                         diff_problem="it does not apply").facts()),
                 "uncommitted changes (diff sha256 cdcdcdcdcdcd) that the replay does not apply: it does "
                 "not apply", id="recorded-diff-not-applied"),
    pytest.param("untracked_file_changed", "close",
                 here_with(code=CodePlan(RECORDED, ("untracked cfg.py changed",), "ab" * 20,
                                         untracked_changed=("cfg.py",)).facts()),
                 "untracked source files changed since recording (cfg.py)", id="untracked-file-changed"),
    pytest.param("recorded_code_rebuilt", "info",
                 here_with(code=CodePlan(RECORDED, ("x.py changed",), "ab" * 20).facts()),
                 "(x.py changed); the replay runs the recorded commit abababababab in a temporary git worktree",
                 id="recorded-code-rebuilt"),
    pytest.param("cpu_capability_pinned", "info", kernels("AVX2", "AVX512", AVX512_FLAGS),
                 "CPU kernels: AVX2 recorded, AVX512 here; the replay pins AVX2", id="cpu-kernels-pinned"),
    pytest.param("threads", "info", manifest(put(("determinism", "num_threads"), 97)),
                 "threads: 97 recorded", id="threads"),
    pytest.param("env_vars", "info", manifest(put(("env_vars", "captured", "PYTHONHASHSEED"), "123")),
                 "environment variables differ (PYTHONHASHSEED)", id="env-vars"),
]


class TestRules:
    """Each rule stays silent on the recording machine and names what differs when one fact changes."""

    def test_every_rule_has_a_case(self):
        from test_rules_hw import HW_RULES  # GPU and CPU library rules, tested from captured facts

        assert {case.values[0] for case in CASES} | HW_RULES == set(RULES_BY_NAME)

    @pytest.mark.parametrize("name, level, tweak, phrase", CASES)
    def test_rule(self, base, name, level, tweak, phrase):
        m, here = base
        rule = RULES_BY_NAME[name]
        assert rule.check(m, here) is None
        here = tweak(m, here)
        assert rule.level == level
        text = rule.check(m, here)
        assert text is not None and phrase in text
        prediction = predict(m, here)
        assert (name, level, text) in [(r.rule, r.level, r.text) for r in prediction.reasons]
        assert prediction.expected == DROP[level]


class TestPredict:
    """predict takes the worst level that applies and lists its reasons worst first, in table order."""

    def test_same_machine_is_exact_without_reasons(self, base):
        prediction = predict(*base)
        assert (prediction.expected, prediction.reasons) == ("exact", ())

    @pytest.mark.parametrize("case_ids, expected, order", [
        (["threads", "env-vars"], "exact", ["threads", "env_vars"]),
        (["env-vars", "torch-version", "threads"], "close", ["torch_version", "threads", "env_vars"]),
        (["source-changed", "architecture"], "close", ["architecture", "source_changed"]),
        (["threads", "source-changed", "cuda-generator-without-gpu", "torch-version"], "none",
         ["cuda_generator_without_gpu", "torch_version", "nondeterministic_gpu_kernels", "source_changed",
          "threads"]),
    ])
    def test_worst_level_and_order(self, base, case_ids, expected, order):
        m, here = base
        tweaks = {case.id: case.values[2] for case in CASES}
        for case_id in case_ids:
            here = tweaks[case_id](m, here)
        prediction = predict(m, here)
        assert prediction.expected == expected
        assert [r.rule for r in prediction.reasons] == order
