"""Tests for `repro-track replay`: exit codes, one-line errors, --json, --dry-run, --no-log, tolerances.

Every command runs the real CLI in a fresh interpreter against the session's ``recorded_project``
(conftest). Runs that must be refused are copies of a recorded run whose function would write a
marker file if it ever ran; the copies go through the store's own upload, with the manifest digest
recomputed unless the test is about tampering.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import (RecordedProject, clone_run, h200_gpu_section, run_cli, stored_artifact,
                      write_project)

from repro_track import tags

REPORT_KEYS = {"run_id", "replay_run_id", "expected", "observed", "ok", "reasons", "outputs"}


def cli_replay(project: RecordedProject, run_id: str, *args: str, cwd: Path,
               project_dir: Path | None = None) -> subprocess.CompletedProcess:
    """`repro-track replay RUN --tracking-uri ... --project-dir ... ARGS` in a fresh interpreter."""
    return run_cli("replay", run_id, "--tracking-uri", project.tracking_uri,
                   "--project-dir", str(project_dir or project.path), *args, cwd=cwd)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("repro-track: error:")]


def marked(marker: Path, edit: Callable[[dict], None] | None = None) -> Callable[[dict], None]:
    """A manifest edit pointing gen.touch_and_noise's marker argument at ``marker``, then ``edit``."""
    def apply(m: dict[str, Any]) -> None:
        m["arguments"]["marker"]["value"] = str(marker)
        if edit is not None:
            edit(m)
    return apply


# ---------------------------------------------------------------- runs that must be refused unrun

Maker = Callable[[RecordedProject, Path, Path], "tuple[str, Path]"]


def tampered_outputs(project: RecordedProject, tmp: Path, marker: Path) -> tuple[str, Path]:
    run_id = clone_run(project, project.runs["marked"], tmp, marked(marker))
    path = stored_artifact(project, run_id, tags.OUTPUTS_PATH)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte is array data: the file still parses
    path.write_bytes(bytes(data))
    return run_id, project.path


def tampered_manifest(project: RecordedProject, tmp: Path, marker: Path) -> tuple[str, Path]:
    return clone_run(project, project.runs["marked"], tmp, marked(marker), fix_digest=False), project.path


def entry_point(**call: Any) -> Maker:
    """A copy whose call names another entry point (digest fixed: only the entry-point check remains)."""
    def make(project: RecordedProject, tmp: Path, marker: Path) -> tuple[str, Path]:
        def edit(m: dict[str, Any]) -> None:
            m["call"].update({key: value(project) if callable(value) else value
                              for key, value in call.items()})
        return clone_run(project, project.runs["marked"], tmp, marked(marker, edit)), project.path
    return make


def os_system(source_file: str | None) -> Maker:
    """A copy whose call is os.system('touch MARKER')."""
    def make(project: RecordedProject, tmp: Path, marker: Path) -> tuple[str, Path]:
        def edit(m: dict[str, Any]) -> None:
            m["call"].update(module="os", qualname="system", source_file=source_file, is_script=False,
                             source_sha256=None)
            m["arguments"] = {"command": {"kind": "json", "value": f"touch {marker}", "replayable": True,
                                          "reason": None, "parameter": "positional_or_keyword"}}
        return clone_run(project, project.runs["marked"], tmp, edit), project.path
    return make


SHADOW_JSON_PY = '''
    """A project module named like a standard one: it writes the marker if it is ever imported or run."""
    import pathlib

    import repro_track

    pathlib.Path({marker!r}).write_text("imported", "utf-8")


    @repro_track.record
    def touch_and_noise(marker: str, n: int, *, generator=None):
        pathlib.Path(marker).write_text("ran", "utf-8")
        return n
'''


def module_resolving_elsewhere(project: RecordedProject, tmp: Path, marker: Path) -> tuple[str, Path]:
    """The static check passes (json.py is in the project and decorated), but `import json` is the
    standard library's: only the child's check that the module is the planned file catches it."""
    shadow = write_project(tmp / "shadow", {"json.py": SHADOW_JSON_PY.format(marker=str(marker))})

    def edit(m: dict[str, Any]) -> None:
        m["call"].update(module="json", source_file="json.py")

    return clone_run(project, project.runs["marked"], tmp, marked(marker, edit)), shadow


def other_weights(project: RecordedProject, tmp: Path, marker: Path) -> tuple[str, Path]:
    """The pipeline argument's recorded UNet digest no longer matches what loads from its folder."""
    def edit(m: dict[str, Any]) -> None:
        m["arguments"]["pipe"]["pipeline"]["components"]["unet"]["weights_sha256"] = "0" * 64
    return clone_run(project, project.runs["pipeline_argument"], tmp, edit), project.path


