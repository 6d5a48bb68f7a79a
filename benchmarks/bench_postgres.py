"""Row 8: recordings per second sustained by a PostgreSQL-backed `mlflow server`, against a SQLite-backed one.

Both servers run the same way (`mlflow server`, artifacts proxied from a folder, the same number of
workers); PostgreSQL and its server are started by deploy/local-stack.sh, the stack the tests use. Each
round starts a few recording processes that import torch and repro-track, wait at a common start line,
then record a trivial call after call (each waiting for its upload): the rate is all recordings over
the time from the first start to the last finish. Rounds alternate between the two servers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

from bench_common import Config, Row, Workspace, median, progress

STACK = Path(__file__).resolve().parents[1] / "deploy" / "local-stack.sh"
PROCESSES = 4
WORKERS = 2  # uvicorn workers, for both servers
EXPERIMENT = "bench-server"

LOAD_PY = '''
    """Warm up, say so, wait for the start file, record `count` trivial calls one after another (each
    waiting for its upload), print the times as JSON."""
    import json
    import os
    import pathlib
    import sys
    import time

    import torch

    import repro_track


    @repro_track.record(experiment="bench-server")
    def small(index: int):
        return torch.arange(16.0) + index


    if __name__ == "__main__":
        go, count = pathlib.Path(sys.argv[1]), int(sys.argv[2])
        small(-1)  # warm-up: MLflow's client, the first capture, the experiment
        repro_track.last_recording(small).wait(120)
        go.with_name(f"{go.name}.ready-{os.getpid()}").touch()
        while not go.exists():
            time.sleep(0.01)
        start = time.time()
        spooled = 0
        for i in range(count):
            small(i)
            spooled += repro_track.last_recording(small).wait(120) is None
        print(json.dumps({"start": start, "end": time.time(), "spooled": spooled}))
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the SQLite-backed mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"no mlflow server answered on {url} within {timeout} s")


def _start_sqlite_server(root: Path) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    root.mkdir(parents=True)
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root / 'mlflow.db'}",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts", "--workers", str(WORKERS)],
        env=env, stdout=open(root / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, proc)
    return url, proc


def _start_postgres_stack(root: Path) -> str:
    """PostgreSQL + mlflow server through the deploy script; the server's URL."""
    root.mkdir(parents=True)
    root.chmod(0o711)  # run as root, PostgreSQL runs as `postgres`, which must get through
    port = _free_port()
    env = {**os.environ, "PYTHON": sys.executable, "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": str(WORKERS)}
    done = subprocess.run(["bash", str(STACK), "start", str(root)], env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"deploy/local-stack.sh start failed: {done.stderr[-2000:]}")
    return f"http://127.0.0.1:{port}"


def _round(ws: Workspace, script: Path, url: str, calls: int, label: str) -> float:
    """One round of PROCESSES x calls recordings against url; recordings per second."""
    go = ws.root / f"server-go-{label}"
    env = ws.env(url)
    procs = [subprocess.Popen([sys.executable, str(script), str(go), str(calls)], env=env, cwd=script.parent,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(PROCESSES)]
    deadline = time.monotonic() + 600
    while len(list(ws.root.glob(f"{go.name}.ready-*"))) < PROCESSES:  # every process warmed up
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            raise RuntimeError("a recording process did not get ready: "
                               + next((p.stderr.read()[-2000:] for p in procs if p.poll() is not None), "timeout"))
        time.sleep(0.2)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"a recording process exited {proc.returncode}: {err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    if any(r["spooled"] for r in results):
        raise RuntimeError(f"recordings were spooled instead of logged against {url}")
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return PROCESSES * calls / span


def row_server_throughput(ws: Workspace, cfg: Config) -> list[Row]:
    """Row 8: sustained recordings per second, PostgreSQL-backed server / SQLite-backed server."""
    calls = max(5, cfg.calls // 2)  # per process per round: 25 (quick: 7)
    rounds = 2 if cfg.cold_reps > 1 else 1
    folder = ws.root / "server-load"
    folder.mkdir()
    script = folder / "server_load.py"
    script.write_text(textwrap.dedent(LOAD_PY), "utf-8")
    progress("starting PostgreSQL and its mlflow server (deploy/local-stack.sh), and a SQLite-backed one")
    pg_root = Path(f"{ws.root}-postgres")  # beside the temp folder: reachable by the postgres user
    sqlite_url, sqlite_proc = _start_sqlite_server(ws.root / "sqlite-server")
    try:
        pg_url = _start_postgres_stack(pg_root)
        rates: dict[str, list[float]] = {"postgres": [], "sqlite": []}
        for i in range(rounds):
            for name, url in (("sqlite", sqlite_url), ("postgres", pg_url)):
                rates[name].append(_round(ws, script, url, calls, f"{name}-{i}"))
                progress(f"{name}: {rates[name][-1]:.1f} recordings/s")
    finally:
        os.killpg(sqlite_proc.pid, signal.SIGTERM)
        subprocess.run(["bash", str(STACK), "stop", str(pg_root)], capture_output=True, timeout=120)
        shutil.rmtree(pg_root, ignore_errors=True)
    pg, lite = median(rates["postgres"]), median(rates["sqlite"])
    return [Row("8", f"recordings/s against a tracking server, {PROCESSES} processes x {calls} calls",
                pg, lite, "SQLite-backed server", "rec/s", "-", None,
                note=f"PostgreSQL-backed mlflow server (deploy/local-stack.sh) vs the same server over SQLite, "
                     f"{WORKERS} workers each, {rounds} alternating round(s); each call waits for its upload",
                details=rates)]
