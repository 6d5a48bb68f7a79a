"""Compare replayed outputs with recorded ones: bitwise, max/mean absolute difference, tolerance.

Default tolerances per dtype (``atol``, ``rtol``), used unless ``--atol/--rtol`` are given. They are
loose enough for the rounding differences of another CPU ISA or GPU model after a few diffusion steps,
and tight enough that different noise (a different image) always fails:

=========  ======  ======
dtype      atol    rtol
=========  ======  ======
float64    1e-6    1e-6
float32    1e-3    1e-3
bfloat16   2e-2    2e-2
float16    1e-2    1e-2
uint8      2       0
integers   0       0
=========  ======  ======
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-6, 1e-6),
    "float32": (1e-3, 1e-3),
    "bfloat16": (2e-2, 2e-2),
    "float16": (1e-2, 1e-2),
    "uint8": (2.0, 0.0),
}


@dataclass(frozen=True)
class OutputComparison:
    """How one replayed output compares with the recorded one."""

    bitwise_equal: bool
    max_abs_diff: float | None
    mean_abs_diff: float | None
    within_tolerance: bool
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the report (``note`` only when there is one)."""
        data = asdict(self)
        if data["note"] is None:
            del data["note"]
        return data


def tolerance(dtype: str, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """The (atol, rtol) for a dtype: the overrides where given, else the documented defaults."""
    default = DEFAULT_TOLERANCES.get(dtype, (0.0, 0.0))
    return (default[0] if atol is None else atol, default[1] if rtol is None else rtol)


def compare_one(recorded: dict[str, Any], replayed: dict[str, Any] | None, rec_array: Any,
                new_array: Any, atol: float | None, rtol: float | None) -> OutputComparison:
    """Compare one output by digest, and by values when both arrays are at hand."""
    if replayed is None:
        return OutputComparison(False, None, None, False, "the replay did not produce this output")
    if recorded["shape"] != replayed["shape"] or recorded["dtype"] != replayed["dtype"]:
        return OutputComparison(False, None, None, False,
                                f"recorded {recorded['dtype']} {recorded['shape']}, replayed "
                                f"{replayed['dtype']} {replayed['shape']}")
    equal = recorded["sha256"] == replayed["sha256"]
    if rec_array is None or new_array is None:
        return OutputComparison(equal, 0.0 if equal else None, 0.0 if equal else None, equal,
                                None if equal else "outputs were not saved, only digests compared")
    a, r = tolerance(recorded["dtype"], atol, rtol)
    old, new = rec_array.double(), new_array.double()
    diff = (old - new).abs()
    finite = bool(diff.isfinite().all()) or equal
    max_diff = float(diff.max()) if diff.numel() and finite else (0.0 if equal else None)
    mean_diff = float(diff.mean()) if diff.numel() and finite else (0.0 if equal else None)
    within = equal or (finite and bool((diff <= a + r * old.abs()).all()))
    return OutputComparison(equal, max_diff, mean_diff, within)


def observed_level(results: dict[str, OutputComparison], recorded_status: str,
                   replay_status: str) -> str:
    """exact when every output is bitwise equal, close when all are within tolerance, else different."""
    if recorded_status != replay_status:
        return "different"
    if all(c.bitwise_equal for c in results.values()):
        return "exact"
    if all(c.within_tolerance for c in results.values()):
        return "close"
    return "different"
