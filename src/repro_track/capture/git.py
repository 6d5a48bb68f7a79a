"""Source-code provenance from git: commit, branch, remote, dirty state and the diff.

All state comes from one ``git status --porcelain=v2`` process, plus ``git diff HEAD`` only
when tracked files changed, so a clean tree costs a single subprocess and little Python beside the
generation it runs with (the recorder starts it at call entry, in a thread). The remote URL is read
once per repository through GitPython and kept until the repository's config file changes. Nothing recorded names a place on this machine: the
working-tree root is never stored, remotes that are local paths are dropped, and credentials are
stripped from remote URLs.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import logging
import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

_NOT_INSTALLED = "GitPython is not installed (pip install GitPython)"
_NOT_A_REPO = "not inside a git repository"

MAX_DIFF_BYTES = 1024 * 1024
MAX_UNTRACKED = 200

# Schemes where a bare user name is an account, not a secret (ssh://git@host/...).
_USER_NAME_SCHEMES = frozenset({"ssh", "git+ssh", "ssh+git"})
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")

_STATUS = ("status", "--porcelain=v2", "--branch", "-z", "--untracked-files=all")

GitState = tuple[dict[str, Any], "str | None"]


def capture_git(path: str | os.PathLike[str]) -> GitState:
    """Describe the git working tree containing ``path``.

    Returns ``(section, diff_text)`` where ``diff_text`` is ``git diff HEAD`` (capped at
    1 MiB) or None when there are no tracked changes. Never raises: when git cannot be
    read, the section has ``available`` False and a ``reason``.
    """
    where = Path(path)
    if where.is_file():
        where = where.parent
    try:
        executable = _executable()
    except _Unavailable as exc:
        return _section(False, str(exc)), None
    try:
        raw = _run_git(executable, where, *_STATUS)
    except Exception as exc:  # git refused (not a repository, ...), or could not be run at all
        log.debug("git status failed in %r: %r", where, exc)
        return _refused(where, exc), None
    try:
        return _from_status(executable, where, _parse_status(raw), _remote_for(where))
    except Exception as exc:
        log.debug("git capture failed: %r", exc)
        return _section(False, _failure_reason(exc)), None


class _Unavailable(Exception):
    """git cannot be run at all (GitPython missing or unable to find the executable)."""


def _executable() -> str:
    """The git executable GitPython uses (``GIT_PYTHON_GIT_EXECUTABLE``, else ``git`` on PATH)."""
    try:
        import git
    except ImportError as exc:
        log.debug("GitPython import failed: %r", exc)
        raise _Unavailable(_NOT_INSTALLED) from None
    except Exception as exc:
        # GitPython raises at import time when no git executable can be found.
        log.debug("GitPython could not start: %r", exc)
        raise _Unavailable(f"GitPython could not start: git executable not usable ({type(exc).__name__})") from None
    return _resolved(git.Git.GIT_PYTHON_GIT_EXECUTABLE or "git", os.environ.get("PATH", os.defpath))


@functools.lru_cache(maxsize=8)
def _resolved(name: str, search_path: str) -> str:
    """The executable's full path, looked up once per PATH: spawning a bare name tries every folder
    on PATH in turn (a failed exec for each), on every call."""
    import shutil

    return shutil.which(name, path=search_path) or name


def _refused(where: Path, error: BaseException) -> dict[str, Any]:
    """Why git gave no state for ``where``: no such folder, not a repository, bare, or git's refusal."""
    stderr = getattr(error, "stderr", "") or ""
    if "dubious ownership" in (stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr):
        return _section(False, _failure_reason(error))
    try:
        import git

        repo = _open_repo(git, where)
    except Exception as exc:
        log.debug("no repository for %r: %r", where, exc)
        if not where.exists():
            return _section(False, "path does not exist")
        return _section(False, _NOT_A_REPO)
    with repo:
        if repo.bare or repo.working_tree_dir is None:
            return _section(False, "repository has no working tree (bare)")
    return _section(False, _failure_reason(error))


