"""Secrets never leave the process: repro_track.scrub's rules, and a planted corpus recorded end to end.

The corpus plants one secret of each kind (an AWS key id, an ``hf_`` token, a GitHub token, a password in
a URL, a keyword-assigned password, a high-entropy string) in each place a recording writes (an
environment variable, the git remote URL, the uncommitted diff, a string argument, a nested config
argument, an exception message, a pipeline component's config), records into a real MLflow SQLite
store and once more with the store unreachable, then reads every byte of the store, its artifacts and
the spool. Secrets are made at run time from a seeded generator, so none sits in this file's source.
"""

from __future__ import annotations

import json
import random
import shutil
import string
import sys
import textwrap
import uuid
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import free_port, run_git
from repro_track import scrub

ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits
KINDS = ("aws", "hf", "github", "url_password", "keyword", "high_entropy")
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git executable")


def _text(rng: random.Random, alphabet: str, size: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(size))


def planted(place: str) -> dict[str, tuple[str, str]]:
    """For one place, each kind's (text to plant, secret that must never be stored); unique per place."""
    rng = random.Random(f"repro-track corpus {place}")
    aws = "AKIA" + _text(rng, UPPER_DIGITS, 16)
    hf = "hf_" + _text(rng, ALNUM, 34)
    github = "ghp_" + _text(rng, ALNUM, 36)
    url_password = "Pw" + _text(rng, ALNUM, 10) + "!"
    keyword = "Kw" + _text(rng, ALNUM, 10) + "#"
    # 24 distinct characters: 4.58 bits each, over detect-secrets' 4.5 limit and under the 32-character
    # runs repro-track's own rule looks at, so only the high-entropy plugin can catch it.
    high_entropy = "".join(rng.sample(ALNUM, 24))
    return {
        "aws": (aws, aws),
        "hf": (hf, hf),
        "github": (github, github),
        "url_password": (f"postgresql://admin:{url_password}@db.example.com:5432/prod", url_password),
        "keyword": (f'DB_PASSWORD = "{keyword}"', keyword),
        "high_entropy": (high_entropy, high_entropy),
    }


# ---------------------------------------------------------------- the rules

