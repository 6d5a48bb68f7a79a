"""PIL image arguments (img2img's ``image``, inpainting's ``mask_image``, ControlNet's control image).

An image is snapshotted at entry as its raw bytes (``Image.tobytes``) with mode, size and palette, so
the replay rebuilds the same object, mode and size included, however the call changes it afterwards.
"""

from __future__ import annotations

from typing import Any


def is_pil_image(value: Any) -> bool:
    """Whether ``value`` is a PIL image (checked by class, without importing PIL)."""
    return any(f"{c.__module__}.{c.__qualname__}" == "PIL.Image.Image" for c in type(value).__mro__)


def snapshot(image: Any) -> tuple[Any, dict[str, Any]]:
    """The image's raw bytes as a uint8 array, and what rebuilds it (mode, size, palette)."""
    import numpy as np

    raw = np.frombuffer(image.tobytes(), dtype=np.uint8).copy()
    meta: dict[str, Any] = {"mode": image.mode, "size": [int(image.size[0]), int(image.size[1])]}
    palette = image.getpalette() if image.mode in ("P", "PA") else None
    if palette is not None:
        meta["palette"] = [int(v) for v in palette]
    return raw, meta


def rebuild(raw: Any, meta: dict[str, Any]) -> Any:
    """A PIL image with the recorded mode, size, palette and pixels."""
    import numpy as np
    from PIL import Image

    data = np.asarray(raw, dtype=np.uint8).tobytes()
    image = Image.frombytes(meta["mode"], tuple(meta["size"]), data)
    if meta.get("palette") is not None:
        image.putpalette(meta["palette"])
    return image
