"""Source-code provenance from git: commit, branch, remote, dirty state and the diff.

All state comes from one ``git status --porcelain=v2`` process, run in the work tree's root, plus
``git diff HEAD`` only when tracked files changed, so a clean tree costs a single subprocess and little
Python beside the generation it runs with (the recorder starts it in a thread, 5 ms into the call or
once a quicker call has been staged). The
repository is found through GitPython, and its remote URL read, once per folder; both are kept while
git would find the same repository from there with the same config. Nothing recorded names a place on
this machine: the working-tree root is never stored, remotes that are local paths are dropped, and
credentials are stripped from remote URLs.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
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
    try:
        executable = _executable()
        repo = _repository(path)
    except _Unavailable as exc:
        return _section(False, str(exc)), None
    except Exception as exc:  # an unreadable path (too long, no permission): git cannot look there either
        log.debug("no repository for %r: %r", path, exc)
        return _section(False, _NOT_A_REPO), None
    try:
        raw = _run_git(executable, repo, *_STATUS)
        return _from_status(executable, repo, _parse_status(raw))
    except Exception as exc:  # git refused (dubious ownership, a broken index, ...) or could not run
        log.debug("git capture failed: %r", exc)
        return _section(False, _failure_reason(exc)), None


class _Unavailable(Exception):
    """No git state to be had here, and why (GitPython or git missing, not a repository, bare)."""


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
    found = _resolved(git.Git.GIT_PYTHON_GIT_EXECUTABLE or "git", os.environ.get("PATH", os.defpath))
    if found is None:
        raise _Unavailable("git executable not found on PATH")
    return found


def _resolved(name: str, search_path: str) -> str | None:
    """The executable's full path, looked up once per PATH (spawning a bare name tries every folder on
    PATH in turn, a failed exec for each, on every call). Only absolute folders are searched: never
    the current folder, where Windows would look first and an untrusted checkout could hold a git.
    A git not found is looked for again next time (it may be installed meanwhile)."""
    if os.path.dirname(name):
        return name  # a path of its own (GIT_PYTHON_GIT_EXECUTABLE): used as given
    found = _FOUND.get((name, search_path))
    if found is not None:
        return found
    suffixes = [""]
    if sys.platform == "win32" and not os.path.splitext(name)[1]:
        suffixes = os.environ.get("PATHEXT", ".COM;.EXE;.BAT;.CMD").lower().split(";")
    for folder in search_path.split(os.pathsep):
        if not os.path.isabs(folder):
            continue
        for suffix in suffixes:
            candidate = os.path.join(folder, name + suffix)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                _FOUND[(name, search_path)] = candidate
                return candidate
    return None


_FOUND: dict[tuple[str, str], str] = {}

# What git reads from the environment about the repository itself (`git rev-parse --local-env-vars`).
# A git hook sets some (GIT_DIR, GIT_INDEX_FILE, ...) for its own repository; a recording made under
# one must describe the repository GitPython found, so git runs without them and finds it from its root.
_LOCAL_ENV = frozenset({
    "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_CONFIG", "GIT_CONFIG_PARAMETERS", "GIT_CONFIG_COUNT",
    "GIT_OBJECT_DIRECTORY", "GIT_DIR", "GIT_WORK_TREE", "GIT_IMPLICIT_WORK_TREE", "GIT_GRAFT_FILE",
    "GIT_INDEX_FILE", "GIT_NO_REPLACE_OBJECTS", "GIT_REPLACE_REF_BASE", "GIT_PREFIX", "GIT_SHALLOW_FILE",
    "GIT_COMMON_DIR",
})

# A git that hangs (a network file system, a huge tree) is given up on, as the recording gives up on it.
GIT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class _Repository:
    """A work tree as GitPython found it from some folder, with what is read once per repository."""

    root: str  # the work tree, where git runs (as GitPython ran it)
    common_dir: str
    remote_url: str | None
    config_key: tuple[int, int, int] | None  # the config file when the remote was read
    between: tuple[str, ...] | None  # the folders from the one asked about up to root, root excluded

    def current(self) -> bool:
        """Whether git would still find this repository, with this config, from the same folder."""
        # git rewrites its config through a lock file and a rename, so a change shows as a new inode.
        if self.between is None or _stat_key(os.path.join(self.common_dir, "config")) != self.config_key:
            return False
        # git looks for .git upwards: one made since below the root (git init in a sub-folder) wins.
        return os.path.lexists(os.path.join(self.root, ".git")) and not any(
            os.path.lexists(os.path.join(folder, ".git")) for folder in self.between)


_REPOSITORIES: dict[str, _Repository] = {}


def _repository(path: str | os.PathLike[str]) -> _Repository:
    """The repository containing ``path``, found through GitPython once and kept while current."""
    where = os.path.abspath(path)  # a relative path is relative to this working directory, not a key
    if os.path.isfile(where):
        where = os.path.dirname(where)
    known = _REPOSITORIES.get(where)
    if known is not None and known.current():
        return known
    import git

    try:
        repo = _open_repo(git, where)
    except Exception as exc:
        log.debug("no repository for %r: %r", where, exc)
        raise _Unavailable("path does not exist" if not os.path.exists(where) else _NOT_A_REPO) from None
    with repo:
        if repo.bare or repo.working_tree_dir is None:
            raise _Unavailable("repository has no working tree (bare)")
        root, common = os.fspath(repo.working_tree_dir), os.fspath(repo.common_dir)
        key = _stat_key(os.path.join(common, "config"))  # before reading: a change meanwhile shows next time
        found = _Repository(root, common, _remote_url(repo), key,
                            _folders_between(os.path.realpath(where), os.path.realpath(root)))
    _REPOSITORIES[where] = found
    return found


def _folders_between(folder: str, root: str) -> tuple[str, ...] | None:
    """The folders from ``folder`` up to ``root`` (excluded); None when root is not above it."""
    found = []
    while folder != root:
        found.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent
    return tuple(found)


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _run_git(executable: str, repo: _Repository, *args: str) -> bytes:
    """git's output, run in the work tree's root; GitPython's GitCommandError when git fails.

    Only stdout is read while git runs (one blocking read, no Python beside the user's work); the
    message of a failure comes from running the command again in the C locale (its wording is
    matched), which costs only on that rare path.
    """
    import git

    # No optional locks: refreshing the index's stat info would take the lock that the user's own
    # git commands, running at the same time, may need.
    command = [executable, "--no-optional-locks", *args]
    env = None
    if not _LOCAL_ENV.isdisjoint(os.environ):
        env = {name: value for name, value in os.environ.items() if name not in _LOCAL_ENV}
    flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # Windows: no console window flashing up
    done = subprocess.run(command, cwd=repo.root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, check=False, creationflags=flags, timeout=GIT_TIMEOUT_S)
    if done.returncode == 0:
        return done.stdout
    again = subprocess.run(command, cwd=repo.root, env={**(env or os.environ), "LC_ALL": "C", "LANGUAGE": "C"},
                           stdin=subprocess.DEVNULL, capture_output=True, check=False, creationflags=flags,
                           timeout=GIT_TIMEOUT_S)
    raise git.GitCommandError(command, done.returncode, again.stderr)


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


def _from_status(executable: str, repo: _Repository, status: dict[str, Any]) -> GitState:
    # Sorted as bytes (UTF-8 keeps code point order); only the paths kept are decoded.
    untracked = sorted(status["untracked"])
    diff_text: str | None = None
    diff_facts: dict[str, Any] = {}
    if status["tracked_changes"]:
        raw_diff = _diff_against_head(executable, repo, status["commit"])
        if raw_diff:
            diff_text, diff_facts = _diff_facts(raw_diff)

    from .. import scrub

    # Branch and file names are the user's strings too (a branch named after a ticket can quote a token).
    section = _section(
        True,
        None,
        commit=status["commit"],
        branch=scrub.blank(status["branch"]) if status["branch"] else None,
        remote_url=repo.remote_url,
        dirty=status["tracked_changes"],
        untracked=[scrub.blank(_text(path)) for path in untracked[:MAX_UNTRACKED]],
        untracked_truncated=len(untracked) > MAX_UNTRACKED,
        **diff_facts,
    )
    return section, diff_text


def _parse_status(raw: bytes) -> dict[str, Any]:
    """Commit, branch, tracked-change flag and untracked paths (bytes) from porcelain v2 -z.

    A tree with thousands of untracked files (an output folder, MLflow's ./mlruns) gives as many
    entries: each is only sliced and compared here, in the thread that competes with the caller's."""
    commit: str | None = None
    branch: str | None = None
    tracked_changes = False
    untracked: list[bytes] = []
    entries = iter(raw.split(b"\0"))
    for entry in entries:
        kind = entry[:2]
        if kind == b"? ":
            untracked.append(entry[2:])
        elif kind in (b"1 ", b"2 ", b"u "):
            tracked_changes = True
            if kind == b"2 ":  # a rename/copy record is followed by its original path
                next(entries, None)
        elif entry.startswith(b"# branch.oid "):
            oid = _text(entry[len(b"# branch.oid "):])
            commit = None if oid == "(initial)" else oid
        elif entry.startswith(b"# branch.head "):
            head = _text(entry[len(b"# branch.head "):])
            branch = None if head == "(detached)" else head
    return {"commit": commit, "branch": branch, "tracked_changes": tracked_changes, "untracked": untracked}


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _diff_against_head(executable: str, repo: _Repository, commit: str | None) -> bytes:
    # Before the first commit there is no HEAD; the empty tree stands in for it so staged
    # files still show up, as they would in `git diff HEAD` after an initial commit.
    # Computed rather than hard-coded: SHA-256 repositories have a different empty tree.
    base = commit or _run_git(executable, repo, "hash-object", "-t", "tree", "--stdin").decode().strip()
    # Pin options that user config could change, so the diff is a plain applicable patch.
    return _run_git(executable, repo, "diff", base, "--no-color", "--no-ext-diff", "--no-textconv",
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
