"""Tests for repro_track.autolog(): every diffusers pipeline call recorded, and replayed without source."""

from __future__ import annotations

import importlib
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from conftest import RecordedProject, clone_run, run_git

import repro_track
from repro_track import runs, store
from repro_track.errors import EntryPointRefused

# A notebook cell: run through exec, so nothing it defines has a source file.
CELL = '''
import torch
import repro_track
from repro_track import testing

repro_track.autolog(experiment="autolog")
pipe = testing.load_pipeline(MODEL, progress=False)
images = pipe(num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="np").images
outcome = repro_track.last_recording(pipe.__call__)
'''


@pytest.fixture(autouse=True)
def _autolog_off():
    """autolog is process-wide: every test leaves it off."""
    yield
    repro_track.autolog(disable=True)


@pytest.fixture
def ddim(model_dir: Path):
    from repro_track import testing

    return testing.load_pipeline(model_dir / "tiny-ddim", progress=False)


def run_cell(model: Path) -> dict:
    namespace = {"MODEL": str(model)}
    exec(compile(CELL, "<cell>", "exec"), namespace)
    return namespace


def all_runs(uri: str) -> list:
    client = store.client_for(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


class TestRecording:
    """A plain pipeline call is recorded once, with its pipeline class as the entry point."""

    def test_cell_run_by_exec_is_recorded(self, tracking_uri, model_dir, tmp_path):
        outcome = run_cell(model_dir / "tiny-ddim")["outcome"]
        run_id = outcome.wait(120)
        assert run_id, outcome.error
        m = runs.load_run(store.client_for(tracking_uri), run_id, tmp_path / "dl").manifest
        assert (m.call["entry"], m.call["module"], m.call["qualname"], m.call["source_file"]) == (
            "pipeline_call", "diffusers.pipelines.ddim.pipeline_ddim", "DDIMPipeline.__call__", None)
        assert m.arguments["pipeline"]["kind"] == "pipeline"
        assert m.arguments["pipeline"]["parameter"] == "positional_only"
        assert m.arguments["num_inference_steps"]["value"] == 3
        assert m.randomness["primary"]["seed"] == 5
        assert [s["step"] for s in m.trajectory] == [0, 1, 2, 3]
        assert [o["name"] for o in m.outputs] == ["images"]

    def test_git_answering_late_leaves_the_code_section_alone(self, tracking_uri, model_dir, tmp_path,
                                                               monkeypatch):
        """The code that ran is diffusers': git's answer after the call fills the git section only."""
        import threading

        from repro_track.capture import git

        capture_git, release = git.capture_git, threading.Event()

        def held(path):
            release.wait(60)
            return capture_git(path)

        monkeypatch.setattr(git, "capture_git", held)
        # The cell has no file: git is read where it runs, a repository of its own here (not this
        # project's folder, where MLflow would also put the new experiment's ./mlruns).
        notebook = tmp_path / "notebook"
        notebook.mkdir()
        (notebook / "analysis.txt").write_text("notes\n")
        for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "x"]):
            run_git(notebook, *args)
        monkeypatch.chdir(notebook)
        outcome = run_cell(model_dir / "tiny-ddim")["outcome"]
        release.set()
        run_id = outcome.wait(120)
        assert run_id, outcome.error
        m = runs.load_run(store.client_for(tracking_uri), run_id, tmp_path / "dl").manifest
        assert m.git["available"] and m.git["commit"]  # this test file's repository, answered late
        assert m.code["commit"] is None and m.code["diff_sha256"] is None

    def test_disabled_records_nothing(self, tracking_uri, ddim, tmp_path):
        repro_track.autolog()
        repro_track.autolog(disable=True)  # the wrappers stay installed and call straight through
        ddim(num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np")
        assert repro_track.last_recording(type(ddim).__call__) is None
        repro_track.flush(60)
        assert all_runs(tracking_uri) == []
        assert not (tmp_path / "spool").exists() or not any((tmp_path / "spool").iterdir())

    def test_record_function_calling_a_pipeline_gives_one_run(self, tracking_uri, ddim, tmp_path, monkeypatch):
        repro_track.autolog()
        name = f"autolog_user_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent('''
            import repro_track


            @repro_track.record(experiment="autolog")
            def generate(pipe, *, generator=None):
                return pipe(num_inference_steps=2, generator=generator, output_type="np").images
        '''), "utf-8")
        monkeypatch.syspath_prepend(str(tmp_path))
        module = importlib.import_module(name)
        module.generate(ddim, generator=torch.Generator().manual_seed(2))
        run_id = repro_track.last_recording(module.generate).wait(120)
        repro_track.flush(60)
        assert [r.info.run_id for r in all_runs(tracking_uri)] == [run_id]
        m = runs.load_run(store.client_for(tracking_uri), run_id, tmp_path / "dl").manifest
        assert m.call["qualname"] == "generate" and "entry" not in m.call
        assert [s["step"] for s in m.trajectory] == [0, 1, 2]  # the inner call's steps, noted once

    @pytest.mark.parametrize("exclusive", [False, True], ids=["nested", "exclusive"])
    def test_active_mlflow_run(self, tracking_uri, ddim, exclusive):
        import mlflow

        repro_track.autolog(exclusive=exclusive)
        with mlflow.start_run() as parent:  # on MLFLOW_TRACKING_URI, which the fixture set
            ddim(num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np")
            outcome = repro_track.last_recording(ddim.__call__)
        if exclusive:
            assert outcome is None
            return
        run = store.client_for(tracking_uri).get_run(outcome.wait(120))
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id


class TestReplay:
    """An autologged call replays from the pipeline's identity alone; a manifest naming another class
    as a pipeline call is refused before anything runs."""

    @pytest.mark.slow
    def test_cell_replays_exactly(self, tracking_uri, model_dir, tmp_path):
        run_id = run_cell(model_dir / "tiny-ddim")["outcome"].wait(120)
        report = repro_track.replay(run_id, project_dir=tmp_path / "elsewhere-no-source", log=False)
        assert (report.expected, report.observed) == ("exact", "exact"), report.reasons
        assert report.outputs["images"].bitwise_equal

    @pytest.mark.slow
    def test_every_step_kept_and_compared(self, tracking_uri, ddim, tmp_path):
        repro_track.autolog(log_every_step=True)
        ddim(num_inference_steps=2, generator=torch.Generator().manual_seed(6), output_type="np")
        run_id = repro_track.last_recording(ddim.__call__).wait(120)
        report = repro_track.replay(run_id, project_dir=tmp_path, log=False)
        assert sorted(report.outputs) == ["images", "step_latents.0.000", "step_latents.0.001",
                                          "step_latents.0.002"]
        assert report.observed == "exact"
        assert all(c.bitwise_equal for c in report.outputs.values())

    @pytest.mark.parametrize("module, qualname", [
        ("os", "system.__call__"),
        ("diffusers.utils", "load_image.__call__"),
        ("diffusers.pipelines.ddim.pipeline_ddim", "DDIMPipeline.from_pretrained"),
    ], ids=["not-diffusers", "not-a-pipeline", "not-the-call"])
    def test_edited_entry_is_refused(self, tracking_uri, model_dir, tmp_path, module, qualname):
        run_id = run_cell(model_dir / "tiny-ddim")["outcome"].wait(120)
        project = RecordedProject(tmp_path, tracking_uri, {})

        def edit(data: dict) -> None:
            data["call"].update(module=module, qualname=qualname)

        forged = clone_run(project, run_id, tmp_path, edit)  # digest recomputed, as an attacker would
        with pytest.raises(EntryPointRefused, match="pipeline"):
            repro_track.replay(forged, project_dir=tmp_path, log=False)
