"""Environment variables that can change numerics or random streams, minus secrets.

Only allow-listed names are looked at, so unrelated variables (and whatever secrets they
hold) never enter the manifest. Within the allow-list, a name that looks like a
credential is dropped (its name is listed, its value never leaves the process) and a
value that looks like a credential is replaced by :data:`REDACTED`. Both checks err on
the side of hiding: a wrongly hidden variable costs a little provenance, a leaked token
costs an incident.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from .. import scrub

REDACTED = scrub.REDACTED

ALLOWED_NAMES: frozenset[str] = frozenset(
    {
        "CUBLAS_WORKSPACE_CONFIG", "NVIDIA_TF32_OVERRIDE", "PYTHONHASHSEED",
        "ATEN_CPU_CAPABILITY", "CUDA_VISIBLE_DEVICES", "CUDA_LAUNCH_BLOCKING",
        "KMP_AFFINITY", "KMP_BLOCKTIME", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS",
        "MKL_NUM_THREADS", "OMP_NUM_THREADS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
        "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "TF_ENABLE_ONEDNN_OPTS",
    }
)
ALLOWED_PREFIXES: tuple[str, ...] = (
    "CUDA_", "CUDNN_", "CUBLAS_", "CUBLASLT_", "NVIDIA_", "OMP_", "KMP_", "GOMP_",
    "MKL_", "ONEDNN_", "DNNL_", "OPENBLAS_", "TORCH_", "PYTORCH_", "TORCHINDUCTOR_",
    "DIFFUSERS_", "TRANSFORMERS_", "HF_", "ACCELERATE_", "XFORMERS_",
)
# Where caches and downloads live: under allowed prefixes, but they change no bits (the weights
# digest covers what was loaded), and their values are machine paths. diffusers even sets
# TORCHINDUCTOR_CACHE_DIR on import, which would otherwise differ between any two machines.
LOCATION_ONLY: frozenset[str] = frozenset(
    {
        "TORCHINDUCTOR_CACHE_DIR", "TORCH_HOME", "TORCH_EXTENSIONS_DIR", "HF_HOME", "HF_HUB_CACHE",
        "HF_ASSETS_CACHE", "HF_DATASETS_CACHE", "HF_XET_CACHE", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH",
        "TRANSFORMERS_CACHE", "DIFFUSERS_CACHE", "CUDA_CACHE_PATH", "CUDA_CACHE_MAXSIZE",
        "HF_HUB_DISABLE_PROGRESS_BARS", "DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY",
    }
)

# What a replay restores from a manifest: only variables that decide the bits (hash seed, cuBLAS
# workspace, TF32, thread counts, ISA levels of ATen, oneDNN and MKL). Every other recorded variable
# describes the recording machine (which GPUs it saw, where its hub and caches were) and is never
# imposed on the replay machine. Names are listed or come from a numeric library's family...
BIT_DECIDING_NAMES: frozenset[str] = frozenset(
    {
        "PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG", "NVIDIA_TF32_OVERRIDE", "ATEN_CPU_CAPABILITY",
        "TF_ENABLE_ONEDNN_OPTS", "CUDA_LAUNCH_BLOCKING", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
        "TORCH_CUDNN_V8_API_DISABLED", "TORCH_BLAS_PREFER_CUBLASLT", "TORCH_LINALG_PREFER_CUSOLVER",
    }
)
BIT_DECIDING_PREFIXES: tuple[str, ...] = (
    "OMP_", "KMP_", "GOMP_", "MKL_", "ONEDNN_", "DNNL_", "OPENBLAS_", "CUBLAS_", "CUBLASLT_", "CUDNN_",
)
# ...but within a family, a name that points at a file, folder, library, host or log (OMP_TOOL_LIBRARIES
# loads a shared library; CUBLASLT_LOG_FILE writes one) is never taken from a manifest.
_LOCATION_WORDS = re.compile(
    r"(?:PATH|DIR|HOME|FILE|LIB|TOOL|PLUGIN|INJECT|CACHE|LOG|DUMP|DEST|HOST|PORT|URL|ENDPOINT|PROXY|"
    r"SOCKET|PREFIX|ROOT|MODULE|LOADER)"
)


def capture_env_vars(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Return allow-listed variables from ``environ`` (default ``os.environ``).

    ``{"captured": {name: value}, "redacted": [names], "dropped": [names]}``: dropped
    names looked like credentials and their values are absent; redacted names are in
    ``captured`` with the value :data:`REDACTED`. Variables outside the allow-list are
    ignored entirely.
    """
    source = os.environ if environ is None else environ
    captured: dict[str, str] = {}
    redacted: list[str] = []
    dropped: list[str] = []
    for name in sorted(source):
        if not is_allowed(name):
            continue
        if looks_like_secret_name(name):
            dropped.append(name)
            continue
        value = str(source[name])
        if looks_like_secret_value(value):
            captured[name] = REDACTED
            redacted.append(name)
        else:
            captured[name] = value
    return {"captured": captured, "redacted": redacted, "dropped": dropped}


def is_allowed(name: str) -> bool:
    """Whether ``name`` is on the allow-list of variables that affect numerics or RNG."""
    if name in LOCATION_ONLY:
        return False
    return name in ALLOWED_NAMES or name.startswith(ALLOWED_PREFIXES)


def is_recordable(name: str) -> bool:
    """Whether some version of repro-track could have put ``name`` in a manifest.

    The allow-list, plus the location variables that older recorders kept; anything else in a
    manifest (LD_PRELOAD, PYTHONPATH, PATH, proxies) was written by hand.
    """
    return is_allowed(name) or name in LOCATION_ONLY


def is_bit_deciding(name: str) -> bool:
    """Whether a replay takes ``name``'s recorded value (and unsets it when the recording lacks it).

    Only variables that change the computation's bits; loader, path, cache, hub and device-selection
    variables are machine-local and never imposed.
    """
    if name in BIT_DECIDING_NAMES:
        return True
    return name.startswith(BIT_DECIDING_PREFIXES) and not _LOCATION_WORDS.search(name)


def looks_like_secret_name(name: str) -> bool:
    """Whether a variable name suggests its value is a credential (HF_TOKEN, API_KEY...)."""
    return scrub.is_secret_name(name)


def looks_like_secret_value(value: str) -> bool:
    """Whether a value contains something shaped like a credential or generated token."""
    return scrub.holds_secret(value)


def looks_like_secret_argument(name: str) -> bool:
    """Whether a function argument name suggests a credential (token, api_key, pwd, dsn...)."""
    return scrub.is_secret_argument(name)
