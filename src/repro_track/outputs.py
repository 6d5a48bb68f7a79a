"""Outputs: normalise a return value to named arrays, digest their exact bytes, save them.

The bits live in a safetensors file (never pickle); PNG copies exist only so the MLflow UI can show
images. Digests are sha256 over the array's C-contiguous bytes in native (little-endian) order, streamed
in chunks so a large output is not copied whole.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CHUNK = 16 * 1024 * 1024
_STAT_CHUNK = 1024 * 1024  # elements per chunk: small temporaries that stay in cache
_PARALLEL_BYTES = 4 * 1024 * 1024  # above this, hash in a thread while the statistics run
_MIN_PREVIEW = 128  # pixels; PNGs are previews for the UI, the exact bits are in safetensors


@dataclass(frozen=True)
class NamedArray:
    """One output array, by the name it gets in the manifest and the safetensors file."""

    name: str
    value: Any  # numpy.ndarray or torch.Tensor
    source: str  # "tensor", "ndarray", "pil", "number"


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _is_ndarray(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape")


def _is_pil(value: Any) -> bool:
    return any(cls.__module__.startswith("PIL.") for cls in type(value).__mro__) and hasattr(value, "mode")


def _join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def normalise(result: Any, prefix: str = "") -> list[NamedArray]:
    """The arrays inside a return value, named by their path ('images', 'output.0', ...)."""
    import numpy as np

    name = prefix or "output"
    if result is None or isinstance(result, (str, bytes)):
        return []
    if _is_tensor(result):
        return [NamedArray(name, result, "tensor")]
    if _is_ndarray(result):
        return [NamedArray(name, result, "ndarray")]
    if isinstance(result, (bool, int, float)) and not isinstance(result, bool):
        return [NamedArray(name, np.asarray(result), "number")]
    if _is_pil(result):
        return [NamedArray(name, np.asarray(result), "pil")]
    if isinstance(result, Mapping):  # diffusers' BaseOutput is an OrderedDict
        return [arr for key, value in result.items() for arr in normalise(value, _join(prefix, key))]
    if isinstance(result, (list, tuple)):
        if result and all(_is_pil(item) for item in result):
            arrays = [np.asarray(item) for item in result]
            if len({(a.shape, a.dtype) for a in arrays}) == 1:
                return [NamedArray(name, np.stack(arrays), "pil")]
        return [arr for i, value in enumerate(result) for arr in normalise(value, _join(name, i))]
    return []


def to_numpy_view(value: Any) -> Any:
    """A C-contiguous numpy view of the array's bytes (CPU copy only for device tensors)."""
    import numpy as np

    if _is_tensor(value):
        import torch

        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.contiguous()
        if tensor.dtype in (torch.bfloat16,) or "float8" in str(tensor.dtype):
            return tensor.reshape(-1).view(torch.uint8).numpy()
        return tensor.numpy()
    return np.ascontiguousarray(value)


def sha256_of(value: Any) -> str:
    """sha256 of the exact bytes, streamed in 16 MiB chunks."""
    flat = to_numpy_view(value).reshape(-1).view("uint8")
    digest = hashlib.sha256()
    for start in range(0, flat.size, _CHUNK):
        digest.update(memoryview(flat[start:start + _CHUNK]))
    return digest.hexdigest()


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _stats(value: Any) -> dict[str, float | None]:
    """min, max and sum of |x|, a chunk at a time: no full-size temporary, sums in float64."""
    none = {"min": None, "max": None, "abs_sum": None}
    if _is_tensor(value):
        import torch

        t = value.detach()
        if t.numel() == 0 or t.dtype == torch.bool or t.is_complex():
            return none
        flat = t.reshape(-1)
        parts = [_tensor_part(flat[i:i + _STAT_CHUNK]) for i in range(0, flat.numel(), _STAT_CHUNK)]
    else:
        import numpy as np

        arr = np.asarray(value)
        if arr.size == 0 or arr.dtype.kind not in "iuf":
            return none
        flat = arr.reshape(-1)
        parts = [(float(c.min()), float(c.max()), float(np.add.reduce(np.abs(c), dtype=np.float64)))
                 for c in (flat[i:i + _STAT_CHUNK] for i in range(0, flat.size, _STAT_CHUNK))]
    return {"min": _finite(min(p[0] for p in parts)), "max": _finite(max(p[1] for p in parts)),
            "abs_sum": _finite(math.fsum(p[2] for p in parts))}


