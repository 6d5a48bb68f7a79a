"""repro-track behaves like MLflow's own integrations: the user's experiment, MLflow's context tags,
images in log_image's layout, servers reached with MLflow's credentials and TLS settings, and a
decorator that keeps the decorated function's type."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import repro_track
from conftest import free_port, run_git, run_script, write_project
from repro_track import delivery, spool, tags
from repro_track.records import RecordingWarning

REPO = Path(__file__).resolve().parents[1]
# What MlflowClient.log_image writes for a key and step (the UI's image grid parses these names).
LOG_IMAGE_NAME = re.compile(r"images/(?P<key>[^+]+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+"
                            r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
                            r"(?P<thumb>\+compressed)?\.(?P<ext>png|webp)")


@pytest.fixture
def fluent_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """MLflow's fluent experiment choice (a module global and MLFLOW_EXPERIMENT_ID) restored after."""
    from mlflow.tracking import fluent

    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    saved = os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    yield
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    if saved is not None:
        os.environ["MLFLOW_EXPERIMENT_ID"] = saved


def sweep_image(seed: int, num_inference_steps: int = 4) -> np.ndarray:
    """A tiny (1, 8, 8, 3) float image that depends on the seed, as a pipeline returns one."""
    return np.random.default_rng(seed).random((1, 8, 8, 3)).astype(np.float32)


def recorded_run(fn: Any, client: Any) -> Any:
    outcome = repro_track.last_recording(fn)
    assert outcome is not None and outcome.wait(120) is not None, outcome
    return client.get_run(outcome.run_id)


def artifact_paths(client: Any, run_id: str, folder: str = "") -> list[str]:
    paths = []
    for item in client.list_artifacts(run_id, folder or None):
        paths += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return sorted(paths)


