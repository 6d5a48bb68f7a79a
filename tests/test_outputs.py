"""Tests for repro_track.outputs: naming return values, digesting their exact bytes, saving them."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from diffusers import ImagePipelineOutput
from PIL import Image

from repro_track import outputs


def pil(width: int = 8, height: int = 6, shade: int = 0) -> Image.Image:
    pixels = (np.arange(height * width * 3).reshape(height, width, 3) + shade) % 256
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def reference_sha256(value: Any) -> str:
    """sha256 over the C-contiguous bytes, computed without the package."""
    if isinstance(value, torch.Tensor):
        raw = value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    else:
        raw = np.ascontiguousarray(value).tobytes()
    return hashlib.sha256(raw).hexdigest()


class TestNormalise:
    """A return value becomes the arrays inside it, each named by its path in the value."""

    @pytest.mark.parametrize(("make", "expected"), [
        (lambda: torch.zeros(2, 3), [("output", "tensor", (2, 3))]),
        (lambda: np.zeros((4,), np.float16), [("output", "ndarray", (4,))]),
        (lambda: 1.5, [("output", "number", ())]),
        (lambda: 7, [("output", "number", ())]),
        (lambda: [torch.zeros(1), np.zeros(2)],
         [("output.0", "tensor", (1,)), ("output.1", "ndarray", (2,))]),
        (lambda: (torch.zeros(1), None, "text"), [("output.0", "tensor", (1,))]),
        (lambda: {"latents": torch.zeros(1), "extra": {"mask": np.zeros(3)}},
         [("latents", "tensor", (1,)), ("extra.mask", "ndarray", (3,))]),
        (lambda: pil(), [("output", "pil", (6, 8, 3))]),
        (lambda: [pil(), pil(shade=1)], [("output", "pil", (2, 6, 8, 3))]),
        (lambda: [pil(8, 6), pil(4, 4)], [("output.0", "pil", (6, 8, 3)), ("output.1", "pil", (4, 4, 3))]),
        (lambda: ImagePipelineOutput(images=np.zeros((2, 4, 4, 3), np.float32)),
         [("images", "ndarray", (2, 4, 4, 3))]),
        (lambda: ImagePipelineOutput(images=[pil(), pil()]), [("images", "pil", (2, 6, 8, 3))]),
        (lambda: None, []),
        (lambda: "text", []),
        (lambda: b"bytes", []),
        (lambda: True, []),
        (lambda: [], []),
    ], ids=["tensor", "ndarray", "float", "int", "list", "tuple", "nested-dict", "pil", "pil-list",
            "pil-list-mixed-sizes", "pipeline-output-np", "pipeline-output-pil", "none", "str", "bytes",
            "bool", "empty-list"])
    def test_names(self, make: Callable[[], Any], expected: list[tuple[str, str, tuple]]) -> None:
        found = [(item.name, item.source, tuple(item.value.shape)) for item in outputs.normalise(make())]
        assert found == expected

    @pytest.mark.parametrize("make", [lambda: torch.ones(3), lambda: np.ones(3)], ids=["tensor", "ndarray"])
    def test_arrays_are_not_copied(self, make: Callable[[], Any]) -> None:
        value = make()
        assert outputs.normalise({"x": value})[0].value is value


class TestSha256:
    """Digests cover exactly the array's bytes in C order, whatever the layout or dtype."""

    @pytest.mark.parametrize("make", [
        lambda: torch.arange(12, dtype=torch.float32).reshape(3, 4),
        lambda: torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
        lambda: torch.linspace(-1, 1, 9).to(torch.bfloat16),
        lambda: torch.tensor([True, False, True]),
        lambda: np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
        lambda: np.float32(2.5),
        lambda: np.asarray(3.0),
    ], ids=["float32", "transposed", "bfloat16", "bool", "fortran-ndarray", "numpy-scalar", "0-d"])
    def test_matches_hashlib(self, make: Callable[[], Any]) -> None:
        value = make()
        assert outputs.sha256_of(value) == reference_sha256(value)

    def test_chunking_does_not_change_the_digest(self, monkeypatch: pytest.MonkeyPatch) -> None:
        value = np.random.default_rng(0).random(1000)
        whole = outputs.sha256_of(value)
        monkeypatch.setattr(outputs, "_CHUNK", 7)
        assert outputs.sha256_of(value) == whole == reference_sha256(value)

    def test_one_changed_bit_changes_the_digest(self) -> None:
        value = np.zeros(16, np.uint8)
        flipped = value.copy()
        flipped[5] ^= 1
        assert outputs.sha256_of(value) != outputs.sha256_of(flipped)


