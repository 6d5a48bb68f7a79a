"""repro-track benchmarks: what recording costs, measured side by side with what it replaces.

    python benchmarks/run.py [--quick] [--json PATH] [--markdown] [--only 1,3] [--threads N] [--keep]

Every row times repro-track and its baseline in the same process run, on the same inputs, interleaved
where they run in-process, and reports the ratio: the machines this runs on are noisy, so absolute times
are context and the ratios are the result. Everything written (MLflow SQLite stores and artifacts, the
spool, a tiny DDIM pipeline, a small git project) goes into one temp folder, deleted at the end.
See benchmarks/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
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
    """How many repetitions each row takes (full run: under 5 minutes on 2 cores; quick: about 1)."""

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


QUICK = Config(calls=15, warmup=3, cold_reps=1, capture_calls=15, collect_env_calls=2,
               sizes=((1, 5), (64, 2)), seeds=10, cli_reps=3, show_reps=1, replay_reps=1)


@dataclass
class Row:
    """One line of the table: repro-track's number, its baseline's, and the target it is held to."""

    key: str
    name: str
    measured: float
    baseline: float | None
    baseline_name: str
    unit: str  # "s" (lower is better) or "MiB/s" (higher is better)
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
        baseline = "-" if self.baseline is None else f"{_fmt(self.baseline, self.unit)} ({self.baseline_name})"
        ratio = "-" if self.ratio is None else _fmt_ratio(self.ratio)
        met = "-" if self.met is None else ("yes" if self.met else "NO")
        measured = self.measured_text or _fmt(self.measured, self.unit)
        return [f"{self.key}. {self.name}", measured, baseline, ratio, self.target, met]

    def to_dict(self) -> dict[str, Any]:
        """The row for ``--json``, ratio included."""
        return {**asdict(self), "ratio": self.ratio}


def _fmt(value: float, unit: str) -> str:
    if unit == "MiB/s":
        return f"{value:,.0f} MiB/s"
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


def recorded_run_id(fn: Any) -> str:
    """The run of fn's latest call; a spooled recording would make the row meaningless."""
    import repro_track

    outcome = repro_track.last_recording(fn)
    if outcome is None or outcome.run_id is None:
        raise RuntimeError(f"a recorded call was not logged to MLflow: {outcome}")
    return outcome.run_id


# ---------------------------------------------------------------- row 1: per-call overhead of @record

def handwritten_fixture(uri: str, run_id: str, folder: Path) -> dict[str, Any]:
    """What repro-track logged for one call (tags, params, metrics, artifact texts), to log again by hand."""
    from mlflow.tracking import MlflowClient
    from safetensors import safe_open

    from repro_track import tags

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    client.download_artifacts(run_id, "", str(folder))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    with safe_open(str(folder / tags.OUTPUTS_PATH), framework="pt") as handle:
        metadata = handle.metadata()
    return {
        "tags": {k: v for k, v in run.data.tags.items() if k != tags.MLFLOW_RUN_NAME},
        "run_name": run.data.tags.get(tags.MLFLOW_RUN_NAME),
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "files": {p.relative_to(folder).as_posix(): p.read_text("utf-8") for p in files
                  if p.relative_to(folder).as_posix() != tags.OUTPUTS_PATH},
        "outputs_file": tags.OUTPUTS_PATH,
        "outputs_metadata": metadata,
    }


def same_content(uri_a: str, run_a: str, uri_b: str, run_b: str, folder: Path) -> bool:
    """Whether two runs hold the same artifact bytes and the same param, metric and tag keys."""
    from mlflow.tracking import MlflowClient

    contents = []
    for uri, run_id in ((uri_a, run_a), (uri_b, run_b)):
        client = MlflowClient(tracking_uri=uri)
        dest = folder / run_id
        client.download_artifacts(run_id, "", str(dest))
        data = client.get_run(run_id).data
        contents.append(({p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()},
                         sorted(data.params), sorted(data.metrics), sorted(data.tags)))
    return contents[0] == contents[1]


