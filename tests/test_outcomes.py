"""Tests for honest replay outcomes: what was compared decides what is claimed.

A returned file is recorded and compared by its content, a call that returns nothing comparable is
``unverified`` (exit 1), the same exception raised again is ``exact``, and a replay child that runs past
its timeout is ended and ``unverified``. Unit tests build comparisons from real files; the end-to-end
tests record a small project in a fresh interpreter into a real SQLite store and replay it.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RecordedProject, clone_run, recording_env, run_cli, run_script, write_project

from repro_track import audit, manifest, outcomes, outputs, rules
from repro_track.errors import ReproTrackError
from repro_track.replay import ReplayReport, replay
from repro_track.replay.compare import compare_one, decode_file, observed_level

# ---------------------------------------------------------------- returned files, in process


def file_record(tmp_path: Path, name: str, data: bytes) -> tuple[dict, torch.Tensor]:
    """The manifest record and saved bytes of a returned file, as the recorder makes them."""
    path = tmp_path / name
    path.write_bytes(data)
    [item] = outputs.normalise(str(path))
    return outputs.describe(item), torch.from_numpy(item.value.copy())


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def safetensors_bytes(tensors: dict[str, torch.Tensor], meta: str = "a") -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"written": meta})


class TestReturnedFiles:
    """A returned path to an existing file is an output recorded by content; any other string is not."""

    @pytest.mark.parametrize("name, data, fmt", [
        ("latents.npy", npy_bytes(np.arange(6, dtype=np.float32)), "npy"),
        ("image.png", png_bytes(np.zeros((4, 4, 3), np.uint8)), "png"),
        ("weights.safetensors", safetensors_bytes({"w": torch.ones(2)}), "safetensors"),
        ("notes.txt", b"hello", "bytes"),
    ])
    def test_file_recorded_by_content(self, tmp_path, name, data, fmt):
        record, saved = file_record(tmp_path, name, data)
        assert record["file"] == {"path": str(tmp_path / name), "format": fmt}
        assert (record["source"], record["dtype"], record["shape"]) == ("file", "uint8", [len(data)])
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert saved.numpy().tobytes() == data

    @pytest.mark.parametrize("value", ["made 3 images", "", "missing.npy", "a\x00b", "\udcff", "x" * 5000])
    def test_other_strings_are_not_outputs(self, tmp_path, value):
        assert outputs.normalise(value) == []
        assert outputs.normalise({"caption": value}) == []

    def test_relative_path_and_pathlib_inside_a_dict(self, tmp_path):
        (tmp_path / "out.npy").write_bytes(npy_bytes(np.ones(3)))  # tmp_path is the working dir
        items = outputs.normalise({"path": Path("out.npy"), "seed": 3})
        assert [(i.name, i.source) for i in items] == [("path", "file"), ("seed", "number")]
        assert items[0].file == {"path": "out.npy", "format": "npy"}

    def test_manifest_schema_accepts_a_file_output(self, tmp_path):
        record, _ = file_record(tmp_path, "latents.npy", npy_bytes(np.zeros(2)))
        schema = manifest.schema()["$defs"]["array"]
        import jsonschema

        jsonschema.validate(record, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**record, "file": {"path": "x", "format": "pickle"}}, schema)


class TestFileComparison:
    """Files are compared by bytes, then by their decoded arrays with the dtype's tolerance."""

    def compare(self, tmp_path, old: bytes, new: bytes, name: str = "out.npy"):
        (tmp_path / "old").mkdir(exist_ok=True)
        (tmp_path / "new").mkdir(exist_ok=True)
        rec, rec_bytes = file_record(tmp_path / "old", name, old)
        rep, rep_bytes = file_record(tmp_path / "new", name, new)
        return compare_one(rec, rep, rec_bytes, rep_bytes, None, None)

    def test_same_bytes_are_exact(self, tmp_path):
        data = npy_bytes(np.linspace(0, 1, 10, dtype=np.float32))
        result = self.compare(tmp_path, data, data)
        assert (result.bitwise_equal, result.max_abs_diff, result.within_tolerance) == (True, 0.0, True)

    @pytest.mark.parametrize("delta, within", [(1e-5, True), (0.5, False)])
    def test_npy_values_compared_with_tolerance(self, tmp_path, delta, within):
        base = np.linspace(0, 1, 10, dtype=np.float32)
        result = self.compare(tmp_path, npy_bytes(base), npy_bytes(base + np.float32(delta)))
        assert not result.bitwise_equal and result.within_tolerance is within
        assert result.max_abs_diff == pytest.approx(delta, rel=1e-2)
        assert "compared value by value" in result.note

    def test_png_pixels_compared_with_uint8_tolerance(self, tmp_path):
        pixels = np.full((8, 8, 3), 100, np.uint8)
        near, far = pixels.copy(), pixels.copy()
        near[0, 0, 0], far[0, 0, 0] = 101, 200
        assert self.compare(tmp_path, png_bytes(pixels), png_bytes(near), "a.png").within_tolerance
        assert not self.compare(tmp_path, png_bytes(pixels), png_bytes(far), "a.png").within_tolerance

    def test_other_file_bytes_same_content_is_exact(self, tmp_path):
        tensors = {"w": torch.arange(4.0)}
        result = self.compare(tmp_path, safetensors_bytes(tensors, "monday"),
                              safetensors_bytes(tensors, "tuesday"), "w.safetensors")
        assert (result.bitwise_equal, result.max_abs_diff) == (True, 0.0)
        assert "bit-identical" in result.note

    def test_undecodable_file_differs(self, tmp_path):
        result = self.compare(tmp_path, b"one", b"two", "notes.txt")
        assert not result.within_tolerance and "no tolerance applies" in result.note

    def test_pickled_npy_is_never_unpickled(self, tmp_path):
        """An object .npy (what an attacker would plant to run code on load) is refused, not loaded."""
        marker = tmp_path / "unpickled"

        class Planted:
            def __reduce__(self):
                return (Path(str(marker)).write_text, ("ran",))

        evil = io.BytesIO()
        np.save(evil, np.array([Planted()], dtype=object), allow_pickle=True)
        result = self.compare(tmp_path, npy_bytes(np.zeros(1, dtype=object).astype(np.float64)),
                              evil.getvalue())
        assert not result.within_tolerance and "could not be read" in result.note
        with pytest.raises(ValueError):
            decode_file("npy", evil.getvalue())
        assert not marker.exists()

    def test_file_against_array_differs(self, tmp_path):
        rec, rec_bytes = file_record(tmp_path, "out.npy", npy_bytes(np.zeros(2)))
        arr = outputs.describe(outputs.NamedArray("output", torch.zeros(2), "tensor"))
        result = compare_one(rec, arr, rec_bytes, torch.zeros(2), None, None)
        assert not result.within_tolerance and "file on one side" in result.note


