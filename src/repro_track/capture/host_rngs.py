"""Random generators that are not torch's: numpy ``Generator`` and ``RandomState``, ``random.Random``.

A call may take one of these as an argument (a sampler, an augmentation). Each is recorded with its
full state at entry as plain JSON, and rebuilt in the replay child to that exact state.
"""

from __future__ import annotations

import random
from typing import Any

KINDS = ("numpy.random.Generator", "numpy.random.RandomState", "random.Random")


def _type_name(value: Any) -> str:
    cls = type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def rng_kind(value: Any) -> str | None:
    """Which of the supported generator types ``value`` is (exact type, not subclasses), if any."""
    name = _type_name(value)
    aliases = {"numpy.random._generator.Generator": "numpy.random.Generator",
               "numpy.random.mtrand.RandomState": "numpy.random.RandomState",
               "random.Random": "random.Random"}
    return aliases.get(name)


def _plain(value: Any) -> Any:
    """A bit generator's state as JSON: arrays become lists of ints (dtype kept beside them)."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _unplain(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=value["dtype"])
        return {k: _unplain(v) for k, v in value.items()}
    return value


def rng_record(value: Any) -> dict[str, Any]:
    """The full state of a supported generator, as JSON data."""
    kind = rng_kind(value)
    if kind == "numpy.random.Generator":
        return {"type": kind, "state": _plain(value.bit_generator.state)}
    if kind == "numpy.random.RandomState":
        name, key, pos, has_gauss, cached = value.get_state()
        return {"type": kind, "state": {"bit_generator": name, "key": [int(k) for k in key], "pos": int(pos),
                                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if kind == "random.Random":
        version, internal, gauss_next = value.getstate()
        return {"type": kind, "state": {"version": version, "internal": list(internal),
                                        "gauss_next": gauss_next}}
    raise TypeError(f"{_type_name(value)} is not a supported random generator")


def rebuild(record: dict[str, Any]) -> Any:
    """A new generator of the recorded type, set to the recorded state."""
    state = record["state"]
    if record["type"] == "numpy.random.Generator":
        import numpy as np

        name = state["bit_generator"]
        if name not in ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"):
            raise ValueError(f"unknown numpy bit generator {name!r}")
        bit_generator = getattr(np.random, name)()
        bit_generator.state = _unplain(state)
        return np.random.Generator(bit_generator)
    if record["type"] == "numpy.random.RandomState":
        import numpy as np

        rs = np.random.RandomState()
        rs.set_state((state["bit_generator"], np.asarray(state["key"], dtype=np.uint32), state["pos"],
                      state["has_gauss"], state["cached_gaussian"]))
        return rs
    if record["type"] == "random.Random":
        rng = random.Random()
        rng.setstate((state["version"], tuple(state["internal"]), state["gauss_next"]))
        return rng
    raise ValueError(f"unknown random generator type {record['type']!r}")
