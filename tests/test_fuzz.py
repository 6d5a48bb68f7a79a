"""Fuzzed bad input: crafted manifests and artifacts fed to replay, show, diff and export in-process.

One real recording per session (``recorded_project``); each example mutates its manifest JSON, recomputes
the digest where the mutation leaves one to compute (so the digest check is not what catches it), logs
the result as a new run's artifact with MlflowClient and runs the CLI's ``main([...])`` on it. Every
command ends with exit 0 (only for a manifest that is still valid) or exit 2 and one line on stderr: no
traceback, no file written outside the replay's temporary folder, no code run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from repro_track import cli, manifest, tags
from repro_track.errors import ReproTrackError

SCALE = float(os.environ.get("REPRO_TRACK_FUZZ_SCALE", "1"))  # more examples: REPRO_TRACK_FUZZ_SCALE=10


def fuzz(examples: int) -> settings:
    """Hypothesis settings for ``examples`` examples (times REPRO_TRACK_FUZZ_SCALE), no deadline."""
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


DEEP = "__fuzz_deep__"
DIGEST_UNCOMPUTABLE = "0" * 64


@dataclass
class Base:
    """The recorded run every crafted run starts from, and where crafted runs go."""

    uri: str
    project: Path
    run_id: str
    manifest: dict[str, Any]
    outputs: Path
    experiment_id: str
    marker: Path
    client: Any

    def log(self, manifest_text: bytes, *, outputs: bytes | None = None) -> str:
        """A new run holding this manifest (and the recorded outputs, or the given bytes)."""
        run = self.client.create_run(self.experiment_id, run_name=f"fuzz-{uuid.uuid4().hex[:8]}")
        with tempfile.TemporaryDirectory(prefix="fuzz-artifacts-") as tmp:
            folder = Path(tmp) / tags.ARTIFACT_DIR
            folder.mkdir()
            (folder / tags.MANIFEST_FILE).write_bytes(manifest_text)
            if outputs is None:
                shutil.copyfile(self.outputs, folder / tags.OUTPUTS_FILE)
            else:
                (folder / tags.OUTPUTS_FILE).write_bytes(outputs)
            self.client.log_artifacts(run.info.run_id, tmp)
        self.client.set_terminated(run.info.run_id)
        return run.info.run_id

    def stored(self, run_id: str, relative: str) -> Path:
        """Where the store keeps one artifact of a run on disk."""
        from mlflow.utils.file_utils import local_file_uri_to_path

        return Path(local_file_uri_to_path(self.client.get_run(run_id).info.artifact_uri)) / relative


@pytest.fixture(scope="module")
def base(recorded_project, tmp_path_factory) -> Base:
    """The "marked" run copied once with its marker argument pointing at a file no replay may write."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=recorded_project.tracking_uri)
    run_id = recorded_project.runs["marked"]
    folder = tmp_path_factory.mktemp("fuzz-base")
    client.download_artifacts(run_id, tags.ARTIFACT_DIR, str(folder))
    data = json.loads((folder / tags.MANIFEST_PATH).read_text("utf-8"))
    marker = folder / "code-ran"
    data["arguments"]["marker"]["value"] = str(marker)
    data["manifest_digest"] = manifest.digest_of(data)
    b = Base(recorded_project.tracking_uri, recorded_project.path, "", data,
             folder / tags.OUTPUTS_PATH, client.get_run(run_id).info.experiment_id, marker, client)
    b.run_id = b.log(json.dumps(data).encode())
    return b


# ---------------------------------------------------------------- what is fed in

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2 ** 80), max_value=2 ** 80),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
)
SURROGATES = st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1,
                     max_size=3).map(lambda s: "a" + s)
PATH_NAMES = st.sampled_from(["../../evil.png", "/evil-absolute", "..", "a/../../b", "C:\\evil", "evil\x00.png",
                              "~/.bashrc", "repro/../../x", "\n", "images/../../../etc/passwd"])
BAD_VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=6), SCALARS, max_size=3),
    st.integers(min_value=10, max_value=300_000).map(lambda n: "x" * n),  # huge strings
    st.integers(min_value=1, max_value=5000).map(lambda n: list(range(n))),  # long lists
    st.just(DEEP),  # replaced by JSON nested deeper than any reader allows
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308 * 10]),
    SURROGATES,
    PATH_NAMES,
)


