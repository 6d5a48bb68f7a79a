"""`doctor` and `deterministic()`: what is off for exact reproduction, and turning it all on."""

from __future__ import annotations

import json
import os

import torch

from conftest import run_cli
from repro_track.capture.torch_state import determinism_knobs
from repro_track.doctor import checks, fix_lines


class TestDoctor:
    """The checks read the live process and list the exact lines to change."""

    def test_defaults_need_changes(self):
        found = {c.name: c for c in checks()}
        assert not found["deterministic algorithms"].ok
        assert found["deterministic algorithms"].fix == "torch.use_deterministic_algorithms(True)"
        assert "torch.use_deterministic_algorithms(True)" in fix_lines(list(found.values()))

    def test_fixed_knob_is_ok(self, monkeypatch):
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        try:
            found = {c.name: c for c in checks()}
        finally:
            torch.use_deterministic_algorithms(False)
        assert found["deterministic algorithms"].ok and found["deterministic algorithms"].fix == ""
        assert found["CUBLAS_WORKSPACE_CONFIG"].ok

    def test_cli_json_lists_changes(self):
        done = run_cli("doctor", "--json", env={k: v for k, v in os.environ.items()
                                                if k != "CUBLAS_WORKSPACE_CONFIG"})
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        assert "export CUBLAS_WORKSPACE_CONFIG=:4096:8   # before Python starts" in data["fix"]
        assert any(c["name"] == "threads" and c["ok"] for c in data["checks"])


class TestDeterministic:
    """The context manager turns every switch on inside and restores everything after."""

    def test_on_inside_restored_after(self, monkeypatch):
        import repro_track

        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
        before = determinism_knobs()
        with repro_track.deterministic():
            inside = determinism_knobs()
            env_inside = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        assert inside["fully_deterministic"] and env_inside == ":4096:8"
        assert determinism_knobs() == before
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ

    def test_restored_after_exception(self):
        import repro_track

        before = determinism_knobs()
        try:
            with repro_track.deterministic():
                raise KeyError("boom")
        except KeyError:
            pass
        assert determinism_knobs() == before

    def test_record_deterministic_records_inside_knobs(self, tracking_uri):
        import repro_track

        @repro_track.record(deterministic=True)
        def f():
            return torch.zeros(2)

        before = determinism_knobs()
        f()
        assert determinism_knobs() == before
        run_id = repro_track.last_recording(f).wait(120)
        done = run_cli("show", run_id, "--json")
        manifest = json.loads(done.stdout)["manifest"]
        assert manifest["determinism"]["fully_deterministic"] is True
        assert manifest["env_vars"]["captured"].get("CUBLAS_WORKSPACE_CONFIG") == ":4096:8"
