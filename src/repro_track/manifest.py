"""The manifest: a frozen record of one call, its canonical JSON, digest and schema validation.

The canonical form is JSON with sorted keys, no whitespace, UTF-8, and no NaN; the digest is the sha256
of that form without the ``manifest_digest`` field. The file written to MLflow is the same object
pretty-printed, so people can read it; readers re-canonicalise before checking the digest.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable

from .errors import IntegrityError, ManifestError

SCHEMA_VERSION = 3
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_MAX_DEPTH = 64

def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 kept Python's random state as 625 JSON integers; version 2 packs the 624 words."""
    import array
    import base64
    import sys

    python = data["randomness"]["global"]["python"]
    state = python["state"]
    internal = state.pop("internal")
    words = array.array("I", internal[:-1])
    if sys.byteorder != "little":
        words.byteswap()
    state["key_b64"] = base64.b64encode(words.tobytes()).decode("ascii")
    state["pos"] = internal[-1]
    python["sha256"] = hashlib.sha256(canonical_json(state)).hexdigest()
    data["schema_version"] = 2
    return data


def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    """Version 3 adds the ``code`` section; a version-2 manifest knows its commit, diff digest and
    the decorated function's file, but not that file's digest or the other files the call imported."""
    git = data.get("git") or {}
    data["code"] = {"commit": git.get("commit"), "diff_sha256": git.get("diff_sha256"),
                    "module_file": (data.get("call") or {}).get("source_file"), "module_sha256": None,
                    "files": []}
    data["pipelines"] = []  # pipelines loaded inside the call were not recorded before version 3
    data["schema_version"] = 3
    return data


