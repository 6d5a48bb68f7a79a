"""Replay a recorded run: load and check, predict, rebuild and rerun in a fresh process, compare, log.

``replay(run)`` is the API; ``repro-track replay`` is a thin shell over it. Plan first, execute second:
the prediction and the plan exist before anything runs, and ``dry_run`` stops there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import EntryPointRefused, NotReplayableError, ReproTrackError, UntrustedManifestError
from ..outcomes import NOT_RERUN, meets
from ..process import module_command
from . import parts
from .compare import OutputComparison, compare_one, observed_level


@dataclass(frozen=True)
class ReplayReport:
    """What the replay expected, what it observed, and why (the outcomes of ``repro_track.outcomes``)."""

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
        """Observed at least as good as expected (exact >= close >= different); unverified never is."""
        if self.observed is None:
            return self.dry_run
        return meets(self.expected, self.observed)

    @property
    def exit_code(self) -> int:
        """0 ok, 1 worse than expected or unverified, 3 cannot be reproduced here (not rerun)."""
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
           log: bool = True, force: bool = False, current_code: bool = False,
           apply_recorded_diff: bool = False, diff_trusted: bool = False, timeout: float | None = None,
           require_signed: bool | None = None, env: str = "current", allow_new_packages: bool = False,
           progress: Callable[[str], None] = _quiet) -> ReplayReport:
    """Replay a recorded run here and report expected vs observed.

    Raises RunNotFoundError, ManifestError, IntegrityError or EntryPointRefused before anything
    runs when the run is missing, corrupt or names a function that is not a recorded one. A child
    that runs longer than ``timeout`` seconds (default ``REPRO_TRACK_REPLAY_TIMEOUT``, 0 for no
    limit) is ended and the replay is ``unverified``.

    When the project's code differs from the recorded code identity, the recorded commit runs from
    a temporary git worktree unless ``current_code``. The recorded uncommitted diff is applied only
    when ``diff_trusted`` (the caller verified the run's signature) or ``apply_recorded_diff`` (the
    user's consent after a dry run showed it).

    With ``require_signed`` (default ``REPRO_TRACK_REQUIRE_SIGNED``) an unsigned run, or one whose
    signature does not verify with a trusted key, raises SignatureError before anything runs.
    """
    from .. import runs, settings, signing, store
    from ..rules import predict
    from .plan import build_plan, check_entry_point, describe_here
    from .trust import check_arguments, check_environment

    limit = _timeout(settings.REPLAY_TIMEOUT, timeout)
    project = Path(project_dir or Path.cwd())
    if env not in ("current", "recorded"):
        raise ReproTrackError(f"--env must be 'current' or 'recorded', not {env!r}")
    with tempfile.TemporaryDirectory(prefix="repro-track-replay-") as tmp, ExitStack() as cleanup:
        tmpdir = Path(tmp)
        out = tmpdir / "replay"
        out.mkdir()
        # The child starts importing torch now, while this process loads the run, checks it and plans;
        # it runs nothing of the project, and learns nothing of the run, before the plan is sent.
        early = cleanup.enter_context(_EarlyChild(out)) if not dry_run and env == "current" else None
        client = store.client_for(tracking_uri)
        progress(f"loading run {run} from {client.tracking_uri}")
        loaded = runs.load_run(client, run, tmpdir / "original")
        if settings.REQUIRE_SIGNED.get() if require_signed is None else require_signed:
            signing.require(loaded.signature, loaded.run_id)  # before anything is imported or run
        m = loaded.manifest
        check_environment(m.env_vars, loaded.run_id)  # a hand-written PYTHONPATH or LD_PRELOAD
        code_plan, entry_dir = _code(client, loaded, project, tmpdir, cleanup, current_code=current_code,
                                     consent=apply_recorded_diff, trusted=diff_trusted)
        source, root, source_sha = check_entry_point(m, entry_dir)
        # Pipeline classes, dtypes. Whether a diffusers class is a pipeline is looked up by importing
        # diffusers: a dry run does it here, a replay in the child, before it loads anything.
        check_arguments(m.arguments, loaded.run_id, root, entry_dir, look_up_classes=dry_run)
        here = dataclasses.replace(describe_here(source_sha, m.to_dict()), code=code_plan.facts())
        env_plan, interpreter = None, ""
        if env == "recorded":  # rebuilt (or planned, for a dry run) before predicting against it
            env_plan, here, interpreter = _recorded_environment(client, loaded, tmpdir, here, allow_new_packages,
                                                                build=not dry_run, progress=progress)
        prediction = predict(m.to_dict(), here)
        reasons = [r.text for r in prediction.reasons]
        missing_parts = parts.unavailable(m.to_dict(), project)  # a model folder or commit not here
        reasons += missing_parts
        expected = "none" if missing_parts else prediction.expected
        changed = _package_changes(client, loaded, tmpdir, here) if env == "current" else []
        if changed:
            reasons.append("installed packages differ from the recording (" + "; ".join(changed)
                           + "); --env recorded installs the recorded versions")
            expected = "close" if expected == "exact" else expected
        overwritten = _overwritten_files(m.outputs)
        reasons += [f"the replay would overwrite {path}, a file the recorded call returned"
                    + ("" if force else "; pass --force to let it") for path in overwritten]
        plan = build_plan(m, loaded.run_id, project, here, source, root, loaded.inputs_path, force)
        plan = dataclasses.replace(plan, notes=plan.notes + code_plan.describe()
                                   + (env_plan.describe() if env_plan else []), interpreter=interpreter)
        progress(f"expected: {expected}" + "".join(f"\n  - {r}" for r in reasons))
        base = dict(run_id=loaded.run_id, expected=expected, reasons=reasons,
                    plan=plan.describe())
        if dry_run:
            return ReplayReport(replay_run_id=None, observed=None, dry_run=True, **base)
        if (expected == "none" or overwritten) and not force:
            return ReplayReport(replay_run_id=None, observed=None, **base)
        progress("running the function in a fresh process with the recorded environment")
        try:
            call_error = _run_child(plan, out, limit, early)
        except _TimedOut:
            reasons.append(f"the replay ran past its timeout of {limit:g} s and was ended, so nothing was "
                           "compared (raise it with --timeout or REPRO_TRACK_REPLAY_TIMEOUT)")
            return ReplayReport(replay_run_id=None, observed="unverified", **base)
        if call_error and not m.call["error"]:
            reasons.append(f"the replayed call raised {call_error}")
        replayed = json.loads((out / "artifacts" / "repro" / "manifest.json").read_text("utf-8"))
        results = _compare(loaded, replayed, out, atol, rtol)
        observed, why = observed_level(results, m.call, replayed["call"])
        reasons += [why] if why else []
        reasons += parts.child_notes(out) + parts.pipeline_differences(m.to_dict(), replayed)
        reasons += _trajectory_reason(m.trajectory, replayed.get("trajectory"))
        report = ReplayReport(replay_run_id=None, observed=observed, outputs=results, **base)
        if log:
            progress("logging the replay as a new MLflow run")
            report = _log(client, loaded, report, out, replayed)
        return report


def _recorded_environment(client: Any, loaded: Any, tmpdir: Path, here: Any, allow_new: bool, *,
                          build: bool, progress: Callable[[str], None]) -> tuple[Any, Any, str]:
    """Plan (and unless a dry run, build) the recorded package set; the facts the rules then see."""
    from .. import envbuild, runs, tags

    path = tmpdir / "original" / tags.ARTIFACT_DIR / tags.REQUIREMENTS_FILE
    if not path.is_file():
        path = runs.fetch_artifact(client, loaded.run_id, f"{tags.ARTIFACT_DIR}/{tags.REQUIREMENTS_FILE}",
                                   tmpdir / "original")
    software = loaded.manifest.software
    env_plan = envbuild.plan(path.read_text("utf-8") if path else "", software,
                             trusted=loaded.signature.verified, allow_new=allow_new)
    if not build:
        versions = {**envbuild.parse_requirements(_here_requirements()),
                    **{s.split("==")[0]: s.split("==")[1] for s in env_plan.install if "==" in s}}
        return env_plan, _with_versions(here, versions), ""
    python = envbuild.build(env_plan, software, progress)
    return env_plan, _with_versions(here, envbuild.versions_in(python)), str(python)


def _package_changes(client: Any, loaded: Any, tmpdir: Path, here: Any) -> list[str]:
    """Distributions whose version differs from the recording (only looked up when the sets differ)."""
    from .. import envbuild, runs, tags

    from ..capture import provenance

    software = loaded.manifest.software
    recorded_origins = (software.get("provenance") or {}).get("origins") or {}
    if (software.get("distributions_sha256") == here.software.get("distributions_sha256")
            and all(envbuild.same_origin(o, provenance.origins().get(n)) for n, o in recorded_origins.items())):
        return []
    path = runs.fetch_artifact(client, loaded.run_id, f"{tags.ARTIFACT_DIR}/{tags.REQUIREMENTS_FILE}",
                               tmpdir / "requirements")
    if path is None:
        return []
    # This process's view can be wider than the child's (a library imported here may have put its own
    # folder on sys.path), so the packages are listed as a fresh interpreter sees them.
    return envbuild.package_differences(path.read_text("utf-8"), envbuild.requirements_in(sys.executable), software)


def _here_requirements() -> str:
    from ..capture import packages

    return packages.requirements_text()


def _with_versions(here: Any, versions: dict[str, str]) -> Any:
    """The rules' facts with the package versions of the environment the child really gets."""
    software = dict(here.software)
    software["packages"] = {name: versions.get(name.lower(), None) for name in software.get("packages", {})}
    return dataclasses.replace(here, software=software)


def _code(client: Any, loaded: Any, project: Path, tmpdir: Path, cleanup: ExitStack, *,
          current_code: bool, consent: bool, trusted: bool) -> tuple[Any, Path]:
    """Which code the replay runs, and the project dir to import it from (a worktree when recorded)."""
    from .. import runs, tags
    from . import code

    m = loaded.manifest.to_dict()
    diff_file = None
    if m["code"].get("diff_sha256") and not current_code:
        # A signed run's artifacts were all downloaded and checked by load_run: use that very file.
        diff_file = tmpdir / "original" / tags.ARTIFACT_DIR / tags.GIT_DIFF_FILE
        if not diff_file.is_file():
            diff_file = runs.fetch_artifact(client, loaded.run_id,
                                            f"{tags.ARTIFACT_DIR}/{tags.GIT_DIFF_FILE}", tmpdir / "original")
    signed = getattr(loaded, "signature", None)
    plan = code.plan_code(m, project, diff_file, current_code=current_code, apply_recorded_diff=consent,
                          diff_trusted=trusted or bool(signed and signed.verified))
    if plan.mode != code.RECORDED:
        return plan, project
    worktree = tmpdir / "recorded-code"
    cleanup.callback(code.remove_worktree, project, worktree)
    return code.build_worktree(plan, project, worktree)


def _timeout(setting: Any, given: float | None) -> float | None:
    """Seconds the child may run (None: no limit), from the argument, else the setting."""
    if given is not None:
        if not given >= 0:
            raise ReproTrackError(f"the replay timeout must be 0 (no limit) or more seconds, not {given}")
        return given or None
    try:
        return setting.get()
    except ValueError as exc:
        raise ReproTrackError(f"{exc}; set it to a number of seconds, 0 for no limit") from None


class _TimedOut(Exception):
    """The replay child ran past its timeout and was ended."""


def _overwritten_files(recorded_outputs: list[dict[str, Any]]) -> list[str]:
    """Files the recorded call returned that a replay would write outside its scratch folder: absolute
    paths that exist here, and relative ones that climb out with ``..``."""
    paths = [o["file"]["path"] for o in recorded_outputs if o.get("file")]
    return sorted({p for p in paths if (os.path.isabs(p) and os.path.lexists(p))
                   or (not os.path.isabs(p) and ".." in Path(p).parts)})


def _child_env(env_set: dict[str, str], env_unset: list[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in env_unset}
    env.update(env_set)
    env["TQDM_DISABLE"] = "1"  # no library progress bars in the replay's output (they decide no bits)
    return env


def _spawn_child(interpreter: str, out: Path, env: dict[str, str], *, wait_for_go: bool) -> subprocess.Popen:
    # A scratch working dir: files the call writes by relative path land there, not in the project
    # (where they would overwrite the recording's own), and its recording reads them from there.
    scratch = out / "work"
    scratch.mkdir(exist_ok=True)
    # Run without the working dir on sys.path (process.module_command); the child adds the checked
    # import root itself. The child's stdout is the user's function's stdout: send it to our stderr so
    # --json stays clean.
    # Its own session, so that a timeout ends whatever it started too. A child started early reads
    # "go" on stdin once the plan is written (then its stdin is /dev/null, as otherwise).
    args = [str(out / "plan.json"), str(out)] + (["--wait"] if wait_for_go else [])
    return subprocess.Popen([interpreter or sys.executable, *module_command("repro_track.replay.child"), *args],
                            cwd=scratch, env=env,
                            stdout=sys.stderr, stdin=subprocess.PIPE if wait_for_go else subprocess.DEVNULL,
                            start_new_session=True)


class _EarlyChild:
    """The replay child, started before the run is even loaded: it imports torch, diffusers and the rest
    of what a replay needs (``child.PREWARM``) while the parent loads, verifies and plans, until "go".

    Its environment is a guess: this process's own, with ATen pinned to the level this CPU most likely
    runs, which is what the plan asks for when the recording was made on a machine like this one with
    the same bit-deciding variables. The plan's environment is computed from the manifest later; if it
    differs in anything, or the replay stops before running, this child is ended unused and the
    replay starts a fresh one. Nothing of the run reaches it before the plan does.
    """

    def __init__(self, out: Path):
        from ..capture import cpu

        env_set = {}
        if "ATEN_CPU_CAPABILITY" not in os.environ:
            facts = cpu.capture_cpu()
            level = cpu.likely_capability(facts["isa_flags"], facts["architecture"])
            value = cpu.aten_capability_env_value(level) if level else None
            if value:
                env_set["ATEN_CPU_CAPABILITY"] = value
        self.env = _child_env(env_set, [])
        self.proc: subprocess.Popen | None = _spawn_child("", out, self.env, wait_for_go=True)

    def __enter__(self) -> "_EarlyChild":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def take(self, env: dict[str, str], interpreter: str) -> subprocess.Popen | None:
        """The waiting child, told to go, if it was started with this very environment; else None."""
        proc, self.proc = self.proc, None
        if proc is None or interpreter or not _same_child_env(env, self.env) or proc.poll() is not None:
            if proc is not None:
                _stop(proc)
            return None
        try:
            proc.stdin.write(b"go\n")
            proc.stdin.close()
        except OSError:  # it died while waiting
            _stop(proc)
            return None
        return proc

    def stop(self) -> None:
        """End the child if it is still waiting (the replay stopped before running it)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _stop(proc)


def _same_child_env(planned: dict[str, str], started: dict[str, str]) -> bool:
    """Whether a child started with ``started`` runs as one started with ``planned`` would: they agree
    on every variable that decides bits or that repro-track records, and on what the interpreter and
    loader read. Others may differ: libraries this process imported since may have set their own
    (MLflow sets a telemetry session id), which the child neither needs nor is changed by."""
    from ..capture import envvars

    def matters(name: str) -> bool:
        return envvars.is_recordable(name) or envvars.is_bit_deciding(name) or name == "PATH" \
            or name.startswith(("PYTHON", "LD_", "DYLD_"))

    return all(planned.get(n) == started.get(n) for n in set(planned) | set(started) if matters(n))


def _stop(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()  # it exits on its own at end of input...
    except (OSError, AttributeError):
        pass
    _end_group(proc)  # ...or is ended


def _run_child(plan: Any, out: Path, timeout: float | None, early: _EarlyChild | None = None) -> str | None:
    (out / "plan.json").write_text(json.dumps(plan.to_dict()), "utf-8")
    env = _child_env(plan.env_set, plan.env_unset)
    proc = early.take(env, plan.interpreter) if early is not None else None
    if proc is None:
        proc = _spawn_child(plan.interpreter, out, env, wait_for_go=False)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise _TimedOut() from None
    finally:
        _end_group(proc)
    result_file = out / "result.json"
    result = json.loads(result_file.read_text("utf-8")) if result_file.is_file() else {}
    if proc.returncode == 2 and result.get("type") == "EntryPointRefused":
        raise EntryPointRefused(result["error"])
    if proc.returncode == 2 and result.get("type") == "UntrustedManifestError":
        raise UntrustedManifestError(result["error"])
    if proc.returncode == 2:
        raise NotReplayableError(result.get("error", "the replay could not rebuild the call"))
    if proc.returncode != 0:
        raise ReproTrackError(f"the replay process failed (exit {proc.returncode}): "
                              f"{result.get('error', 'see the output above')}")
    return result.get("call_error")


def _end_group(proc: subprocess.Popen) -> None:
    """End what is left of the child's process group: politely, then for good."""
    import signal

    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):  # the whole group has exited
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            break


def _trajectory_reason(recorded: list[dict[str, Any]], replayed: list[dict[str, Any]] | None) -> list[str]:
    """Where the replay left the recorded denoising trajectory (``noise differs``, ``diverged at step
    7 of 50``), as a reason; nothing when they agree or either run recorded none."""
    from ..trajectory import divergence_words

    words = divergence_words(recorded, replayed)
    return [f"the replay {words}" if words.startswith("diverged") else words] if words else []


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
                 tags.OBSERVED: report.observed or NOT_RERUN, "repro.ok": str(report.ok).lower()},
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
