"""Tests for repro_track.recorder: what one decorated call records, and that recording changes nothing."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import random
import re
import shutil
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import diffusers
import jsonschema
import mlflow
import numpy as np
import pytest
import torch
from diffusers import ImagePipelineOutput
from PIL import Image
from safetensors.numpy import load_file

import repro_track
from conftest import free_port, run_cli, run_git, run_script, write_project
from repro_track import outputs, runs, tags, testing
from repro_track.capture import gpu as gpu_capture
from repro_track.capture import torch_state
from repro_track.card import record_card
from repro_track.recorder import RecordingWarning, recorder_of

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "schemas" / "manifest.schema.json").read_text("utf-8"))
SECTIONS = {"schema_version", "repro_track_version", "kind", "replay_of", "manifest_digest", "call",
            "arguments", "randomness", "determinism", "cpu", "gpu", "software", "env_vars", "git", "outputs",
            "code", "pipelines", "trajectory"}  # trajectory: a pipeline ran, its denoising steps
SEED = 1234


@repro_track.record(experiment="ddim")
def generate(pipe: Any, num_inference_steps: int = 2, *, generator: Any = None) -> np.ndarray:
    """Denoise seeded noise with a DDIM pipeline."""
    return pipe(num_inference_steps=num_inference_steps, generator=generator, output_type="np").images


# ---------------------------------------------------------------- helpers

def validate_published(manifest: dict[str, Any]) -> None:
    """Validate against schemas/manifest.schema.json at the top of the repository."""
    cls = jsonschema.Draft202012Validator
    cls(SCHEMA, format_checker=cls.FORMAT_CHECKER).validate(manifest)


def reference_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def artifact_dir(client: Any, run_id: str) -> Path:
    return Path(urlparse(client.get_run(run_id).info.artifact_uri).path)


def stored_manifest(client: Any, run_id: str) -> dict[str, Any]:
    return json.loads((artifact_dir(client, run_id) / tags.MANIFEST_PATH).read_text("utf-8"))


def all_runs(client: Any) -> list[Any]:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def run_of(fn: Callable[..., Any]) -> str:
    outcome = repro_track.last_recording(fn)
    assert outcome is not None and outcome.wait(120) is not None, outcome
    return outcome.run_id


def captured(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """Call a decorated function through its Recorder without logging: (result, manifest dict)."""
    recorder = recorder_of(fn)
    assert recorder is not None
    result, error, recording = recorder.capture(args, kwargs)
    assert error is None and recording is not None
    return result, recording.manifest.to_dict()


def rng_states() -> tuple[bytes, Any, Any]:
    np_state = np.random.get_state()
    return torch.get_rng_state().numpy().tobytes(), (np_state[0], np_state[1].tobytes(), *np_state[2:]), \
        random.getstate()


def fake_nvml(name: str, sm_count: int) -> types.ModuleType:
    """A stand-in pynvml module describing one GPU (this machine has no NVIDIA driver)."""
    mod = types.ModuleType("pynvml")
    device = object()
    mod.NVML_DEVICE_MIG_ENABLE = 1
    mod.nvmlInit = lambda: None
    mod.nvmlShutdown = lambda: None
    mod.nvmlSystemGetDriverVersion = lambda: "560.35.03"
    mod.nvmlSystemGetCudaDriverVersion_v2 = lambda: 12060
    mod.nvmlDeviceGetCount = lambda: 1
    mod.nvmlDeviceGetHandleByIndex = lambda index: device
    mod.nvmlDeviceGetName = lambda handle: name
    mod.nvmlDeviceGetUUID = lambda handle: "GPU-12345678-1234-1234-1234-123456789abc"
    mod.nvmlDeviceGetCudaComputeCapability = lambda handle: (9, 0)
    mod.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(total=150_000_000_000)
    mod.nvmlDeviceGetMigMode = lambda handle: (0, 0)
    mod.nvmlDeviceGetAttributes = lambda handle: types.SimpleNamespace(multiprocessorCount=sm_count)
    return mod


@pytest.fixture(scope="module")
def ddim(model_dir: Path) -> Any:
    """The tiny DDIM pipeline, loaded once (tests that change weights load their own)."""
    return testing.load_pipeline(model_dir / "tiny-ddim", progress=False)


@pytest.fixture
def no_gpu_cache() -> Any:
    """Forget the cached GPU identity before and after (the stand-in must not leak)."""
    gpu_capture.clear_cache()
    yield
    gpu_capture.clear_cache()


# ---------------------------------------------------------------- the whole recording

class TestDdimGeneration:
    """A decorated tiny-DDIM generation with a CPU generator becomes one complete MLflow run."""

    @pytest.fixture
    def run(self, migrated_store: str, client: Any, ddim: Any, no_gpu_cache: Any) -> dict[str, Any]:
        images = generate(ddim, 2, generator=torch.Generator("cpu").manual_seed(SEED))
        run_id = run_of(generate)
        return {"id": run_id, "images": images, "run": client.get_run(run_id),
                "manifest": stored_manifest(client, run_id), "dir": artifact_dir(client, run_id)}

    def test_manifest_validates_against_the_published_schema(self, run: dict[str, Any]) -> None:
        validate_published(run["manifest"])

    def test_every_section(self, run: dict[str, Any]) -> None:
        m = run["manifest"]
        assert set(m) == SECTIONS
        assert (m["schema_version"], m["kind"], m["replay_of"]) == (3, "record", None)
        assert m["manifest_digest"] == reference_digest(m) == run["run"].data.tags[tags.MANIFEST_DIGEST]
        call_keys = ("module", "qualname", "source_file", "replayable", "status", "error", "return_type")
        assert {k: m["call"][k] for k in call_keys} == {
            "module": "test_recorder", "qualname": "generate", "source_file": "tests/test_recorder.py",
            "replayable": True, "status": "FINISHED", "error": None, "return_type": "numpy.ndarray"}
        assert m["arguments"]["num_inference_steps"]["value"] == 2
        assert m["determinism"] == torch_state.determinism_knobs()
        assert m["cpu"]["torch_capability"] == torch.backends.cpu.get_cpu_capability()
        assert m["gpu"]["available"] is False
        assert (m["software"]["torch"]["version"], m["software"]["packages"]["diffusers"]) == (
            torch.__version__, diffusers.__version__)
        assert set(m["env_vars"]) == {"captured", "redacted", "dropped"}
        assert isinstance(m["git"]["available"], bool)
        assert [(o["name"], o["dtype"], o["shape"]) for o in m["outputs"]] == [
            ("output", "float32", [1, 16, 16, 3])]

    def test_pipeline_identity(self, run: dict[str, Any], model_dir: Path) -> None:
        pipe = run["manifest"]["arguments"]["pipe"]
        assert (pipe["kind"], pipe["replayable"]) == ("pipeline", True)
        identity = pipe["pipeline"]
        assert identity["class"] == "diffusers.pipelines.ddim.pipeline_ddim.DDIMPipeline"
        assert identity["name_or_path"] == str(model_dir / "tiny-ddim")
        assert re.fullmatch("[0-9a-f]{64}", identity["weights_sha256"])
        assert re.fullmatch("[0-9a-f]{64}", identity["components"]["unet"]["weights_sha256"])
        scheduler = identity["components"]["scheduler"]
        assert scheduler["class"] == "diffusers.schedulers.scheduling_ddim.DDIMScheduler"
        assert scheduler["weights_sha256"] is None

    def test_randomness(self, run: dict[str, Any]) -> None:
        randomness = run["manifest"]["randomness"]
        [g] = randomness["generators"]
        keys = ("argument", "position", "device", "initial_seed", "fresh", "consumed_by_call")
        assert {k: g[k] for k in keys} == {"argument": "generator", "position": None, "device": "cpu",
                                           "initial_seed": SEED, "fresh": True, "consumed_by_call": True}
        assert randomness["primary"] == {"seed": SEED, "generator_device": "cpu"}
        fresh = torch.Generator().manual_seed(SEED).get_state()
        assert torch.equal(torch_state.rebuild_generator(g).get_state(), fresh)

    def test_outputs_file_matches_sha256(self, run: dict[str, Any]) -> None:
        arrays = load_file(str(run["dir"] / tags.OUTPUTS_PATH))
        [record] = run["manifest"]["outputs"]
        assert list(arrays) == ["output"]
        raw = np.ascontiguousarray(arrays["output"]).tobytes()
        assert hashlib.sha256(raw).hexdigest() == record["sha256"]
        assert np.array_equal(arrays["output"], run["images"])
        assert record["abs_sum"] == pytest.approx(float(np.abs(run["images"].astype(np.float64)).sum()))

    def test_png_previews(self, run: dict[str, Any]) -> None:
        # MLflow's log_image layout: the full PNG and its compressed thumbnail, keyed by output name.
        names = sorted(p.name for p in (run["dir"] / tags.IMAGES_DIR).iterdir())
        assert [n.split("+step+")[0] for n in names] == ["output", "output"]
        [png] = [n for n in names if n.endswith(".png")]
        assert names == sorted([png, png[:-len(".png")] + "+compressed.webp"])
        with Image.open(run["dir"] / tags.IMAGES_DIR / png) as image:
            assert (image.format, image.mode) == ("PNG", "RGB")
            pixels = np.asarray(image)
        step = pixels.shape[0] // 16  # tiny previews are enlarged without smoothing
        assert np.array_equal(pixels[::step, ::step], (run["images"][0] * 255).round().astype(np.uint8))

    def test_card(self, run: dict[str, Any]) -> None:
        card = run["run"].data.tags[tags.MLFLOW_NOTE]
        assert f"**Seed:** {SEED} on a **cpu** generator" in card
        assert f"repro-track replay {run['id']}" in card

    def test_tags(self, run: dict[str, Any]) -> None:
        found = run["run"].data.tags
        assert {k: found.get(k) for k in (tags.KIND, tags.SEED, tags.GENERATOR_DEVICE, tags.STATUS, tags.GPU,
                                          tags.TORCH, tags.SCHEMA_VERSION, tags.ENTRY_POINT)} == {
            tags.KIND: "record", tags.SEED: str(SEED), tags.GENERATOR_DEVICE: "cpu", tags.STATUS: "FINISHED",
            tags.GPU: "none", tags.TORCH: torch.__version__, tags.SCHEMA_VERSION: "3",
            tags.ENTRY_POINT: "test_recorder:generate"}

    def test_params(self, run: dict[str, Any]) -> None:
        assert run["run"].data.params == {"arg.num_inference_steps": "2", "seed": str(SEED),
                                          "generator_device": "cpu"}

    def test_metrics(self, run: dict[str, Any]) -> None:
        metrics = run["run"].data.metrics
        assert set(metrics) == {"duration_s", "abs_sum.output"}
        assert metrics["abs_sum.output"] == run["manifest"]["outputs"][0]["abs_sum"]
        assert metrics["duration_s"] == run["manifest"]["call"]["duration_s"]

    def test_finished_run_in_named_experiment(self, run: dict[str, Any], client: Any) -> None:
        assert run["run"].info.status == "FINISHED"
        assert client.get_experiment(run["run"].info.experiment_id).name == "ddim"


# ---------------------------------------------------------------- the call itself is unchanged

class TestTransparency:
    """The decorated function returns, raises and looks exactly like the bare one."""

    @pytest.mark.parametrize("make", [lambda: torch.ones(2), lambda: np.ones(2)], ids=["tensor", "ndarray"])
    def test_returns_the_same_object(self, migrated_store: str, make: Callable[[], Any]) -> None:
        @repro_track.record
        def identity(x: Any) -> Any:
            return x

        value = make()
        assert identity(value) is value
        assert run_of(identity)

    @pytest.mark.parametrize("decorator", [repro_track.record, repro_track.record(experiment="named")],
                             ids=["bare", "with-options"])
    def test_keeps_name_doc_and_signature(self, decorator: Callable[..., Any]) -> None:
        def scale(x: float, factor: int = 2, *, bias: float = 0.0) -> float:
            """Scale x."""
            return x * factor + bias

        wrapped = decorator(scale)
        assert (wrapped.__name__, wrapped.__doc__, inspect.signature(wrapped)) == (
            "scale", "Scale x.", inspect.signature(scale))

    @pytest.mark.parametrize(("decorator", "experiment"), [
        (repro_track.record, "repro-track"), (repro_track.record(experiment="named"), "named")],
        ids=["bare", "with-options"])
    def test_both_forms_record(self, migrated_store: str, client: Any, decorator: Callable[..., Any],
                               experiment: str) -> None:
        def halve(x: float) -> float:
            return x / 2

        wrapped = decorator(halve)
        assert wrapped(3.0) == 1.5
        run = client.get_run(run_of(wrapped))
        assert client.get_experiment(run.info.experiment_id).name == experiment

    def test_method(self, migrated_store: str, client: Any) -> None:
        class Sampler:
            def __init__(self, scale: float) -> None:
                self.scale = scale

            @repro_track.record
            def sample(self, n: int) -> torch.Tensor:
                return torch.full((n,), self.scale)

        result = Sampler(2.5).sample(3)
        assert torch.equal(result, torch.full((3,), 2.5))
        this = stored_manifest(client, run_of(Sampler(1.0).sample))["arguments"]["self"]
        assert (this["kind"], this["replayable"]) == ("opaque", False)

    def test_exception_reaches_the_caller_and_the_run_fails(self, migrated_store: str, client: Any) -> None:
        error = ValueError("no noise for you 42")

        @repro_track.record
        def broken(n: int) -> None:
            raise error

        with pytest.raises(ValueError) as caught:
            broken(3)
        assert caught.value is error
        run_id = run_of(broken)
        run = client.get_run(run_id)
        call = stored_manifest(client, run_id)["call"]
        assert (run.info.status, run.data.tags[tags.STATUS], call["status"]) == ("FAILED", "FAILED", "FAILED")
        assert (call["error"]["type"], call["error"]["message"]) == (
            "builtins.ValueError", "no noise for you 42")

    @pytest.mark.parametrize("value", ["1", "true", "on"])
    def test_disabled(self, migrated_store: str, client: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                      value: str) -> None:
        @repro_track.record
        def double(x: int) -> int:
            return 2 * x

        double(1)
        repro_track.flush(60)
        [recorded] = all_runs(client)
        monkeypatch.setenv("REPRO_TRACK_DISABLE", value)
        assert double(4) == 8
        assert repro_track.last_recording(double) is None
        assert [r.info.run_id for r in all_runs(client)] == [recorded.info.run_id]
        assert list((tmp_path / "spool").iterdir()) == []

    def test_mistyped_off_switch_warns_and_does_not_record(self, migrated_store: str, client: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("REPRO_TRACK_DISABLE", "maybe")

        @repro_track.record
        def double(x: int) -> int:
            return 2 * x

        with pytest.warns(RecordingWarning, match="REPRO_TRACK_DISABLE='maybe'") as caught:
            assert double(4) == 8
        assert [w.filename for w in caught if w.category is RecordingWarning] == [__file__]
        assert repro_track.last_recording(double) is None
        assert all_runs(client) == []

    def test_unrecordable_output_warns_and_returns(self, migrated_store: str, client: Any) -> None:
        @repro_track.record
        def produce(kind: str) -> np.ndarray:
            return np.array([{"not": "numbers"}], dtype=object) if kind == "object" else np.zeros(2)

        produce("numbers")
        assert repro_track.last_recording(produce) is not None
        with pytest.warns(RecordingWarning, match="could not build the manifest") as caught:
            value = produce("object")
        assert [w.filename for w in caught if w.category is RecordingWarning] == [__file__]
        assert value.dtype == object and value[0] == {"not": "numbers"}
        assert repro_track.last_recording(produce) is None
        assert repro_track.flush(120)  # the first call's recording uploads in the background
        assert len(all_runs(client)) == 1


# ---------------------------------------------------------------- randomness

class TestGenerators:
    """Generator arguments are recorded by their full state, not only their seed."""

    def test_consumed_before_the_call(self) -> None:
        @repro_track.record
        def draw(*, generator: Any) -> torch.Tensor:
            return torch.randn(5, generator=generator)

        g = torch.Generator().manual_seed(0)
        torch.randn(3, generator=g)
        entry_state = g.get_state()
        drawn, m = captured(draw, generator=g)
        [record] = m["randomness"]["generators"]
        assert (record["fresh"], record["initial_seed"]) == (False, 0)
        rebuilt = torch_state.rebuild_generator(record)
        assert torch.equal(rebuilt.get_state(), entry_state)
        assert torch.equal(torch.randn(5, generator=rebuilt), drawn)
        assert "already consumed before the call" in record_card(m, "r")

    @pytest.mark.parametrize(("draws", "consumed"), [(True, True), (False, False)],
                             ids=["draws", "does-not-draw"])
    def test_consumed_by_call(self, draws: bool, consumed: bool) -> None:
        @repro_track.record
        def maybe_draw(*, generator: Any) -> torch.Tensor:
            return torch.randn(2, generator=generator) if draws else torch.zeros(2)

        _, m = captured(maybe_draw, generator=torch.Generator().manual_seed(9))
        assert m["randomness"]["generators"][0]["consumed_by_call"] is consumed

    def test_list_of_generators(self) -> None:
        @repro_track.record
        def batch(generators: list) -> torch.Tensor:
            return torch.stack([torch.randn(2, generator=g) for g in generators])

        _, m = captured(batch, [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
        assert m["arguments"]["generators"]["kind"] == "generators"
        assert m["arguments"]["generators"]["generators"] == [0, 1]
        assert [(g["argument"], g["position"], g["initial_seed"]) for g in m["randomness"]["generators"]] == [
            ("generators", 0, 5), ("generators", 1, 6)]

    @pytest.mark.parametrize("name", ["seed", "noise_seed"])
    def test_integer_seed_argument(self, name: str) -> None:
        @repro_track.record
        def seeded(**kwargs: Any) -> torch.Tensor:
            return torch.randn(2, generator=torch.Generator().manual_seed(kwargs[name]))

        _, m = captured(seeded, **{name: 77})
        assert m["randomness"]["seeds"] == {name: 77}
        assert m["randomness"]["primary"] == {"seed": 77, "generator_device": None}


class TestGlobalRng:
    """Recording reads the global RNGs without moving them, and tells which ones the call used."""

    def test_states_are_untouched(self, migrated_store: str) -> None:
        def bare(x: int) -> int:
            return x + 1

        recorded = repro_track.record(bare)
        recorded(0)  # the first call loads modules and caches; the states must not move on any call
        before = rng_states()
        assert recorded(1) == bare(1)
        assert run_of(recorded)
        assert rng_states() == before

    @pytest.mark.parametrize(("use", "expected"), [
        (lambda: None, set()),
        (lambda: torch.rand(1), {"torch_cpu"}),
        (lambda: np.random.rand(), {"numpy"}),
        (lambda: random.random(), {"python"}),
        (lambda: (torch.rand(1), random.random()), {"torch_cpu", "python"}),
    ], ids=["none", "torch", "numpy", "python", "torch-and-python"])
    def test_consumed_flags(self, use: Callable[[], Any], expected: set[str]) -> None:
        @repro_track.record
        def work() -> None:
            use()

        _, m = captured(work)
        states = m["randomness"]["global"]
        assert {name for name in ("torch_cpu", "numpy", "python") if states[name]["consumed"]} == expected
        assert states["torch_cuda"]["available"] is False


class TestDeterminismKnobs:
    """Recording never leaves a global switch changed, even when it turns them on for the call."""

    @pytest.mark.parametrize("deterministic", [False, True], ids=["plain", "deterministic"])
    def test_unchanged_after_the_call(self, migrated_store: str, client: Any, monkeypatch: pytest.MonkeyPatch,
                                      deterministic: bool) -> None:
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # a non-default the call must not lose
        before = torch_state.determinism_knobs()

        @repro_track.record(deterministic=deterministic)
        def work() -> torch.Tensor:
            return torch.ones(2) @ torch.ones(2)

        work()
        assert torch_state.determinism_knobs() == before
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        recorded = stored_manifest(client, run_of(work))["determinism"]
        assert recorded["fully_deterministic"] is deterministic


class TestPipelineIdentity:
    """A pipeline argument is recorded with a weights digest that follows the weights."""

    def test_weights_digest_follows_in_place_edits(self, model_dir: Path) -> None:
        pipe = testing.load_pipeline(model_dir / "tiny-ddim", progress=False)

        @repro_track.record
        def identify(pipe: Any) -> None:
            return None

        def digest() -> str:
            return captured(identify, pipe)[1]["arguments"]["pipe"]["pipeline"]["weights_sha256"]

        original = digest()
        weight = next(pipe.unet.parameters())
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.view(-1)[0] += 1.0
        changed = digest()
        with torch.no_grad():
            weight.copy_(saved)
        assert original != changed
        assert digest() == original


# ---------------------------------------------------------------- outputs

class TestOutputTypes:
    """Every kind of return value is recorded under the names outputs.normalise gives it."""

    @pytest.mark.parametrize(("make", "names"), [
        (lambda: torch.linspace(0, 1, 6).reshape(2, 3), ["output"]),
        (lambda: np.arange(4, dtype=np.int16), ["output"]),
        (lambda: [torch.zeros(2), np.ones(3)], ["output.0", "output.1"]),
        (lambda: (torch.zeros(2), torch.ones(1)), ["output.0", "output.1"]),
        (lambda: {"latents": torch.zeros(1, 4), "mask": np.ones(2, bool)}, ["latents", "mask"]),
        (lambda: Image.new("RGB", (8, 4), (10, 20, 30)), ["output"]),
        (lambda: [Image.new("RGB", (8, 4), (i, 0, 0)) for i in range(3)], ["output"]),
        (lambda: ImagePipelineOutput(images=np.full((2, 4, 4, 3), 0.5, np.float32)), ["images"]),
        (lambda: 0.25, ["output"]),
        (lambda: None, []),
    ], ids=["tensor", "ndarray", "list", "tuple", "dict", "pil", "pil-list", "pipeline-output", "float",
            "none"])
    def test_names_and_bytes(self, migrated_store: str, client: Any, make: Callable[[], Any],
                             names: list[str]) -> None:
        @repro_track.record
        def produce() -> Any:
            return make()

        value = produce()
        run_id = run_of(produce)
        expected = outputs.normalise(value)
        assert [item.name for item in expected] == names
        m = stored_manifest(client, run_id)
        assert [o["name"] for o in m["outputs"]] == names
        saved = artifact_dir(client, run_id) / tags.OUTPUTS_PATH
        if not names:
            assert not saved.exists()
            return
        arrays = load_file(str(saved))
        assert sorted(arrays) == sorted(names)
        for record, item in zip(m["outputs"], expected):
            stored = arrays[record["name"]]
            assert list(stored.shape) == record["shape"]
            assert hashlib.sha256(np.ascontiguousarray(stored).tobytes()).hexdigest() == record["sha256"]
            assert np.array_equal(stored, np.asarray(item.value))
        assert runs.load_run(client, run_id, Path("dl")).run_id == run_id

    def test_pipeline_output_of_pil_images(self, migrated_store: str, client: Any, ddim: Any) -> None:
        @repro_track.record
        def sample(pipe: Any, *, generator: Any) -> Any:
            return pipe(num_inference_steps=1, generator=generator, output_type="pil")

        result = sample(ddim, generator=torch.Generator().manual_seed(SEED))
        [record] = stored_manifest(client, run_of(sample))["outputs"]
        assert (record["name"], record["source"], record["dtype"], record["shape"]) == (
            "images", "pil", "uint8", [1, 16, 16, 3])
        assert record["sha256"] == hashlib.sha256(np.asarray(result.images[0]).tobytes()).hexdigest()


# ---------------------------------------------------------------- where the run goes

@pytest.mark.slow
class TestUnreachableServer:
    """With MLflow down the call still returns, one warning says so, and sync uploads it exactly once."""

    def test_spool_then_sync_once(self, migrated_store: str, client: Any, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("REPRO_TRACK_DELIVERY", "sync")  # the warning at the call needs a waiting call
        down = f"http://127.0.0.1:{free_port()}"

        @repro_track.record(tracking_uri=down)
        def triple(x: int) -> np.ndarray:
            return np.full(2, 3 * x)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = triple(2)
        assert np.array_equal(result, [6, 6])
        [warning] = [w for w in caught if issubclass(w.category, RecordingWarning)]
        outcome = repro_track.last_recording(triple)
        assert outcome.run_id is None and outcome.spool_path is not None
        assert down in str(warning.message) and "not reachable" in str(warning.message)
        assert warning.filename == __file__
        assert str(outcome.spool_path) in str(warning.message)
        entry = tmp_path / "spool" / outcome.spool_path.name
        meta = json.loads((entry / "meta.json").read_text())
        assert meta["tracking_uri"] == down and tags.MANIFEST_PATH in meta["files"]

        first = run_cli("sync", "--tracking-uri", migrated_store, env=dict(os.environ))
        assert first.returncode == 0, first.stderr
        [run] = all_runs(client)
        assert first.stdout.split() == [outcome.spool_path.name, "->", "run", run.info.run_id]
        assert run.data.tags[tags.SPOOL_ID] == outcome.spool_path.name
        assert stored_manifest(client, run.info.run_id)["manifest_digest"] == outcome.manifest_digest
        assert not entry.exists()

        second = run_cli("sync", "--tracking-uri", migrated_store, env=dict(os.environ))
        assert (second.returncode, second.stdout) == (0, "")
        assert [r.info.run_id for r in all_runs(client)] == [run.info.run_id]


class TestParentRun:
    """Inside the caller's active run the recording is a child, and the caller's run stays active."""

    def test_child_run(self, migrated_store: str, client: Any) -> None:
        @repro_track.record
        def work() -> np.ndarray:
            return np.zeros(1)

        experiment_id = client.create_experiment("outer")
        with mlflow.start_run(experiment_id=experiment_id) as parent:
            work()
            assert mlflow.active_run().info.run_id == parent.info.run_id
        child = client.get_run(run_of(work))
        assert child.data.tags[tags.MLFLOW_PARENT_RUN_ID] == parent.info.run_id
        assert child.info.experiment_id == experiment_id


class TestGpu:
    """The GPU section says why there is none, or describes the NVIDIA GPUs NVML reports."""

    def test_machine_without_nvidia(self, migrated_store: str, client: Any, no_gpu_cache: Any) -> None:
        @repro_track.record
        def work() -> None:
            return None

        work()
        run_id = run_of(work)
        section = stored_manifest(client, run_id)["gpu"]
        assert (section["available"], section["devices"]) == (False, [])
        assert re.search("NVIDIA|NVML|nvidia-ml-py", section["reason"])
        assert client.get_run(run_id).data.tags[tags.GPU] == "none"

    def test_stand_in_h200(self, migrated_store: str, client: Any, monkeypatch: pytest.MonkeyPatch,
                           no_gpu_cache: Any) -> None:
        monkeypatch.setitem(sys.modules, "pynvml", fake_nvml("NVIDIA H200", 132))
        gpu_capture.clear_cache()

        @repro_track.record
        def work() -> None:
            return None

        work()
        run_id = run_of(work)
        section = stored_manifest(client, run_id)["gpu"]
        assert section["available"] is True
        assert {k: section["devices"][0][k] for k in ("name", "sm_count", "compute_capability")} == {
            "name": "NVIDIA H200", "sm_count": 132, "compute_capability": "9.0"}
        found = client.get_run(run_id).data.tags
        assert (found[tags.GPU], found[tags.SM_COUNT]) == ("NVIDIA H200", "132")
        assert "GPU NVIDIA H200 (132 SMs)" in found[tags.MLFLOW_NOTE]


# ---------------------------------------------------------------- scripts and secrets

HF_TOKEN = "hf_" + "Qw3rTy7UiOp9AsDfGh2JkLzXcV"
SECRET_KEY = "pk-" + "9fd0c1e2b3a4958677f8e9d0c1b2a3f4"
ENDPOINT_PASSWORD = "s3cretpass"
GITHUB_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
API_KEY = "sk-" + "live9aBcDeFgHiJkLmNoPqRsTuVwXyZ01"
PLANTED = [HF_TOKEN, SECRET_KEY, ENDPOINT_PASSWORD, GITHUB_TOKEN, API_KEY]

SCRIPT = f'''
import torch
import repro_track


@repro_track.record(experiment="secrets")
def generate(n: int, api_key: str = "", *, generator=None):
    return torch.randn(n, generator=generator)


if __name__ == "__main__":
    generate(4, api_key="{API_KEY}", generator=torch.Generator().manual_seed(5))
    print(repro_track.last_recording(generate).wait(120))
'''


@pytest.fixture(scope="class")
def script_run(tmp_path_factory: pytest.TempPathFactory, _migrated_mlflow_db: Path) -> dict[str, Any]:
    """A committed script in a git repository with credentials planted everywhere, run as __main__ once."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("secrets")
    project = write_project(root / "project", {"gen.py": SCRIPT})
    run_git(project, "init", "-q")
    run_git(project, "config", "user.name", "Test User")
    run_git(project, "config", "user.email", "test@example.com")
    run_git(project, "remote", "add", "origin", f"https://user:{GITHUB_TOKEN}@github.com/x/y.git")
    run_git(project, "add", "gen.py")
    run_git(project, "commit", "-q", "-m", "script")
    (root / "mlflow.db").write_bytes(_migrated_mlflow_db.read_bytes())
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_EXPERIMENT_NAME", "REPRO_TRACK_DISABLE")}
    env.update(MLFLOW_TRACKING_URI=uri, REPRO_TRACK_SPOOL_DIR=str(root / "spool"), HF_HUB_OFFLINE="1",
               HF_TOKEN=HF_TOKEN, PYTORCH_SECRET_KEY=SECRET_KEY,
               HF_ENDPOINT=f"https://user:{ENDPOINT_PASSWORD}@host/x")
    done = run_script(project / "gen.py", env=env, cwd=project)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(tracking_uri=uri)
    run_id = done.stdout.split()[-1]
    return {"root": root, "client": client, "run_id": run_id, "run": client.get_run(run_id),
            "manifest": stored_manifest(client, run_id)}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git executable")
