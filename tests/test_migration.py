"""Schema migration: version-1 (Python RNG state as 625 integers) and version-2 (no code section)
manifests read as the current version."""

from __future__ import annotations

import array
import base64
import copy
import json

import pytest
import torch

import repro_track
from repro_track.errors import IntegrityError
from repro_track.manifest import SCHEMA_VERSION, Manifest, digest_of
from repro_track.recorder import recorder_of


@repro_track.record
def draw(*, generator=None):
    """A few random numbers."""
    return torch.rand(3, generator=generator)


def _current() -> dict:
    _, _, recording = recorder_of(draw).capture((), {"generator": torch.Generator().manual_seed(1)})
    return recording.manifest.to_dict()


def _as_v2(v3: dict) -> dict:
    """The same manifest as version 2 wrote it (no code section)."""
    v2 = copy.deepcopy(v3)
    del v2["code"], v2["pipelines"]
    v2["schema_version"] = 2
    v2["manifest_digest"] = digest_of(v2)
    return v2


def _as_v1(current: dict) -> dict:
    """The same manifest as version 1 wrote it."""
    v1 = copy.deepcopy(_as_v2(current))
    state = v1["randomness"]["global"]["python"]["state"]
    words = array.array("I")
    words.frombytes(base64.b64decode(state.pop("key_b64")))
    state["internal"] = list(words) + [state.pop("pos")]
    v1["schema_version"] = 1
    v1["manifest_digest"] = digest_of(v1)
    return v1


class TestV1ToV2:
    """Version-1 manifests are upgraded after their digest is checked on the stored bytes."""

    def test_upgrade_gives_the_current_form(self):
        v2 = _current()
        assert SCHEMA_VERSION == 3
        read = Manifest.from_json(json.dumps(_as_v1(v2))).to_dict()
        assert read["randomness"]["global"]["python"] == v2["randomness"]["global"]["python"]
        assert read["schema_version"] == 3

    def test_tampered_v1_is_refused(self):
        v1 = _as_v1(_current())
        v1["randomness"]["global"]["python"]["state"]["internal"][0] ^= 1
        with pytest.raises(IntegrityError):
            Manifest.from_json(json.dumps(v1))

    def test_restored_state_draws_the_same(self):
        import random

        from repro_track.capture.torch_state import restore_global_rng

        v2 = _current()
        read = Manifest.from_json(json.dumps(_as_v1(v2))).to_dict()
        restore_global_rng(v2["randomness"]["global"])
        expected = [random.random() for _ in range(3)]
        restore_global_rng(read["randomness"]["global"])
        assert [random.random() for _ in range(3)] == expected


class TestV2ToV3:
    """Version-2 manifests gain a code section built from what they already recorded."""

    def test_upgrade_fills_the_code_section_from_git_and_call(self):
        current = _current()
        read = Manifest.from_json(json.dumps(_as_v2(current))).to_dict()
        assert read["schema_version"] == 3
        assert read["code"] == {"commit": current["git"]["commit"], "diff_sha256": current["git"]["diff_sha256"],
                                "module_file": current["call"]["source_file"], "module_sha256": None,
                                "files": []}
        assert read["code"]["module_file"] == "tests/test_migration.py"

    def test_current_recording_has_the_module_digest(self):
        import hashlib
        from pathlib import Path

        code = _current()["code"]
        assert code["module_sha256"] == hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

    def test_tampered_v2_is_refused(self):
        v2 = _as_v2(_current())
        v2["git"]["commit"] = "0" * 40
        with pytest.raises(IntegrityError):
            Manifest.from_json(json.dumps(v2))
