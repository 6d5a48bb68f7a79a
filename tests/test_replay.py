"""Tests for repro_track.replay: rerun a recorded call in a fresh process and compare, for real.

Runs are recorded by real subprocesses into real SQLite MLflow stores and replayed in fresh
interpreters; the session's ``recorded_project`` (conftest) is recorded once and shared.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from conftest import REPO, clone_run, recording_env, run_script, write_project

from repro_track import runs, store, tags
from repro_track.capture import cpu
from repro_track.manifest import Manifest
from repro_track.replay import ReplayReport, replay
from repro_track.replay.compare import OutputComparison, compare_one, observed_level, tolerance
from repro_track.replay.plan import child_environment
from repro_track.rules import Here


def load(uri: str, run_id: str, dest: Path) -> dict[str, Any]:
    """A run's manifest as a dict, read back through the store's checks."""
    return runs.load_run(store.client_for(uri), run_id, dest).manifest.to_dict()


def dig(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    """data[path[0]][path[1]]..."""
    return functools.reduce(lambda d, key: d[key], path, data)


@pytest.fixture(scope="module")
def replayed(recorded_project) -> Callable[[str], ReplayReport]:
    """Replay a case of the recorded project (each at most once per module, logged)."""

    @functools.cache
    def replay_case(case: str) -> ReplayReport:
        return replay(recorded_project.runs[case], tracking_uri=recorded_project.tracking_uri,
                                  project_dir=recorded_project.path)

    return replay_case


SAME_MACHINE = [
    pytest.param("cpu_generator", lambda m: m["randomness"]["generators"][0]["device"] == "cpu",
                 id="cpu-generator"),
    pytest.param("consumed_generator", lambda m: not m["randomness"]["generators"][0]["fresh"],
                 id="generator-consumed-before-the-call"),
    pytest.param("pipeline_argument", lambda m: m["arguments"]["pipe"]["kind"] == "pipeline",
                 id="pipeline-argument"),
    pytest.param("script_main", lambda m: m["call"]["is_script"] and m["call"]["module"] == "__main__",
                 id="function-of-a-script-run-as-main"),
    pytest.param("global_rng", lambda m: m["randomness"]["global"]["torch_cpu"]["consumed"]
                 and m["randomness"]["global"]["numpy"]["consumed"]
                 and m["randomness"]["global"]["python"]["consumed"], id="global-rngs"),
]


class TestSameMachine:
    """A run replayed on the machine that recorded it is expected exact and comes back exact."""

    @pytest.mark.parametrize("case, recorded_as_claimed", SAME_MACHINE)
    def test_replays_bit_exact(self, recorded_project, replayed, tmp_path, case, recorded_as_claimed):
        assert recorded_as_claimed(load(recorded_project.tracking_uri, recorded_project.runs[case], tmp_path))
        report = replayed(case)
        assert (report.expected, report.observed, report.ok, report.exit_code) == ("exact", "exact", True, 0)
        assert report.outputs
        for comparison in report.outputs.values():
            assert (comparison.bitwise_equal, comparison.max_abs_diff) == (True, 0.0)


class TestExamples:
    """The shipped examples, run as scripts, replay bit-exactly from the repository root."""

    @pytest.mark.parametrize("script", ["ddim_cpu.py", "text_to_image.py", "img2img.py"])
    def test_example_replays_exactly(self, tracking_uri, example_env, tmp_path, script):
        id_file = tmp_path / "run_id"
        done = run_script(REPO / "examples" / script, "--steps", "2", "--run-id-file", str(id_file),
                          env={**example_env, "MLFLOW_TRACKING_URI": tracking_uri}, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        run_id = id_file.read_text("utf-8").strip()
        report = replay(run_id, tracking_uri=tracking_uri, project_dir=REPO)
        assert (report.expected, report.observed, report.exit_code) == ("exact", "exact", 0)
        assert report.outputs["output"].bitwise_equal
        manifest = load(tracking_uri, run_id, tmp_path)
        assert manifest["call"]["source_file"] == f"examples/{script}"
        assert manifest["arguments"]["pipe"]["kind"] == "pipeline"


SENSITIVE_SCRIPT = '''
    """Record gen.sensitive in a process unlike the replaying one: 1 thread, deterministic algorithms."""
    import torch

    import gen
    import repro_track

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    gen.sensitive(1 << 20, generator=torch.Generator("cpu").manual_seed(0))
    print(repro_track.last_recording(gen.sensitive).wait(120))
'''


class Sensitive:
    """The recorded and the replayed manifests of gen.sensitive, and the replay's report."""

    def __init__(self, original: dict, replayed: dict, report: ReplayReport):
        self.original, self.replayed, self.report = original, replayed, report