def wrong_project_dir(project: RecordedProject, tmp: Path, marker: Path) -> tuple[str, Path]:
    (tmp / "elsewhere").mkdir()
    return clone_run(project, project.runs["marked"], tmp, marked(marker)), tmp / "elsewhere"


def outside(project: RecordedProject) -> str:
    return str(project.path.parent / "outside" / "evil.py")


REFUSALS = [
    pytest.param(tampered_outputs, "does not match its recorded sha256", id="tampered-outputs"),
    pytest.param(tampered_manifest, "manifest digest mismatch", id="tampered-manifest"),
    pytest.param(os_system(None), "without a project source file", id="os-system"),
    pytest.param(os_system("gen.py"), "module 'os' does not live in 'gen.py'", id="os-system-in-gen-py"),
    pytest.param(entry_point(qualname="undecorated"),
                 "gen.py:undecorated is not a function decorated with repro_track.record",
                 id="undecorated-function"),
    pytest.param(entry_point(module="evil", source_file="../outside/evil.py"),
                 "points outside the project dir", id="source-file-traversal"),
    pytest.param(entry_point(module="evil", source_file=outside), "is not a project-relative path",
                 id="absolute-source-file"),
    pytest.param(module_resolving_elsewhere, "resolved to", id="module-resolving-to-another-file"),
    pytest.param(wrong_project_dir, "recorded source file 'gen.py' does not exist under",
                 id="project-dir-without-the-source"),
    pytest.param(other_weights, "pipeline component 'unet' loaded from", id="pipeline-weights-changed"),
]


class TestRefusals:
    """Tampered runs, foreign entry points and calls not rebuildable here exit 2 with one line, unrun."""

    @pytest.mark.parametrize("make, phrase", REFUSALS)
    def test_refused_unrun(self, recorded_project, tmp_path, make, phrase):
        marker = tmp_path / "ran"
        run_id, project_dir = make(recorded_project, tmp_path, marker)
        done = cli_replay(recorded_project, run_id, "--json", cwd=tmp_path, project_dir=project_dir)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        [line] = error_lines(done.stderr)
        assert phrase in line
        assert done.stdout == ""
        assert not marker.exists()  # TestJsonNoLog replays an intact copy: that one writes it
        assert recorded_project.replays_of(run_id) == []


class TestUnknownRun:
    """A run that is missing, malformed or not recorded by repro-track exits 2 with one line."""

    @pytest.mark.parametrize("ref, phrase", [
        pytest.param(lambda project: "0123456789abcdef0123456789abcdef", "no run 0123456789abcdef",
                     id="missing-run-id"),
        pytest.param(lambda project: "not a run!", "is not a run id", id="malformed-reference"),
        pytest.param(lambda project: project.client().create_run(
            project.client().get_run(project.runs["marked"]).info.experiment_id).info.run_id,
            "was not recorded by repro-track", id="run-without-manifest"),
    ])
    def test_one_line_no_traceback(self, recorded_project, tmp_path, ref, phrase):
        done = cli_replay(recorded_project, ref(recorded_project), cwd=tmp_path)
        assert done.returncode == 2
        assert "Traceback" not in done.stderr
        [line] = error_lines(done.stderr)
        assert phrase in line and line == done.stderr.strip().splitlines()[-1]
        assert done.stdout == ""


def cuda_variant(marker: Path) -> Callable[[dict], None]:
    """The CPU recording turned into the one an H200 would have made with a CUDA generator."""
    gpu = h200_gpu_section()

    def edit(m: dict[str, Any]) -> None:
        generator = m["randomness"]["generators"][0]
        state = struct.pack("<QQ", generator["initial_seed"], 0)  # philox state: seed, offset
        generator.update(device="cuda", state_b64=base64.b64encode(state).decode("ascii"),
                         state_sha256=hashlib.sha256(state).hexdigest(), fresh=True)
        m["randomness"]["primary"]["generator_device"] = "cuda"
        m["determinism"]["cuda_used"] = True
        m["gpu"] = gpu

    return marked(marker, edit)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine can regenerate CUDA noise")
