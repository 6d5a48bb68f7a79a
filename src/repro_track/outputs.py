"""Outputs: normalise a return value to named arrays, digest their exact bytes, save them.

The bits live in a safetensors file (never pickle); PNG copies exist only so the MLflow UI can show
images. Digests are sha256 over the array's C-contiguous bytes in native (little-endian) order, streamed
in chunks so a large output is not copied whole.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CHUNK = 16 * 1024 * 1024
_STAT_CHUNK = 1024 * 1024  # elements per chunk: small temporaries that stay in cache
_PARALLEL_BYTES = 4 * 1024 * 1024  # above this, hash in a thread while the statistics and the write run
_MIN_PREVIEW = 128  # pixels; PNGs are previews for the UI, the exact bits are in safetensors
_MAX_FILE_BYTES = 512 * 1024 * 1024  # a returned file larger than this is not kept (nor compared)


@dataclass(frozen=True)
class NamedArray:
    """One output array, by the name it gets in the manifest and the safetensors file."""

    name: str
    value: Any  # numpy.ndarray or torch.Tensor
    source: str  # "tensor", "ndarray", "pil", "number", "file"
    file: dict[str, str] | None = None  # a returned file path: {"path": as returned, "format": ...}


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
    if isinstance(result, (str, os.PathLike)):
        return _file_output(name, result)
    if result is None or isinstance(result, bytes):
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


def file_format(path: str, head: bytes) -> str:
    """How a returned file's bytes can be decoded for a tolerance comparison (never by unpickling)."""
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if path.endswith(".safetensors"):
        return "safetensors"
    return "bytes"


def _file_output(name: str, value: str | os.PathLike) -> list[NamedArray]:
    """A returned path to an existing file, recorded by its content (the bytes as a uint8 array).

    A relative path is read against the working directory, where the call wrote it; a string that
    names no file (or a file too large to keep) is not an output, and the replay says it was not compared.
    """
    import numpy as np

    text = os.fspath(value)
    if not isinstance(text, str) or not text or len(text) > 4096:  # the schema's limit on a path
        return []
    try:
        path = Path(text)
        if not path.is_file() or path.stat().st_size > _MAX_FILE_BYTES:
            return []
        data = path.read_bytes()
    except (OSError, ValueError):  # unreadable, or not a possible path (a NUL byte)
        return []
    info = {"path": text, "format": file_format(text, data[:8])}
    return [NamedArray(name, np.frombuffer(data, dtype=np.uint8), "file", info)]


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


_NO_STATS: dict[str, float | None] = {"min": None, "max": None, "abs_sum": None}


def _on_cpu(value: Any) -> Any:
    """The array as a CPU tensor or an ndarray, in its own layout (copied only off a device)."""
    import numpy as np

    if _is_tensor(value):
        tensor = value.detach()
        return tensor.cpu() if tensor.device.type != "cpu" else tensor
    return np.asarray(value)


def _is_contiguous(array: Any) -> bool:
    return array.is_contiguous() if _is_tensor(array) else array.flags.c_contiguous


def _window(array: Any, start: int, stop: int) -> Any:
    """Elements [start, stop) of the array in C order, as a 1-d contiguous array.

    A view for a contiguous array. A strided one (a transpose, a permuted image batch) is copied a
    window at a time: the leading rows that cover the window (at most two rows more than it holds),
    or, where one row is longer than the window, the same step inside the one or two rows it spans.
    So a large strided output is never copied whole.
    """
    import numpy as np

    if _is_contiguous(array):
        return array.reshape(-1)[start:stop]
    rows = array.shape[0]
    row = (array.numel() if _is_tensor(array) else array.size) // rows
    first, last = start // row, -(-stop // row)
    if row <= stop - start:
        block = array[first:last]
        block = block.contiguous() if _is_tensor(block) else np.ascontiguousarray(block)
        return block.reshape(-1)[start - first * row:stop - first * row]
    parts = [_window(array[r], max(start - r * row, 0), min(stop - r * row, row)) for r in range(first, last)]
    if len(parts) == 1:
        return parts[0]
    if _is_tensor(array):
        import torch

        return torch.cat(parts)
    return np.concatenate(parts)


def _tensor_part(chunk: Any) -> tuple[float, float, float]:
    import torch

    low, high = torch.aminmax(chunk)  # exact in the tensor's own dtype
    if chunk.is_floating_point():
        total = torch.linalg.vector_norm(chunk, 1, dtype=torch.float64)
    else:
        total = chunk.abs().sum(dtype=torch.float64)
    return float(low), float(high), float(total)


