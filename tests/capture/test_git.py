"""Tests for repro_track.capture.git: real repositories made with `git init` in tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_git

from repro_track.capture import git as git_capture

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git executable")

TOKEN = "glpat-S3cr3tT0kenValue9876"


def make_repo(path: Path, *, commit: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    run_git(path, "init", "-q")
    run_git(path, "config", "user.name", "Test User")
    run_git(path, "config", "user.email", "test@example.com")
    (path / "model.py").write_text("SEED = 1\n")
    (path / "sub").mkdir()
    (path / "sub" / "config.json").write_text('{"steps": 4}\n')
    if commit:
        run_git(path, "add", ".")
        run_git(path, "commit", "-q", "-m", "initial")
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_repo(tmp_path / "project")


class TestCleanRepository:
    """A committed, unchanged tree gives commit, branch and no diff."""

    def test_section(self, repo: Path) -> None:
        section, diff = git_capture.capture_git(repo)
        assert section == {
            "available": True,
            "reason": None,
            "root": None,
            "commit": run_git(repo, "rev-parse", "HEAD"),
            "branch": "main",
            "remote_url": None,
            "dirty": False,
            "untracked": [],
            "untracked_truncated": False,
            "diff_sha256": None,
            "diff_bytes": 0,
            "diff_truncated": False,
        }
        assert diff is None
        json.dumps(section)

    @pytest.mark.parametrize("start", ["sub", "sub/config.json", "."])
    def test_found_from_inside(self, repo: Path, start: str) -> None:
        section, _ = git_capture.capture_git(repo / start)
        assert section["commit"] == run_git(repo, "rev-parse", "HEAD")

    def test_detached_head_has_no_branch(self, repo: Path) -> None:
        run_git(repo, "checkout", "-q", "--detach")
        section, _ = git_capture.capture_git(repo)
        assert section["branch"] is None
        assert section["commit"] == run_git(repo, "rev-parse", "HEAD")

    def test_repo_root(self, repo: Path) -> None:
        root = git_capture.repo_root(repo / "sub" / "config.json")
        assert root is not None and root.resolve() == repo.resolve()


class TestDirtyTree:
    """Tracked changes set dirty and produce the diff; untracked files are listed."""

    def test_modified_file(self, repo: Path) -> None:
        (repo / "model.py").write_text("SEED = 2\n")
        section, diff = git_capture.capture_git(repo)
        expected = subprocess.run(["git", "diff", "HEAD"], cwd=repo, capture_output=True, check=True).stdout
        assert section["dirty"] is True
        assert diff is not None and "+SEED = 2" in diff
        assert diff.encode() == expected
        assert section["diff_sha256"] == hashlib.sha256(expected).hexdigest()
        assert section["diff_bytes"] == len(expected)
        assert section["diff_truncated"] is False

    def test_staged_change_is_dirty(self, repo: Path) -> None:
        (repo / "new.py").write_text("x = 1\n")
        run_git(repo, "add", "new.py")
        section, diff = git_capture.capture_git(repo)
        assert section["dirty"] is True and section["untracked"] == []
        assert diff is not None and "+x = 1" in diff

    def test_untracked_only_is_not_dirty(self, repo: Path) -> None:
        (repo / "notes.txt").write_text("hello\n")
        (repo / "sub" / "deeper").mkdir()
        (repo / "sub" / "deeper" / "b.txt").write_text("b\n")
        (repo / ".gitignore").write_text("*.log\n")
        (repo / "ignored.log").write_text("ignored\n")
        section, diff = git_capture.capture_git(repo)
        assert section["dirty"] is False
        assert section["untracked"] == [".gitignore", "notes.txt", "sub/deeper/b.txt"]
        assert diff is None

    def test_dirty_agrees_with_gitpython(self, repo: Path) -> None:
        import git

        (repo / "model.py").write_text("SEED = 3\n")
        with git.Repo(repo) as handle:
            assert git_capture.capture_git(repo)[0]["dirty"] is handle.is_dirty(untracked_files=False)

    def test_untracked_list_is_capped(self, repo: Path) -> None:
        extra = git_capture.MAX_UNTRACKED + 5
        for i in range(extra):
            (repo / f"u{i:04d}.txt").write_text("x\n")
        section, _ = git_capture.capture_git(repo)
        assert len(section["untracked"]) == git_capture.MAX_UNTRACKED
        assert section["untracked"] == sorted(f"u{i:04d}.txt" for i in range(extra))[: git_capture.MAX_UNTRACKED]
        assert section["untracked_truncated"] is True

    def test_a_renamed_files_old_name_is_not_read_as_an_entry(self, repo: Path) -> None:
        # -z puts a rename's original path in an entry of its own; one named like an untracked
        # record ("? ...") must not be listed as untracked.
        (repo / "? old.py").write_text("y = 1\n")
        run_git(repo, "add", "? old.py")
        run_git(repo, "commit", "-q", "-m", "odd name")
        run_git(repo, "mv", "? old.py", "renamed.py")
        section, diff = git_capture.capture_git(repo)
        assert section["dirty"] is True
        assert section["untracked"] == []
        assert diff is not None and "renamed.py" in diff

    def test_untracked_names_keep_their_characters_and_code_point_order(self, repo: Path) -> None:
        for name in ("zeta.txt", "é.txt", "a b.txt", "日本.txt", "Z.txt"):
            (repo / name).write_text("x\n")
        section, _ = git_capture.capture_git(repo)
        assert section["untracked"] == sorted(["zeta.txt", "é.txt", "a b.txt", "日本.txt", "Z.txt"])

    def test_large_diff_is_truncated_but_hashed_whole(self, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(git_capture, "MAX_DIFF_BYTES", 1000)
        (repo / "model.py").write_text("".join(f"line {i} é\n" for i in range(500)))
        section, diff = git_capture.capture_git(repo)
        full = subprocess.run(["git", "diff", "HEAD"], cwd=repo, capture_output=True, check=True).stdout
        assert section["diff_truncated"] is True
        assert section["diff_bytes"] == len(full) > 1000
        assert section["diff_sha256"] == hashlib.sha256(full).hexdigest()
        assert diff is not None and len(diff.encode()) <= 1000
        assert full.startswith(diff.encode())

    def test_user_diff_config_is_ignored(self, repo: Path) -> None:
        run_git(repo, "config", "diff.noprefix", "true")
        run_git(repo, "config", "color.ui", "always")
        (repo / "model.py").write_text("SEED = 4\n")
        _, diff = git_capture.capture_git(repo)
        assert diff is not None
        assert "--- a/model.py" in diff and "\x1b[" not in diff


class TestRemotes:
    """Remote URLs are recorded without credentials, and the token appears nowhere."""

    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            (f"https://user:{TOKEN}@gitlab.example.com/org/repo.git", "https://gitlab.example.com/org/repo.git"),
            (f"https://{TOKEN}@github.com/org/repo.git", "https://github.com/org/repo.git"),
            (f"https://gitlab.example.com/org/repo.git?private_token={TOKEN}", "https://gitlab.example.com/org/repo.git"),
            (f"http://oauth2:{TOKEN}@host:8080/r.git#frag", "http://host:8080/r.git"),
            ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
            ("ssh://git@github.com/org/repo.git", "ssh://git@github.com/org/repo.git"),
            (f"ssh://git:{TOKEN}@github.com/org/repo.git", "ssh://github.com/org/repo.git"),
            ("https://github.com/org/repo.git", "https://github.com/org/repo.git"),
        ],
    )
    def test_strip_credentials(self, url: str, expected: str) -> None:
        assert git_capture.strip_credentials(url) == expected

    def test_origin_with_token(self, repo: Path) -> None:
        run_git(repo, "remote", "add", "upstream", "https://example.com/upstream.git")
        run_git(repo, "remote", "add", "origin", f"https://user:{TOKEN}@example.com/org/repo.git?private_token={TOKEN}")
        (repo / "model.py").write_text("SEED = 5\n")
        section, diff = git_capture.capture_git(repo)
        assert section["remote_url"] == "https://example.com/org/repo.git"
        assert TOKEN not in json.dumps(section)
        assert diff is not None and TOKEN not in diff

    def test_first_remote_without_origin(self, repo: Path) -> None:
        run_git(repo, "remote", "add", "mirror", "git@example.com:org/repo.git")
        assert git_capture.capture_git(repo)[0]["remote_url"] == "git@example.com:org/repo.git"

    def test_remote_followed_when_the_config_changes(self, repo: Path) -> None:
        """The remote is read once per repository and kept, until the repository's config changes."""
        assert git_capture.capture_git(repo)[0]["remote_url"] is None
        run_git(repo, "remote", "add", "origin", "https://example.com/first.git")
        assert git_capture.capture_git(repo / "sub")[0]["remote_url"] == "https://example.com/first.git"
        assert git_capture.capture_git(repo / "sub")[0]["remote_url"] == "https://example.com/first.git"
        run_git(repo, "remote", "set-url", "origin", "https://example.com/second-home.git")
        assert git_capture.capture_git(repo / "sub")[0]["remote_url"] == "https://example.com/second-home.git"

    def test_local_path_remote_is_not_recorded(self, repo: Path, tmp_path: Path) -> None:
        run_git(repo, "remote", "add", "origin", str(tmp_path / "elsewhere.git"))
        section, _ = git_capture.capture_git(repo)
        assert section["remote_url"] is None
        assert str(tmp_path) not in json.dumps(section)


