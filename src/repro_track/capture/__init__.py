"""Capture: one module per source of facts (torch, cpu, gpu, git, env vars, packages, arguments).

``static_facts`` gathers what cannot change during a process (versions, CPU identity) once;
``environment`` adds the per-call facts (git state, GPU fields torch filled in); the recorder takes
the environment variables itself at call entry.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Environment:
    """The environment sections of a manifest plus the artifacts that go beside it."""

    cpu: dict[str, Any]
    gpu: dict[str, Any]
    software: dict[str, Any]
    git: dict[str, Any]
    git_diff: str | None
    requirements: str


@functools.lru_cache(maxsize=1)
def _static() -> tuple[dict[str, Any], dict[str, Any], str]:
    from . import cpu, packages, provenance, torch_state

    requirements = packages.requirements_text()
    software = {
        **packages.platform_info(),
        "provenance": provenance.provenance(),
        "torch": torch_state.torch_software(),
        "packages": packages.package_versions(),
        "distributions_count": len(packages.installed_distributions()),
        "distributions_sha256": hashlib.sha256(requirements.encode()).hexdigest(),
    }
    cpu_section = {**cpu.capture_cpu(), **torch_state.torch_cpu_facts()}
    cpu_section.update(cpu.library_isa(cpu_section))  # oneDNN/MKL read their caps once, at first use
    return software, cpu_section, requirements


def static_facts() -> tuple[dict[str, Any], dict[str, Any], str]:
    """(software, cpu, requirements.txt text), computed once per process, copied per call."""
    import copy

    return copy.deepcopy(_static())


def clear_cache() -> None:
    """Forget the static facts (tests that change the installed set or the CPU stand-ins)."""
    _static.cache_clear()


def environment(source_path: Path | None, *, with_git: bool = True,
                git_state: tuple[dict[str, Any], str | None] | None = None) -> Environment:
    """Everything about this process and machine that can change a call's output bits.

    ``git_state`` is a ``capture_git`` result taken earlier (the recorder starts it during the call
    so that git's subprocess runs while the generation does).
    """
    from . import git, gpu

    software, cpu_section, requirements = static_facts()
    if git_state is not None:
        git_section, diff = git_state
    else:
        git_section, diff = git.capture_git(source_path or Path.cwd()) if with_git else (no_git(), None)
    return Environment(
        cpu=cpu_section,
        gpu=gpu.capture_gpu(),
        software=software,
        git=git_section,
        git_diff=diff,
        requirements=requirements,
    )


GIT_PENDING = "git had not answered when the recording process ended"


def no_git(reason: str = "git capture was turned off") -> dict[str, Any]:
    """A git section that records no git state, saying why."""
    return {"available": False, "reason": reason, "root": None, "commit": None,
            "branch": None, "remote_url": None, "dirty": None, "untracked": [],
            "untracked_truncated": False, "diff_sha256": None, "diff_bytes": 0, "diff_truncated": False}
