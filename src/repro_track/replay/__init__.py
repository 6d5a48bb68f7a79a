"""Replay a recorded run: load and check, predict, rebuild and rerun in a fresh process, compare, log.

``replay(run)`` is the API; ``repro-track replay`` is a thin shell over it. Plan first, execute second:
the prediction and the plan exist before anything runs, and ``dry_run`` stops there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import EntryPointRefused, NotReplayableError, ReproTrackError
from .compare import OutputComparison, compare_one, observed_level

_RANK = {"exact": 0, "close": 1, "different": 2, "none": 3}


@dataclass(frozen=True)
class ReplayReport:
    """What the replay expected, what it observed, and why."""

    run_id: str
    replay_run_id: str | None
    expected: str
    observed: str | None
    reasons: list[str]
    outputs: dict[str, OutputComparison] = field(default_factory=dict)
    plan: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        """Observed at least as good as expected (exact >= close >= different)."""
        if self.observed is None:
            return self.dry_run
        return _RANK[self.observed] <= _RANK[self.expected]

    @property
    def exit_code(self) -> int:
        """0 ok, 1 reproduced worse than expected, 3 cannot be reproduced here (not rerun)."""
        if self.observed is None and not self.dry_run:
            return 3
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        """The one JSON object ``--json`` prints."""
        data = {
            "run_id": self.run_id, "replay_run_id": self.replay_run_id, "expected": self.expected,
            "observed": self.observed, "ok": self.ok, "reasons": list(self.reasons),
            "outputs": {name: c.to_dict() for name, c in self.outputs.items()},
        }
        if self.dry_run:
            data["plan"] = list(self.plan)
        return data


def _quiet(_: str) -> None:
    return None


def replay(run: str, *, tracking_uri: str | None = None, project_dir: str | os.PathLike | None = None,
           dry_run: bool = False, atol: float | None = None, rtol: float | None = None,
           log: bool = True, force: bool = False,
           progress: Callable[[str], None] = _quiet) -> ReplayReport:
    """Replay a recorded run here and report expected vs observed.

    Raises RunNotFoundError, ManifestError, IntegrityError or EntryPointRefused before anything
    runs when the run is missing, corrupt or names a function that is not a recorded one.
    """
    from .. import runs, store
    from ..rules import predict
    from .plan import build_plan, check_entry_point, describe_here

    project = Path(project_dir or Path.cwd())
    client = store.client_for(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="repro-track-replay-") as tmp:
        tmpdir = Path(tmp)
        progress(f"loading run {run} from {client.tracking_uri}")
        loaded = runs.load_run(client, run, tmpdir / "original")
        m = loaded.manifest
        source, root, source_sha = check_entry_point(m, project)
        here = describe_here(source_sha, m.to_dict())
        prediction = predict(m.to_dict(), here)
        reasons = [r.text for r in prediction.reasons]
        plan = build_plan(m, loaded.run_id, project, here, source, root, loaded.inputs_path, force)
        progress(f"expected: {prediction.expected}" + "".join(f"\n  - {r}" for r in reasons))
        base = dict(run_id=loaded.run_id, expected=prediction.expected, reasons=reasons,
                    plan=plan.describe())
        if dry_run:
            return ReplayReport(replay_run_id=None, observed=None, dry_run=True, **base)
        if prediction.expected == "none" and not force:
            return ReplayReport(replay_run_id=None, observed=None, **base)
        progress("running the function in a fresh process with the recorded environment")
        out = tmpdir / "replay"
        out.mkdir()
        call_error = _run_child(plan, out)
        if call_error and not m.call["error"]:
            reasons.append(f"the replayed call raised {call_error}")
        replayed = json.loads((out / "artifacts" / "repro" / "manifest.json").read_text("utf-8"))
        results = _compare(loaded, replayed, out, atol, rtol)
        observed = observed_level(results, m.call["status"], replayed["call"]["status"])
        report = ReplayReport(replay_run_id=None, observed=observed, outputs=results, **base)
        if log:
            progress("logging the replay as a new MLflow run")
            report = _log(client, loaded, report, out, replayed)
        return report


# The child runs in the project dir, but `python -m` would put that dir first on sys.path, so a project
# file named like a module the child imports (json.py, typing.py) would run before any entry-point
# check. The launcher drops it; the child adds the checked import root itself. (-P needs Python 3.11.)
_CHILD_LAUNCHER = ("import sys; sys.path[:] = [p for p in sys.path if p != '']; import runpy; "
                   "runpy.run_module('repro_track.replay.child', run_name='__main__', alter_sys=True)")


def _run_child(plan: Any, out: Path) -> str | None:
    plan_file = out / "plan.json"
    plan_file.write_text(json.dumps(plan.to_dict()), "utf-8")
    env = {k: v for k, v in os.environ.items() if k not in plan.env_unset}
    env.update(plan.env_set)
    # The child's stdout is the user's function's stdout: send it to our stderr so --json stays clean.
    proc = subprocess.run([sys.executable, "-c", _CHILD_LAUNCHER, str(plan_file), str(out)],
                          cwd=plan.project_dir, env=env, stdout=sys.stderr, stdin=subprocess.DEVNULL)
    result_file = out / "result.json"
    result = json.loads(result_file.read_text("utf-8")) if result_file.is_file() else {}
    if proc.returncode == 2 and result.get("type") == "EntryPointRefused":
        raise EntryPointRefused(result["error"])
    if proc.returncode == 2:
        raise NotReplayableError(result.get("error", "the replay could not rebuild the call"))
    if proc.returncode != 0:
        raise ReproTrackError(f"the replay process failed (exit {proc.returncode}): "
                              f"{result.get('error', 'see the output above')}")
    return result.get("call_error")


def _compare(loaded: Any, replayed: dict[str, Any], out: Path, atol: float | None,
             rtol: float | None) -> dict[str, OutputComparison]:
    from ..outputs import load_arrays

    old = load_arrays(loaded.outputs_path) if loaded.outputs_path else {}
    new_file = out / "artifacts" / "repro" / "outputs.safetensors"
    new = load_arrays(new_file) if new_file.is_file() else {}
    by_name = {o["name"]: o for o in replayed["outputs"]}
    return {
        rec["name"]: compare_one(rec, by_name.get(rec["name"]), old.get(rec["name"]),
                                 new.get(rec["name"]), atol, rtol)
        for rec in loaded.manifest.outputs
    }


def _log(client: Any, loaded: Any, report: ReplayReport, out: Path, replayed: dict) -> ReplayReport:
    import dataclasses
    import uuid

    from .. import store, tags
    from ..card import replay_card
    from ..spool import SpoolEntry

    experiment = client.get_experiment(loaded.experiment_id).name
    data = {**report.to_dict(), "experiment_id": loaded.experiment_id}
    metrics = {}
    for name, c in report.outputs.items():
        metrics[f"max_abs_diff.{name}"] = c.max_abs_diff
        metrics[f"mean_abs_diff.{name}"] = c.mean_abs_diff
    meta = {
        "recording_id": uuid.uuid4().hex, "experiment": experiment,
        "run_name": f"replay-of-{loaded.run_tags.get(tags.MLFLOW_RUN_NAME, loaded.run_id)}",
        "tags": {tags.REPLAY_OF: loaded.run_id, tags.EXPECTED: report.expected,
                 tags.OBSERVED: report.observed or "not-run", "repro.ok": str(report.ok).lower()},
        "metrics": {k: v for k, v in metrics.items() if v is not None},
        "card": replay_card(replayed, "{run_id}", loaded.run_id, data,
                            images=sorted(p.relative_to(out / "artifacts").as_posix()
                                          for p in (out / "artifacts" / tags.IMAGES_DIR).glob("*.png"))),
        "parent_run_id": None,
    }
    run_id = store.upload(client, SpoolEntry(out, meta))
    summary = (f"[{run_id}](#/experiments/{loaded.experiment_id}/runs/{run_id}): expected "
               f"{report.expected}, observed {report.observed}")
    store.add_replay_link(client, loaded, run_id, summary)
    return dataclasses.replace(report, replay_run_id=run_id)
