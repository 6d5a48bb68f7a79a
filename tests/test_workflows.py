"""Real workflows: hub models by id whose repo moves on, pipelines loaded inside the call, autocast."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import recording_env, run_script, write_project

REPO_ID = "tiny-org/tiny-ddim"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def add_commit(hub: Path, repo_id: str, commit: str, seed: int) -> Path:
    """Put a tiny DDIM pipeline (weights from ``seed``) into a Hugging Face cache as ``commit`` and
    point ``refs/main`` at it: what a download of a new commit of the repo leaves behind."""
    from repro_track import testing

    repo = hub / f"models--{repo_id.replace('/', '--')}"
    built = testing.build_tiny_ddim(hub.parent / f"build-{seed}", seed=seed)
    shutil.copytree(built, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


PROJECT = f'''
    """Pipelines by hub id: passed in, and loaded inside the recorded function."""
    import torch
    from diffusers import DiffusionPipeline

    import repro_track


    @repro_track.record(experiment="hub")
    def denoise(pipe, steps: int, *, generator=None):
        pipe.set_progress_bar_config(disable=True)
        return pipe(num_inference_steps=steps, generator=generator, output_type="np").images


    @repro_track.record(experiment="hub")
    def load_and_denoise(steps: int, *, generator=None):
        pipe = DiffusionPipeline.from_pretrained("{REPO_ID}")
        pipe.set_progress_bar_config(disable=True)
        return pipe(num_inference_steps=steps, generator=generator, output_type="np").images


    @repro_track.record(experiment="hub")
    def under_autocast(n: int, *, generator=None):
        a = torch.randn(n, n, generator=generator)
        return (a @ a).float()
'''

RECORD = f'''
    import json

    import torch
    from diffusers import DiffusionPipeline

    import gen
    import repro_track

    runs = {{}}
    pipe = DiffusionPipeline.from_pretrained("{REPO_ID}")
    gen.denoise(pipe, 2, generator=torch.Generator().manual_seed(1))
    runs["argument"] = repro_track.last_recording(gen.denoise).wait(timeout=120)
    gen.load_and_denoise(2, generator=torch.Generator().manual_seed(1))
    runs["inside"] = repro_track.last_recording(gen.load_and_denoise).wait(timeout=120)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gen.under_autocast(16, generator=torch.Generator().manual_seed(2))
    runs["autocast"] = repro_track.last_recording(gen.under_autocast).wait(timeout=120)
    print(json.dumps(runs))
'''


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The project recorded against commit A; then the repo moves on to commit B (other weights)."""
    root = tmp_path_factory.mktemp("hub")
    hub = root / "hf" / "hub"
    add_commit(hub, REPO_ID, COMMIT_A, seed=0)
    project = write_project(root / "proj", {"gen.py": PROJECT, "record.py": RECORD})
    uri = f"sqlite:///{root / 'hub.db'}"
    env = recording_env(uri, root / "spool", HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    done = run_script(project / "record.py", env=env, cwd=project)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    add_commit(hub, REPO_ID, COMMIT_B, seed=1)
    return {"runs": runs, "uri": uri, "project": project, "hub": hub}


def _manifest(uri: str, run_id: str, tmp: Path) -> dict:
    from repro_track import runs, store

    return runs.load_run(store.client_for(uri), run_id, tmp).manifest.to_dict()


@pytest.mark.slow
class TestHubRevision:
    """A pipeline loaded by hub id records the commit it came from, and replays at that commit after the
    repo's main branch moved on, whether passed in or loaded inside the recorded function."""

    def test_commit_and_repo_are_recorded(self, hub_runs: dict, tmp_path: Path) -> None:
        m = _manifest(hub_runs["uri"], hub_runs["runs"]["argument"], tmp_path)
        identity = m["arguments"]["pipe"]["pipeline"]
        assert (identity["repo_id"], identity["revision"], identity["source"]) == (REPO_ID, COMMIT_A, "hub")
        assert identity["components"]["unet"]["dtype"] == "float32"

    def test_pipeline_loaded_inside_the_call_is_recorded(self, hub_runs: dict, tmp_path: Path) -> None:
        m = _manifest(hub_runs["uri"], hub_runs["runs"]["inside"], tmp_path)
        [used] = m["pipelines"]
        assert (used["origin"], used["name"], used["identity"]["revision"]) == ("loaded", REPO_ID, COMMIT_A)

    def test_main_moved_to_other_weights(self, hub_runs: dict) -> None:
        from diffusers import DiffusionPipeline

        from repro_track.capture.arguments import pipeline_identity

        pipe = DiffusionPipeline.from_pretrained(REPO_ID, cache_dir=hub_runs["hub"], local_files_only=True)
        now = pipeline_identity(pipe)
        assert now["revision"] == COMMIT_B  # what a replay without the recorded commit would load

    @pytest.mark.parametrize("case", ["argument", "inside"])
    def test_replay_loads_the_recorded_commit(self, hub_runs: dict, case: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
        import repro_track

        monkeypatch.setenv("HF_HUB_CACHE", str(hub_runs["hub"]))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        report = repro_track.replay(hub_runs["runs"][case], tracking_uri=hub_runs["uri"],
                                    project_dir=hub_runs["project"], log=False)
        assert (report.expected, report.observed) == ("exact", "exact"), report.reasons

    def test_commit_missing_from_the_cache_is_named_before_running(self, hub_runs: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        import repro_track

        empty = tmp_path / "empty-hub"
        empty.mkdir()
        monkeypatch.setenv("HF_HUB_CACHE", str(empty))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        report = repro_track.replay(hub_runs["runs"]["argument"], tracking_uri=hub_runs["uri"],
                                    project_dir=hub_runs["project"], log=False, dry_run=True)
        assert report.expected == "none"
        assert any(COMMIT_A in r and "not in the Hugging Face cache" in r for r in report.reasons)


@pytest.mark.slow
class TestAutocast:
    """A call made under torch.autocast records it and replays under the same autocast."""

    def test_autocast_is_recorded(self, hub_runs: dict, tmp_path: Path) -> None:
        m = _manifest(hub_runs["uri"], hub_runs["runs"]["autocast"], tmp_path)
        assert m["determinism"]["autocast"] == [
            {"device_type": "cpu", "dtype": "bfloat16", "enabled": True, "cache_enabled": True}]

    def test_replay_under_the_same_autocast_is_exact(self, hub_runs: dict) -> None:
        import repro_track

        report = repro_track.replay(hub_runs["runs"]["autocast"], tracking_uri=hub_runs["uri"],
                                    project_dir=hub_runs["project"], log=False)
        assert (report.expected, report.observed) == ("exact", "exact"), report.reasons


@pytest.mark.slow
class TestDiffNamesPipelineParts:
    """`diff` explains a pipeline loaded at another commit, and autocast, as causes."""

    def test_commit_and_autocast_differences_are_named(self, hub_runs: dict, tmp_path: Path) -> None:
        import copy

        from repro_track.explain import differences

        a = _manifest(hub_runs["uri"], hub_runs["runs"]["inside"], tmp_path / "a")
        b = copy.deepcopy(a)
        b["pipelines"][0]["identity"]["revision"] = COMMIT_B
        b["determinism"]["autocast"] = [{"device_type": "cpu", "dtype": "bfloat16", "enabled": True}]
        found = {d.path: d for d in differences(a, b)}
        revision = found["pipelines.0.identity.revision"]
        assert revision.category == "input" and "another commit of the model repo" in revision.explanation
        assert any(p.startswith("determinism.autocast") and d.category == "arithmetic" for p, d in found.items())


LOCAL_PROJECT = '''
    import repro_track


    @repro_track.record(experiment="local")
    def denoise(pipe, steps: int, *, generator=None):
        pipe.set_progress_bar_config(disable=True)
        return pipe(num_inference_steps=steps, generator=generator, output_type="np").images
'''

LOCAL_RECORD = '''
    import json
    import sys

    import torch
    from diffusers import DiffusionPipeline

    import gen
    import repro_track

    gen.denoise(DiffusionPipeline.from_pretrained("models/tiny-ddim"), 2, generator=torch.Generator().manual_seed(3))
    print(json.dumps({"run": repro_track.last_recording(gen.denoise).wait(timeout=120)}))
'''


@pytest.mark.slow
class TestLocalModelByContent:
    """A model folder inside the project is found again in another checkout of it, and checked by content."""

    def test_replay_from_a_moved_checkout_is_exact(self, tmp_path: Path) -> None:
        import repro_track
        from repro_track import testing

        first = write_project(tmp_path / "first", {"gen.py": LOCAL_PROJECT, "record.py": LOCAL_RECORD})
        testing.build_tiny_ddim(first / "models" / "tiny-ddim")
        uri = f"sqlite:///{tmp_path / 'local.db'}"
        done = run_script(first / "record.py", env=recording_env(uri, tmp_path / "spool"), cwd=first)
        assert done.returncode == 0, done.stderr[-3000:]
        run_id = json.loads(done.stdout.strip().splitlines()[-1])["run"]
        second = tmp_path / "second"
        shutil.copytree(first, second)
        shutil.rmtree(first / "models")  # the recorded absolute folder is gone: only the checkout's is left
        report = repro_track.replay(run_id, tracking_uri=uri, project_dir=second, log=False)
        assert (report.expected, report.observed) == ("exact", "exact"), report.reasons
        shutil.rmtree(second / "models")
        gone = repro_track.replay(run_id, tracking_uri=uri, project_dir=second, log=False, dry_run=True)
        assert gone.expected == "none" and any("does not exist here" in r for r in gone.reasons)


class TestAttentionProcessors:
    """The attention processors a pipeline runs are recorded, set again on replay, and a difference named."""

    def test_recorded_restored_and_named(self, model_dir: Path) -> None:
        import copy

        from diffusers import DiffusionPipeline
        from diffusers.models.attention_processor import AttnProcessor

        from repro_track.capture.arguments import pipeline_identity
        from repro_track.replay.child import _restore_attention_processors
        from repro_track.replay.parts import pipeline_differences

        pipe = DiffusionPipeline.from_pretrained(model_dir / "tiny-text2image")
        pipe.unet.set_attn_processor(AttnProcessor())  # a user's choice after loading
        recorded = pipeline_identity(pipe)
        assert recorded["components"]["unet"]["attention_processors"] == [
            "diffusers.models.attention_processor.AttnProcessor"]
        fresh = DiffusionPipeline.from_pretrained(model_dir / "tiny-text2image")
        before = pipeline_identity(fresh)
        m = {"arguments": {"pipe": {"kind": "pipeline", "pipeline": recorded}}}
        named = pipeline_differences(m, {"arguments": {"pipe": {"kind": "pipeline", "pipeline": before}}})
        assert any("component 'unet' attention_processors" in line for line in named)
        _restore_attention_processors(fresh, recorded)
        after = copy.deepcopy(pipeline_identity(fresh))
        assert after["components"]["unet"]["attention_processors"] == recorded["components"]["unet"]["attention_processors"]
