"""Reliability and team scale: concurrency, large outputs, slow or dead servers, HTTP, audit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from conftest import MlflowServer, record_show_diff_replay, run_cli, run_script, write_project

GEN = '''
    import sys

    import torch

    import repro_track


    @repro_track.record(experiment="team")
    def make(index: int, *, generator=None):
        """Noise from the generator, tagged by the call's index so runs can be told apart."""
        return torch.randn(8, generator=generator) + index


    if __name__ == "__main__":
        start, count = int(sys.argv[1]), int(sys.argv[2])
        for i in range(start, start + count):
            make(i, generator=torch.Generator().manual_seed(i))
            outcome = repro_track.last_recording(make)
            print(outcome.wait(120) or "SPOOLED", flush=True)
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder with one recorded generation function."""
    return write_project(tmp_path / "proj", {"gen.py": GEN})


def _env(tracking_uri: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
            "REPRO_TRACK_SPOOL_DIR": str(tmp_path / "spool"), **extra}


def _runs(tracking_uri: str, experiment: str = "team") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], max_results=1000)


def _manifest(tracking_uri: str, run_id: str) -> dict:
    import tempfile

    from repro_track import runs, store

    with tempfile.TemporaryDirectory() as tmp:
        return runs.load_run(store.client_for(tracking_uri), run_id, Path(tmp)).manifest.to_dict()


class TestConcurrentProcesses:
    """Four processes recording 25 calls each into one new SQLite file lose nothing."""

    def test_all_runs_present_and_valid(self, project, tmp_path, tracking_uri):
        env = _env(tracking_uri, tmp_path)
        procs = [subprocess.Popen([sys.executable, "gen.py", str(p * 100), "25"], cwd=project, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for p in range(4)]
        results = [p.communicate(timeout=600) for p in procs]
        for proc, (out, err) in zip(procs, results):
            assert proc.returncode == 0, err[-2000:]
            assert "RecordingWarning" not in err and "database is locked" not in err
            assert "SPOOLED" not in out
        runs = _runs(tracking_uri)
        assert len(runs) == 100
        indexes = sorted(int(r.data.params["arg.index"]) for r in runs)
        assert indexes == [p * 100 + i for p in range(4) for i in range(25)]
        for run in runs[::10]:  # a sample: each manifest validates and matches its own call
            m = _manifest(tracking_uri, run.info.run_id)
            assert m["arguments"]["index"]["value"] == int(run.data.params["arg.index"])
            assert m["randomness"]["generators"][0]["initial_seed"] == m["arguments"]["index"]["value"]


class TestConcurrentThreads:
    """Eight threads recording at once: every call is its own run, attributed to its thread."""

    def test_threads(self, migrated_store):
        import torch

        import repro_track

        @repro_track.record(experiment="threads")
        def make(index: int):
            return torch.full((3,), float(index))

        seen: dict[int, str] = {}
        errors: list[BaseException] = []

        def work(thread: int) -> None:
            try:
                for i in range(5):
                    index = thread * 10 + i
                    make(index)
                    seen[index] = repro_track.last_recording(make).wait(120)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        with warnings.catch_warnings():
            warnings.simplefilter("error", repro_track.RecordingWarning)
            threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert not errors
        assert len(seen) == 40 and len(set(seen.values())) == 40
        runs = {r.info.run_id: r for r in _runs(migrated_store, "threads")}
        assert len(runs) == 40
        for index, run_id in seen.items():
            assert runs[run_id].data.params["arg.index"] == str(index)


class TestLargeOutput:
    """A 1 GiB output is digested and saved streaming: peak memory grows by far less than its size."""

    def test_peak_memory(self, tmp_path):
        script = tmp_path / "big.py"
        script.write_text('''
import resource, sys
import numpy as np
import torch, mlflow, repro_track  # a generation has torch loaded; import it all before the baseline
from repro_track import capture, outputs, runs, spool, store  # noqa: F401
big = np.random.default_rng(0).random(1 << 28, dtype=np.float32)  # 1 GiB

@repro_track.record(tracking_uri=f"sqlite:///{sys.argv[1]}/m.db", experiment="big")
def make():
    return big

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
make()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import json
print(json.dumps({"run_id": repro_track.last_recording(make).wait(300), "extra": after - before}))
''')
        done = run_script(script, str(tmp_path), env={**os.environ, "REPRO_TRACK_SPOOL_DIR": str(tmp_path / "s")})
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["run_id"]
        # Budget: the output itself is already resident; recording may add a small constant only.
        assert result["extra"] < 256 * 2**20, f"recording added {result['extra'] / 2**20:.0f} MiB"
        m = _manifest(f"sqlite:///{tmp_path}/m.db", result["run_id"])
        assert m["outputs"][0]["nbytes"] == 1 << 30


class TestSlowStore:
    """An upload past the deadline returns at once, finishes in the background, and is never doubled."""

    def test_late_upload_lands_once(self, migrated_store, tmp_path, monkeypatch):
        import torch

        import repro_track

        monkeypatch.setenv("REPRO_TRACK_LOG_TIMEOUT", "0.000001")
        monkeypatch.setenv("REPRO_TRACK_DELIVERY", "sync")  # the call waits, briefly, then warns

        @repro_track.record(experiment="slow")
        def make():
            return torch.zeros(2)

        with pytest.warns(repro_track.RecordingWarning, match="goes on in the background"):
            make()
        outcome = repro_track.last_recording(make)
        path = outcome.spool_path
        assert outcome.run_id is None and path is not None
        # While the upload runs, sync must leave the entry alone (this process has claimed it).
        deadline = time.monotonic() + 60
        while path.exists() and time.monotonic() < deadline:
            done = run_cli("sync", env={**os.environ})
            assert done.returncode == 0, done.stderr
            time.sleep(0.2)
        assert not path.exists()
        assert outcome.wait(60) is not None and outcome.spool_path is None
        assert len(_runs(migrated_store, "slow")) == 1


class TestServerDown:
    """A server killed mid-sequence: results still come back, nothing is lost, sync uploads once."""

    def test_kill_restart_sync(self, project, tmp_path):
        server = MlflowServer(tmp_path / "server").start()
        try:
            env = _env(server.url, tmp_path)
            first = run_script(project / "gen.py", "0", "3", env=env, cwd=project)
            assert first.returncode == 0 and "SPOOLED" not in first.stdout, first.stderr[-2000:]
            server.stop()
            down = run_script(project / "gen.py", "3", "3", env=env, cwd=project)
            assert down.returncode == 0, down.stderr[-2000:]
            assert down.stdout.split() == ["SPOOLED"] * 3
            assert down.stderr.count("RecordingWarning") == 3 and "is not reachable" in down.stderr
            assert len(list((tmp_path / "spool").iterdir())) == 3
            server.start()
            synced = run_cli("sync", env=env)
            assert synced.returncode == 0, synced.stderr
            assert len(synced.stdout.split("\n")) - 1 == 3
            again = run_cli("sync", env=env)
            assert again.returncode == 0 and again.stdout == ""
            runs = _runs(server.url)
            assert sorted(int(r.data.params["arg.index"]) for r in runs) == list(range(6))
        finally:
            server.stop()


class TestOverHttp:
    """Record, show, diff, replay and audit against a real `mlflow server`, as against the file."""

    def test_record_show_diff_replay(self, project, tmp_path, mlflow_server):
        env = _env(mlflow_server.url, tmp_path)
        record_show_diff_replay(project, "500", env)


class TestAudit:
    """`audit` over an experiment of 20 recorded runs reports 20 exact and logs one audit run."""

    def test_twenty_exact(self, project, tmp_path, migrated_store):
        env = _env(migrated_store, tmp_path)
        done = run_script(project / "gen.py", "0", "20", env=env, cwd=project)
        assert done.returncode == 0 and "SPOOLED" not in done.stdout, done.stderr[-2000:]
        audited = run_cli("audit", "team", "--json", "--workers", "2", "--project-dir", str(project),
                          env=env, cwd=project)
        assert audited.returncode == 0, audited.stderr[-3000:]
        report = json.loads(audited.stdout)
        assert report["sampled"] == 20
        assert report["counts"] == {"exact": {"exact": 20}}
        assert report["rate"] == {"exact": 1.0, "ok": 1.0}
        kinds = [r.data.tags.get("repro.kind") for r in _runs(migrated_store)]
        assert kinds.count("audit") == 1 and kinds.count("replay") == 20 and kinds.count("record") == 20

    def test_sample_and_unknown_experiment(self, project, tmp_path, migrated_store):
        env = _env(migrated_store, tmp_path)
        assert run_script(project / "gen.py", "0", "3", env=env, cwd=project).returncode == 0
        sampled = run_cli("audit", "team", "--json", "--sample", "1", "--no-log", "--project-dir",
                          str(project), env=env, cwd=project)
        assert json.loads(sampled.stdout)["sampled"] == 1
        missing = run_cli("audit", "nope", env=env)
        assert missing.returncode == 2 and "no experiment named 'nope'" in missing.stderr


class TestRecordingEdges:
    """Wrong calls raise their own error unrecorded; credentials inside values are withheld."""

    def test_wrong_arguments_raise_without_warning(self, migrated_store):
        import repro_track

        @repro_track.record
        def make(a: int):
            return a

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(TypeError):
                make(1, 2, 3)

    def test_secret_in_value_withheld(self, migrated_store, tmp_path):
        import torch

        import repro_track

        @repro_track.record(experiment="secrets")
        def make(source: str):
            return torch.zeros(1)

        planted = "https://alice:hunter2-very-secret@models.example/x"
        make(planted)
        m = _manifest(migrated_store, repro_track.last_recording(make).wait(120))
        assert m["arguments"]["source"]["kind"] == "redacted"
        blobs = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
        assert not any(b"hunter2-very-secret" in blob for blob in blobs)


class TestSyncResumes:
    """A sync interrupted after creating a run leaves it unfinished; the next sync adopts and finishes it."""

    def test_partial_run_is_adopted(self, migrated_store, tmp_path, monkeypatch):
        import torch

        import repro_track
        from repro_track import spool, store, tags

        monkeypatch.setenv("REPRO_TRACK_PROBE_TIMEOUT", "0.5")

        @repro_track.record(experiment="resume", tracking_uri="http://127.0.0.1:9")  # nothing listens
        def make():
            return torch.ones(2)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", repro_track.RecordingWarning)
            make()
            assert repro_track.last_recording(make).wait(60) is None
        entry = next(spool.pending())
        client = store.client_for(migrated_store)
        # What an interrupted sync leaves behind: the run exists, tagged, but never finished.
        experiment_id = store.ensure_experiment(client, "resume")
        partial = client.create_run(experiment_id, tags={tags.SPOOL_ID: entry.recording_id}).info.run_id
        done = run_cli("sync", "--tracking-uri", migrated_store, env={**os.environ})
        assert done.returncode == 0, done.stderr
        runs = _runs(migrated_store, "resume")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert runs[0].info.run_id == partial  # finished in place, never deleted
        assert runs[0].data.tags[tags.SPOOL_ID] == entry.recording_id
        assert list(spool.pending()) == []


class TestNoPickle:
    """Nothing in the package can unpickle a run's files: safetensors and JSON only."""

    def test_no_pickle_loading_in_the_package(self):
        import re

        import repro_track

        root = Path(repro_track.__file__).parent
        pattern = re.compile(r"\btorch\.load\(|^\s*(import|from)\s+(pickle|joblib|dill|cloudpickle)\b"
                             r"|\bpickle\.loads?\(|allow_pickle\s*=\s*True"
                             r"|\bnp\.load\((?!.*allow_pickle\s*=\s*False)")  # .npy outputs: never pickles
        offenders = [f"{path.relative_to(root)}:{n}" for path in root.rglob("*.py")
                     for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
        assert offenders == []
