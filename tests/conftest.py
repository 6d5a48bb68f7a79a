"""Shared fixtures: a real MLflow SQLite store per test, a private spool, tiny pipelines built once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]

# Property tests draw the same examples on every run, so that a red suite means a change broke
# something, not that a new example turned up. To look for new failures, draw fresh ones:
# HYPOTHESIS_PROFILE=explore REPRO_TRACK_FUZZ_SCALE=10 pytest tests/test_fuzz.py
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(autouse=True)
def _private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test gets its own working dir and spool, and no inherited tracking settings; uploads
    still in the background are finished before the next test starts."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPRO_TRACK_SPOOL_DIR", str(tmp_path / "spool"))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "REPRO_TRACK_DISABLE",
                 "REPRO_TRACK_DELIVERY", "REPRO_TRACK_ENV_CACHE",
                 "REPRO_TRACK_SIGNING_KEY", "REPRO_TRACK_TRUSTED_KEYS", "REPRO_TRACK_REQUIRE_SIGNED"):
        monkeypatch.delenv(name, raising=False)
    yield
    from repro_track import delivery

    delivery.flush(120)


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh MLflow SQLite store in tmp_path, also exported as MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def client(tracking_uri: str):
    """An MlflowClient on the test's store."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny seeded pipelines, built once per session (also what the examples use)."""
    from repro_track import testing

    root = tmp_path_factory.mktemp("models")
    testing.build_tiny_ddim(root / "tiny-ddim")
    testing.build_tiny_text2image(root / "tiny-text2image")
    return root


@pytest.fixture
def example_env(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for running the examples as scripts: the session's tiny models, this store."""
    monkeypatch.setenv("REPRO_TRACK_MODEL_DIR", str(model_dir))
    return dict(os.environ)


def write_project(root: Path, files: dict[str, str]) -> Path:
    """Write a small project (relative path -> source) under root and return root."""
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), "utf-8")
    return root


