"""benchmarks/gpu_check.py runs anywhere: on CPU it checks the CPU claims and skips the CUDA parts, saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run_check(tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), "--steps", "2"], text=True,
                          capture_output=True, env=env, timeout=1200)
    return done, json.loads(out.read_text("utf-8")) if out.is_file() else {}


@pytest.mark.slow
class TestGpuCheck:
    """The check reproduces the claims it can here, replays each recording as predicted, skips the rest."""

    def test_on_this_machine(self, tmp_path):
        done, data = run_check(tmp_path)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        by_name = {r["name"]: r for r in data["results"]}
        for name in ("1 no generator differs run to run (CPU)", "2 CPU generator same every run (CPU)",
                     "5 deterministic settings: L_inf 0 (CPU)", "record+replay: no generator (CPU)",
                     "record+replay: CPU generator (CPU)", "record+replay: deterministic (CPU)"):
            assert by_name[name]["status"] == "pass", by_name[name]
        assert "expected exact, observed exact" in by_name["record+replay: CPU generator (CPU)"]["detail"]
        cuda_parts = [r for r in data["results"] if "CUDA" in r["name"] or "SM-count" in r["name"]]
        assert len(cuda_parts) >= 8
        if torch.cuda.is_available():
            assert all(r["status"] == "pass" for r in cuda_parts), cuda_parts
        else:
            assert data["cuda"] is False
            assert all(r["status"] == "skip" and r["detail"] == "no CUDA device on this machine"
                       for r in cuda_parts)
            assert "CUDA not available: CUDA parts skipped" in done.stdout
            assert "SKIP  3 CUDA generator differs from the CPU one: no CUDA device on this machine" in done.stdout
        assert not list(tmp_path.glob("repro-track-gpu-check-*"))  # its temp folder is removed