class TestExperimentChoice:
    """With no experiment given, a recording goes where MLflow's fluent API would log."""

    @pytest.mark.parametrize("how", ["set_experiment", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"])
    def test_follows_the_users_choice(self, migrated_store: str, client: Any, fluent_state: None,
                                      monkeypatch: pytest.MonkeyPatch, how: str) -> None:
        import mlflow

        if how == "set_experiment":
            mlflow.set_experiment("mine")
        elif how == "MLFLOW_EXPERIMENT_NAME":
            monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
        else:
            monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", client.create_experiment("mine"))

        @repro_track.record
        def sweep(seed: int) -> np.ndarray:
            return sweep_image(seed)

        sweep(1)
        run = recorded_run(sweep, client)
        assert client.get_experiment(run.info.experiment_id).name == "mine"
        assert mlflow.active_run() is None  # read, never changed

    def test_nothing_chosen_keeps_repro_track_in_the_model_development_view(
            self, migrated_store: str, client: Any, fluent_state: None) -> None:
        @repro_track.record
        def sweep(seed: int) -> np.ndarray:
            return sweep_image(seed)

        sweep(1)
        experiment = client.get_experiment(recorded_run(sweep, client).info.experiment_id)
        assert experiment.name == "repro-track"
        assert experiment.tags[tags.MLFLOW_EXPERIMENT_KIND] == "custom_model_development"

    def test_the_decorators_experiment_wins(self, migrated_store: str, client: Any,
                                            fluent_state: None) -> None:
        import mlflow

        mlflow.set_experiment("mine")

        @repro_track.record(experiment="named")
        def sweep(seed: int) -> np.ndarray:
            return sweep_image(seed)

        sweep(1)
        assert client.get_experiment(recorded_run(sweep, client).info.experiment_id).name == "named"

    def test_another_stores_choice_is_not_followed(self, migrated_store: str, client: Any,
                                                   fluent_state: None, tmp_path: Path) -> None:
        import mlflow

        mlflow.set_experiment("mine")  # in the fluent API's store (MLFLOW_TRACKING_URI)
        other = f"sqlite:///{tmp_path / 'other.db'}"

        @repro_track.record(tracking_uri=other)
        def sweep(seed: int) -> np.ndarray:
            return sweep_image(seed)

        sweep(1)
        assert repro_track.flush(120)  # two processes creating one SQLite store's tables at once can clash
        from mlflow.tracking import MlflowClient

        other_client = MlflowClient(tracking_uri=other)
        run = recorded_run(sweep, other_client)
        assert other_client.get_experiment(run.info.experiment_id).name == "repro-track"


SCRIPT = '''
    import numpy as np

    import repro_track


    @repro_track.record
    def generate(seed: int) -> np.ndarray:
        return np.random.default_rng(seed).random((1, 8, 8, 3)).astype(np.float32)


    if __name__ == "__main__":
        generate(3)
        print(repro_track.last_recording(generate).wait(120))
'''


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git executable")
class TestContextTags:
    """Runs carry the tags of MLflow's run-context registry, as MLflow's own runs do."""

    def test_user_and_git_tags(self, migrated_store: str, client: Any, tmp_path: Path) -> None:
        project = write_project(tmp_path / "project", {"gen.py": SCRIPT})
        run_git(project, "init", "-q")
        run_git(project, "checkout", "-q", "-b", "feature/noise")
        run_git(project, "config", "user.name", "Test User")
        run_git(project, "config", "user.email", "test@example.com")
        run_git(project, "remote", "add", "origin", "https://someone:s3cr3t-t0ken@example.com/org/proj.git")
        run_git(project, "add", "gen.py")
        run_git(project, "commit", "-q", "-m", "script")
        env = {**os.environ, "MLFLOW_TRACKING_URI": migrated_store, "REPRO_TRACK_DELIVERY": "sync",
               "LOGNAME": "ada", "USER": "ada"}
        env.pop("MLFLOW_TRACKING_USERNAME", None)
        done = run_script(project / "gen.py", env=env, cwd=project)
        assert done.returncode == 0, done.stderr
        run = client.get_run(done.stdout.split()[-1])
        found = run.data.tags
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                                text=True, check=True).stdout.strip()
        assert {k: found.get(k) for k in (tags.MLFLOW_USER, tags.MLFLOW_GIT_BRANCH, tags.MLFLOW_GIT_REPO_URL,
                                          tags.MLFLOW_GIT_COMMIT, tags.MLFLOW_SOURCE_TYPE,
                                          tags.MLFLOW_SOURCE_NAME)} == {
            tags.MLFLOW_USER: "ada", tags.MLFLOW_GIT_BRANCH: "feature/noise",
            tags.MLFLOW_GIT_REPO_URL: "https://example.com/org/proj.git", tags.MLFLOW_GIT_COMMIT: commit,
            tags.MLFLOW_SOURCE_TYPE: "LOCAL", tags.MLFLOW_SOURCE_NAME: "gen.py"}
        assert "s3cr3t" not in repr(found)


class TestImages:
    """Output images are MLflow images: log_image's files, key and step, and one copy of each."""

    def test_layout_is_log_images(self, migrated_store: str, client: Any, fluent_state: None) -> None:
        @repro_track.record
        def sweep(seed: int, num_inference_steps: int = 4) -> np.ndarray:
            return sweep_image(seed, num_inference_steps)

        sweep(1)
        ours = recorded_run(sweep, client)
        theirs = client.create_run(ours.info.experiment_id)
        client.log_image(theirs.info.run_id, sweep_image(1)[0], key="output", step=4, synchronous=True)

        def shape(run_id: str) -> list[tuple[str, str, str, str]]:
            found = [LOG_IMAGE_NAME.fullmatch(p) for p in artifact_paths(client, run_id, tags.IMAGES_DIR)]
            assert all(found), artifact_paths(client, run_id, tags.IMAGES_DIR)
            return sorted((m["key"], m["step"], m["thumb"] or "", m["ext"]) for m in found if m)

        assert shape(ours.info.run_id) == shape(theirs.info.run_id) == [
            ("output", "4", "", "png"), ("output", "4", "+compressed", "webp")]
        logged = client.get_run(theirs.info.run_id).data.tags[tags.MLFLOW_LOGGED_IMAGES]
        assert ours.data.tags[tags.MLFLOW_LOGGED_IMAGES] == logged

    def test_seed_sweep_has_one_copy_per_image_and_the_card_links_it(
            self, migrated_store: str, client: Any, fluent_state: None) -> None:
        @repro_track.record
        def sweep(seed: int) -> dict[str, np.ndarray]:
            return {"images": np.concatenate([sweep_image(seed), sweep_image(seed + 100)])}

        for seed in (1, 2, 3):
            sweep(seed)
            run = recorded_run(sweep, client)
            paths = artifact_paths(client, run.info.run_id)
            pictures = [p for p in paths if p.endswith((".png", ".webp", ".jpg"))]
            assert all(p.startswith(f"{tags.IMAGES_DIR}/") for p in pictures), pictures
            keys = sorted(LOG_IMAGE_NAME.fullmatch(p)["key"] for p in pictures if p.endswith(".png"))
            assert keys == ["images~0", "images~1"]
            card = run.data.tags[tags.MLFLOW_NOTE]
            for png in (p for p in pictures if p.endswith(".png")):
                from urllib.parse import quote

                assert f"get-artifact?path={quote(png, safe='')}&run_uuid={run.info.run_id}" in card

    def test_a_spooled_recording_uploads_the_same_images_later(
            self, migrated_store: str, client: Any, fluent_state: None, monkeypatch: pytest.MonkeyPatch) -> None:
        down = f"http://127.0.0.1:{free_port()}"
        monkeypatch.setenv("REPRO_TRACK_DELIVERY", "sync")

        @repro_track.record(tracking_uri=down)
        def sweep(seed: int) -> np.ndarray:
            return sweep_image(seed)

        with pytest.warns(RecordingWarning, match="not reachable"):
            sweep(7)
        [entry] = list(spool.pending())
        staged = sorted(p.relative_to(entry.path).as_posix()  # the images lie as uploaded
                        for p in (entry.path / tags.IMAGES_DIR).iterdir())
        report = delivery.sync(tracking_uri=migrated_store)
        [uploaded] = report.uploaded
        run = client.get_run(uploaded["run_id"])
        assert artifact_paths(client, run.info.run_id, tags.IMAGES_DIR) == staged
        assert run.data.tags[tags.MLFLOW_LOGGED_IMAGES] == "True"


class TestNativeInputs:
    """The pipeline is a logged model linked to the run, image arguments are the run's dataset inputs."""

    def test_seed_sweep_shares_one_logged_model_and_lists_its_image_input(
            self, migrated_store: str, client: Any, model_dir: Path, fluent_state: None) -> None:
        import diffusers
        import torch
        from PIL import Image

        pipe = diffusers.DDIMPipeline.from_pretrained(str(model_dir / "tiny-ddim"))
        pipe.set_progress_bar_config(disable=True)
        mask = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))

        @repro_track.record
        def generate(pipe: Any, mask: Any, seed: int) -> np.ndarray:
            return pipe(num_inference_steps=1, generator=torch.Generator().manual_seed(seed),
                        output_type="np").images

        runs = []
        for seed in (1, 2):
            generate(pipe, mask, seed)
            runs.append(recorded_run(generate, client))
        models = [[m.model_id for m in run.inputs.model_inputs] for run in runs]
        assert len(models[0]) == 1 and models[0] == models[1]
        model = client.get_logged_model(models[0][0])
        assert (model.name, model.model_type, str(model.status)) == ("tiny-ddim", "diffusers-pipeline", "READY")
        assert model.params["class"] == "diffusers.pipelines.ddim.pipeline_ddim.DDIMPipeline"
        assert model.source_run_id == runs[0].info.run_id
        [image_input] = runs[1].inputs.dataset_inputs
        manifest = Path(client.download_artifacts(runs[1].info.run_id, tags.MANIFEST_PATH))
        recorded = json.loads(manifest.read_text("utf-8"))["arguments"]["mask"]
        assert (image_input.dataset.name, image_input.dataset.source_type, image_input.dataset.digest) == (
            "mask", "repro-track", recorded["sha256"][:32])
        assert json.loads(image_input.dataset.source) == {"artifact": tags.INPUTS_PATH, "key": "mask"}

    def test_a_deleted_logged_model_is_made_again(self, migrated_store: str, client: Any, model_dir: Path,
                                                  fluent_state: None) -> None:
        # The uploading process remembers which logged model a pipeline is; when that model is
        # deleted meanwhile, the next run of the pipeline links to a new one, not to the deleted one.
        import diffusers
        import torch

        pipe = diffusers.DDIMPipeline.from_pretrained(str(model_dir / "tiny-ddim"))
        pipe.set_progress_bar_config(disable=True)

        @repro_track.record
        def generate(pipe: Any, seed: int) -> np.ndarray:
            return pipe(num_inference_steps=1, generator=torch.Generator().manual_seed(seed),
                        output_type="np").images

        generate(pipe, 1)
        [first] = [m.model_id for m in recorded_run(generate, client).inputs.model_inputs]
        client.delete_logged_model(first)
        generate(pipe, 2)
        [second] = [m.model_id for m in recorded_run(generate, client).inputs.model_inputs]
        assert second != first
        assert str(client.get_logged_model(second).status) == "READY"