class TestHoldsSecret:
    """Each kind of secret is found and blanked, with the text around it kept."""

    @pytest.mark.parametrize("kind", KINDS)
    def test_each_kind_alone(self, kind: str) -> None:
        text, secret = planted("unit")[kind]
        assert scrub.holds_secret(text)
        assert secret not in scrub.blank(text)

    @pytest.mark.parametrize("kind", KINDS)
    def test_each_kind_inside_a_sentence(self, kind: str) -> None:
        text, secret = planted("sentence")[kind]
        blanked = scrub.blank(f"could not connect ({text}); retrying in 5 s")
        assert secret not in blanked
        assert blanked.startswith("could not connect (") and blanked.endswith("); retrying in 5 s")
        assert scrub.REDACTED in blanked

    @pytest.mark.parametrize(
        "line",
        ['DB_PASSWORD = "Sup3rS3cret!"', 'api_key = "a1b2c3d4e5f6a7b8"', "secret: 'q9Lm2Vx7Rt4Kp1Zs'",
         'conn = connect(password="hunter2x")', 'token = "' + "a1B2c3D4" * 3 + '"'],
    )
    def test_keyword_assigned_values(self, line: str) -> None:
        # The shapes the issue measured leaking through the diff scrub.
        assert scrub.holds_secret(line)
        value = line.split('"')[1] if '"' in line else line.split("'")[1]
        assert value not in scrub.blank(line)

    @pytest.mark.parametrize(
        ("text", "secret"),
        [("connection failed: host=db user=me password=Hunter22x dbname=prod", "Hunter22x"),
         ("login rejected, pwd: Zebra77q", "Zebra77q")],
    )
    def test_unquoted_keyword_values(self, text: str, secret: str) -> None:
        # Config-style assignments as libraries quote them in error messages (detect-secrets' keyword plugin).
        assert secret not in scrub.blank(text)
        assert scrub.blank(text).startswith(text.split(secret)[0])

    @pytest.mark.parametrize("relative", [
        "repro-track-bench-94ru58x7/tiny-ddim",
        "pytest-146/popen-gw1/test_replay0/models/tiny-ddim",
        "hub/models--org--tiny/snapshots/0123456789abcdef0123456789abcdef01234567/unet",
    ], ids=["temp-folder", "pytest-folder", "hub-snapshot"])
    def test_model_paths_are_not_secrets(self, tmp_path: Path, relative: str) -> None:
        # A pipeline's folder is how a replay loads it: blanking it would make the run unreplayable.
        path = str(tmp_path / relative)
        assert not scrub.holds_secret(path) and scrub.blank(path) == path

    def test_multi_line_text(self) -> None:
        # A traceback: the keyword value on one line is blanked on every line, a PEM body line by line,
        # and an unquoted value does not run on into the next line.
        rng = random.Random("pem")
        body = [_text(rng, ALNUM + "+/", 64) for _ in range(3)]
        text = "\n".join(["Traceback (most recent call last):", '  File "x.py", line 3, in f',
                          "RuntimeError: login failed password: Hunter22x", "user said Hunter22x again",
                          "-----BEGIN PRIVATE KEY-----", *body, "-----END PRIVATE KEY-----"])
        blanked = scrub.blank(text)
        assert "Hunter22x" not in blanked and not any(line in blanked for line in body)
        assert blanked.split("\n")[:2] == text.split("\n")[:2]

    def test_short_url_password_is_blanked_by_position(self) -> None:
        blanked = scrub.blank("https://me:pw@host.example.com/x")
        assert blanked == f"https://me:{scrub.REDACTED}@host.example.com/x"

    def test_every_occurrence_is_blanked(self) -> None:
        hf = planted("twice")["hf"][1]
        assert hf not in scrub.blank(f"token {hf} rejected\n  raise ValueError('bad {hf}')")

    @pytest.mark.parametrize(
        "value",
        [
            "0123456789abcdef0123456789abcdef01234567",  # git commit
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",  # sha256
            "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c",  # MLflow run id
            "6f2a4e5c-1234-5678-9abc-def012345678",  # UUID
            "GPU-6f2a4e5c-1234-5678-9abc-def012345678",
            "commit 0123456789abcdef0123456789abcdef01234567 of run 4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c",
            "a photo of an astronaut riding a horse on mars",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "expandable_segments:True,garbage_collection_threshold:0.6,roundup_power2_divisions:16",
            "build/pytest-of-someone/pytest-12/models0/tiny-text2image",
            "https://github.com/org/repo.git",
            "git@github.com:org/repo.git",
            "scaled_linear",
            ":4096:8",
            "CrossAttnDownBlock2D",
            "diffusers.schedulers.scheduling_ddim.DDIMScheduler",
        ],
    )
    def test_identifiers_and_ordinary_text_are_kept(self, value: str) -> None:
        assert not scrub.holds_secret(value), scrub.secret_parts(value)
        assert scrub.blank(value) == value

    def test_hex_identifier_next_to_a_keyword_is_still_a_secret(self) -> None:
        assert scrub.holds_secret('api_key = "4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c"')


class TestBlankProperty:
    """Whatever the secret's random content and the text around it, blanking leaves none of it."""

    @settings(max_examples=200, deadline=None)
    @given(seed=st.integers(min_value=0, max_value=2**32), kind=st.sampled_from(KINDS),
           prefix=st.text(alphabet=string.ascii_letters + " :,;()", max_size=20),
           suffix=st.text(alphabet=string.ascii_letters + " :,;()", max_size=20))
    def test_never_survives(self, seed: int, kind: str, prefix: str, suffix: str) -> None:
        text, secret = planted(f"property {seed}")[kind]
        blanked = scrub.blank(f"{prefix} {text} {suffix}")
        assert secret not in blanked
        assert blanked.startswith(f"{prefix} ")