def node_paths(data: Any, prefix: tuple = (), depth: int = 0) -> list[tuple]:
    """Every key or index path into ``data``, four levels deep."""
    out = [prefix] if prefix else []
    if depth >= 4:
        return out
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        out += node_paths(value, prefix + (key,), depth + 1)
    return out


def get_path(data: Any, path: tuple) -> Any:
    for key in path:
        data = data[key]
    return data


def odd_value_like(value: Any) -> st.SearchStrategy:
    """A value of the same JSON type as ``value`` that no recording would hold."""
    if isinstance(value, str):
        return st.one_of(st.text(max_size=30), SURROGATES, PATH_NAMES, st.just(""),
                         st.integers(min_value=100, max_value=300_000).map(lambda n: "y" * n),
                         st.sampled_from(["2026-13-45T99:99:99", "yesterday", "NaN", "-1", "\u0000"]))
    if isinstance(value, float):
        return st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([math.nan, math.inf]))
    if isinstance(value, int):
        return st.one_of(st.integers(min_value=-(2 ** 70), max_value=2 ** 70), st.sampled_from([-1, 0, 2 ** 63]))
    return st.one_of(st.just([]), st.just(value * 3), st.just(value[::-1]), st.just(value[:1] * 5000))


def set_path(data: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


def render(data: dict[str, Any], deep_levels: int = 2000) -> bytes:
    """The manifest as its file would hold it, digest recomputed whenever the content allows one."""
    try:
        data["manifest_digest"] = manifest.digest_of(data)
    except (ValueError, UnicodeEncodeError, TypeError):  # NaN, lone surrogates: no canonical form
        data["manifest_digest"] = DIGEST_UNCOMPUTABLE
    text = json.dumps(data, allow_nan=True)
    return text.replace(json.dumps(DEEP), "[" * deep_levels + "]" * deep_levels).encode("utf-8", "surrogatepass")


def reader_accepts(raw: bytes) -> bool:
    """Whether the manifest reader takes these bytes (anything but a ReproTrackError is a bug)."""
    try:
        manifest.Manifest.from_json(raw, "fuzz")
    except ReproTrackError:
        return False
    return True


# ---------------------------------------------------------------- what must hold

class Sandbox:
    """Files outside the replay's temporary folder, watched for changes; the temp folder, for leftovers."""

    def __init__(self, root: Path, project: Path, temp: Path):
        self.root, self.project, self.temp = root, project, temp

    def snapshot(self) -> dict[str, float]:
        files = {}
        for top in (self.root, self.project):
            for folder, subfolders, names in os.walk(top):
                # The store's own artifact folder grows with every crafted run; the temp folder is
                # checked on its own.
                subfolders[:] = [d for d in subfolders if d not in ("mlruns", "__pycache__")
                                 and Path(folder, d) != self.temp]
                for name in names:
                    files[os.path.join(folder, name)] = os.stat(os.path.join(folder, name)).st_mtime_ns
        return files


@pytest.fixture
def sandbox(tmp_path: Path, base: Base, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """Temporary folders go under tmp_path/tmp, so that what a command leaves behind shows."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return Sandbox(tmp_path, base.project, temp)


def run_cli(capfd: pytest.CaptureFixture, args: list[str]) -> tuple[int, str, str]:
    capfd.readouterr()
    code = cli.main(args)
    out, err = capfd.readouterr()
    return code, out, err


def commands(base: Base, run_id: str) -> list[list[str]]:
    uri = ["--tracking-uri", base.uri]
    return [
        ["show", run_id, *uri], ["show", run_id, "--json", *uri], ["diff", base.run_id, run_id, *uri],
        ["export", run_id, "--format", "in-toto", *uri], ["export", run_id, "--format", "prov", *uri],
        ["replay", run_id, "--dry-run", "--json", "--project-dir", str(base.project), *uri],
    ]


def check_all(base: Base, sandbox: Sandbox, capfd: pytest.CaptureFixture, run_id: str, *,
              must_refuse: bool, only: int | None = None) -> list[int]:
    """Run every command (or command number ``only``) on the crafted run and check what must hold."""
    before = sandbox.snapshot()
    codes = []
    chosen = commands(base, run_id)
    for args in chosen if only is None else [chosen[only % len(chosen)]]:
        code, out, err = run_cli(capfd, args)
        assert code in ((2,) if must_refuse else (0, 2)), (args, code, err[-2000:])
        assert "Traceback" not in err, (args, err[-2000:])
        if code == 2:
            assert err.count("\n") == 1 and err.startswith("repro-track: error: "), (args, err[-2000:])
            assert out == "", (args, out[:500])
        codes.append(code)
    assert sandbox.snapshot() == before
    assert list(sandbox.temp.iterdir()) == []
    assert not base.marker.exists()
    return codes


# ---------------------------------------------------------------- the properties

class TestCraftedManifests:
    """Whatever a manifest holds, every command refuses it in one line or handles it; nothing runs."""

    @fuzz(80)
    @given(data=st.data(), value=BAD_VALUES, command=st.integers(min_value=0, max_value=5))
    def test_any_field_replaced(self, base, sandbox, capfd, data, value, command):
        crafted = copy.deepcopy(base.manifest)
        path = data.draw(st.sampled_from(node_paths(crafted)), label="path")
        assume(path != ("manifest_digest",))
        set_path(crafted, path, value)
        raw = render(crafted)
        accepted = reader_accepts(raw)
        event("reader accepts" if accepted else "reader refuses")
        check_all(base, sandbox, capfd, base.log(raw), must_refuse=not accepted, only=command)

    @fuzz(60)
    @given(data=st.data(), command=st.integers(min_value=0, max_value=5))
    def test_any_field_given_an_odd_value_of_its_own_type(self, base, sandbox, capfd, data, command):
        crafted = copy.deepcopy(base.manifest)
        paths = [p for p in node_paths(crafted) if p != ("manifest_digest",)
                 and isinstance(get_path(crafted, p), (str, int, float, list)) and get_path(crafted, p) is not True
                 and get_path(crafted, p) is not False]
        path = data.draw(st.sampled_from(paths), label="path")
        set_path(crafted, path, data.draw(odd_value_like(get_path(crafted, path)), label="value"))
        raw = render(crafted)
        accepted = reader_accepts(raw)
        event("reader accepts" if accepted else "reader refuses")
        check_all(base, sandbox, capfd, base.log(raw), must_refuse=not accepted, only=command)

    @fuzz(15)
    @given(version=st.one_of(st.integers(min_value=manifest.SCHEMA_VERSION + 1, max_value=2 ** 70),
                             st.integers(max_value=0), st.sampled_from(["3", 3.0, None, True, [3], {"v": 3}])),
           command=st.integers(min_value=0, max_value=5))
    def test_schema_versions_from_the_future_or_nowhere(self, base, sandbox, capfd, version, command):
        crafted = copy.deepcopy(base.manifest)
        crafted["schema_version"] = version
        check_all(base, sandbox, capfd, base.log(render(crafted)), must_refuse=True, only=command)

    @pytest.mark.parametrize("version", [0, 1, 2])
    def test_old_schema_versions_on_todays_content(self, base, sandbox, capfd, version):
        crafted = copy.deepcopy(base.manifest)
        crafted["schema_version"] = version
        raw = render(crafted)
        check_all(base, sandbox, capfd, base.log(raw), must_refuse=not reader_accepts(raw))

    @pytest.mark.parametrize("value", ["evil\x00.png", "2026-13-45T99:99:99"])
    @pytest.mark.parametrize("command", [3, 5], ids=["export", "replay"])
    def test_every_string_field_given_a_nul_byte_or_a_bad_date(self, base, sandbox, capfd, value, command):
        # The sampled tests above found both (a NUL byte reached os.stat through a recorded file path; a
        # date jsonschema let through reached datetime in export): sweep every string field for them.
        paths = [p for p in node_paths(base.manifest) if p != ("manifest_digest",)
                 and isinstance(get_path(base.manifest, p), str)]
        assert len(paths) > 40
        for path in paths:
            crafted = copy.deepcopy(base.manifest)
            set_path(crafted, path, value)
            raw = render(crafted)
            check_all(base, sandbox, capfd, base.log(raw), must_refuse=not reader_accepts(raw), only=command)

    @fuzz(15)
    @given(index=st.one_of(st.integers(min_value=-(2 ** 70), max_value=2 ** 70), st.integers(1, 3)),
           command=st.integers(min_value=0, max_value=5))
    def test_cross_references_to_nothing(self, base, sandbox, capfd, index, command):
        crafted = copy.deepcopy(base.manifest)
        crafted["arguments"]["generator"]["generators"] = [index]
        raw = render(crafted)
        check_all(base, sandbox, capfd, base.log(raw), must_refuse=index != 0, only=command)

    @fuzz(10)
    @given(name=PATH_NAMES)
    def test_output_names_with_traversal_or_absolute_paths(self, base, sandbox, capfd, name):
        crafted = copy.deepcopy(base.manifest)
        crafted["outputs"][0]["name"] = name
        check_all(base, sandbox, capfd, base.log(render(crafted)), must_refuse=True)

    @fuzz(15)
    @given(levels=st.integers(min_value=65, max_value=200_000), where=st.sampled_from(
        [("arguments", "n", "value"), ("call", "error"), ("env_vars", "captured"), ("cpu", "isa_flags")]))
    def test_deep_nesting(self, base, sandbox, capfd, levels, where):
        crafted = copy.deepcopy(base.manifest)
        set_path(crafted, where, DEEP)
        check_all(base, sandbox, capfd, base.log(render(crafted, levels)), must_refuse=True)


class TestCraftedArtifacts:
    """Artifacts that are not what the manifest says, or that point elsewhere, are refused."""

    @fuzz(20)
    @given(blob=st.one_of(st.binary(max_size=64), st.binary(min_size=8, max_size=64).map(
        lambda b: (2 ** 40).to_bytes(8, "little") + b)))
    def test_outputs_file_is_garbage(self, base, sandbox, capfd, blob):
        run_id = base.log(json.dumps(base.manifest).encode(), outputs=blob)
        check_all(base, sandbox, capfd, run_id, must_refuse=True)

    @pytest.mark.parametrize("artifact", [tags.MANIFEST_PATH, tags.OUTPUTS_PATH])
    @pytest.mark.parametrize("target", ["outside-file", "dev-zero", "the-original"])
    def test_symlinked_artifact(self, base, sandbox, capfd, tmp_path, artifact, target):
        run_id = base.log(json.dumps(base.manifest).encode())
        stored = base.stored(run_id, artifact)
        outside = tmp_path / "secret.txt"
        outside.write_text("not for the replayer", "utf-8")
        source = {"outside-file": outside, "dev-zero": Path("/dev/zero"),
                  "the-original": base.stored(base.run_id, artifact)}[target]
        stored.unlink()
        stored.symlink_to(source)
        check_all(base, sandbox, capfd, run_id, must_refuse=True)

    @fuzz(40)
    @given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                         st.sampled_from([b"NaN", b"[]", b"null", b'{"schema_version": 3}', b"\xff\xfe{}",
                                          b'{"a": 1e999}', b"{" * 100_000, b'"\\ud800"'])),
           command=st.integers(min_value=0, max_value=5))
    def test_manifest_file_is_not_a_manifest(self, base, sandbox, capfd, raw, command):
        check_all(base, sandbox, capfd, base.log(raw), must_refuse=True, only=command)


class TestExportFile:
    """export -o writes the one file (or crate folder) asked for, whatever the manifest's names."""

    @pytest.mark.parametrize("absolute", [False, True], ids=["traversal", "absolute"])
    def test_ro_crate_stays_in_its_folder(self, base, tmp_path, capfd, absolute):
        crafted = copy.deepcopy(base.manifest)
        crafted["outputs"][0]["name"] = str(tmp_path / "escaped-abs") if absolute else "../../escaped"
        run_id = base.log(render(crafted))
        code, out, err = run_cli(capfd, ["export", run_id, "--format", "ro-crate", "-o",
                                         str(tmp_path / "crate"), "--tracking-uri", base.uri])
        assert code == 2 and err.count("\n") == 1
        assert not (tmp_path / "crate").exists() and not (tmp_path / "escaped-abs").exists()
