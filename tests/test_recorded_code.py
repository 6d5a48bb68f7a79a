"""Tests for replaying the recorded code: code identity, temporary git worktrees, the recorded diff.

A small project in a real git repository is recorded by fresh interpreters at several points of its
history (clean, with an uncommitted edit, with an edit holding a credential-looking line), then the
decorated function and its helper are edited and committed. Replays run in fresh interpreters.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (run_git, RecordedProject, clone_run, recording_env, run_cli, run_script, stored_artifact,
                      write_project)

import repro_track
from repro_track import runs, signing, store, tags
from repro_track.capture import sources
from repro_track.replay import replay
from repro_track.recorder import recorder_of
from repro_track.replay.code import CURRENT, RECORDED, SAME, plan_code

HELPERS_PY = '''
    """Helpers the recorded function calls; an edit here changes the result as much as one in proj."""
    try:
        import local_cfg  # an untracked file some users keep next to their code
        FACTOR = local_cfg.FACTOR
    except ImportError:
        FACTOR = 2.0


    def scale(x):
        return x * FACTOR
'''

PROJ_PY = '''
    import torch

    import helpers
    import repro_track


    @repro_track.record(experiment="recorded-code")
    def make(n: int, *, generator=None):
        return helpers.scale(torch.randn(n, n, generator=generator))
'''

RECORD_PY = '''
    """Record one call of proj.make and print its run id."""
    import torch

    import proj
    import repro_track

    proj.make(4, generator=torch.Generator("cpu").manual_seed(11))
    outcome = repro_track.last_recording(proj.make)
    print(outcome.wait(120) if hasattr(outcome, "wait") else outcome.run_id)
'''

SECRET_LINE = 'API_TOKEN = "ghp_' + "Zq8xR2vT9wLk3mN7pB4cY6dF1gH5jS0aE2uI"[:36] + '"\n'


@repro_track.record
def draw(n: int):
    """A recorded function of this test module, captured in-process (nothing logged)."""
    import torch

    return torch.zeros(n)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text("utf-8")
    assert text.count(old) == 1
    path.write_text(text.replace(old, new), "utf-8")


@dataclass(frozen=True)
class History:
    """The project's repository, its store, and the runs recorded along its history."""

    repo: Path
    uri: str
    spool: Path
    runs: dict[str, str]

    def record(self, cwd: Path, **env: str) -> str:
        done = run_script(self.repo / "record.py", env=recording_env(self.uri, self.spool, **env), cwd=cwd)
        assert done.returncode == 0, done.stderr
        run_id = done.stdout.strip().splitlines()[-1]
        assert run_id != "None", f"the recording was spooled, not logged:\n{done.stderr}"
        return run_id

    def project(self) -> RecordedProject:
        return RecordedProject(self.repo, self.uri, self.runs)


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> History:
    """clean @C1, dirty (helper x3, uncommitted) @C1, signed (the same, signed with keys/private),
    secret (a credential line in the diff) @C1, c2 @C2 (make adds 1); then C3 edits the helper
    (adds 0.25). HEAD is C3, clean."""
    root = tmp_path_factory.mktemp("recorded-code")
    repo = write_project(root / "repo", {"helpers.py": HELPERS_PY, "proj.py": PROJ_PY,
                                         "record.py": RECORD_PY})
    (repo / ".gitignore").write_text("__pycache__/\nlocal_cfg.py\n", "utf-8")
    run_git(repo, "init", "-q", "-b", "main")
    run_git(repo, "add", ".")
    run_git(repo, "commit", "-q", "-m", "C1")
    h = History(repo, f"sqlite:///{root / 'mlflow.db'}", root / "spool", {})
    h.runs["clean"] = h.record(root)
    edit(repo / "helpers.py", "x * FACTOR", "x * FACTOR * 3.0")
    h.runs["dirty"] = h.record(root)
    private, _ = signing.keygen(root / "keys")
    h.runs["signed"] = h.record(root, REPRO_TRACK_SIGNING_KEY=str(private))
    (repo / "helpers.py").write_text((repo / "helpers.py").read_text("utf-8") + SECRET_LINE, "utf-8")
    h.runs["secret"] = h.record(root)
    run_git(repo, "checkout", "-q", "--", "helpers.py")
    edit(repo / "proj.py", "generator=generator))", "generator=generator)) + 1.0")
    run_git(repo, "commit", "-q", "-am", "C2: make adds 1")
    h.runs["c2"] = h.record(root)
    edit(repo / "helpers.py", "return x * FACTOR", "return x * FACTOR + 0.25")
    run_git(repo, "commit", "-q", "-am", "C3: the helper adds 0.25")
    hook = repo / ".git" / "hooks" / "post-checkout"
    hook.write_text(f"#!/bin/sh\ntouch '{root / 'hook-ran'}'\n", "utf-8")
    hook.chmod(0o755)
    return h