class TestJson:
    """Nested values: any credential string or credential-named key counts; blanking keeps the rest."""

    def test_named_key_and_nested_string(self) -> None:
        hf = planted("json")["hf"][1]
        value = {"db": {"password": "hunter22", "host": "db"}, "models": [{"id": "x", "note": f"t {hf}"}],
                 "use_auth": True, "max_tokens": 7}
        assert scrub.json_holds_secret(value)
        blanked = scrub.blank_json(value)
        assert blanked == {"db": {"password": scrub.REDACTED, "host": "db"},
                           "models": [{"id": "x", "note": f"t {scrub.REDACTED}"}], "use_auth": True,
                           "max_tokens": 7}

    def test_secret_as_a_key(self) -> None:
        hf = planted("json key")["hf"][1]
        assert scrub.json_holds_secret({"tokens": {hf: 1}})
        assert hf not in json.dumps(scrub.blank_json({"tokens": {hf: 1}}))

    def test_too_deep_is_hidden_not_passed(self) -> None:
        deep: Any = "plain"
        for _ in range(40):
            deep = [deep]
        assert scrub.json_holds_secret(deep)
        assert scrub.REDACTED in json.dumps(scrub.blank_json(deep))

    def test_clean_config_untouched(self) -> None:
        config = {"beta_schedule": "scaled_linear", "pad_token_id": 1, "num_train_timesteps": 1000,
                  "_commit_hash": "0123456789abcdef0123456789abcdef01234567"}
        assert not scrub.json_holds_secret(config)
        assert scrub.blank_json(config) == config


class TestArgumentNames:
    """Credential argument names, widened to the ones the issue found recorded."""

    @pytest.mark.parametrize(
        ("name", "secret"),
        [("pwd", True), ("passwd", True), ("conn_str", True), ("connection_string", True),
         ("connectionString", True), ("dsn", True), ("db_dsn", True), ("secret", True), ("auth", True),
         ("credentials", True), ("private_key", True), ("cookie", True), ("session", True),
         ("database_url", True), ("hf_token", True),
         ("prompt", False), ("tokenizer", False), ("max_tokens", False), ("pad_token", False),
         ("revision", False), ("run_id", False), ("key", False), ("token_id", False), ("passes", False)],
    )
    def test_table(self, name: str, secret: bool) -> None:
        assert scrub.is_secret_argument(name) is secret

    @pytest.mark.parametrize(("name", "secret"),
                             [("HF_PWD", True), ("CUDA_DSN", True), ("HF_HUB_OFFLINE", False)])
    def test_environment_names(self, name: str, secret: bool) -> None:
        assert scrub.is_secret_name(name) is secret


# ---------------------------------------------------------------- recorded end to end

PROJECT_MODULE = '''
    """A recorded function in its own git repository, for the secret corpus."""
    import numpy as np

    import repro_track

    MESSAGE = ""


    @repro_track.record(experiment="secrets")
    def generate(pipe, *, fail=False, **extras):
        if fail:
            raise RuntimeError(MESSAGE)
        return np.zeros(4, dtype=np.float32)
'''


def make_project(root: Path, module: str, remote: str) -> Path:
    """A committed git repository holding ``<module>.py`` and settings.py, with ``remote`` as origin."""
    root.mkdir(parents=True)
    (root / f"{module}.py").write_text(textwrap.dedent(PROJECT_MODULE), "utf-8")
    (root / "settings.py").write_text("STEPS = 2\n", "utf-8")
    run_git(root, "init", "-q")
    run_git(root, "remote", "add", "origin", remote)
    return root


def commit_all(root: Path) -> None:
    run_git(root, "add", ".")
    run_git(root, "commit", "-q", "-m", "project")


