"""Benchmarks of recording: the per-call cost of @record (row 1) and a recorded seed sweep (row 4)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import bench_project
from bench_common import (STEPS, Config, Row, Workspace, flush_pending, fmt, interleaved, median, recorded_run_id,
                          tracking, uploader_ready)


def handwritten_fixture(uri: str, run_id: str, folder: Path) -> dict[str, Any]:
    """What repro-track logged for one call (tags, params, metrics, artifact bytes), to log again by hand.

    Image previews are not copied: the hand-written side writes a PNG of its own generation's image
    under the same name (``images``), as a user logging by hand would.
    """
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
        "files": {p.relative_to(folder).as_posix(): base64.b64encode(p.read_bytes()).decode("ascii") for p in files
                  if p.relative_to(folder).as_posix() != tags.OUTPUTS_PATH and p.suffix != ".png"},
        "images": [p.relative_to(folder).as_posix() for p in files if p.suffix == ".png"],
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
        uploader_ready()
        runs = {"recorded": recorded_run_id(bench_gen.small)}  # the run whose content both sides log
        fixture = handwritten_fixture(recorded_uri, runs["recorded"], ws.root / "fixture")

        def recorded() -> None:
            bench_gen.small()

        def by_hand() -> None:
            runs["handwritten"] = handwritten.log_call(client, experiment_id, fixture, staging,
                                                       bench_gen.small_bare())

        times = interleaved({"recorded": recorded, "handwritten": by_hand}, cfg.calls, cfg.warmup)
    flush_s = flush_pending()  # background uploads still running are part of the cost, if not of the call
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
        Row("1a", f"@record per call (blocking), median of {cfg.calls}", rec, hand, "hand-written MLflow", "s",
            "<= 0.3x and <= 5 ms over bare", rec <= 0.3 * hand and rec - bare <= 0.005,
            note=f"same artifact bytes and keys as the hand-written run: {'yes' if identical else 'NO'}; "
                 f"runs logged: {logged['recorded']} recorded, {logged['handwritten']} by hand; "
                 f"waiting for the background uploads afterwards took {flush_s:.2f} s",
            details={"samples": times, "same_content": identical, "flush_s": flush_s}),
        Row("1b", "@record per call vs the bare call", rec, bare, "bare call", "s",
            note=f"overhead {1e3 * (rec - bare):.1f} ms per call (target <= 5 ms)"),
        Row("1c", "@record first call, fresh process (imports included)", cold["recorded"],
            cold["baseline"], "hand-written MLflow", "s",
            note=f"bare first call with imports {fmt(cold['bare'], 's')}; "
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



def row_sweep(ws: Workspace, cfg: Config) -> list[Row]:
    """Row 4: seeds recorded one run each vs the same generations logged by hand, and bare.

    Each variant runs its whole sweep as one block, so that work it leaves in the background (the
    recording's uploads, waited for at the end with flush) is timed with it and not with the block
    after it; two rounds in rotating order, the median (here: the mean) of each variant's rounds.
    """
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    import bench_gen
    import handwritten
    from repro_track import testing

    pipe = testing.load_pipeline(ws.model, progress=False)
    recorded_uri, by_hand_uri = ws.store("sweep"), ws.store("sweep-handwritten")
    client = MlflowClient(tracking_uri=by_hand_uri)
    experiment_id = client.get_experiment_by_name(bench_project.EXPERIMENT).experiment_id

    def generator(seed: int) -> Any:
        return torch.Generator("cpu").manual_seed(seed)

    def bare(seed: int) -> Any:
        return bench_gen.ddim_bare(pipe, STEPS, generator=generator(seed))

    def recorded(seed: int) -> Any:
        return bench_gen.ddim(pipe, STEPS, generator=generator(seed))

    def by_hand(seed: int) -> Any:
        images = bare(seed)
        handwritten.log_call(client, experiment_id, fixture, ws.root / "sweep-staging", torch.from_numpy(images))
        return images

    variants = {"bare": bare, "recorded": recorded, "handwritten": by_hand}
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    flushes: list[float] = []
    outputs: dict[str, dict[int, Any]] = {name: {} for name in variants}
    with tracking(recorded_uri):
        for seed in range(2):  # warm-up: first calls load kernels and the weights digest
            bare(seed), recorded(seed)
        fixture = handwritten_fixture(recorded_uri, recorded_run_id(bench_gen.ddim), ws.root / "sweep-fixture")
        flush_pending()
        uploader_ready()
        for index in range(2):
            order = list(variants)[index:] + list(variants)[:index]
            for name in order:
                start = time.perf_counter()
                for seed in range(cfg.seeds):
                    outputs[name][seed] = variants[name](seed)
                if name == "recorded":
                    flushes.append(flush_pending())
                rounds[name].append(time.perf_counter() - start)
        recorded_run_id(bench_gen.ddim)
    identical = all(np.array_equal(outputs["bare"][seed], outputs["recorded"][seed]) for seed in range(cfg.seeds))
    totals = {name: median(times) for name, times in rounds.items()}
    rec, hand, plain = totals["recorded"], totals["handwritten"], totals["bare"]
    return [Row("4", f"seed sweep, {cfg.seeds} tiny DDIM calls ({STEPS} steps), flush included", rec, hand,
                "hand-written MLflow", "s", "<= 1.0x", rec <= hand,
                note=f"bare calls {plain:.2f} s: recording adds {1e3 * (rec - plain) / cfg.seeds:.1f} ms per call, "
                     f"logging by hand {1e3 * (hand - plain) / cfg.seeds:.1f} ms; each sweep a block of its own, "
                     f"median of 2 rounds; the final flush took {', '.join(f'{f:.2f}' for f in flushes)} s; "
                     f"recorded outputs identical to bare: {'yes' if identical else 'NO'}",
                details={"rounds": rounds, "flush_s": flushes, "identical": identical})]
