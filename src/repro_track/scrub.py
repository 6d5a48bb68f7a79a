"""Secrets in strings that leave the process: does this string hold one, and blank the secret parts.

Everything repro-track writes that a user's code or machine chose (environment values, git remote URLs
and diff lines, argument and config values, error messages and tracebacks) goes through this module.
Two layers of rules, both erring on the side of hiding:

* repro-track's own: URLs with user info, known token shapes (``hf_``, ``ghp_``, ``AKIA``, ``sk-``,
  Slack, JWTs, PEM blocks) and long runs that look generated;
* the maintained ``detect-secrets`` plugins (keyword, high-entropy and known-token), imported on first
  need and run only on strings that could hold what they look for: a credential keyword, a long
  token-like run, a URL or a PEM marker. Results are cached per string, so the same prompt or
  pipeline config recorded on every call costs one dictionary lookup.

Identifiers are never secrets: hex digests of 32, 40 or 64 characters (MLflow run ids, commit hashes,
sha256) and UUIDs found by the shape-only rules are left alone; next to a credential keyword
(``api_key = "<32 hex>"``) they are still blanked.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import re
from collections import Counter
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

REDACTED = "<redacted>"

# ---------------------------------------------------------------- names

# Substrings that mark an environment variable name as a credential wherever they appear.
_SECRET_NAME_PARTS: tuple[str, ...] = (
    "TOKEN", "SECRET", "PASSWORD", "PASSWD", "PWD", "CREDENTIAL", "AUTH", "COOKIE",
    "SESSION", "PRIVATE", "SIGNATURE", "DSN", "CONN_STR", "CONNECTION_STRING",
)
# KEY only counts as a whole word or a known compound, so MONKEY, HOTKEY, TURNKEY and
# KEYBOARD are not secrets while API_KEY, APIKEY, HF_KEY and KEY_ID are.
_KEY_WORD = re.compile(
    r"^(?:KEYS?|KEYID|(?:API|ACCESS|SECRET|PRIVATE|SIGNING|MASTER|ENCRYPTION|SERVICE|SSH|LICENSE)KEYS?)$"
)
_NAME_WORDS = re.compile(r"[^A-Z0-9]+")

# Argument and config key names are lower-case identifiers; compared as whole words so that
# tokenizer, max_tokens or author are not mistaken for secrets.
_SECRET_ARGUMENT_WORDS = frozenset(
    {
        "password", "passwords", "passwd", "pwd", "passphrase", "passcode", "secret", "secrets",
        "credential", "credentials", "creds", "auth", "authorization", "apikey", "apikeys", "cookie",
        "cookies", "bearer", "session", "dsn", "jwt", "connstr", "privatekey",
    }
)
_SECRET_ARGUMENT_PAIRS = frozenset(
    {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("signing", "key"),
     ("ssh", "key"), ("session", "id"), ("session", "token"), ("conn", "str"), ("conn", "string"),
     ("connection", "str"), ("connection", "string"), ("database", "url"), ("db", "url")}
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


def is_secret_name(name: str) -> bool:
    """Whether an environment variable name suggests its value is a credential (HF_TOKEN, API_KEY...)."""
    upper = name.upper()
    if any(part in upper for part in _SECRET_NAME_PARTS):
        return True
    return any(_KEY_WORD.match(word) or word.endswith("APIKEY") for word in _NAME_WORDS.split(upper))


def is_secret_argument(name: str) -> bool:
    """Whether an argument or config key name suggests a credential (token, api_key, pwd, dsn...)."""
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
    return joined.endswith(("apikey", "accesskey", "privatekey", "secretkey", "authtoken", "accesstoken",
                            "connectionstring"))


# ---------------------------------------------------------------- values: repro-track's own rules

# A password in a URL (scheme://user:password@) is blanked by position, whatever its length.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s@:]*:)(?P<s>[^/\s@]+)@")
# Group "s", where present, is the secret part; otherwise the whole match is.
_OWN_PATTERN_TEXTS: tuple[str, ...] = (
    r"(?i:https?|ftps?|wss?)://(?P<s>[^/\s@:]+)@",  # https://token@host (token as user name)
    r"\bhf_[A-Za-z0-9]{20,}",
    r"\bsk-[A-Za-z0-9_\-]{16,}",
    r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{10,}",
    r"\bgh[pousr]_[A-Za-z0-9]{20,}",
    r"\bgithub_pat_[A-Za-z0-9_]{20,}",
    r"\bglpat-[A-Za-z0-9_\-]{20,}",
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"\bxox[baprs]-[A-Za-z0-9\-]{10,}",
    r"\beyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-+/=]*",
    r"-----BEGIN[A-Z ]*-----[A-Za-z0-9+/=\s]*(?:-----END[A-Z ]*-----)?",
)
_OWN_PATTERNS = tuple(re.compile(pattern) for pattern in _OWN_PATTERN_TEXTS)
# Each of them needs one of these substrings; most strings hold none, and `in` is far cheaper than a regex.
_OWN_MARKERS = ("://", "hf_", "sk-", "k_live_", "k_test_", "gh", "github_pat_", "glpat-", "AKIA", "ASIA",
                "xox", "eyJ", "-----BEGIN")
# A quoted value assigned to a credential-named variable or key (hf_token = "...", "dsn": "...");
# the names are the argument rules' (is_secret_argument), which cover words detect-secrets does not.
# Searched only in strings holding one of the name words (lower-cased).
_NAME_MARKERS = ("pass", "pwd", "secret", "cred", "auth", "key", "cookie", "bearer", "session", "dsn", "jwt",
                 "conn", "token", "url")
_NAMED_ASSIGNMENT = re.compile(
    r"""["']?(?P<name>[A-Za-z_][A-Za-z0-9_\-]*)["']?\s*(?::=|=|:)\s*(?P<q>["'])(?P<s>[^"'\n]+)(?P=q)"""
)
# Runs of base64/hex-ish characters long enough to be a generated token.
_TOKEN_RUN = re.compile(r"[A-Za-z0-9+/=_\-]{32,}")
# Device UUIDs (CUDA_VISIBLE_DEVICES=GPU-..., MIG-..., or the pre-R470 MIG form
# MIG-GPU-<uuid>/<gi>/<ci>) are identifiers, not secrets.
_DEVICE_UUID = re.compile(
    r"^(?:(?:MIG-)?GPU-|MIG-)?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"(?:/[0-9]+){0,2}$"
)
# Run ids (32), git commits (40) and sha256 digests (64) in one case; UUIDs.
_IDENTIFIER = re.compile(
    r"^(?:[0-9a-f]{32}|[0-9a-f]{40}|[0-9a-f]{64}|[0-9A-F]{32}|[0-9A-F]{40}|[0-9A-F]{64}"
    r"|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$"
)
_MIN_TOKEN_ENTROPY_BITS = 3.0
# Pieces of identifiers and paths ("stable-diffusion-v1-5", "roundup_power2", "PTX", "text2image"):
# one-case or Capitalised letters with an optional number, optionally followed by one more such word,
# or digits alone. Random tokens mix cases and interleave digits, so their pieces rarely look like this.
_WORD_PIECE = re.compile(
    r"^(?:(?:[a-z]{1,16}|[A-Z]{1,16}|[A-Z][a-z]{1,15})[0-9]{0,4}(?:[a-z]{1,16}|[A-Z][a-z]{1,15})?"
    r"|[0-9]{1,8})$"
)
_PIECE_SEPARATORS = re.compile(r"[/_\-+=]+")

# ---------------------------------------------------------------- values: detect-secrets, when worth it

# The entropy plugins only look at quoted strings long enough to pass their limits, and repro-track hands
# them unquoted base64-ish runs of 20 characters or more; other strings skip them.
# "/" ends a run: a path's folders are judged one by one, so a temporary folder's random suffix or a
# cache snapshot's commit inside a path does not make the whole path look like a token.
_ENTROPY_RUN = re.compile(r"[A-Za-z0-9+=_\-]{20,}")
_QUOTED_RUN = re.compile(r"""["'][A-Za-z0-9+/=_\-]{8,}["']""")
# detect-secrets' keyword plugin looks for these words (lower-cased): api_key, db_pass, pwd, password...
_KEYWORD_MARKERS = ("key", "pass", "pwd", "secret", "contrase")
# Every known-token pattern needs a run of 20 token characters, except these few (basic auth in a URL,
# a private key header, a Slack token, an npm auth line).
_KNOWN_TOKEN_MARKERS = ("://", "BEGIN", "PuTTY", "xox", "_authToken")
_KNOWN_TOKEN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("aws", "AWSKeyDetector"), ("github_token", "GitHubTokenDetector"),
    ("gitlab_token", "GitLabTokenDetector"), ("slack", "SlackDetector"), ("stripe", "StripeDetector"),
    ("jwt", "JwtTokenDetector"), ("private_key", "PrivateKeyDetector"), ("basic_auth", "BasicAuthDetector"),
    ("openai", "OpenAIDetector"), ("pypi_token", "PypiTokenDetector"), ("npm", "NpmDetector"),
    ("sendgrid", "SendGridDetector"), ("discord", "DiscordBotTokenDetector"),
    ("telegram_token", "TelegramBotTokenDetector"), ("azure_storage_key", "AzureStorageKeyDetector"),
    ("twilio", "TwilioKeyDetector"), ("mailchimp", "MailchimpDetector"),
    ("square_oauth", "SquareOAuthDetector"),
)
# Strings up to this long have their findings cached (prompts, config values, env values, diff lines).
_CACHED_CHARS = 4096
# JSON values are walked this deep (as deep as an argument may be recorded at all).
_MAX_DEPTH = 32
# Findings shorter than this are too short to blank by value without mangling the text around them
# (``password = "x"``); holds_secret still reports them, and URL passwords are blanked by position.
_MIN_BLANKED_CHARS = 4


