"""Tests for signed recordings: signing at staging, verification on load, --require-signed, show,
the run card, the signed in-toto (DSSE) export and `repro-track keygen`.

A small project is recorded once per module in a fresh interpreter: one call signed with the team's
key, one unsigned, one signed with a key nobody trusts. Attacks re-log a signed run's artifacts as a
new run, as anyone who can log to the store could, keeping the original ``signature.json``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import uuid
from pathlib import Path
from typing import Callable

import pytest
from conftest import (PROJECT_GEN_PY, RecordedProject, recording_env, run_cli, run_script,
                      write_project)

from repro_track import manifest, signing, tags
from repro_track.cli import main as cli_main
from repro_track.errors import ReproTrackError, SignatureError, SigningKeyError

RECORD_PY = '''
    """Record gen.touch_and_noise once per signing key named on the command line ("-" for none)."""
    import json
    import os
    import sys

    import torch

    import gen
    import repro_track


    def main(markers: str, keys: dict) -> None:
        runs = {}
        for case, key in keys.items():
            if key == "-":
                os.environ.pop("REPRO_TRACK_SIGNING_KEY", None)
            else:
                os.environ["REPRO_TRACK_SIGNING_KEY"] = key
            gen.touch_and_noise(f"{markers}/{case}", 4, generator=torch.Generator("cpu").manual_seed(8))
            outcome = repro_track.last_recording(gen.touch_and_noise)
            # Delivery may finish in the background: wait for the run id where it can be waited for.
            runs[case] = outcome.wait(120) if hasattr(outcome, "wait") else outcome.run_id
        print(json.dumps(runs))


    if __name__ == "__main__":
        main(sys.argv[1], json.loads(sys.argv[2]))
'''


class Keys:
    """The team's key pair and an outsider's, made by signing.keygen."""

    def __init__(self, root: Path):
        self.team_private, self.team_public = signing.keygen(root / "team")
        self.other_private, self.other_public = signing.keygen(root / "other")
        self.team_id = signing.key_id(signing.load_private_key(self.team_private).public_key())
        self.other_id = signing.key_id(signing.load_private_key(self.other_private).public_key())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def signed_project(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> RecordedProject:
    """The project recorded three times: signed by the team, unsigned, signed by an outsider.

    The markers the recording wrote are removed: a replay that runs the function writes them again.
    """
    root = tmp_path_factory.mktemp("signed")
    project = write_project(root / "project", {"gen.py": PROJECT_GEN_PY, "record.py": RECORD_PY})
    markers = root / "markers"
    markers.mkdir()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cases = {"signed": str(keys.team_private), "unsigned": "-", "other_key": str(keys.other_private)}
    done = run_script(project / "record.py", str(markers), json.dumps(cases),
                      env=recording_env(uri, root / "spool"), cwd=project)
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(runs.values()), f"a recording was spooled instead of logged: {runs}\n{done.stderr}"
    for marker in markers.iterdir():
        marker.unlink()
    return RecordedProject(project, uri, {**runs, "markers": str(markers)})


@pytest.fixture
def trusted(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> Keys:
    """The team's public key is the trusted one here."""
    monkeypatch.setenv("REPRO_TRACK_TRUSTED_KEYS", str(keys.team_public))
    return keys


def relog(project: RecordedProject, run_id: str, workdir: Path, change: Callable[[Path], None]) -> str:
    """Log a run's artifacts again as a new run after ``change(artifacts folder)``, as an attacker would:
    the old signature.json travels along unless the change drops it."""
    from repro_track import store
    from repro_track.spool import SpoolEntry

    client = project.client()
    folder = workdir / f"relog-{uuid.uuid4().hex}"
    (folder / "artifacts").mkdir(parents=True)
    client.download_artifacts(run_id, "", str(folder / "artifacts"))
    change(folder / "artifacts")
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id).name
    meta = {"recording_id": uuid.uuid4().hex, "experiment": experiment, "tags": {},
            "run_name": f"relog-of-{run_id[:8]}", "parent_run_id": None}
    return store.upload(client, SpoolEntry(folder, meta))


def edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Change the manifest and recompute its (unkeyed) digest so that it still loads."""
    def change(artifacts: Path) -> None:
        path = artifacts / tags.MANIFEST_PATH
        data = json.loads(path.read_text("utf-8"))
        edit(data)
        data["manifest_digest"] = manifest.digest_of(data)
        manifest.validate(data)
        path.write_text(json.dumps(data, sort_keys=True, indent=1), "utf-8")
    return change


def point_marker(marker: Path) -> Callable[[Path], None]:
    """The manifest edited so that the replayed call writes ``marker`` if it ever runs."""
    def edit(m: dict) -> None:
        m["arguments"]["marker"]["value"] = str(marker)
    return edit_manifest(edit)


def swap_outputs(marker: Path) -> Callable[[Path], None]:
    """Other output values, with the manifest's output digest (and its own) recomputed to match."""
    def change(artifacts: Path) -> None:
        from safetensors.torch import save_file

        from repro_track import outputs

        path = artifacts / tags.OUTPUTS_PATH
        arrays = outputs.load_arrays(path)
        name = next(iter(arrays))
        save_file({name: (arrays[name] + 1).contiguous()}, str(path))
        digest = outputs.sha256_of(outputs.load_arrays(path)[name])

        def edit(m: dict) -> None:
            m["arguments"]["marker"]["value"] = str(marker)
            for o in m["outputs"]:
                if o["name"] == name:
                    o["sha256"] = digest
        edit_manifest(edit)(artifacts)
    return change


def rewrite_requirements(marker: Path) -> Callable[[Path], None]:
    """A file the manifest does not pin (requirements.txt) replaced; the manifest stays as signed, so
    only the artifact digests can catch it (``marker`` is unused: the recorded marker stays in force)."""
    def change(artifacts: Path) -> None:
        (artifacts / tags.ARTIFACT_DIR / tags.REQUIREMENTS_FILE).write_text("evil==6.6.6\n", "utf-8")
    return change


def forge_signed_digests(marker: Path) -> Callable[[Path], None]:
    """The manifest edited, and signature.json's digests rewritten to match it (signature left as is)."""
    def change(artifacts: Path) -> None:
        point_marker(marker)(artifacts)
        sig_path = artifacts / tags.SIGNATURE_PATH
        doc = json.loads(sig_path.read_text("utf-8"))
        doc["artifacts"] = signing.tree_digests(artifacts)
        doc["manifest_digest"] = json.loads((artifacts / tags.MANIFEST_PATH).read_text())["manifest_digest"]
        sig_path.write_text(json.dumps(doc), "utf-8")
    return change


def self_signed(keys: Keys) -> Callable[[Path], Callable[[Path], None]]:
    """The manifest edited and the tree re-signed with the outsider's key (a valid, untrusted signature)."""
    def make(marker: Path) -> Callable[[Path], None]:
        def change(artifacts: Path) -> None:
            point_marker(marker)(artifacts)
            (artifacts / tags.SIGNATURE_PATH).unlink()
            digest = json.loads((artifacts / tags.MANIFEST_PATH).read_text())["manifest_digest"]
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("REPRO_TRACK_SIGNING_KEY", str(keys.other_private))
                signing.sign_staged(artifacts, digest)
        return change
    return make


def cli_replay(project: RecordedProject, run_id: str, *args: str, cwd: Path):
    return run_cli("replay", run_id, "--tracking-uri", project.tracking_uri, "--project-dir",
                   str(project.path), "--no-log", *args, cwd=cwd)


