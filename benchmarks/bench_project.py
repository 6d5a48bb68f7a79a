"""The small project the benchmark records from: written into its temp folder as real module files.

Recorded functions must live in importable files (replay imports them again), so the benchmark writes
these sources to ``<temp>/project``, makes that folder a clean git repository (git capture then costs
what it costs in a real project: one ``git status``), and imports or runs them from there.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

EXPERIMENT = "bench"

BENCH_GEN = '''
    """Functions the benchmark calls bare and recorded: a fixed small tensor and the tiny DDIM pipeline."""
    import torch

    import repro_track

    EXPERIMENT = "bench"


    def small_bare():
        return torch.arange(16.0)


    @repro_track.record(experiment=EXPERIMENT)
    def small():
        return torch.arange(16.0)


    def ddim_bare(pipe, num_inference_steps: int, *, generator=None):
        return pipe(num_inference_steps=num_inference_steps, generator=generator, output_type="np").images


    @repro_track.record(experiment=EXPERIMENT)
    def ddim(pipe, num_inference_steps: int, *, generator=None):
        return pipe(num_inference_steps=num_inference_steps, generator=generator, output_type="np").images
'''

HANDWRITTEN = '''
    """The hand-written baseline: log what repro-track logs for one call, with plain MlflowClient calls.

    The fixture holds the tags, params, metrics, manifest and requirements of a run repro-track
    recorded, so both sides write the same bytes; the output tensor is serialised here, per call.
    """
    import base64
    import json
    import time
    from pathlib import Path

    import torch
    from mlflow.entities import Metric, Param
    from PIL import Image
    from safetensors.torch import save_file


    def load_fixture(path):
        return json.loads(Path(path).read_text("utf-8"))


    def log_call(client, experiment_id, fixture, staging, result):
        start = int(time.time() * 1000)
        run_id = client.create_run(experiment_id, start_time=start, tags=fixture["tags"],
                                   run_name=fixture["run_name"]).info.run_id
        client.log_batch(run_id, metrics=[Metric(k, v, start, 0) for k, v in fixture["metrics"].items()],
                         params=[Param(k, v) for k, v in fixture["params"].items()])
        staging = Path(staging)
        for relative, encoded in fixture["files"].items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(base64.b64decode(encoded))
        save_file({"output": result.contiguous()}, str(staging / fixture["outputs_file"]),
                  metadata=fixture["outputs_metadata"])
        for index, relative in enumerate(fixture.get("images", [])):  # (N, H, W, C) floats in [0, 1]
            pixels = (result[index].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(staging / relative)
        client.log_artifacts(run_id, str(staging))
        client.set_terminated(run_id, "FINISHED", end_time=int(time.time() * 1000))
        return run_id
'''

COLD_CALL = '''
    """First call in a fresh process, imports included: python cold_call.py VARIANT [FIXTURE STAGING]."""
    import time

    START = time.perf_counter()
    import json
    import os
    import sys

    import torch  # noqa: F401  (the user's module imports it; counted for every variant)

    import bench_gen

    variant = sys.argv[1]
    if variant == "baseline":
        from mlflow.tracking import MlflowClient

        import handwritten

        client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
        experiment_id = client.get_experiment_by_name(bench_gen.EXPERIMENT).experiment_id
        fixture = handwritten.load_fixture(sys.argv[2])
    ready = time.perf_counter()
    if variant == "bare":
        bench_gen.small_bare()
    elif variant == "recorded":
        bench_gen.small()
    else:
        handwritten.log_call(client, experiment_id, fixture, sys.argv[3], bench_gen.small_bare())
    done = time.perf_counter()
    if variant == "recorded":
        import repro_track

        outcome = repro_track.last_recording(bench_gen.small)
        run_id = outcome.wait(120) if hasattr(outcome, "wait") else outcome.run_id  # background delivery
        assert run_id, "the cold call was spooled, not logged"
    print(json.dumps({"setup_s": ready - START, "call_s": done - ready, "total_s": done - START}))
'''

COLD_CAPTURE = '''
    """Environment capture, first call in a fresh process (torch already imported) and then cached."""
    import json
    import statistics
    import sys
    import time
    from pathlib import Path

    import torch  # noqa: F401  (a recording process has torch loaded before its first capture)

    from repro_track import capture
    from repro_track.capture import envvars, torch_state

    source = Path(sys.argv[1])
    times = []
    for _ in range(int(sys.argv[2])):
        start = time.perf_counter()
        capture.environment(source)
        torch_state.determinism_knobs()
        torch_state.global_rng_states()
        envvars.capture_env_vars()
        times.append(time.perf_counter() - start)
    print(json.dumps({"first_s": times[0], "cached_s": statistics.median(times[2:])}))
'''

RECORD_DDIM = '''
    """Record one tiny DDIM generation in a fresh process (as cold as a replay's child) and print its run."""
    import json
    import sys

    import torch

    import bench_gen
    import repro_track
    from repro_track import testing

    pipe = testing.load_pipeline(sys.argv[1], progress=False)
    bench_gen.ddim(pipe, int(sys.argv[2]), generator=torch.Generator("cpu").manual_seed(0))
    outcome = repro_track.last_recording(bench_gen.ddim)
    run_id = outcome.wait(120) if hasattr(outcome, "wait") else outcome.run_id  # background delivery
    print(json.dumps({"run_id": run_id}))
'''

FILES = {
    "bench_gen.py": BENCH_GEN,
    "handwritten.py": HANDWRITTEN,
    "cold_call.py": COLD_CALL,
    "cold_capture.py": COLD_CAPTURE,
    "record_ddim.py": RECORD_DDIM,
    ".gitignore": "__pycache__/\n",
}


def write(root: Path) -> Path:
    """Write the project under root and commit it, so its git state is clean; returns root."""
    root.mkdir(parents=True)
    for name, source in FILES.items():
        (root / name).write_text(textwrap.dedent(source).lstrip("\n"), "utf-8")
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "-A"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "benchmark project"], cwd=root, check=True)
    return root
