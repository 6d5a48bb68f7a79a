"""Benchmark of repro-track beside what a user would pick instead (row 7).

Each variant generates the same tiny DDIM image for the same seeds and keeps one run per generation:
repro-track's ``@record`` (everything it records, uploaded by its delivery), MLflow's fluent API logging
the image and the parameters (``start_run``, ``log_params``, ``log_image``), and Weights & Biases in
offline mode logging the image and the config (``init``, ``log``, ``finish``; an optional dependency,
the ``bench`` extra: without it the row says so). Each variant runs its generations as one block, the
recorded block ending with the wait for its background uploads, so that the work each leaves behind is
timed with it; two rounds in rotating order.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import bench_project
from bench_common import (STEPS, Config, Row, Workspace, flush_pending, median, progress, recorded_run_id,
                          tracking, uploader_ready)

WANDB_HINT = "wandb is not installed: pip install -e '.[bench]' (or pip install wandb) to measure it"


def _wandb() -> Any | None:
    """The wandb module, or None where it is not installed (the row then says how to add it)."""
    try:
        import wandb
    except ImportError:
        return None
    return wandb


def _wandb_variant(wandb: Any, folder: Path, generate: Any) -> Any:
    """One offline W&B run per generation: the config, then the image; finish writes it locally."""
    folder.mkdir()
    settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, x_disable_meta=True)
    seeds = itertools.count()

    def logged() -> None:
        seed = next(seeds)
        images = generate(seed)
        run = wandb.init(mode="offline", dir=str(folder), project=bench_project.EXPERIMENT,
                         config={"num_inference_steps": STEPS, "seed": seed}, settings=settings)
        run.log({"image": wandb.Image(images[0])})
        run.finish()

    return logged


def row_peers(ws: Workspace, cfg: Config) -> list[Row]:
    """Row 7: @record per generation vs MLflow's fluent API and W&B offline logging the same image."""
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    import bench_gen
    from repro_track import testing

    pipe = testing.load_pipeline(ws.model, progress=False)
    recorded_uri, fluent_uri = ws.store("peers-record"), ws.store("peers-fluent")
    experiment_id = MlflowClient(tracking_uri=fluent_uri).get_experiment_by_name(
        bench_project.EXPERIMENT).experiment_id
    counters = {name: itertools.count() for name in ("bare", "repro-track", "mlflow")}

    def generate(seed: int) -> Any:
        return bench_gen.ddim_bare(pipe, STEPS, generator=torch.Generator("cpu").manual_seed(seed))

    def bare() -> None:
        generate(next(counters["bare"]))

    def recorded() -> None:
        with tracking(recorded_uri):
            bench_gen.ddim(pipe, STEPS, generator=torch.Generator("cpu").manual_seed(next(counters["repro-track"])))

    def fluent() -> None:
        seed = next(counters["mlflow"])
        images = generate(seed)
        with tracking(fluent_uri), mlflow.start_run(experiment_id=experiment_id):
            mlflow.log_params({"num_inference_steps": STEPS, "seed": seed})
            mlflow.log_image(images[0], "images/output_0.png")

    variants = {"bare": bare, "repro-track": recorded, "mlflow": fluent}
    wandb = _wandb()
    if wandb is not None:
        variants["wandb"] = _wandb_variant(wandb, ws.root / "wandb", generate)
    else:
        progress(WANDB_HINT)
    for variant in variants.values():  # warm-up: first calls load kernels, clients, the weights digest
        variant(), variant()
    flush_pending()
    uploader_ready()
    times: dict[str, list[float]] = {name: [] for name in variants}
    flushes = []
    for index in range(2):
        names = list(variants)[index % len(variants):] + list(variants)[:index % len(variants)]
        for name in names:
            start = time.perf_counter()
            for _ in range(cfg.peer_calls):
                variants[name]()
            if name == "repro-track":
                flushes.append(flush_pending())
            times[name].append((time.perf_counter() - start) / cfg.peer_calls)
    recorded_run_id(bench_gen.ddim)  # the last recording reached MLflow, not only the spool
    return [_row(key, peer, times, max(flushes), cfg) for key, peer in (("7a", "mlflow"), ("7b", "wandb"))]


def _row(key: str, peer: str, times: dict[str, list[float]], flush_s: float, cfg: Config) -> Row:
    """repro-track's median per generation against one peer's, with the overheads over the bare call."""
    names = {"mlflow": "MLflow fluent API", "wandb": "W&B offline"}
    ours, bare = median(times["repro-track"]), median(times["bare"])
    title = f"@record vs {names[peer]}, tiny DDIM + one run per generation"
    if peer not in times:
        return Row(key, title, ours, None, names[peer], "s", note=WANDB_HINT)
    theirs = median(times[peer])
    return Row(key, title, ours, theirs, names[peer], "s",
               note=f"logging adds {1e3 * (ours - bare):.1f} ms (repro-track) vs {1e3 * (theirs - bare):.1f} ms "
                    f"({names[peer]}) to a {1e3 * bare:.1f} ms generation; per generation over a block of "
                    f"{cfg.peer_calls}, median of 2 rounds; repro-track's blocks include waiting for its "
                    f"background uploads (at most {1e3 * flush_s:.0f} ms); the peer logs the image and "
                    "parameters only, repro-track also the manifest, outputs and requirements",
               details={"samples": {k: v for k, v in times.items() if k in ("bare", "repro-track", peer)},
                        "flush_s": flush_s})
