"""The ``@record`` decorator: capture a call, build its manifest, hand it to the store.

Recording never breaks or changes the generation: capture only reads state (no RNG is advanced, no flag
set, CUDA never started), the user's exception reaches them unchanged, and any failure of capture or
logging becomes one warning while the result is returned.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import inspect
import logging
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, ParamSpec, TypeVar, overload

from . import outputs, settings
from .process import ThreadPool
from .manifest import Manifest
from .records import Recording, RecordingWarning, RecordOptions, RecordOutcome

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")
MARKER = "__repro_track__"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _version() -> str:
    from . import __version__

    return __version__


@functools.lru_cache(maxsize=256)
def _function_source(path: str, mtime_ns: int, size: int, qualname: str) -> tuple[Any, Path]:
    # Keyed on the file's mtime and size: re-read (and the project root re-found) only on change.
    from .entrypoint import function_source, project_root_for

    text = Path(path).read_text("utf-8", errors="replace")
    return function_source(text, qualname), project_root_for(Path(path))


def _call_site(fn: Callable[..., Any]) -> dict[str, Any]:
    """module, qualname, project-relative source file and source digest, and whether it replays."""
    info: dict[str, Any] = {"module": fn.__module__ or "?", "qualname": fn.__qualname__,
                            "is_script": fn.__module__ == "__main__", "source_file": None,
                            "source_sha256": None, "replayable": False, "reason": None}
    try:
        path = Path(inspect.getsourcefile(fn) or "")
    except TypeError:
        path = Path("")
    if not path.is_file():
        info["reason"] = "the function's source file is unknown (defined interactively?)"
        return info
    stat = path.stat()
    source, root = _function_source(str(path), stat.st_mtime_ns, stat.st_size, fn.__qualname__)
    if source is None:
        info["reason"] = (f"{fn.__qualname__} is not defined at module or class level, so it cannot "
                          "be imported again")
        return info
    try:
        info["source_file"] = path.resolve().relative_to(root).as_posix()
    except ValueError:
        info["source_file"] = None
    info["source_sha256"] = source.sha256
    info["replayable"] = source.decorated and info["source_file"] is not None
    if not source.decorated:
        info["reason"] = "the function's source does not show the repro_track.record decorator"
    return info


# git starts beside a call once the call has run this long, or once it has returned if sooner. A call
# quicker than that does not share its few milliseconds with git's start (a thread that starts a
# subprocess takes the caller's interpreter lock, and a core of a small machine, while it does); a
# longer one has git's answer by its end, as before.
GIT_START_AFTER_S = 0.005


def _capture_git_when(go: threading.Event, caller: int, deadline: float, where: Path) -> Any:
    """``capture_git(where)`` once ``go`` is set or at ``deadline`` (monotonic); at once when run in
    the calling thread itself (a pool that takes no more work runs it there)."""
    from .capture.git import capture_git

    if threading.get_ident() != caller:
        go.wait(max(0.0, deadline - time.monotonic()))
    return capture_git(where)


class Recorder:
    """Holds a decorated function and its options; captures calls and logs them."""

    def __init__(self, fn: Callable[..., Any], options: RecordOptions):
        self.fn = fn
        self.options = options
        self.signature = inspect.signature(fn)
        self._local = threading.local()
        self._git_pool = ThreadPool(4, "repro-track-git")
        self.keep_steps = False  # keep each denoising step's latents as outputs too

    @property
    def last(self) -> RecordOutcome | None:
        """The outcome of this thread's latest call of the function."""
        return getattr(self._local, "outcome", None)

    # ------------------------------------------------------------ the call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._local.outcome = None  # an unrecorded call must not leave the previous call's run behind
        if _disabled():
            return self.fn(*args, **kwargs)
        from .delivery import staging, waits_for_upload

        returned = threading.Event()  # git may start (see GIT_START_AFTER_S)
        with staging():  # the delivery worker gives way to the call (see delivery.give_way)
            try:
                # A call that waits for its upload waits for git too: it takes git's answer at once.
                result, error, recording = self.capture(args, kwargs, late_git=not waits_for_upload(),
                                                        git_go=returned)
                if recording is not None:
                    self._local.outcome = self._log(recording)
            finally:
                returned.set()
        if error is not None:
            raise error.with_traceback(error.__traceback__)
        return result

    def capture(self, args: tuple, kwargs: dict, *, kind: str = "record", replay_of: str | None = None,
                late_git: bool = False, git_go: threading.Event | None = None
                ) -> tuple[Any, Exception | None, Recording | None]:
        """Run the function and capture it; never raises what the function did not raise.

        ``late_git``: when git has not answered by the end of the call, return a recording without
        its git state and a future of it with (``Recording.complete``) rather than wait; git then
        starts once ``git_go`` is set (the caller has the recording) or ``GIT_START_AFTER_S`` into the
        call. Without ``late_git`` the answer is waited for, and git starts at once.
        """
        go = git_go or threading.Event()
        if not late_git:
            go.set()
        if self.options.deterministic:
            from .determinism import deterministic

            with deterministic():
                return self._capture(args, kwargs, kind, replay_of, late_git, go)
        return self._capture(args, kwargs, kind, replay_of, late_git, go)

    def _capture(self, args: tuple, kwargs: dict, kind: str, replay_of: str | None,
                 late_git: bool, git_go: threading.Event) -> tuple[Any, Exception | None, Recording | None]:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:  # the call itself is wrong: let the function raise its own TypeError
            return self._call(args, kwargs) + (None,)
        try:
            entry = self._enter(bound, git_go)
        except Exception as exc:  # capture is best effort; the generation must run regardless
            _warn(f"repro-track could not capture the call of {self.fn.__qualname__} ({exc!r}); "
                  "it runs unrecorded")
            log.debug("capture failed", exc_info=True)
            return self._call(args, kwargs) + (None,)
        from . import trajectory
        from .capture import pipelines

        # Pipeline calls inside are not recorded again by autolog; their denoising steps are noted.
        with pipelines.collecting() as loaded, trajectory.collecting(self.keep_steps) as steps:
            result, error = self._call(args, kwargs)
        entry["loaded_pipelines"] = loaded
        entry["trajectory"], entry["step_latents"] = steps.steps, steps.kept
        entry["ended"] = time.perf_counter()
        entry["ended_at"] = _now()
        try:
            recording = self._finish(entry, result, error, kind, replay_of, late_git)
        except Exception as exc:
            _warn(f"repro-track could not build the manifest for {self.fn.__qualname__} ({exc!r})")
            log.debug("manifest failed", exc_info=True)
            recording = None
        return result, error, recording

    def _call(self, args: tuple, kwargs: dict) -> tuple[Any, Exception | None]:
        try:
            return self.fn(*args, **kwargs), None
        except Exception as exc:  # BaseException (Ctrl-C, exit) propagates unrecorded at once
            return None, exc

    # ------------------------------------------------------------ capture at entry and exit

    def _enter(self, bound: inspect.BoundArguments, git_go: threading.Event) -> dict[str, Any]:
        from .capture import arguments, dispatch, envvars, pipelines, torch_state

        bound.apply_defaults()
        captured = arguments.capture_arguments(bound, settings.MAX_INPUT_BYTES.get())
        return {
            "global_pipelines": {name: arguments.pipeline_identity(pipe)
                                 for name, pipe in pipelines.used_globals(self.fn).items()},
            "autocast": dispatch.autocast_state(),
            "git": self._git_in_background(git_go),
            "git_go": git_go,
            "args": captured,
            "global": torch_state.global_rng_states(),
            "knobs": torch_state.determinism_knobs(),
            "env": envvars.capture_env_vars(),
            "started_at": _now(),
            "started": time.perf_counter(),
        }

    def _git_in_background(self, go: threading.Event) -> Any:
        """Git capture in a thread: its subprocess runs while the user's function does, from
        ``GIT_START_AFTER_S`` into the call (or once ``go`` is set, if sooner)."""
        where = self._source_location()
        return self._git_pool.submit(_capture_git_when, go, threading.get_ident(),
                                     time.monotonic() + GIT_START_AFTER_S, where if where.exists() else Path.cwd())

    def _source_location(self) -> Path:
        """Where the recorded code lives (its git state is recorded): the function's file."""
        try:
            return Path(inspect.getsourcefile(self.fn) or Path.cwd())
        except TypeError:
            return Path.cwd()

    def _call_site(self) -> dict[str, Any]:
        """The manifest's call section, as far as it names the entry point."""
        return _call_site(self.fn)

    def _code_identity(self, site: dict[str, Any], git: dict[str, Any], *, tracked_list: bool) -> dict[str, Any]:
        """The manifest's code section (``tracked_list``: mark the files git tracks)."""
        return _code_identity(self.fn, site, git, tracked_list)

    def _code_after_git(self, code: dict[str, Any], git: dict[str, Any]) -> dict[str, Any]:
        """The code section once git answers after the call: its commit and diff are git's."""
        return {**code, "commit": git.get("commit"), "diff_sha256": git.get("diff_sha256")}

    def _finish(self, entry: dict, result: Any, error: BaseException | None, kind: str,
                replay_of: str | None, late_git: bool = False) -> Recording:
        from .capture import GIT_PENDING, environment, no_git, torch_state

        captured = entry["args"]
        torch_state.mark_consumed(entry["global"], torch_state.global_rng_digests())
        for record, gen in zip(captured.generators, captured.generator_objects):
            record["consumed_by_call"] = torch_state.generator_state_digest(gen) != record["state_sha256"]
        items = outputs.normalise(result) if error is None else []
        if error is None:  # each step's latents, when asked for (autolog's log_every_step)
            items += [outputs.NamedArray(name, value, "tensor") for name, value in entry["step_latents"]]
        site = self._call_site()
        # git runs beside the call; a call quicker than git (a trivial one, a tiny model) need not wait
        git_later = late_git and not entry["git"].done()
        if not git_later:
            entry["git_go"].set()  # its answer is waited for here: git starts now if it has not
        env = environment(None, git_state=(no_git(GIT_PENDING), None) if git_later else entry["git"].result())
        knobs = entry["knobs"]
        knobs["cuda_used"] = torch_state.cuda_started()  # the call may have started CUDA
        if entry["autocast"]:
            knobs["autocast"] = entry["autocast"]
        manifest = Manifest(
            kind=kind,
            replay_of=replay_of,
            repro_track_version=_version(),
            call={**site, "return_type": _type_name(result), "started_at": entry["started_at"],
                  "ended_at": entry["ended_at"],
                  "duration_s": max(0.0, entry["ended"] - entry["started"]),
                  "status": "FAILED" if error else "FINISHED", "error": _error_record(error)},
            arguments=captured.records,
            randomness={"generators": captured.generators, "seeds": captured.seeds,
                        "primary": _primary(captured), "global": entry["global"]},
            determinism=knobs,
            cpu=env.cpu, gpu=env.gpu, software=env.software,
            env_vars=entry["env"], git=env.git,
            outputs=[outputs.describe(item, saved=self.options.log_outputs and outputs.savable(item.value))
                     for item in items],
            code=self._code_identity(site, env.git, tracked_list=git_later or env.git["available"]),
            pipelines=_used_pipelines(entry),
            trajectory=entry.get("trajectory") or [],
        )
        recording = Recording(manifest, items if self.options.log_outputs else [], captured.inputs,
                              env.requirements, env.git_diff)
        return _with_git_later(recording, entry["git"], self._code_after_git) if git_later else recording

    # ------------------------------------------------------------ logging

    def _log(self, recording: Recording) -> RecordOutcome:
        from .context import current_parent
        from .delivery import deliver

        try:
            return deliver(recording, self.options, parent=current_parent())
        except Exception as exc:  # staging itself failed (no writable spool): the recording is lost
            _warn(f"repro-track could not keep the recording of {self.fn.__qualname__}: {exc}")
            return RecordOutcome(None, self.options.tracking_uri or "", None,
                                 recording.manifest.digest, repr(exc))