class TestScriptWithSecrets:
    """A script run as __main__ is recorded as replayable, and no planted credential reaches the store."""

    def test_script_run_as_main(self, script_run: dict[str, Any]) -> None:
        call = script_run["manifest"]["call"]
        assert {k: call[k] for k in ("module", "is_script", "source_file", "replayable")} == {
            "module": "__main__", "is_script": True, "source_file": "gen.py", "replayable": True}
        assert script_run["run"].data.tags[tags.ENTRY_POINT] == "gen.py:generate"
        validate_published(script_run["manifest"])

    def test_secrets_were_seen_and_withheld(self, script_run: dict[str, Any]) -> None:
        m = script_run["manifest"]
        assert {"HF_TOKEN", "PYTORCH_SECRET_KEY"} <= set(m["env_vars"]["dropped"])
        assert m["env_vars"]["captured"]["HF_ENDPOINT"] == "<redacted>"
        assert m["git"]["remote_url"] == "https://github.com/x/y.git"
        assert m["arguments"]["api_key"]["kind"] == "redacted"

    def test_no_planted_secret_anywhere_in_the_store(self, script_run: dict[str, Any]) -> None:
        root = script_run["root"]
        artifacts = artifact_dir(script_run["client"], script_run["run_id"])
        files = [*root.glob("mlflow.db*"), *(p for folder in (artifacts, root / "spool")
                                             for p in folder.rglob("*") if p.is_file())]
        assert (artifacts / tags.MANIFEST_PATH) in files and len(files) > 3
        leaks = [(str(path.relative_to(root)), secret) for path in files for secret in PLANTED
                 if secret.encode() in path.read_bytes()]
        assert leaks == []


