"""Dispatch state that changes the bits without being a determinism switch: ``torch.autocast``.

Autocast is thread-local and set by context managers around the call, so the recorder reads it at
entry (``torch.is_autocast_enabled(device_type)`` and its dtype, per device type) and the replay
child re-enters the same ``torch.autocast`` blocks around the replayed call.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def autocast_state() -> list[dict[str, Any]]:
    """Every device type whose autocast is enabled here, with its dtype (an empty list when none)."""
    import torch

    found = []
    for device_type in DEVICE_TYPES:
        try:
            enabled = torch.is_autocast_enabled(device_type)
        except (RuntimeError, TypeError):  # a device type this torch build does not know
            continue
        if enabled:
            dtype = torch.get_autocast_dtype(device_type)
            found.append({"device_type": device_type, "dtype": str(dtype).removeprefix("torch."),
                          "enabled": True, "cache_enabled": bool(torch.is_autocast_cache_enabled())})
    return found


@contextlib.contextmanager
def autocast(records: list[dict[str, Any]]) -> Iterator[None]:
    """Re-enter the recorded autocast blocks (nothing when none was enabled)."""
    import torch

    with contextlib.ExitStack() as stack:
        for record in records:
            stack.enter_context(torch.autocast(record["device_type"], dtype=getattr(torch, record["dtype"]),
                                               enabled=record["enabled"],
                                               cache_enabled=record.get("cache_enabled", True)))
        yield
