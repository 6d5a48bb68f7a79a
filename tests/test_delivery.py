"""Delivery: claimed spool entries, exactly-once sync, background uploads, flush and the exit handler."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

import repro_track
from repro_track import spool, store, tags

from conftest import free_port, run_cli, run_script

# A `repro-track` CLI whose uploads are slowed (and announced in a marker file) just before the
# artifacts go up: the run then exists, RUNNING, for SLOW seconds, so other processes overlap it.
SLOW_CLI = '''
import os, sys, time
from pathlib import Path
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

_log_artifacts = LocalArtifactRepository.log_artifacts


def slow(self, local_dir, artifact_path=None):
    run_id = Path(self.artifact_dir).parent.name  # <experiment>/<run id>/artifacts
    with open(os.environ["MARKER"], "a") as marker:
        marker.write(run_id + "\\n")
    time.sleep(float(os.environ["SLOW"]))
    return _log_artifacts(self, local_dir, artifact_path)


LocalArtifactRepository.log_artifacts = slow
from repro_track.cli import main

sys.exit(main(sys.argv[1:]))
'''

# A sitecustomize for the processes a test starts (the recording script and its uploader process):
# with SLOW set, every upload of a run's artifacts to a local store waits SLOW seconds first.
SLOW_SITE = '''
import os, time

if os.environ.get("SLOW"):
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    _log_artifacts = LocalArtifactRepository.log_artifacts

    def slow(self, local_dir, artifact_path=None):
        time.sleep(float(os.environ["SLOW"]))
        return _log_artifacts(self, local_dir, artifact_path)

    LocalArtifactRepository.log_artifacts = slow
'''

# Records `count` calls with background delivery, then acts: "kill" (SIGKILL right after the last
# call returns), "exit" (a normal exit) or "flush" (then prints how many uploads the uploader process
# did). With WAIT_UPLOADER set, the calls after the first wait until the uploader process is ready.
RECORDER = '''
import os, signal, sys, time
import numpy as np
import repro_track
from repro_track import delivery


@repro_track.record(experiment="bg")
def make(index):
    return np.full(4, index, dtype=np.float32)


count, action = int(sys.argv[1]), sys.argv[2]
for i in range(count):
    make(i)
    print(repro_track.last_recording(make).recording_id, flush=True)
    if i == 0 and os.environ.get("WAIT_UPLOADER"):
        deadline = time.monotonic() + 120
        while not (delivery._worker_now._uploader and delivery._worker_now._uploader.ready()):
            assert time.monotonic() < deadline, "the uploader process never became ready"
            time.sleep(0.05)
if action == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if action == "flush":
    print("flushed", repro_track.flush(120), flush=True)
    uploader = delivery._worker_now._uploader
    print("uploader", uploader.served if uploader else 0, flush=True)
'''


def delivery_sync() -> Any:
    from repro_track import delivery

    return delivery.sync()


def _runs(uri: str, experiment: str) -> list[Any]:
    client = store.client_for(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], max_results=1000)


def _env(uri: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "REPRO_TRACK_SPOOL_DIR": str(tmp_path / "spool"),
            **extra}


def _recorder_env(uri: str, tmp_path: Path, uploader: str, slow: str, **extra: str) -> dict[str, str]:
    """The recording script's environment: uploads slowed by ``slow`` seconds in the script and in its
    uploader process, delivered by ``uploader`` (process or thread)."""
    site = tmp_path / "slow-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SLOW_SITE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return _env(uri, tmp_path, SLOW=slow, PYTHONPATH=path, REPRO_TRACK_UPLOADER=uploader,
                **({"WAIT_UPLOADER": "1"} if uploader == "process" else {}), **extra)


@pytest.fixture(params=["process", "thread"])
def uploader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Background uploads in the uploader process (waited for until ready) or in a thread."""
    from repro_track import delivery

    monkeypatch.setenv("REPRO_TRACK_UPLOADER", request.param)
    if request.param == "process":
        ready_uploader(delivery)
    return request.param


def ready_uploader(delivery: Any) -> Any:
    """This process's uploader process, started (by a throwaway recording if need be) and ready."""
    import numpy as np

    if delivery._worker_now is None or delivery._worker_now._uploader is None:
        @repro_track.record(experiment="warm-up", tracking_uri="sqlite:///warm-up.db")
        def warm_up() -> Any:
            return np.zeros(1)

        warm_up()
        assert repro_track.flush(120)
    deadline = time.monotonic() + 120
    while not delivery._worker_now._uploader.ready():
        assert time.monotonic() < deadline, "the uploader process never became ready"
        time.sleep(0.05)
    return delivery._worker_now._uploader


@pytest.fixture
def spooled(migrated_store: str) -> list[str]:
    """20 real recordings waiting in the spool (their server was down); their recording ids."""
    import numpy as np

    @repro_track.record(experiment="sync", tracking_uri=f"http://127.0.0.1:{free_port()}")
    def make(index: int) -> Any:
        return np.full(3, index, dtype=np.float32)

    ids = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", repro_track.RecordingWarning)
        for i in range(20):
            make(i)
            ids.append(repro_track.last_recording(make).recording_id)
        assert repro_track.flush(120)
    assert sorted(e.recording_id for e in spool.pending()) == sorted(ids)
    return ids


def _check_exactly_once(uri: str, ids: list[str], experiment: str = "sync") -> list[Any]:
    runs = _runs(uri, experiment)
    assert sorted(r.data.tags[tags.SPOOL_ID] for r in runs) == sorted(ids)  # each once, none missing
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(int(r.data.params["arg.index"]) for r in runs) == list(range(len(ids)))
    return runs