class TestSigningAtRecord:
    """With a signing key configured, every recording carries a signature over all its files."""

    def test_signed_run_has_signature_tag_and_card(self, signed_project: RecordedProject, keys: Keys):
        run = signed_project.client().get_run(signed_project.runs["signed"])
        assert run.data.tags[tags.SIGNED_BY] == keys.team_id
        assert f"signed by key `{keys.team_id}`" in run.data.tags[tags.MLFLOW_NOTE]

    def test_unsigned_run_has_no_signature(self, signed_project: RecordedProject, tmp_path: Path):
        client = signed_project.client()
        run_id = signed_project.runs["unsigned"]
        assert tags.SIGNED_BY not in client.get_run(run_id).data.tags
        assert "not signed" in client.get_run(run_id).data.tags[tags.MLFLOW_NOTE]
        names = {Path(f.path).name for f in client.list_artifacts(run_id, tags.ARTIFACT_DIR)}
        assert tags.SIGNATURE_FILE not in names

    def test_signature_covers_every_file_and_verifies_with_the_public_key(
            self, signed_project: RecordedProject, keys: Keys, tmp_path: Path):
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        client = signed_project.client()
        client.download_artifacts(signed_project.runs["signed"], "", str(tmp_path))
        doc = json.loads((tmp_path / tags.SIGNATURE_PATH).read_text("utf-8"))
        files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                       if p.is_file() and p.relative_to(tmp_path).as_posix() != tags.SIGNATURE_PATH)
        assert sorted(doc["artifacts"]) == files
        assert {tags.MANIFEST_PATH, tags.OUTPUTS_PATH} <= set(files)
        for rel in files:
            assert doc["artifacts"][rel] == hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()
        stored = json.loads((tmp_path / tags.MANIFEST_PATH).read_text("utf-8"))
        assert doc["manifest_digest"] == stored["manifest_digest"]
        assert doc["key_id"] == keys.team_id
        body = {k: v for k, v in doc.items() if k != "signature"}
        public = load_pem_public_key(keys.team_public.read_bytes())
        public.verify(base64.b64decode(doc["signature"]),
                      b"repro-track recording signature v1\n" + manifest.canonical_json(body))


