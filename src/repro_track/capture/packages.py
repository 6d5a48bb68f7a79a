"""Installed package versions and platform facts, read without importing any package.

Versions come from ``importlib.metadata`` (as huggingface_hub does), so recording a run
never imports torch, diffusers or anything else heavy as a side effect. The installed set
is cached per process: it does not change during a run in practice, and walking every
distribution's metadata costs tens of milliseconds.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata as metadata
import logging
import platform
import re
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PACKAGES: tuple[str, ...] = (
    "torch", "diffusers", "transformers", "numpy", "accelerate", "safetensors", "mlflow",
    "mlflow-skinny", "repro-track", "nvidia-ml-py", "pillow", "xformers", "scipy", "peft",
)

_NAME_SEPARATORS = re.compile(r"[-_.]+")


def package_versions(names: Iterable[str] = DEFAULT_PACKAGES) -> dict[str, str | None]:
    """Map each distribution name to its installed version, or None when absent."""
    return dict(_versions(tuple(names)))


def installed_distributions() -> list[str]:
    """Sorted ``name==version`` lines for every installed distribution (normalised names).

    Usable as a requirements file; a name installed twice on ``sys.path`` is listed once,
    with the version that import would find first.
    """
    return list(_distributions())


def requirements_text() -> str:
    """The installed distributions as the text of a requirements file."""
    lines = _distributions()
    return "".join(f"{line}\n" for line in lines)


def platform_info() -> dict[str, Any]:
    """Python, OS and libc versions; no host names and no paths."""
    return copy.deepcopy(_platform())


def clear_cache() -> None:
    """Forget cached versions (for tests that change what is installed)."""
    _versions.cache_clear()
    distributions.cache_clear()
    _distributions.cache_clear()
    _platform.cache_clear()


def normalize_name(name: str) -> str:
    """PEP 503 normalisation: lower case, runs of ``-_.`` become one ``-``."""
    return _NAME_SEPARATORS.sub("-", name).lower()


@functools.lru_cache(maxsize=32)
def _versions(names: tuple[str, ...]) -> tuple[tuple[str, str | None], ...]:
    return tuple((name, _version(name)) for name in names)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
    except Exception as exc:  # broken metadata must not break recording
        log.debug("could not read the version of %s: %r", name, exc)
        return None


@functools.lru_cache(maxsize=1)
def distributions() -> tuple[metadata.Distribution, ...]:
    """Every installed distribution, in ``sys.path`` order, listed once per process."""
    try:
        return tuple(metadata.distributions())
    except Exception as exc:
        log.debug("could not list installed distributions: %r", exc)
        return ()


@functools.lru_cache(maxsize=1)
def _distributions() -> tuple[str, ...]:
    seen: dict[str, str] = {}
    for dist in distributions():
        try:
            name = dist.metadata["Name"]
            version = dist.version
        except Exception as exc:
            log.debug("skipping a distribution with unreadable metadata: %r", exc)
            continue
        if not name or not version:
            continue
        # distributions() walks sys.path in order, so the first one seen is the one
        # that `import` would load.
        seen.setdefault(normalize_name(name), version)
    return tuple(f"{name}=={version}" for name, version in sorted(seen.items()))


@functools.lru_cache(maxsize=1)
def _platform() -> dict[str, Any]:
    uname = platform.uname()
    return {
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "compiler": platform.python_compiler(),
        },
        "os": {
            "system": uname.system,
            "release": uname.release,
            "version": uname.version,
            "machine": uname.machine,
        },
        "libc": _libc(),
    }


def _libc() -> str | None:
    try:
        # With no executable argument this asks the C library itself (confstr) instead
        # of scanning the interpreter binary.
        name, version = platform.libc_ver()
    except Exception as exc:
        log.debug("libc version unavailable: %r", exc)
        return None
    if not name:
        return None
    return f"{name} {version}".strip()