class TestOverwrite:
    """Returned files a replay would write outside its scratch folder are named before it runs."""

    @pytest.mark.parametrize("path, named", [
        ("EXISTING", True), ("/no/such/folder/out.npy", False), ("out.npy", False),
        ("sub/out.npy", False), ("../out.npy", True), ("sub/../../out.npy", True),
    ])
    def test_named_paths(self, tmp_path, path, named):
        from repro_track.replay import _overwritten_files

        existing = tmp_path / "existing.npy"
        existing.write_bytes(b"x")
        path = str(existing) if path == "EXISTING" else path
        record = {"name": "output", "file": {"path": path, "format": "npy"}}
        assert _overwritten_files([record, {"name": "array"}]) == ([path] if named else [])


# ---------------------------------------------------------------- the outcome list


class TestOutcomeList:
    """One list of outcomes, used by the rules, the report and audit."""

    def test_expected_is_the_rules_levels(self):
        assert outcomes.EXPECTED == rules.LEVELS

    def test_audit_counts_every_observed_outcome(self):
        assert audit.OUTCOMES[:len(outcomes.OBSERVED)] == outcomes.OBSERVED
        assert "unverified" in audit.OUTCOMES

    @pytest.mark.parametrize("expected, observed, ok, code", [
        ("exact", "unverified", False, 1),
        ("close", "unverified", False, 1),
        ("none", "unverified", False, 1),
        ("close", "exact", True, 0),
        ("exact", "different", False, 1),
    ])
    def test_report_ok_and_exit(self, expected, observed, ok, code):
        report = ReplayReport("r", None, expected, observed, [])
        assert (report.ok, report.exit_code, report.to_dict()["ok"]) == (ok, code, ok)

    @pytest.mark.parametrize("variable, given", [("soon", None), ("-5", None), ("", -1.0)])
    def test_bad_timeout_is_refused_before_anything_runs(self, monkeypatch, variable, given):
        monkeypatch.setenv("REPRO_TRACK_REPLAY_TIMEOUT", variable)
        with pytest.raises(ReproTrackError, match="timeout|TIMEOUT"):
            replay("no-such-run", tracking_uri="sqlite:///unused.db", timeout=given)
        assert not Path("unused.db").exists()


