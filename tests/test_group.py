"""`parent_run`: a loop of recorded calls nests under one MLflow run, without MLflow's active run."""

from __future__ import annotations

import mlflow
import pytest
import torch

import repro_track


@repro_track.record
def make(index: int):
    """A tiny output per index."""
    return torch.full((2,), float(index))


class TestParentRun:
    """Calls inside the block become children of one parent run in the parent's experiment."""

    def test_children_nest(self, migrated_store, client):
        with repro_track.parent_run("sweep", experiment="sweeps") as parent:
            assert mlflow.active_run() is None  # the caller's MLflow state is untouched
            ids = []
            for i in range(5):
                make(i)
                ids.append(repro_track.last_recording(make).wait(120))
        runs = {r.info.run_id: r for r in client.search_runs([parent.experiment_id])}
        assert set(ids) <= set(runs) and len(runs) == 6
        assert all(runs[i].data.tags["mlflow.parentRunId"] == parent.run_id for i in ids)
        assert runs[parent.run_id].info.status == "FINISHED"
        assert runs[parent.run_id].data.tags["repro.kind"] == "group"

    def test_failed_block_marks_parent_failed(self, migrated_store, client):
        with pytest.raises(RuntimeError):
            with repro_track.parent_run("broken", experiment="sweeps") as parent:
                raise RuntimeError("stop")
        assert client.get_run(parent.run_id).info.status == "FAILED"

    def test_outside_the_block_no_parent(self, migrated_store, client):
        with repro_track.parent_run("sweep", experiment="sweeps"):
            pass
        make(7)
        run = client.get_run(repro_track.last_recording(make).wait(120))
        assert "mlflow.parentRunId" not in run.data.tags
