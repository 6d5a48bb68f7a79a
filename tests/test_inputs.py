"""Inputs as they were: PIL images, tuples, numpy scalars, numpy and Python generators, and tensors the
call writes into are recorded at entry and rebuilt as the same type, state and bytes."""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from repro_track import outputs, settings
from repro_track.capture import arguments, host_rngs, images
from repro_track.replay.child import build_arguments

from conftest import recording_env, run_script, write_project


def _capture(fn, *args: Any, **kwargs: Any) -> arguments.CapturedArguments:
    bound = inspect.signature(fn).bind(*args, **kwargs)
    return arguments.capture_arguments(bound, settings.MAX_INPUT_BYTES.get())


def _rebuild(fn, captured: arguments.CapturedArguments) -> tuple[list, dict]:
    """What the replay child passes to fn, from the records and the saved inputs (through safetensors)."""
    inputs = {item.name: torch.from_numpy(np.array(item.value)) if not torch.is_tensor(item.value)
              else item.value.clone() for item in captured.inputs}
    m = {"arguments": captured.records, "randomness": {"generators": captured.generators}}
    return build_arguments(m, inspect.signature(fn), inputs, force=False)


def _pil(mode: str, size: tuple[int, int] = (7, 5)) -> Image.Image:
    rng = np.random.default_rng(0)
    if mode == "P":
        image = Image.fromarray(rng.integers(0, 16, (size[1], size[0]), dtype=np.uint8)).convert("P")
        image.putpalette([(i * 7) % 256 for i in range(768)])
        return image
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    return rgba.convert(mode)


