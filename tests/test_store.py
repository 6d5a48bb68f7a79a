"""Tests for repro_track.store: run references, loading and checking runs, idempotent uploads."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import numpy as np
import pytest
import torch

import repro_track
from conftest import free_port
from repro_track import outputs, runs, spool, store, tags
from repro_track.errors import IntegrityError, RunNotFoundError

RUN_ID = "0123456789abcdef0123456789abcdef"


def artifact_dir(client: Any, run_id: str) -> Path:
    """Where a run's artifacts live in the local file store."""
    return Path(urlparse(client.get_run(run_id).info.artifact_uri).path)


def all_runs(client: Any) -> list[Any]:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture
def recorded(migrated_store: str, client: Any) -> str:
    """The id of a run recorded by the decorator: a tensor output and a seeded CPU generator."""

    @repro_track.record
    def draw(n: int, *, generator: Any = None) -> torch.Tensor:
        return torch.randn(n, generator=generator)

    draw(8, generator=torch.Generator().manual_seed(1))
    outcome = repro_track.last_recording(draw)
    assert outcome is not None and outcome.wait(120) is not None
    return outcome.run_id


class TestParseRunRef:
    """A run is named by its id, a runs:/ URI or a run URL copied from the MLflow UI."""

    @pytest.mark.parametrize("ref", [
        RUN_ID,
        f"  {RUN_ID}\n",
        f"runs:/{RUN_ID}",
        f"runs:/{RUN_ID}/repro/manifest.json",
        f"http://host:5000/#/experiments/3/runs/{RUN_ID}",
        f"http://host:5000/#/experiments/3/runs/{RUN_ID}/artifacts",
    ], ids=["id", "whitespace", "runs-uri", "runs-uri-with-path", "ui-url", "ui-url-artifacts-tab"])
    def test_accepted(self, ref: str) -> None:
        assert runs.parse_run_ref(ref) == RUN_ID

    @pytest.mark.parametrize("ref", ["", "not a run", "runs:/", "http://host:5000/#/experiments/3", "../etc"],
                             ids=["empty", "spaces", "runs-uri-without-id", "experiment-url", "path"])
    def test_refused(self, ref: str) -> None:
        with pytest.raises(RunNotFoundError) as caught:
            runs.parse_run_ref(ref)
        assert caught.value.run_ref == ref


class TestLoadRun:
    """Loading a run fetches its manifest and arrays and refuses anything unknown or altered."""

    def test_recorded_run(self, recorded: str, client: Any, tmp_path: Path) -> None:
        loaded = runs.load_run(client, f"runs:/{recorded}", tmp_path / "dl")
        assert loaded.run_id == recorded
        assert loaded.manifest.digest == loaded.run_tags[tags.MANIFEST_DIGEST]
        assert loaded.outputs_path is not None
        assert list(outputs.load_arrays(loaded.outputs_path)) == ["output"]

    def test_unknown_run(self, migrated_store: str, client: Any, tmp_path: Path) -> None:
        with pytest.raises(RunNotFoundError) as caught:
            runs.load_run(client, RUN_ID, tmp_path / "dl")
        assert RUN_ID in str(caught.value)

    def test_run_without_manifest(self, migrated_store: str, client: Any, tmp_path: Path) -> None:
        run = client.create_run(client.create_experiment("plain"))
        with pytest.raises(RunNotFoundError, match="was not recorded by repro-track"):
            runs.load_run(client, run.info.run_id, tmp_path / "dl")

    @pytest.mark.parametrize(("path", "spoil", "item"), [
        (tags.MANIFEST_PATH, lambda raw: raw.replace(b'"record"', b'"replay"', 1), "manifest"),
        (tags.OUTPUTS_PATH, lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "output"),
        (tags.OUTPUTS_PATH, lambda raw: raw[: len(raw) - 5], "outputs.safetensors"),
    ], ids=["edited-manifest", "bit-flipped-outputs", "truncated-outputs"])
    def test_altered_artifacts(self, recorded: str, client: Any, tmp_path: Path, path: str,
                               spoil: Callable[[bytes], bytes], item: str) -> None:
        target = artifact_dir(client, recorded) / path
        target.write_bytes(spoil(target.read_bytes()))
        with pytest.raises(IntegrityError) as caught:
            runs.load_run(client, recorded, tmp_path / "dl")
        assert (caught.value.run_id, caught.value.item) == (recorded, item)

    def test_missing_outputs(self, recorded: str, client: Any, tmp_path: Path) -> None:
        (artifact_dir(client, recorded) / tags.OUTPUTS_PATH).unlink()
        with pytest.raises(IntegrityError, match="is missing"):
            runs.load_run(client, recorded, tmp_path / "dl")