class TestClaim:
    """A spool entry is uploaded only by the process that holds its claim."""

    def test_claim_is_exclusive_until_released(self, spooled: list[str]) -> None:
        listed = next(spool.pending())
        first = spool.claim(listed)
        assert first is not None and spool.claim(listed) is None
        assert listed.recording_id not in [e.recording_id for e in spool.pending()]
        spool.release(first, "test")
        again = spool.claim(listed)
        assert again is not None and again.meta["last_error"] == "test"
        spool.release(again, "test")

    def test_claim_held_by_another_process_is_skipped(self, spooled: list[str], migrated_store: str,
                                                      tmp_path: Path) -> None:
        path = next(spool.pending()).path
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; from filelock import FileLock; "
             "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(600)",
             str(path / spool.CLAIM_FILE)], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            done = run_cli("sync", "--json", "--tracking-uri", migrated_store, env=_env(migrated_store, tmp_path))
            report = json.loads(done.stdout)
            assert done.returncode == 0 and len(report["uploaded"]) == 19 and report["failed"] == []
            assert path.is_dir()
        finally:
            holder.send_signal(signal.SIGKILL)  # the kernel drops its claim
            holder.wait()
        done = run_cli("sync", "--json", "--tracking-uri", migrated_store, env=_env(migrated_store, tmp_path))
        assert len(json.loads(done.stdout)["uploaded"]) == 1
        _check_exactly_once(migrated_store, spooled)


