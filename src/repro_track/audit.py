"""``audit``: replay a sample of an experiment's recorded runs and report the reproduction rate.

This is how a team checks that last month's images still come back after a driver or library
upgrade. Each replay runs in its own fresh process (``workers`` at a time); the summary is logged as
one MLflow run in the same experiment. ``executor="ray"`` sends each replay to a Ray cluster instead,
placed on a node that can reproduce it (``repro_track.audit_ray``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import ReproTrackError, RunNotFoundError
from .outcomes import NOT_RERUN, OBSERVED

# The replay's observed outcomes, then a replay stopped at its prediction, then one that failed.
OUTCOMES = (*OBSERVED, NOT_RERUN, "error")
TABLE_PATH = "repro/audit_table.json"  # the audit run's per-run table artifact


@dataclass(frozen=True)
class AuditItem:
    """One replayed run: what was expected and what happened."""

    run_id: str
    expected: str | None
    observed: str
    ok: bool
    replay_run_id: str | None = None
    error: str | None = None
    gpu: str | None = None  # the recorded GPU model ("none" for CPU recordings)
    torch: str | None = None  # the recorded torch version


@dataclass(frozen=True)
class AuditReport:
    """The reproduction rate of a sample, by expected and observed class."""

    experiment: str
    items: list[AuditItem] = field(default_factory=list)
    audit_run_id: str | None = None
    log_error: str | None = None  # why the audit run could not be logged, if it could not
    executor: str = "local"  # where the replays ran: "local" (process pool) or "ray"

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """expected -> observed -> number of runs."""
        table: dict[str, dict[str, int]] = {}
        for item in self.items:
            row = table.setdefault(item.expected or "error", {})
            row[item.observed] = row.get(item.observed, 0) + 1
        return table

    @property
    def rate(self) -> dict[str, float]:
        """Share of the sample observed exact, and share observed at least as good as expected."""
        n = len(self.items) or 1
        return {"exact": sum(i.observed == "exact" for i in self.items) / n,
                "ok": sum(i.ok for i in self.items) / n}

    @property
    def breakdown(self) -> list[dict[str, Any]]:
        """Per recorded (GPU model, torch version): runs, exact, as good as expected, errors."""
        groups: dict[tuple[str, str], list[AuditItem]] = {}
        for item in self.items:
            groups.setdefault((item.gpu or "unknown", item.torch or "unknown"), []).append(item)
        return [{"gpu": gpu, "torch": torch, "runs": len(group),
                 "exact": sum(i.observed == "exact" for i in group), "ok": sum(i.ok for i in group),
                 "error": sum(i.observed == "error" for i in group)}
                for (gpu, torch), group in sorted(groups.items())]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``--json`` prints."""
        return {"experiment": self.experiment, "sampled": len(self.items), "rate": self.rate,
                "counts": self.counts, "breakdown": self.breakdown, "audit_run_id": self.audit_run_id,
                "log_error": self.log_error, "executor": self.executor,
                "runs": [item.__dict__ for item in self.items]}


def _recorded_runs(client: Any, experiment: str) -> tuple[str, list[str], dict[str, dict[str, str]]]:
    from . import tags

    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            found = client.get_experiment(experiment)
        except Exception:
            found = None
    if found is None:
        raise RunNotFoundError(f"no experiment named {experiment!r} in {client.tracking_uri}",
                               run_ref=experiment)
    runs, facts, token = [], {}, None
    while True:
        page = client.search_runs([found.experiment_id],
                                  filter_string=f"tags.`{tags.KIND}` = 'record' and "
                                                "attributes.status = 'FINISHED'",
                                  max_results=1000, page_token=token, order_by=["attributes.start_time ASC"])
        runs += [r.info.run_id for r in page]
        facts.update({r.info.run_id: {"gpu": r.data.tags.get(tags.GPU), "torch": r.data.tags.get(tags.TORCH)}
                      for r in page})
        token = page.token
        if not token:
            return found.experiment_id, runs, facts


def _replay_one(run_id: str, options: dict[str, Any]) -> AuditItem:
    from .replay import replay

    try:
        report = replay(run_id, **options)
    except ReproTrackError as exc:
        return AuditItem(run_id, None, "error", False, error=str(exc))
    except Exception as exc:  # an unexpected failure is this run's error; the audit goes on
        return AuditItem(run_id, None, "error", False, error=f"{type(exc).__name__}: {exc}")
    observed = report.observed or NOT_RERUN
    return AuditItem(run_id, report.expected, observed, report.ok, report.replay_run_id)


