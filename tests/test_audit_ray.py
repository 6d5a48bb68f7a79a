"""`audit --executor ray`: replays as tasks on a Ray instance started here, placed by what each
recording needs, with the same results as the local pool, and failed or dead tasks reported."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import h200_gpu_section, recording_env, run_cli, run_script, write_project

from repro_track import audit_ray

GEN = '''
    import os
    import signal

    import torch

    import repro_track


    @repro_track.record(experiment="ray-audit")
    def make(index: int, *, generator=None):
        """Noise from the generator, shifted by the call's index so runs can be told apart."""
        return torch.randn(8, generator=generator) + index


    @repro_track.record(experiment="ray-faults")
    def crash(index: int, *, generator=None):
        """Kills the process that launched it (in a replay: the Ray worker) when told to."""
        if os.environ.get("REPRO_TEST_KILL_WORKER") == str(index):
            os.kill(os.getppid(), signal.SIGKILL)
            os._exit(1)
        return torch.randn(8, generator=generator) + index
'''

DOOMED = '''
    import torch

    import repro_track


    @repro_track.record(experiment="ray-faults")
    def lost(index: int, *, generator=None):
        """Recorded, then its file is deleted: its replay cannot find it."""
        return torch.randn(4, generator=generator) + index
'''

RECORD_ALL = '''
    import json

    import torch

    import gen
    import repro_track

    ids = {"make": [], "faults": []}
    for i in range(20):
        gen.make(i, generator=torch.Generator().manual_seed(i))
        ids["make"].append(repro_track.last_recording(gen.make).wait(120))
    import doomed  # only now: the `make` recordings' code is gen.py and this file, which both stay

    gen.crash(7, generator=torch.Generator().manual_seed(7))
    ids["faults"].append(repro_track.last_recording(gen.crash).wait(120))
    doomed.lost(3, generator=torch.Generator().manual_seed(3))
    ids["faults"].append(repro_track.last_recording(doomed.lost).wait(120))
    print(json.dumps(ids))