class TestRequireSigned:
    """`replay --require-signed` refuses, with exit 2 and before anything runs, what no trusted key vouches for."""

    @pytest.mark.slow
    @pytest.mark.parametrize("case", ["unsigned", "other_key"])
    def test_recorded_runs_refused(self, signed_project: RecordedProject, trusted: Keys, case: str,
                                   tmp_path: Path):
        marker = Path(signed_project.runs["markers"]) / case
        done = cli_replay(signed_project, signed_project.runs[case], "--require-signed", cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("repro-track: error:")]
        assert len(errors) == 1 and signed_project.runs[case] in errors[0]
        assert ("not signed" if case == "unsigned" else f"key {trusted.other_id} is not among the trusted "
                "keys") in errors[0]
        assert "Traceback" not in done.stderr
        assert not marker.exists()

    @pytest.mark.slow
    @pytest.mark.parametrize("attack, expected", [
        (point_marker, "repro/manifest.json does not match its signed sha256"),
        (swap_outputs, "does not match its signed sha256"),
        (rewrite_requirements, "repro/requirements.txt does not match its signed sha256"),
        (forge_signed_digests, "the signature does not verify"),
    ], ids=["manifest", "outputs", "unpinned-file", "forged-digests"])
    def test_tampered_signed_run_refused(self, signed_project: RecordedProject, trusted: Keys,
                                         tmp_path: Path, attack, expected: str):
        marker = tmp_path / "marker"
        run_id = relog(signed_project, signed_project.runs["signed"], tmp_path, attack(marker))
        done = cli_replay(signed_project, run_id, "--require-signed", cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert expected in done.stderr and "refusing to replay it" in done.stderr
        assert not marker.exists()
        assert not (Path(signed_project.runs["markers"]) / "signed").exists()

    def test_resigned_by_an_outsider_refused(self, signed_project: RecordedProject, trusted: Keys,
                                             tmp_path: Path):
        from repro_track import replay

        marker = tmp_path / "marker"
        run_id = relog(signed_project, signed_project.runs["signed"], tmp_path, self_signed(trusted)(marker))
        with pytest.raises(SignatureError, match=f"key {trusted.other_id} is not among the trusted keys"):
            replay(run_id, tracking_uri=signed_project.tracking_uri, project_dir=signed_project.path,
                   require_signed=True, log=False)
        assert not marker.exists()

    def test_setting_requires_signed_runs(self, signed_project: RecordedProject, trusted: Keys,
                                          monkeypatch: pytest.MonkeyPatch):
        from repro_track import replay

        monkeypatch.setenv("REPRO_TRACK_REQUIRE_SIGNED", "1")
        with pytest.raises(SignatureError, match="is not signed") as info:
            replay(signed_project.runs["unsigned"], tracking_uri=signed_project.tracking_uri,
                   project_dir=signed_project.path, dry_run=True)
        assert isinstance(info.value, ReproTrackError) and isinstance(info.value, PermissionError)
        assert info.value.run_id == signed_project.runs["unsigned"]

    def test_without_trusted_keys_nothing_verifies(self, signed_project: RecordedProject):
        from repro_track import replay

        with pytest.raises(SignatureError, match="no trusted keys are configured"):
            replay(signed_project.runs["signed"], tracking_uri=signed_project.tracking_uri,
                   project_dir=signed_project.path, dry_run=True, require_signed=True)

    def test_unsigned_run_replays_when_not_required(self, signed_project: RecordedProject, trusted: Keys):
        from repro_track import replay

        report = replay(signed_project.runs["unsigned"], tracking_uri=signed_project.tracking_uri,
                        project_dir=signed_project.path, dry_run=True)
        assert report.dry_run and report.expected == "exact"

    @pytest.mark.slow
    def test_good_signed_run_replays_and_its_replay_is_signed(
            self, signed_project: RecordedProject, trusted: Keys, monkeypatch: pytest.MonkeyPatch):
        from repro_track import replay

        monkeypatch.setenv("REPRO_TRACK_SIGNING_KEY", str(trusted.team_private))
        run_id = signed_project.runs["signed"]
        report = replay(run_id, tracking_uri=signed_project.tracking_uri, project_dir=signed_project.path,
                        require_signed=True)
        assert report.observed == "exact" and report.ok, report.reasons
        client = signed_project.client()
        assert client.get_run(report.replay_run_id).data.tags[tags.SIGNED_BY] == trusted.team_id
        card = client.get_run(run_id).data.tags[tags.MLFLOW_NOTE]
        assert "verified against the trusted keys where this card was written" in card
        again = replay(report.replay_run_id, tracking_uri=signed_project.tracking_uri,
                       project_dir=signed_project.path, require_signed=True, dry_run=True)
        assert again.dry_run
        (Path(signed_project.runs["markers"]) / "signed").unlink()  # the other tests expect it absent


class TestShow:
    """`repro-track show` says whether a run is signed, by which key, and whether it verified here."""

    @pytest.mark.parametrize("case, verified", [("signed", True), ("other_key", False), ("unsigned", False)])
    def test_json(self, signed_project: RecordedProject, trusted: Keys, case: str, verified: bool,
                  capsys: pytest.CaptureFixture):
        assert cli_main(["show", signed_project.runs[case], "--tracking-uri", signed_project.tracking_uri,
                         "--json"]) == 0
        signature = json.loads(capsys.readouterr().out)["signature"]
        key = {"signed": trusted.team_id, "other_key": trusted.other_id, "unsigned": None}[case]
        assert signature["signed"] == (case != "unsigned")
        assert signature["key_id"] == key
        assert signature["verified"] is verified
        assert (signature["problem"] is None) == verified

    def test_text(self, signed_project: RecordedProject, trusted: Keys, capsys: pytest.CaptureFixture):
        assert cli_main(["show", signed_project.runs["signed"], "--tracking-uri",
                         signed_project.tracking_uri]) == 0
        out = capsys.readouterr().out
        assert f"signature\n  signed by key {trusted.team_id}, verified against the trusted keys here" in out

    def test_text_names_the_tampered_file(self, signed_project: RecordedProject, trusted: Keys,
                                          tmp_path: Path, capsys: pytest.CaptureFixture):
        run_id = relog(signed_project, signed_project.runs["signed"], tmp_path,
                       rewrite_requirements(tmp_path / "m"))
        assert cli_main(["show", run_id, "--tracking-uri", signed_project.tracking_uri]) == 0
        out = capsys.readouterr().out
        assert "NOT verified: repro/requirements.txt does not match its signed sha256" in out

    def test_added_file_is_not_covered(self, signed_project: RecordedProject, trusted: Keys, tmp_path: Path):
        from repro_track import runs, store

        def plant(artifacts: Path) -> None:
            (artifacts / tags.ARTIFACT_DIR / "extra.py").write_text("import os\n", "utf-8")

        run_id = relog(signed_project, signed_project.runs["signed"], tmp_path, plant)
        loaded = runs.load_run(store.client_for(signed_project.tracking_uri), run_id, tmp_path / "dl")
        assert not loaded.signature.verified
        assert loaded.signature.problem == ("the artifact repro/extra.py is not covered by the signature "
                                            "(added after signing)")


    def test_a_symlinked_artifact_is_refused_not_followed(self, signed_project: RecordedProject, trusted: Keys,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture):
        # The signature check downloads every artifact: a link in a local store to a file of this
        # machine must not be read as the run's, even one holding the very bytes that were signed.
        from mlflow.utils.file_utils import local_file_uri_to_path

        run_id = relog(signed_project, signed_project.runs["signed"], tmp_path, lambda artifacts: None)
        client = signed_project.client()
        stored = Path(local_file_uri_to_path(client.get_run(run_id).info.artifact_uri)) / tags.ARTIFACT_DIR \
            / tags.REQUIREMENTS_FILE
        outside = tmp_path / "outside.txt"
        outside.write_bytes(stored.read_bytes())
        stored.unlink()
        stored.symlink_to(outside)
        capsys.readouterr()  # what relogging printed (MLflow's download progress bar) is not show's
        assert cli_main(["show", run_id, "--tracking-uri", signed_project.tracking_uri]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "requirements.txt is a symbolic link" in err


class TestInTotoEnvelope:
    """With a key configured, the in-toto export is a DSSE envelope that securesystemslib verifies."""

    def test_envelope_verifies_with_securesystemslib(self, signed_project: RecordedProject, keys: Keys,
                                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture):
        from cryptography.hazmat.primitives.serialization import load_pem_public_key
        from securesystemslib.dsse import Envelope
        from securesystemslib.exceptions import VerificationError
        from securesystemslib.signer import SSlibKey

        run_id = signed_project.runs["signed"]
        args = ["export", run_id, "--format", "in-toto", "--tracking-uri", signed_project.tracking_uri]
        assert cli_main(args) == 0
        statement = json.loads(capsys.readouterr().out)
        monkeypatch.setenv("REPRO_TRACK_SIGNING_KEY", str(keys.team_private))
        assert cli_main(args + ["-o", str(tmp_path / "envelope.json")]) == 0
        data = json.loads((tmp_path / "envelope.json").read_text("utf-8"))
        envelope = Envelope.from_dict(data)
        assert envelope.payload_type == "application/vnd.in-toto+json"
        assert json.loads(envelope.payload) == statement
        key = SSlibKey.from_crypto(load_pem_public_key(keys.team_public.read_bytes()), keyid=keys.team_id)
        assert set(envelope.verify([key], 1)) == {keys.team_id}
        other = SSlibKey.from_crypto(load_pem_public_key(keys.other_public.read_bytes()),
                                     keyid=keys.team_id)
        with pytest.raises(VerificationError):
            envelope.verify([other], 1)
        forged = dict(statement, subject=[{"name": "x", "digest": {"sha256": "0" * 64}}])
        data = json.loads((tmp_path / "envelope.json").read_text("utf-8"))  # from_dict consumed the first
        data["payload"] = base64.b64encode(json.dumps(forged).encode()).decode()
        with pytest.raises(VerificationError):
            Envelope.from_dict(data).verify([key], 1)


class TestKeygen:
    """`repro-track keygen` writes a usable key pair and prints the two settings."""

    def test_keygen_writes_a_working_pair(self, tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch):
        assert cli_main(["keygen", "--out", str(tmp_path / "keys")]) == 0
        lines = capsys.readouterr().out.splitlines()
        settings = dict(line.removeprefix("export ").split("=", 1) for line in lines)
        assert set(settings) == {"REPRO_TRACK_SIGNING_KEY", "REPRO_TRACK_TRUSTED_KEYS"}
        private = Path(settings["REPRO_TRACK_SIGNING_KEY"])
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        tree = tmp_path / "tree"
        (tree / tags.ARTIFACT_DIR).mkdir(parents=True)
        (tree / tags.MANIFEST_PATH).write_text(json.dumps({"manifest_digest": "d"}), "utf-8")
        signing.sign_staged(tree, "d")
        check = signing.check_tree(tree)
        assert check.verified and check.key_id == signing.key_id(signing.load_private_key().public_key())

    def test_keygen_never_overwrites(self, tmp_path: Path, capsys: pytest.CaptureFixture):
        assert cli_main(["keygen", "--out", str(tmp_path)]) == 0
        before = (tmp_path / signing.PRIVATE_KEY_FILE).read_bytes()
        assert cli_main(["keygen", "--out", str(tmp_path)]) == 2
        assert "already exists" in capsys.readouterr().err
        assert (tmp_path / signing.PRIVATE_KEY_FILE).read_bytes() == before


class TestMalformedSignature:
    """A crafted signature.json is reported as a problem with one line, never raised or trusted."""

    @pytest.mark.parametrize("document", [
        b"[]", b"{", b"[" * 100_000, b'{"format": "repro-track-signature/v1"}',
        json.dumps({"format": "repro-track-signature/v1", "algorithm": "ed25519", "key_id": "ab\nerror: x",
                    "public_key": "", "manifest_digest": "", "artifacts": {}, "signature": ""}).encode(),
        json.dumps({"format": "repro-track-signature/v1", "algorithm": "ed25519", "key_id": "0" * 16,
                    "public_key": "", "manifest_digest": float("nan"), "artifacts": {},
                    "signature": "AAAA"}).encode(),
    ], ids=["list", "truncated", "deep", "fields-missing", "newline-key-id", "nan"])
    def test_problem_not_exception(self, keys: Keys, document: bytes):
        trusted = {"0" * 16: signing.load_private_key(keys.team_private).public_key()}
        check = signing.verify(document, {}, trusted)
        assert check.signed and not check.verified
        assert "\n" not in check.describe()


class TestKeyFiles:
    """Key files are read strictly, with errors that say what to fix."""

    def test_trusted_keys_folder(self, keys: Keys, tmp_path: Path):
        folder = tmp_path / "team-keys"
        folder.mkdir()
        (folder / "alice.pem").write_bytes(keys.team_public.read_bytes())
        (folder / "bob.pub").write_bytes(keys.other_public.read_bytes())
        (folder / "README").write_text("not a key", "utf-8")
        assert set(signing.load_trusted_keys(folder)) == {keys.team_id, keys.other_id}

    def test_rsa_signing_key_refused(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        pem = rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        (tmp_path / "rsa.pem").write_bytes(pem)
        monkeypatch.setenv("REPRO_TRACK_SIGNING_KEY", str(tmp_path / "rsa.pem"))
        with pytest.raises(SigningKeyError, match="Ed25519"):
            signing.load_private_key()

    def test_missing_signing_key_names_the_setting(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        monkeypatch.setenv("REPRO_TRACK_SIGNING_KEY", str(tmp_path / "nope.pem"))
        with pytest.raises(SigningKeyError, match="REPRO_TRACK_SIGNING_KEY=.*repro-track keygen"):
            signing.sign_staged(tmp_path, "d")

    def test_unset_key_signs_nothing(self, tmp_path: Path):
        assert "REPRO_TRACK_SIGNING_KEY" not in os.environ
        assert signing.sign_staged(tmp_path, "d") is None
        assert signing.check_tree(tmp_path) == signing.UNSIGNED