def _tensor_part(chunk: Any) -> tuple[float, float, float]:
    import torch

    low, high = torch.aminmax(chunk)  # exact in the tensor's own dtype
    if chunk.is_floating_point():
        total = torch.linalg.vector_norm(chunk, 1, dtype=torch.float64)
    else:
        total = chunk.abs().sum(dtype=torch.float64)
    return float(low), float(high), float(total)


def dtype_name(value: Any) -> str:
    """'float32', 'uint8', 'bfloat16'... the same spelling for torch and numpy."""
    return str(value.dtype).removeprefix("torch.")


def describe(item: NamedArray, saved: bool = True) -> dict[str, Any]:
    """The manifest record of one output: identity, digest and the doc-style fingerprints."""
    value = item.value
    if _is_tensor(value) and value.device.type != "cpu":
        value = value.detach().cpu()  # one copy off the device, shared by the digest and the stats
    nbytes = int(to_numpy_view(value).nbytes)
    if nbytes > _PARALLEL_BYTES:
        # hashlib and torch/numpy release the GIL on large buffers: digest and stats overlap.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            digest = pool.submit(sha256_of, value)
            stats = _stats(value)
            sha = digest.result()
    else:
        sha, stats = sha256_of(value), _stats(value)
    return {
        "name": item.name,
        "source": item.source,
        "dtype": dtype_name(value),
        "shape": [int(n) for n in value.shape],
        "device": str(item.value.device) if _is_tensor(item.value) else "cpu",
        "nbytes": nbytes,
        "sha256": sha,
        "saved": saved,
        **stats,
    }


def as_cpu_tensor(value: Any) -> Any:
    """A contiguous CPU torch tensor sharing memory where possible (safetensors wants tensors)."""
    import numpy as np
    import torch

    if _is_tensor(value):
        return value.detach().cpu().contiguous()
    arr = np.asarray(value)
    # ascontiguousarray returns at least 1-d; a 0-d output (a returned float) must keep shape ()
    # or the saved file contradicts the manifest and the run reads as tampered.
    arr = np.ascontiguousarray(arr).reshape(arr.shape)
    # Read-only arrays (np.asarray of a PIL image) make torch warn in the user's process.
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def savable(value: Any) -> bool:
    """Whether safetensors can store this dtype."""
    import numpy as np

    if _is_tensor(value):
        return not value.is_complex()
    return np.asarray(value).dtype.kind in "biuf"


def save_arrays(items: list[NamedArray], path: Path) -> None:
    """Write the arrays to a safetensors file (an empty file still gets written, for uniformity)."""
    from safetensors.torch import save_file

    tensors = {item.name: as_cpu_tensor(item.value) for item in items if savable(item.value)}
    save_file(tensors, str(path), metadata={"format": "repro-track"})


def load_arrays(path: Path) -> dict[str, Any]:
    """The arrays of a safetensors file as CPU tensors (safetensors parses no code, unlike pickle)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


# ---------------------------------------------------------------- images for the UI

def _as_image_batch(value: Any) -> Any | None:
    """(N, H, W, C) uint8 if the array looks like images, else None."""
    import numpy as np

    if _is_tensor(value):
        tensor = value.detach().cpu()
        arr = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
        if arr.ndim in (3, 4) and arr.shape[-3] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = np.moveaxis(arr, -3, -1)  # torch's (N, C, H, W)
    else:
        arr = np.asarray(value)
    if arr.ndim not in (3, 4) or arr.shape[-1] not in (1, 3, 4) or arr.size == 0:
        return None
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or arr.min() < -1e-3 or arr.max() > 1 + 1e-3:
            return None
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    elif arr.dtype != np.uint8:
        return None
    return arr


def image_files(items: list[NamedArray], folder: Path, limit: int = 16) -> list[Path]:
    """Write image-like outputs as PNG files (at most ``limit``) so the MLflow UI shows them."""
    from PIL import Image

    written: list[Path] = []
    for item in items:
        batch = _as_image_batch(item.value)
        if batch is None:
            continue
        for index, frame in enumerate(batch):
            if len(written) >= limit:
                return written
            path = folder / f"{item.name.replace('/', '_')}_{index}.png"
            image = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
            if max(image.size) < _MIN_PREVIEW:  # tiny outputs: enlarge the preview, pixels kept sharp
                scale = -(-_MIN_PREVIEW // max(image.size))
                image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
            image.save(path)
            written.append(path)
    return written
