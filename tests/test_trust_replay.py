"""A replay runs nothing a manifest chooses: crafted runs (edited manifest, digest recomputed).

Each attack is what a user of a shared tracking server could log: a copy of a real recorded run whose
manifest was edited and whose ``manifest_digest`` was recomputed with ``manifest.digest_of``.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import clone_run

from repro_track import cli
from repro_track.capture import envvars
from repro_track.errors import ReproTrackError, UntrustedManifestError
from repro_track.replay import replay


def run_cli(capfd: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """The CLI's main() in this process: (exit code, stdout, stderr)."""
    capfd.readouterr()
    code = cli.main(list(args))
    out, err = capfd.readouterr()
    return code, out, err


def with_env(**captured: str) -> Callable[[dict], None]:
    """A manifest edit that adds variables to the recorded environment."""
    def edit(m: dict) -> None:
        m["env_vars"]["captured"].update(captured)
    return edit


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """(a folder whose sitecustomize.py writes a marker file when Python starts, that marker)."""
    marker = tmp_path / "planted-code-ran"
    folder = tmp_path / "planted"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n", "utf-8")
    return folder, marker


class TestPlantedLoaderVariables:
    """A manifest carrying a loader, interpreter or path variable is refused with exit 2, unrun."""

    @pytest.mark.slow
    @pytest.mark.parametrize("extra", [
        pytest.param({}, id="pythonpath-alone"),
        pytest.param({"LD_PRELOAD": "evil.so"}, id="pythonpath-and-ld-preload"),
        pytest.param({"PYTHONSTARTUP": "evil.py"}, id="pythonpath-and-pythonstartup"),
    ])
    def test_replay_refuses_and_the_planted_code_never_runs(self, recorded_project, tmp_path, capfd,
                                                             planted, extra):
        folder, marker = planted
        extra = {name: str(folder / file) for name, file in extra.items()}  # files in the planted folder
        run_id = clone_run(recorded_project, recorded_project.runs["cpu_generator"], tmp_path,
                           with_env(PYTHONPATH=str(folder), **extra))
        code, out, err = run_cli(capfd, "replay", "--json", run_id, "--tracking-uri", recorded_project.tracking_uri,
                                 "--project-dir", str(recorded_project.path), "--no-log")
        assert code == 2
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "PYTHONPATH" in err and all(name in err for name in extra)
        assert not marker.exists()
        assert recorded_project.replays_of(run_id) == []

    @pytest.mark.parametrize("name, value", [
        ("LD_PRELOAD", "evil.so"), ("LD_LIBRARY_PATH", "."), ("DYLD_INSERT_LIBRARIES", "x"),
        ("PYTHONHOME", "."), ("PYTHONSTARTUP", "x.py"), ("PATH", "."),
        ("https_proxy", "http://evil:3128"), ("BASH_ENV", "x.sh"),
    ])
    def test_api_raises_naming_the_variable(self, recorded_project, tmp_path, name, value):
        value = value if "://" in value else str(tmp_path / value)  # a planted file or folder
        run_id = clone_run(recorded_project, recorded_project.runs["cpu_generator"], tmp_path,
                           with_env(**{name: value}))
        with pytest.raises(UntrustedManifestError, match=name) as caught:
            replay(run_id, tracking_uri=recorded_project.tracking_uri, project_dir=recorded_project.path,
                   dry_run=True)
        assert isinstance(caught.value, ReproTrackError) and caught.value.item == name

    @pytest.mark.parametrize("value", ["1\n2", "\x1b[2J", "x" * 5000])
    def test_a_value_no_recording_holds_is_refused(self, recorded_project, tmp_path, value):
        run_id = clone_run(recorded_project, recorded_project.runs["cpu_generator"], tmp_path,
                           with_env(OMP_NUM_THREADS=value))
        with pytest.raises(UntrustedManifestError, match="OMP_NUM_THREADS"):
            replay(run_id, tracking_uri=recorded_project.tracking_uri, project_dir=recorded_project.path,
                   dry_run=True)

    @pytest.mark.parametrize("where", ["redacted", "dropped"])
    def test_a_planted_name_in_the_redacted_lists_is_refused_too(self, recorded_project, tmp_path, where):
        def edit(m: dict) -> None:
            m["env_vars"][where].append("LD_PRELOAD")

        run_id = clone_run(recorded_project, recorded_project.runs["cpu_generator"], tmp_path, edit)
        with pytest.raises(UntrustedManifestError, match="LD_PRELOAD"):
            replay(run_id, tracking_uri=recorded_project.tracking_uri, project_dir=recorded_project.path,
                   dry_run=True)


