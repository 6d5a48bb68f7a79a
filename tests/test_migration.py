"""Schema migration: a version-1 manifest (Python RNG state as 625 integers) reads as version 2."""

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


def _as_v1(v2: dict) -> dict:
    """The same manifest as version 1 wrote it."""
    v1 = copy.deepcopy(v2)
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
        assert SCHEMA_VERSION == 2
        read = Manifest.from_json(json.dumps(_as_v1(v2))).to_dict()
        assert read["randomness"]["global"]["python"] == v2["randomness"]["global"]["python"]
        assert read["schema_version"] == 2

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