class TestImageArguments:
    """A PIL image (any mode) or a list of them comes back with the same mode, size, palette and pixels."""

    @pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "1", "P", "I", "F"])
    def test_one_image_round_trips(self, mode: str) -> None:
        def f(image):
            return image

        original = _pil(mode)
        captured = _capture(f, original)
        record = captured.records["image"]
        assert (record["kind"], record["mode"], record["size"], record["replayable"]) == ("image", mode, [7, 5], True)
        args, _ = _rebuild(f, captured)
        rebuilt = args[0]
        assert isinstance(rebuilt, Image.Image)
        assert (rebuilt.mode, rebuilt.size, rebuilt.tobytes()) == (mode, original.size, original.tobytes())
        assert rebuilt.getpalette() == original.getpalette()

    def test_list_and_tuple_of_images_keep_their_container(self) -> None:
        def f(image, mask_image):
            return image

        captured = _capture(f, [_pil("RGB"), _pil("RGB")], (_pil("L"),))
        assert captured.records["image"]["kind"] == "images"
        args, _ = _rebuild(f, captured)
        assert isinstance(args[0], list) and isinstance(args[1], tuple)
        assert [i.mode for i in args[0]] + [i.mode for i in args[1]] == ["RGB", "RGB", "L"]

    def test_image_changed_by_the_call_is_recorded_as_it_entered(self) -> None:
        def f(image):
            return image

        image = _pil("RGB")
        before = image.tobytes()
        captured = _capture(f, image)
        image.paste((255, 0, 0), (0, 0, 7, 5))  # the call draws on its input
        args, _ = _rebuild(f, captured)
        assert args[0].tobytes() == before != image.tobytes()

    def test_image_over_the_cap_is_named_with_the_cap(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def f(image):
            return image

        monkeypatch.setenv(settings.MAX_INPUT_BYTES.name, "10")
        record = _capture(f, _pil("RGB")).records["image"]
        assert record["replayable"] is False
        assert "over the 10-byte cap" in record["reason"] and settings.MAX_INPUT_BYTES.name in record["reason"]


class TestPlainValues:
    """Tuples stay tuples; numpy scalars are numbers and count as seeds."""

    def test_tuple_argument_stays_a_tuple(self) -> None:
        def f(size, steps):
            return size

        args, _ = _rebuild(f, _capture(f, (64, 32), [1, 2]))
        assert args == [(64, 32), [1, 2]] and isinstance(args[0], tuple) and isinstance(args[1], list)

    def test_numpy_integer_seed_is_a_number_and_a_seed(self) -> None:
        def f(seed, scale):
            return seed

        captured = _capture(f, np.int64(42), np.float32(0.5))
        assert captured.records["seed"]["value"] == 42 and captured.records["scale"]["value"] == 0.5
        assert captured.seeds == {"seed": 42}


class TestHostGenerators:
    """numpy Generator/RandomState and random.Random arguments come back at the state they entered with."""

    @pytest.mark.parametrize("make, draw", [
        (lambda: np.random.default_rng(5), lambda g: g.standard_normal(4).tolist()),
        (lambda: np.random.Generator(np.random.MT19937(5)), lambda g: g.random(4).tolist()),
        (lambda: np.random.Generator(np.random.Philox(5)), lambda g: g.integers(0, 1000, 4).tolist()),
        (lambda: np.random.RandomState(5), lambda g: g.randn(4).tolist()),
        (lambda: random.Random(5), lambda g: [g.random() for _ in range(4)]),
    ], ids=["pcg64", "mt19937", "philox", "randomstate", "python-random"])
    def test_state_round_trips_mid_stream(self, make, draw) -> None:
        def f(rng):
            return rng

        rng = make()
        draw(rng)  # mid-stream, not at its seed
        captured = _capture(f, rng)
        json.dumps(captured.records)  # the record is plain JSON
        expected = draw(rng)
        args, _ = _rebuild(f, captured)
        assert type(args[0]) is type(rng)
        assert draw(args[0]) == expected

    def test_unknown_bit_generator_is_refused(self) -> None:
        with pytest.raises(ValueError, match="unknown numpy bit generator"):
            host_rngs.rebuild({"type": "numpy.random.Generator", "state": {"bit_generator": "os.system"}})


class TestTensorInputs:
    """A tensor the call writes into is saved as it was at entry, matching its recorded digest."""

    def test_latents_mutated_in_place_are_saved_as_they_entered(self) -> None:
        def f(latents):
            latents.mul_(2)
            return latents

        latents = torch.arange(6, dtype=torch.float32)
        captured = _capture(f, latents)
        f(latents)
        [saved] = captured.inputs
        assert outputs.sha256_of(saved.value) == captured.records["latents"]["sha256"]
        assert torch.equal(saved.value, torch.arange(6, dtype=torch.float32))

    def test_snapshot_image_bytes_are_raw(self) -> None:
        image = _pil("RGB")
        raw, meta = images.snapshot(image)
        assert raw.tobytes() == image.tobytes() and meta == {"mode": "RGB", "size": [7, 5]}


PROJECT = '''
    """Recorded functions that take the inputs people really pass."""
    import random

    import numpy as np
    import torch
    from PIL import Image

    import repro_track


    @repro_track.record(experiment="inputs")
    def img2img_like(image, mask_image, latents, size, rng, pyrng, seed, *, generator=None):
        assert isinstance(image, Image.Image) and image.mode == "RGB", type(image)
        assert isinstance(mask_image, list) and mask_image[0].mode == "L"
        assert isinstance(size, tuple)
        assert isinstance(rng, np.random.Generator) and isinstance(pyrng, random.Random)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        mask = torch.from_numpy(np.asarray(mask_image[0], dtype=np.float32) / 255.0)
        latents.add_(torch.randn(latents.shape, generator=generator))  # written in place, as pipelines do
        jitter = torch.from_numpy(rng.standard_normal(size).astype(np.float32))
        return {"out": pixels.mean(-1) * mask + latents + jitter * pyrng.random() + int(seed)}
'''

RECORD = '''
    import json
    import random
    import sys

    import numpy as np
    import torch
    from PIL import Image

    import gen
    import repro_track

    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8), "RGB")
    mask = Image.fromarray(np.random.default_rng(2).integers(0, 256, (6, 5), dtype=np.uint8), "L")
    rng = np.random.default_rng(3)
    rng.random(10)
    gen.img2img_like(rgb, [mask], torch.zeros(6, 5), (6, 5), rng, random.Random(4), np.int64(9),
                     generator=torch.Generator().manual_seed(5))
    print(json.dumps({"run": repro_track.last_recording(gen.img2img_like).wait(timeout=120)}))
'''


@pytest.mark.slow
class TestReplayOfRealInputs:
    """A call with a PIL image, a list of masks, latents written in place, a tuple, numpy and Python
    generators and a numpy seed, recorded in one process, replays exactly in another."""

    def test_replay_is_exact(self, tmp_path: Path) -> None:
        import repro_track

        project = write_project(tmp_path / "proj", {"gen.py": PROJECT, "record.py": RECORD})
        uri = f"sqlite:///{tmp_path / 'inputs.db'}"
        done = run_script(project / "record.py", env=recording_env(uri, tmp_path / "spool"), cwd=project)
        assert done.returncode == 0, done.stderr
        run_id = json.loads(done.stdout.strip().splitlines()[-1])["run"]
        assert run_id, done.stderr
        report = repro_track.replay(run_id, tracking_uri=uri, project_dir=project, log=False)
        assert (report.expected, report.observed) == ("exact", "exact"), report.reasons
