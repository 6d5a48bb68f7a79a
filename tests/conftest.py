"""Shared fixtures: a real MLflow SQLite store per test, a private spool, tiny pipelines built once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own working dir and spool, and no inherited tracking settings."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPRO_TRACK_SPOOL_DIR", str(tmp_path / "spool"))
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "REPRO_TRACK_DISABLE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh MLflow SQLite store in tmp_path, also exported as MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def client(tracking_uri: str):
    """An MlflowClient on the test's store."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny seeded pipelines, built once per session (also what the examples use)."""
    from repro_track import testing

    root = tmp_path_factory.mktemp("models")
    testing.build_tiny_ddim(root / "tiny-ddim")
    testing.build_tiny_text2image(root / "tiny-text2image")
    return root


@pytest.fixture
def example_env(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for running the examples as scripts: the session's tiny models, this store."""
    monkeypatch.setenv("REPRO_TRACK_MODEL_DIR", str(model_dir))
    return dict(os.environ)


def write_project(root: Path, files: dict[str, str]) -> Path:
    """Write a small project (relative path -> source) under root and return root."""
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), "utf-8")
    return root


def run_script(script: Path, *args: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a Python script as __main__ in a fresh interpreter; stdout and stderr captured."""
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def run_cli(*args: str, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the repro-track CLI in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "repro_track.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)