class _Plugins(NamedTuple):
    keyword: Any
    keyword_groups: tuple[dict, ...]
    keyword_any: re.Pattern[str]  # one search: does the string hold any of the plugin's keywords?
    base64: Any
    hex: Any
    known: tuple[Any, ...]
    known_any: re.Pattern[str]  # one search over every known-token plugin's patterns


def holds_secret(text: str) -> bool:
    """Whether ``text`` holds something shaped like a credential (by either layer of rules)."""
    return bool(secret_parts(text))


def secret_parts(text: str) -> tuple[str, ...]:
    """The substrings of ``text`` that look like credentials, longest first (empty when clean).

    Looked for line by line: the rules are line rules (an unquoted ``password: x`` would otherwise run
    on into the next line), and the lines of tracebacks and diffs repeat, so the cache serves them.
    """
    if "\n" not in text:
        return _line_parts(text)
    parts = {part for line in text.split("\n") for part in _line_parts(line)}
    return tuple(sorted(parts, key=len, reverse=True))


def _line_parts(line: str) -> tuple[str, ...]:
    return _cached_parts(line) if len(line) <= _CACHED_CHARS else _find(line)


def blank(text: str) -> str:
    """``text`` with every credential-looking part replaced by :data:`REDACTED`."""
    for _ in range(4):  # the keyword plugin reports one value per pattern: look again after blanking
        parts = secret_parts(text)
        if not parts:
            return text
        before = text
        text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED + "@", text)
        for part in parts:
            if len(part) >= _MIN_BLANKED_CHARS:
                text = text.replace(part, REDACTED)
        if text == before:
            return text
    return text


