"""`diff`: differences between two manifests, most decisive cause first, in words."""

from __future__ import annotations

import base64
import copy
import json

import pytest
import torch

import repro_track
from conftest import run_cli
from repro_track.explain import differences, flatten
from repro_track.manifest import digest_of
from repro_track.recorder import recorder_of


@repro_track.record(experiment="explain")
def draw(scale: float = 1.0, *, generator=None):
    """Noise times a small matmul: depends on the generator and (in general) on threads."""
    noise = torch.randn(64, 64, generator=generator)
    return noise @ noise.T * scale


def _manifest(seed: int = 0, threads: int | None = None, scale: float = 1.0) -> dict:
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator("cpu").manual_seed(seed)
        _, error, recording = recorder_of(draw).capture((scale,), {"generator": gen})
    finally:
        torch.set_num_threads(before)
    assert error is None and recording is not None
    return recording.manifest.to_dict()


def _as_cuda(m: dict) -> dict:
    cuda = copy.deepcopy(m)
    gen = cuda["randomness"]["generators"][0]
    state = (gen["initial_seed"]).to_bytes(8, "little") + (0).to_bytes(8, "little")
    gen.update(device="cuda:0", state_b64=base64.b64encode(state).decode())
    cuda["randomness"]["primary"]["generator_device"] = "cuda:0"
    cuda["manifest_digest"] = digest_of(cuda)
    return cuda


class TestDifferences:
    """Each pair of runs names the decisive cause first, in plain words."""

    @pytest.mark.parametrize(
        ("variant", "category", "phrase"),
        [
            (lambda: _as_cuda(_manifest()), "noise", "CPU and CUDA generators draw different numbers"),
            (lambda: _manifest(threads=1), "arithmetic", "threads: 2 in A, 1 in B"),
            (lambda: _manifest(seed=1), "noise", "seed: 0 in A, 1 in B"),
            (lambda: _manifest(scale=2.0), "input", "argument arguments.scale.value: 1.0 in A, 2.0 in B"),
        ],
        ids=["cpu-vs-cuda-generator", "thread-count", "seed", "argument"],
    )
    def test_cause_comes_first(self, variant, category, phrase):
        if torch.get_num_threads() != 2 and "threads" in phrase:
            phrase = f"threads: {torch.get_num_threads()} in A, 1 in B"
        found = differences(_manifest(), variant())
        assert found, "the runs differ, so there must be differences"
        assert found[0].category == category
        assert phrase in found[0].explanation

    def test_same_settings_only_cosmetic(self):
        found = differences(_manifest(), _manifest())
        assert all(d.category == "cosmetic" for d in found)

    def test_unused_global_rng_is_cosmetic(self):
        a, b = _manifest(), _manifest()
        b["randomness"]["global"]["python"]["sha256"] = "0" * 64
        found = [d for d in differences(a, b) if d.path.startswith("randomness.global.python")]
        assert [d.category for d in found] == ["cosmetic"]
        assert "did not draw from it" in found[0].explanation


class TestFlatten:
    """Manifests flatten to dotted paths; lists of scalars stay whole."""

    def test_paths(self):
        flat = flatten({"a": {"b": [1, 2], "c": [{"d": 1}]}, "e": {}})
        assert flat == {"a.b": [1, 2], "a.c.0.d": 1, "e": {}}


class TestDiffCommand:
    """`repro-track diff` on two stored runs: cause first, output differences, JSON form."""

    def test_two_seeds(self, tracking_uri, tmp_path):
        ids = []
        for seed in (0, 1):
            draw(generator=torch.Generator("cpu").manual_seed(seed))
            ids.append(repro_track.last_recording(draw).wait(120))
        text = run_cli("diff", *ids)
        assert text.returncode == 0, text.stderr
        lines = [line for line in text.stdout.splitlines() if line.strip()]
        assert lines[2].startswith("Initial noise differs")
        assert "seed: 0 in A, 1 in B" in lines[3]
        as_json = run_cli("diff", *ids, "--json")
        data = json.loads(as_json.stdout)
        assert data["differences"][0]["category"] == "noise"
        out = data["outputs"]["output"]
        assert out["bitwise_equal"] is False and out["max_abs_diff"] > 0

    def test_unknown_run_is_one_line(self, tracking_uri):
        done = run_cli("diff", "0" * 32, "1" * 32)
        assert done.returncode == 2
        assert "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("repro-track: error: no run")
