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



ONE_PASS_CASES = [
    lambda: torch.randn(3, 5, generator=torch.Generator().manual_seed(0)),
    lambda: torch.arange(24, dtype=torch.float32).reshape(4, 6).t(),
    lambda: torch.arange(40, dtype=torch.int64).reshape(5, 8)[:, ::3],
    lambda: torch.linspace(-1, 1, 9).to(torch.bfloat16),
    lambda: torch.linspace(-1, 1, 9).to(torch.float16),
    lambda: torch.tensor([True, False, True]),
    lambda: torch.tensor(2.5),
    lambda: torch.zeros(0, 4),
    lambda: np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),
    lambda: np.arange(30, dtype=np.uint8).reshape(5, 6)[::2, 1:],
    lambda: np.asarray(3.0),
    lambda: np.float32(2.5),
    lambda: torch.rand(1, 3, 8, 5, generator=torch.Generator().manual_seed(0)).permute(0, 2, 3, 1),
    lambda: torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0)).permute(0, 2, 3, 1).numpy(),
]
ONE_PASS_IDS = ["float32", "transposed", "strided-int64", "bfloat16", "float16", "bool", "0-d-tensor", "empty",
                "fortran-int32", "sliced-uint8", "0-d-ndarray", "numpy-scalar", "nhwc-tensor", "nhwc-ndarray"]


