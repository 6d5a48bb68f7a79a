"""Tests for repro_track.testing: tiny seeded pipelines, how they are built, loaded and run."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from repro_track import testing

HEAVY_MODULES = ("torch", "diffusers", "transformers")
PROMPT = "A photo of an astronaut riding a horse on Mars, 4k -- très jolie! 🚀 #42"


def weight_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every safetensors file under ``folder``, keyed by relative path."""
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*.safetensors"))
    }


def global_rng_states() -> tuple[torch.Tensor, object, np.ndarray]:
    """Snapshot of the torch CPU, Python and NumPy global generators."""
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def run_twice(pipe, seed: int = 0, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Two 5-step generations, each from a fresh CPU generator seeded with ``seed``."""
    return tuple(
        pipe(
            num_inference_steps=5,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
            **kwargs,
        ).images
        for _ in range(2)
    )


def subprocess_env() -> dict[str, str]:
    """The environment with this checkout's ``src`` first on PYTHONPATH."""
    src = str(Path(testing.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def text2image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One text-to-image build shared by the tokenizer tests, which only read it."""
    return testing.build_tiny_text2image(tmp_path_factory.mktemp("shared") / "sd")


@pytest.fixture(scope="module")
def tokenizer(text2image_path: Path):
    """The saved tokenizer, loaded once: hypothesis calls its test many times."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(text2image_path / "tokenizer")


class TestModuleImport:
    """Importing repro_track.testing stays light: no torch, diffusers or transformers."""

    def test_import_pulls_in_no_heavy_modules(self) -> None:
        code = textwrap.dedent(
            f"""
            import sys
            import repro_track
            before = set(sys.modules)
            import repro_track.testing
            heavy = {HEAVY_MODULES!r}
            print(sorted(m for m in set(sys.modules) - before if m.split(".")[0] in heavy))
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, check=True
        )
        assert result.stdout.strip() == "[]"


class TestDefaultModelDir:
    """default_model_dir picks $REPRO_TRACK_MODEL_DIR, then $XDG_CACHE_HOME, then ~/.cache."""

    def test_model_dir_variable_wins(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        monkeypatch.setenv("REPRO_TRACK_MODEL_DIR", str(tmp_path / "models"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert testing.default_model_dir("tiny-ddim") == tmp_path / "models" / "tiny-ddim"

    def test_xdg_cache_home_used_without_model_dir(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.delenv("REPRO_TRACK_MODEL_DIR", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        expected = tmp_path / "xdg" / "repro-track" / "models" / "tiny-ddim"
        assert testing.default_model_dir("tiny-ddim") == expected

    def test_empty_variables_fall_back_to_home_cache(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.setenv("REPRO_TRACK_MODEL_DIR", "")
        monkeypatch.setenv("XDG_CACHE_HOME", "")
        monkeypatch.setenv("HOME", str(tmp_path))
        expected = Path(os.path.expanduser("~")) / ".cache" / "repro-track" / "models" / "x"
        assert testing.default_model_dir("x") == expected

    @pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
    def test_rejects_names_that_are_not_one_folder(self, name: str) -> None:
        with pytest.raises(ValueError):
            testing.default_model_dir(name)


class TestBuildTinyDdim:
    """build_tiny_ddim saves a small, seed-determined DDIMPipeline once, atomically."""

    def test_same_seed_gives_identical_weight_files(self, tmp_path: Path) -> None:
        first = testing.build_tiny_ddim(tmp_path / "a", seed=3)
        second = testing.build_tiny_ddim(tmp_path / "b", seed=3)
        assert weight_hashes(first) and weight_hashes(first) == weight_hashes(second)

    def test_different_seed_gives_different_weight_files(self, tmp_path: Path) -> None:
        first = testing.build_tiny_ddim(tmp_path / "a", seed=0)
        second = testing.build_tiny_ddim(tmp_path / "b", seed=1)
        assert weight_hashes(first) != weight_hashes(second)

    def test_returns_path_holding_a_saved_pipeline(self, tmp_path: Path) -> None:
        path = testing.build_tiny_ddim(str(tmp_path / "ddim"))
        assert path == tmp_path / "ddim"
        assert json.loads((path / "model_index.json").read_text())["_class_name"] == "DDIMPipeline"

    def test_existing_build_is_not_rebuilt(self, tmp_path: Path) -> None:
        path = testing.build_tiny_ddim(tmp_path / "ddim", seed=0)
        stamps = {f: f.stat().st_mtime_ns for f in path.rglob("*") if f.is_file()}
        assert testing.build_tiny_ddim(path, seed=1) == path
        assert {f: f.stat().st_mtime_ns for f in path.rglob("*") if f.is_file()} == stamps

    def test_empty_target_folder_is_filled(self, tmp_path: Path) -> None:
        (tmp_path / "ddim").mkdir()
        assert (testing.build_tiny_ddim(tmp_path / "ddim") / "model_index.json").is_file()

    def test_global_rng_state_unchanged(self, tmp_path: Path) -> None:
        torch.manual_seed(1234)
        random.seed(1234)
        np.random.seed(1234)
        torch_before, python_before, numpy_before = global_rng_states()
        testing.build_tiny_ddim(tmp_path / "ddim", seed=0)
        torch_after, python_after, numpy_after = global_rng_states()
        assert torch.equal(torch_before, torch_after)
        assert python_before == python_after
        assert np.array_equal(numpy_before, numpy_after)

    def test_interrupted_build_leaves_nothing_behind(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from diffusers import DDIMPipeline

        real_save = DDIMPipeline.save_pretrained

        def save_then_crash(self, folder, **kwargs):
            real_save(self, folder, **kwargs)  # leaves a model_index.json, like a late crash
            raise KeyboardInterrupt

        monkeypatch.setattr(DDIMPipeline, "save_pretrained", save_then_crash)
        with pytest.raises(KeyboardInterrupt):
            testing.build_tiny_ddim(tmp_path / "ddim")
        assert list(tmp_path.iterdir()) == []

    def test_refuses_a_folder_that_is_not_a_pipeline(self, tmp_path: Path) -> None:
        (tmp_path / "ddim").mkdir()
        (tmp_path / "ddim" / "notes.txt").write_text("mine")
        with pytest.raises(FileExistsError):
            testing.build_tiny_ddim(tmp_path / "ddim")
        assert (tmp_path / "ddim" / "notes.txt").read_text() == "mine"

    def test_refuses_a_folder_holding_another_pipeline(self, tmp_path: Path) -> None:
        path = testing.build_tiny_text2image(tmp_path / "model")
        with pytest.raises(FileExistsError, match="StableDiffusionPipeline"):
            testing.build_tiny_ddim(path)


class TestBuildTinyText2Image:
    """build_tiny_text2image saves a small, seed-determined StableDiffusionPipeline once."""

    def test_same_seed_gives_identical_weight_files(self, tmp_path: Path) -> None:
        first = testing.build_tiny_text2image(tmp_path / "a", seed=3)
        second = testing.build_tiny_text2image(tmp_path / "b", seed=3)
        hashes = weight_hashes(first)
        assert {p.split("/")[0] for p in hashes} == {"unet", "vae", "text_encoder"}
        assert hashes == weight_hashes(second)

    def test_different_seed_gives_different_weight_files(self, tmp_path: Path) -> None:
        first = weight_hashes(testing.build_tiny_text2image(tmp_path / "a", seed=0))
        second = weight_hashes(testing.build_tiny_text2image(tmp_path / "b", seed=1))
        assert all(first[name] != second[name] for name in first)

    def test_existing_build_is_not_rebuilt(self, tmp_path: Path) -> None:
        path = testing.build_tiny_text2image(tmp_path / "sd", seed=0)
        stamps = {f: f.stat().st_mtime_ns for f in path.rglob("*") if f.is_file()}
        assert testing.build_tiny_text2image(path, seed=1) == path
        assert {f: f.stat().st_mtime_ns for f in path.rglob("*") if f.is_file()} == stamps

    def test_global_rng_state_unchanged(self, tmp_path: Path) -> None:
        torch.manual_seed(99)
        before = global_rng_states()
        testing.build_tiny_text2image(tmp_path / "sd", seed=0)
        after = global_rng_states()
        assert torch.equal(before[0], after[0])
        assert before[1] == after[1]
        assert np.array_equal(before[2], after[2])

    def test_builds_in_a_fresh_interpreter_match(self, tmp_path: Path) -> None:
        code = textwrap.dedent(
            f"""
            from repro_track import testing
            testing.build_tiny_ddim({str(tmp_path / "ddim-sub")!r}, seed=5)
            testing.build_tiny_text2image({str(tmp_path / "sd-sub")!r}, seed=5)
            """
        )
        subprocess.run([sys.executable, "-c", code], env=subprocess_env(), check=True, capture_output=True)
        ddim = testing.build_tiny_ddim(tmp_path / "ddim", seed=5)
        sd = testing.build_tiny_text2image(tmp_path / "sd", seed=5)
        assert weight_hashes(ddim) == weight_hashes(tmp_path / "ddim-sub")
        assert weight_hashes(sd) == weight_hashes(tmp_path / "sd-sub")

    def test_tokenizer_splits_a_prompt_into_known_tokens(self, tokenizer) -> None:
        ids = tokenizer(PROMPT).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        # unk is <|endoftext|>, so a byte missing from the vocabulary would show up as eos inside
        assert tokenizer.eos_token_id not in ids[1:-1]
        assert "photo</w>" in tokenizer.convert_ids_to_tokens(ids)
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(decoded.split()) == "".join(PROMPT.lower().split())

    @settings(max_examples=50, deadline=None)
    @given(prompt=st.text(max_size=60))
    def test_tokenizer_accepts_any_text(self, tokenizer, prompt: str) -> None:
        ids = tokenizer(prompt, padding="max_length", truncation=True).input_ids
        assert len(ids) == tokenizer.model_max_length == 77
        assert all(0 <= i < len(tokenizer) for i in ids)


class TestLoadPipeline:
    """load_pipeline loads a saved pipeline whose seeded runs are bit-identical."""

    def test_ddim_seeded_runs_are_bit_identical(self, tmp_path: Path) -> None:
        pipe = testing.load_pipeline(str(testing.build_tiny_ddim(tmp_path / "ddim")), progress=False)
        assert type(pipe).__name__ == "DDIMPipeline"
        first, second = run_twice(pipe)
        assert first.shape == (1, 16, 16, 3)
        assert np.array_equal(first, second)
        assert not np.array_equal(first, run_twice(pipe, seed=1)[0])

    def test_text2image_seeded_runs_are_bit_identical(self, tmp_path: Path) -> None:
        pipe = testing.load_pipeline(testing.build_tiny_text2image(tmp_path / "sd"), progress=False)
        assert type(pipe).__name__ == "StableDiffusionPipeline"
        first, second = run_twice(pipe, prompt=PROMPT)
        assert first.shape == (1, 32, 32, 3)
        assert np.array_equal(first, second)
        assert not np.array_equal(first, run_twice(pipe, seed=0, prompt="a red cat")[0])

    def test_pipeline_is_on_requested_device(self, tmp_path: Path) -> None:
        pipe = testing.load_pipeline(testing.build_tiny_ddim(tmp_path / "ddim"), device="cpu")
        assert pipe.device == torch.device("cpu")

    def test_progress_bar_left_on_by_default(self, tmp_path: Path) -> None:
        pipe = testing.load_pipeline(testing.build_tiny_ddim(tmp_path / "ddim"))
        assert not getattr(pipe, "_progress_bar_config", {}).get("disable", False)

    def test_progress_false_disables_the_bar(self, tmp_path: Path) -> None:
        pipe = testing.load_pipeline(testing.build_tiny_ddim(tmp_path / "ddim"), progress=False)
        assert pipe._progress_bar_config.get("disable") is True