class TestObservedLevel:
    """What was compared decides the observed level and its reason."""

    FINISHED = {"status": "FINISHED", "error": None, "return_type": "builtins.str"}

    @staticmethod
    def failed(kind: str, message: str) -> dict:
        return {"status": "FAILED", "error": {"type": kind, "message": message, "traceback": ""}}

    def test_nothing_compared_is_unverified(self):
        level, why = observed_level({}, self.FINISHED, self.FINISHED)
        assert level == "unverified"
        assert "builtins.str" in why and "return the array or image" in why

    def test_same_exception_is_exact(self):
        err = self.failed("builtins.ValueError", "n must be even")
        level, why = observed_level({}, err, dict(err))
        assert level == "exact" and "error (type and message) was compared" in why

    @pytest.mark.parametrize("replayed", [
        {"status": "FAILED", "error": {"type": "builtins.ValueError", "message": "other"}},
        {"status": "FAILED", "error": {"type": "builtins.KeyError", "message": "n must be even"}},
        {"status": "FINISHED", "error": None},
    ])
    def test_other_exception_or_none_is_different(self, replayed):
        level, why = observed_level({}, self.failed("builtins.ValueError", "n must be even"), replayed)
        assert level == "different" and why


# ---------------------------------------------------------------- end to end

GEN_FILES_PY = '''
    """Decorated functions whose results are files, text, an exception, or a long wait."""
    import os
    import pathlib
    import subprocess
    import time

    import numpy as np
    import torch

    import repro_track

    EXPERIMENT = "outcome-tests"


    @repro_track.record(experiment=EXPERIMENT)
    def save_latents(n: int, *, generator=None):
        path = pathlib.Path("latents.npy")
        np.save(path, torch.randn(n, n, generator=generator).numpy())
        return str(path)


    @repro_track.record(experiment=EXPERIMENT)
    def save_absolute(folder: str, n: int, *, generator=None):
        path = pathlib.Path(folder) / "absolute.npy"
        np.save(path, torch.randn(n, generator=generator).numpy())
        return path


    @repro_track.record(experiment=EXPERIMENT)
    def summary(n: int):
        return f"made {n} things"


    @repro_track.record(experiment=EXPERIMENT)
    def refuse(n: int):
        raise ValueError(f"n must be even, got {n}")


    @repro_track.record(experiment=EXPERIMENT)
    def linger(seconds: float, marker: str):
        helper = subprocess.Popen(["sleep", str(seconds)])
        pathlib.Path(marker).write_text(f"{os.getpid()} {helper.pid}", "utf-8")
        time.sleep(seconds)
        helper.wait()
        return torch.zeros(2)
'''

RECORD_FILES_PY = '''
    """Record one call of each gen_files function; print {case: run id} as JSON."""
    import json
    import sys

    import torch

    import gen_files as g
    import repro_track

    runs = {}
    g.save_latents(4, generator=torch.Generator("cpu").manual_seed(1))
    runs["relative_npy"] = repro_track.last_recording(g.save_latents).wait(120)
    g.save_absolute(sys.argv[1], 3, generator=torch.Generator("cpu").manual_seed(2))
    runs["absolute_npy"] = repro_track.last_recording(g.save_absolute).wait(120)
    g.summary(3)
    runs["text"] = repro_track.last_recording(g.summary).wait(120)
    try:
        g.refuse(3)
    except ValueError:
        pass
    runs["raises"] = repro_track.last_recording(g.refuse).wait(120)
    g.linger(0, "linger-marker")
    runs["linger"] = repro_track.last_recording(g.linger).wait(120)
    print(json.dumps(runs))
'''


