"""The step-level trajectory of a generation: per denoising step, a digest and a few statistics of the
latents, so that a replay or a diff can say where two generations parted (the noise, or step 7 of 50).

Observed through the scheduler: every diffusers pipeline advances its latents with
``scheduler.step(model_output, timestep, sample)``, DDPM and DDIM pipelines included (they have no
``callback_on_step_end``), and a callback would be an argument the recording must not add to the
user's call. ``step`` is wrapped once per scheduler class (like the ``from_pretrained`` hook, it calls
straight through) and notes only while a recording collects in this context: step 0 is the first
step's ``sample`` (the initial noise), step k the ``prev_sample`` the k-th step returned. Each pipeline
call starts a new segment, so a function that calls two pipelines records two trajectories. No tensor
is kept: only the sha256 of its bytes, its mean, standard deviation and largest magnitude.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import sys
from typing import Any, Iterator

HOOK = "__repro_track_step_hook__"
SEGMENT_HOOK = "__repro_track_segment_hook__"
STEP_OUTPUT_PREFIX = "step_latents."  # outputs named step_latents.<call>.<step>: kept latents


@dataclasses.dataclass
class Collector:
    """The steps noted so far in one recorded call (mutable: it fills while the call runs)."""

    keep: bool = False  # also keep a CPU copy of each step's latents (autolog's log_every_step)
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    kept: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    call: int = -1  # which pipeline call of the recorded function the next steps belong to
    step: int = 0
    fresh: bool = True  # the next step opens a segment: note its input sample as step 0
    depth: int = 0  # a scheduler whose step calls its parent's step is one step, not two
    calls_open: int = 0


_active: contextvars.ContextVar[Collector | None] = contextvars.ContextVar("repro_track_trajectory",
                                                                            default=None)


def summary(tensor: Any) -> dict[str, Any]:
    """sha256 of the latents' bytes, with mean, std and max |x| (None where not finite)."""
    from .outputs import sha256_of

    values = tensor.detach()
    floats = values.float()
    stats = (floats.mean().item(), floats.std().item() if floats.numel() > 1 else 0.0,
             floats.abs().max().item() if floats.numel() else 0.0)
    mean, std, abs_max = (v if math.isfinite(v) else None for v in stats)
    return {"sha256": sha256_of(values), "mean": mean, "std": std, "abs_max": abs_max}


@contextlib.contextmanager
def collecting(keep: bool = False) -> Iterator[Collector]:
    """Collect the trajectory of the pipelines run inside the block (this context only); with
    ``keep``, each step's latents too (as ``kept``: output name, CPU tensor)."""
    install()
    collector = Collector(keep=keep)
    token = _active.set(collector)
    try:
        yield collector
    finally:
        _active.reset(token)


@contextlib.contextmanager
def segment() -> Iterator[None]:
    """Mark one pipeline call: its first scheduler step opens a new trajectory segment."""
    collector = _active.get()
    if collector is None or collector.calls_open:
        yield  # not collecting, or a pipeline called from inside another pipeline: one segment
        return
    collector.calls_open += 1
    collector.fresh = True
    try:
        yield
    finally:
        collector.calls_open -= 1


def _note(collector: Collector, sample: Any, result: Any) -> None:
    prev = getattr(result, "prev_sample", None)
    if prev is None and isinstance(result, tuple) and result:
        prev = result[0]
    if not _is_tensor(prev):
        return
    if collector.fresh:
        collector.call, collector.step, collector.fresh = collector.call + 1, 0, False
        if _is_tensor(sample):
            _add(collector, sample)
    collector.step += 1
    _add(collector, prev)


def _add(collector: Collector, latents: Any) -> None:
    collector.steps.append({"call": collector.call, "step": collector.step, **summary(latents)})
    if collector.keep:
        name = f"{STEP_OUTPUT_PREFIX}{collector.call}.{collector.step:03d}"
        collector.kept.append((name, latents.detach().to("cpu", copy=True)))


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


# ---------------------------------------------------------------- the hooks

def install() -> None:
    """Wrap ``step`` of every imported scheduler class and ``__call__`` of every imported pipeline
    class (each defines its own); called again at each recording, so later imports are covered."""
    schedulers = sys.modules.get("diffusers.schedulers.scheduling_utils")
    if schedulers is not None:
        for cls in subclasses(schedulers.SchedulerMixin):
            _wrap_step(cls)
        on_new_subclass(schedulers.SchedulerMixin, _wrap_step, HOOK)
    pipelines = sys.modules.get("diffusers.pipelines.pipeline_utils")
    if pipelines is not None:
        for cls in subclasses(pipelines.DiffusionPipeline):
            _wrap_call(cls)
        on_new_subclass(pipelines.DiffusionPipeline, _wrap_call, SEGMENT_HOOK)


