"""Output images in MLflow's own image layout, staged so that any later upload reproduces ``log_image``.

``MlflowClient.log_image(run_id, image, key=..., step=...)`` writes, under the run's ``images/``
folder, ``{key}+step+{step}+timestamp+{ms}+{uuid}.png`` with a ``+compressed.webp`` thumbnail beside it,
and sets the run tag ``mlflow.loggedImages``; the UI's image grid, run page and compare view read
exactly that. A recording is staged first and uploaded later (perhaps by ``repro-track sync`` in
another process, perhaps twice after an interruption), so the same files are written here, at
staging, with MLflow's own image helpers, and travel with the other artifacts: the upload is then
idempotent, the files are covered by the recording's signature, and there is one copy of each image.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

from .tags import IMAGES_DIR

_KEY_BAD = re.compile(r"[^a-zA-Z0-9_\-./ ]")  # log_image accepts only these characters in a key
_MIN_PREVIEW = 128  # pixels; images are previews for the UI, the exact bits are in safetensors
COMPRESSED_SUFFIX = "+compressed"


def image_key(output: str, index: int, count: int) -> str:
    """The ``log_image`` key of one image: the output's name, with its batch index when a batch."""
    key = _KEY_BAD.sub("_", output) or "output"
    return key if count == 1 else f"{key}/{index}"


def file_stem(key: str, step: int, timestamp_ms: int, unique: str) -> str:
    """The file name ``log_image`` gives an image (without extension); ``/`` in a key becomes ``~``."""
    return f"{key.replace('/', '~')}+step+{step}+timestamp+{timestamp_ms}+{unique}"


def stage_images(frames: list[tuple[str, int, int, Any]], artifacts: Path, *, step: int,
                 timestamp_ms: int) -> list[str]:
    """Write ``(output, index, count, HxWxC uint8 array)`` frames as ``log_image`` would.

    Returns the full-size PNGs' artifact paths (the thumbnails are not listed).
    """
    if not frames:
        return []
    from mlflow.tracking.multimedia import compress_image_size, convert_to_pil_image

    folder = artifacts / IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for output, index, count, frame in frames:
        image = _preview(convert_to_pil_image(frame[..., 0] if frame.shape[-1] == 1 else frame))
        stem = file_stem(image_key(output, index, count), step, timestamp_ms, str(uuid.uuid4()))
        image.save(folder / f"{stem}.png")
        # WebP's fastest method: the thumbnail is for the UI's grid, and the default effort took
        # milliseconds per image on the recording call's path.
        compress_image_size(image).save(folder / f"{stem}{COMPRESSED_SUFFIX}.webp", method=0)
        written.append(f"{IMAGES_DIR}/{stem}.png")
    return written


def _preview(image: Any) -> Any:
    # Tiny outputs (test pipelines, latents) are enlarged with sharp pixels so the grid shows them.
    from PIL import Image

    if max(image.size) >= _MIN_PREVIEW:
        return image
    scale = -(-_MIN_PREVIEW // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def full_images(paths: list[str]) -> list[str]:
    """The full-size PNGs among artifact paths under ``images/`` (not the UI's thumbnails)."""
    return sorted(p for p in paths if p.endswith(".png") and COMPRESSED_SUFFIX not in p)


def final_step(arguments: dict[str, Any]) -> int:
    """The step a call's returned images are logged at: its ``num_inference_steps``, else 0.

    Per-step previews then line up before it on the same key.
    """
    arg = arguments.get("num_inference_steps")
    if isinstance(arg, dict) and arg.get("kind") == "json" and isinstance(arg.get("value"), int):
        return max(0, arg["value"])
    return 0