def audit(experiment: str, *, tracking_uri: str | None = None, sample: int | None = None,
          workers: int = 2, project_dir: str | None = None, seed: int = 0, log: bool = True,
          log_replays: bool = True, env: str = "current", executor: str = "local",
          address: str | None = None, same_gpu: bool = True,
          progress: Callable[[str], None] = lambda _: None) -> AuditReport:
    """Replay ``sample`` recorded runs (all when None) of an experiment, ``workers`` at a time
    (``env="recorded"``: each in its rebuilt package environment, as ``replay --env recorded``).

    ``executor="ray"``: each replay is a task on the Ray cluster at ``address`` (default: a local
    instance of ``workers`` CPUs), asking for the GPUs its recording used and, with ``same_gpu``, the
    recorded GPU model; a task whose worker dies is that run's error and the audit goes on.
    """
    from . import store

    if executor not in ("local", "ray"):
        raise ReproTrackError(f"--executor must be 'local' or 'ray', not {executor!r}")
    client = store.client_for(tracking_uri)
    experiment_id, runs, facts = _recorded_runs(client, experiment)
    if sample is not None and sample < len(runs):
        runs = sorted(random.Random(seed).sample(runs, sample), key=runs.index)
    options = {"tracking_uri": client.tracking_uri, "project_dir": project_dir, "log": log_replays, "env": env}
    if executor == "ray":
        progress(f"replaying {len(runs)} run(s) of {experiment!r} on Ray ({address or 'a local instance'})")
        results = _on_ray(client, runs, options, address, workers, same_gpu)
    else:
        progress(f"replaying {len(runs)} run(s) of {experiment!r} with {workers} worker(s)")
        results = _on_pool(runs, options, workers)
    done: dict[str, AuditItem] = {}
    for item in results:
        done[item.run_id] = item = dataclasses.replace(item, **facts.get(item.run_id, {}))
        progress(f"[{len(done)}/{len(runs)}] {item.run_id}: expected {item.expected}, "
                 f"observed {item.observed}" + (f" ({item.error})" if item.error else ""))
    items = [done[run_id] for run_id in runs]  # in recording order, however they finished
    report = AuditReport(experiment, items, executor=executor)
    if log:
        try:
            report = dataclasses.replace(report, audit_run_id=_log(client, experiment_id, report))
        except Exception as exc:  # the replays' results are returned even if the summary run is not
            report = dataclasses.replace(report, log_error=f"{type(exc).__name__}: {exc}")
    return report


def _on_pool(runs: list[str], options: dict[str, Any], workers: int) -> Iterator[AuditItem]:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        yield from pool.map(lambda r: _replay_one(r, options), runs)


def _on_ray(client: Any, runs: list[str], options: dict[str, Any], address: str | None, workers: int,
            same_gpu: bool) -> Iterator[AuditItem]:
    from . import audit_ray

    jobs = []
    for run_id in runs:
        try:
            jobs.append((run_id, audit_ray.placement(_manifest(client, run_id), same_gpu=same_gpu)))
        except ReproTrackError as exc:  # a run that cannot be read is its error, before any task
            yield AuditItem(run_id, None, "error", False, error=str(exc))
    project = options["project_dir"] or Path.cwd()
    for run_id, result in audit_ray.replay_on_ray(jobs, _replay_one, options, project_dir=project,
                                                  address=address, local_cpus=workers):
        if isinstance(result, AuditItem):
            yield result
        else:
            yield AuditItem(run_id, None, "error", False, error=result.message)


def _manifest(client: Any, run_id: str) -> dict[str, Any]:
    """A run's verified manifest (only the JSON: the placement needs no arrays)."""
    from . import runs, tags
    from .manifest import Manifest

    with tempfile.TemporaryDirectory(prefix="repro-track-audit-") as tmp:
        path = runs.fetch_artifact(client, run_id, tags.MANIFEST_PATH, Path(tmp))
        if path is None:
            raise RunNotFoundError(f"run {run_id} has no {tags.MANIFEST_PATH}: it was not recorded by "
                                   "repro-track", run_ref=run_id)
        return Manifest.from_json(path.read_bytes(), run_id).to_dict()


def _log(client: Any, experiment_id: str, report: AuditReport) -> str:
    from mlflow.entities import Metric, Param, RunTag

    from . import tags

    now = int(time.time() * 1000)
    run = client.create_run(experiment_id, run_name=f"audit-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={tags.KIND: "audit"})
    metrics = [Metric("rate_exact", report.rate["exact"], now, 0),
               Metric("rate_ok", report.rate["ok"], now, 0),
               Metric("sampled", float(len(report.items)), now, 0)]
    for expected, row in report.counts.items():
        metrics += [Metric(f"count.{expected}.{observed}", float(n), now, 0) for observed, n in row.items()]
    lines = ["### repro-track audit", "", f"{len(report.items)} run(s) replayed; "
             f"{report.rate['exact']:.0%} exact, {report.rate['ok']:.0%} as good as expected.", "",
             "| expected | " + " | ".join(OUTCOMES) + " |", "|---" * (len(OUTCOMES) + 1) + "|"]
    for expected, row in sorted(report.counts.items()):
        lines.append(f"| {expected} | " + " | ".join(str(row.get(o, 0)) for o in OUTCOMES) + " |")
    lines += ["", "| recorded GPU | torch | runs | exact | as expected | error |", "|---" * 6 + "|"]
    lines += [f"| {g['gpu']} | {g['torch']} | {g['runs']} | {g['exact']} | {g['ok']} | {g['error']} |"
              for g in report.breakdown]
    params = [Param("sampled", str(len(report.items))), Param("executor", report.executor)]
    client.log_batch(run.info.run_id, metrics=metrics, params=params,
                     tags=[RunTag(tags.MLFLOW_NOTE, "\n".join(lines))])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.json"
        path.write_text(json.dumps(report.to_dict(), indent=1, sort_keys=True), "utf-8")
        client.log_artifact(run.info.run_id, str(path), tags.ARTIFACT_DIR)
    # One row per replayed run, shown as a table in the run's artifact view.
    columns = ("run_id", "expected", "observed", "ok", "gpu", "torch", "replay_run_id", "error")
    client.log_table(run.info.run_id, {c: [getattr(i, c) for i in report.items] for c in columns},
                     TABLE_PATH)
    from . import store

    store.set_terminated(client, run.info.run_id, "FINISHED", int(time.time() * 1000))
    return run.info.run_id