def row_record_overhead(ws: Workspace, cfg: Config) -> list[Row]:
    """Row 1: @record on a function returning torch.arange(16.) vs the bare call and hand-written MLflow."""
    import bench_gen
    import handwritten
    from mlflow.tracking import MlflowClient

    recorded_uri, handwritten_uri = ws.store("record"), ws.store("handwritten")
    client = MlflowClient(tracking_uri=handwritten_uri)
    experiment_id = client.get_experiment_by_name(bench_project.EXPERIMENT).experiment_id
    staging = ws.root / "staging"
    with tracking(recorded_uri):
        bench_gen.small()
        runs = {"recorded": recorded_run_id(bench_gen.small)}  # the run whose content both sides log
        fixture = handwritten_fixture(recorded_uri, runs["recorded"], ws.root / "fixture")

        def recorded() -> None:
            bench_gen.small()

        def by_hand() -> None:
            runs["handwritten"] = handwritten.log_call(client, experiment_id, fixture, staging,
                                                       bench_gen.small_bare())

        times = interleaved({"recorded": recorded, "handwritten": by_hand}, cfg.calls, cfg.warmup)
    # Interleaved with millisecond calls, a microsecond call would time cold caches, not itself.
    times.update(interleaved({"bare": bench_gen.small_bare}, cfg.calls, cfg.warmup))
    identical = same_content(recorded_uri, runs["recorded"], handwritten_uri, runs["handwritten"],
                             ws.root / "compare")
    logged = {name: len(MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name(bench_project.EXPERIMENT).experiment_id],
        max_results=1000)) for name, uri in (("recorded", recorded_uri), ("handwritten", handwritten_uri))}
    if logged["recorded"] != 1 + cfg.warmup + cfg.calls:  # the first call, then the timed variant's
        raise RuntimeError(f"expected {1 + cfg.warmup + cfg.calls} recorded runs, found {logged['recorded']}")
    rec, hand, bare = median(times["recorded"]), median(times["handwritten"]), median(times["bare"])
    fixture_file = ws.root / "fixture.json"
    fixture_file.write_text(json.dumps(fixture), "utf-8")
    cold = cold_calls(ws, cfg, fixture_file)
    return [
        Row("1a", f"@record per call, median of {cfg.calls}", rec, hand, "hand-written MLflow", "s",
            "<= 1.5x and < 30 ms", rec <= 1.5 * hand and rec < 0.030,
            note=f"same artifact bytes and keys as the hand-written run: {'yes' if identical else 'NO'}; "
                 f"runs logged: {logged['recorded']} recorded, {logged['handwritten']} by hand",
            details={"samples": times, "same_content": identical}),
        Row("1b", "@record per call vs the bare call", rec, bare, "bare call", "s",
            note=f"overhead {1e3 * (rec - bare):.1f} ms per call"),
        Row("1c", "@record first call, fresh process (imports included)", cold["recorded"],
            cold["baseline"], "hand-written MLflow", "s",
            note=f"bare first call with imports {_fmt(cold['bare'], 's')}; "
                 f"median of {cfg.cold_reps} processes each",
            details={"cold": cold}),
    ]


def cold_calls(ws: Workspace, cfg: Config, fixture: Path) -> dict[str, Any]:
    """Median time to a logged first call in a fresh process, each variant on its own fresh store."""
    samples: dict[str, list[dict[str, float]]] = {"bare": [], "recorded": [], "baseline": []}
    for rep in range(cfg.cold_reps):
        for variant in samples:
            uri = ws.store(f"cold-{variant}-{rep}")
            args = [variant, str(fixture), str(ws.root / f"staging-cold-{rep}")] if variant == "baseline" else [variant]
            samples[variant].append(ws.python("cold_call.py", *args, tracking_uri=uri)[1])
    result: dict[str, Any] = {v: median([s["total_s"] for s in runs]) for v, runs in samples.items()}
    result["samples"] = samples
    return result


# ---------------------------------------------------------------- row 2: environment capture