def manifest_of(h: History, run_id: str, tmp_path: Path) -> dict:
    return runs.load_run(store.client_for(h.uri), run_id, tmp_path / run_id).manifest.to_dict()


def do_replay(h: History, case: str, **kwargs):
    run_id = h.runs[case] if case in h.runs else case
    return replay(run_id, tracking_uri=h.uri, project_dir=h.repo, log=False, **kwargs)


class TestCodeIdentity:
    """The manifest's code section lists the project files the call imported, tracked or not."""

    def test_recorded_files(self, history, tmp_path):
        code = manifest_of(history, history.runs["clean"], tmp_path)["code"]
        files = {f["path"]: f for f in code["files"]}
        assert set(files) == {"helpers.py", "proj.py", "record.py"}
        assert all(f["tracked"] for f in files.values())
        assert files["helpers.py"]["sha256"] == hashlib.sha256(helpers_at_first_commit(history)).hexdigest()
        assert (code["module_file"], code["diff_sha256"]) == ("proj.py", None)
        assert code["commit"] == run_git(history.repo, "rev-list", "--max-parents=0", "HEAD").strip()

    def test_dirty_run_records_the_diff_digest(self, history, tmp_path):
        m = manifest_of(history, history.runs["dirty"], tmp_path)
        assert m["code"]["diff_sha256"] == m["git"]["diff_sha256"] is not None


def helpers_at_first_commit(h: History) -> bytes:
    first = run_git(h.repo, "rev-list", "--max-parents=0", "HEAD").strip()
    return subprocess.run(["git", "show", f"{first}:helpers.py"], cwd=h.repo, capture_output=True,
                          check=True).stdout


class TestImportedFiles:
    """imported_files lists loaded project modules by digest, never installed packages inside the root."""

    def test_lists_project_modules_only(self, tmp_path, monkeypatch):
        root = write_project(tmp_path / "p", {"tracked_mod.py": "X = 1\n", "untracked_mod.py": "Y = 2\n",
                                              ".venv/lib/site-packages/installed_mod.py": "Z = 3\n"})
        run_git(root, "init", "-q")
        run_git(root, "add", "tracked_mod.py")
        run_git(root, "commit", "-q", "-m", "x")
        monkeypatch.syspath_prepend(str(root / ".venv/lib/site-packages"))
        monkeypatch.syspath_prepend(str(root))
        for name in ("tracked_mod", "untracked_mod", "installed_mod"):
            monkeypatch.delitem(sys.modules, name, raising=False)
            __import__(name)
        files = sources.imported_files(root, sources.tracked_files(root))
        assert [(f["path"], f["tracked"]) for f in files] == [("tracked_mod.py", True),
                                                             ("untracked_mod.py", False)]
        (root / "untracked_mod.py").write_text("Y = 3  # edited\n", "utf-8")
        again = sources.imported_files(root, sources.tracked_files(root))
        assert again[1]["sha256"] == hashlib.sha256(b"Y = 3  # edited\n").hexdigest() != files[1]["sha256"]

    def test_a_failed_listing_keeps_the_recording(self, monkeypatch):
        def broken(root, tracked):
            raise RuntimeError("cannot list")

        monkeypatch.setattr(sources, "imported_files", broken)
        _, error, recording = recorder_of(draw).capture((3,), {})
        assert error is None and recording is not None
        code = recording.manifest.code
        assert code["files"] == [] and code["module_sha256"] == sources.file_sha256(__file__)

    def test_skips_repro_track_and_the_venv(self):
        repo = Path(__file__).resolve().parents[1]
        paths = [f["path"] for f in sources.imported_files(repo, None)]
        assert not [p for p in paths if p.startswith(("src/repro_track/", ".venv/"))]

    def test_outside_git_every_file_is_untracked(self, tmp_path, monkeypatch):
        root = write_project(tmp_path / "p", {"plain_mod.py": "X = 1\n"})
        assert sources.tracked_files(root) is None
        monkeypatch.syspath_prepend(str(root))
        monkeypatch.delitem(sys.modules, "plain_mod", raising=False)
        __import__("plain_mod")
        files = sources.imported_files(root, None)
        assert [(f["path"], f["tracked"]) for f in files] == [("plain_mod.py", False)]


