"""Benchmark of replay: what `repro-track replay RUN` adds to the generation, against the floor of a
fresh process importing torch and diffusers (row 6)."""

from __future__ import annotations

import sys

from bench_common import Config, Row, Workspace, console_script, last_json, median, wall

# What any replay's child must do before it can generate: a fresh interpreter importing torch and the
# pipeline class (diffusers imports lazily, so naming the class is what loads it).
FLOOR = "import torch, diffusers; diffusers.DDIMPipeline"


def row_replay(ws: Workspace, cfg: Config) -> list[Row]:
    """Row 6: repro-track replay RUN --no-log minus the recorded generation's own time, vs the floor.

    Each repetition records a new run in a fresh process (its first generation is as cold as the one
    the replay's child runs), replays it and times the floor once, so all three medians come from the
    same number of processes on a machine in the same state.
    """
    from mlflow.tracking import MlflowClient

    generations, replays, floors, observed = [], [], [], []
    for _ in range(cfg.replay_reps):
        uri, run_id = ws.record_ddim()
        generations.append(MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics["duration_s"])
        cmd = [*console_script("repro-track"), "replay", run_id, "--no-log", "--json",
               "--project-dir", str(ws.project)]
        elapsed, done = wall(cmd, ws.env(uri), ws.root)
        replays.append(elapsed)
        observed.append(last_json(done.stdout)["observed"])
        floors.append(wall([sys.executable, "-c", FLOOR], ws.env(), ws.root)[0])
    replay_s, generation, floor = median(replays), median(generations), median(floors)
    added = replay_s - generation
    return [Row("6", "replay --no-log adds to the generation, tiny DDIM", added, floor,
                "fresh import of torch + diffusers", "s", "<= 1.25x", added <= 1.25 * floor,
                note=f"replay {replay_s:.2f} s for a {generation:.2f} s generation; observed "
                     f"{', '.join(observed)}; median of {cfg.replay_reps}",
                details={"replay_s": replays, "generation_s": generations, "floor_s": floors,
                         "observed": observed})]