@pytest.fixture(scope="module")
def sensitive(recorded_project, tmp_path_factory) -> Sensitive:
    """gen.sensitive recorded with ATEN_CPU_CAPABILITY=default and PYTHONHASHSEED=123, then replayed
    from this process with ATEN_CPU_CAPABILITY=avx2 and PYTHONHASHSEED=999 in its environment."""
    workdir = tmp_path_factory.mktemp("sensitive")
    script = write_project(recorded_project.path, {"record_sensitive.py": SENSITIVE_SCRIPT})
    env = recording_env(recorded_project.tracking_uri, workdir / "spool",
                        ATEN_CPU_CAPABILITY="default", PYTHONHASHSEED="123")
    done = run_script(script / "record_sensitive.py", env=env, cwd=recorded_project.path)
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATEN_CPU_CAPABILITY", "avx2")
        mp.setenv("PYTHONHASHSEED", "999")
        report = replay(run_id, tracking_uri=recorded_project.tracking_uri,
                                    project_dir=recorded_project.path)
    return Sensitive(load(recorded_project.tracking_uri, run_id, workdir / "original"),
                     load(recorded_project.tracking_uri, report.replay_run_id, workdir / "replay"), report)


NEEDS_AVX2 = pytest.mark.skipif(not cpu.supports_capability("AVX2", cpu.capture_cpu()["isa_flags"]),
                                reason="the replay sets ATEN_CPU_CAPABILITY=avx2, which this CPU lacks")


class TestRestoredDifferences:
    """What the replayer restores differs between recording and replay, and still comes back exact."""

    def test_replay_is_exact(self, sensitive):
        assert (sensitive.report.expected, sensitive.report.observed, sensitive.report.exit_code) == \
            ("exact", "exact", 0)

    @pytest.mark.parametrize("output, path, value, reason", [
        pytest.param("threads", ("determinism", "num_threads"), 1, "threads: 1 recorded", id="threads"),
        pytest.param("kernels", ("cpu", "torch_capability"), "DEFAULT", "the replay pins DEFAULT",
                     id="cpu-isa", marks=NEEDS_AVX2),
        pytest.param("knobs", ("determinism", "deterministic_algorithms"), True, None,
                     id="determinism-knobs"),
        pytest.param("hash", ("env_vars", "captured", "PYTHONHASHSEED"), "123", "PYTHONHASHSEED",
                     id="allow-listed-env-var"),
    ])
    def test_recorded_value_is_restored(self, sensitive, output, path, value, reason):
        assert dig(sensitive.original, path) == value
        assert dig(sensitive.replayed, path) == value
        assert sensitive.report.outputs[output].bitwise_equal
        if reason is not None:  # the prediction saw the difference, so the replay really had one
            assert any(reason in text for text in sensitive.report.reasons), sensitive.report.reasons


class TestReplayRun:
    """The replay is logged in the original's experiment, and the two runs link to each other."""

    def test_replay_run_is_tagged(self, recorded_project, replayed):
        report = replayed("cpu_generator")
        client = recorded_project.client()
        original = client.get_run(report.run_id)
        replay = client.get_run(report.replay_run_id)
        assert replay.info.experiment_id == original.info.experiment_id
        wanted = {tags.REPLAY_OF: report.run_id, tags.EXPECTED: "exact", tags.OBSERVED: "exact",
                  tags.KIND: "replay"}
        assert {key: replay.data.tags.get(key) for key in wanted} == wanted
        assert replay.data.metrics["max_abs_diff.output"] == 0.0

    def test_runs_are_linked_both_ways(self, recorded_project, replayed):
        report = replayed("cpu_generator")
        client = recorded_project.client()
        original = client.get_run(report.run_id).data.tags
        replay = client.get_run(report.replay_run_id).data.tags
        assert report.replay_run_id in original[tags.REPLAYS].split(",")
        assert report.replay_run_id in original[tags.MLFLOW_NOTE]
        assert report.run_id in replay[tags.MLFLOW_NOTE]

    @pytest.mark.parametrize("case", ["cpu_generator", "script_main"])
    def test_replay_run_can_be_replayed_in_turn(self, recorded_project, replayed, case):
        first = replayed(case)
        card = recorded_project.client().get_run(first.replay_run_id).data.tags[tags.MLFLOW_NOTE]
        assert f"repro-track replay {first.replay_run_id}" in card
        again = replay(first.replay_run_id, tracking_uri=recorded_project.tracking_uri,
                       project_dir=recorded_project.path, log=False)
        assert (again.expected, again.observed) == ("exact", "exact")

    def test_replay_artifacts_are_the_replays_own_recording(self, recorded_project, replayed, tmp_path):
        report = replayed("cpu_generator")
        replay = load(recorded_project.tracking_uri, report.replay_run_id, tmp_path / "replay")
        original = load(recorded_project.tracking_uri, report.run_id, tmp_path / "original")
        assert (replay["kind"], replay["replay_of"]) == ("replay", report.run_id)
        assert replay["outputs"][0]["sha256"] == original["outputs"][0]["sha256"]
        assert replay["call"]["started_at"] != original["call"]["started_at"]


