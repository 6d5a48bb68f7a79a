"""`show`: a recorded run for people (sections) and for machines (--json)."""

from __future__ import annotations

import json

import torch

import repro_track
from conftest import run_cli


@repro_track.record(experiment="show")
def sample(n: int = 3, *, generator=None):
    """A few random numbers."""
    return torch.rand(n, generator=generator)


class TestShow:
    """The text names every section and the values that decide the bits; --json is the manifest."""

    def test_text_and_json(self, migrated_store):
        sample(generator=torch.Generator().manual_seed(11))
        run_id = repro_track.last_recording(sample).wait(120)
        text = run_cli("show", run_id)
        assert text.returncode == 0, text.stderr
        for heading in ("call", "arguments", "randomness", "hardware", "software", "determinism",
                        "environment variables", "git", "outputs", "risks to exact reproduction elsewhere"):
            assert f"\n{heading}" in text.stdout
        assert "cpu generator, seed 11" in text.stdout
        data = json.loads(run_cli("show", run_id, "--json").stdout)
        assert data["run_id"] == run_id
        assert data["manifest"]["randomness"]["generators"][0]["initial_seed"] == 11
        assert data["replays"] == []