class TestCudaGeneratorWithoutGpu:
    """A CUDA-generator recording replayed without a GPU is expected none, exits 3 and runs nothing."""

    def test_not_rerun(self, recorded_project, tmp_path):
        marker = tmp_path / "ran"
        run_id = clone_run(recorded_project, recorded_project.runs["marked"], tmp_path, cuda_variant(marker))
        done = cli_replay(recorded_project, run_id, "--json", cwd=tmp_path)
        assert done.returncode == 3, done.stderr
        report = json.loads(done.stdout)
        assert (report["expected"], report["observed"], report["ok"], report["replay_run_id"]) == \
            ("none", None, False, None)
        assert "is a CUDA generator" in report["reasons"][0]
        assert "no usable CUDA GPU; GPU: NVIDIA H200 (132 SMs) recorded" in report["reasons"][0]
        assert not marker.exists()
        assert recorded_project.replays_of(run_id) == []


class TestJsonNoLog:
    """--json prints exactly one JSON object with the report's keys; --no-log logs no replay run."""

    @pytest.fixture(scope="class")
    def result(self, recorded_project, tmp_path_factory) -> tuple[str, Path, subprocess.CompletedProcess]:
        tmp = tmp_path_factory.mktemp("json")
        marker = tmp / "ran"
        run_id = clone_run(recorded_project, recorded_project.runs["marked"], tmp, marked(marker))
        return run_id, marker, cli_replay(recorded_project, run_id, "--json", "--no-log", cwd=tmp)

    def test_exactly_one_json_object(self, result):
        run_id, _, done = result
        assert done.returncode == 0, done.stderr
        [line] = done.stdout.splitlines()
        report = json.loads(line)
        assert set(report) == REPORT_KEYS
        assert (report["run_id"], report["expected"], report["observed"], report["ok"]) == \
            (run_id, "exact", "exact", True)
        assert report["outputs"]["output"]["bitwise_equal"] is True

    def test_function_stdout_goes_to_stderr(self, result):
        _, marker, done = result
        assert f"touched {marker}" in done.stderr
        assert "touched" not in done.stdout

    def test_no_log_creates_no_run(self, recorded_project, result):
        run_id, marker, done = result
        assert json.loads(done.stdout)["replay_run_id"] is None
        assert marker.exists()  # it did run
        assert recorded_project.replays_of(run_id) == []
        assert tags.REPLAYS not in recorded_project.client().get_run(run_id).data.tags


class TestDryRun:
    """--dry-run prints the prediction and the plan, runs nothing and logs no run."""

    def test_nothing_runs(self, recorded_project, tmp_path):
        marker = tmp_path / "ran"
        run_id = clone_run(recorded_project, recorded_project.runs["marked"], tmp_path, marked(marker))
        done = cli_replay(recorded_project, run_id, "--dry-run", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "expected   exact" in done.stdout
        assert "plan (dry run, nothing was run):" in done.stdout
        assert f"argument marker: '{marker}'" in done.stdout
        assert not marker.exists()
        assert recorded_project.replays_of(run_id) == []


@pytest.fixture(scope="module")
def edited_project(recorded_project, tmp_path_factory) -> Path:
    """A copy of the project in which gen.noise now adds 0.5 to its result (its source digest changes)."""
    dest = tmp_path_factory.mktemp("edited") / "project"
    shutil.copytree(recorded_project.path, dest, ignore=shutil.ignore_patterns("mlruns", "__pycache__"))
    gen = dest / "gen.py"
    text = gen.read_text("utf-8")
    assert text.count("    return out\n") == 1
    gen.write_text(text.replace("    return out\n", "    return out + 0.5\n"), "utf-8")
    return dest


class TestChangedSource:
    """An edited function is a reason that lowers the expectation to close; --atol decides tolerance."""

    @pytest.mark.parametrize("args, within, observed, code", [
        pytest.param([], False, "different", 1, id="default-tolerance"),
        pytest.param(["--atol", "1"], True, "close", 0, id="atol-1"),
    ])
    def test_tolerance_decides(self, recorded_project, edited_project, tmp_path, args, within, observed,
                               code):
        done = cli_replay(recorded_project, recorded_project.runs["cpu_generator"], "--json", "--no-log",
                          *args, cwd=tmp_path, project_dir=edited_project)
        assert done.returncode == code, done.stderr
        report = json.loads(done.stdout)
        assert report["expected"] == "close"
        assert any("noise changed since it was recorded" in reason for reason in report["reasons"])
        output = report["outputs"]["output"]
        assert (report["observed"], output["within_tolerance"], output["bitwise_equal"]) == \
            (observed, within, False)
        assert output["max_abs_diff"] == pytest.approx(0.5, rel=1e-3)
