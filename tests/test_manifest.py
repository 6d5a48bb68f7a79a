"""Tests for repro_track.manifest: canonical JSON, the digest, and refusing anything malformed."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import repro_track
from repro_track import manifest as manifest_module
from repro_track.errors import IntegrityError, ManifestError
from repro_track.manifest import Manifest, canonical_json, digest_of
from repro_track.recorder import recorder_of

REPO = Path(__file__).resolve().parents[1]
# The autouse fixture only changes the working dir and environment, which no example depends on.
EXAMPLES = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@repro_track.record
def draw(n: int, *, generator: Any = None, seed: int = 0) -> dict[str, Any]:
    """A recorded call with a generator, a seed argument and two outputs."""
    return {"noise": torch.randn(n, generator=generator), "mean": 0.5}


@pytest.fixture(scope="module")
def real() -> dict[str, Any]:
    """A manifest captured from a real call (never mutated: tests take copies)."""
    recorder = recorder_of(draw)
    assert recorder is not None
    _, error, recording = recorder.capture((4,), {"generator": torch.Generator().manual_seed(3), "seed": 3})
    assert error is None and recording is not None
    return recording.manifest.to_dict()


@pytest.fixture
def data(real: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(real)


def redigest(data: dict[str, Any]) -> dict[str, Any]:
    data["manifest_digest"] = digest_of(data)
    return data


def reference_digest(data: dict[str, Any]) -> str:
    """The documented digest, computed without the package: sha256 of sorted compact UTF-8 JSON."""
    body = {k: v for k, v in data.items() if k != "manifest_digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def locations(obj: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path into a JSON document, the root excluded."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from locations(value, prefix + (key,))


def any_location(doc: dict[str, Any], data: st.DataObject, exclude: tuple = ()) -> tuple:
    """A path into doc, drawn section first so that big sections (RNG states) do not crowd out the rest."""
    section = data.draw(st.sampled_from([k for k in doc if k not in exclude]), label="section")
    return data.draw(st.sampled_from([(section,), *locations(doc[section], (section,))]), label="path")


def parent_of(doc: Any, path: tuple) -> Any:
    for key in path[:-1]:
        doc = doc[key]
    return doc


def get(doc: Any, path: tuple) -> Any:
    return parent_of(doc, path)[path[-1]]


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


class TestCanonicalJson:
    """The canonical form is one byte string per content, whatever the key order."""

    def test_sorted_compact_utf8(self) -> None:
        assert canonical_json({"b": [1, 2.5], "a": "é"}) == '{"a":"é","b":[1,2.5]}'.encode()

    def test_key_order_does_not_matter(self, data: dict[str, Any]) -> None:
        reversed_keys = json.loads(json.dumps(data), object_pairs_hook=lambda pairs: dict(reversed(pairs)))
        assert list(reversed_keys) != list(data)
        assert canonical_json(reversed_keys) == canonical_json(data)

    def test_refuses_nan(self) -> None:
        with pytest.raises(ValueError):
            canonical_json({"x": float("nan")})


class TestDigest:
    """The digest is the sha256 of the canonical JSON without itself, and moves on any edit."""

    def test_matches_the_documented_computation(self, data: dict[str, Any]) -> None:
        assert data["manifest_digest"] == digest_of(data) == reference_digest(data)
        assert Manifest.from_dict(data).digest == data["manifest_digest"]

    def test_same_content_same_digest(self, data: dict[str, Any]) -> None:
        again = Manifest.from_json(Manifest.from_dict(data).to_json())
        assert again.digest == data["manifest_digest"]
        assert again.to_dict() == data

    @EXAMPLES
    @given(st.data())
    def test_any_edit_changes_it(self, real: dict[str, Any], data: st.DataObject) -> None:
        doc = copy.deepcopy(real)
        path = any_location(doc, data, exclude=("manifest_digest",))
        new = data.draw(JSON_VALUES.filter(lambda v: canonical_json(v) != canonical_json(get(doc, path))))
        parent_of(doc, path)[path[-1]] = new
        assert digest_of(doc) != real["manifest_digest"]


class TestFromJson:
    """Reading a manifest accepts exactly the untouched, valid ones."""

    def test_round_trip(self, data: dict[str, Any]) -> None:
        assert Manifest.from_json(json.dumps(data).encode()).to_dict() == data

    def test_pretty_and_shuffled_text_is_accepted(self, data: dict[str, Any]) -> None:
        shuffled = dict(reversed(list(data.items())))
        assert Manifest.from_json(json.dumps(shuffled, indent=3)).to_dict() == data

    def test_tampered(self, data: dict[str, Any]) -> None:
        data["determinism"]["num_threads"] += 1
        with pytest.raises(IntegrityError) as caught:
            Manifest.from_json(json.dumps(data), run_id="r1")
        assert (caught.value.item, caught.value.run_id) == ("manifest", "r1")

    @pytest.mark.parametrize(("edit", "field", "words"), [
        (lambda d: d.update(schema_version=4), "schema_version", "schema_version 4 is newer"),
        (lambda d: d.update(schema_version=0), "schema_version", "schema_version 0"),
        (lambda d: d.update(schema_version="1"), "schema_version", "schema_version"),
        (lambda d: d.pop("gpu"), "(top level)", "'gpu' is a required property"),
        (lambda d: d["call"].pop("status"), "call", "'status' is a required property"),
        (lambda d: d["determinism"].update(num_threads="4"), "determinism/num_threads", "is not of type"),
        (lambda d: d["outputs"][0].update(sha256="xyz"), "outputs/0/sha256", "does not match"),
        (lambda d: d.update(kind="rerun"), "kind", "is not one of"),
        (lambda d: d.update(surprise=1), "(top level)", "surprise"),
        (lambda d: d["arguments"]["n"].update(value=nested(80)), None, "nests deeper than 64"),
        (lambda d: d["call"].update(qualname="x" * 2000), "call/qualname", "is too long"),
    ], ids=["newer-version", "unknown-older-version", "string-version", "missing-section", "missing-field",
            "wrong-type", "bad-digest-pattern", "bad-enum", "unknown-field", "deep-nesting", "huge-string"])
    def test_invalid_content(self, data: dict[str, Any], edit: Callable[[dict], Any], field: str | None,
                             words: str) -> None:
        edit(data)
        with pytest.raises(ManifestError) as caught:
            Manifest.from_json(json.dumps(redigest(data)), run_id="r1")
        assert caught.value.field == field
        assert words in str(caught.value)

    def test_missing_digest(self, data: dict[str, Any]) -> None:
        del data["manifest_digest"]
        with pytest.raises(ManifestError) as caught:
            Manifest.from_json(json.dumps(data))
        assert caught.value.field == "manifest_digest"

    @pytest.mark.parametrize(("spoil", "words"), [
        (lambda raw: raw.replace(b'"SENTINEL"', b'"\xff\xfe"'), "not UTF-8"),
        (lambda raw: b"[" * 100_000 + b"]" * 100_000, "nests deeper"),
        (lambda raw: raw.replace(b'"SENTINEL"', b"NaN"), "not valid JSON"),
        (lambda raw: raw.replace(b'"SENTINEL"', b"1e400"), "not valid JSON"),
        (lambda raw: raw.replace(b'"SENTINEL"', b'"\\ud800"'), "not valid"),
        (lambda raw: raw[: len(raw) // 2], "not valid JSON"),
        (lambda raw: b"[1, 2]", "not an object"),
        (lambda raw: b"", "not valid JSON"),
    ], ids=["not-utf8", "deep-text", "nan", "float-overflow", "lone-surrogate", "truncated", "array",
            "empty"])
    def test_malformed_text(self, data: dict[str, Any], spoil: Callable[[bytes], bytes], words: str) -> None:
        data["arguments"]["n"]["value"] = "SENTINEL"
        raw = spoil(json.dumps(redigest(data)).encode())
        with pytest.raises(ManifestError) as caught:
            Manifest.from_json(raw)
        assert words in str(caught.value)

    def test_oversize(self, data: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
        raw = json.dumps(data)
        monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", len(raw) - 1)
        with pytest.raises(ManifestError, match="over the"):
            Manifest.from_json(raw)

    @EXAMPLES
    @given(st.data())
    def test_random_mutations(self, real: dict[str, Any], data: st.DataObject) -> None:
        doc = copy.deepcopy(real)
        path = any_location(doc, data)
        operation = data.draw(st.sampled_from(["replace", "delete", "add"]), label="operation")
        parent, key = parent_of(doc, path), path[-1]
        if operation == "replace":
            parent[key] = data.draw(JSON_VALUES, label="value")
        elif operation == "delete":
            del parent[key]
        elif isinstance(get(doc, path), dict):
            get(doc, path)[data.draw(st.text(max_size=8), label="new key")] = data.draw(JSON_VALUES)
        else:
            parent[key] = [get(doc, path), data.draw(JSON_VALUES)]
        digested = data.draw(st.booleans(), label="re-digested")
        if digested:
            redigest(doc)
        raw = json.dumps(doc)
        try:
            loaded = Manifest.from_json(raw)
        except IntegrityError:
            assert not digested and digest_of(doc) != doc.get("manifest_digest")
        except ManifestError:
            pass
        else:
            assert loaded.to_dict() == json.loads(raw)
            assert digest_of(doc) == doc["manifest_digest"]

    @EXAMPLES
    @given(st.data())
    def test_random_byte_changes(self, real: dict[str, Any], data: st.DataObject) -> None:
        raw = bytearray(json.dumps(real, indent=1, ensure_ascii=False).encode())
        position = data.draw(st.integers(0, len(raw) - 1), label="position")
        raw[position] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[position]), label="byte")
        try:
            loaded = Manifest.from_json(bytes(raw))
        except (ManifestError, IntegrityError):
            return
        assert loaded.to_dict() == real  # only changes JSON ignores (whitespace) may be accepted


class TestSchema:
    """The packaged schema is the published one."""

    def test_packaged_copy_is_identical(self) -> None:
        top = (REPO / "schemas" / "manifest.schema.json").read_bytes()
        packaged = (REPO / "src" / "repro_track" / "schemas" / "manifest.schema.json").read_bytes()
        assert top == packaged
        assert manifest_module.schema() == json.loads(top)

    def test_real_manifest_is_valid(self, data: dict[str, Any]) -> None:
        manifest_module.validate(data)  # raises on any violation
        assert data["schema_version"] == manifest_module.SCHEMA_VERSION == 3