@pytest.fixture(scope="module")
def files_project(tmp_path_factory) -> RecordedProject:
    """gen_files.py recorded once in a fresh interpreter (its absolute file in a folder of its own)."""
    root = tmp_path_factory.mktemp("outcomes")
    project = write_project(root / "project", {"gen_files.py": GEN_FILES_PY,
                                               "record_files.py": RECORD_FILES_PY})
    (root / "absolute").mkdir()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    done = run_script(project / "record_files.py", str(root / "absolute"),
                      env=recording_env(uri, root / "spool"), cwd=project)
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(runs.values()), f"a recording was spooled instead of logged: {runs}\n{done.stderr}"
    return RecordedProject(project, uri, runs)


def replay_case(project: RecordedProject, run_id: str, **options) -> ReplayReport:
    return replay(run_id, tracking_uri=project.tracking_uri, project_dir=project.path, log=False,
                  **options)


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an orphan may wait to be reaped by init)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.slow
class TestReplayedOutcomes:
    """Recorded calls replayed in a fresh process report only what they compared."""

    def test_returned_npy_path_is_compared_by_content(self, files_project):
        recorded = (files_project.path / "latents.npy").read_bytes()
        report = replay_case(files_project, files_project.runs["relative_npy"])
        assert (report.expected, report.observed, report.ok, report.exit_code) == ("exact", "exact", True, 0)
        assert report.outputs["output"].bitwise_equal
        # the replay wrote into its scratch folder: the recording's own file is untouched
        assert (files_project.path / "latents.npy").read_bytes() == recorded

    def test_returned_text_is_unverified_and_exit_1(self, files_project, tmp_path):
        done = run_cli("replay", files_project.runs["text"], "--tracking-uri", files_project.tracking_uri,
                       "--project-dir", str(files_project.path), "--json", "--no-log", cwd=tmp_path)
        assert done.returncode == 1, done.stderr
        report = json.loads(done.stdout)
        assert (report["observed"], report["ok"], report["outputs"]) == ("unverified", False, {})
        assert any("returned builtins.str" in r and "return the array or image" in r
                   for r in report["reasons"])

    def test_same_exception_is_exact(self, files_project):
        report = replay_case(files_project, files_project.runs["raises"])
        assert (report.observed, report.ok, report.exit_code) == ("exact", True, 0)
        assert any("error (type and message) was compared" in r for r in report.reasons)

    def test_absolute_path_needs_force(self, files_project):
        path = str(Path(files_project.path).parent / "absolute" / "absolute.npy")
        before = Path(path).stat().st_mtime_ns
        refused = replay_case(files_project, files_project.runs["absolute_npy"])
        assert (refused.observed, refused.exit_code) == (None, 3)
        assert any(path in r and "--force" in r for r in refused.reasons)
        assert Path(path).stat().st_mtime_ns == before
        forced = replay_case(files_project, files_project.runs["absolute_npy"], force=True)
        assert (forced.observed, forced.exit_code) == ("exact", 0)

    def test_child_past_its_timeout_is_ended_and_unverified(self, files_project, tmp_path):
        marker = tmp_path / "linger"

        def longer(m: dict) -> None:
            m["arguments"]["seconds"]["value"] = 600
            m["arguments"]["marker"]["value"] = str(marker)

        run_id = clone_run(files_project, files_project.runs["linger"], tmp_path, longer)
        started = time.monotonic()
        report = replay_case(files_project, run_id, timeout=25)
        assert time.monotonic() - started < 120
        assert (report.observed, report.ok, report.exit_code) == ("unverified", False, 1)
        assert any("timeout of 25 s" in r and "--timeout" in r for r in report.reasons)
        if marker.exists():  # the call had started: it and the process it started are gone
            pids = [int(p) for p in marker.read_text("utf-8").split()]
            deadline = time.monotonic() + 10
            while any(alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not any(alive(p) for p in pids)