# ---------------------------------------------------------------- servers behind a proxy

TOKEN = "good-token-1234"


class _Proxy(http.server.ThreadingHTTPServer):
    daemon_threads = True
    upstream: str
    token: str


class _Forward(http.server.BaseHTTPRequestHandler):
    """Forward every request to the upstream server, if it carries the bearer token (every path)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _any(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":  # type: ignore[attr-defined]
            self._answer(401, {"WWW-Authenticate": "Bearer"}, b"token required")
            return
        host, port = self.server.upstream.split(":")  # type: ignore[attr-defined]
        upstream = http.client.HTTPConnection(host, int(port), timeout=60)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "authorization", "connection", "transfer-encoding")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        answer = upstream.getresponse()
        data = answer.read()
        keep = {k: v for k, v in answer.getheaders()
                if k.lower() not in ("transfer-encoding", "connection", "content-length")}
        upstream.close()
        self._answer(answer.status, keep, data)

    def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here with the cryptography package."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def proxy(mlflow_server: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A loopback reverse proxy to the session's mlflow server demanding a bearer token everywhere;
    ``request.param == "https"`` serves it over TLS with a self-signed certificate."""
    server = _Proxy(("127.0.0.1", 0), _Forward)
    server.upstream = f"127.0.0.1:{mlflow_server.port}"
    server.token = TOKEN
    scheme = getattr(request, "param", "http")
    cert = None
    if scheme == "https":
        cert, key = self_signed(tmp_path)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"{scheme}://127.0.0.1:{server.server_address[1]}", "cert": cert}
    server.shutdown()
    server.server_close()


