"""Replay the code as it was: compare the project's code identity, then rebuild the recorded code.

Plan first (``plan_code``: what differs between the recording and today's project, and whether the
recorded code can be rebuilt), build second (``build_worktree``: a temporary git worktree at the
recorded commit, through GitPython), clean up last (``remove_worktree``).

The commit comes from the user's own clone, so it is code they already trust. The recorded
uncommitted diff comes from the tracking store, which anyone with write access could have edited,
so it is applied only when the caller says it is trusted (a signed run) or the user asked for it
explicitly after ``--dry-run`` showed it; otherwise the difference is named as a reason.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import NotReplayableError

log = logging.getLogger(__name__)

SAME, RECORDED, CURRENT = "same", "recorded", "current"
_DIFF_PREVIEW_LINES = 400


@dataclass(frozen=True)
class CodePlan:
    """Which code the replay runs, what differs from the recording, and why.

    ``mode`` is ``same`` (today's code is the recorded code), ``recorded`` (a worktree at the
    recorded commit, the diff applied when ``apply_diff``) or ``current`` (today's code: asked for
    with ``--current-code``, or the recorded code cannot be rebuilt, see ``why``).
    """

    mode: str
    changes: tuple[str, ...] = ()
    commit: str | None = None
    why: str | None = None
    apply_diff: bool = False
    diff_problem: str | None = None
    diff_file: str | None = None
    diff_sha256: str | None = None
    untracked: tuple[str, ...] = ()
    untracked_changed: tuple[str, ...] = ()
    diff_preview: tuple[str, ...] = field(default=(), repr=False)

    def facts(self) -> dict[str, Any]:
        """The plain dict the prediction rules read (``Here.code``)."""
        return {"mode": self.mode, "changes": list(self.changes), "commit": self.commit,
                "why": self.why, "apply_diff": self.apply_diff, "diff_problem": self.diff_problem,
                "diff_sha256": self.diff_sha256, "untracked_changed": list(self.untracked_changed)}

    def describe(self) -> list[str]:
        """Plan lines for ``--dry-run``; an unapplied recorded diff is shown in full for review."""
        if self.mode == SAME:
            return ["code: the project's code is the recorded code"]
        if self.mode == CURRENT:
            return [f"code: today's project code ({self.why})"]
        lines = [f"code: the recorded commit {self.commit[:12]} in a temporary git worktree, removed after"]
        if self.apply_diff:
            lines.append(f"code: the recorded uncommitted diff (sha256 {self.diff_sha256[:12]}) applied")
        elif self.diff_problem:
            lines.append(f"code: the recorded uncommitted diff is not applied: {self.diff_problem}")
        lines += [f"code: untracked file {p} copied from the project" for p in self.untracked]
        if self.diff_preview:
            lines.append("recorded diff (repro/git.diff), what --apply-recorded-diff would apply:")
            lines += [f"  | {line}" for line in self.diff_preview]
        return lines


def _safe_relative(path: str) -> bool:
    """A plain project-relative path: no way out of the project, no drive, no control characters (a NUL
    byte from a crafted manifest would otherwise reach the operating system)."""
    if not path.isprintable():
        return False
    parts = PurePosixPath(path).parts
    return bool(parts) and not PurePosixPath(path).is_absolute() and ".." not in parts and ":" not in path


def code_changes(code: dict[str, Any], project_dir: Path, git: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(what differs between the recorded code identity and project_dir now, untracked files among them)."""
    from ..capture.sources import file_sha256

    changes, untracked = [], []
    if code.get("commit") and git.get("commit") != code["commit"]:
        changes.append(f"commit {code['commit'][:12]} recorded, {(git.get('commit') or 'none')[:12]} now")
    if code.get("commit") and git.get("diff_sha256") != code.get("diff_sha256"):
        recorded = (code.get("diff_sha256") or "none")[:12]
        changes.append(f"uncommitted changes: diff {recorded} recorded, "
                       f"{(git.get('diff_sha256') or 'none')[:12]} now")
    seen = set()
    module = code.get("module_file")
    if module and code.get("module_sha256") and _safe_relative(module):
        seen.add(module)
        if file_sha256(project_dir / module) != code["module_sha256"]:
            changes.append(f"{module} changed")
    for entry in code.get("files") or []:
        path = entry["path"]
        if path in seen or not _safe_relative(path):
            continue
        now = file_sha256(project_dir / path)
        if now != entry["sha256"]:
            label = "untracked " if code.get("commit") and not entry["tracked"] else ""
            changes.append(f"{label}{path} {'changed' if now else 'is missing'}")
            if code.get("commit") and not entry["tracked"]:
                untracked.append(path)
    return changes, untracked