class TestWhereGitRuns:
    """git runs in the work tree's root, for the repository GitPython finds, whatever the caller's state."""

    def test_git_dir_of_the_caller_does_not_change_the_answer(self, repo: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
        """As in a hook run in a linked worktree, or a shell that exported GIT_DIR."""
        clean, _ = git_capture.capture_git(repo / "sub" / "config.json")
        monkeypatch.setenv("GIT_DIR", str(repo / ".git"))
        section, diff = git_capture.capture_git(repo / "sub" / "config.json")
        assert section == clean and section["dirty"] is False and diff is None
        monkeypatch.setenv("GIT_DIR", ".git")  # relative: to wherever git would run
        assert git_capture.capture_git(repo / "sub")[0] == clean
        # What a pre-commit hook of another repository, or a shell, may have set for git.
        monkeypatch.setenv("GIT_INDEX_FILE", str(repo / ".git" / "no-such-index"))
        monkeypatch.setenv("GIT_WORK_TREE", str(repo / "sub"))
        monkeypatch.setenv("GIT_CONFIG_PARAMETERS", "'status.showUntrackedFiles'='no'")
        assert git_capture.capture_git(repo / "sub")[0] == clean

    def test_diff_relative_config_does_not_narrow_the_diff(self, repo: Path) -> None:
        run_git(repo, "config", "diff.relative", "true")
        (repo / "model.py").write_text("SEED = 2\n")
        (repo / "sub" / "config.json").write_text('{"steps": 5}\n')
        _, diff = git_capture.capture_git(repo / "sub")
        assert diff is not None and "a/model.py" in diff and "a/sub/config.json" in diff

    def test_a_repository_made_inside_is_found(self, repo: Path) -> None:
        """What is kept per folder is dropped when git would now find another repository from there."""
        run_git(repo, "remote", "add", "origin", "https://example.com/outer.git")
        assert git_capture.capture_git(repo / "sub")[0]["remote_url"] == "https://example.com/outer.git"
        run_git(repo / "sub", "init", "-q")
        run_git(repo / "sub", "remote", "add", "origin", "https://example.com/inner.git")
        section, _ = git_capture.capture_git(repo / "sub")
        assert section["remote_url"] == "https://example.com/inner.git" and section["commit"] is None

    def test_relative_paths_follow_the_working_directory(self, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        first, second = make_repo(tmp_path / "first"), make_repo(tmp_path / "second")
        run_git(first, "remote", "add", "origin", "https://example.com/first.git")
        run_git(second, "remote", "add", "origin", "https://example.com/second.git")
        monkeypatch.chdir(first)
        assert git_capture.capture_git(".")[0]["remote_url"] == "https://example.com/first.git"
        monkeypatch.chdir(second)
        assert git_capture.capture_git(".")[0]["remote_url"] == "https://example.com/second.git"

    def test_a_symlinked_folder_is_looked_up_once(self, repo: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
        link = tmp_path / "link"
        link.symlink_to(repo)  # a checkout reached through a link (a home folder on another disk, say)
        opened = []
        open_repo = git_capture._open_repo
        monkeypatch.setattr(git_capture, "_open_repo", lambda *a: opened.append(a) or open_repo(*a))
        first = git_capture.capture_git(link / "sub")
        assert first[0]["available"] and git_capture.capture_git(link / "sub") == first
        assert len(opened) == 1

    def test_a_git_installed_later_is_found(self, repo: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        real = shutil.which("git")
        assert real is not None
        tools = tmp_path / "tools"
        tools.mkdir()
        monkeypatch.setenv("PATH", str(tools))
        assert git_capture.capture_git(repo)[0]["reason"] == "git executable not found on PATH"
        (tools / "git").symlink_to(real)
        assert git_capture.capture_git(repo)[0]["available"]

    def test_never_raises_on_a_path_that_cannot_be_looked_at(self, tmp_path: Path) -> None:
        section, diff = git_capture.capture_git(tmp_path / ("a" * 300))
        assert section["available"] is False and section["reason"] and diff is None

    def test_a_git_in_the_working_directory_is_never_run(self, repo: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        """Only absolute folders on PATH are searched (Windows would look in the current one first)."""
        planted = tmp_path / "planted"
        planted.mkdir()
        fake = planted / "git"
        fake.write_text("#!/bin/sh\ntouch ran\nexit 1\n")
        fake.chmod(0o755)
        monkeypatch.chdir(planted)
        real = shutil.which("git")
        assert real is not None
        monkeypatch.setenv("PATH", os.pathsep.join([".", "", str(Path(real).parent)]))
        section, _ = git_capture.capture_git(repo)
        assert section["available"] and not (planted / "ran").exists()
        monkeypatch.setenv("PATH", ".")
        section, _ = git_capture.capture_git(repo)
        assert section["reason"] == "git executable not found on PATH" and not (planted / "ran").exists()


class TestNotARepository:
    """Outside a repository, or with nothing committed, the section still explains itself."""

    def test_outside(self, tmp_path: Path) -> None:
        plain = tmp_path / "plain"
        plain.mkdir()
        section, diff = git_capture.capture_git(plain)
        assert section["available"] is False
        assert section["reason"] == "not inside a git repository"
        assert diff is None
        assert git_capture.repo_root(plain) is None

    def test_missing_path(self, tmp_path: Path) -> None:
        section, _ = git_capture.capture_git(tmp_path / "does-not-exist")
        assert section["available"] is False and section["reason"] == "path does not exist"

    def test_bare_repository(self, tmp_path: Path) -> None:
        bare = tmp_path / "bare.git"
        bare.mkdir()
        run_git(bare, "init", "-q", "--bare")
        section, diff = git_capture.capture_git(bare)
        assert section["available"] is False and diff is None
        assert section["reason"] == "repository has no working tree (bare)"

    def test_git_executable_missing(self, repo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        import git

        monkeypatch.setattr(git.Git, "GIT_PYTHON_GIT_EXECUTABLE", str(tmp_path / "no-git-here"))
        section, diff = git_capture.capture_git(repo)
        assert section["available"] is False and diff is None
        assert section["reason"] == "git could not read the repository (FileNotFoundError)"
        assert str(tmp_path) not in json.dumps(section)

    def test_no_commits_yet(self, tmp_path: Path) -> None:
        repo = make_repo(tmp_path / "fresh", commit=False)
        section, diff = git_capture.capture_git(repo)
        assert section["available"] is True
        assert section["commit"] is None
        assert section["branch"] == "main"
        assert section["dirty"] is False
        assert section["untracked"] == ["model.py", "sub/config.json"]
        assert diff is None

    def test_no_commits_with_staged_files(self, tmp_path: Path) -> None:
        repo = make_repo(tmp_path / "fresh", commit=False)
        run_git(repo, "add", "model.py")
        section, diff = git_capture.capture_git(repo)
        assert section["commit"] is None and section["dirty"] is True
        assert diff is not None and "+SEED = 1" in diff

    def test_gitpython_missing(self, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "git", None)
        section, diff = git_capture.capture_git(repo)
        assert section["available"] is False
        assert section["reason"] == "GitPython is not installed (pip install GitPython)"
        assert diff is None

    def test_git_failure_does_not_raise(self, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"git exploded in {repo}")

        monkeypatch.setattr(git_capture, "_parse_status", broken)
        section, diff = git_capture.capture_git(repo)
        assert section["available"] is False
        assert str(repo) not in section["reason"]
        assert diff is None


class TestDiffScrub:
    """Uncommitted lines that hold a credential are blanked in the diff; its digest stays the real one."""

    def test_secret_line_blanked(self, repo: Path):
        target = next(p for p in repo.iterdir() if p.suffix == ".py")
        planted = "hf_" + "Q7x2Lm9PzR4kT8vW1nY6bC3dF5gH0jKs"
        target.write_text(target.read_text() + f'HF_TOKEN = "{planted}"\nsteps = 50\n')
        section, diff = git_capture.capture_git(repo)
        assert planted not in diff
        assert "+<redacted: this line looks like it holds a credential>" in diff
        assert "+steps = 50" in diff
        real = subprocess.run(["git", "-C", str(repo), "diff", "HEAD"], capture_output=True).stdout
        assert section["diff_sha256"] == hashlib.sha256(real).hexdigest()