def row_capture(ws: Workspace, cfg: Config) -> list[Row]:
    """Row 2: capture.environment + knobs + RNG states + env vars vs torch.utils.collect_env."""
    from torch.utils import collect_env

    from repro_track import capture
    from repro_track.capture import envvars, torch_state

    source = ws.project / "bench_gen.py"

    def ours() -> None:
        capture.environment(source)
        torch_state.determinism_knobs()
        torch_state.global_rng_states()
        envvars.capture_env_vars()

    per_round = max(1, cfg.capture_calls // cfg.collect_env_calls)
    times = interleaved({**{f"ours{i}": ours for i in range(per_round)},
                         "collect_env": collect_env.get_env_info}, cfg.collect_env_calls, warmup=1)
    mine = [t for name, values in times.items() if name.startswith("ours") for t in values]
    ours_s, theirs = median(mine), median(times["collect_env"])
    cold = [ws.python("cold_capture.py", str(source), "12")[1] for _ in range(cfg.cold_reps)]
    first, cached = median([c["first_s"] for c in cold]), median([c["cached_s"] for c in cold])
    return [
        Row("2a", "environment capture per call (cached)", ours_s, theirs, "collect_env", "s",
            "<= 0.1x", ours_s <= 0.1 * theirs, note=f"median of {len(mine)} vs {len(times['collect_env'])}; "
            "git status of a clean repository included",
            details={"ours": mine, "collect_env": times["collect_env"]}),
        Row("2b", "environment capture, first call in a fresh process", first, cached, "cached, same process",
            "s", note=f"torch already imported; median of {cfg.cold_reps} processes", details={"cold": cold}),
    ]


# ---------------------------------------------------------------- row 3: digesting and saving outputs

def row_outputs(ws: Workspace, cfg: Config) -> list[Row]:
    """Row 3: outputs.describe + save_arrays vs safetensors' save_file alone, and a raw memory copy."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from repro_track import outputs

    folder = ws.root / "outputs"
    folder.mkdir()
    rows = []
    for mib, reps in cfg.sizes:
        tensor = torch.rand(mib * 2**20 // 4, generator=torch.Generator().manual_seed(mib))
        item = outputs.NamedArray("output", tensor, "tensor")
        variants = {
            "repro-track": lambda: (outputs.describe(item), outputs.save_arrays([item], folder / "a.safetensors")),
            "safetensors": lambda: save_file({"output": tensor}, str(folder / "b.safetensors")),
            "copy": lambda: np.copy(tensor.numpy()),
            "describe": lambda: outputs.describe(item),
            "save_arrays": lambda: outputs.save_arrays([item], folder / "c.safetensors"),
        }
        times = interleaved(variants, reps, warmup=1)
        rate = {name: mib / median(values) for name, values in times.items()}
        for path in folder.iterdir():
            path.unlink()
        del tensor, item, variants
        rows.append(Row(
            f"3{'abc'[len(rows)]}", f"digest + save {mib} MiB float32", rate["repro-track"], rate["safetensors"],
            "safetensors save_file", "MiB/s", "-" if mib < 64 else ">= 0.5x",
            None if mib < 64 else rate["repro-track"] >= 0.5 * rate["safetensors"],
            note=f"raw copy {rate['copy']:,.0f} MiB/s; describe alone {rate['describe']:,.0f} MiB/s; "
                 f"save_arrays alone {rate['save_arrays']:,.0f} MiB/s; median of {reps}",
            details={"seconds": times, "mib_per_s": rate}))
    return rows


# ---------------------------------------------------------------- row 4: a seed sweep

def row_sweep(ws: Workspace, cfg: Config) -> list[Row]:
    """Row 4: seeds recorded one run each vs the same generations bare, interleaved seed by seed."""
    import numpy as np
    import torch

    import bench_gen
    from repro_track import testing

    pipe = testing.load_pipeline(ws.model, progress=False)

    def bare(seed: int) -> Any:
        return bench_gen.ddim_bare(pipe, STEPS, generator=torch.Generator("cpu").manual_seed(seed))

    def recorded(seed: int) -> Any:
        return bench_gen.ddim(pipe, STEPS, generator=torch.Generator("cpu").manual_seed(seed))

    totals = {"bare": 0.0, "recorded": 0.0}
    identical = True
    with tracking(ws.store("sweep")):
        for seed in range(2):  # warm-up: first calls load kernels and the weights digest
            bare(seed), recorded(seed)
        for seed in range(cfg.seeds):
            out = {}
            order = ("bare", "recorded") if seed % 2 else ("recorded", "bare")
            for name in order:
                fn = bare if name == "bare" else recorded
                start = time.perf_counter()
                out[name] = fn(seed)
                totals[name] += time.perf_counter() - start
            recorded_run_id(bench_gen.ddim)
            identical = identical and np.array_equal(out["bare"], out["recorded"])
    rec, plain = totals["recorded"], totals["bare"]
    return [Row("4", f"seed sweep, {cfg.seeds} tiny DDIM calls ({STEPS} steps)", rec, plain, "bare calls", "s",
                note=f"overhead {100 * (rec - plain) / rec:.0f}% of the recorded total, "
                     f"{1e3 * (rec - plain) / cfg.seeds:.1f} ms per call; recorded outputs identical to bare: "
                     f"{'yes' if identical else 'NO'}",
                details={"totals": totals, "identical": identical})]


# ---------------------------------------------------------------- row 5: CLI cold start

def row_cli(ws: Workspace, cfg: Config) -> list[Row]:
    """Row 5: import repro_track, repro-track --help and repro-track show, each in a fresh process."""
    env = ws.env()
    check = ("import json, sys; import repro_track; "
             f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    python = [sys.executable, "-c", "pass"]
    times = interleaved({"python": lambda: wall(python, env, ws.root),
                         "import": lambda: wall([sys.executable, "-c", check], env, ws.root),
                         "help": lambda: wall([*console_script("repro-track"), "--help"], env, ws.root)},
                        cfg.cli_reps, warmup=1)
    heavy = last_json(wall([sys.executable, "-c", check], env, ws.root)[1].stdout)
    uri, run_id = ws.ddim_run()
    run_env = ws.env(uri)
    shows = interleaved({"show": lambda: wall([*console_script("repro-track"), "show", run_id], run_env, ws.root),
                         "mlflow": lambda: wall([*console_script("mlflow"), "runs", "describe", "--run-id", run_id],
                                                run_env, ws.root)}, cfg.show_reps)
    start, imp, help_ = median(times["python"]), median(times["import"]), median(times["help"])
    return [
        Row("5a", "import repro_track (fresh process)", imp, start, "python -c pass", "s",
            "no torch/mlflow/diffusers", not set(heavy) & {"torch", "mlflow", "diffusers"},
            note=f"heavy modules imported: {', '.join(heavy) or 'none'}",
            measured_text=f"{_fmt(imp, 's')}, heavy: {', '.join(heavy) or 'none'}",
            details={"samples": times["import"], "heavy": heavy}),
        Row("5b", "repro-track --help", help_, start, "python -c pass", "s", "< 0.3 s", help_ < 0.3,
            note=f"median of {cfg.cli_reps}", details={"samples": times["help"]}),
        Row("5c", "repro-track show RUN", median(shows["show"]), median(shows["mlflow"]),
            "mlflow runs describe", "s", note=f"median of {cfg.show_reps}; show also fetches and "
            "verifies the manifest and outputs", details={"samples": shows}),
    ]


# ---------------------------------------------------------------- row 6: replay

def row_replay(ws: Workspace, cfg: Config) -> list[Row]:
    """Row 6: repro-track replay RUN --no-log vs the recorded generation's own time, run by run.

    Each repetition records a new run in a fresh process (its first generation is as cold as the one
    the replay's child runs) and replays it, so both medians come from the same number of processes.
    """
    from mlflow.tracking import MlflowClient

    generations, replays, observed = [], [], []
    for _ in range(cfg.replay_reps):
        uri, run_id = ws.record_ddim()
        generations.append(MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics["duration_s"])
        cmd = [*console_script("repro-track"), "replay", run_id, "--no-log", "--json",
               "--project-dir", str(ws.project)]
        elapsed, done = wall(cmd, ws.env(uri), ws.root)
        replays.append(elapsed)
        observed.append(last_json(done.stdout)["observed"])
    replay_s, generation = median(replays), median(generations)
    return [Row("6", "replay --no-log, tiny DDIM (fresh process)", replay_s, generation,
                "recorded generation", "s", "<= generation + 3 s", replay_s - generation < 3.0,
                note=f"replay adds {replay_s - generation:.2f} s; observed {', '.join(observed)}; "
                     f"median of {cfg.replay_reps}",
                details={"replay_s": replays, "generation_s": generations, "observed": observed})]


# ---------------------------------------------------------------- table and main

ROWS: dict[int, tuple[str, Callable[[Workspace, Config], list[Row]]]] = {
    1: ("per-call overhead of @record", row_record_overhead),
    2: ("environment capture", row_capture),
    3: ("output digesting and saving", row_outputs),
    4: ("seed sweep", row_sweep),
    5: ("CLI cold start", row_cli),
    6: ("replay", row_replay),
}
HEADERS = ["row", "measured", "baseline", "ratio", "target", "met?"]


def table(rows: list[Row], markdown: bool) -> str:
    """The results as an aligned text table (or Markdown), then one line of context per row."""
    cells = [HEADERS] + [row.cells() for row in rows]
    if markdown:
        lines = ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in cells]
        lines.insert(1, "|" + "|".join("---" for _ in HEADERS) + "|")
    else:
        widths = [max(len(line[i]) for line in cells) for i in range(len(HEADERS))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"{'- ' if markdown else ''}{row.key}: {row.note}" for row in rows if row.note]
    return "\n".join(lines + [""] + notes)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    from importlib import metadata

    versions = {}
    for name in ("repro-track", "torch", "mlflow", "diffusers", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "load_average": _load(),
            "versions": versions}


def _load() -> float | None:
    """The 1-minute load average (how busy the machine was), where the OS reports one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="repro-track benchmarks: ratios against baselines, "
                                     "measured side by side in one run (see benchmarks/README.md).")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute (fewer "
                        "repetitions, no 512 MiB output)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--only", metavar="ROWS", help="comma-separated row numbers to run, e.g. 1,3")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch intra-op threads here and OMP_NUM_THREADS in subprocesses (default 1; 0: "
                        "torch's own choice). More than one makes rows 3, 4 and 6 erratic on a busy machine, "
                        "where OpenMP workers wait for CPU time at every op")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[list[Row], float]:
    """Run the selected rows in a fresh temp folder (deleted afterwards unless --keep)."""
    cfg = QUICK if args.quick else Config()
    selected = sorted(int(n) for n in args.only.split(",")) if args.only else sorted(ROWS)
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="repro-track-bench-"))
    saved_env = dict(os.environ)
    rows: list[Row] = []
    try:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "REPRO_TRACK_DISABLE"):
            os.environ.pop(name, None)
        os.environ["REPRO_TRACK_SPOOL_DIR"] = str(root / "spool")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
            os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        with contextlib.chdir(root):  # anything written relative to the working dir lands in the temp folder
            progress(f"setting up in {root}")
            ws = Workspace(root)
            sys.path.insert(0, str(ws.project))
            for number in selected:
                title, fn = ROWS[number]
                progress(f"row {number}: {title}")
                rows.extend(fn(ws, cfg))
            leftover = list(ws.spool.glob("*")) if ws.spool.is_dir() else []
            if leftover:
                progress(f"warning: {len(leftover)} recordings stayed in the spool (not logged)")
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        if args.keep:
            progress(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return rows, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, optionally write JSON; exit 0 (targets are reported, not enforced)."""
    args = parse_args(argv)
    load_before = _load()
    rows, total = run(args)
    info = machine()
    print(table(rows, args.markdown))
    print(f"\ntotal runtime {total:.0f} s ({'quick' if args.quick else 'full'} run); {info['cpus']} CPUs, "
          f"load average {load_before} before and {info['load_average']} after; torch threads "
          f"{args.threads or 'default'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"quick": args.quick, "threads": args.threads, "total_s": total,
                                               "load_average_before": load_before, "machine": info,
                                               "rows": [row.to_dict() for row in rows]}, indent=1), "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