class TestDryRun:
    """A dry run predicts and plans against this process's environment, and runs nothing."""

    @pytest.mark.parametrize("variable, value, line", [
        pytest.param("ATEN_CPU_CAPABILITY", "default", "set ATEN_CPU_CAPABILITY={recorded}",
                     id="kernel-level-pinned-to-the-recorded-one"),
        pytest.param("CUBLAS_WORKSPACE_CONFIG", ":4096:8", "unset CUBLAS_WORKSPACE_CONFIG",
                     id="unrecorded-variable-unset"),
        pytest.param("OPENBLAS_NUM_THREADS", "3", "unset OPENBLAS_NUM_THREADS", id="thread-variable-unset"),
    ])
    def test_plan_rebuilds_the_recorded_environment(self, recorded_project, monkeypatch, tmp_path,
                                                    variable, value, line):
        run_id = recorded_project.runs["cpu_generator"]
        recorded = load(recorded_project.tracking_uri, run_id, tmp_path)
        assert variable not in recorded["env_vars"]["captured"]
        monkeypatch.setenv(variable, value)
        report = replay(run_id, tracking_uri=recorded_project.tracking_uri,
                                    project_dir=recorded_project.path, dry_run=True)
        aten = cpu.aten_capability_env_value(recorded["cpu"]["torch_capability"])
        assert line.format(recorded=aten) in report.plan
        assert (report.dry_run, report.observed, report.replay_run_id, report.exit_code) == \
            (True, None, None, 0)
        assert "plan" in report.to_dict()

    def test_nothing_runs(self, recorded_project, tmp_path):
        def mark(m: dict) -> None:
            m["arguments"]["marker"]["value"] = str(tmp_path / "ran")

        run_id = clone_run(recorded_project, recorded_project.runs["marked"], tmp_path, mark)
        report = replay(run_id, tracking_uri=recorded_project.tracking_uri,
                                    project_dir=recorded_project.path, dry_run=True)
        assert report.expected == "exact"
        assert any(line.startswith("argument marker: ") for line in report.plan)
        assert not (tmp_path / "ran").exists()
        assert recorded_project.replays_of(run_id) == []


AVX2_FLAGS = ["avx", "avx2", "fma", "sse4_1", "sse4_2"]
AVX512_FLAGS = AVX2_FLAGS + ["avx512bw", "avx512dq", "avx512f", "avx512vl"]


class TestChildEnvironment:
    """The child gets the recorded allow-listed variables and ATen kernel level, never one this CPU lacks."""

    @pytest.fixture(scope="class")
    def recorded(self, recorded_project, tmp_path_factory) -> Manifest:
        client = store.client_for(recorded_project.tracking_uri)
        return runs.load_run(client, recorded_project.runs["cpu_generator"],
                              tmp_path_factory.mktemp("manifest")).manifest

    @pytest.mark.parametrize("capability, recorded_env, flags, pinned", [
        pytest.param("AVX512", None, AVX512_FLAGS, "avx512", id="pinned-to-the-recorded-level"),
        pytest.param("AVX512", None, AVX2_FLAGS, None, id="recorded-level-missing-here"),
        pytest.param("DEFAULT", "default", AVX2_FLAGS, "default", id="recorded-variable-restored"),
        pytest.param("AVX512", "avx512", AVX512_FLAGS, "avx512", id="recorded-variable-supported-here"),
        pytest.param("AVX512", "avx512", AVX2_FLAGS, None, id="recorded-variable-missing-here"),
    ])
    def test_kernel_level(self, recorded, monkeypatch, capability, recorded_env, flags, pinned):
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        captured = {"PYTHONHASHSEED": "5"} | ({"ATEN_CPU_CAPABILITY": recorded_env} if recorded_env else {})
        m = dataclasses.replace(recorded, cpu={**recorded.cpu, "torch_capability": capability},
                                env_vars={"captured": captured, "redacted": [], "dropped": []})
        here = Here(cpu={"isa_flags": flags}, gpu={}, software={}, cuda_usable=False)
        env_set, _, notes = child_environment(m, here)
        assert env_set.get("ATEN_CPU_CAPABILITY") == pinned
        assert env_set["PYTHONHASHSEED"] == "5"
        if pinned is None:  # forcing kernels the CPU lacks would crash the child (SIGILL on x86)
            assert notes == [f"ATen CPU kernels cannot be pinned to {capability} on this CPU"]