def json_holds_secret(value: Any, depth: int = 0) -> bool:
    """Whether a JSON value holds a credential: a string (value or key) that looks like one, or a
    credential-named key with a string value. Nesting deeper than 32 levels counts as holding one."""
    if isinstance(value, str):
        return holds_secret(value)
    if not isinstance(value, (list, tuple, dict)):
        return False
    if depth >= _MAX_DEPTH:
        return True  # not looked at, so not vouched for
    if isinstance(value, dict):
        return any(_named_secret(k, v) or (isinstance(k, str) and holds_secret(k))
                   or json_holds_secret(v, depth + 1) for k, v in value.items())
    return any(json_holds_secret(v, depth + 1) for v in value)


def blank_json(value: Any, depth: int = 0) -> Any:
    """A copy of a JSON value with credential parts of strings (values and keys) blanked and
    credential-named keys' values replaced by :data:`REDACTED` (structure and every other value kept).
    Containers nested deeper than 32 levels are replaced whole."""
    if isinstance(value, str):
        return blank(value)
    if not isinstance(value, (list, tuple, dict)):
        return value
    if depth >= _MAX_DEPTH:
        return REDACTED
    if isinstance(value, dict):
        return {blank(k) if isinstance(k, str) else k:
                REDACTED if _named_secret(k, v) else blank_json(v, depth + 1) for k, v in value.items()}
    return [blank_json(v, depth + 1) for v in value]


