"""Environment variables that can change numerics or random streams, minus secrets.

Only allow-listed names are looked at, so unrelated variables (and whatever secrets they
hold) never enter the manifest. Within the allow-list, a name that looks like a
credential is dropped (its name is listed, its value never leaves the process) and a
value that looks like a credential is replaced by :data:`REDACTED`. Both checks err on
the side of hiding: a wrongly hidden variable costs a little provenance, a leaked token
costs an incident.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"

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

# Substrings that mark a variable name as a credential wherever they appear.
_SECRET_NAME_PARTS: tuple[str, ...] = (
    "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "COOKIE",
    "SESSION", "PRIVATE", "SIGNATURE",
)
# KEY only counts as a whole word or a known compound, so MONKEY, HOTKEY, TURNKEY and
# KEYBOARD are not secrets while API_KEY, APIKEY, HF_KEY and KEY_ID are.
_KEY_WORD = re.compile(
    r"^(?:KEYS?|KEYID|(?:API|ACCESS|SECRET|PRIVATE|SIGNING|MASTER|ENCRYPTION|SERVICE|SSH|LICENSE)KEYS?)$"
)
_NAME_WORDS = re.compile(r"[^A-Z0-9]+")

# Argument names are lower-case Python identifiers; compared as whole words so that
# tokenizer, max_tokens or author are not mistaken for secrets.
_SECRET_ARGUMENT_WORDS = frozenset(
    {
        "password", "passwd", "passphrase", "secret", "secrets", "credential", "credentials",
        "auth", "authorization", "apikey", "apikeys", "cookie", "cookies", "bearer",
    }
)
_SECRET_ARGUMENT_PAIRS = frozenset(
    {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("signing", "key"),
     ("ssh", "key"), ("session", "id"), ("session", "token")}
)
# A trailing "token" is a credential (hf_token, access_token, token) unless it names a
# vocabulary item (pad_token, eos_token) or a count (max_token).
_NON_SECRET_TOKEN_QUALIFIERS = frozenset(
    {"pad", "bos", "eos", "unk", "sep", "cls", "mask", "special", "start", "end", "image",
     "audio", "video", "additional", "max", "min", "num", "n", "vocab", "decoder", "prefix"}
)
# "tokens" is usually a count or a token list (num_tokens); these make it a credential.
_SECRET_TOKEN_QUALIFIERS = frozenset({"access", "auth", "api", "refresh", "id", "bearer", "hf"})
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")

_SECRET_VALUE_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(pattern)
    for pattern in (
        r"[A-Za-z][A-Za-z0-9+.\-]*://[^/\s@:]*:[^/\s@]+@",  # scheme://user:password@
        r"(?i:https?|ftps?|wss?)://[^/\s@]+@",  # https://token@host (token as user name)
        r"\bhf_[A-Za-z0-9]{20,}",
        r"\bsk-[A-Za-z0-9_\-]{16,}",
        r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{10,}",
        r"\bgh[pousr]_[A-Za-z0-9]{20,}",
        r"\bgithub_pat_[A-Za-z0-9_]{20,}",
        r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
        r"\bxox[baprs]-[A-Za-z0-9\-]{10,}",
        r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-+/=]*",
        r"-----BEGIN[A-Z ]*-----",
    )
)
# Runs of base64/hex-ish characters long enough to be a generated token.
_TOKEN_RUN = re.compile(r"[A-Za-z0-9+/=_\-]{32,}")
# Device UUIDs (CUDA_VISIBLE_DEVICES=GPU-..., MIG-..., or the pre-R470 MIG form
# MIG-GPU-<uuid>/<gi>/<ci>) are identifiers, not secrets.
_DEVICE_UUID = re.compile(
    r"^(?:(?:MIG-)?GPU-|MIG-)?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"(?:/[0-9]+){0,2}$"
)
_MIN_TOKEN_ENTROPY_BITS = 3.0
# Pieces of identifiers and paths ("stable-diffusion-v1-5", "roundup_power2", "PTX"):
# one-case or Capitalised letters with an optional numeric suffix, or digits alone.
# Random tokens mix cases and interleave digits, so their pieces rarely look like this.
_WORD_PIECE = re.compile(r"^(?:(?:[a-z]{1,16}|[A-Z]{1,16}|[A-Z][a-z]{1,15})[0-9]{0,4}|[0-9]{1,8})$")
_PIECE_SEPARATORS = re.compile(r"[/_\-+=]+")


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


def looks_like_secret_name(name: str) -> bool:
    """Whether a variable name suggests its value is a credential (HF_TOKEN, API_KEY...)."""
    upper = name.upper()
    if any(part in upper for part in _SECRET_NAME_PARTS):
        return True
    return any(_KEY_WORD.match(word) or word.endswith("APIKEY") for word in _NAME_WORDS.split(upper))


def looks_like_secret_value(value: str) -> bool:
    """Whether a value contains something shaped like a credential or generated token."""
    if any(pattern.search(value) for pattern in _SECRET_VALUE_PATTERNS):
        return True
    return any(_is_random_token(run) for run in _TOKEN_RUN.findall(value))


def looks_like_secret_argument(name: str) -> bool:
    """Whether a function argument name suggests a credential (token, api_key, password...)."""
    words = [w for w in re.split(r"[^a-z0-9]+", _CAMEL_BOUNDARY.sub("_", name).lower()) if w]
    if not words:
        return False
    if any(word in _SECRET_ARGUMENT_WORDS for word in words):
        return True
    if any(pair in _SECRET_ARGUMENT_PAIRS for pair in zip(words, words[1:])):
        return True
    last = words[-1]
    if last == "token":
        return len(words) == 1 or words[-2] not in _NON_SECRET_TOKEN_QUALIFIERS
    if last == "tokens" and len(words) > 1 and words[-2] in _SECRET_TOKEN_QUALIFIERS:
        return True
    joined = "".join(words)
    return joined.endswith(("apikey", "accesskey", "privatekey", "secretkey", "authtoken", "accesstoken"))


def _is_random_token(run: str) -> bool:
    """A long run mixing letters and digits with high per-character entropy."""
    if _DEVICE_UUID.match(run):
        return False
    pieces = [piece for piece in _PIECE_SEPARATORS.split(run) if piece]
    if len(pieces) >= 2 and all(_WORD_PIECE.match(piece) for piece in pieces):
        return False
    if not (any(ch.isalpha() for ch in run) and any(ch.isdigit() for ch in run)):
        return False
    return _entropy_bits(run) >= _MIN_TOKEN_ENTROPY_BITS


def _entropy_bits(text: str) -> float:
    counts = Counter(text)
    total = len(text)
    return -sum((n / total) * math.log2(n / total) for n in counts.values())