class TestVerifyArrays:
    """A safetensors file passes only with every recorded array intact."""

    @pytest.fixture
    def saved(self, tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
        images = np.linspace(0, 1, 48, dtype=np.float32).reshape(1, 4, 4, 3)
        items = [outputs.NamedArray("images", images, "ndarray"),
                 outputs.NamedArray("latents", torch.arange(8, dtype=torch.float16), "tensor")]
        path = tmp_path / "outputs.safetensors"
        outputs.save_arrays(items, path)
        return path, [outputs.describe(item) for item in items]

    def test_intact(self, saved: tuple[Path, list[dict[str, Any]]]) -> None:
        path, records = saved
        arrays = runs.verify_arrays(path, records, "r1", "output")
        assert sorted(arrays) == ["images", "latents"]

    @pytest.mark.parametrize(("spoil", "words"), [
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 0x01]), "does not match its recorded sha256"),
        (lambda raw: raw[:-3], "unreadable or truncated"),
        (lambda raw: raw[: len(raw) // 2], "unreadable or truncated"),
        (lambda raw: b"\x00" * len(raw), "unreadable or truncated"),
    ], ids=["bit-flip", "truncated-tail", "truncated-half", "zeroed"])
    def test_damaged_file(self, saved: tuple[Path, list[dict[str, Any]]], spoil: Callable[[bytes], bytes],
                          words: str) -> None:
        path, records = saved
        path.write_bytes(spoil(path.read_bytes()))
        with pytest.raises(IntegrityError, match=words):
            runs.verify_arrays(path, records, "r1", "output")

    @pytest.mark.parametrize(("edit", "words"), [
        (lambda r: r.update(name="other"), "'other' is missing"),
        (lambda r: r.update(shape=[4, 4, 3]), "but the manifest says"),
        (lambda r: r.update(dtype="float64"), "but the manifest says"),
    ], ids=["missing-array", "other-shape", "other-dtype"])
    def test_record_disagrees(self, saved: tuple[Path, list[dict[str, Any]]], edit: Callable[[dict], Any],
                              words: str) -> None:
        path, records = saved
        edit(records[0])
        with pytest.raises(IntegrityError, match=words):
            runs.verify_arrays(path, records, "r1", "output")


class TestUpload:
    """A spooled recording becomes exactly one run, however often it is uploaded."""

    def test_dedupe(self, migrated_store: str, client: Any) -> None:
        @repro_track.record(tracking_uri=f"http://127.0.0.1:{free_port()}")
        def draw() -> np.ndarray:
            return np.ones(3)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", repro_track.RecordingWarning)
            draw()
        repro_track.flush(60)
        entry = spool.claim(next(spool.pending()))
        first = store.upload(client, entry)
        second = store.upload(client, entry)
        assert first == second
        assert [r.info.run_id for r in all_runs(client)] == [first]
        assert client.get_run(first).data.tags[tags.SPOOL_ID] == entry.recording_id

    def test_delivered_recording_leaves_no_spool(self, recorded: str, tmp_path: Path) -> None:
        assert list((tmp_path / "spool").iterdir()) == []


class TestRunParams:
    """JSON arguments become flat params, cut to MLflow's size limit."""

    def test_flattened_and_capped(self) -> None:
        m = {"arguments": {"cfg": {"kind": "json", "value": {"a": {"b": 1}, "s": "x" * 7000}},
                           "dtype": {"kind": "dtype", "value": "float16"},
                           "pipe": {"kind": "pipeline", "pipeline": {}}},
             "randomness": {"primary": {"seed": 3, "generator_device": "cpu"}}}
        params = store.run_params(m)
        assert params == {"arg.cfg.a.b": "1", "arg.cfg.s": "x" * (store.MAX_PARAM_CHARS - 3) + "...",
                          "arg.dtype": "float16", "seed": "3", "generator_device": "cpu"}
