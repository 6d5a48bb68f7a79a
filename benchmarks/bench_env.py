"""Row 9: what `replay --env recorded` costs: building the recorded environment once, then reusing it.

The recorded package set differs from this environment by one pure-Python package, served from a local
wheelhouse (no index): the first replay builds a uv environment layered over this one and installs it;
every later replay of the same set finds it in the cache. The baseline is what a user would do by hand
for the same result: `python -m venv` and `pip install` of the same wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench_common import Config, Row, Workspace, median, progress


def row_env(ws: Workspace, cfg: Config) -> list[Row]:
    """9a first build vs venv + pip install by hand; 9b cached reuse vs the first build."""
    from repro_track import envbuild, testing
    from repro_track.capture import packages, provenance

    wheelhouse = ws.root / "wheels"
    testing.build_wheel(wheelhouse, "rtk_benchpkg", "1.0", "VALUE = 1\n")
    recorded = packages.requirements_text() + "rtk-benchpkg==1.0\n"
    software = {"provenance": provenance.provenance()}
    os.environ.update(UV_FIND_LINKS=str(wheelhouse), UV_NO_INDEX="1", REPRO_TRACK_ENV_CACHE=str(ws.root / "envs"))
    try:
        builds, reuses, by_hand = [], [], []
        for rep in range(max(1, cfg.cold_reps)):
            progress(f"row 9: --env recorded build {rep + 1}")
            os.environ["REPRO_TRACK_ENV_CACHE"] = str(ws.root / f"envs-{rep}")
            start = time.perf_counter()
            plan = envbuild.plan(recorded, software, trusted=False, allow_new=True)
            envbuild.build(plan, software)
            builds.append(time.perf_counter() - start)
            start = time.perf_counter()
            envbuild.build(envbuild.plan(recorded, software, trusted=False, allow_new=True), software)
            reuses.append(time.perf_counter() - start)
            venv = ws.root / f"by-hand-{rep}"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-index",
                            "--find-links", str(wheelhouse), "rtk-benchpkg==1.0"], check=True, capture_output=True)
            by_hand.append(time.perf_counter() - start)
    finally:
        for name in ("UV_FIND_LINKS", "UV_NO_INDEX", "REPRO_TRACK_ENV_CACHE"):
            os.environ.pop(name, None)
    first, again, hand = median(builds), median(reuses), median(by_hand)
    return [
        Row("9a", "--env recorded, first replay of a package set (build)", first, hand,
            "python -m venv + pip install, by hand", "s",
            note=f"one differing pure-Python package from a local wheelhouse; median of {len(builds)}"),
        Row("9b", "--env recorded, later replays (cache hit)", again, first, "the first build", "s",
            note="plan + cache lookup; nothing installed"),
    ]