def record_through(url: str) -> tuple[Any, list[warnings.WarningMessage]]:
    @repro_track.record(tracking_uri=url, experiment="behind-proxy")
    def sweep(seed: int) -> np.ndarray:
        return sweep_image(seed)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sweep(5)
        outcome = repro_track.last_recording(sweep)
        assert outcome is not None
        outcome.wait(60)
    return outcome, [w for w in caught if issubclass(w.category, RecordingWarning)]


@pytest.mark.slow
class TestServersAsMlflowReachesThem:
    """Probe and upload use MLflow's credentials and TLS settings; a refusal is an auth error."""

    @pytest.fixture(autouse=True)
    def _sync(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("REPRO_TRACK_DELIVERY", "sync")
        for name in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS"):
            monkeypatch.delenv(name, raising=False)

    def test_token_lands_with_nothing_spooled(self, proxy: dict[str, Any],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
        outcome, warned = record_through(proxy["url"])
        assert (outcome.error, [str(w.message) for w in warned]) == (None, [])
        assert list(spool.pending()) == []
        run = MlflowClient(tracking_uri=proxy["url"]).get_run(outcome.run_id)
        assert run.info.status == "FINISHED" and run.data.tags[tags.MLFLOW_LOGGED_IMAGES] == "True"

    @pytest.mark.parametrize("token", [None, "wrong-token"], ids=["no-token", "wrong-token"])
    def test_refused_credentials_warn_once_as_an_auth_error(self, proxy: dict[str, Any], token: str | None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
        if token:
            monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
        outcome, warned = record_through(proxy["url"])
        assert len(warned) == 1, [str(w.message) for w in warned]
        message = str(warned[0].message)
        assert "refused the credentials (HTTP 401" in message and "MLFLOW_TRACKING_TOKEN" in message
        assert "not reachable" not in message
        assert outcome.run_id is None and len(list(spool.pending())) == 1

    @pytest.mark.parametrize("proxy", ["https"], indirect=True)
    def test_https_with_a_private_certificate(self, proxy: dict[str, Any],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
        outcome, warned = record_through(proxy["url"])
        assert len(warned) == 1 and "MLFLOW_TRACKING_SERVER_CERT_PATH" in str(warned[0].message)
        assert outcome.run_id is None

        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(proxy["cert"]))
        outcome, warned = record_through(proxy["url"])
        assert (outcome.error, [str(w.message) for w in warned]) == (None, [])
        assert outcome.run_id is not None

    def test_a_down_server_is_found_within_the_probe_deadline(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import time

        from repro_track import store
        from repro_track.errors import StoreAuthError, StoreError

        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")  # MLflow's minutes of retries
        started = time.monotonic()
        with pytest.raises(StoreError, match="is not reachable") as raised:
            store.probe(f"http://127.0.0.1:{free_port()}")
        assert not isinstance(raised.value, StoreAuthError)
        assert time.monotonic() - started < 10


# ---------------------------------------------------------------- types

TYPED = '''
    import repro_track


    @repro_track.record
    def generate(prompt: str, steps: int = 4) -> float:
        return 1.0


    @repro_track.record(experiment="x")
    def generate_named(prompt: str) -> float:
        return 1.0


    value: float = generate("a cat", steps=2)
    named: float = generate_named("a dog")
    generate("a cat", steps="many")
    generate_named(3)
'''


@pytest.mark.slow
def test_record_keeps_the_signature_for_type_checkers(tmp_path: Path) -> None:
    """mypy sees the decorated function's own parameters and return type, in both decorator forms."""
    pytest.importorskip("mypy")
    script = write_project(tmp_path, {"typed.py": TYPED}) / "typed.py"
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", os.devnull,
                           "--follow-imports=silent", "--ignore-missing-imports", str(script)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    errors = [line.split(": error: ", 1)[1] for line in done.stdout.splitlines() if ": error: " in line]
    assert len(errors) == 2, done.stdout
    assert '"steps"' in errors[0] and '"str"' in errors[0] and '"int"' in errors[0]
    assert '"generate_named"' in errors[1] and '"int"' in errors[1] and '"str"' in errors[1]