def run_script(script: Path, *args: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a Python script as __main__ in a fresh interpreter; stdout and stderr captured."""
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def record_show_diff_replay(project: Path, seed: str, env: dict[str, str]) -> str:
    """Through a tracking server: the project's gen.py records two seeds from ``seed``; show finds the
    first, diff calls the two's difference noise, replay gets the first back exactly. The first run id."""
    done = run_script(project / "gen.py", seed, "2", env=env, cwd=project)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.split()
    shown = run_cli("show", first, "--json", env=env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["run_id"] == first, shown.stderr
    diffed = run_cli("diff", first, second, "--json", env=env)
    assert json.loads(diffed.stdout)["differences"][0]["category"] == "noise"
    replayed = run_cli("replay", first, "--json", "--project-dir", str(project), env=env)
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    report = json.loads(replayed.stdout)
    assert (report["expected"], report["observed"], report["ok"]) == ("exact", "exact", True)
    return first


def run_cli(*args: str, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the repro-track CLI in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "repro_track.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="session")
def _migrated_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store with every schema migration applied, made once per session."""
    import contextlib

    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    # The Default experiment keeps the artifact root of the directory it was created in.
    with contextlib.chdir(path.parent):
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def migrated_store(_migrated_mlflow_db: Path, tmp_path: Path, tracking_uri: str) -> str:
    """Like tracking_uri, but the store starts as a copy of a migrated one (migrating takes seconds).

    List it before ``client`` (or use it instead of ``tracking_uri``): an MlflowClient opens, and so
    migrates, its store as soon as it is made.
    """
    import shutil

    shutil.copyfile(_migrated_mlflow_db, tmp_path / "mlflow.db")
    return tracking_uri


def run_git(repo: Path, *args: str) -> str:
    """git in ``repo`` with a fixed identity and none of the user's branch or signing settings; its
    output, stripped."""
    options = ["-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", "-c", "user.name=Test",
               "-c", "user.email=test@example.com"]
    return subprocess.run(["git", *options, *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on a loopback port over a SQLite store (or the given backend store URI,
    passed through the environment), with served artifacts."""

    def __init__(self, root: Path, backend_store_uri: str | None = None, workers: int = 1):
        self.root = root
        self.backend_store_uri = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        """Start the server and wait until /health answers."""
        import time
        import urllib.request

        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "server.log", "ab")
        # The job runner (MLflow's GenAI jobs) only adds processes; a session of its own lets kill()
        # take the server's workers down with it.
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": self.backend_store_uri,
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts",
             "--workers", str(self.workers)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        """Stop the server (and its workers)."""
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """Kill the server and its workers at once (SIGKILL), as a crash would."""
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """One real MLflow tracking server for the session, stopped at the end."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


# ---------------------------------------------------------------- replay: a small project recorded once

REPLAY_EXPERIMENT = "replay-tests"

PROJECT_GEN_PY = '''
    """A small project whose decorated functions the replay tests record and replay."""
    import pathlib
    import random

    import numpy as np
    import torch

    import repro_track

    EXPERIMENT = "replay-tests"


    def weights(n):
        """A fixed linear map, so that every output element depends on every drawn number."""
        return torch.linspace(-1.0, 1.0, n * n).reshape(n, n)


    @repro_track.record(experiment=EXPERIMENT)
    def noise(n: int, *, generator=None):
        out = torch.randn(n, n, generator=generator) @ weights(n)
        return out


    @repro_track.record(experiment=EXPERIMENT)
    def denoise(pipe, num_inference_steps: int, *, generator=None):
        return pipe(num_inference_steps=num_inference_steps, generator=generator, output_type="np").images


    @repro_track.record(experiment=EXPERIMENT)
    def global_draws(n: int):
        return {"torch": torch.rand(n), "numpy": np.random.rand(n),
                "python": np.array([random.random() for _ in range(n)])}


    @repro_track.record(experiment=EXPERIMENT)
    def touch_and_noise(marker: str, n: int, *, generator=None):
        pathlib.Path(marker).write_text("ran", "utf-8")
        print("touched", marker)  # the user's stdout: must not reach the replay's --json output
        return torch.randn(n, n, generator=generator) @ weights(n)


    def undecorated(marker: str, n: int, *, generator=None):
        pathlib.Path(marker).write_text("ran", "utf-8")
        return torch.zeros(n)


    @repro_track.record(experiment=EXPERIMENT)
    def sensitive(n: int, *, generator=None):
        x = torch.randn(n, generator=generator)
        return {
            "threads": x.sum(),  # the reduction splits its work by the thread count
            "kernels": torch.softmax(x[:4096].reshape(64, 64) * 3, -1),  # exp rounds per ATen kernel level
            "knobs": torch.empty(4).nan_to_num(7.0),  # NaN-filled only under deterministic algorithms
            "hash": torch.tensor(hash("repro-track") % 100_000),  # follows PYTHONHASHSEED
        }
'''

PROJECT_RECORD_ALL_PY = '''
    """Record one call of each kind the replay tests need; print {case: run id} as JSON."""
    import json
    import random
    import sys

    import numpy as np
    import torch

    import gen
    import repro_track
    from repro_track import testing


    @repro_track.record(experiment=gen.EXPERIMENT)
    def scaled_noise(n: int, scale: float, *, generator=None):
        return torch.randn(n, n, generator=generator) * scale


    def run_id(fn):
        return repro_track.last_recording(fn).wait(120)


    def main(model: str) -> None:
        runs = {}
        gen.noise(8, generator=torch.Generator("cpu").manual_seed(3))
        runs["cpu_generator"] = run_id(gen.noise)
        consumed = torch.Generator("cpu").manual_seed(4)
        torch.randn(1000, generator=consumed)
        gen.noise(8, generator=consumed)
        runs["consumed_generator"] = run_id(gen.noise)
        pipe = testing.load_pipeline(model, progress=False)
        gen.denoise(pipe, 2, generator=torch.Generator("cpu").manual_seed(5))
        runs["pipeline_argument"] = run_id(gen.denoise)
        scaled_noise(4, 0.5, generator=torch.Generator("cpu").manual_seed(6))
        runs["script_main"] = run_id(scaled_noise)
        torch.manual_seed(7)
        np.random.seed(7)
        random.seed(7)
        torch.rand(3), np.random.rand(3), random.random()  # the global states are mid-stream
        gen.global_draws(4)
        runs["global_rng"] = run_id(gen.global_draws)
        gen.touch_and_noise("recorded-marker", 4, generator=torch.Generator("cpu").manual_seed(8))
        runs["marked"] = run_id(gen.touch_and_noise)
        print(json.dumps(runs))


    if __name__ == "__main__":
        main(sys.argv[1])
'''

OUTSIDE_EVIL_PY = '''
    """A recorded function outside the project: a manifest may name it only by path traversal."""
    import pathlib

    import repro_track


    @repro_track.record
    def touch_and_noise(marker: str, n: int, *, generator=None):
        pathlib.Path(marker).write_text("ran", "utf-8")
        return n
'''


@dataclass(frozen=True)
class RecordedProject:
    """A small project recorded once per session: its folder, its MLflow store and its runs by case."""

    path: Path
    tracking_uri: str
    runs: dict[str, str]

    def client(self):
        """An MlflowClient on the project's store."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def replays_of(self, run_id: str) -> list:
        """Every replay run logged for run_id (found by its repro.replay_of tag)."""
        client = self.client()
        experiments = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(experiments, filter_string=f"tags.`repro.replay_of` = '{run_id}'")


def recording_env(tracking_uri: str, spool: Path, **extra: str) -> dict[str, str]:
    """The environment for a recording subprocess: this store and spool, nothing inherited for MLflow."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "REPRO_TRACK_DISABLE",
                        "REPRO_TRACK_SIGNING_KEY", "REPRO_TRACK_TRUSTED_KEYS", "REPRO_TRACK_REQUIRE_SIGNED")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, REPRO_TRACK_SPOOL_DIR=str(spool), **extra)
    return env


@pytest.fixture(scope="session")
def recorded_project(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> RecordedProject:
    """gen.py and record_all.py written, recorded in a fresh interpreter into their own SQLite store.

    outside/evil.py, a recorded function next to (not inside) the project, is there for traversal tests.
    """
    root = tmp_path_factory.mktemp("recorded")
    project = write_project(root / "project", {"gen.py": PROJECT_GEN_PY,
                                               "record_all.py": PROJECT_RECORD_ALL_PY})
    write_project(root / "outside", {"evil.py": OUTSIDE_EVIL_PY})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    done = run_script(project / "record_all.py", str(model_dir / "tiny-ddim"),
                      env=recording_env(uri, root / "spool"), cwd=project)
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(runs.values()), f"a recording was spooled instead of logged: {runs}\n{done.stderr}"
    return RecordedProject(project, uri, runs)


def clone_run(project: RecordedProject, run_id: str, workdir: Path,
              edit: Callable[[dict], None] | None = None, *, fix_digest: bool = True) -> str:
    """Log a copy of a recorded run through the store, its manifest dict changed by ``edit`` first.

    With ``fix_digest`` the digest is recomputed and the schema checked, so that only the check a
    test aims at can catch the change; without it the edit shows as tampering.
    """
    from repro_track import manifest, store, tags
    from repro_track.spool import SpoolEntry

    client = project.client()
    folder = workdir / f"clone-{uuid.uuid4().hex}"
    (folder / "artifacts").mkdir(parents=True)
    client.download_artifacts(run_id, "", str(folder / "artifacts"))
    path = folder / "artifacts" / tags.MANIFEST_PATH
    data = json.loads(path.read_text("utf-8"))
    if edit is not None:
        edit(data)
    if fix_digest:
        data["manifest_digest"] = manifest.digest_of(data)
        manifest.validate(data)
    path.write_text(json.dumps(data, sort_keys=True, indent=1), "utf-8")
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id).name
    meta = {"recording_id": uuid.uuid4().hex, "experiment": experiment, "tags": {},
            "run_name": f"copy-of-{run_id[:8]}", "parent_run_id": None}
    return store.upload(client, SpoolEntry(folder, meta))


def stored_artifact(project: RecordedProject, run_id: str, relative: str) -> Path:
    """Where the store keeps one artifact of a run on disk (to tamper with it)."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    root = local_file_uri_to_path(project.client().get_run(run_id).info.artifact_uri)
    return Path(root) / relative


def h200_gpu_section() -> dict:
    """The GPU section the recorder captures on one H200, read through a stand-in NVML module."""
    import types

    from repro_track import capture
    from repro_track.capture import gpu

    handle = object()
    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: "550.54.15",
        nvmlSystemGetCudaDriverVersion_v2=lambda: 12040,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda index: handle,
        nvmlDeviceGetName=lambda h: "NVIDIA H200",
        nvmlDeviceGetUUID=lambda h: "GPU-5b5c8a3e-1f0e-4c33-9f5e-6d1b2a7c9e01",
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=150_754_820_096),
        nvmlDeviceGetAttributes=lambda h: types.SimpleNamespace(multiprocessorCount=132),
        nvmlDeviceGetMigMode=lambda h: (0, 0),
        NVML_DEVICE_MIG_ENABLE=1,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "pynvml", nvml)
        gpu.clear_cache()
        capture.clear_cache()
        try:
            return gpu.capture_gpu()
        finally:
            gpu.clear_cache()
            capture.clear_cache()
