"""``--env recorded``: the recorded package versions rebuilt with uv, cached, and trusted only so far."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import recording_env, run_git, write_project

PKG = "rtk_testpkg"  # a name no index serves: it comes from the test's wheelhouse only
VCS_PKG = "rtk_vcspkg"


def _wheel(wheelhouse: Path, name: str, version: str, factor: float) -> Path:
    """A pure-Python wheel whose ``scale`` multiplies by ``factor`` (so versions compute differently)."""
    from repro_track import testing

    return testing.build_wheel(wheelhouse, name, version,
                               f"FACTOR = {factor!r}\n\n\ndef scale(x):\n    return x * FACTOR\n")


def _vcs_repo(root: Path) -> tuple[Path, str, str]:
    """A local git repository of a setuptools package, with two commits that scale differently."""
    repo = root / "vcs"
    (repo / VCS_PKG).mkdir(parents=True)
    (repo / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "{VCS_PKG}"\nversion = "0.1"\n', "utf-8")
    run_git(root, "init", "-q", str(repo))
    commits = []
    for factor in (3.0, 5.0):
        (repo / VCS_PKG / "__init__.py").write_text(f"FACTOR = {factor!r}\n\n\ndef scale(x):\n    return x * FACTOR\n")
        run_git(repo, "add", "-A")
        run_git(repo, "commit", "-q", "-m", f"factor {factor}")
        commits.append(run_git(repo, "rev-parse", "HEAD"))
    return repo, commits[0], commits[1]


def _uv_install(python: Path, *specs: str, find_links: Path | None = None) -> None:
    from repro_track import envbuild

    extra = ["--no-index", "--find-links", str(find_links)] if find_links else []
    subprocess.run([envbuild._uv(), "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--python", str(python), *extra, *specs], check=True, capture_output=True, text=True)


PROJECT = f'''
    import torch

    import repro_track


    @repro_track.record(experiment="envs")
    def scaled(n: int, *, generator=None):
        import {PKG}
        import {VCS_PKG}

        return {VCS_PKG}.scale({PKG}.scale(torch.randn(n, generator=generator)))
'''

RECORD = '''
    import json

    import torch

    import gen
    import repro_track

    gen.scaled(8, generator=torch.Generator().manual_seed(0))
    print(json.dumps({"run": repro_track.last_recording(gen.scaled).wait(timeout=120)}))
'''


@pytest.fixture(scope="module")
def envs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Recorded with rtk_testpkg 1.0 and rtk_vcspkg at its first commit; the replaying environment
    has rtk_testpkg 2.0 and the second commit."""
    from repro_track import envbuild

    root = tmp_path_factory.mktemp("envs")
    wheelhouse = root / "wheels"
    wheelhouse.mkdir()
    _wheel(wheelhouse, PKG, "1.0", 1.0)
    _wheel(wheelhouse, PKG, "2.0", 2.0)
    repo, first, second = _vcs_repo(root)
    recorder = envbuild.layered_venv(root / "recording-env")
    _uv_install(recorder, f"{PKG}==1.0", find_links=wheelhouse)
    _uv_install(recorder, f"{VCS_PKG} @ git+file://{repo}@{first}")
    replayer = envbuild.layered_venv(root / "replaying-env")
    _uv_install(replayer, f"{PKG}==2.0", find_links=wheelhouse)
    _uv_install(replayer, f"{VCS_PKG} @ git+file://{repo}@{second}")
    project = write_project(root / "proj", {"gen.py": PROJECT, "record.py": RECORD})
    uri = f"sqlite:///{root / 'envs.db'}"
    done = subprocess.run([str(recorder), str(project / "record.py")], capture_output=True, text=True,
                          env=recording_env(uri, root / "spool"), cwd=project, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = json.loads(done.stdout.strip().splitlines()[-1])["run"]
    env = {**recording_env(uri, root / "spool"), "PIP_FIND_LINKS": str(wheelhouse), "PIP_NO_INDEX": "1",
           "REPRO_TRACK_ENV_CACHE": str(root / "env-cache")}
    return {"run": run_id, "uri": uri, "project": project, "replayer": replayer, "env": env, "repo": repo,
            "first": first, "root": root}


def _replay(envs: dict, *args: str) -> tuple[int, dict, str]:
    done = subprocess.run([str(envs["replayer"]), "-m", "repro_track.cli", "replay", envs["run"], "--json",
                           "--no-log", "--project-dir", str(envs["project"]), *args],
                          capture_output=True, text=True, env=envs["env"], cwd=envs["root"], timeout=900)
    assert done.stdout.strip(), done.stderr[-3000:]
    return done.returncode, json.loads(done.stdout), done.stderr


@pytest.mark.slow
class TestRecordedEnvironment:
    """A run recorded with other package versions replays exactly in its rebuilt environment."""

    def test_origins_are_recorded(self, envs: dict, tmp_path: Path) -> None:
        from repro_track import runs, store

        m = runs.load_run(store.client_for(envs["uri"]), envs["run"], tmp_path).manifest
        origin = m.software["provenance"]["origins"]["rtk-vcspkg"]
        assert (origin["kind"], origin["commit"], origin["url"]) == ("vcs", envs["first"], f"file://{envs['repo']}")

    def test_plain_replay_names_the_version_difference(self, envs: dict) -> None:
        code, report, _ = _replay(envs, "--dry-run")
        assert report["expected"] == "close"
        assert any("rtk-testpkg 1.0 recorded, 2.0 here" in r and "--env recorded" in r for r in report["reasons"])

    def test_unsigned_run_may_not_install_from_a_url_it_names(self, envs: dict) -> None:
        code, out, err = _replay_raw(envs, "--env", "recorded")
        assert code == 2 and "only a run signed by a trusted key may add it" in err and "Traceback" not in err, err[-3000:]

    def test_rebuilt_environment_is_exact_and_cached(self, envs: dict) -> None:
        code, report, err = _replay(envs, "--env", "recorded", "--allow-new-packages")
        assert (report["expected"], report["observed"], code) == ("exact", "exact", 0), (report, err[-2000:])
        [built] = (envs["root"] / "env-cache").iterdir()
        meta = json.loads((built / "repro-track-env.json").read_text())
        assert sorted(meta["install"]) == ["rtk-testpkg==1.0", f"rtk-vcspkg @ git+file://{envs['repo']}@{envs['first']}"]
        code, out, err = _replay_raw(envs, "--env", "recorded", "--allow-new-packages")
        assert code == 0 and "observed   exact" in out and f"reusing {built}" in err, err[-2000:]

    def test_env_command_prints_requirements_with_origins(self, envs: dict) -> None:
        done = subprocess.run([str(envs["replayer"]), "-m", "repro_track.cli", "env", envs["run"]],
                              capture_output=True, text=True, env=envs["env"], timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "rtk-testpkg==1.0" in done.stdout
        assert f"rtk-vcspkg @ git+file://{envs['repo']}@{envs['first']}" in done.stdout

    def test_prune_removes_cached_environments(self, envs: dict, tmp_path: Path) -> None:
        from repro_track import envbuild

        cache = tmp_path / "cache"
        (cache / "abc").mkdir(parents=True)
        (cache / "abc" / envbuild.META).write_text("{}")
        (cache / "abc" / "big").write_bytes(b"x" * 1000)
        removed, freed = envbuild.prune(0, cache)
        assert removed == [cache / "abc"] and freed >= 1000 and not (cache / "abc").exists()


def _replay_raw(envs: dict, *args: str) -> tuple[int, str, str]:
    done = subprocess.run([str(envs["replayer"]), "-m", "repro_track.cli", "replay", envs["run"], "--no-log",
                           "--project-dir", str(envs["project"]), *args],
                          capture_output=True, text=True, env=envs["env"], cwd=envs["root"], timeout=900)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.slow
def test_audit_replays_in_the_recorded_environment(envs: dict) -> None:
    """`audit --env recorded` plans each run's environment; an unsigned run that needs a URL install
    is that run's error, named, and the audit goes on."""
    done = subprocess.run([str(envs["replayer"]), "-m", "repro_track.cli", "audit", "envs", "--env", "recorded",
                           "--no-log", "--json", "--project-dir", str(envs["project"])],
                          capture_output=True, text=True, env=envs["env"], cwd=envs["root"], timeout=900)
    report = json.loads(done.stdout)
    [item] = report["runs"]
    assert item["observed"] == "error" and "only a run signed by a trusted key may add it" in item["error"]
