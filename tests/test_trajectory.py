"""Tests for repro_track.trajectory: per-step latents noted through the scheduler, and where a replay
or a second run left the recorded trajectory."""

from __future__ import annotations

import importlib
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from conftest import run_cli

import repro_track
from repro_track import explain, runs, store, testing, trajectory
from repro_track.outputs import sha256_of


@pytest.fixture(scope="module")
def ddim(model_dir: Path):
    """The session's tiny DDIM pipeline (32x32, no callback_on_step_end), loaded once per module."""
    return testing.load_pipeline(model_dir / "tiny-ddim", progress=False)


def entry(call: int, step: int, digest: str) -> dict:
    return {"call": call, "step": step, "sha256": digest, "mean": 0.0, "std": 1.0, "abs_max": 2.0}


class TestCollecting:
    """A DDIM pipeline's steps are noted through its scheduler, step 0 being the initial noise."""

    def test_notes_every_step_and_the_noise(self, ddim):
        with trajectory.collecting() as collected:
            ddim(num_inference_steps=3, generator=torch.Generator().manual_seed(11), output_type="np")
        steps = collected.steps
        assert [(s["call"], s["step"]) for s in steps] == [(0, 0), (0, 1), (0, 2), (0, 3)]
        size = ddim.unet.config.sample_size
        noise = torch.randn((1, ddim.unet.config.in_channels, size, size),
                            generator=torch.Generator().manual_seed(11))
        assert steps[0]["sha256"] == sha256_of(noise)
        assert steps[0]["mean"] == pytest.approx(noise.mean().item())
        assert steps[0]["abs_max"] == pytest.approx(noise.abs().max().item())
        assert len({s["sha256"] for s in steps}) == 4  # each step moved the latents

    def test_each_pipeline_call_is_its_own_segment(self, ddim):
        with trajectory.collecting() as collected:
            for seed in (1, 2):
                ddim(num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="np")
        steps = collected.steps
        assert [(s["call"], s["step"]) for s in steps] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]

    def test_nothing_is_noted_outside_a_recording(self, ddim):
        with trajectory.collecting() as collected:
            pass
        ddim(num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np")
        assert collected.steps == [] and collected.kept == []

    def test_keeps_the_latents_only_when_asked(self, ddim):
        with trajectory.collecting(keep=True) as collected:
            ddim(num_inference_steps=2, generator=torch.Generator().manual_seed(4), output_type="np")
        assert [name for name, _ in collected.kept] == [
            "step_latents.0.000", "step_latents.0.001", "step_latents.0.002"]
        assert [sha256_of(t) for _, t in collected.kept] == [s["sha256"] for s in collected.steps]


class TestDivergenceWords:
    """Two trajectories are compared step by step; the first differing step is named."""

    @pytest.mark.parametrize("other, words", [
        ([entry(0, 0, "a"), entry(0, 1, "b"), entry(0, 2, "c")], None),
        ([entry(0, 0, "x"), entry(0, 1, "y"), entry(0, 2, "z")], "noise differs"),
        ([entry(0, 0, "a"), entry(0, 1, "b"), entry(0, 2, "z")], "diverged at step 2 of 2"),
        ([entry(0, 0, "a"), entry(0, 1, "b")], "diverged at step 2 of 2"),
        ([entry(0, 0, "a"), entry(0, 1, "b"), entry(0, 2, "c"), entry(0, 3, "d")], "diverged at step 3"),
        ([], None),
    ], ids=["same", "noise", "late-step", "fewer-steps", "more-steps", "none-recorded"])
    def test_first_divergence(self, other, words):
        recorded = [entry(0, 0, "a"), entry(0, 1, "b"), entry(0, 2, "c")]
        found = trajectory.divergence_words(recorded, other)
        assert (found is None) if words is None else found.startswith(words)

    def test_names_the_pipeline_call_when_there_were_several(self):
        recorded = [entry(0, 0, "a"), entry(0, 1, "b"), entry(1, 0, "c"), entry(1, 1, "d")]
        other = [entry(0, 0, "a"), entry(0, 1, "b"), entry(1, 0, "c"), entry(1, 1, "x")]
        assert trajectory.divergence_words(recorded, other) == (
            "diverged at step 1 of 1: the latents agreed until then (pipeline call 2 of 2)")


PERTURBED_PY = '''
    """A recorded generation that perturbs the model output at one step when the replay asks it to."""
    import os

    import repro_track


    @repro_track.record(experiment="trajectory")
    def denoise(pipe, steps: int, *, generator=None):
        at = int(os.environ.get("TEST_PERTURB_STEP", "0"))
        if at:
            original, count = pipe.scheduler.step, [0]

            def step(model_output, timestep, sample, *args, **kwargs):
                count[0] += 1
                if count[0] == at:
                    model_output = model_output + 1e-3
                return original(model_output, timestep, sample, *args, **kwargs)

            pipe.scheduler.step = step
        return pipe(num_inference_steps=steps, generator=generator, output_type="np").images
'''


def record_perturbable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pipe, seed: int) -> str:
    """Record one call of PERTURBED_PY's function (a module in tmp_path, the project dir)."""
    name = f"perturbed_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PERTURBED_PY), "utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    module.denoise(pipe, 4, generator=torch.Generator().manual_seed(seed))
    return repro_track.last_recording(module.denoise).wait(120)