# Older schema versions are read by upgrading them one step at a time: MIGRATIONS[n] turns a
# version-n manifest into version n+1 (the digest is checked on the bytes as stored, before).
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _v1_to_v2, 2: _v2_to_v3}


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, compact separators, UTF-8, NaN refused: the same bytes for the same content."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def digest_of(data: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a manifest dict, ignoring its own digest field."""
    body = {k: v for k, v in data.items() if k != "manifest_digest"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


@functools.lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The manifest JSON Schema shipped inside the package (identical to schemas/ at the top)."""
    text = resources.files("repro_track").joinpath("schemas/manifest.schema.json").read_text("utf-8")
    return json.loads(text)


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    import jsonschema

    cls = jsonschema.validators.validator_for(schema())
    # jsonschema checks "date-time" only when an optional RFC 3339 package is installed; the readers of
    # these fields (export, spool, store) parse them with datetime, so that is the check that counts.
    checker = jsonschema.FormatChecker()
    checker.checks("date-time", raises=ValueError)(_is_datetime)
    return cls(schema(), format_checker=checker)


def _is_datetime(value: Any) -> bool:
    if isinstance(value, str):
        import datetime as dt

        dt.datetime.fromisoformat(value)
    return True


def validate(data: dict[str, Any], run_id: str | None = None) -> None:
    """Raise ManifestError naming the first failing field, if the data breaks the schema."""
    error = next(iter(sorted(_validator().iter_errors(data), key=lambda e: list(e.path))), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        message = error.message if len(error.message) < 300 else _short_message(error)
        raise ManifestError(f"manifest field {where}: {message}", field=where, run_id=run_id)


_validate = validate  # Manifest.to_json's keyword shadows the function's name


def _short_message(error: Any) -> str:
    """A readable message for an error whose offending value is huge (never echo the value)."""
    instance = error.instance
    what = (f"a {type(instance).__name__} of length {len(instance)}" if hasattr(instance, "__len__")
            else f"a {type(instance).__name__}")
    if error.validator in ("maxLength", "maxItems", "maxProperties"):
        return f"{what} is too long ({error.validator} {error.validator_value})"
    return f"{what} fails the schema's {error.validator} check ({str(error.validator_value)[:80]})"


@dataclass(frozen=True)
class Manifest:
    """One call's provenance. Sections are plain JSON objects whose shape the schema fixes."""

    kind: str
    call: dict[str, Any]
    arguments: dict[str, Any]
    randomness: dict[str, Any]
    determinism: dict[str, Any]
    cpu: dict[str, Any]
    gpu: dict[str, Any]
    software: dict[str, Any]
    env_vars: dict[str, Any]
    git: dict[str, Any]
    outputs: list[dict[str, Any]]
    code: dict[str, Any] = dataclasses.field(default_factory=dict)
    pipelines: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    trajectory: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    replay_of: str | None = None
    repro_track_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON data, with its digest."""
        data = self._fields()
        data["manifest_digest"] = digest_of(data)
        return data

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON (without the digest field)."""
        return digest_of(self._fields(copy=False))

    def _fields(self, *, copy: bool = True) -> dict[str, Any]:
        # An empty trajectory (no pipeline ran) is left out, so a manifest without one reads back as written.
        # copy=False shares the sections, for readers that only serialise or hash them.
        data = dataclasses.asdict(self) if copy else {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not data["trajectory"]:
            del data["trajectory"]
        return data

    def to_json(self, *, validate: bool = True) -> str:
        """Pretty, sorted JSON (for files people read); validated first so nothing invalid is written."""
        return self.serialise(validate=validate, pretty=True)[0]

    def serialise(self, *, validate: bool = True, pretty: bool = False) -> tuple[str, str]:
        """(the artifact's JSON, the manifest digest), each computed once and without copying the
        sections (the recording call's path writes the manifest and needs its digest too).

        The artifact is one line of sorted JSON unless ``pretty``: json's indenting encoder is pure
        Python and cost a trivial recording call a tenth of a millisecond more, and MLflow's artifact
        view indents JSON itself. ``validate=False`` is for the spool, whose upload validates off the
        caller's path.
        """
        data = self._fields(copy=False)
        data["manifest_digest"] = digest = digest_of(data)
        if validate:
            _validate(data)
        layout: dict[str, Any] = {"indent": 1} if pretty else {"separators": (",", ":")}
        return json.dumps(data, sort_keys=True, ensure_ascii=False, allow_nan=False, **layout) + "\n", digest

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        """Build from already-validated data (the digest field is dropped: it is derived)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    @classmethod
    def from_json(cls, raw: bytes | str, run_id: str | None = None) -> "Manifest":
        """Parse, migrate, validate and check the digest of a manifest read from a store."""
        data = parse(raw, run_id)
        recorded = data.get("manifest_digest")
        if not isinstance(recorded, str):
            raise ManifestError(f"run {run_id or '?'}: manifest has no manifest_digest field",
                                field="manifest_digest", run_id=run_id)
        _check_version(data, run_id)
        # The digest covers the bytes as written, so it is checked before any migration.
        try:
            expected = digest_of(data)
        except UnicodeEncodeError:  # a lone surrogate escape ("\ud800") has no UTF-8 form
            raise ManifestError(f"run {run_id or '?'}: manifest is not valid Unicode text (it holds a "
                                "lone surrogate escape)", run_id=run_id) from None
        if recorded != expected:
            raise IntegrityError(
                f"run {run_id or '?'}: manifest digest mismatch (recorded {recorded[:12]}..., content "
                f"hashes to {expected[:12]}...): the manifest was edited or corrupted",
                run_id=run_id, item="manifest",
            )
        data = migrate(data, run_id)
        validate(data, run_id)
        check_references(data, run_id)
        return cls.from_dict(data)


def check_references(data: dict[str, Any], run_id: str | None = None) -> None:
    """Raise ManifestError where one section points into another at nothing (the schema cannot say
    that a generator index exists)."""
    count = len(data["randomness"]["generators"])
    for name, arg in data["arguments"].items():
        bad = [i for i in arg.get("generators", []) if not 0 <= i < count]
        if bad:
            raise ManifestError(f"run {run_id or '?'}: argument {name[:60]!r} names generator {bad[0]}, but "
                                f"the manifest records {count}", field=f"arguments/{name[:60]}", run_id=run_id)


def _depth(obj: Any, limit: int) -> int:
    stack = [(obj, 1)]
    deepest = 0
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > limit:
            return depth
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return deepest


def parse(raw: bytes | str, run_id: str | None = None) -> dict[str, Any]:
    """JSON text to a dict, refusing oversize, non-UTF-8, non-object or absurdly nested input."""
    where = f"run {run_id}: " if run_id else ""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{where}manifest is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} limit",
                            run_id=run_id)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{where}manifest is not UTF-8 ({exc.reason} at byte {exc.start})",
                            run_id=run_id) from None
    except RecursionError:
        raise ManifestError(f"{where}manifest nests deeper than {_MAX_DEPTH} levels", run_id=run_id) from None
    except ValueError as exc:
        raise ManifestError(f"{where}manifest is not valid JSON: {exc}", run_id=run_id) from None
    if not isinstance(data, dict):
        raise ManifestError(f"{where}manifest is a JSON {type(data).__name__}, not an object", run_id=run_id)
    if _depth(data, _MAX_DEPTH) > _MAX_DEPTH:
        raise ManifestError(f"{where}manifest nests deeper than {_MAX_DEPTH} levels", run_id=run_id)
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a manifest")


def _finite_float(text: str) -> float:
    # json reads 1e400 as inf, which the canonical form (and so the digest) cannot hold.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _check_version(data: dict[str, Any], run_id: str | None) -> int:
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ManifestError(f"run {run_id or '?'}: manifest has no integer schema_version",
                            field="schema_version", run_id=run_id)
    if version > SCHEMA_VERSION:
        raise ManifestError(
            f"run {run_id or '?'}: manifest schema_version {version} is newer than this repro-track "
            f"understands ({SCHEMA_VERSION}); upgrade repro-track (pip install -U repro-track)",
            field="schema_version", run_id=run_id)
    return version


def migrate(data: dict[str, Any], run_id: str | None = None) -> dict[str, Any]:
    """Upgrade an older manifest to SCHEMA_VERSION, one step at a time; refuse unknown newer ones."""
    version = _check_version(data, run_id)
    while version < SCHEMA_VERSION:
        step = MIGRATIONS.get(version)
        if step is None:
            raise ManifestError(f"run {run_id or '?'}: no migration from schema_version {version}",
                                field="schema_version", run_id=run_id)
        try:
            data = step(data)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
            # An old version number on content of another shape: hand-written, or damaged.
            raise ManifestError(f"run {run_id or '?'}: the manifest says schema_version {version} but "
                                f"does not have that version's shape ({type(exc).__name__} {str(exc)[:80]})",
                                field="schema_version", run_id=run_id) from None
        data["manifest_digest"] = digest_of(data)
        version = data["schema_version"]
    return data