def import_project(root: Path, module: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    import importlib

    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, module, raising=False)
    return importlib.import_module(module)


def settle(fn: Any) -> Any:
    import repro_track

    outcome = repro_track.last_recording(fn)
    assert outcome is not None
    outcome.wait(120)
    return outcome


def stored_manifest(client: Any, run_id: str) -> dict[str, Any]:
    from mlflow.utils.file_utils import local_file_uri_to_path

    from repro_track import tags

    root = Path(local_file_uri_to_path(client.get_run(run_id).info.artifact_uri))
    return json.loads((root / tags.MANIFEST_PATH).read_text("utf-8"))


def files_under(root: Path, skip: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and skip not in p.parents]


@pytest.fixture(scope="module")
def ddim_pipe(model_dir: Path) -> Any:
    """A private tiny DDIM pipeline (its scheduler config gets planted values)."""
    from repro_track import testing

    return testing.load_pipeline(model_dir / "tiny-ddim", progress=False)


@needs_git
class TestSecretCorpus:
    """No planted secret reaches the store, its artifacts or the spool, logged or spooled."""

    def test_nothing_found(self, tmp_path: Path, migrated_store: str, client: Any, ddim_pipe: Any,
                           monkeypatch: pytest.MonkeyPatch) -> None:
        secrets: list[tuple[str, str, str]] = []  # (place, kind, secret)

        def plant(place: str) -> dict[str, str]:
            corpus = planted(place)
            secrets.extend((place, kind, secret) for kind, (_, secret) in corpus.items())
            return {kind: text for kind, (text, _) in corpus.items()}

        remote = plant("git remote")
        secret_url = remote["url_password"].replace("postgresql://", "https://")
        remote_url = (f"{secret_url.split('/prod')[0]}/{remote['aws']}/{remote['hf']}/{remote['github']}/"
                      f"{remote['high_entropy']}/password={planted('git remote')['keyword'][1]}/repo.git")
        project = make_project(tmp_path / "project", "planted_secrets", remote_url)
        names = plant("git branch and file names")
        run_git(project, "checkout", "-q", "-b", f"deploy/{names['aws']}/{names['github']}")
        diff = plant("git diff")
        (project / "settings.py").write_text(f'REMOVED = "{diff["hf"]}"\nSTEPS = 2\n', "utf-8")
        commit_all(project)
        for kind in ("hf", "high_entropy"):
            (project / f"notes-{names[kind]}.txt").write_text("untracked\n", "utf-8")
        lines = [f'AWS_ID = "{diff["aws"]}"', f'GITHUB = "{diff["github"]}"',
                 f'DB_URL = "{diff["url_password"]}"', diff["keyword"], f'SALT = "{diff["high_entropy"]}"']
        (project / "settings.py").write_text("STEPS = 2\n" + "\n".join(lines) + "\n", "utf-8")

        for i, (kind, text) in enumerate(plant("env var").items()):
            monkeypatch.setenv(f"CUDA_PLANTED_{i}", text)
        extras = {f"note_{kind}": text for kind, text in plant("argument").items()}
        extras |= {f"config_{kind}": {"outer": {"inner": ["x", text]}}
                   for kind, text in plant("nested config").items()}
        extras["config_named"] = {"db": {"password": planted("nested config")["keyword"][1]}}
        pipeline = plant("pipeline config")
        ddim_pipe.scheduler.register_to_config(**{f"planted_{kind}": text for kind, text in pipeline.items()},
                                               db_password=planted("pipeline config")["keyword"][1])
        message = " | ".join(plant("exception message").values())

        module = import_project(project, "planted_secrets", monkeypatch)
        module.MESSAGE = message
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logged = self._record_twice(module, ddim_pipe, extras)
            monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
            spooled = self._record_twice(module, ddim_pipe, extras)

        assert all(o.run_id for o in logged), logged
        assert all(o.run_id is None and o.spool_path and o.spool_path.is_dir() for o in spooled), spooled
        stored = files_under(tmp_path, skip=project)
        assert any(p.name == "mlflow.db" for p in stored) and any("spool" in p.parts for p in stored)
        found = [(place, kind, str(path.relative_to(tmp_path))) for path in stored
                 for place, kind, secret in secrets if secret.encode() in path.read_bytes()]
        assert found == [], f"planted secrets stored: {found}"
        self._check_places_were_recorded(stored_manifest(client, logged[0].run_id),
                                         stored_manifest(client, logged[1].run_id))

    @staticmethod
    def _record_twice(module: Any, pipe: Any, extras: dict[str, Any]) -> list[Any]:
        module.generate(pipe, **extras)
        ok = settle(module.generate)
        with pytest.raises(RuntimeError):
            module.generate(pipe, fail=True, **extras)
        return [ok, settle(module.generate)]

    @staticmethod
    def _check_places_were_recorded(ok: dict[str, Any], failed: dict[str, Any]) -> None:
        """Each place was captured and blanked, not skipped: the corpus tests what it claims to."""
        assert {f"CUDA_PLANTED_{i}" for i in range(len(KINDS))} <= set(ok["env_vars"]["redacted"])
        assert ok["git"]["remote_url"] and scrub.REDACTED in ok["git"]["remote_url"]
        assert ok["git"]["dirty"] and ok["git"]["diff_sha256"]
        assert scrub.REDACTED in ok["git"]["branch"] and len(ok["git"]["untracked"]) == 2
        args = ok["arguments"]
        assert all(args[f"note_{kind}"]["kind"] == "redacted" for kind in KINDS)
        assert all(args[f"config_{kind}"]["kind"] == "redacted" for kind in KINDS)
        assert args["config_named"]["kind"] == "redacted"
        config = args["pipe"]["pipeline"]["components"]["scheduler"]["config"]
        assert config["db_password"] == scrub.REDACTED
        assert all(scrub.REDACTED in config[f"planted_{kind}"] for kind in KINDS)
        error = failed["call"]["error"]
        assert error["message"].count(scrub.REDACTED) >= len(KINDS)
        assert "RuntimeError" in error["traceback"]


