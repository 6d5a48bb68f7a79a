"""Run an audit's replays as tasks on a Ray cluster, each placed where its recording can be reproduced.

A CPU recording runs on any node; a GPU recording asks for as many GPUs as it used and, when an
exact replay is wanted, for the recorded GPU model as Ray's ``accelerator_type``. Inside the task the
worker replays the run with :func:`repro_track.replay.replay`, which judges the worker's own machine
by the same prediction rules before it reruns anything. The project's code travels as the tasks'
``working_dir``; repro-track itself must be installed on the workers (as the replay's fresh process
imports it). Ray is optional (``pip install 'repro-track[ray]'``) and imported only here, when used.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ReproTrackError

# How Ray names an NVIDIA node's accelerator (ray._private.accelerators.nvidia_gpu): the first
# upper-case model token after the vendor, so "NVIDIA H100 80GB HBM3" -> "H100" (ray.util.accelerators).
_NVIDIA_MODEL = re.compile(r"\w+\s+((?:[A-Z]+\s+)*[A-Z0-9]*\d[A-Z0-9]*)")


class RayUnavailableError(ReproTrackError, ImportError):
    """Ray is not installed here; the audit says how to install it."""


@dataclass(frozen=True)
class TaskFailure:
    """A replay task that returned nothing: its worker died, or Ray could not run it."""

    message: str


@dataclass(frozen=True)
class Placement:
    """The Ray resources one replay asks for."""

    num_gpus: int = 0
    accelerator_type: str | None = None
    num_cpus: float = 1.0

    def resources(self) -> dict[str, float]:
        """The cluster resources this placement needs, named as ``ray.cluster_resources()`` names them."""
        needed = {"CPU": self.num_cpus}
        if self.num_gpus:
            needed["GPU"] = float(self.num_gpus)
        if self.accelerator_type:
            needed[f"accelerator_type:{self.accelerator_type}"] = 0.001
        return needed

    def describe(self) -> str:
        """One phrase for messages: "1 CPU", "1 GPU (H100)"."""
        if not self.num_gpus:
            return f"{self.num_cpus:g} CPU"
        return f"{self.num_gpus} GPU" + (f" ({self.accelerator_type})" if self.accelerator_type else "")


def accelerator_type(gpu_name: str | None) -> str | None:
    """Ray's accelerator type for an NVIDIA device name ("NVIDIA H100 80GB HBM3" -> "H100")."""
    if not gpu_name:
        return None
    match = _NVIDIA_MODEL.match(gpu_name)
    if match and len(match.group(1)) > 1:
        return match.group(1).replace(" ", "-")
    cleaned = re.sub(r"^NVIDIA\s+", "", gpu_name).strip()  # consumer cards: "GeForce-RTX-4090"
    return cleaned.replace(" ", "-") or None


def _recorded_gpu(m: dict[str, Any]) -> dict[str, Any] | None:
    section = m.get("gpu") or {}
    devices = section.get("devices") or []
    if not section.get("available") or not devices:
        return None
    used = section.get("used") or [devices[0]["index"]]
    return next((d for d in devices if d["index"] == used[0]), devices[0])


def placement(m: dict[str, Any], *, same_gpu: bool = True) -> Placement:
    """What a recording's replay needs: GPUs when the call used CUDA (its CUDA generators or
    ``determinism.cuda_used``), the recorded GPU model too when ``same_gpu``; else one CPU."""
    cuda_generators = [g for g in m["randomness"]["generators"] if str(g.get("device", "")).startswith("cuda")]
    if not (m["determinism"].get("cuda_used") or cuda_generators):
        return Placement()
    count = max(1, len((m.get("gpu") or {}).get("used") or []))
    device = _recorded_gpu(m)
    model = accelerator_type(device["name"]) if device and same_gpu else None
    return Placement(num_gpus=count, accelerator_type=model)