def _named_secret(key: Any, value: Any) -> bool:
    # A flag or a count under a credential-looking name (use_auth: true) reveals nothing.
    return (isinstance(key, str) and isinstance(value, str) and bool(value) and is_secret_argument(key))


@functools.lru_cache(maxsize=8192)
def _cached_parts(text: str) -> tuple[str, ...]:
    return _find(text)


def _find(text: str) -> tuple[str, ...]:
    found: list[str] = []
    lower = text.lower()
    if any(marker in text for marker in _OWN_MARKERS):
        found.extend(m.group("s") for m in _URL_PASSWORD.finditer(text))
        for pattern in _OWN_PATTERNS:
            found.extend(m.group("s") if "s" in pattern.groupindex else m.group(0)
                         for m in pattern.finditer(text))
    found.extend(run for run in _TOKEN_RUN.findall(text) if _is_random_token(run))
    if ("=" in text or ":" in text) and any(marker in lower for marker in _NAME_MARKERS):
        found.extend(m.group("s") for m in _NAMED_ASSIGNMENT.finditer(text)
                     if is_secret_argument(m.group("name")) or is_secret_name(m.group("name")))
    found.extend(_plugin_findings(text, lower))
    unique = dict.fromkeys(part for part in found if part and part != REDACTED)
    return tuple(sorted(unique, key=len, reverse=True))


def _plugin_findings(text: str, lower: str) -> list[str]:
    """What detect-secrets finds, running each plugin only where a cheap search says it could match."""
    if len(text) < _MIN_BLANKED_CHARS:
        return []
    plugins = _plugins()
    if plugins is None:
        return []
    found: list[str] = []
    if any(marker in lower for marker in _KEYWORD_MARKERS) and plugins.keyword_any.search(text):
        for groups in plugins.keyword_groups:
            found.extend(plugins.keyword.analyze_string(text, denylist_regex_to_group=groups))
    long_run = _ENTROPY_RUN.search(text)
    if long_run or _QUOTED_RUN.search(text):
        found.extend(_high_entropy(plugins, text))
    known_marker = any(marker in text for marker in _KNOWN_TOKEN_MARKERS)
    if (long_run or known_marker) and plugins.known_any.search(text):
        for plugin in plugins.known:
            found.extend(_known_tokens(plugin, text))
    return found


def _known_tokens(plugin: Any, text: str) -> list[str]:
    """What a known-token plugin matched: the secret group, or the whole match where the plugin's only
    group is a type prefix (``(ghp|gho)_...`` yields ``ghp``, which would blank nothing useful)."""
    from detect_secrets.plugins.base import RegexBasedDetector

    if type(plugin).analyze_string is not RegexBasedDetector.analyze_string:
        return list(plugin.analyze_string(text))  # a plugin that validates its matches (JWT)
    found = []
    for regex in plugin.denylist:
        for match in regex.finditer(text):
            groups = [g for g in match.groups() if g]
            longest = max(groups, key=len, default="")
            found.append(longest if len(longest) >= 8 else match.group(0))
    return found


def _high_entropy(plugins: _Plugins, text: str) -> list[str]:
    """Quoted strings over either entropy plugin's limit, and unquoted base64-ish runs over its limit."""
    found = []
    for plugin in (plugins.hex, plugins.base64):
        found.extend(s for s in plugin.analyze_string(text)
                     if _plugin_entropy(plugin, s) > plugin.entropy_limit and not _looks_like_id(s))
    for run in _ENTROPY_RUN.findall(text):
        if (_entropy_bits(run) > plugins.base64.entropy_limit
                and not _looks_like_id(run) and not _word_pieces(run)):
            found.append(run)
    return found