@needs_git
class TestCleanRun:
    """A clean run's manifest has nothing redacted: identifiers, configs and prompts are all kept."""

    def test_nothing_redacted(self, tmp_path: Path, migrated_store: str, client: Any, model_dir: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
        from repro_track import testing

        project = make_project(tmp_path / "project", "clean_project", "https://github.com/org/repo.git")
        commit_all(project)
        module = import_project(project, "clean_project", monkeypatch)
        text2image = testing.load_pipeline(model_dir / "tiny-text2image", progress=False)
        commit = run_git(project, "rev-parse", "HEAD")
        extras = {"revision": commit, "parent_run": uuid.uuid4().hex, "request_id": str(uuid.uuid4()),
                  "weights_sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                  "prompt": "a photo of an astronaut riding a horse on mars",
                  "model_id": "org/stable-diffusion-v1-5",
                  "text2image": text2image, "guidance_scale": 7.5, "schedule": {"steps": 2, "eta": 0.0}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module.generate(testing.load_pipeline(model_dir / "tiny-ddim", progress=False), **extras)
        outcome = settle(module.generate)
        assert outcome.run_id, outcome
        manifest = stored_manifest(client, outcome.run_id)
        assert scrub.REDACTED not in json.dumps(manifest)
        assert manifest["env_vars"]["redacted"] == []
        assert [n for n, a in manifest["arguments"].items() if a["kind"] == "redacted"] == []
        assert manifest["git"]["commit"] == commit
        assert manifest["git"]["remote_url"] == "https://github.com/org/repo.git"
        assert manifest["arguments"]["revision"]["value"] == commit
