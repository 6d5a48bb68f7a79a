"""Benchmarks of the CLI's cold start: import, --help and show, each in a fresh process (row 5)."""

from __future__ import annotations

import sys

from bench_common import HEAVY, Config, Row, Workspace, console_script, fmt, interleaved, last_json, median, wall


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
    start, imp, help_ = median(times["python"]), median(times["import"]), median(times["help"])
    return [
        Row("5a", "import repro_track (fresh process)", imp, start, "python -c pass", "s",
            "no torch/mlflow/diffusers", not set(heavy) & {"torch", "mlflow", "diffusers"},
            note=f"heavy modules imported: {', '.join(heavy) or 'none'}",
            measured_text=f"{fmt(imp, 's')}, heavy: {', '.join(heavy) or 'none'}",
            details={"samples": times["import"], "heavy": heavy}),
        Row("5b", "repro-track --help", help_, start, "python -c pass", "s", "< 0.3 s", help_ < 0.3,
            note=f"median of {cfg.cli_reps}", details={"samples": times["help"]}),
        _row_show(ws, cfg),
    ]


def _row_show(ws: Workspace, cfg: Config) -> Row:
    """5c: repro-track show RUN vs mlflow runs describe; where MLflow's command fails on the run, show
    alone, and the note says why the baseline is missing."""
    uri, run_id = ws.ddim_run()
    run_env = ws.env(uri)
    show = [*console_script("repro-track"), "show", run_id]
    describe = [*console_script("mlflow"), "runs", "describe", "--run-id", run_id]
    note = f"median of {cfg.show_reps}; show also fetches and verifies the manifest and outputs"
    try:
        wall(describe, run_env, ws.root)
    except RuntimeError as exc:
        shows = interleaved({"show": lambda: wall(show, run_env, ws.root)}, cfg.show_reps)
        last = str(exc).strip().splitlines()[-1][:200]
        return Row("5c", "repro-track show RUN", median(shows["show"]), None, "mlflow runs describe", "s",
                   note=f"{note}; no baseline: mlflow runs describe failed on this run ({last})",
                   details={"samples": shows})
    shows = interleaved({"show": lambda: wall(show, run_env, ws.root),
                         "mlflow": lambda: wall(describe, run_env, ws.root)}, cfg.show_reps)
    return Row("5c", "repro-track show RUN", median(shows["show"]), median(shows["mlflow"]),
               "mlflow runs describe", "s", note=note, details={"samples": shows})