def subclasses(root: type) -> list[type]:
    """``root`` and every subclass of it defined so far."""
    found, stack, seen = [], [root], set()
    while stack:
        cls = stack.pop()
        if cls not in seen:
            seen.add(cls)
            found.append(cls)
            stack.extend(cls.__subclasses__())
    return found


def on_new_subclass(root: type, wrap: Any, marker: str) -> None:
    """Call ``wrap(cls)`` for each subclass of ``root`` defined from now on (diffusers imports its
    pipeline and scheduler modules lazily, often inside ``from_pretrained``). Once per marker."""
    previous = root.__dict__.get("__init_subclass__")
    previous_func = getattr(previous, "__func__", previous)
    if marker in getattr(previous_func, "__repro_track_markers__", ()):
        return

    def __init_subclass__(cls: type, **kwargs: Any) -> None:
        if previous_func is not None:
            previous_func(cls, **kwargs)
        else:
            super(root, cls).__init_subclass__(**kwargs)
        with contextlib.suppress(Exception):  # wrapping must never break a class definition
            wrap(cls)

    __init_subclass__.__repro_track_markers__ = (  # type: ignore[attr-defined]
        set(getattr(previous_func, "__repro_track_markers__", ())) | {marker})
    root.__init_subclass__ = classmethod(__init_subclass__)  # type: ignore[assignment]


def _wrap_step(cls: type) -> None:
    original = cls.__dict__.get("step")
    if not callable(original) or getattr(original, HOOK, False):
        return

    @functools.wraps(original)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        collector = _active.get()
        if collector is None or collector.depth:
            return original(self, *args, **kwargs)
        collector.depth += 1
        try:
            result = original(self, *args, **kwargs)
        finally:
            collector.depth -= 1
        sample = args[2] if len(args) > 2 else kwargs.get("sample")
        with contextlib.suppress(Exception):  # noting must never break the user's generation
            _note(collector, sample, result)
        return result

    setattr(step, HOOK, True)
    setattr(cls, "step", step)


def _wrap_call(cls: type) -> None:
    original = cls.__dict__.get("__call__")
    if not callable(original) or getattr(original, SEGMENT_HOOK, False):
        return

    @functools.wraps(original)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        with segment():
            return original(self, *args, **kwargs)

    setattr(__call__, SEGMENT_HOOK, True)
    setattr(cls, "__call__", __call__)


# ---------------------------------------------------------------- comparing two trajectories

def first_divergence(recorded: list[dict[str, Any]] | None, other: list[dict[str, Any]] | None,
                     ) -> tuple[int, int, int] | None:
    """(call, step, steps in that call) of the first step whose latents differ, else None.

    None also when either side recorded no trajectory (nothing to compare)."""
    if not recorded or not other:
        return None
    theirs = {(s["call"], s["step"]): s["sha256"] for s in other}
    for entry in recorded:
        key = (entry["call"], entry["step"])
        if theirs.get(key) != entry["sha256"]:
            total = max(s["step"] for s in recorded if s["call"] == entry["call"])
            return entry["call"], entry["step"], total
    ours = {(s["call"], s["step"]) for s in recorded}
    extra = sorted(key for key in theirs if key not in ours)  # the other run took more steps
    if not extra:
        return None
    call, step = extra[0]
    return call, step, max([s["step"] for s in recorded if s["call"] == call], default=0)


def divergence_words(recorded: list[dict[str, Any]] | None, other: list[dict[str, Any]] | None) -> str | None:
    """``noise differs`` or ``diverged at step 7 of 50`` (naming the pipeline call when there were
    several), else None when the trajectories agree or one is missing."""
    found = first_divergence(recorded, other)
    if found is None:
        return None
    call, step, total = found
    calls = {s["call"] for s in (recorded or [])} | {s["call"] for s in (other or [])}
    where = f" (pipeline call {call + 1} of {len(calls)})" if len(calls) > 1 else ""
    if step == 0:
        return f"noise differs: the initial latents already differ{where}"
    if step > total:
        return f"diverged at step {step}: one run took more steps than the other ({total}){where}"
    return f"diverged at step {step} of {total}: the latents agreed until then{where}"