def plan_code(m: dict[str, Any], project_dir: Path, diff_file: Path | None, *, current_code: bool = False,
              apply_recorded_diff: bool = False, diff_trusted: bool = False) -> CodePlan:
    """Compare the recording's code identity with project_dir and decide which code the replay runs.

    ``diff_trusted`` is the hook for signed runs: the caller passes True when the run's signature was
    verified against a trusted key. ``apply_recorded_diff`` is the user's explicit consent.
    """
    from ..capture.git import capture_git

    code = m.get("code") or {}
    git, _ = capture_git(project_dir)
    changes, untracked_changed = code_changes(code, project_dir, git)
    untracked = tuple(f["path"] for f in code.get("files") or []
                      if not f["tracked"] and _safe_relative(f["path"]))
    base = dict(changes=tuple(changes), commit=code.get("commit"), diff_sha256=code.get("diff_sha256"),
                untracked_changed=tuple(untracked_changed))
    if not changes:
        return CodePlan(SAME, **base)
    if current_code:
        return CodePlan(CURRENT, why="--current-code runs today's code", **base)
    problem = _commit_problem(code.get("commit"), project_dir, git)
    if problem:
        return CodePlan(CURRENT, why=f"the recorded code cannot be rebuilt: {problem}", **base)
    plan = CodePlan(RECORDED, untracked=untracked, **base)
    if not code.get("diff_sha256"):
        return plan
    return _with_diff(plan, diff_file, apply_recorded_diff or diff_trusted)


def _commit_problem(commit: str | None, project_dir: Path, git: dict[str, Any]) -> str | None:
    if not commit:
        return "the run was recorded outside a git repository (no commit in the manifest)"
    if not git.get("available"):
        return f"the project dir is not usable as a git repository ({git.get('reason')})"
    try:
        with _open(project_dir) as repo:
            repo.git.cat_file("-e", f"{commit}^{{commit}}")
    except Exception:
        return (f"commit {commit[:12]} is not in this clone (git fetch it, or pass --current-code to "
                "run today's code)")
    return None


def _with_diff(plan: CodePlan, diff_file: Path | None, consent: bool) -> CodePlan:
    if diff_file is None or not diff_file.is_file():
        return replace(plan, diff_problem="the run holds no repro/git.diff artifact")
    raw = diff_file.read_bytes()
    if hashlib.sha256(raw).hexdigest() != plan.diff_sha256:
        return replace(plan, diff_problem=(
            "the stored repro/git.diff is not the recorded diff (its sha256 differs from the manifest's: "
            "lines that looked like credentials were blanked, or it was cut at 1 MiB), so the "
            "uncommitted changes cannot be rebuilt"))
    if consent:
        return replace(plan, apply_diff=True, diff_file=str(diff_file))
    lines = raw.decode("utf-8", errors="replace").splitlines()
    preview = lines[:_DIFF_PREVIEW_LINES] + ([f"... {len(lines) - _DIFF_PREVIEW_LINES} more lines"]
                                             if len(lines) > _DIFF_PREVIEW_LINES else [])
    return replace(plan, diff_file=str(diff_file), diff_preview=tuple(preview), diff_problem=(
        "it comes from the tracking store and the run is not signed by a trusted key; review it "
        "with --dry-run and pass --apply-recorded-diff to apply it"))


def _open(path: Path) -> Any:
    import git

    return git.Repo(path, search_parent_directories=True)


def build_worktree(plan: CodePlan, project_dir: Path, dest: Path) -> tuple[CodePlan, Path]:
    """Check out the recorded commit at dest (applying the diff when planned); (plan, project dir there).

    A diff that does not apply leaves the commit alone and is named in the returned plan. Raises
    NotReplayableError when git cannot make the worktree at all.
    """
    project_dir = project_dir.resolve()
    try:
        with _open(project_dir) as repo:
            top = Path(repo.working_tree_dir).resolve()
            # Hooks off: a post-checkout hook is for the user's own checkouts, not this temporary one.
            repo.git(c="core.hooksPath=/dev/null").worktree("add", "--detach", "--quiet", str(dest),
                                                            plan.commit)
    except Exception as exc:
        raise NotReplayableError(f"git could not check out commit {plan.commit[:12]} in a temporary "
                                 f"worktree ({type(exc).__name__}: {_stderr(exc)}); pass --current-code "
                                 "to run today's code") from None
    inside = dest / project_dir.relative_to(top)
    if plan.apply_diff:
        plan = _apply(plan, dest)
    for relative in plan.untracked:
        source, target = project_dir / relative, inside / relative
        if source.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return plan, inside


def _apply(plan: CodePlan, worktree: Path) -> CodePlan:
    try:
        with _open(worktree) as repo:
            repo.git.apply("--whitespace=nowarn", "--", str(plan.diff_file))
    except Exception as exc:
        return replace(plan, apply_diff=False, diff_problem=(
            f"it does not apply to commit {plan.commit[:12]} ({_stderr(exc)})"))
    return plan


def remove_worktree(project_dir: Path, dest: Path) -> None:
    """Remove the temporary worktree and git's record of it; never raises."""
    try:
        with _open(project_dir) as repo:
            repo.git.worktree("remove", "--force", str(dest))
    except Exception as exc:
        log.debug("git worktree remove failed: %r", exc)
        shutil.rmtree(dest, ignore_errors=True)
        try:
            with _open(project_dir) as repo:
                repo.git.worktree("prune")
        except Exception as exc2:
            log.debug("git worktree prune failed: %r", exc2)


def _stderr(exc: BaseException) -> str:
    text = getattr(exc, "stderr", "") or ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__