def _with_git_later(recording: Recording, git: Any,
                    code_after_git: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]) -> Recording:
    """The recording as it is now (git pending), with a future of it complete once git answers: the
    git section, the code section as ``code_after_git`` makes it, and the diff itself."""
    from concurrent.futures import Future

    complete: Future = Future()

    def answered(done: Any) -> None:
        try:
            section, diff = done.result()
            m = recording.manifest
            manifest = dataclasses.replace(m, git=section, code=code_after_git(m.code, section))
            complete.set_result(dataclasses.replace(recording, manifest=manifest, git_diff=diff))
        except BaseException as exc:  # capture_git never raises; anything else is reported by delivery
            complete.set_exception(exc)

    git.add_done_callback(answered)
    return dataclasses.replace(recording, complete=complete)


def _used_pipelines(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Module-level pipelines the function names, then those loaded inside the call, in load order."""
    from .capture.arguments import pipeline_identity

    used = [{"origin": "global", "name": name, "identity": identity}
            for name, identity in sorted(entry["global_pipelines"].items())]
    for index, pipe in enumerate(entry.get("loaded_pipelines") or []):
        identity = pipeline_identity(pipe)
        used.append({"origin": "loaded", "name": identity["repo_id"] or identity["name_or_path"] or f"#{index}",
                     "identity": identity})
    return used


def _code_identity(fn: Callable[..., Any], site: dict[str, Any], git: dict[str, Any],
                   tracked_list: bool) -> dict[str, Any]:
    """The project's code as recorded: commit, uncommitted-diff digest, module and imported files."""
    module_sha, files = None, []
    try:
        path = Path(inspect.getsourcefile(fn) or "")
        if site["source_file"] and path.is_file():
            stat = path.stat()
            module_sha = _file_sha256(str(path), stat.st_mtime_ns, stat.st_size)
            _, root = _function_source(str(path), stat.st_mtime_ns, stat.st_size, fn.__qualname__)
            files = _imported_files(root, tracked_list)
    except (TypeError, OSError):
        module_sha = None
    return {"commit": git.get("commit"), "diff_sha256": git.get("diff_sha256"),
            "module_file": site["source_file"], "module_sha256": module_sha, "files": files}


def _imported_files(root: Path, tracked_list: bool) -> list[dict[str, Any]]:
    """Every project module loaded at the end of the call (helpers included), by digest; with which
    of them git tracks when ``tracked_list`` (git answered, or has yet to: its index is read anyway)."""
    from .capture import sources

    try:
        tracked = sources.tracked_files(root) if tracked_list else None
        return sources.imported_files(root, tracked)
    except Exception as exc:  # the list only sharpens the replay's code check; the recording goes on
        log.debug("imported project files not listed: %r", exc)
        return []


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    # Keyed on mtime and size like _function_source: a module is hashed again only when it changes.
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _disabled() -> bool:
    try:
        return settings.DISABLED.get()
    except ValueError as exc:
        # A mistyped off switch must not break the call; not recording is the cautious reading of it.
        warnings.warn(f"{exc}; recording is off", RecordingWarning, stacklevel=4)
        return True


def _type_name(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def _primary(captured: Any) -> dict[str, Any]:
    gens = captured.generators
    seed = gens[0]["initial_seed"] if gens else next(iter(captured.seeds.values()), None)
    return {"seed": seed, "generator_device": gens[0]["device"] if gens else None}


def _error_record(error: BaseException | None) -> dict[str, str] | None:
    if error is None:
        return None
    from .scrub import blank

    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    # Blanked before the final cut, and cut from far wider slices first, so that no secret is halved
    # at the cut into a piece the rules no longer recognise.
    message = blank(str(error)[:100_000])[:10000]
    return {"type": _type_name(error), "message": message, "traceback": blank(text[-200_000:])[-20000:]}


def _warn(message: str) -> None:
    # Point at the user's call: _warn <- _capture <- capture <- __call__ <- wrapper <- caller.
    warnings.warn(message, RecordingWarning, stacklevel=6)


@overload
def record(fn: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def record(fn: None = None, /, *, experiment: str | None = None, run_name: str | None = None,
           tags: dict[str, str] | None = None, tracking_uri: str | None = None,
           log_outputs: bool = True, deterministic: bool = False,
           ) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def record(fn: Callable[P, R] | None = None, /, *, experiment: str | None = None,
           run_name: str | None = None, tags: dict[str, str] | None = None,
           tracking_uri: str | None = None, log_outputs: bool = True,
           deterministic: bool = False) -> Any:
    """Record every call of the decorated function as an MLflow run with a provenance manifest.

    Use bare (``@record``) or with options (``@record(experiment="ddim")``). The function's return
    value, exceptions, signature and docstring are unchanged. ``tracking_uri`` defaults to
    ``MLFLOW_TRACKING_URI``, then MLflow's own default; ``deterministic=True`` runs each call inside
    :func:`repro_track.deterministic`.
    """
    options = RecordOptions(experiment, run_name, dict(tags or {}), tracking_uri, log_outputs,
                            deterministic)

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        from .capture import pipelines

        pipelines.install()  # pipelines loaded from here on note their revision and variant
        recorder = Recorder(func, options)

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            return recorder(*args, **kwargs)

        setattr(wrapper, MARKER, recorder)
        return wrapper

    return decorate(fn) if fn is not None else decorate


def recorder_of(fn: Any) -> Recorder | None:
    """The Recorder behind a decorated function (also through bound methods), else None."""
    target = getattr(fn, "__func__", fn)
    recorder = getattr(target, MARKER, None)
    return recorder if isinstance(recorder, Recorder) else None


def last_recording(fn: Any) -> RecordOutcome | None:
    """Where this thread's latest call of a decorated function was recorded (run id or spool path)."""
    recorder = recorder_of(fn)
    if recorder is None:
        raise TypeError(f"{getattr(fn, '__qualname__', fn)!r} is not decorated with repro_track.record")
    return recorder.last