class TestCompareOne:
    """One output is compared bitwise, by its differences, and against per-dtype tolerances."""

    @staticmethod
    def record(array: torch.Tensor) -> dict[str, Any]:
        from repro_track import outputs

        return outputs.describe(outputs.NamedArray("x", array, "tensor"))

    @pytest.mark.parametrize("old, new, atol, rtol, equal, within, max_diff", [
        pytest.param([1.0, 2.0], [1.0, 2.0], None, None, True, True, 0.0, id="identical"),
        pytest.param([1.0, 2.0], [1.0, 2.0005], None, None, False, True, 0.0005, id="inside-default"),
        pytest.param([1.0, 2.0], [1.0, 2.1], None, None, False, False, 0.1, id="outside-default"),
        pytest.param([1.0, 2.0], [1.0, 2.1], 0.2, 0.0, False, True, 0.1, id="atol-override-widens"),
        pytest.param([1.0, 2.0], [1.0, 2.0005], 0.0, 0.0, False, False, 0.0005, id="zero-tolerance"),
        pytest.param([100.0], [100.05], 0.0, 1e-3, False, True, 0.05, id="rtol-scales-with-value"),
    ])
    def test_float32(self, old, new, atol, rtol, equal, within, max_diff):
        a, b = torch.tensor(old), torch.tensor(new)
        result = compare_one(self.record(a), self.record(b), a, b, atol, rtol)
        assert (result.bitwise_equal, result.within_tolerance) == (equal, within)
        assert result.max_abs_diff == pytest.approx(max_diff, rel=1e-3)

    @pytest.mark.parametrize("dtype, expected", [
        ("float32", (1e-3, 1e-3)), ("float16", (1e-2, 1e-2)), ("bfloat16", (2e-2, 2e-2)),
        ("float64", (1e-6, 1e-6)), ("uint8", (2.0, 0.0)), ("int64", (0.0, 0.0)),
    ])
    def test_default_tolerance_per_dtype(self, dtype, expected):
        assert tolerance(dtype, None, None) == expected

    def test_other_shape_is_a_difference(self):
        a, b = torch.zeros(2), torch.zeros(3)
        result = compare_one(self.record(a), self.record(b), a, b, None, None)
        assert (result.bitwise_equal, result.within_tolerance) == (False, False)
        assert "[2]" in result.note and "[3]" in result.note

    def test_missing_output_is_a_difference(self):
        a = torch.zeros(2)
        result = compare_one(self.record(a), None, a, None, None, None)
        assert not result.within_tolerance and "did not produce" in result.note


class TestObservedLevel:
    """The observed level is the worst over outputs, and a changed call status is a difference."""

    EXACT = OutputComparison(True, 0.0, 0.0, True)
    CLOSE = OutputComparison(False, 1e-4, 1e-5, True)
    FAR = OutputComparison(False, 1.0, 0.5, False)

    @pytest.mark.parametrize("results, statuses, level", [
        ([EXACT, EXACT], ("FINISHED", "FINISHED"), "exact"),
        ([EXACT, CLOSE], ("FINISHED", "FINISHED"), "close"),
        ([CLOSE, FAR], ("FINISHED", "FINISHED"), "different"),
        ([EXACT], ("FINISHED", "FAILED"), "different"),
        ([], ("FAILED", "FAILED"), "exact"),  # the same exception: compared by type and message
        ([], ("FINISHED", "FINISHED"), "unverified"),  # nothing was compared
    ])
    def test_level(self, results, statuses, level):
        error = {"type": "builtins.ValueError", "message": "bad"}
        calls = [{"status": s, "error": error if s == "FAILED" else None} for s in statuses]
        assert observed_level({str(i): r for i, r in enumerate(results)}, *calls)[0] == level