class TestSpoolFormat:
    """An entry is staged in few files (a call waits for each); older entries still upload."""

    def test_a_call_stages_its_arrays_and_one_meta_file(self, spooled: list[str]) -> None:
        for entry in spool.pending():
            assert sorted(os.listdir(entry.path)) == [spool.CLAIM_FILE, spool.META_FILE, tags.OUTPUTS_FILE]
            assert entry.meta["format"] == spool.FORMAT
            assert tags.MANIFEST_PATH in entry.texts and set(entry.texts) <= spool.TEXT_PATHS
            m = json.loads(entry.texts[tags.MANIFEST_PATH])
            assert m["manifest_digest"] == entry.meta["manifest_digest"]

    def test_entries_in_the_older_layout_upload_the_same_files(self, spooled: list[str], migrated_store: str,
                                                               tmp_path: Path) -> None:
        older = []
        for listed in list(spool.pending())[:5]:  # rewritten as staged before format 2: artifacts/ as uploaded
            entry = spool.claim(listed)
            os.replace(spool.prepare_upload(entry), entry.path / "artifacts")
            (entry.path / tags.OUTPUTS_FILE).unlink()
            meta = {k: v for k, v in entry.meta.items() if k not in ("format", "files")}
            (entry.path / spool.META_FILE).write_text(json.dumps(meta), "utf-8")
            spool.release(dataclasses.replace(entry, meta=meta), "rewritten")
            older.append(entry.recording_id)
        done = run_cli("sync", "--json", "--tracking-uri", migrated_store, env=_env(migrated_store, tmp_path))
        assert done.returncode == 0 and len(json.loads(done.stdout)["uploaded"]) == 20, done.stderr
        runs = _check_exactly_once(migrated_store, spooled)
        client = store.client_for(migrated_store)

        def files(run: Any) -> list[str]:
            return sorted(f.path for f in client.list_artifacts(run.info.run_id, tags.ARTIFACT_DIR))

        by_age = {r.data.tags[tags.SPOOL_ID] in older: files(r) for r in runs}
        assert by_age[True] == by_age[False]
        assert {tags.MANIFEST_PATH, tags.OUTPUTS_PATH, f"{tags.ARTIFACT_DIR}/{tags.REQUIREMENTS_FILE}"} <= set(by_age[True])
        assert list(spool.pending()) == []

    def test_meta_naming_a_file_outside_the_run_is_refused(self, spooled: list[str], migrated_store: str) -> None:
        entry = spool.claim(next(spool.pending()))
        outside = entry.path.parent / "planted.txt"
        entry.meta["files"]["../../planted.txt"] = "not a recording's file"
        spool.release(entry, "edited")  # writes the edited meta
        from repro_track import delivery

        report = delivery.sync(tracking_uri=migrated_store)
        assert [f["recording_id"] for f in report.failed] == [entry.recording_id]
        assert "does not list a recording's files" in report.failed[0]["error"]
        assert not outside.exists() and not (entry.path / spool.UPLOAD_DIR).exists()
        assert len(report.uploaded) == 19

    def test_a_tree_left_by_an_interrupted_upload_is_built_again(self, spooled: list[str],
                                                                 migrated_store: str) -> None:
        from repro_track import delivery

        entry = spool.claim(next(spool.pending()))
        stray = spool.prepare_upload(entry) / tags.ARTIFACT_DIR / "stray.txt"
        stray.write_text("left by a killed upload")
        entry.claim.release()  # killed: the claim goes, the tree stays
        report = delivery.sync(tracking_uri=migrated_store)
        assert report.failed == [] and len(report.uploaded) == 20
        run_id = next(u["run_id"] for u in report.uploaded if u["recording_id"] == entry.recording_id)
        listed = [f.path for f in store.client_for(migrated_store).list_artifacts(run_id, tags.ARTIFACT_DIR)]
        assert tags.MANIFEST_PATH in listed and f"{tags.ARTIFACT_DIR}/stray.txt" not in listed

    def test_an_entry_of_a_newer_format_is_left_alone(self, spooled: list[str], migrated_store: str) -> None:
        from repro_track import delivery

        entry = spool.claim(next(spool.pending()))
        entry.meta["format"] = spool.FORMAT + 1
        spool.release(entry, "from the future")
        report = delivery.sync(tracking_uri=migrated_store)
        assert [f["recording_id"] for f in report.failed] == [entry.recording_id]
        assert "newer repro-track" in report.failed[0]["error"] and entry.path.is_dir()

    def test_a_completion_that_cannot_be_signed_is_kept_unsigned(
            self, spooled: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from repro_track.manifest import Manifest
        from repro_track.records import Recording

        entry = spool.claim(next(spool.pending()))
        staged = json.loads(entry.texts[tags.MANIFEST_PATH])
        later = Recording(Manifest.from_dict(staged), [], [], "late==1.0\n", "diff --git a/x b/x\n")
        monkeypatch.setenv("REPRO_TRACK_SIGNING_KEY", str(tmp_path / "no-such-key"))
        with pytest.raises(Exception, match="no-such-key"):
            spool.complete(entry, later)
        on_disk = json.loads((entry.path / spool.META_FILE).read_text("utf-8"))
        assert on_disk == entry.meta  # what is uploaded from memory or from disk is the same
        assert entry.texts[f"{tags.ARTIFACT_DIR}/{tags.GIT_DIFF_FILE}"] == "diff --git a/x b/x\n"
        assert tags.SIGNATURE_PATH not in entry.texts
        spool.release(entry, "unsigned")


class TestAdoption:
    """An upload interrupted midway is found by its recording id, adopted and finished; none is deleted."""

    def test_running_run_is_adopted(self, spooled: list[str], migrated_store: str, tmp_path: Path) -> None:
        client = store.client_for(migrated_store)
        entry = spool.claim(next(spool.pending()))
        experiment_id = store.ensure_experiment(client, "sync")
        partial = client.create_run(experiment_id, tags={tags.SPOOL_ID: entry.recording_id}).info.run_id
        assert store.upload(client, entry) == partial
        spool.delivered(entry)
        assert client.get_run(partial).info.status == "FINISHED"
        assert store.find_recording(client, experiment_id, entry.recording_id).info.run_id == partial

    def test_finished_run_is_not_uploaded_again(self, spooled: list[str], migrated_store: str) -> None:
        client = store.client_for(migrated_store)
        entry = spool.claim(next(spool.pending()))
        first = store.upload(client, entry)  # then the process "dies" before removing the entry
        spool.release(entry, "killed")
        again = spool.claim(next(e for e in spool.pending() if e.recording_id == entry.recording_id))
        assert store.upload(client, again) == first
        assert len(_runs(migrated_store, "sync")) == 1


class TestLeftovers:
    """sync removes what killed processes left in the spool, and nothing else."""

    def test_sync_removes_half_deleted_and_cut_off_entries(self, migrated_store: str, tmp_path: Path) -> None:
        import fcntl
        import uuid

        root = spool.roots()[0]
        root.mkdir(parents=True, exist_ok=True)

        def entry(name: str, *, age_s: float = 0.0) -> Path:
            path = root / name
            (path / "artifacts" / "repro").mkdir(parents=True)
            (path / "artifacts" / "repro" / "manifest.json").write_text("{}")
            if age_s:
                then = time.time() - age_s
                os.utime(path, (then, then))
            return path

        trash = entry(f".delivered-{uuid.uuid4().hex}-{uuid.uuid4().hex[:8]}")  # killed mid-rmtree
        cut_off = entry(uuid.uuid4().hex, age_s=2 * spool.UNFINISHED_AFTER_S)  # killed while staging
        young = entry(uuid.uuid4().hex)  # may be staging right now
        held = entry(uuid.uuid4().hex, age_s=2 * spool.UNFINISHED_AFTER_S)  # a live process's claim
        notes = root / "notes"  # not ours: never touched
        notes.mkdir()
        claim = os.open(held / spool.CLAIM_FILE, os.O_RDWR | os.O_CREAT)
        os.utime(held, (time.time() - 2 * spool.UNFINISHED_AFTER_S,) * 2)  # created with the entry
        try:
            fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
            done = run_cli("sync", "--json", "--tracking-uri", migrated_store, env=_env(migrated_store, tmp_path))
            assert done.returncode == 0, done.stderr
            assert sorted(json.loads(done.stdout)["removed"]) == sorted([trash.name, cut_off.name])
            assert not trash.exists() and not cut_off.exists()
            assert young.is_dir() and held.is_dir() and notes.is_dir()
        finally:
            os.close(claim)
        again = run_cli("sync", "--tracking-uri", migrated_store, env=_env(migrated_store, tmp_path))
        assert again.returncode == 0 and "removed 1 folder(s) that killed processes left" in again.stderr
        assert not held.exists() and young.is_dir() and notes.is_dir()


@pytest.mark.slow
class TestConcurrentSync:
    """Two syncs at once over 20 spooled recordings leave exactly 20 runs; each prints one JSON object."""

    def test_two_syncs(self, spooled: list[str], migrated_store: str, tmp_path: Path) -> None:
        (tmp_path / "slow_cli.py").write_text(SLOW_CLI)
        env = _env(migrated_store, tmp_path, MARKER=str(tmp_path / "marker"), SLOW="0.2")
        procs = [subprocess.Popen([sys.executable, str(tmp_path / "slow_cli.py"), "sync", "--json",
                                   "--tracking-uri", migrated_store], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [p.communicate(timeout=600) for p in procs]
        reports = []
        for proc, (out, err) in zip(procs, results):
            assert proc.returncode == 0, err[-2000:]
            reports.append(json.loads(out))  # the whole of stdout is one JSON object
        uploaded = [item["recording_id"] for r in reports for item in r["uploaded"]]
        assert sorted(uploaded) == sorted(spooled)
        _check_exactly_once(migrated_store, spooled)
        assert list(spool.pending()) == []

    def test_sync_killed_mid_upload(self, spooled: list[str], migrated_store: str, tmp_path: Path) -> None:
        (tmp_path / "slow_cli.py").write_text(SLOW_CLI)
        marker = tmp_path / "marker"
        env = _env(migrated_store, tmp_path, MARKER=str(marker), SLOW="600")
        proc = subprocess.Popen([sys.executable, str(tmp_path / "slow_cli.py"), "sync", "--tracking-uri",
                                 migrated_store], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while not (marker.is_file() and marker.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        [interrupted] = marker.read_text().split()
        assert store.client_for(migrated_store).get_run(interrupted).info.status == "RUNNING"
        done = run_cli("sync", "--json", "--tracking-uri", migrated_store, env=_env(migrated_store, tmp_path))
        assert done.returncode == 0, done.stderr[-2000:]
        assert len(json.loads(done.stdout)["uploaded"]) == 20
        runs = _check_exactly_once(migrated_store, spooled)
        assert interrupted in [r.info.run_id for r in runs]  # adopted, not replaced


class TestFallbackSpool:
    """An unwritable spool folder falls back to one that sync reads; with neither, the warning says so."""

    @pytest.fixture
    def unwritable(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        import tempfile

        (tmp_path / "file").write_text("not a folder")
        monkeypatch.setenv("REPRO_TRACK_SPOOL_DIR", str(tmp_path / "file" / "spool"))
        monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
        (tmp_path / "tmp").mkdir()
        return tmp_path / "tmp"

    def test_sync_finds_the_fallback(self, unwritable: Path, migrated_store: str, tmp_path: Path) -> None:
        import numpy as np

        @repro_track.record(experiment="fallback", tracking_uri=f"http://127.0.0.1:{free_port()}")
        def make(index: int) -> Any:
            return np.zeros(2)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", repro_track.RecordingWarning)
            make(0)
            outcome = repro_track.last_recording(make)
            assert outcome.wait(60) is None
        assert outcome.spool_path.parent == spool.fallback_root()
        assert spool.fallback_root().parent == unwritable
        done = run_cli("sync", "--json", "--tracking-uri", migrated_store,
                       env={**os.environ, "MLFLOW_TRACKING_URI": migrated_store})
        assert done.returncode == 0, done.stderr[-2000:]
        assert [u["recording_id"] for u in json.loads(done.stdout)["uploaded"]] == [outcome.recording_id]
        assert len(_runs(migrated_store, "fallback")) == 1

    def test_no_writable_folder_warns_not_kept(self, unwritable: Path, migrated_store: str) -> None:
        unwritable.rmdir()
        unwritable.write_text("not a folder either")

        @repro_track.record(experiment="fallback")
        def make() -> int:
            return 1

        with pytest.warns(repro_track.RecordingWarning, match="could not be kept"):
            assert make() == 1


class TestBackground:
    """A call stages and returns; the worker uploads behind it; flush and last_recording wait for it."""

    def test_flush_waits_for_every_upload(self, migrated_store: str, tmp_path: Path, uploader: str) -> None:
        import numpy as np

        from repro_track import delivery

        served = delivery._worker_now._uploader.served if uploader == "process" else 0

        @repro_track.record(experiment="flush")
        def make(index: int) -> Any:
            return np.full(3, index)

        outcomes = []
        for i in range(10):
            make(i)
            outcomes.append(repro_track.last_recording(make))
            assert outcomes[-1].recording_id  # known at once
        assert repro_track.flush(120) is True
        assert all(o.done and o.run_id and o.error is None for o in outcomes)
        runs = {r.info.run_id: r for r in _runs(migrated_store, "flush")}
        assert sorted(runs) == sorted(o.run_id for o in outcomes)
        for o in outcomes:
            assert runs[o.run_id].data.tags[tags.SPOOL_ID] == o.recording_id
        assert list((tmp_path / "spool").iterdir()) == []
        if uploader == "process":  # ready before the first call: it did every upload
            assert delivery._worker_now._uploader.served - served == 10

    def test_sync_mode_run_exists_when_the_call_returns(self, migrated_store: str, uploader: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("REPRO_TRACK_DELIVERY", "sync")

        @repro_track.record(experiment="sync-mode")
        def make() -> int:
            return 1

        make()
        outcome = repro_track.last_recording(make)
        assert outcome.done and outcome.run_id is not None
        assert store.client_for(migrated_store).get_run(outcome.run_id).info.status == "FINISHED"

    def test_threads(self, migrated_store: str, uploader: str) -> None:
        import numpy as np

        @repro_track.record(experiment="threads")
        def make(index: int) -> Any:
            return np.full(2, index)

        outcomes: dict[int, Any] = {}
        errors: list[BaseException] = []

        def work(thread: int) -> None:
            try:
                for i in range(10):
                    make(thread * 10 + i)
                    outcomes[thread * 10 + i] = repro_track.last_recording(make)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and repro_track.flush(300)
        client = store.client_for(migrated_store)
        runs = {r.info.run_id: r for r in _runs(migrated_store, "threads")}
        assert len(runs) == 80 and sorted(o.run_id for o in outcomes.values()) == sorted(runs)
        digests = set()
        for index, outcome in outcomes.items():
            run = runs[outcome.run_id]
            local = client.download_artifacts(outcome.run_id, tags.MANIFEST_PATH)
            m = json.loads(Path(local).read_text("utf-8"))
            assert m["arguments"]["index"]["value"] == index == int(run.data.params["arg.index"])
            assert m["manifest_digest"] == run.data.tags[tags.MANIFEST_DIGEST] == outcome.manifest_digest
            digests.add(m["manifest_digest"])
        assert len(digests) == 80


class TestGitAfterTheCall:
    """A call quicker than git returns without waiting for it; the upload carries git's answer."""

    @pytest.fixture
    def held_git(self, monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
        """git answers only once the test releases it: (release, answered)."""
        from repro_track.capture import git

        capture_git, release, answered = git.capture_git, threading.Event(), threading.Event()

        def held(path: Any) -> Any:
            release.wait(60)
            try:
                return capture_git(path)
            finally:
                answered.set()

        monkeypatch.setattr(git, "capture_git", held)
        return release, answered

    def test_completed_signed_and_uploaded(self, migrated_store: str, held_git: Any, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
        import numpy as np

        from repro_track import signing

        private, public = signing.keygen(tmp_path / "key")
        monkeypatch.setenv("REPRO_TRACK_SIGNING_KEY", str(private))
        monkeypatch.setenv("REPRO_TRACK_TRUSTED_KEYS", str(public))

        @repro_track.record(experiment="late-git")
        def make() -> Any:
            return np.arange(3.0)

        release, answered = held_git
        make()
        assert not answered.is_set()  # the call returned before git answered
        outcome = repro_track.last_recording(make)
        release.set()
        assert repro_track.flush(120)
        run = store.client_for(migrated_store).get_run(outcome.run_id)
        local = store.client_for(migrated_store).download_artifacts(outcome.run_id, tags.MANIFEST_PATH)
        m = json.loads(Path(local).read_text("utf-8"))
        assert m["git"]["available"] and m["git"]["commit"]  # this test file's repository
        assert m["code"]["commit"] == m["git"]["commit"]
        assert m["manifest_digest"] == run.data.tags[tags.MANIFEST_DIGEST] == outcome.manifest_digest
        assert run.data.tags[tags.SIGNED_BY]  # signed after the git state was added, and it verifies

    @pytest.mark.parametrize("sleep_s, start_after_s", [(0.0, 60.0), (1.0, 0.05)])
    def test_git_starts_once_the_call_returned_or_ran_long_enough(
            self, migrated_store: str, sleep_s: float, start_after_s: float, monkeypatch: pytest.MonkeyPatch) -> None:
        """A quick call returns before git starts (it does not share its milliseconds with git's
        start), and git starts right after; a long one has git started during it, after the delay."""
        import numpy as np

        from repro_track import recorder
        from repro_track.capture import git

        capture_git, started = git.capture_git, []

        def noted(path: Any) -> Any:
            started.append(time.monotonic())
            return capture_git(path)

        monkeypatch.setattr(git, "capture_git", noted)
        monkeypatch.setattr(recorder, "GIT_START_AFTER_S", start_after_s)
        ended = []

        @repro_track.record(experiment="git-start")
        def make() -> Any:
            time.sleep(sleep_s)
            ended.append(time.monotonic())
            return np.arange(3.0)

        begun = time.monotonic()
        make()
        assert time.monotonic() - begun < sleep_s + 30  # never waited for the start delay
        outcome = repro_track.last_recording(make)
        assert repro_track.flush(120) and outcome.run_id, outcome.error
        [start] = [t for t in started if t >= begun]  # not a git of an earlier test's call
        if sleep_s == 0:
            assert ended[0] < start < ended[0] + 10  # after the call, not at the 60 s delay
        else:
            assert begun + start_after_s <= start < ended[0]
        local = store.client_for(migrated_store).download_artifacts(outcome.run_id, tags.MANIFEST_PATH)
        assert json.loads(Path(local).read_text("utf-8"))["git"]["commit"]  # answered either way

    def test_a_call_waiting_for_its_upload_starts_git_at_once(self, migrated_store: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
        import numpy as np

        from repro_track import recorder

        monkeypatch.setattr(recorder, "GIT_START_AFTER_S", 60.0)
        monkeypatch.setenv("REPRO_TRACK_DELIVERY", "sync")

        @repro_track.record(experiment="git-sync")
        def make() -> Any:
            return np.arange(3.0)

        begun = time.monotonic()
        make()
        outcome = repro_track.last_recording(make)
        assert outcome.run_id and time.monotonic() - begun < 30  # not the 60 s start delay, nor a timeout

    def test_the_working_directory_removed_before_the_upload(self, migrated_store: str, held_git: Any,
                                                             tmp_path: Path, uploader: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
        import shutil

        import numpy as np

        gone = tmp_path / "gone"
        gone.mkdir()
        monkeypatch.chdir(gone)

        @repro_track.record(experiment="cwd-gone")
        def make(index: int) -> Any:
            return np.full(2, index)

        make(0)
        outcome = repro_track.last_recording(make)
        shutil.rmtree(gone)  # before the worker hands the recording on: it waits for git
        held_git[0].set()
        assert repro_track.flush(120)
        # MLflow resolves its new experiment's artifact root against the working directory, which is
        # gone: the upload fails as it would in the caller's thread, and the entry is left for sync.
        assert outcome.run_id is None and "No such file or directory" in (outcome.error or "")
        assert [e.recording_id for e in spool.pending()] == [outcome.recording_id]
        monkeypatch.chdir(tmp_path)
        assert [u["recording_id"] for u in delivery_sync().uploaded] == [outcome.recording_id]
        _check_exactly_once(migrated_store, [outcome.recording_id], "cwd-gone")

    def test_entries_left_at_exit_have_git_and_are_signed(self, tmp_path: Path, migrated_store: str,
                                                          uploader: str) -> None:
        """git's answer reaches a staged entry when git answers, not when its upload's turn comes: the
        entries a slow store leaves in the spool at exit are complete and signed for sync."""
        from repro_track import signing
        from repro_track.capture import GIT_PENDING

        private, _ = signing.keygen(tmp_path / "key")
        script = tmp_path / "rec.py"
        script.write_text(textwrap.dedent('''
            import json, time
            import numpy as np
            import repro_track
            from repro_track.capture import git

            capture_git = git.capture_git


            def late(path):  # every call returns before git answers
                time.sleep(0.3)
                return capture_git(path)


            git.capture_git = late


            @repro_track.record(experiment="late-exit")
            def make(index):
                return np.full(2, index)


            ids = []
            for index in range(3):
                make(index)
                ids.append(repro_track.last_recording(make).recording_id)
            print(json.dumps(ids), flush=True)
        '''))
        env = _recorder_env(migrated_store, tmp_path, uploader, "3", REPRO_TRACK_EXIT_TIMEOUT="1",
                            REPRO_TRACK_SIGNING_KEY=str(private))
        env.pop("WAIT_UPLOADER", None)
        done = run_script(script, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        ids = json.loads(done.stdout.strip().splitlines()[-1])
        left = {e.recording_id: e for e in spool.pending(tmp_path / "spool")}
        assert left and set(left) <= set(ids)  # uploads of 3 s each: not all done within the exit's 1 s
        for entry in left.values():
            m = json.loads(entry.texts[tags.MANIFEST_PATH])
            assert m["git"]["reason"] != GIT_PENDING
            assert entry.meta["manifest_digest"] == m["manifest_digest"]
            assert tags.SIGNATURE_PATH in entry.texts

    def test_killed_before_git_answers(self, tmp_path: Path, migrated_store: str) -> None:
        script = tmp_path / "rec.py"
        script.write_text(textwrap.dedent('''
            import os, signal, time
            import numpy as np
            from repro_track.capture import git
            import repro_track

            git.capture_git = lambda path: time.sleep(600)  # git never answers in time


            @repro_track.record(experiment="bg")
            def make(index):
                return np.full(2, index)


            make(0)
            print(repro_track.last_recording(make).recording_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        '''))
        env = _env(migrated_store, tmp_path)
        done = run_script(script, env=env, cwd=tmp_path)
        assert done.returncode == -signal.SIGKILL
        synced = run_cli("sync", "--json", env=env)
        assert synced.returncode == 0, synced.stderr[-2000:]
        [run] = _check_exactly_once(migrated_store, done.stdout.split(), "bg")
        local = store.client_for(migrated_store).download_artifacts(run.info.run_id, tags.MANIFEST_PATH)
        m = json.loads(Path(local).read_text("utf-8"))
        assert not m["git"]["available"]
        assert m["git"]["reason"] == "git had not answered when the recording process ended"


class TestUploaderProcess:
    """The uploader process ends mid-upload: the worker takes the recording back and finishes that run."""

    def test_killed_mid_upload(self, migrated_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import numpy as np

        from repro_track import delivery

        monkeypatch.setenv("REPRO_TRACK_UPLOADER", "process")
        env = _recorder_env(migrated_store, tmp_path, "process", "600")  # uploads in the uploader hang
        for name in ("SLOW", "PYTHONPATH"):
            monkeypatch.setenv(name, env[name])
        monkeypatch.setattr(delivery, "_worker_now", None)  # a worker, and an uploader, of this test's own
        uploader = ready_uploader(delivery)

        @repro_track.record(experiment="orphaned")
        def make(index: int) -> Any:
            return np.full(2, index)

        make(0)
        outcome = repro_track.last_recording(make)
        deadline = time.monotonic() + 120
        while not _runs(migrated_store, "orphaned"):  # the uploader made the run, then hung
            assert time.monotonic() < deadline
            time.sleep(0.05)
        [started] = _runs(migrated_store, "orphaned")
        assert started.info.status == "RUNNING"
        monkeypatch.setenv("SLOW", "0")
        uploader._proc.kill()
        assert repro_track.flush(120)
        assert outcome.run_id == started.info.run_id and outcome.error is None  # adopted, not made again
        _check_exactly_once(migrated_store, [outcome.recording_id], "orphaned")
        assert delivery._worker_now._uploader is None and delivery._worker_now._uploader_failed


FORK_DURING_UPLOAD = '''
import os, time
import numpy as np
import repro_track
from repro_track import delivery


@repro_track.record(experiment="fork")
def make(index):
    return np.full(2, index)


def until(condition, seconds):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


make(0)
print(repro_track.last_recording(make).recording_id, flush=True)
until(lambda: delivery._worker_now._uploader and delivery._worker_now._uploader.ready(), 120)
make(1)  # slowed in the uploader: the worker thread waits for its reply, holding the pipe's lock
print(repro_track.last_recording(make).recording_id, flush=True)
until(lambda: delivery._worker_now.handed_over, 60)
pid = os.fork()
if pid == 0:
    os._exit(0)
deadline = time.monotonic() + 30
while not os.waitpid(pid, os.WNOHANG)[0]:
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        print("child hung", flush=True)
        break
    time.sleep(0.05)
print("flushed", repro_track.flush(120), flush=True)
'''


class TestForkDuringUpload:
    """A process forked while the worker waits for the uploader's reply runs on (it used to hang)."""

    def test_the_child_exits_and_the_parent_uploads(self, tmp_path: Path, migrated_store: str) -> None:
        script = tmp_path / "fork.py"
        script.write_text(FORK_DURING_UPLOAD)
        done = run_script(script, env=_recorder_env(migrated_store, tmp_path, "process", "2"), cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "child hung" not in done.stdout and "flushed True" in done.stdout
        _check_exactly_once(migrated_store, done.stdout.split()[:2], "fork")


LATE_CALL = '''
    import json, os, threading, warnings
    import numpy as np
    import repro_track


    @repro_track.record(experiment="late")
    def make(index):
        return np.full(2, index)


    def report(**extra):
        """Flush, then print the latest call's run id as one JSON line."""
        flushed = repro_track.flush(60)
        outcome = repro_track.last_recording(make)
        print(json.dumps({"flushed": flushed, "run_id": outcome and outcome.run_id, **extra}), flush=True)
'''


def _late_call(tmp_path: Path, uri: str, body: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run LATE_CALL and then ``body`` as a script; its report, and the manifest of the run it names,
    which must be uploaded with git's answer in it."""
    from repro_track.capture import GIT_PENDING

    script = tmp_path / "late.py"
    script.write_text(textwrap.dedent(LATE_CALL) + textwrap.dedent(body))
    done = run_script(script, env=_env(uri, tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    late = json.loads(done.stdout.strip().splitlines()[-1])
    assert late["flushed"] and late["run_id"], (late, done.stderr[-2000:])
    local = store.client_for(uri).download_artifacts(late["run_id"], tags.MANIFEST_PATH)
    manifest = json.loads(Path(local).read_text("utf-8"))
    assert manifest["git"]["reason"] != GIT_PENDING
    return late, manifest


class TestForkedChildRecords:
    """A forked child records with threads of its own: the parent's git thread is not in the child."""

    def test_the_childs_recording_has_git_and_is_uploaded(self, tmp_path: Path, migrated_store: str) -> None:
        _, manifest = _late_call(tmp_path, migrated_store, '''
            make(0)  # the parent's git thread and worker exist from here on
            assert repro_track.flush(60)
            pid = os.fork()
            if pid == 0:
                make(1)
                report()
                os._exit(0)
            os.waitpid(pid, 0)
        ''')
        assert manifest["arguments"]["index"]["value"] == 1


class TestAfterTheMainThreadEnds:
    """A thread that goes on generating after the main thread has returned still records."""

    def test_a_call_in_a_thread_that_outlives_main_is_recorded(self, tmp_path: Path, migrated_store: str) -> None:
        late, manifest = _late_call(tmp_path, migrated_store, '''
            def later(main):
                main.join()  # the interpreter is shutting down from here: thread pools refuse new work
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    make(1)
                report(warnings=[str(w.message) for w in caught])


            make(0)
            threading.Thread(target=later, args=(threading.main_thread(),)).start()
        ''')
        assert late["warnings"] == [] and manifest["arguments"]["index"]["value"] == 1


@pytest.mark.slow
class TestProcessEnd:
    """Killed right after its calls, or ending before its uploads, a process loses nothing."""

    @pytest.mark.parametrize("uploader", ["process", "thread"])
    def test_killed_after_ten_calls(self, tmp_path: Path, migrated_store: str, uploader: str) -> None:
        script = tmp_path / "rec.py"
        script.write_text(RECORDER)
        env = _recorder_env(migrated_store, tmp_path, uploader, "0.5")
        done = run_script(script, "10", "kill", env=env, cwd=tmp_path)
        assert done.returncode == -signal.SIGKILL
        ids = done.stdout.split()
        assert len(ids) == 10
        before = _runs(migrated_store, "bg")
        assert len([r for r in before if r.info.status == "FINISHED"]) < 10  # the kill did cut uploads short
        env = _env(migrated_store, tmp_path)
        synced = run_cli("sync", "--json", env=env)
        assert synced.returncode == 0, synced.stderr[-2000:]
        runs = _check_exactly_once(migrated_store, ids, "bg")
        again = run_cli("sync", "--json", env=env)
        assert json.loads(again.stdout)["uploaded"] == [] and len(_runs(migrated_store, "bg")) == len(runs)

    @pytest.mark.parametrize("uploader", ["process", "thread"])
    def test_exit_handler_leaves_the_rest_for_sync(self, tmp_path: Path, migrated_store: str, uploader: str) -> None:
        script = tmp_path / "rec.py"
        script.write_text(RECORDER)
        env = _recorder_env(migrated_store, tmp_path, uploader, "2", REPRO_TRACK_EXIT_TIMEOUT="1")
        done = run_script(script, "5", "exit", env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stderr.count("were not uploaded before the process ended") == 1  # said once
        assert "repro-track sync" in done.stderr
        ids = done.stdout.split()
        left = len(list(spool.pending()))
        assert left >= 3  # one upload in the script, one more in the bounded wait at most; the rest are kept
        synced = run_cli("sync", "--json", env=_env(migrated_store, tmp_path))
        assert len(json.loads(synced.stdout)["uploaded"]) == left
        _check_exactly_once(migrated_store, ids, "bg")

    @pytest.mark.parametrize("uploader", ["process", "thread"])
    def test_flush_in_a_script(self, tmp_path: Path, migrated_store: str, uploader: str) -> None:
        script = tmp_path / "rec.py"
        script.write_text(RECORDER)
        env = _recorder_env(migrated_store, tmp_path, uploader, "0.2")
        done = run_script(script, "3", "flush", env=env, cwd=tmp_path)
        assert done.returncode == 0 and "flushed True" in done.stdout, done.stderr[-2000:]
        assert "were not uploaded" not in done.stderr
        _check_exactly_once(migrated_store, done.stdout.split()[:3], "bg")
        served = int(done.stdout.split("uploader")[1])
        assert served == (2 if uploader == "process" else 0)  # the first upload ran while it started


@pytest.mark.slow
class TestQueueBound:
    """Large outputs with a queue of one: calls wait for room, and memory stays near one output."""

    def test_memory_and_back_pressure(self, tmp_path: Path, migrated_store: str) -> None:
        # 4 outputs of 256 MiB (1 GiB in all) rather than 1 GiB each: this box has 24 GiB and 2 cores.
        script = tmp_path / "big.py"
        script.write_text('''
import json, resource, sys
import numpy as np
import torch, mlflow, repro_track  # loaded before the baseline, as in a real generation
from repro_track import delivery, outputs, spool, store  # noqa: F401

N = 1 << 26  # float32: 256 MiB


@repro_track.record(experiment="big")
def make(index):
    return np.full(N, index, dtype=np.float32)


np.ones(N, dtype=np.float32).sum()  # the peak already holds one output, as every call makes one
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
waiting = []
for i in range(4):
    make(i)
    waiting.append(delivery._worker_now.unfinished)
flushed = repro_track.flush(600)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"extra": after - before, "waiting": waiting, "flushed": flushed}))
''')
        env = _env(migrated_store, tmp_path, REPRO_TRACK_QUEUE_SIZE="1")
        done = run_script(script, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["flushed"] is True
        assert max(result["waiting"]) <= 2  # one uploading, at most one queued: the bound holds
        # Stated limit: recording 1 GiB of outputs adds less than one output (256 MiB) to the peak.
        assert result["extra"] < 256 * 2**20, f"recording added {result['extra'] / 2**20:.0f} MiB"
        assert len(_runs(migrated_store, "big")) == 4


class TestGivingWay:
    """The worker starts no store call while a recording call runs, except after its bounded wait."""

    def test_worker_waits_for_the_call_then_goes_on(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from repro_track import delivery

        monkeypatch.setattr(delivery.give_way, "max_wait_s", 30.0)
        order: list[str] = []
        inside, released = threading.Event(), threading.Event()

        def call() -> None:
            with delivery.staging():
                inside.set()
                time.sleep(0.2)  # the worker tries to start a store call meanwhile
                order.append("call done")
            released.set()

        def worker() -> None:
            inside.wait(10)
            delivery.give_way.wait()
            order.append("store call")

        threads = [threading.Thread(target=call), threading.Thread(target=worker)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert order == ["call done", "store call"]

    def test_the_wait_is_bounded(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from repro_track import delivery

        monkeypatch.setattr(delivery.give_way, "max_wait_s", 0.05)
        with delivery.staging():
            start = time.monotonic()
            delivery.give_way.wait()  # the call is still running: the worker goes on anyway
            assert time.monotonic() - start < 10

    def test_a_call_waiting_for_the_worker_steps_aside(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Sync delivery and a full queue make the call wait for the worker; the worker must not wait
        # for the call meanwhile (it would, up to its bound, at every store call).
        from repro_track import delivery

        monkeypatch.setattr(delivery.give_way, "max_wait_s", 30.0)
        done = threading.Event()
        with delivery.staging(), delivery.staging():  # a recorded function calling another
            with delivery.give_way.stepping_aside():
                waiter = threading.Thread(target=lambda: (delivery.give_way.wait(), done.set()))
                waiter.start()
                assert done.wait(10)
                waiter.join()

    def test_sync_delivery_inside_a_recorded_call_is_not_held_up(self, tracking_uri: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
        from repro_track import delivery

        monkeypatch.setenv("REPRO_TRACK_DELIVERY", "sync")
        monkeypatch.setattr(delivery.give_way, "max_wait_s", 60.0)  # were it waiting, it would show

        @repro_track.record(experiment="give-way")
        def inner(n: int) -> Any:
            import torch

            return torch.arange(float(n))

        @repro_track.record(experiment="give-way")
        def outer(n: int) -> Any:
            return inner(n) * 2

        start = time.monotonic()
        outer(4)
        assert repro_track.last_recording(outer).run_id is not None
        assert time.monotonic() - start < 50  # 4 store calls x 60 s if the worker waited for the call

    def test_flush_inside_a_recorded_call_is_not_held_up(self, tracking_uri: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        from repro_track import delivery

        monkeypatch.setattr(delivery.give_way, "max_wait_s", 60.0)

        @repro_track.record(experiment="give-way")
        def inner(n: int) -> Any:
            import torch

            return torch.arange(float(n))

        @repro_track.record(experiment="give-way")
        def outer(n: int) -> Any:
            out = inner(n)
            assert repro_track.flush(timeout=50)  # the worker goes on while this call waits for it
            assert repro_track.last_recording(inner).run_id is not None
            return out * 2

        start = time.monotonic()
        outer(3)
        assert time.monotonic() - start < 50