@pytest.mark.slow
class TestExamples:
    """The shipped examples run as scripts and each record a valid, loadable run."""

    @pytest.mark.parametrize(("script", "shape"), [
        ("ddim_cpu.py", [1, 16, 16, 3]), ("text_to_image.py", [1, 32, 32, 3])], ids=["ddim", "text-to-image"])
    def test_example(self, migrated_store: str, client: Any, example_env: dict[str, str], tmp_path: Path,
                     script: str, shape: list[int]) -> None:
        env = {**example_env, "MLFLOW_TRACKING_URI": migrated_store}
        done = run_script(REPO / "examples" / script, "--steps", "2", "--run-id-file",
                          str(tmp_path / "run_id"), env=env)
        assert done.returncode == 0, done.stderr
        run_id = (tmp_path / "run_id").read_text().strip()
        assert done.stdout.strip() == run_id
        loaded = runs.load_run(client, run_id, tmp_path / "dl")  # validates and checks digests
        m = loaded.manifest.to_dict()
        validate_published(m)
        assert (m["call"]["source_file"], m["call"]["replayable"]) == (f"examples/{script}", True)
        assert m["arguments"]["pipe"]["kind"] == "pipeline"
        assert [(o["name"], o["shape"]) for o in m["outputs"]] == [("output", shape)]
