"""``--env recorded``: rebuild the recorded package versions with uv, cached by their digest.

A replay normally runs with whatever is installed today. With ``--env recorded`` the packages whose
version differs from the recording (or that are missing here) are installed with ``uv`` into a
virtual environment layered over this one: the environment's own site-packages come first on
``sys.path``, this environment's after them, so every recorded version shadows today's while the
unchanged packages (torch, CUDA libraries) are not copied or downloaded again. The environment is
cached under the repro-track cache, keyed by the digest of what it installs and what it layers on.

What may be installed follows the trust rule of replay: versions of distributions already installed
here may change; a distribution not installed here, or one from a VCS URL or archive named by the
manifest, is installed only from a run signed by a trusted key (or with ``allow_new``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import site
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .capture.packages import normalize_name
from .errors import ReproTrackError

_LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)\s*$")
SKIP = frozenset({"repro-track"})  # the replayer runs as it is here; the project comes from its commit
META = "repro-track-env.json"


class EnvironmentBuildError(ReproTrackError, RuntimeError):
    """The recorded environment cannot be planned or built (uv missing, a version that cannot be had)."""


def parse_requirements(text: str) -> dict[str, str]:
    """``name==version`` lines (as recorded in ``repro/requirements.txt``) to {normalised name: version}."""
    found = {}
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if match:
            found[normalize_name(match.group("name"))] = match.group("version")
    return found


def cache_root() -> Path:
    """Where rebuilt environments live: ``$REPRO_TRACK_ENV_CACHE``, else the per-user cache."""
    if os.environ.get("REPRO_TRACK_ENV_CACHE"):
        return Path(os.environ["REPRO_TRACK_ENV_CACHE"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "repro-track" / "envs"


@dataclass(frozen=True)
class EnvPlan:
    """What ``--env recorded`` installs, where the environment lives, and whether it is built already."""

    key: str
    path: Path
    install: list[str]
    changes: list[str]
    refused: list[str] = field(default_factory=list)

    @property
    def cached(self) -> bool:
        """Whether the environment is already built (a cache hit)."""
        return (self.path / META).is_file()

    @property
    def python(self) -> Path:
        """The environment's interpreter."""
        return self.path / "bin" / "python"

    def describe(self) -> list[str]:
        """Lines for ``--dry-run``."""
        head = (f"recorded environment: {'cached' if self.cached else 'to build'} at {self.path} "
                f"({len(self.install)} package(s) layered over this environment)")
        return [head] + [f"  install {spec}" for spec in self.install] + [f"  refused: {r}" for r in self.refused]


def plan(requirements: str, software: dict[str, Any], *, trusted: bool, allow_new: bool = False,
         here: dict[str, str] | None = None) -> EnvPlan:
    """Compare the recorded package set with this environment and plan what to install."""
    from .capture import packages, provenance

    recorded = parse_requirements(requirements)
    if not recorded:
        raise EnvironmentBuildError("the run has no recorded package list (repro/requirements.txt), so its "
                                    "environment cannot be rebuilt")
    here = here if here is not None else parse_requirements(packages.requirements_text())
    origins = (software.get("provenance") or {}).get("origins") or {}
    here_origins = provenance.origins()
    install, changes, refused = [], [], []
    for name, version in sorted(recorded.items()):
        if name in SKIP or (here.get(name) == version and same_origin(origins.get(name), here_origins.get(name))):
            continue
        spec, from_url = _spec(name, version, origins.get(name))
        new = name not in here
        changes.append(f"{name}: {here.get(name, 'not installed')} here, {version} recorded"
                       + (f" (from {origins[name]['url']})" if from_url else ""))
        if (new or from_url) and not (trusted or allow_new):
            refused.append(f"{spec}: {'not installed here' if new else 'installed from a URL the manifest names'}; "
                           "only a run signed by a trusted key may add it")
            continue
        install.append(spec)
    base = hashlib.sha256(packages.requirements_text().encode()).hexdigest()
    key = hashlib.sha256(json.dumps([sys.version, base, install]).encode()).hexdigest()[:24]
    return EnvPlan(key, cache_root() / key, install, changes, refused)