def missing(needed: Placement, cluster: dict[str, float]) -> str | None:
    """Why no node of a cluster with these total resources can run the placement, or None.

    Ray would keep such a task pending for ever, so the audit reports it instead of submitting it.
    """
    for name, amount in needed.resources().items():
        if cluster.get(name, 0.0) >= amount:
            continue
        if name.startswith("accelerator_type:"):
            return (f"the Ray cluster has no {name.partition(':')[2]} GPU for this replay ({needed.describe()}); "
                    "add such a node, or pass --any-gpu to accept another model")
        return (f"the Ray cluster has {cluster.get(name, 0.0):g} {name} in all, and this replay needs "
                f"{amount:g} ({needed.describe()}); add such a node")
    return None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailableError("--executor ray needs Ray: pip install 'repro-track[ray]' "
                                  "(or pip install 'ray>=2.9')") from None
    return ray


def _task(replay_one: Callable[[str, dict[str, Any]], Any], run_id: str, options: dict[str, Any]) -> Any:
    """In the worker: replay from the task's working directory, the project Ray shipped, judging the
    installed packages as the replay's fresh process sees them: without the ones ``import ray`` puts
    on the worker's own sys.path (ray/thirdparty_files), which would read as a changed environment."""
    import ray

    vendored = os.path.join(os.path.dirname(os.path.abspath(ray.__file__)), "thirdparty_files")
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if os.path.abspath(p or ".") != vendored]
    try:
        return replay_one(run_id, {**options, "project_dir": os.getcwd()})
    finally:
        sys.path[:] = saved


def replay_on_ray(jobs: list[tuple[str, Placement]], replay_one: Callable[[str, dict[str, Any]], Any],
                  options: dict[str, Any], *, project_dir: str | os.PathLike, address: str | None = None,
                  local_cpus: int = 2) -> Iterator[tuple[str, Any]]:
    """Run ``replay_one(run_id, options)`` for each job as a Ray task; yield (run_id, its result or a
    TaskFailure) as they finish. Without ``address`` a local Ray instance of ``local_cpus`` CPUs is
    started (and stopped at the end); with one, that cluster is joined (``auto``: the one started here
    by ``ray start``)."""
    ray = _import_ray()
    project = Path(project_dir).resolve()
    # Ray uploads a local working_dir only for a whole job, so the job is this audit's.
    job = {"log_to_driver": False, "runtime_env": {"working_dir": str(project)}}
    started = not ray.is_initialized()
    if not started and not ray.get_runtime_context().runtime_env.get("working_dir"):
        raise ReproTrackError("Ray is already initialized in this process without a working_dir, so the "
                              "project cannot reach the workers: call audit() before ray.init(), or call "
                              "ray.init(runtime_env={'working_dir': PROJECT_DIR})")
    if started:
        try:
            if address:
                ray.init(address=address, **job)
            else:
                ray.init(num_cpus=max(1, local_cpus), include_dashboard=False, **job)
        except Exception as exc:  # no cluster there, a version mismatch: one line, with the address
            raise ReproTrackError(f"could not {'join the Ray cluster at ' + address if address else 'start Ray'}"
                                  f" ({type(exc).__name__}: {exc}); check --address and that the cluster's "
                                  "Ray and Python versions match this one's") from None
    try:
        yield from _run(ray, jobs, replay_one, options)
    finally:
        if started:
            ray.shutdown()


def _run(ray: Any, jobs: list[tuple[str, Placement]], replay_one: Callable,
         options: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    cluster = ray.cluster_resources()
    remote = ray.remote(_task)
    pending: dict[Any, str] = {}
    for run_id, needed in jobs:
        why = missing(needed, cluster)
        if why:
            yield run_id, TaskFailure(why)
            continue
        extra = {"accelerator_type": needed.accelerator_type} if needed.accelerator_type else {}
        ref = remote.options(num_cpus=needed.num_cpus, num_gpus=needed.num_gpus, max_retries=0,
                             **extra).remote(replay_one, run_id, options)
        pending[ref] = run_id
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        run_id = pending.pop(done[0])
        try:
            yield run_id, ray.get(done[0])
        except ray.exceptions.RayError as exc:  # a dead worker, a runtime env that could not be set up
            yield run_id, TaskFailure(_failure(exc))


def _failure(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    kind = type(exc).__name__
    if kind in ("WorkerCrashedError", "NodeDiedError", "OutOfMemoryError"):
        return f"the Ray worker running this replay died ({kind}: {first})"
    return f"the Ray task failed ({kind}: {first})"