def _plugin_entropy(plugin: Any, value: str) -> float:
    # The plugins sum over their whole charset with str.count (about 70 passes over the string); for a
    # string made of that charset, which is all their regexes yield, one Counter pass gives the same
    # number. All-digit strings keep the hex plugin's own correction.
    if value.isdigit():
        return plugin.calculate_shannon_entropy(value)
    return _entropy_bits(value)


@functools.lru_cache(maxsize=1)
def _plugins() -> _Plugins | None:
    """detect-secrets' plugins, made once per process (None when the package is missing)."""
    import warnings

    # Importing detect-secrets calls logging.captureWarnings(True), which would route every warning
    # of the user's process (RecordingWarning included) into logging, where nobody sees it.
    shown = warnings.showwarning
    try:
        return _load_plugins()
    finally:
        warnings.showwarning = shown


def _load_plugins() -> _Plugins | None:
    try:
        from detect_secrets.plugins import keyword
        from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString, HexHighEntropyString
    except ImportError as exc:
        log.warning("detect-secrets is not installed (pip install detect-secrets); only repro-track's own "
                    "secret rules apply: %r", exc)
        return None
    known = []
    for module, name in _KNOWN_TOKEN_PLUGINS:
        try:
            known.append(getattr(importlib.import_module(f"detect_secrets.plugins.{module}"), name)())
        except (ImportError, AttributeError) as exc:  # a plugin renamed or dropped in another release
            log.debug("detect-secrets plugin %s.%s unavailable: %r", module, name, exc)
    groups = (keyword.QUOTES_REQUIRED_DENYLIST_REGEX_TO_GROUP, keyword.CONFIG_DENYLIST_REGEX_TO_GROUP)
    keyword_any = re.compile("|".join(keyword.DENYLIST), re.IGNORECASE)
    known_any = re.compile("|".join(_scoped(regex) for plugin in known for regex in plugin.denylist))
    return _Plugins(keyword.KeywordDetector(), groups, keyword_any, Base64HighEntropyString(),
                    HexHighEntropyString(), tuple(known), known_any)


def _scoped(regex: re.Pattern[str]) -> str:
    """A compiled pattern as text that keeps its flags inside a larger alternation."""
    flags = "".join(letter for flag, letter in ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"),
                                                (re.VERBOSE, "x")) if regex.flags & flag)
    return f"(?{flags}:{regex.pattern})" if flags else f"(?:{regex.pattern})"


def _looks_like_id(run: str) -> bool:
    return bool(_IDENTIFIER.match(run) or _DEVICE_UUID.match(run))


def _word_pieces(run: str) -> bool:
    """Words joined by separators ("stable-diffusion-v1-5"), allowing one short random piece such as a
    temporary folder's suffix ("repro-track-bench-94ru58x7"): a generated token is one long piece."""
    pieces = [piece for piece in _PIECE_SEPARATORS.split(run) if piece]
    odd = [piece for piece in pieces if not _WORD_PIECE.match(piece)]
    return len(pieces) >= 3 and len(odd) <= 1 and all(len(piece) <= 10 for piece in odd) or (
        len(pieces) >= 2 and not odd)


def _is_random_token(run: str) -> bool:
    """A long run mixing letters and digits with high per-character entropy."""
    if "/" in run.strip("/") and not run.startswith(("ey", "ghp_", "hf_")):
        # A path: judged folder by folder, so a temporary folder's short random suffix or a cache
        # snapshot's commit does not make it a token; a long random folder name still does.
        return any(len(part) >= 16 and _is_random_token(part) for part in run.split("/"))
    if _looks_like_id(run) or _word_pieces(run):
        return False
    if not (any(ch.isalpha() for ch in run) and any(ch.isdigit() for ch in run)):
        return False
    return _entropy_bits(run) >= _MIN_TOKEN_ENTROPY_BITS


def _entropy_bits(text: str) -> float:
    counts = Counter(text)
    total = len(text)
    return -sum((n / total) * math.log2(n / total) for n in counts.values())
