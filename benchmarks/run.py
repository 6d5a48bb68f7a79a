"""repro-track benchmarks: what recording costs, measured side by side with what it replaces.

    python benchmarks/run.py [--quick] [--json PATH] [--markdown] [--only 1,3] [--threads N] [--keep]

Every row times repro-track and its baseline in the same process run, on the same inputs, interleaved
where they run in-process, and reports the ratio: the machines this runs on are noisy, so absolute times
are context and the ratios are the result. Everything written (MLflow SQLite stores and artifacts, the
spool, a tiny DDIM pipeline, a small git project) goes into one temp folder, deleted at the end.
This file is the runner; each family of rows lives in a bench_*.py module beside it. See
benchmarks/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_capture
import bench_cli
import bench_env
import bench_outputs
import bench_peers
import bench_postgres
import bench_recording
import bench_replay
from bench_common import QUICK, Config, Row, Workspace, progress

ROWS: dict[int, tuple[str, Callable[[Workspace, Config], list[Row]]]] = {
    1: ("per-call overhead of @record", bench_recording.row_record_overhead),
    2: ("environment capture", bench_capture.row_capture),
    3: ("output digesting and saving", bench_outputs.row_outputs),
    4: ("seed sweep", bench_recording.row_sweep),
    5: ("CLI cold start", bench_cli.row_cli),
    6: ("replay", bench_replay.row_replay),
    7: ("peers: MLflow fluent API, Weights & Biases offline", bench_peers.row_peers),
    8: ("recordings/s against a PostgreSQL-backed tracking server", bench_postgres.row_server_throughput),
    9: ("replay --env recorded: build, then reuse", bench_env.row_env),
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


def file_latency_us(folder: Path, reps: int = 100) -> float:
    """Median microseconds to make a folder and write a small file into it, in ``folder``: what staging
    a recording (row 1a) does about eight times per call. Some disks swing by 10x within minutes (an ext4
    mounted with ``discard`` after many deletions), so each run reports it before and after its rows."""
    import statistics

    probe = Path(tempfile.mkdtemp(prefix="fs-probe-", dir=folder))
    times = []
    try:
        for i in range(reps):
            start = time.perf_counter()
            (probe / str(i)).mkdir()
            (probe / str(i) / "f").write_bytes(b"x")
            times.append(time.perf_counter() - start)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return round(1e6 * statistics.median(times) / 2, 1)


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


def run_row(number: int, title: str, fn: Callable[[Workspace, Config], list[Row]], ws: Workspace,
            cfg: Config) -> list[Row]:
    """One family's rows; if it fails (a recording that was spooled, a command that exited non-zero),
    one row saying why, so that the other rows still get measured."""
    try:
        return fn(ws, cfg)
    except Exception as exc:  # noqa: BLE001 -- reported in the table, and the run goes on
        reason = " ".join(str(exc).split())[-300:] or type(exc).__name__  # the end says why
        progress(f"row {number} failed: {reason}")
        return [Row(str(number), f"{title}: failed", float("nan"), None, "-", "s", met=False,
                    measured_text="failed", note=f"failed: {reason}")]


def run(args: argparse.Namespace) -> tuple[list[Row], float, dict[str, float]]:
    """Run the selected rows in a fresh temp folder (deleted afterwards unless --keep); also returns the
    file latency there before and after them."""
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
        latency = {"before": file_latency_us(root)}
        with contextlib.chdir(root):  # anything written relative to the working dir lands in the temp folder
            progress(f"setting up in {root}")
            ws = Workspace(root)
            sys.path.insert(0, str(ws.project))
            for number in selected:
                title, fn = ROWS[number]
                progress(f"row {number}: {title}")
                rows.extend(run_row(number, title, fn, ws, cfg))
            latency["after"] = file_latency_us(root)
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
    return rows, time.perf_counter() - started, latency


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, optionally write JSON; exit 0 (targets are reported, not enforced)."""
    args = parse_args(argv)
    load_before = _load()
    rows, total, latency = run(args)
    info = machine()
    info["file_create_us"] = latency
    print(table(rows, args.markdown))
    print(f"\ntotal runtime {total:.0f} s ({'quick' if args.quick else 'full'} run); {info['cpus']} CPUs, "
          f"load average {load_before} before and {info['load_average']} after; torch threads "
          f"{args.threads or 'default'}; making a folder or a file in the temp folder took "
          f"{latency['before']:.0f} us before and {latency.get('after', float('nan')):.0f} us after")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"quick": args.quick, "threads": args.threads, "total_s": total,
                                               "load_average_before": load_before, "machine": info,
                                               "rows": [row.to_dict() for row in rows]}, indent=1), "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
