"""``repro_track.autolog()``: record every diffusers pipeline call, as MLflow's flavors autolog theirs.

Each pipeline class defines its own ``__call__``, so each is wrapped: the classes imported now, and
(through ``DiffusionPipeline.__init_subclass__``) those imported later, as ``from_pretrained`` does
when it meets a new class. A wrapped call is recorded by the same :class:`~repro_track.recorder.Recorder`
as ``@record``, over a small entry function whose signature is the pipeline's ``__call__`` with the
pipeline as its first argument. So the manifest names the pipeline call itself as its entry point
(``call.entry = "pipeline_call"``), and a replay needs no user source: it rebuilds the pipeline from
its recorded identity and calls it with the recorded arguments. That works for code run through
``exec`` in a notebook, which has no source file to import.

A pipeline call inside a recorded call (a ``@record`` function, or a pipeline that calls another) is
not recorded again. The configuration is process-wide, like MLflow's autolog configuration.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from . import trajectory
from .recorder import MARKER, Recorder
from .records import RecordOptions

HOOK = "__repro_track_autolog__"
ENTRY = "pipeline_call"
_PIPELINE_MODULE = "diffusers.pipelines.pipeline_utils"


@dataclasses.dataclass(frozen=True)
class AutologConfig:
    """What ``autolog()`` was last called with."""

    options: RecordOptions
    disable: bool = False
    exclusive: bool = False
    log_every_step: bool = False


_config: AutologConfig | None = None


def autolog(*, disable: bool = False, log_outputs: bool = True, log_every_step: bool = False,
            exclusive: bool = False, experiment: str | None = None, run_name: str | None = None,
            tags: dict[str, str] | None = None, tracking_uri: str | None = None,
            deterministic: bool = False) -> None:
    """Record every diffusers pipeline call as a run, with the manifest ``@record`` writes.

    ``disable=True`` turns it off again (the wrappers stay and call straight through).
    ``log_outputs`` saves the returned arrays and images as with ``@record``. ``log_every_step`` also
    keeps each denoising step's latents as outputs (``step_latents.<call>.<step>``), which a replay
    then compares step by step; the trajectory's digests and statistics are always recorded.
    With ``exclusive=True`` a call made while a user's MLflow run (or a ``repro_track.parent_run``)
    is active is not recorded; by default it is recorded as a child run of that run. The other options are those of :func:`repro_track.record`.
    """
    global _config
    options = RecordOptions(experiment, run_name, dict(tags or {}), tracking_uri, log_outputs,
                            deterministic)
    _config = AutologConfig(options, disable, exclusive, log_every_step)
    if disable:
        return
    import importlib

    from .capture import pipelines

    module = importlib.import_module(_PIPELINE_MODULE)
    pipelines.install()  # pipelines loaded from here on note their revision and variant
    install(module.DiffusionPipeline)


def config() -> AutologConfig | None:
    """The active autolog configuration, None when ``autolog()`` was never called."""
    return _config


def install(root: type) -> None:
    """Wrap ``__call__`` of ``root`` and every subclass imported now, and of those defined later."""
    for cls in trajectory.subclasses(root):
        _patch(cls)
    trajectory.on_new_subclass(root, _patch, HOOK)


def _patch(cls: type) -> None:
    original = cls.__dict__.get("__call__")
    if not callable(original) or getattr(original, HOOK, False):
        return
    options = _config.options if _config is not None else RecordOptions()
    recorder = PipelineRecorder(entry_function(cls, original), options)

    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _records_now():
            recorder.forget()  # an unrecorded call must not leave the previous call's run behind
            with trajectory.segment():
                return original(self, *args, **kwargs)
        # autolog() may have been called again since the class was wrapped.
        assert _config is not None  # _records_now() said so
        recorder.options, recorder.keep_steps = _config.options, _config.log_every_step
        return recorder(self, *args, **kwargs)

    setattr(__call__, HOOK, True)
    setattr(__call__, MARKER, recorder)  # repro_track.last_recording(pipe.__call__) finds the run
    setattr(cls, "__call__", __call__)


def _records_now() -> bool:
    """Whether this pipeline call is recorded: autolog on, no recording running (a @record function
    or an outer pipeline call), and with ``exclusive`` no user run active."""
    from .capture import pipelines
    from .context import current_parent

    if _config is None or _config.disable or pipelines.recording():
        return False
    if _config.exclusive:
        mlflow = sys.modules.get("mlflow")
        if current_parent() is not None or (mlflow is not None and mlflow.active_run() is not None):
            return False
    return True


def entry_function(cls: type, original: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """A function ``(pipeline, <the arguments of cls.__call__>)`` that calls the pipeline unwrapped."""
    original = original or unpatched_call(cls)
    signature = inspect.signature(original)
    params = list(signature.parameters.values())
    taken = {p.name for p in params[1:]}
    first = next(n for n in ("pipeline", "pipe", "pipeline_") if n not in taken)
    params[0] = params[0].replace(name=first, kind=inspect.Parameter.POSITIONAL_ONLY)

    def call(pipeline: Any, /, *args: Any, **kwargs: Any) -> Any:
        with trajectory.segment():
            return original(pipeline, *args, **kwargs)

    call.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    call.__module__ = cls.__module__
    call.__qualname__ = call.__name__ = f"{cls.__qualname__}.__call__"
    call.__doc__ = f"The call of a {cls.__qualname__}, recorded by repro_track.autolog."
    call.pipeline_class = cls  # type: ignore[attr-defined]
    return call


def unpatched_call(cls: type) -> Callable[..., Any]:
    """``cls.__call__`` as diffusers defines it, below any repro-track wrapper."""
    function = inspect.getattr_static(cls, "__call__")
    while getattr(function, "__wrapped__", None) is not None and (
            getattr(function, HOOK, False) or getattr(function, trajectory.SEGMENT_HOOK, False)):
        function = function.__wrapped__
    return function


class PipelineRecorder(Recorder):
    """A Recorder whose entry point is a pipeline class's own ``__call__``, not user code."""

    @property
    def pipeline_class(self) -> type:
        """The diffusers pipeline class whose call this records."""
        return self.fn.pipeline_class  # type: ignore[attr-defined]

    def forget(self) -> None:
        """This thread's latest call of the pipeline was not recorded."""
        self._local.outcome = None

    def _source_location(self) -> Path:
        # No user source runs: the git state recorded is the working directory's (the notebook's).
        return Path.cwd()

    def _call_site(self) -> dict[str, Any]:
        cls = self.pipeline_class
        return {"module": cls.__module__, "qualname": f"{cls.__qualname__}.__call__", "is_script": False,
                "source_file": None, "source_sha256": None, "replayable": True, "reason": None,
                "entry": ENTRY}

    def _code_identity(self, site: dict[str, Any], git: dict[str, Any], *, tracked_list: bool) -> dict[str, Any]:
        # The code that ran is diffusers' (its version is in the software section), not the project's.
        return {"commit": None, "diff_sha256": None, "module_file": None, "module_sha256": None,
                "files": []}

    def _code_after_git(self, code: dict[str, Any], git: dict[str, Any]) -> dict[str, Any]:
        return code  # nor when git answers after the call