class TestOnePass:
    """Saving hashes (and summarises) each array while writing it: same digests, same file as safetensors."""

    @pytest.fixture(params=[False, True], ids=["whole", "tiny-chunks-in-a-thread"])
    def chunking(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
        if request.param:  # many 3-element chunks, hashed in the worker thread even for tiny arrays
            monkeypatch.setattr(outputs, "_STAT_CHUNK", 3)
            monkeypatch.setattr(outputs, "_PARALLEL_BYTES", 0)

    @pytest.mark.parametrize("make", ONE_PASS_CASES, ids=ONE_PASS_IDS)
    def test_digest_is_sha256_of_the_bytes(self, make: Callable[[], Any], chunking: None, tmp_path: Path) -> None:
        value = make()
        digests = outputs.save_arrays([outputs.NamedArray("x", value, "tensor")], tmp_path / "o.safetensors")
        assert digests == {"x": reference_sha256(value)}
        loaded = outputs.load_arrays(tmp_path / "o.safetensors")["x"]
        assert reference_sha256(loaded) == digests["x"]
        assert list(loaded.shape) == list(np.shape(value))

    @pytest.mark.parametrize("make", ONE_PASS_CASES, ids=ONE_PASS_IDS)
    def test_a_digest_already_known_is_not_computed_again(self, make: Callable[[], Any], chunking: None,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        # The recorder describes an output for the manifest, then stages it with that digest: the
        # file must be the same bytes, and no sha256 is fed a second time.
        value = make()
        item = outputs.NamedArray("x", value, "tensor")
        known = outputs.describe(item)["sha256"]
        outputs.save_arrays([item], tmp_path / "hashed.safetensors")
        fed = []
        monkeypatch.setattr(outputs._Digest, "update", lambda self, chunk: fed.append(len(chunk)))
        assert outputs.save_arrays([item], tmp_path / "known.safetensors", digests={"x": known}) == {"x": known}
        assert fed == []
        assert (tmp_path / "known.safetensors").read_bytes() == (tmp_path / "hashed.safetensors").read_bytes()

    @pytest.mark.parametrize("make", ONE_PASS_CASES, ids=ONE_PASS_IDS)
    def test_described_while_saving_equals_describe(self, make: Callable[[], Any], chunking: None,
                                                    tmp_path: Path) -> None:
        item = outputs.NamedArray("x", make(), "tensor")
        [record] = outputs.save_arrays_described([item], tmp_path / "o.safetensors")
        assert record == outputs.describe(item, saved=True)
        assert record["sha256"] == reference_sha256(item.value)

    def test_statistics_do_not_depend_on_chunking(self, monkeypatch: pytest.MonkeyPatch) -> None:
        item = outputs.NamedArray("x", torch.randn(1000, generator=torch.Generator().manual_seed(1)), "tensor")
        whole = outputs.describe(item)
        monkeypatch.setattr(outputs, "_STAT_CHUNK", 7)
        monkeypatch.setattr(outputs, "_PARALLEL_BYTES", 0)
        chunked = outputs.describe(item)
        assert chunked["sha256"] == whole["sha256"]
        assert (chunked["min"], chunked["max"]) == (whole["min"], whole["max"])
        assert chunked["abs_sum"] == pytest.approx(whole["abs_sum"], rel=1e-12)

    def test_file_is_what_safetensors_writes(self, tmp_path: Path) -> None:
        from safetensors.torch import save_file

        dtypes = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.float16, torch.bfloat16, torch.int32,
                  torch.float32, torch.float64, torch.int64, torch.float8_e4m3fn, torch.float8_e5m2]
        items = [outputs.NamedArray(f"out.{i}", torch.arange(6).reshape(2, 3).to(dtype), "tensor")
                 for i, dtype in enumerate(dtypes)]
        items += [outputs.NamedArray("b", np.asarray(1.5), "number"),
                  outputs.NamedArray("a", np.arange(6, dtype=np.float32).reshape(2, 3).T, "ndarray"),
                  outputs.NamedArray("ü", torch.ones(1), "tensor")]
        outputs.save_arrays(items, tmp_path / "ours.safetensors")
        save_file({item.name: outputs.as_cpu_tensor(item.value) for item in items},
                  str(tmp_path / "theirs.safetensors"), metadata={"format": "repro-track"})
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()

    def test_unsavable_arrays_are_described_not_saved(self, tmp_path: Path) -> None:
        items = [outputs.NamedArray("c", torch.tensor([1 + 2j]), "tensor"),
                 outputs.NamedArray("r", np.ones(2), "ndarray"),
                 outputs.NamedArray("q", np.ones(2, np.longdouble), "ndarray")]
        records = outputs.save_arrays_described(items, tmp_path / "o.safetensors")
        assert [(r["name"], r["saved"]) for r in records] == [("c", False), ("r", True), ("q", False)]
        assert [r["sha256"] for r in records] == [reference_sha256(item.value) for item in items]
        assert sorted(outputs.load_arrays(tmp_path / "o.safetensors")) == ["r"]

    def test_a_repeated_name_keeps_the_last_array(self, tmp_path: Path) -> None:
        first, last = torch.zeros(2), torch.ones(3)
        items = [outputs.NamedArray("x", first, "tensor"), outputs.NamedArray("x", last, "tensor")]
        records = outputs.save_arrays_described(items, tmp_path / "o.safetensors")
        assert [(r["saved"], r["sha256"]) for r in records] == [(False, reference_sha256(first)),
                                                                (True, reference_sha256(last))]
        assert torch.equal(outputs.load_arrays(tmp_path / "o.safetensors")["x"], last)

    def test_contiguous_arrays_are_read_in_place(self) -> None:
        tensor, array = torch.arange(8.0), np.arange(8.0)
        assert outputs._window(tensor, 2, 5).data_ptr() == tensor.data_ptr() + 2 * tensor.element_size()
        assert np.shares_memory(outputs._window(array, 2, 5), array)

    @pytest.mark.parametrize("make", [
        lambda: np.arange(60).reshape(3, 4, 5).transpose(2, 0, 1),
        lambda: torch.arange(60).reshape(3, 4, 5).permute(1, 2, 0),
        lambda: torch.arange(120).reshape(1, 3, 8, 5).permute(0, 2, 3, 1),
        lambda: np.arange(100)[::3],
        lambda: np.arange(24.0).reshape(4, 6)[:, 1:5],
    ], ids=["transposed-3d", "permuted-tensor", "nhwc-batch-of-one", "every-third", "column-slice"])
    @pytest.mark.parametrize("size", [1, 2, 7, 13, 1000])
    def test_strided_arrays_are_read_a_window_at_a_time(self, make: Callable[[], Any], size: int) -> None:
        array = make()
        count = int(np.prod(array.shape))
        windows = [outputs._window(array, start, min(start + size, count)) for start in range(0, count, size)]
        assert [len(w) for w in windows] == [min(size, count - start) for start in range(0, count, size)]
        assert np.array_equal(np.concatenate([np.asarray(w) for w in windows]), np.asarray(array).reshape(-1))

    def test_a_strided_output_is_never_copied_whole(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        import tracemalloc  # numpy reports its buffers to tracemalloc

        monkeypatch.setattr(outputs, "_STAT_CHUNK", 65536)  # 256 KiB windows of float32
        item = outputs.NamedArray("x", np.random.default_rng(0).random((2048, 2048), dtype=np.float32).T, "ndarray")
        tracemalloc.start()
        try:
            outputs.describe(item)
            outputs.save_arrays([item], tmp_path / "a.safetensors")
            outputs.save_arrays_described([item], tmp_path / "b.safetensors")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < item.value.nbytes // 4  # a 16 MiB array; a whole copy would be 16 MiB

    def test_a_failed_write_raises_and_stops_the_hashing_thread(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import threading

        monkeypatch.setattr(outputs, "_STAT_CHUNK", 4)
        monkeypatch.setattr(outputs, "_PARALLEL_BYTES", 0)

        class FullDisk:
            def __init__(self) -> None:
                self.writes = 0

            def write(self, chunk: memoryview) -> None:
                self.writes += 1
                if self.writes == 3:
                    raise OSError(28, "No space left on device")

        before = threading.active_count()
        with pytest.raises(OSError, match="No space left"):
            outputs._scan(torch.arange(64.0), FullDisk())
        assert threading.active_count() == before


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