def same_origin(recorded: dict[str, Any] | None, here: dict[str, Any] | None) -> bool:
    """Whether a package here came from where the recorded one did (for VCS: the same commit)."""
    if not recorded or recorded.get("kind") != "vcs":
        return True  # an index or local install: its version says it
    return bool(here) and here.get("kind") == "vcs" and here.get("commit") == recorded.get("commit")


def _spec(name: str, version: str, origin: dict[str, Any] | None) -> tuple[str, bool]:
    """The install line for one package: a pinned version, or its VCS URL at the recorded commit."""
    if origin and origin.get("kind") == "vcs" and origin.get("commit"):
        return f"{name} @ {origin.get('vcs') or 'git'}+{origin['url']}@{origin['commit']}", True
    if origin and origin.get("kind") == "archive" and origin.get("url", "").startswith(("http://", "https://")):
        return f"{name} @ {origin['url']}", True
    return f"{name}=={version}", False


def _uv() -> str:
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found:
            return found
    raise EnvironmentBuildError("--env recorded builds environments with uv, which is not installed: "
                                "pip install uv (or pip install 'repro-track[env]')")


def _index_env(software: dict[str, Any]) -> dict[str, str]:
    """uv's index settings: its own when the user set any, else pip's as in effect here."""
    env = dict(os.environ)
    if any(k in env for k in ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX", "UV_EXTRA_INDEX_URL", "UV_FIND_LINKS")):
        return env
    from .capture.provenance import pip_index_settings

    pip = pip_index_settings()
    if pip["index_url"]:
        env["UV_INDEX_URL"] = pip["index_url"][0]
    if pip["extra_index_url"]:
        env["UV_EXTRA_INDEX_URL"] = " ".join(pip["extra_index_url"])
    if pip["find_links"]:
        env["UV_FIND_LINKS"] = ",".join(pip["find_links"])
    if pip.get("no_index"):
        env["UV_NO_INDEX"] = "1"
    return env


def build(env_plan: EnvPlan, software: dict[str, Any], progress: Callable[[str], None] = lambda _: None) -> Path:
    """Build the planned environment (or reuse the cached one); returns its interpreter."""
    if env_plan.refused:
        raise EnvironmentBuildError("the recorded environment needs packages this replay may not install:\n  "
                                    + "\n  ".join(env_plan.refused))
    if env_plan.cached:
        _touch(env_plan.path)
        progress(f"recorded environment: reusing {env_plan.path}")
        return env_plan.python
    staging = env_plan.path.with_name(f".{env_plan.key}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    progress(f"recorded environment: building {len(env_plan.install)} package(s) with uv into {env_plan.path}")
    try:
        layered_venv(staging)
        if env_plan.install:
            # No build isolation: a package built from its VCS commit uses the build tools installed
            # here (an isolated build would have to download them).
            _run([_uv(), "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--python",
                  str(staging / "bin" / "python"), *env_plan.install], _index_env(software))
        (staging / META).write_text(json.dumps({"install": env_plan.install, "built": time.time()}), "utf-8")
        os.replace(staging, env_plan.path)  # another replay may have finished the same one: both are whole
    except OSError:
        if not env_plan.cached:
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return env_plan.python


def layered_venv(path: Path) -> Path:
    """A new virtual environment (made by uv, with this interpreter) that sees this environment's
    packages after its own; returns its interpreter."""
    _run([_uv(), "venv", "--quiet", "--python", sys.executable, str(path)], dict(os.environ))
    _layer_over_this_environment(path)
    return path / "bin" / "python"


def _layer_over_this_environment(venv: Path) -> None:
    # A .pth line that starts with "import" runs at start-up: it adds this environment's site
    # directories (and their own .pth files, editable installs included) after the venv's own.
    [own] = list((venv / "lib").glob("python*/site-packages"))
    dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    (own / "_repro_track_base.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n", "utf-8")


def _run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        tail = " ".join(done.stderr.split())[-1500:]
        raise EnvironmentBuildError(f"uv could not build the recorded environment ({' '.join(command[1:3])}): {tail}")


def versions_in(python: Path) -> dict[str, str]:
    """The distribution versions the environment's interpreter sees (first on its path wins)."""
    code = ("import importlib.metadata as m, json, re; seen = {}\n"
            "for d in m.distributions():\n"
            "    n = re.sub(r'[-_.]+', '-', d.metadata['Name'] or '').lower()\n"
            "    seen.setdefault(n, d.version)\n"
            "print(json.dumps(seen))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise EnvironmentBuildError(f"the rebuilt environment at {python.parent.parent} does not start: "
                                    f"{done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def requirements_in(python: Path | str) -> str:
    """``name==version`` lines as a fresh interpreter sees them: what a replay child will import, not
    what this process's ``sys.path`` (which a library may have extended at import) shows."""
    versions = versions_in(Path(python))
    return "".join(f"{name}=={version}\n" for name, version in sorted(versions.items()) if name)


def _touch(path: Path) -> None:
    meta = path / META
    try:
        os.utime(meta)
    except OSError:
        pass


def prune(older_than_days: float, root: Path | None = None) -> tuple[list[Path], int]:
    """Remove cached environments not used for ``older_than_days``; returns them and the bytes freed."""
    root = root or cache_root()
    if not root.is_dir():
        return [], 0
    limit = time.time() - older_than_days * 86400
    removed, freed = [], 0
    for env in sorted(root.iterdir()):
        meta = env / META
        if env.name.startswith(".") or not meta.is_file() or meta.stat().st_mtime > limit:
            continue
        size = sum(f.stat().st_size for f in env.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(env, ignore_errors=True)
        removed.append(env)
        freed += size
    return removed, freed


def requirements_with_origins(requirements: str, software: dict[str, Any]) -> str:
    """The recorded environment as a requirements file, VCS and archive origins as direct references."""
    origins = (software.get("provenance") or {}).get("origins") or {}
    interpreter = (software.get("provenance") or {}).get("interpreter") or {}
    lines = [f"# recorded with Python {interpreter.get('version', '?')} ({interpreter.get('implementation', '?')}, "
             f"{interpreter.get('platform', '?')})"]
    for name, version in sorted(parse_requirements(requirements).items()):
        origin = origins.get(name)
        if origin and origin.get("kind") in ("editable", "directory"):
            lines.append(f"# {name}=={version} was installed from a local folder ({origin['url']})")
            continue
        lines.append(_spec(name, version, origin)[0])
    return "\n".join(lines) + "\n"


def package_differences(recorded: str, here: str, software: dict[str, Any] | None = None,
                        limit: int = 8) -> list[str]:
    """``name: recorded -> here`` for distributions whose version (or VCS commit) differs; repro-track
    itself left out."""
    from .capture import provenance

    was, now = parse_requirements(recorded), parse_requirements(here)
    origins = ((software or {}).get("provenance") or {}).get("origins") or {}
    here_origins = provenance.origins()
    changed = [f"{name} {was.get(name, 'absent')} recorded, {now.get(name, 'absent')} here"
               for name in sorted(set(was) | set(now)) if name not in SKIP and was.get(name) != now.get(name)]
    changed += [f"{name} at commit {origins[name]['commit'][:12]} recorded, "
                f"{(here_origins.get(name) or {}).get('commit', 'another origin')[:12]} here"
                for name in sorted(set(was) & set(now)) if name not in SKIP and was[name] == now[name]
                and not same_origin(origins.get(name), here_origins.get(name))]
    return changed[:limit] + ([f"and {len(changed) - limit} more"] if len(changed) > limit else [])
