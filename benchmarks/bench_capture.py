"""Benchmark of environment capture per call against torch's own collect_env (row 2)."""

from __future__ import annotations

from bench_common import Config, Row, Workspace, interleaved, median


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


