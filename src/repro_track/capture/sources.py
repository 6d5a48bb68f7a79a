"""The project's own source files a call had imported, by digest, and whether git tracks them.

A helper module edited after recording changes the result as much as the decorated function does,
so the recorder lists every module in ``sys.modules`` whose file lies inside the project root (but
not in an installed environment such as a ``.venv`` inside the project, nor repro-track itself).
Digests are cached by mtime and size, and git's list of tracked files by the index file's mtime
and size, so that a call in a loop costs one scan of ``sys.modules`` and a few ``stat`` calls.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

MAX_FILES = 10000
_INSTALLED_PARTS = frozenset({"site-packages", "dist-packages"})


@functools.lru_cache(maxsize=4096)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """sha256 of a file's bytes (cached by mtime and size), or None when it cannot be read."""
    try:
        stat = os.stat(path)
        return _digest(str(path), stat.st_mtime_ns, stat.st_size)
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return None


def _environment_roots() -> tuple[str, ...]:
    # The interpreter's environments, and repro-track itself (its version is recorded on its own,
    # and a project that vendors or develops it should not see every edit of it as a code change).
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                str(Path(__file__).resolve().parents[1]), str(Path(__file__).parents[1])}
    return tuple({os.path.join(f(p), "") for p in prefixes if p
                  for f in (os.path.abspath, os.path.realpath)})


def _module_files(root: str, prefixes: tuple[str, ...]) -> tuple[str, ...]:
    """Real paths of loaded modules' files under root (a real path ending with a separator).

    Scanning thousands of modules costs milliseconds, so the result is kept until sys.modules
    changes (its size or its latest entry: imports only add at the end).
    """
    last = next(reversed(sys.modules), None)
    return _scan(root, prefixes, len(sys.modules), last)


@functools.lru_cache(maxsize=8)
def _scan(root: str, prefixes: tuple[str, ...], count: int, last: str | None) -> tuple[str, ...]:
    return tuple(_walk_modules(root, prefixes))


def _walk_modules(root: str, prefixes: tuple[str, ...]) -> Iterable[str]:
    installed = _environment_roots()
    for module in list(sys.modules.values()):
        # Through __dict__: lazy modules (transformers, diffusers) make getattr slow.
        namespace = getattr(module, "__dict__", None)
        name = namespace.get("__file__") if isinstance(namespace, dict) else None
        if not isinstance(name, str) or not name.endswith(".py"):
            continue
        # Cheap string tests first; only candidates pay for realpath (symlinks, "..").
        if not name.startswith(prefixes) or name.startswith(installed) or "-packages" in name:
            continue
        real = os.path.realpath(name)
        if not real.startswith(root) or real.startswith(installed):
            continue
        if _INSTALLED_PARTS.intersection(Path(real).parts):
            continue
        yield real


def imported_files(root: Path, tracked: frozenset[str] | None) -> list[dict[str, Any]]:
    """``[{path, sha256, tracked}]`` for the project files loaded in this process, sorted by path.

    ``root`` is the project root (the git work tree); ``tracked`` the set of paths git tracks
    (relative, posix), or None outside git, where every file is recorded as untracked.
    """
    base = os.path.join(os.path.realpath(root), "")
    files = {}
    for real in _module_files(base, (base, os.path.join(os.path.abspath(root), ""))):
        relative = Path(real[len(base):]).as_posix()
        digest = file_sha256(real)
        if digest is not None and relative not in files:
            files[relative] = {"path": relative, "sha256": digest,
                               "tracked": tracked is not None and relative in tracked}
        if len(files) >= MAX_FILES:
            break
    return [files[k] for k in sorted(files)]


def tracked_files(root: Path) -> frozenset[str] | None:
    """The paths git tracks in the work tree at root (cached on the index file), or None outside git."""
    index = Path(root) / ".git" / "index"
    try:
        if (Path(root) / ".git").is_file():  # a linked worktree: .git is a file naming the real dir
            index = Path(_git_dir(str(root))) / "index"
        stat = index.stat()
    except (OSError, ValueError):
        stat = None
    try:
        return _ls_files(str(root), stat.st_mtime_ns if stat else 0, stat.st_size if stat else 0)
    except Exception as exc:  # no git, no GitPython, not a repository: every file counts as untracked
        log.debug("git ls-files failed in %s: %r", root, exc)
        return None


def _git_dir(root: str) -> str:
    text = (Path(root) / ".git").read_text("utf-8").strip()
    if not text.startswith("gitdir:"):
        raise ValueError(f"{root}/.git is not a gitdir link")
    return os.path.join(root, text[len("gitdir:"):].strip())


@functools.lru_cache(maxsize=16)
def _ls_files(root: str, index_mtime_ns: int, index_size: int) -> frozenset[str]:
    import git

    with git.Repo(root) as repo:
        out = repo.git.ls_files("-z", stdout_as_string=False, strip_newline_in_stdout=False)
    return frozenset(p.decode("utf-8", errors="replace") for p in out.split(b"\0") if p)