def _array_part(chunk: Any) -> tuple[float, float, float]:
    import numpy as np

    return float(chunk.min()), float(chunk.max()), float(np.add.reduce(np.abs(chunk), dtype=np.float64))


def _stat_part(array: Any) -> Any:
    """The per-chunk statistics function for this array, or None where min/max/|x| mean nothing."""
    if _is_tensor(array):
        import torch

        if array.numel() == 0 or array.dtype == torch.bool or array.is_complex():
            return None
        return _tensor_part
    return _array_part if array.size and array.dtype.kind in "iuf" else None


class _Digest:
    """sha256 fed chunk by chunk; for a large array in a worker thread, so that it overlaps the
    statistics and the write (hashlib releases the GIL on large buffers), at most two chunks behind
    so each chunk is still in cache when it is hashed."""

    def __init__(self, nbytes: int):
        from concurrent.futures import ThreadPoolExecutor

        self._sha = hashlib.sha256()
        self._pool = ThreadPoolExecutor(max_workers=1) if nbytes > _PARALLEL_BYTES else None
        self._pending: list[Any] = []

    def update(self, chunk: memoryview) -> None:
        if self._pool is None:
            self._sha.update(chunk)
            return
        self._pending.append(self._pool.submit(self._sha.update, chunk))  # one worker: in order
        if len(self._pending) > 2:
            self._pending.pop(0).result()

    def hexdigest(self) -> str:
        """The digest once every chunk is in (the worker is shut down either way)."""
        if self._pool is not None:
            try:
                for future in self._pending:
                    future.result()
            finally:
                self._pool.shutdown(wait=True, cancel_futures=True)
        return self._sha.hexdigest()


def _scan(value: Any, sink: Any = None, *, with_stats: bool = True,
          known_sha: str | None = None) -> tuple[str, dict[str, float | None]]:
    """One pass over an array's bytes in C order, a chunk at a time: its sha256, its min, max and sum
    of |x| (floats summed in float64) and, given an open file, the write. Each chunk is read from
    memory once for all three; nothing is copied whole (see :func:`_window`). ``known_sha``: the
    digest the caller already has (:func:`describe` just computed it), so it is not computed again."""
    array = _on_cpu(value)
    count = array.numel() if _is_tensor(array) else array.size
    part = _stat_part(array) if with_stats else None
    digest, parts = None if known_sha else _Digest(_layout(array)[1]), []
    try:
        for start in range(0, count, _STAT_CHUNK):
            window = _window(array, start, min(start + _STAT_CHUNK, count))
            chunk = memoryview(to_numpy_view(window).reshape(-1).view("uint8"))
            if digest is not None:
                digest.update(chunk)
            if part is not None:
                parts.append(part(window))
            if sink is not None:
                sink.write(chunk)
    finally:
        sha = known_sha or digest.hexdigest()
    if not parts:
        return sha, dict(_NO_STATS)
    return sha, {"min": _finite(min(p[0] for p in parts)), "max": _finite(max(p[1] for p in parts)),
                 "abs_sum": _finite(math.fsum(p[2] for p in parts))}


def dtype_name(value: Any) -> str:
    """'float32', 'uint8', 'bfloat16'... the same spelling for torch and numpy."""
    return str(value.dtype).removeprefix("torch.")


