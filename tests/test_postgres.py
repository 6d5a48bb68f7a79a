"""A PostgreSQL-backed `mlflow server`, started by deploy/local-stack.sh: round trip, load, a crash, sync."""

from __future__ import annotations

import glob
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO, MlflowServer, record_show_diff_replay, run_cli, write_project

pytestmark = pytest.mark.slow

STACK = REPO / "deploy" / "local-stack.sh"

GEN = '''
    import os
    import sys
    import time

    import torch

    import repro_track


    @repro_track.record(experiment=os.environ.get("TEAM_EXPERIMENT", "team"))
    def make(index: int, *, generator=None):
        """Noise from the generator, tagged by the call's index so runs can be told apart."""
        return torch.randn(8, generator=generator) + index


    if __name__ == "__main__":
        start, count = int(sys.argv[1]), int(sys.argv[2])
        pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
        for i in range(start, start + count):
            make(i, generator=torch.Generator().manual_seed(i))
            print(repro_track.last_recording(make).wait(120) or "SPOOLED", flush=True)
            time.sleep(pause)
'''


def _missing_postgres() -> str | None:
    """Why PostgreSQL cannot be had here, or None when initdb is there (on PATH or Debian's own folder)."""
    if shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return None
    return ("PostgreSQL is not installed and this user cannot install it: run `make test` as root "
            "(it installs the Debian package postgresql) or `apt-get install postgresql`")


@pytest.fixture(scope="session")
def postgres_uri() -> Iterator[str]:
    """A fresh PostgreSQL on a free loopback port, started by the deploy script; its backend store URI."""
    importlib.import_module("psycopg")  # the server reaches postgresql:// through it (the `test` extra)

    missing = _missing_postgres()
    if missing:
        pytest.skip(missing)
    # Not under pytest's own temp root (mode 700): run as root, the database runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="repro-track-pg-"))
    root.chmod(0o711)
    env = {**os.environ, "PYTHON": sys.executable}
    try:
        started = subprocess.run(["bash", str(STACK), "postgres", str(root)], capture_output=True, text=True,
                                 env=env, timeout=180)
        assert started.returncode == 0, started.stderr
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(STACK), "stop", str(root)], capture_output=True, env=env, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server(postgres_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One `mlflow server` over that PostgreSQL for the session, artifacts proxied from a folder."""
    server = MlflowServer(tmp_path_factory.mktemp("pg-server"), postgres_uri).start(timeout=300)
    yield server
    server.stop()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder with one recorded generation function."""
    return write_project(tmp_path / "proj", {"gen.py": GEN})


def _env(server: MlflowServer, tmp_path: Path, experiment: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": server.url, "REPRO_TRACK_SPOOL_DIR": str(tmp_path / "spool"),
            "TEAM_EXPERIMENT": experiment, **extra}


def _recordings(server: MlflowServer, experiment: str) -> list:
    """The experiment's recording runs (not replays or audits)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(server.url)
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else client.search_runs([found.experiment_id], max_results=2000)
    return [r for r in runs if r.data.tags.get("repro.kind") == "record"]


def _indexes(runs: list) -> list[int]:
    return sorted(int(r.data.params["arg.index"]) for r in runs)


class TestRoundTrip:
    """Record, show, diff, replay and audit through the PostgreSQL-backed server."""

    def test_record_show_diff_replay_audit(self, project, tmp_path, postgres_server):
        env = _env(postgres_server, tmp_path, "pg-round-trip")
        record_show_diff_replay(project, "0", env)
        audited = run_cli("audit", "pg-round-trip", "--json", "--sample", "1", "--project-dir", str(project),
                          env=env, cwd=project)
        assert audited.returncode == 0, audited.stderr[-3000:]
        assert json.loads(audited.stdout)["counts"] == {"exact": {"exact": 1}}


class TestLoad:
    """Eight processes recording 25 calls each at once: 200 runs land, none is spooled."""

    def test_eight_processes(self, project, tmp_path, postgres_server):
        env = _env(postgres_server, tmp_path, "pg-load")
        procs = [subprocess.Popen([sys.executable, "gen.py", str(p * 100), "25"], cwd=project, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for p in range(8)]
        results = [p.communicate(timeout=900) for p in procs]
        for proc, (out, err) in zip(procs, results):
            assert proc.returncode == 0, err[-2000:]
            assert "SPOOLED" not in out and "RecordingWarning" not in err, err[-2000:]
        runs = _recordings(postgres_server, "pg-load")
        assert _indexes(runs) == [p * 100 + i for p in range(8) for i in range(25)]
        assert {r.info.status for r in runs} == {"FINISHED"}
        assert not (tmp_path / "spool").exists() or not any((tmp_path / "spool").iterdir())


class _Lines:
    """Every line a set of processes prints, collected as they print them."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._read, args=(p,), daemon=True) for p in procs]
        for thread in self._threads:
            thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self._lock:
                self.lines.append(line.strip())

    def wait_for(self, count: int, timeout: float = 600) -> list[str]:
        """Block until at least ``count`` lines were printed; all of them so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.lines) >= count:
                    return list(self.lines)
            time.sleep(0.05)
        raise AssertionError(f"only {len(self.lines)} of {count} lines within {timeout} s")

    def join(self) -> list[str]:
        """Every line, once all the processes have closed their output."""
        for thread in self._threads:
            thread.join()
        return list(self.lines)


class TestServerCrash:
    """The server killed mid-run and restarted: each recording lands exactly once after `sync`."""

    def test_kill_restart_sync(self, project, tmp_path, postgres_server):
        env = _env(postgres_server, tmp_path, "pg-crash", MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
                   MLFLOW_HTTP_REQUEST_TIMEOUT="10", REPRO_TRACK_PROBE_TIMEOUT="1")
        log = open(tmp_path / "recorders.log", "w")
        procs = [subprocess.Popen([sys.executable, "gen.py", str(p * 100), "12", "0.1"], cwd=project, env=env,
                                  stdout=subprocess.PIPE, stderr=log, text=True)
                 for p in range(4)]
        lines = _Lines(procs)
        try:
            landed = lines.wait_for(8)  # the server takes the first recordings
            postgres_server.kill()
            after_kill = lines.wait_for(len(landed) + 8)  # and then the next ones go to the spool
            postgres_server.start(timeout=300)
            codes = [proc.wait(timeout=600) for proc in procs]
        finally:
            if postgres_server.proc.poll() is not None:  # the session's other tests need it back
                postgres_server.start(timeout=300)
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            log.close()
        assert codes == [0] * 4, (tmp_path / "recorders.log").read_text()[-3000:]
        printed = lines.join()
        assert len(printed) == 48
        assert "SPOOLED" not in landed and "SPOOLED" in after_kill[len(landed):]
        synced = run_cli("sync", env=env)
        assert synced.returncode == 0, synced.stderr[-2000:]
        assert run_cli("sync", env=env).stdout == ""  # nothing left to deliver
        runs = _recordings(postgres_server, "pg-crash")
        assert _indexes(runs) == [p * 100 + i for p in range(4) for i in range(12)]  # each exactly once
        assert {r.info.status for r in runs} == {"FINISHED"}