class TestMachineLocalVariables:
    """Variables that describe the recording machine are shown, never imposed; bit-deciding ones are."""

    @pytest.fixture
    def plan(self, recorded_project, tmp_path, monkeypatch) -> Any:
        run_id = clone_run(recorded_project, recorded_project.runs["cpu_generator"], tmp_path, with_env(
            CUDA_VISIBLE_DEVICES="7", HF_ENDPOINT="https://hub.recording.example", HF_HOME="/recorder/hf",
            TORCHINDUCTOR_CACHE_DIR="/recorder/inductor", OMP_TOOL_LIBRARIES="/recorder/libtool.so",
            CUDA_INJECTION64_PATH="/recorder/inject.so", PYTHONHASHSEED="4242", OMP_NUM_THREADS="3"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_ENDPOINT", "https://mirror.here.example")
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
        monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
        return replay(run_id, tracking_uri=recorded_project.tracking_uri,
                      project_dir=recorded_project.path, dry_run=True)

    @pytest.mark.parametrize("line", [
        "set CUDA_VISIBLE_DEVICES=7", "unset CUDA_VISIBLE_DEVICES", "set HF_ENDPOINT=https://hub.recording.example",
        "unset HF_ENDPOINT", "unset HF_HUB_OFFLINE", "set HF_HOME=/recorder/hf",
        "set TORCHINDUCTOR_CACHE_DIR=/recorder/inductor", "set OMP_TOOL_LIBRARIES=/recorder/libtool.so",
        "set CUDA_INJECTION64_PATH=/recorder/inject.so",
    ])
    def test_this_machines_values_are_left_alone(self, plan, line):
        assert line not in plan.plan

    @pytest.mark.parametrize("line", [
        "set PYTHONHASHSEED=4242", "set OMP_NUM_THREADS=3", "unset MKL_ENABLE_INSTRUCTIONS",
    ])
    def test_bit_deciding_variables_are_restored(self, plan, line):
        assert line in plan.plan

    def test_the_plan_names_what_it_kept(self, plan):
        kept = [line for line in plan.plan if line.startswith("keep this machine's ")]
        assert len(kept) == 1
        assert all(name in kept[0] for name in ("CUDA_VISIBLE_DEVICES", "HF_ENDPOINT"))

    def test_the_prediction_ignores_machine_local_differences(self, plan):
        env_reasons = [r for r in plan.reasons if r.startswith("environment variables differ")]
        assert env_reasons and "PYTHONHASHSEED" in env_reasons[0]
        assert "CUDA_VISIBLE_DEVICES" not in env_reasons[0] and "HF_ENDPOINT" not in env_reasons[0]
        assert plan.expected == "exact", plan.reasons


class TestVariableClasses:
    """Which recorded variables a replay restores."""

    @pytest.mark.parametrize("name", [
        "PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_AFFINITY",
        "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ATEN_CPU_CAPABILITY",
        "NVIDIA_TF32_OVERRIDE", "OPENBLAS_NUM_THREADS", "TF_ENABLE_ONEDNN_OPTS",
    ])
    def test_bit_deciding(self, name):
        assert envvars.is_bit_deciding(name) and envvars.is_recordable(name)

    @pytest.mark.parametrize("name", [
        "CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR",
        "OMP_TOOL_LIBRARIES", "CUDA_INJECTION64_PATH", "CUBLASLT_LOG_FILE", "CUDNN_LOGDEST_DBG",
        "TORCH_EXTENSIONS_DIR", "DIFFUSERS_DISABLE_REMOTE_CODE",
    ])
    def test_machine_local(self, name):
        assert not envvars.is_bit_deciding(name) and envvars.is_recordable(name)

    @pytest.mark.parametrize("name", ["LD_PRELOAD", "PYTHONPATH", "PYTHONHOME", "PATH", "http_proxy",
                                      "DYLD_LIBRARY_PATH", "PYTHONSTARTUP"])
    def test_never_recorded(self, name):
        assert not envvars.is_recordable(name) and not envvars.is_bit_deciding(name)


def with_pipeline(**fields: Any) -> Callable[[dict], None]:
    """A manifest edit that changes the recorded pipeline identity of argument ``pipe``."""
    def edit(m: dict) -> None:
        m["arguments"]["pipe"]["pipeline"].update(fields)
    return edit


class TestPipelineIdentity:
    """A recorded pipeline names a diffusers pipeline class and a hub id or a folder, nothing else."""

    def test_the_recorded_pipeline_is_accepted(self, recorded_project, capfd):
        code, out, err = run_cli(capfd, "replay", "--json", recorded_project.runs["pipeline_argument"], "--dry-run",
                                 "--tracking-uri", recorded_project.tracking_uri,
                                 "--project-dir", str(recorded_project.path))
        assert code == 0, err
        assert any("DDIMPipeline.from_pretrained(" in line for line in json.loads(out)["plan"])

    @pytest.mark.parametrize("fields, named", [
        pytest.param({"class": "os.system"}, "os.system", id="os-system"),
        pytest.param({"class": "subprocess.Popen"}, "subprocess.Popen", id="subprocess-popen"),
        pytest.param({"class": "builtins.eval"}, "builtins.eval", id="builtins-eval"),
        pytest.param({"class": "diffusers.utils.torch_utils.randn_tensor"}, "randn_tensor",
                     id="diffusers-function-not-a-pipeline"),
        pytest.param({"class": "diffusers.DDIMScheduler"}, "DDIMScheduler", id="diffusers-class-not-a-pipeline"),
        pytest.param({"class": "gen.weights"}, "gen.weights", id="project-function-not-a-class"),
        pytest.param({"name_or_path": "https://evil.example/model"}, "https://evil.example/model",
                     id="url"),
        pytest.param({"name_or_path": "../../no/such/folder"}, "../../no/such/folder", id="missing-folder"),
        pytest.param({"revision": "main; rm -rf /"}, "main; rm -rf /", id="revision"),
        pytest.param({"dtype": "load"}, "load", id="dtype-names-torch-load"),
        pytest.param({"device": "cuda:0 && touch x"}, "cuda:0 && touch x", id="device"),
    ])
    def test_anything_else_is_refused(self, recorded_project, tmp_path, capfd, fields, named):
        run_id = clone_run(recorded_project, recorded_project.runs["pipeline_argument"], tmp_path,
                           with_pipeline(**fields))
        code, out, err = run_cli(capfd, "replay", "--json", run_id, "--dry-run", "--tracking-uri",
                                 recorded_project.tracking_uri, "--project-dir", str(recorded_project.path))
        assert code == 2
        assert err.count("\n") == 1 and "Traceback" not in err
        assert named in err and out == ""

    @pytest.mark.parametrize("named", ["DDIMScheduler", "randn_tensor"])
    def test_a_replay_checks_the_class_in_its_child_before_loading(self, recorded_project, tmp_path, capfd, named):
        # A replay (not a dry run) leaves importing diffusers to its child, which refuses the class in
        # the same one line before any from_pretrained.
        dotted = {"DDIMScheduler": "diffusers.DDIMScheduler",
                  "randn_tensor": "diffusers.utils.torch_utils.randn_tensor"}[named]
        run_id = clone_run(recorded_project, recorded_project.runs["pipeline_argument"], tmp_path,
                           with_pipeline(**{"class": dotted}))
        code, out, err = run_cli(capfd, "replay", "--json", run_id, "--no-log", "--tracking-uri",
                                 recorded_project.tracking_uri, "--project-dir", str(recorded_project.path))
        assert code == 2, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("repro-track: error: ") and named in last and "not a diffusers pipeline" in last
        assert "Traceback" not in err and out == ""

    def test_a_class_defined_in_the_project_is_accepted(self, recorded_project, tmp_path, capfd):
        (recorded_project.path / "project_pipes.py").write_text(textwrap.dedent('''
            from diffusers import DDIMPipeline


            class ProjectPipeline(DDIMPipeline):
                """A pipeline class of the project."""
        '''), "utf-8")
        run_id = clone_run(recorded_project, recorded_project.runs["pipeline_argument"], tmp_path,
                           with_pipeline(**{"class": "project_pipes.ProjectPipeline"}))
        code, out, err = run_cli(capfd, "replay", "--json", run_id, "--dry-run", "--tracking-uri",
                                 recorded_project.tracking_uri, "--project-dir", str(recorded_project.path))
        assert code == 0, err
        assert any("ProjectPipeline.from_pretrained(" in line for line in json.loads(out)["plan"])

    @pytest.mark.slow
    def test_custom_code_in_a_model_folder_never_runs(self, recorded_project, model_dir, tmp_path, capfd):
        """A folder whose model_index.json names a custom pipeline file: diffusers would run it only
        with trust_remote_code, which a replay never passes."""
        marker = tmp_path / "custom-pipeline-ran"
        folder = tmp_path / "tiny-ddim-with-code"
        shutil.copytree(model_dir / "tiny-ddim", folder)
        index = json.loads((folder / "model_index.json").read_text("utf-8"))
        index["_class_name"] = ["evil_pipeline", "EvilPipeline"]
        (folder / "model_index.json").write_text(json.dumps(index), "utf-8")
        (folder / "evil_pipeline.py").write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
            "from diffusers import DDIMPipeline\n\n\nclass EvilPipeline(DDIMPipeline):\n    pass\n", "utf-8")
        run_id = clone_run(recorded_project, recorded_project.runs["pipeline_argument"], tmp_path,
                           with_pipeline(name_or_path=str(folder)))
        code, out, err = run_cli(capfd, "replay", "--json", run_id, "--no-log", "--tracking-uri",
                                 recorded_project.tracking_uri, "--project-dir", str(recorded_project.path))
        assert code == 2, err
        assert "custom code" in err.splitlines()[-1]
        assert not marker.exists()