class TestDescribe:
    """An output's record holds its identity, digest and summary statistics."""

    def test_record(self) -> None:
        value = torch.tensor([[-2.0, 1.0], [0.5, 3.0]])
        record = outputs.describe(outputs.NamedArray("latents", value, "tensor"))
        assert record == {"name": "latents", "source": "tensor", "dtype": "float32", "shape": [2, 2],
                          "device": "cpu", "nbytes": 16, "sha256": reference_sha256(value), "saved": True,
                          "min": -2.0, "max": 3.0, "abs_sum": 6.5}

    @pytest.mark.parametrize("value", [
        np.zeros((0, 3), np.float32), np.array([True, False]), np.array([1.0, np.nan]),
        torch.tensor([1 + 2j]),
    ], ids=["empty", "bool", "nan", "complex"])
    def test_statistics_are_none_when_meaningless(self, value: Any) -> None:
        record = outputs.describe(outputs.NamedArray("x", value, "ndarray"))
        assert (record["min"], record["max"], record["abs_sum"]) == (None, None, None)


class TestSaveAndLoad:
    """What is saved to safetensors loads back with the recorded dtype, shape and sha256."""

    @pytest.mark.parametrize("make", [
        lambda: torch.randn(2, 3, generator=torch.Generator().manual_seed(0)),
        lambda: torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),
        lambda: torch.linspace(-1, 1, 5).to(torch.bfloat16),
        lambda: np.array([[1, 2], [3, 4]], np.uint8),
        lambda: np.array([True, False]),
        lambda: np.asarray(1.5),
        lambda: np.float32(2.5),
    ], ids=["float32", "transposed", "bfloat16", "uint8", "bool", "0-d", "numpy-scalar"])
    def test_round_trip(self, make: Callable[[], Any], tmp_path: Path) -> None:
        value = make()
        record = outputs.describe(outputs.NamedArray("x", value, "ndarray"))
        outputs.save_arrays([outputs.NamedArray("x", value, "ndarray")], tmp_path / "o.safetensors")
        loaded = outputs.load_arrays(tmp_path / "o.safetensors")["x"]
        assert (outputs.dtype_name(loaded), list(loaded.shape), outputs.sha256_of(loaded)) == (
            record["dtype"], record["shape"], record["sha256"])

    def test_unsavable_dtype_is_skipped(self, tmp_path: Path) -> None:
        items = [outputs.NamedArray("c", torch.tensor([1j]), "tensor"),
                 outputs.NamedArray("r", np.ones(2), "ndarray")]
        outputs.save_arrays(items, tmp_path / "o.safetensors")
        assert sorted(outputs.load_arrays(tmp_path / "o.safetensors")) == ["r"]



class TestAsCpuTensor:
    """Arrays become CPU tensors for safetensors, shared where torch allows it."""

    def test_writable_array_is_shared(self) -> None:
        arr = np.ones((2, 3), np.float32)
        assert np.shares_memory(outputs.as_cpu_tensor(arr).numpy(), arr)

    def test_read_only_array_is_copied(self) -> None:
        arr = np.asarray(pil())  # PIL hands out read-only arrays; torch warns on sharing those
        assert not arr.flags.writeable
        tensor = outputs.as_cpu_tensor(arr)
        assert not np.shares_memory(tensor.numpy(), arr)
        assert np.array_equal(tensor.numpy(), arr)


class TestImageFiles:
    """Image-like outputs get PNG previews that show the exact pixels; other arrays get none."""

    @staticmethod
    def pixels(path: Path, height: int) -> np.ndarray:
        with Image.open(path) as image:
            assert image.format == "PNG"
            arr = np.asarray(image)
        step = arr.shape[0] // height  # previews of tiny images are enlarged without smoothing
        return arr[::step, ::step]

    @pytest.mark.parametrize(("value", "layout"), [
        (np.random.default_rng(0).random((2, 5, 4, 3), dtype=np.float32), "nhwc"),
        (torch.rand(2, 3, 5, 6, generator=torch.Generator().manual_seed(0)), "nchw"),
    ], ids=["numpy-nhwc", "torch-nchw"])
    def test_float_images(self, value: Any, layout: str, tmp_path: Path) -> None:
        written = outputs.image_files([outputs.NamedArray("images", value, "x")], tmp_path)
        assert [p.name for p in written] == ["images_0.png", "images_1.png"]
        arr = np.asarray(value) if layout == "nhwc" else value.permute(0, 2, 3, 1).numpy()
        expected = (arr * 255).round().astype(np.uint8)
        for index, path in enumerate(written):
            assert np.array_equal(self.pixels(path, 5), expected[index])

    @pytest.mark.parametrize("value", [
        np.full((1, 4, 4, 3), 2.0, np.float32),  # outside [0, 1]: latents, not pixels
        np.zeros((1, 4, 4, 3), np.int32),
        np.zeros((4, 4, 7), np.uint8),
        np.zeros(10, np.float32),
    ], ids=["out-of-range", "int32", "seven-channels", "vector"])
    def test_non_images_get_no_png(self, value: np.ndarray, tmp_path: Path) -> None:
        assert outputs.image_files([outputs.NamedArray("x", value, "ndarray")], tmp_path) == []
        assert list(tmp_path.iterdir()) == []

    def test_limit(self, tmp_path: Path) -> None:
        batch = np.zeros((5, 2, 2, 3), np.uint8)
        assert len(outputs.image_files([outputs.NamedArray("x", batch, "ndarray")], tmp_path, limit=3)) == 3
