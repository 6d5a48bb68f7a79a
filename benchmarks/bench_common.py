"""What every benchmark family shares: the repetition plan, a table row, timing helpers, the temp workspace.

The families (bench_recording, bench_capture, bench_outputs, bench_cli, bench_replay, bench_peers) each
turn a Workspace and a Config into table rows; run.py picks the rows, runs them and prints the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import bench_project

STEPS = 5  # DDIM steps per generation in rows 4 to 6
HEAVY = ("torch", "mlflow", "diffusers", "transformers")


@dataclass(frozen=True)
class Config:
    """How many repetitions each row takes (full run: about 5 minutes on 2 quiet cores; quick: 1 to 2)."""

    calls: int = 50  # row 1, timed calls per variant
    warmup: int = 5
    cold_reps: int = 3  # fresh processes per variant (rows 1 and 2)
    capture_calls: int = 50  # row 2
    collect_env_calls: int = 5
    sizes: tuple[tuple[int, int], ...] = ((1, 20), (64, 5), (512, 2))  # row 3: (MiB, repetitions)
    seeds: int = 100  # row 4
    cli_reps: int = 7  # row 5, --help and import
    show_reps: int = 3
    replay_reps: int = 3  # row 6
    peer_calls: int = 20  # row 7, timed generations per variant


QUICK = Config(calls=15, warmup=3, cold_reps=1, capture_calls=15, collect_env_calls=2,
               sizes=((1, 5), (64, 2)), seeds=10, cli_reps=3, show_reps=1, replay_reps=1, peer_calls=4)


@dataclass
class Row:
    """One line of the table: repro-track's number, its baseline's, and the target it is held to."""

    key: str
    name: str
    measured: float
    baseline: float | None
    baseline_name: str
    unit: str  # "s" (lower is better), "MiB/s" or "rec/s" (recordings per second; higher is better)
    target: str = "-"
    met: bool | None = None
    note: str = ""
    measured_text: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """measured / baseline: for times, how many times slower; for throughputs, what fraction."""
        return self.measured / self.baseline if self.baseline else None

    def cells(self) -> list[str]:
        """The six table cells: row, measured, baseline, ratio, target, met?"""
        baseline = "-" if self.baseline is None else f"{fmt(self.baseline, self.unit)} ({self.baseline_name})"
        ratio = "-" if self.ratio is None else _fmt_ratio(self.ratio)
        met = "-" if self.met is None else ("yes" if self.met else "NO")
        measured = self.measured_text or fmt(self.measured, self.unit)
        return [f"{self.key}. {self.name}", measured, baseline, ratio, self.target, met]

    def to_dict(self) -> dict[str, Any]:
        """The row for ``--json``, ratio included."""
        return {**asdict(self), "ratio": self.ratio}


def fmt(value: float, unit: str) -> str:
    """A time (s, ms, us) or a throughput, as the table shows it."""
    if unit == "MiB/s":
        return f"{value:,.0f} MiB/s"
    if unit == "rec/s":
        return f"{value:,.1f} rec/s"
    if value < 1e-3:
        return f"{value * 1e6:.1f} us"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    return f"{value:.2f} s"


def _fmt_ratio(ratio: float) -> str:
    if ratio >= 100:
        return f"{ratio:,.0f}x"
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x"


def progress(message: str) -> None:
    """Say what runs now (stderr, so that the table on stdout stays clean)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- timing helpers

def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of fn takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(variants: dict[str, Callable[[], Any]], reps: int, warmup: int = 0) -> dict[str, list[float]]:
    """Time each variant reps times, round-robin, so drift in machine speed hits all of them alike."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return times


def median(values: list[float]) -> float:
    """The median (robust to the odd slow call a busy machine produces)."""
    return statistics.median(values)


def wall(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    """Wall time of a command run to completion; raises with its stderr when it fails."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return elapsed, done


def last_json(text: str) -> Any:
    """The JSON object a helper script printed last."""
    return json.loads(text.strip().splitlines()[-1])