class TestReplayReport:
    """ok and the exit code follow from expected vs observed."""

    @pytest.mark.parametrize("expected, observed, dry_run, ok, code", [
        ("exact", "exact", False, True, 0),
        ("close", "exact", False, True, 0),
        ("close", "close", False, True, 0),
        ("exact", "close", False, False, 1),
        ("close", "different", False, False, 1),
        ("exact", "unverified", False, False, 1),
        ("none", None, False, False, 3),
        ("none", None, True, True, 0),
    ])
    def test_exit_code(self, expected, observed, dry_run, ok, code):
        report = ReplayReport("r", None, expected, observed, [], dry_run=dry_run)
        assert (report.ok, report.exit_code) == (ok, code)


class TestPublicApi:
    """repro_track.replay is the replay function, however often and in whatever order it is reached."""

    def test_replay_attribute_stays_the_function(self):
        code = ("import repro_track; first = repro_track.replay; import repro_track.replay.child; "
                "second = repro_track.replay; print(callable(first), callable(second))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.stdout.split() == ["True", "True"], done.stderr


class TestEarlyChild:
    """The child starts importing while the parent plans; it runs only the plan it is then given."""

    @pytest.fixture
    def spawned(self, monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, subprocess.Popen]]:
        import importlib

        replay_module = importlib.import_module("repro_track.replay")  # the package, not the function
        calls: list[tuple[bool, subprocess.Popen]] = []
        original = replay_module._spawn_child

        def spawn(*args: Any, **kwargs: Any) -> subprocess.Popen:
            proc = original(*args, **kwargs)
            calls.append((kwargs["wait_for_go"], proc))
            return proc

        monkeypatch.setattr(replay_module, "_spawn_child", spawn)
        return calls

    def test_the_child_started_early_is_the_one_that_runs(self, recorded_project, spawned):
        report = replay(recorded_project.runs["cpu_generator"], tracking_uri=recorded_project.tracking_uri,
                        project_dir=recorded_project.path, log=False)
        assert report.observed == "exact"
        assert [early for early, _ in spawned] == [True]

    def test_what_may_differ_from_the_environment_it_started_with(self) -> None:
        from repro_track.replay import _same_child_env

        started = {"PATH": "/usr/bin", "OMP_NUM_THREADS": "1", "HOME": "h"}
        # A library this process imported afterwards set a variable of its own: still the same child.
        assert _same_child_env({**started, "_MLFLOW_TELEMETRY_SESSION_ID": "x", "HOME": "g"}, started)
        for name, value in (("OMP_NUM_THREADS", "2"), ("CUBLAS_WORKSPACE_CONFIG", ":16:8"),
                            ("PYTHONPATH", "elsewhere"), ("LD_PRELOAD", "lib.so"), ("PATH", "/opt/bin")):
            assert not _same_child_env({**started, name: value}, started), name
        assert not _same_child_env({k: v for k, v in started.items() if k != "OMP_NUM_THREADS"}, started)

    def test_it_starts_before_the_run_is_loaded_and_ends_when_there_is_none(self, recorded_project, spawned):
        from repro_track.errors import RunNotFoundError

        with pytest.raises(RunNotFoundError):
            replay("0" * 32, tracking_uri=recorded_project.tracking_uri, project_dir=recorded_project.path,
                   log=False)
        assert [early for early, _ in spawned] == [True]
        assert spawned[0][1].poll() is not None  # ended, having run nothing

    def test_a_replay_that_stops_before_running_ends_it(self, recorded_project, spawned, tmp_path):
        from repro_track.errors import ReproTrackError

        with pytest.raises(ReproTrackError):  # the recorded source file is not in this folder
            replay(recorded_project.runs["cpu_generator"], tracking_uri=recorded_project.tracking_uri,
                   project_dir=tmp_path, log=False)
        assert [early for early, _ in spawned] == [True]
        assert spawned[0][1].poll() is not None  # ended, having run nothing

    def test_another_environment_in_the_plan_gets_a_fresh_child(self, recorded_project, spawned, monkeypatch):
        import importlib

        plan_module = importlib.import_module("repro_track.replay.plan")
        original = plan_module.child_environment

        def planned(m: Any, here: Any) -> Any:
            env_set, unset, notes = original(m, here)
            return {**env_set, "CUBLAS_WORKSPACE_CONFIG": ":16:8"}, unset, notes

        monkeypatch.setattr(plan_module, "child_environment", planned)
        report = replay(recorded_project.runs["cpu_generator"], tracking_uri=recorded_project.tracking_uri,
                        project_dir=recorded_project.path, log=False)
        assert report.observed is not None
        assert [early for early, _ in spawned] == [True, False]
        assert spawned[0][1].poll() is not None
