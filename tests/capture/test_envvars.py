"""Tests for repro_track.capture.envvars: the allow-list, and that secrets never come out."""

from __future__ import annotations

import base64
import json
import random
import string

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from repro_track.capture import envvars
from repro_track.capture.envvars import REDACTED

ALNUM = string.ascii_letters + string.digits
UUID = "6f2a4e5c-1234-5678-9abc-def012345678"


class TestNamedCases:
    """Common variables are kept, dropped or redacted as a user would expect."""

    def test_mixed_environment(self) -> None:
        environ = {
            "HF_TOKEN": "hf_" + "A1b2" * 8,
            "HF_HUB_TOKEN": "anything",
            "HUGGING_FACE_HUB_TOKEN": "not allow-listed at all",
            "CUDA_VISIBLE_DEVICES": "0,1",
            "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,max_split_size_mb:128",
            "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
            "HF_ENDPOINT": "https://user:hunter2@mirror.example.com",
            "PATH": "/usr/bin",
            "HOME": "home-of-someone",
        }
        result = envvars.capture_env_vars(environ)
        assert result == {
            "captured": {
                "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
                "CUDA_VISIBLE_DEVICES": "0,1",
                "HF_ENDPOINT": REDACTED,
                "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,max_split_size_mb:128",
            },
            "redacted": ["HF_ENDPOINT"],
            "dropped": ["HF_HUB_TOKEN", "HF_TOKEN"],
        }
        dumped = json.dumps(result)
        for secret in ("hunter2", "A1b2A1b2", "anything", "not allow-listed", "home-of-someone"):
            assert secret not in dumped

    def test_reads_os_environ_by_default(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        monkeypatch.setenv("HF_TOKEN", "hf_" + "z9" * 15)
        result = envvars.capture_env_vars()
        assert result["captured"]["OMP_NUM_THREADS"] == "3"
        assert "HF_TOKEN" in result["dropped"] and "HF_TOKEN" not in result["captured"]

    @pytest.mark.parametrize(
        "value",
        [
            f"GPU-{UUID}",
            f"GPU-{UUID},MIG-{UUID}",
            f"MIG-GPU-{UUID}/1/0",
            "/mnt/shared/models/stable-diffusion-v1-5",
            "expandable_segments:True,garbage_collection_threshold:0.6,roundup_power2_divisions:16",
            "8.0;8.6;9.0+PTX",
            "https://hf-mirror.example.com",
            "ssh://git@example.com/org/repo.git",
            "0",
        ],
    )
    def test_ordinary_values_survive(self, value: str) -> None:
        assert envvars.capture_env_vars({"CUDA_SOMETHING": value})["captured"]["CUDA_SOMETHING"] == value


class TestIsAllowed:
    """Exact names and prefixes are allowed; everything else is ignored."""

    @pytest.mark.parametrize(
        ("name", "allowed"),
        [
            ("PYTHONHASHSEED", True), ("OMP_NUM_THREADS", True), ("TF_ENABLE_ONEDNN_OPTS", True),
            ("TORCHINDUCTOR_FREEZING", True), ("CUBLASLT_LOG_LEVEL", True), ("HF_HUB_OFFLINE", True),
            ("PATH", False), ("TF_CPP_MIN_LOG_LEVEL", False), ("cuda_visible_devices", False),
            ("AWS_SECRET_ACCESS_KEY", False), ("PYTHONPATH", False),
        ],
    )
    def test_table(self, name: str, allowed: bool) -> None:
        assert envvars.is_allowed(name) is allowed


class TestSecretNames:
    """Credential-like names are recognised; KEY only as a word or known compound."""

    @pytest.mark.parametrize(
        ("name", "secret"),
        [
            ("HF_TOKEN", True), ("HF_HUB_TOKEN", True), ("TORCH_API_KEY", True), ("HF_APIKEY", True),
            ("CUDA_KEY", True), ("MKL_KEY_ID", True), ("HF_PASSWORD", True), ("TORCH_PASSWD", True),
            ("HF_CLIENT_SECRET", True), ("HF_CREDENTIALS_FILE", True), ("HF_AUTH", True),
            ("HF_SESSION_COOKIE", True), ("TORCH_PRIVATE_PEM", True), ("XFORMERS_SIGNATURE", True),
            ("HF_MONKEY_PATCH", False), ("TORCH_HOTKEY", False), ("CUDA_KEYBOARD", False),
            ("CUDA_VISIBLE_DEVICES", False), ("PYTORCH_CUDA_ALLOC_CONF", False),
            ("TORCHINDUCTOR_POST_GRAD_CUSTOM_PRE_PASS", False),
        ],
    )
    def test_table(self, name: str, secret: bool) -> None:
        assert envvars.looks_like_secret_name(name) is secret


class TestSecretArguments:
    """Argument names that carry credentials are recognised, tokenizer-ish ones are not."""

    @pytest.mark.parametrize(
        ("name", "secret"),
        [
            ("token", True), ("hf_token", True), ("use_auth_token", True), ("api_key", True),
            ("apikey", True), ("apiKey", True), ("access_key", True), ("private_key", True),
            ("password", True), ("secret", True), ("auth", True), ("credential", True),
            ("credentials", True), ("access_token", True), ("client_secret", True),
            ("tokenizer", False), ("tokenizer_2", False), ("max_tokens", False), ("num_tokens", False),
            ("pad_token", False), ("eos_token", False), ("author", False), ("prompt", False),
            ("generator", False), ("key", False), ("token_id", False),
        ],
    )
    def test_table(self, name: str, secret: bool) -> None:
        assert envvars.looks_like_secret_argument(name) is secret


def _random_text(rng: random.Random, alphabet: str, size: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(size))


@st.composite
def secrets_(draw: st.DrawFn) -> str:
    """A credential in one of the shapes that must be redacted, with random content."""
    rng = random.Random(draw(st.integers(min_value=0, max_value=2**32)))
    kind = draw(st.sampled_from(["url", "hf", "sk", "sk_live", "gh", "github_pat", "aws", "slack", "jwt",
                                 "pem", "hex", "base64", "urlsafe"]))
    body = _random_text(rng, ALNUM, draw(st.integers(min_value=24, max_value=60)))
    raw = rng.randbytes(draw(st.integers(min_value=24, max_value=64)))
    if kind == "url":
        user = _random_text(rng, string.ascii_lowercase, 5)
        return f"https://{user}:{body}@host.example.com/path"
    if kind == "hf":
        return f"hf_{body}"
    if kind == "sk":
        return f"sk-{body}"
    if kind == "sk_live":
        return f"sk_live_{body}"
    if kind == "gh":
        return f"{draw(st.sampled_from(['ghp', 'gho', 'ghu', 'ghs', 'ghr']))}_{body}"
    if kind == "github_pat":
        return f"github_pat_{body}"
    if kind == "aws":
        return "AKIA" + _random_text(rng, string.ascii_uppercase + string.digits, 16)
    if kind == "slack":
        return f"xox{draw(st.sampled_from('baprs'))}-{body}"
    if kind == "jwt":
        header = base64.urlsafe_b64encode(b'{"alg":"HS256"}').decode().rstrip("=")
        return f"{header}.{body}.{_random_text(rng, ALNUM, 20)}"
    if kind == "pem":
        return f"-----BEGIN PRIVATE KEY-----\n{base64.b64encode(raw).decode()}\n-----END PRIVATE KEY-----"
    if kind == "hex":
        token = raw.hex()
        # Hex of 32, 40 or 64 characters is a run id, commit or sha256 digest: an identifier, which
        # only a credential keyword next to it (api_key = "...") makes a secret.
        assume(len(token) not in (32, 40, 64))
    elif kind == "base64":
        token = base64.b64encode(raw).decode()
    else:
        token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    # The definition of a generated token: long, mixing letters and digits.
    assume(any(c.isalpha() for c in token) and any(c.isdigit() for c in token))
    return token


SAFE_AFFIX = st.text(alphabet=string.ascii_letters + " :,;=", max_size=12)


class TestSecretValuesProperty:
    """No secret-shaped value, wherever it sits in a variable, survives capture."""

    @settings(max_examples=300, deadline=None)
    @given(secret=secrets_(), prefix=SAFE_AFFIX, suffix=SAFE_AFFIX)
    def test_never_survives(self, secret: str, prefix: str, suffix: str) -> None:
        value = f"{prefix} {secret} {suffix}"
        assert envvars.looks_like_secret_value(value)
        result = envvars.capture_env_vars({"HF_ENDPOINT": value, "OMP_NUM_THREADS": "4"})
        assert result["captured"] == {"HF_ENDPOINT": REDACTED, "OMP_NUM_THREADS": "4"}
        assert result["redacted"] == ["HF_ENDPOINT"]
        assert secret not in json.dumps(result)

    @settings(max_examples=200, deadline=None)
    @given(
        stem=st.sampled_from(["HF", "TORCH", "CUDA", "MKL", "DIFFUSERS", "PYTORCH"]),
        word=st.sampled_from(["TOKEN", "SECRET", "PASSWORD", "API_KEY", "CREDENTIALS", "AUTH", "COOKIE",
                              "SESSION", "PRIVATE", "SIGNATURE", "KEY"]),
        value=st.text(max_size=40),
    )
    def test_secret_names_never_leak_values(self, stem: str, word: str, value: str) -> None:
        name = f"{stem}_{word}"
        result = envvars.capture_env_vars({name: value})
        assert result == {"captured": {}, "redacted": [], "dropped": [name]}

    @settings(max_examples=200, deadline=None)
    @given(value=st.one_of(st.integers(min_value=0, max_value=10**6).map(str),
                           st.lists(st.integers(0, 15), max_size=8).map(lambda xs: ",".join(map(str, xs))),
                           st.sampled_from(["True", "False", "1", "0", ":4096:8", ":16:8"])))
    def test_numeric_settings_survive(self, value: str) -> None:
        result = envvars.capture_env_vars({"CUBLAS_WORKSPACE_CONFIG": value})
        assert result["captured"] == {"CUBLAS_WORKSPACE_CONFIG": value}


class TestLocationOnly:
    """Cache and download locations are not recorded: they change no bits and are machine paths."""

    @pytest.mark.parametrize("name", ["TORCHINDUCTOR_CACHE_DIR", "HF_HOME", "TORCH_HOME", "HF_HUB_CACHE"])
    def test_not_captured(self, name):
        from repro_track.capture.envvars import capture_env_vars

        assert name not in capture_env_vars({name: "/somewhere/cache"})["captured"]

    def test_diffusers_import_does_not_add_a_difference(self):
        import subprocess
        import sys

        code = ("import json; from repro_track.capture.envvars import capture_env_vars as c; "
                "a = c(); import diffusers.pipelines; b = c(); print(json.dumps(a == b))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.stdout.strip().endswith("true"), done.stderr[-1000:]