'''

KILL_INDEX = "7"  # the `crash` call whose replay kills its Ray worker


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, _migrated_mlflow_db: Path) -> dict:
    """20 `make` recordings and the two fault recordings, made in one fresh interpreter; then
    doomed.py is deleted from the project (only the fault recordings imported it)."""
    root = tmp_path_factory.mktemp("ray-audit")
    project = write_project(root / "project", {"gen.py": GEN, "doomed.py": DOOMED, "record_all.py": RECORD_ALL})
    shutil.copyfile(_migrated_mlflow_db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = recording_env(uri, root / "spool")
    env.pop("REPRO_TEST_KILL_WORKER", None)
    done = run_script(project / "record_all.py", env=env, cwd=project)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(ids["make"]) and all(ids["faults"]), f"a recording was spooled: {ids}\n{done.stderr[-2000:]}"
    (project / "doomed.py").unlink()
    return {"project": project, "uri": uri, "env": env, "ids": ids}


@pytest.fixture(scope="module")
def ray_address(recorded: dict):
    """A local Ray instance of 2 CPUs, no dashboard, started once for this module and stopped after.

    Its workers inherit REPRO_TEST_KILL_WORKER (set only while Ray starts), so only replays on Ray
    run the worker-killing branch of `crash`.
    """
    # Ray's token authentication, with a token of this test's (not one saved under ~/.ray); Ray reads
    # the mode once, so it is set before Ray is imported.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in auth.items():
            mp.setenv(name, value)
        mp.setenv("REPRO_TEST_KILL_WORKER", KILL_INDEX)
        ray = pytest.importorskip("ray")
        context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                           object_store_memory=200 * 1024 * 1024, _node_ip_address="127.0.0.1")
    recorded["env"] = {**recorded["env"], **auth}
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


def _audit(recorded: dict, experiment: str, *extra: str) -> tuple[int, dict]:
    done = run_cli("audit", experiment, "--json", "--project-dir", str(recorded["project"]), *extra,
                   env=recorded["env"], cwd=recorded["project"])
    assert done.stdout, done.stderr[-3000:]
    return done.returncode, json.loads(done.stdout)


def _audit_run(uri: str, run_id: str, tmp_path: Path) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    table = json.loads(Path(client.download_artifacts(run_id, "repro/audit_table.json", str(tmp_path))).read_text())
    return run, table


@pytest.mark.slow
class TestRayAudit:
    """Replays sent to Ray come back into one audit run, as the local pool's do."""

    def test_twenty_results_identical_to_the_local_pool(self, recorded, ray_address, tmp_path):
        import torch

        code, on_ray = _audit(recorded, "ray-audit", "--executor", "ray", "--address", ray_address)
        assert code == 0, on_ray
        code, local = _audit(recorded, "ray-audit", "--workers", "2")
        assert code == 0, local

        def outcomes(report: dict) -> list:
            return [(r["run_id"], r["expected"], r["observed"], r["ok"], r["error"]) for r in report["runs"]]

        assert outcomes(on_ray) == outcomes(local)
        assert [r["run_id"] for r in on_ray["runs"]] == recorded["ids"]["make"]
        assert on_ray["counts"] == {"exact": {"exact": 20}} and on_ray["rate"] == {"exact": 1.0, "ok": 1.0}
        expected_breakdown = [{"gpu": "none", "torch": torch.__version__, "runs": 20, "exact": 20, "ok": 20,
                               "error": 0}]
        assert on_ray["breakdown"] == local["breakdown"] == expected_breakdown
        assert (on_ray["executor"], local["executor"]) == ("ray", "local")
        for report in (on_ray, local):
            run, table = _audit_run(recorded["uri"], report["audit_run_id"], tmp_path / report["executor"])
            assert run.data.params["executor"] == report["executor"]
            assert run.data.metrics["rate_exact"] == 1.0
            assert "| none | " + torch.__version__ + " | 20 | 20 | 20 | 0 |" in run.data.tags["mlflow.note.content"]
            rows = dict(zip(table["columns"], zip(*table["data"])))
            assert list(rows["run_id"]) == recorded["ids"]["make"]
            assert set(rows["observed"]) == {"exact"} and all(rows["replay_run_id"])

    def test_failed_and_dead_tasks_are_reported_and_the_audit_finishes(self, recorded, ray_address, tmp_path):
        code, report = _audit(recorded, "ray-faults", "--executor", "ray", "--address", ray_address)
        assert code == 1
        crashed, lost = report["runs"]
        assert [crashed["run_id"], lost["run_id"]] == recorded["ids"]["faults"]
        assert (crashed["observed"], crashed["ok"]) == ("error", False)
        assert "Ray worker running this replay died" in crashed["error"], crashed
        assert (lost["observed"], lost["ok"]) == ("error", False)
        assert "doomed.py" in lost["error"], lost
        assert report["counts"] == {"error": {"error": 2}} and report["audit_run_id"]
        run, table = _audit_run(recorded["uri"], report["audit_run_id"], tmp_path)
        assert run.data.metrics["count.error.error"] == 2.0
        assert [e for e in table["data"] if e[table["columns"].index("error")]] and len(table["data"]) == 2


class TestPlacement:
    """Each recording asks Ray for what it used: GPUs and the GPU model for GPU runs, a CPU otherwise."""

    @pytest.mark.parametrize("name,expected", [
        ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"), ("Tesla V100-SXM2-16GB", "V100"),
        ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA L4", "L4"), ("NVIDIA GeForce RTX 4090", "GeForce-RTX-4090"),
    ])
    def test_gpu_names_map_to_the_accelerator_type_ray_advertises(self, name, expected):
        assert audit_ray.accelerator_type(name) == expected
        try:
            from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager
        except ImportError:
            return
        assert NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(name) == expected

    def _manifest(self, generator_device: str, cuda_used: bool) -> dict:
        return {"randomness": {"generators": [{"device": generator_device}]},
                "determinism": {"cuda_used": cuda_used}, "gpu": h200_gpu_section()}

    @pytest.mark.parametrize("device,cuda_used,same_gpu,expected", [
        ("cpu", False, True, audit_ray.Placement()),
        ("cuda:0", True, True, audit_ray.Placement(num_gpus=1, accelerator_type="H200")),
        ("cuda:0", True, False, audit_ray.Placement(num_gpus=1)),
        ("cpu", True, True, audit_ray.Placement(num_gpus=1, accelerator_type="H200")),  # CUDA in the call
    ])
    def test_placement(self, device, cuda_used, same_gpu, expected):
        assert audit_ray.placement(self._manifest(device, cuda_used), same_gpu=same_gpu) == expected

    @pytest.mark.parametrize("cluster,fragment", [
        ({"CPU": 2.0}, "has 0 GPU in all, and this replay needs 1"),
        ({"CPU": 2.0, "GPU": 8.0, "accelerator_type:H100": 1.0}, "no H200 GPU"),
        ({"CPU": 2.0, "GPU": 8.0, "accelerator_type:H200": 1.0}, None),
    ])
    def test_a_replay_no_node_can_run_is_refused_not_left_pending(self, cluster, fragment):
        why = audit_ray.missing(audit_ray.Placement(num_gpus=1, accelerator_type="H200"), cluster)
        assert (why is None) if fragment is None else (fragment in why and "1 GPU (H200)" in why)

    def test_importing_repro_track_does_not_import_ray(self):
        code = "import sys, repro_track, repro_track.audit, repro_track.audit_ray, repro_track.cli; " \
               "sys.exit('ray' in sys.modules)"
        assert subprocess.run([sys.executable, "-c", code]).returncode == 0


class TestWithoutRay:
    """Without Ray installed, `--executor ray` says how to install it, in one line."""

    def test_install_hint(self, migrated_store):
        from mlflow.tracking import MlflowClient

        MlflowClient(migrated_store).create_experiment("empty")
        code = ("import sys; sys.modules['ray'] = None; from repro_track import cli; "
                "sys.exit(cli.main(['audit', 'empty', '--executor', 'ray']))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stdout == "", done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == (
            "repro-track: error: --executor ray needs Ray: pip install 'repro-track[ray]' (or pip install 'ray>=2.9')")