def console_script(name: str) -> list[str]:
    """The installed console script next to this interpreter, else ``python -m`` (repro-track only)."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    if name == "repro-track":
        return [sys.executable, "-m", "repro_track.cli"]
    raise FileNotFoundError(f"{name} is not installed next to {sys.executable}")


# ---------------------------------------------------------------- the temp workspace

class Workspace:
    """The temp folder: a clean git project, the tiny pipeline, a migrated empty store to copy, the spool."""

    def __init__(self, root: Path):
        from repro_track import testing

        self.root = root
        self.project = bench_project.write(root / "project")
        self.spool = root / "spool"
        self.model = root / "tiny-ddim"
        testing.build_tiny_ddim(self.model)
        self._template = self._migrated_store()
        self._ddim_store: str | None = None
        self._ddim_run: tuple[str, str] | None = None

    def _migrated_store(self) -> Path:
        # Creating or migrating an MLflow SQLite store takes seconds: done once here, then copied, so
        # every variant starts from the same fresh, empty store and no row times MLflow's migrations.
        from mlflow.tracking import MlflowClient

        path = self.root / "template" / "mlflow.db"
        path.parent.mkdir()
        with contextlib.chdir(path.parent):  # the Default experiment's artifact root stays in there
            MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
        return path

    def store(self, name: str) -> str:
        """A fresh store of its own (a copy of the empty template) with the bench experiment; its URI."""
        from mlflow.tracking import MlflowClient

        folder = self.root / "stores" / name
        folder.mkdir(parents=True)
        shutil.copyfile(self._template, folder / "mlflow.db")
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        MlflowClient(tracking_uri=uri).create_experiment(bench_project.EXPERIMENT,
                                                         artifact_location=(folder / "artifacts").as_uri())
        return uri

    def env(self, tracking_uri: str | None = None) -> dict[str, str]:
        """Environment for a subprocess: this spool and store, nothing inherited that redirects MLflow."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "REPRO_TRACK_DISABLE")}
        env["REPRO_TRACK_SPOOL_DIR"] = str(self.spool)
        if tracking_uri:
            env["MLFLOW_TRACKING_URI"] = tracking_uri
        return env

    def python(self, script: str, *args: str, tracking_uri: str | None = None) -> tuple[float, Any]:
        """Run a project script in a fresh interpreter; (wall seconds, the JSON it printed last)."""
        elapsed, done = wall([sys.executable, str(self.project / script), *args], self.env(tracking_uri),
                             self.root)
        return elapsed, last_json(done.stdout)

    def record_ddim(self) -> tuple[str, str]:
        """(store URI, run id) of a tiny DDIM generation recorded now, in a fresh process."""
        if self._ddim_store is None:
            self._ddim_store = self.store("ddim")
        _, printed = self.python("record_ddim.py", str(self.model), str(STEPS), tracking_uri=self._ddim_store)
        if not printed["run_id"]:
            raise RuntimeError("the DDIM recording was spooled instead of logged")
        return self._ddim_store, printed["run_id"]

    def ddim_run(self) -> tuple[str, str]:
        """(store URI, run id) of one recorded tiny DDIM generation, recorded on first use."""
        if self._ddim_run is None:
            self._ddim_run = self.record_ddim()
        return self._ddim_run


@contextlib.contextmanager
def tracking(uri: str) -> Iterator[None]:
    """MLFLOW_TRACKING_URI for this process, as the decorator reads it at each call."""
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def recorded_run_id(fn: Any, timeout: float = 120.0) -> str:
    """The run of fn's latest call, once uploaded; a spooled recording would make the row meaningless."""
    import repro_track

    outcome = repro_track.last_recording(fn)
    wait = getattr(outcome, "wait", None)  # background delivery: the run id comes with the upload
    run_id = wait(timeout) if wait is not None else getattr(outcome, "run_id", None)
    if run_id is None:
        raise RuntimeError(f"a recorded call was not logged to MLflow: {outcome}; "
                           f"error: {getattr(outcome, 'error', None)}")
    return run_id


def uploader_ready(timeout: float = 120.0) -> float:
    """Wait until this process's uploader process (``REPRO_TRACK_UPLOADER=process``, started by the first
    recording) is ready, so that a row times steady delivery, not the first seconds in which uploads
    still run in the worker's thread; seconds waited (0 with thread uploads)."""
    from repro_track import delivery

    start = time.perf_counter()
    worker = delivery._worker_now
    uploader = worker._uploader if worker is not None else None
    while uploader is not None and not uploader.ready():
        if time.perf_counter() - start > timeout:
            raise RuntimeError("the uploader process did not become ready")
        time.sleep(0.02)
    return time.perf_counter() - start


def flush_pending() -> float:
    """Seconds spent waiting for repro-track's background uploads (0 where delivery is synchronous)."""
    import repro_track

    flush = getattr(repro_track, "flush", None)
    return timed(flush) if flush is not None else 0.0


