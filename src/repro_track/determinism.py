"""``deterministic()``: the full set of determinism switches for a block, restored afterwards."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

# cuBLAS reads this once, when CUDA starts: setting it later has no effect (so only then).
CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic(warn_only: bool = False) -> Iterator[None]:
    """Turn on deterministic algorithms, deterministic cuDNN without benchmarking, and TF32 off.

    Sets ``CUBLAS_WORKSPACE_CONFIG`` only where CUDA has not started yet (later it would be
    ignored). Everything is put back as it was on exit, even after an exception.
    """
    import torch

    from .capture.torch_state import apply_knobs, determinism_knobs

    before = determinism_knobs()
    env_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if env_before is None and not torch.cuda.is_initialized():
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    try:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        apply_knobs(before)
        if env_before is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