def _run_git(executable: str, where: Path, *args: str) -> bytes:
    """git's output; raises GitPython's GitCommandError (with git's message) when git fails.

    Only stdout is read while git runs (one blocking read, no Python beside the user's work); the
    message of a failure comes from running the command again, which costs only on that rare path.
    """
    import git

    # No optional locks: refreshing the index's stat info would take the lock that the user's own
    # git commands, running at the same time, may need.
    command = [executable, "--no-optional-locks", "-C", str(where), *args]
    done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, check=False)
    if done.returncode == 0:
        return done.stdout
    again = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    raise git.GitCommandError(command, done.returncode, again.stderr)


# The remote URL of each repository, read through GitPython (remotes, includes and all) once and kept
# until its config file changes: {where: (config file, its (inode, mtime, size), url)}.
_REMOTES: dict[str, tuple[Path, tuple[int, int, int] | None, str | None]] = {}
_REMOTES_LOCK = threading.Lock()


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    # git rewrites its config through a lock file and a rename: a new inode for every change, which
    # a change within the file system's timestamp granularity, of the same size, cannot hide.
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _remote_for(where: Path) -> str | None:
    """The recorded remote URL of the repository at ``where`` (None without a usable remote)."""
    known = _REMOTES.get(str(where))
    if known is not None and known[1] is not None and _stat_key(known[0]) == known[1]:
        return known[2]
    import git

    with _REMOTES_LOCK, _open_repo(git, where) as repo:
        config = Path(repo.common_dir) / "config"
        key = _stat_key(config)  # before reading: a change while reading is seen next time
        url = _remote_url(repo)
        _REMOTES[str(where)] = (config, key, url)
    return url


def repo_root(path: str | os.PathLike[str]) -> Path | None:
    """The working-tree root of the repository containing ``path``, or None."""
    try:
        import git

        with _open_repo(git, path) as repo:
            return None if repo.working_tree_dir is None else Path(repo.working_tree_dir)
    except Exception as exc:
        log.debug("no repository root for %r: %r", path, exc)
        return None


