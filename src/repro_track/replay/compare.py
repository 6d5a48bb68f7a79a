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
    if recorded.get("file") or replayed.get("file"):  # a file's size may change with equal content
        return _compare_file(recorded, replayed, rec_array, new_array, atol, rtol)
    if recorded["shape"] != replayed["shape"] or recorded["dtype"] != replayed["dtype"]:
        return OutputComparison(False, None, None, False,
                                f"recorded {recorded['dtype']} {recorded['shape']}, replayed "
                                f"{replayed['dtype']} {replayed['shape']}")
    equal = recorded["sha256"] == replayed["sha256"]
    if rec_array is None or new_array is None:
        return OutputComparison(equal, 0.0 if equal else None, 0.0 if equal else None, equal,
                                None if equal else "outputs were not saved, only digests compared")
    return _values(recorded["dtype"], rec_array, new_array, equal, atol, rtol)


def _values(dtype: str, rec_array: Any, new_array: Any, equal: bool, atol: float | None,
            rtol: float | None) -> OutputComparison:
    """max/mean |difference| of two same-shape tensors and whether it is within tolerance."""
    a, r = tolerance(dtype, atol, rtol)
    old, new = rec_array.double(), new_array.double()
    diff = (old - new).abs()
    finite = bool(diff.isfinite().all()) or equal
    max_diff = float(diff.max()) if diff.numel() and finite else (0.0 if equal else None)
    mean_diff = float(diff.mean()) if diff.numel() and finite else (0.0 if equal else None)
    within = equal or (finite and bool((diff <= a + r * old.abs()).all()))
    return OutputComparison(equal, max_diff, mean_diff, within)


def _compare_file(recorded: dict[str, Any], replayed: dict[str, Any], rec_bytes: Any, new_bytes: Any,
                  atol: float | None, rtol: float | None) -> OutputComparison:
    """A returned file: by its bytes, and where they differ, by its decoded arrays (never unpickled)."""
    path = (recorded.get("file") or {}).get("path", recorded["name"])
    if not recorded.get("file") or not replayed.get("file"):
        return OutputComparison(False, None, None, False,
                                f"{path} is a file on one side and an array on the other")
    if recorded["sha256"] == replayed["sha256"]:
        return OutputComparison(True, 0.0, 0.0, True)
    fmt = recorded["file"]["format"]
    if rec_bytes is None or new_bytes is None:
        return OutputComparison(False, None, None, False,
                                f"the file {path} has other bytes; they were not saved, only digests compared")
    if fmt == "bytes" or replayed["file"]["format"] != fmt:
        return OutputComparison(False, None, None, False,
                                f"the file {path} has other bytes (a {fmt} file: no tolerance applies)")
    try:
        old, new = decode_file(fmt, _as_bytes(rec_bytes)), decode_file(fmt, _as_bytes(new_bytes))
    except Exception as exc:  # a malformed file is a difference, reported, never a crash
        return OutputComparison(False, None, None, False, f"the {fmt} file {path} could not be read: {exc}")
    if sorted(old) != sorted(new) or any(old[k].shape != new[k].shape or old[k].dtype != new[k].dtype
                                         for k in old):
        return OutputComparison(False, None, None, False,
                                f"the {fmt} file {path} holds other arrays (names, shapes or dtypes)")
    parts = [_values(str(old[k].dtype).removeprefix("torch."), old[k], new[k], _same_bits(old[k], new[k]),
                     atol, rtol) for k in sorted(old)]
    equal = all(p.bitwise_equal for p in parts)
    return OutputComparison(
        equal, _worst(p.max_abs_diff for p in parts), _worst(p.mean_abs_diff for p in parts),
        all(p.within_tolerance for p in parts),
        f"the file {path} has other bytes; its decoded {fmt} content "
        + ("is bit-identical" if equal else "was compared value by value"))


def _as_bytes(array: Any) -> bytes:
    return array.numpy().tobytes() if hasattr(array, "numpy") else bytes(array)


def _same_bits(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))) \
        if a.numel() else True


def _worst(values: Any) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else max(values, default=0.0)


def decode_file(fmt: str, data: bytes) -> dict[str, Any]:
    """The arrays in a returned file as CPU tensors: ``.npy`` without pickle, safetensors, PNG pixels."""
    import io

    import numpy as np
    import torch

    if fmt == "npy":
        array = np.load(io.BytesIO(data), allow_pickle=False)  # object arrays raise instead of unpickling
        return {"": torch.from_numpy(np.ascontiguousarray(array))}
    if fmt == "safetensors":
        from safetensors.torch import load

        return dict(load(data))
    if fmt == "png":
        from PIL import Image

        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            return {"": torch.from_numpy(np.array(image))}
    raise ValueError(f"no decoder for {fmt!r} files")


def observed_level(results: dict[str, OutputComparison], recorded_call: dict[str, Any],
                   replayed_call: dict[str, Any]) -> tuple[str, str | None]:
    """The observed outcome (one of ``OBSERVED``) and, where it needs one, the reason.

    exact when every output is bitwise equal (or the call raised the same exception again), close when
    all are within tolerance, different otherwise, and unverified when nothing could be compared.
    """
    if recorded_call["status"] != replayed_call["status"]:
        return "different", f"the recorded call {_ended(recorded_call)}; the replay {_ended(replayed_call)}"
    if recorded_call["status"] == "FAILED":
        return _compare_errors(recorded_call.get("error") or {}, replayed_call.get("error") or {})
    if not results:
        return "unverified", (
            f"nothing was compared: the call returned {recorded_call.get('return_type', 'a value')}, "
            "with no tensor, array, image, number or path of an existing file in it; return the array "
            "or image (or the path of the file it wrote) so that replays can check it")
    if all(c.bitwise_equal for c in results.values()):
        level = "exact"
    elif all(c.within_tolerance for c in results.values()):
        level = "close"
    else:
        level = "different"
    return level, None


def _ended(call: dict[str, Any]) -> str:
    error = call.get("error") or {}
    return f"raised {error.get('type', 'an exception')}" if call["status"] == "FAILED" else "finished"


def _compare_errors(recorded: dict[str, Any], replayed: dict[str, Any]) -> tuple[str, str]:
    same = (recorded.get("type"), recorded.get("message")) == (replayed.get("type"), replayed.get("message"))
    if same:
        return "exact", (f"the call raised {recorded.get('type')} again with the same message; the "
                         "error (type and message) was compared, as the call returned nothing")
    return "different", (f"the recorded call raised {recorded.get('type')}: "
                         f"{str(recorded.get('message'))[:200]!r}; the replay raised "
                         f"{replayed.get('type')}: {str(replayed.get('message'))[:200]!r}")