def describe(item: NamedArray, saved: bool = True,
             fingerprint: tuple[str, dict[str, float | None]] | None = None) -> dict[str, Any]:
    """The manifest record of one output: identity, digest and the doc-style fingerprints.

    ``fingerprint`` is what :func:`save_arrays_described` already computed while writing the array
    (its sha256 and statistics); without it the array's bytes are read once here, in one pass.
    """
    value = item.value
    if _is_tensor(value) and value.device.type != "cpu":
        value = value.detach().cpu()  # one copy off the device, shared by the digest and the stats
    _, nbytes = _layout(value)
    sha, stats = fingerprint or _scan(value, with_stats=not getattr(item, "file", None))
    return {
        "name": item.name,
        "source": item.source,
        "dtype": dtype_name(value),
        "shape": [int(n) for n in value.shape],
        "device": str(item.value.device) if _is_tensor(item.value) else "cpu",
        "nbytes": nbytes,
        "sha256": sha,
        "saved": saved,
        # A file's bytes have no meaningful min/max: it is compared by content, decoded by its format.
        **({"min": None, "max": None, "abs_sum": None, "file": dict(item.file)} if item.file else stats),
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


# safetensors' dtype codes, widest first: the order in which safetensors lays arrays out in a file.
_SAFETENSORS_DTYPES = {
    "uint64": "U64", "int64": "I64", "float64": "F64", "float32": "F32", "uint32": "U32", "int32": "I32",
    "bfloat16": "BF16", "float16": "F16", "uint16": "U16", "int16": "I16", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
_LAYOUT_RANK = {name: rank for rank, name in enumerate(_SAFETENSORS_DTYPES)}


def _layout(value: Any) -> tuple[str, int]:
    """(dtype name, byte count) of an array, read from its metadata without touching its bytes."""
    import numpy as np

    if _is_tensor(value):
        return dtype_name(value), value.numel() * value.element_size()
    arr = np.asarray(value)
    return dtype_name(arr), int(arr.nbytes)


def savable(value: Any) -> bool:
    """Whether safetensors can store this dtype."""
    return _layout(value)[0] in _SAFETENSORS_DTYPES


def _write(items: list[NamedArray], path: Path, *, with_stats: bool,
           digests: dict[str, str] | None = None) -> dict[str, Any]:
    """Write the savable arrays as a safetensors file, each in one pass; their fingerprints by name.

    The file is byte for byte what ``safetensors.torch.save_file`` writes (an 8-byte header length,
    a compact JSON header padded to 8 bytes, then the arrays widest dtype first, by name), written
    here so that each chunk is hashed (and summarised) while it is written.
    """
    import json
    import struct

    chosen = {item.name: item for item in items if savable(item.value)}  # a repeated name: the last wins
    order = sorted(chosen.values(), key=lambda item: (_LAYOUT_RANK[_layout(item.value)[0]], item.name))
    header: dict[str, Any] = {"__metadata__": {"format": "repro-track"}}
    offset = 0
    for item in order:
        dtype, nbytes = _layout(item.value)
        header[item.name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": [int(n) for n in item.value.shape],
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as sink:
        sink.write(struct.pack("<Q", len(text)) + text)
        return {item.name: _scan(item.value, sink, with_stats=with_stats and not getattr(item, "file", None),
                                 known_sha=(digests or {}).get(item.name))
                for item in order}


def save_arrays(items: list[NamedArray], path: Path, *, digests: dict[str, str] | None = None) -> dict[str, str]:
    """Write the arrays to a safetensors file; the sha256 of each array written, by name.

    One read of each array's bytes: every chunk is hashed in a worker thread while it is written,
    so the digest costs no second pass, and nothing is copied whole (an empty file still gets
    written, for uniformity). ``digests`` are those the caller already has by name (from
    :func:`describe`, moments before): those arrays are written without hashing them again.
    """
    return {name: sha for name, (sha, _) in _write(items, path, with_stats=False, digests=digests).items()}


def save_arrays_described(items: list[NamedArray], path: Path) -> list[dict[str, Any]]:
    """:func:`save_arrays` and :func:`describe` in one pass: each array's chunks are hashed, summarised
    and written while in cache. The records of arrays that cannot be saved say ``saved: false``."""
    written = _write(items, path, with_stats=True)
    last = {item.name: item for item in items}
    return [describe(item, saved=item.name in written and last[item.name] is item,
                     fingerprint=written.get(item.name) if last[item.name] is item else None)
            for item in items]


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


def image_frames(items: list[Any], limit: int = 16) -> list[tuple[str, int, int, Any]]:
    """Image-like outputs (``outputs.NamedArray``) as ``(name, index in batch, batch size, HxWxC
    uint8 array)``, at most ``limit``; outputs that do not look like images are left out."""
    frames: list[tuple[str, int, int, Any]] = []
    for item in items:
        batch = _as_image_batch(item.value)
        if batch is None:
            continue
        for index, frame in enumerate(batch):
            if len(frames) >= limit:
                return frames
            frames.append((item.name, index, len(batch), frame))
    return frames


def image_files(items: list[NamedArray], folder: Path, limit: int = 16) -> list[Path]:
    """Write image-like outputs as PNG files (at most ``limit``) so the MLflow UI shows them."""
    from PIL import Image

    written: list[Path] = []
    for name, index, _, frame in image_frames(items, limit):
        path = folder / f"{name.replace('/', '_')}_{index}.png"
        image = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
        if max(image.size) < _MIN_PREVIEW:  # tiny outputs: enlarge the preview, pixels kept sharp
            scale = -(-_MIN_PREVIEW // max(image.size))
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        image.save(path)
        written.append(path)
    return written