@pytest.mark.slow
class TestReplayDivergence:
    """A replay reports the first step where it left the recorded trajectory."""

    def test_perturbed_step_is_reported(self, tracking_uri, tmp_path, monkeypatch, model_dir):
        pipe = testing.load_pipeline(model_dir / "tiny-ddim", progress=False)
        run_id = record_perturbable(tmp_path, monkeypatch, pipe, seed=3)
        recorded = runs.load_run(store.client_for(tracking_uri), run_id, tmp_path / "dl").manifest
        assert [s["step"] for s in recorded.trajectory] == [0, 1, 2, 3, 4]
        monkeypatch.setenv("TEST_PERTURB_STEP", "3")  # the replay child inherits it
        report = repro_track.replay(run_id, project_dir=tmp_path, log=False)
        assert report.observed != "exact"
        assert "the replay diverged at step 3 of 4: the latents agreed until then" in report.reasons

    def test_unperturbed_replay_names_no_step(self, tracking_uri, tmp_path, monkeypatch, model_dir):
        pipe = testing.load_pipeline(model_dir / "tiny-ddim", progress=False)
        run_id = record_perturbable(tmp_path, monkeypatch, pipe, seed=3)
        report = repro_track.replay(run_id, project_dir=tmp_path, log=False)
        assert report.observed == "exact"
        assert not [r for r in report.reasons if "diverged" in r or "noise differs" in r]


@pytest.mark.slow
class TestDiff:
    """``diff`` of two recordings names where their trajectories parted."""

    def test_two_seeds_differ_in_the_noise(self, tracking_uri, tmp_path, monkeypatch, model_dir, example_env):
        pipe = testing.load_pipeline(model_dir / "tiny-ddim", progress=False)
        a = record_perturbable(tmp_path, monkeypatch, pipe, seed=1)
        b = record_perturbable(tmp_path, monkeypatch, pipe, seed=2)
        client = store.client_for(tracking_uri)
        ma = runs.load_run(client, a, tmp_path / "a").manifest.to_dict()
        mb = runs.load_run(client, b, tmp_path / "b").manifest.to_dict()
        found = [d for d in explain.differences(ma, mb) if d.path.startswith("trajectory")]
        assert [(d.category, d.explanation) for d in found] == [
            ("noise", "denoising trajectory: noise differs: the initial latents already differ")]
        done = run_cli("diff", a, b, env={**example_env, "MLFLOW_TRACKING_URI": tracking_uri})
        assert done.returncode == 0, done.stderr
        assert "denoising trajectory: noise differs" in done.stdout