@pytest.mark.slow
class TestRecordedCode:
    """Edited and committed after recording: replay runs the recorded commit; --current-code the edit."""

    def test_recorded_commit_replays_exact(self, history):
        report = do_replay(history, "clean")
        assert (report.expected, report.observed, report.ok) == ("exact", "exact", True)
        rebuilt = [r for r in report.reasons if "runs the recorded commit" in r]
        assert len(rebuilt) == 1 and "proj.py changed" in rebuilt[0] and "helpers.py changed" in rebuilt[0]
        assert run_git(history.repo, "worktree", "list", "--porcelain").count("worktree ") == 1
        assert not (history.repo.parent / "hook-ran").exists()  # the user's git hooks stay unrun

    def test_current_code_runs_the_edit(self, history):
        report = do_replay(history, "clean", current_code=True)
        assert (report.expected, report.observed) == ("close", "different")
        changed = [r for r in report.reasons if "code changed since recording" in r]
        assert len(changed) == 1 and "proj.py changed" in changed[0] and "--current-code" in changed[0]
        assert any("function make changed" in r for r in report.reasons)

    def test_cli_current_code(self, history, tmp_path):
        done = run_cli("replay", history.runs["c2"], "--tracking-uri", history.uri, "--project-dir",
                       str(history.repo), "--dry-run", "--current-code", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "expected   close" in done.stdout
        assert "helpers.py changed); --current-code runs today's code" in done.stdout

    def test_helper_edit_is_named(self, history):
        report = do_replay(history, "c2", current_code=True, dry_run=True)
        assert report.expected == "close"
        changed = [r for r in report.reasons if "code changed since recording" in r]
        assert len(changed) == 1 and "helpers.py changed" in changed[0] and "proj.py" not in changed[0]
        assert not any("function make changed" in r for r in report.reasons)

    def test_unchanged_code_runs_in_place(self, history, tmp_path):
        m = manifest_of(history, history.runs["c2"], tmp_path)
        m["code"]["files"] = [f for f in m["code"]["files"] if f["path"] != "helpers.py"]
        m["code"]["commit"] = run_git(history.repo, "rev-parse", "HEAD").strip()
        assert plan_code(m, history.repo, None).mode == SAME


@pytest.mark.slow
class TestRecordedDiff:
    """The recorded uncommitted diff comes from the store: applied only when trusted or asked for."""

    def test_untrusted_diff_is_a_reason_and_shown(self, history):
        report = do_replay(history, "dirty", dry_run=True)
        assert report.expected == "close"
        assert any("does not apply" in r and "--apply-recorded-diff" in r for r in report.reasons)
        assert "  | +    return x * FACTOR * 3.0" in report.plan

    def test_applied_on_request_replays_exact(self, history):
        report = do_replay(history, "dirty", apply_recorded_diff=True)
        assert (report.expected, report.observed) == ("exact", "exact")
        assert any("with the recorded uncommitted diff" in r for r in report.reasons)
        assert run_git(history.repo, "worktree", "list", "--porcelain").count("worktree ") == 1

    def test_trusted_hook_applies_it(self, history):
        report = do_replay(history, "dirty", diff_trusted=True, dry_run=True)
        assert report.expected == "exact"
        assert any("recorded uncommitted diff (sha256" in line and "applied" in line for line in report.plan)
        assert run_git(history.repo, "worktree", "list", "--porcelain").count("worktree ") == 1

    @pytest.mark.parametrize("trusted, expected", [pytest.param(True, "exact", id="trusted-signer"),
                                                   pytest.param(False, "close", id="unknown-signer")])
    def test_signed_run(self, history, monkeypatch, tmp_path, trusted, expected):
        _, other = signing.keygen(tmp_path / "other")
        monkeypatch.setenv("REPRO_TRACK_TRUSTED_KEYS",
                           str(history.repo.parent / "keys" / signing.PUBLIC_KEY_FILE if trusted else other))
        report = do_replay(history, "signed", dry_run=True)
        assert report.expected == expected
        applied = [line for line in report.plan if "recorded uncommitted diff (sha256" in line]
        assert bool(applied) is trusted
        assert any("not signed by a trusted key" in r for r in report.reasons) is not trusted

    def test_scrubbed_diff_cannot_be_rebuilt(self, history):
        assert "<redacted" in stored_artifact(history.project(), history.runs["secret"],
                                              f"repro/{tags.GIT_DIFF_FILE}").read_text("utf-8")
        report = do_replay(history, "secret", apply_recorded_diff=True, dry_run=True)
        assert report.expected == "close"
        assert any("sha256 differs from the manifest's" in r for r in report.reasons)

    def test_cli_flag_after_dry_run(self, history, tmp_path):
        args = ("replay", history.runs["dirty"], "--tracking-uri", history.uri, "--project-dir",
                str(history.repo), "--dry-run", "--json")
        shown = run_cli(*args, cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert any("+    return x * FACTOR * 3.0" in line for line in json.loads(shown.stdout)["plan"])
        applied = run_cli(*args, "--apply-recorded-diff", cwd=tmp_path)
        report = json.loads(applied.stdout)
        assert report["expected"] == "exact"
        assert not any("+    return" in line for line in report["plan"])


def attacker_diff(h: History, tmp_path: Path, diff: bytes) -> str:
    """A copy of the dirty run whose git.diff an attacker replaced, both digests recomputed."""
    sha = hashlib.sha256(diff).hexdigest()

    def swap(m: dict) -> None:
        m["code"]["diff_sha256"] = m["git"]["diff_sha256"] = sha

    run_id = clone_run(h.project(), h.runs["dirty"], tmp_path, swap)
    stored_artifact(h.project(), run_id, f"repro/{tags.GIT_DIFF_FILE}").write_bytes(diff)
    return run_id


ESCAPING_DIFF = b"""diff --git a/../escaped.py b/../escaped.py
new file mode 100644
--- /dev/null
+++ b/../escaped.py
@@ -0,0 +1 @@
+print("outside")
"""

STALE_DIFF = b"""diff --git a/helpers.py b/helpers.py
--- a/helpers.py
+++ b/helpers.py
@@ -1,1 +1,1 @@
-this line is not in the file
+neither is this one
"""


@pytest.mark.slow
class TestCannotRebuild:
    """When the recorded code cannot be rebuilt, the prediction says so before anything runs."""

    @pytest.mark.parametrize("diff", [pytest.param(STALE_DIFF, id="stale"),
                                      pytest.param(ESCAPING_DIFF, id="path-outside-the-worktree")])
    def test_diff_that_does_not_apply(self, history, tmp_path, diff):
        run_id = attacker_diff(history, tmp_path, diff)
        report = do_replay(history, run_id, apply_recorded_diff=True, dry_run=True)
        assert report.expected == "close"
        assert any("does not apply to commit" in r for r in report.reasons)
        assert not (history.repo.parent / "escaped.py").exists()
        assert not list(history.repo.parent.rglob("escaped.py"))

    def test_commit_not_in_this_clone(self, history, tmp_path):
        def elsewhere(m: dict) -> None:
            m["code"]["commit"] = m["git"]["commit"] = "0123456789abcdef0123456789abcdef01234567"

        run_id = clone_run(history.project(), history.runs["clean"], tmp_path, elsewhere)
        report = do_replay(history, run_id, dry_run=True)
        assert report.expected == "close"
        assert any("recorded code cannot be rebuilt: commit 0123456789ab is not in this clone" in r
                   for r in report.reasons)

    def test_project_outside_git(self, history, tmp_path):
        m = manifest_of(history, history.runs["clean"], tmp_path)
        plain = write_project(tmp_path / "plain", {"proj.py": PROJ_PY, "helpers.py": HELPERS_PY})
        plan = plan_code(m, plain, None)
        assert plan.mode == CURRENT and "not usable as a git repository" in plan.why


@pytest.mark.slow
def test_untracked_file_is_named(history, tmp_path):
    """An untracked module the call imported is recorded by digest and named when it differs."""
    clone = tmp_path / "clone"
    run_git(tmp_path, "clone", "-q", str(history.repo), str(clone))
    (clone / "local_cfg.py").write_text("FACTOR = 2.0\n", "utf-8")
    h = History(clone, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "spool", {})
    run_id = h.record(tmp_path)
    files = {f["path"]: f["tracked"] for f in manifest_of(h, run_id, tmp_path)["code"]["files"]}
    assert files == {"helpers.py": True, "proj.py": True, "record.py": True, "local_cfg.py": False}
    (clone / "local_cfg.py").write_text("FACTOR = 5.0\n", "utf-8")
    run_git(clone, "commit", "-q", "--allow-empty", "-m", "later")
    report = replay(run_id, tracking_uri=h.uri, project_dir=clone, log=False, dry_run=True)
    assert report.expected == "close"
    assert any("untracked source files changed since recording (local_cfg.py)" in r for r in report.reasons)
    assert plan_code(manifest_of(h, run_id, tmp_path / "again"), clone, None).mode == RECORDED