def strip_credentials(url: str) -> str:
    """Remove user info that may carry secrets, the query string and the fragment.

    ``https://user:token@host/x.git?private_token=t`` -> ``https://host/x.git``. For ssh
    URLs a user name without a password is kept (it is the login, e.g. ``git``).
    scp-like ``git@host:org/repo.git`` and local paths are returned unchanged.
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        # Unparseable (e.g. a bad IPv6 literal): keep only what precedes user info/query.
        scheme, _, rest = url.partition("://")
        rest = rest.rsplit("@", 1)[-1]
        return f"{scheme}://{re.split(r'[?#]', rest, maxsplit=1)[0]}"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        keep_user = parts.scheme.lower() in _USER_NAME_SCHEMES and not has_password and user
        netloc = f"{user}@{host}" if keep_user else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _open_repo(git: Any, path: str | os.PathLike[str]) -> Any:
    target = Path(path)
    if target.is_file():
        target = target.parent
    return git.Repo(target, search_parent_directories=True)


def _section(available: bool, reason: str | None, **facts: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "available": available,
        "reason": reason,
        "root": None,
        "commit": None,
        "branch": None,
        "remote_url": None,
        "dirty": None,
        "untracked": [],
        "untracked_truncated": False,
        "diff_sha256": None,
        "diff_bytes": 0,
        "diff_truncated": False,
    }
    section.update(facts)
    return section


def _from_status(executable: str, where: Path, status: dict[str, Any], remote_url: str | None) -> GitState:
    untracked = sorted(status["untracked"])
    diff_text: str | None = None
    diff_facts: dict[str, Any] = {}
    if status["tracked_changes"]:
        raw_diff = _diff_against_head(executable, where, status["commit"])
        if raw_diff:
            diff_text, diff_facts = _diff_facts(raw_diff)

    from .. import scrub

    # Branch and file names are the user's strings too (a branch named after a ticket can quote a token).
    section = _section(
        True,
        None,
        commit=status["commit"],
        branch=scrub.blank(status["branch"]) if status["branch"] else None,
        remote_url=remote_url,
        dirty=status["tracked_changes"],
        untracked=[scrub.blank(path) for path in untracked[:MAX_UNTRACKED]],
        untracked_truncated=len(untracked) > MAX_UNTRACKED,
        **diff_facts,
    )
    return section, diff_text


def _parse_status(raw: bytes) -> dict[str, Any]:
    """Commit, branch, tracked-change flag and untracked paths from porcelain v2 -z."""
    commit: str | None = None
    branch: str | None = None
    tracked_changes = False
    untracked: list[str] = []
    entries = raw.split(b"\0")
    skip_next = False
    for entry in entries:
        if skip_next:
            # A rename/copy record ("2 ...") is followed by its original path.
            skip_next = False
            continue
        if not entry:
            continue
        line = entry.decode("utf-8", errors="replace")
        if line.startswith("# branch.oid "):
            oid = line[len("# branch.oid "):]
            commit = None if oid == "(initial)" else oid
        elif line.startswith("# branch.head "):
            head = line[len("# branch.head "):]
            branch = None if head == "(detached)" else head
        elif line.startswith("? "):
            untracked.append(line[2:])
        elif line[:2] in ("1 ", "2 ", "u "):
            tracked_changes = True
            skip_next = line.startswith("2 ")
    return {"commit": commit, "branch": branch, "tracked_changes": tracked_changes, "untracked": untracked}


def _diff_against_head(executable: str, where: Path, commit: str | None) -> bytes:
    # Before the first commit there is no HEAD; the empty tree stands in for it so staged
    # files still show up, as they would in `git diff HEAD` after an initial commit.
    # Computed rather than hard-coded: SHA-256 repositories have a different empty tree.
    base = commit or _run_git(executable, where, "hash-object", "-t", "tree", "--stdin").decode().strip()
    # Pin options that user config could change, so the diff is a plain applicable patch.
    return _run_git(executable, where, "diff", base, "--no-color", "--no-ext-diff", "--no-textconv",
                    "--src-prefix=a/", "--dst-prefix=b/")


def _diff_facts(raw: bytes) -> tuple[str, dict[str, Any]]:
    truncated = len(raw) > MAX_DIFF_BYTES
    kept = raw[:MAX_DIFF_BYTES] if truncated else raw
    # An incremental decoder holds back a multi-byte character cut in half by the cap
    # instead of turning it into a replacement character.
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(kept, final=not truncated)
    return _scrub(text), {
        "diff_sha256": hashlib.sha256(raw).hexdigest(),
        "diff_bytes": len(raw),
        "diff_truncated": truncated,
    }


def _scrub(diff: str) -> str:
    """Blank out diff lines that look like they hold a credential (the digest covers the real diff).

    Every line is checked, headers and hunk lines included: a file name or a hunk's function context
    can carry a token as well as a changed line can.
    """
    from .. import scrub

    lines = diff.split("\n")
    for i, line in enumerate(lines):
        if scrub.holds_secret(line):
            keep = line[:1] if line[:1] in "+- " and not line.startswith(("+++", "---")) else ""
            lines[i] = keep + "<redacted: this line looks like it holds a credential>"
    return "\n".join(lines)


def _remote_url(repo: Any) -> str | None:
    try:
        remotes = list(repo.remotes)
        if not remotes:
            return None
        chosen = next((r for r in remotes if r.name == "origin"), remotes[0])
        url = str(chosen.config_reader.get("url"))
    except Exception as exc:
        log.debug("no remote URL: %r", exc)
        return None
    if _is_local_path(url):
        # A path on this machine identifies the machine, not the code.
        return None
    from .. import scrub

    # User info and query go first; a token elsewhere in the URL (a path segment) is blanked.
    return scrub.blank(strip_credentials(url))


def _is_local_path(url: str) -> bool:
    return (
        url.startswith(("/", "~", "\\\\", "file:"))
        or bool(_WINDOWS_DRIVE.match(url))
        or ("://" not in url and ":" not in url)
    )


def _failure_reason(exc: BaseException) -> str:
    stderr = getattr(exc, "stderr", "") or ""
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", errors="replace")
    if "dubious ownership" in stderr:
        return "git refused the repository: dubious ownership (see git config safe.directory)"
    # stderr can quote absolute paths, so only the exception type goes into the manifest.
    return f"git could not read the repository ({type(exc).__name__})"
