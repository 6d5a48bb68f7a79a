"""Diffusers pipeline families, loaded by hub id from a Hugging Face cache, replay bit for bit.

Every family is built from a tiny config with seeded weights, saved into a folder laid out like the
Hugging Face cache (``models--org--name/snapshots/<commit>``, ``refs/main``) and loaded by repo id
with ``HF_HUB_OFFLINE=1``. Half the cases swap the scheduler in memory, one loads a LoRA adapter,
the image-conditioned ones take PIL images, one asks for latents and one loads a bf16 variant.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import recording_env, run_script, write_project

COMMIT = "c0ffee" + "0" * 34

PROJECT = '''
    """One recorded entry point for every family: the pipeline and its call arguments."""
    import repro_track


    @repro_track.record(experiment="matrix")
    def generate(pipe, *, generator=None, **call):
        pipe.set_progress_bar_config(disable=True)
        return pipe(generator=generator, num_inference_steps=2, **call).images
'''

RECORD = '''
    """Record one call per family; print {case: run id}."""
    import json
    import sys

    import numpy as np
    import torch
    from PIL import Image
    from diffusers import (DDIMScheduler, DiffusionPipeline, EulerDiscreteScheduler,
                           StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline)

    import gen
    import repro_track

    CASES = sys.argv[1].split(",")
    LORA = sys.argv[2]
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB")
    mask = Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 3 == 0).astype(np.uint8) * 255, "L")
    text = {"prompt": "a red cat", "height": 32, "width": 32}


    def euler(pipe):
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        return pipe


    def load(repo, cls=DiffusionPipeline, **kw):
        return cls.from_pretrained(repo, **kw)


    def case(name):
        if name == "ddim":
            pipe = load("tiny/ddim")
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
            return pipe, {"output_type": "np"}
        if name == "text2image-lora":
            pipe = euler(load("tiny/sd"))
            pipe.load_lora_weights(LORA, adapter_name="style")
            pipe.set_adapters(["style"], [0.7])
            return pipe, {**text, "output_type": "np"}
        if name == "img2img-pil":
            return euler(load("tiny/sd", StableDiffusionImg2ImgPipeline)), {
                "prompt": "a red cat", "image": rgb, "strength": 0.9, "output_type": "np"}
        if name == "inpaint-pil":
            return load("tiny/sd", StableDiffusionInpaintPipeline), {
                **text, "image": rgb, "mask_image": mask, "strength": 1.0, "output_type": "np"}
        if name == "sdxl":
            return euler(load("tiny/sdxl")), {**text, "output_type": "np"}
        if name == "controlnet":
            return load("tiny/controlnet"), {**text, "image": rgb, "output_type": "np"}
        if name == "pixart":
            return euler(load("tiny/pixart")), {
                "prompt": "a red cat", "height": 16, "width": 16, "clean_caption": False,
                "max_sequence_length": 16, "use_resolution_binning": False, "output_type": "np"}
        if name == "latent":
            return euler(load("tiny/sd")), {**text, "output_type": "latent"}
        if name == "bf16-variant":
            return load("tiny/sd-bf16", variant="bf16", torch_dtype=torch.bfloat16), {**text, "output_type": "pt"}
        raise ValueError(name)


    runs = {}
    for name in CASES:
        pipe, call = case(name)
        gen.generate(pipe, generator=torch.Generator().manual_seed(7), **call)
        runs[name] = repro_track.last_recording(gen.generate).wait(timeout=300)
    print(json.dumps(runs))
'''

CASES = ["ddim", "text2image-lora", "img2img-pil", "inpaint-pil", "sdxl", "controlnet", "pixart", "latent",
         "bf16-variant"]


def _into_cache(hub: Path, repo_id: str, folder: Path) -> None:
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)


def _bf16_variant(source: Path, target: Path) -> Path:
    """The tiny SD pipeline saved again in bfloat16 as the "bf16" variant (file names *.bf16.safetensors)."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=torch.bfloat16)
    pipe.save_pretrained(target, variant="bf16", safe_serialization=True)
    return target


def _lora(sd: Path, target: Path) -> Path:
    """A LoRA adapter for the tiny SD UNet's attention, with seeded non-zero weights, saved with
    diffusers' own ``save_lora_weights``."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(sd)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        for name, param in pipe.unet.named_parameters():
            if "lora_" in name:
                param.data = torch.randn_like(param) * 0.1
    StableDiffusionPipeline.save_lora_weights(target, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              safe_serialization=True)
    return target


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """All families in one Hugging Face cache, recorded in one fresh interpreter."""
    from repro_track import testing

    root = tmp_path_factory.mktemp("matrix")
    hub = root / "hf" / "hub"
    built = root / "built"
    _into_cache(hub, "tiny/ddim", testing.build_tiny_ddim(built / "ddim"))
    sd = testing.build_tiny_text2image(built / "sd")
    _into_cache(hub, "tiny/sd", sd)
    _into_cache(hub, "tiny/sd-bf16", _bf16_variant(sd, built / "sd-bf16"))
    _into_cache(hub, "tiny/sdxl", testing.build_tiny_sdxl(built / "sdxl"))
    _into_cache(hub, "tiny/controlnet", testing.build_tiny_controlnet(built / "controlnet"))
    _into_cache(hub, "tiny/pixart", testing.build_tiny_pixart(built / "pixart"))
    project = write_project(root / "proj", {"gen.py": PROJECT, "record.py": RECORD})
    lora = _lora(sd, project / "lora")
    uri = f"sqlite:///{root / 'matrix.db'}"
    env = recording_env(uri, root / "spool", HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    done = run_script(project / "record.py", ",".join(CASES), str(lora), env=env, cwd=project)
    assert done.returncode == 0, done.stderr[-4000:]
    return {"runs": json.loads(done.stdout.strip().splitlines()[-1]), "uri": uri, "project": project,
            "hub": hub}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_family_replays_exactly(matrix: dict, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Record, replay: expected exact, observed exact, with every output compared."""
    import repro_track

    monkeypatch.setenv("HF_HUB_CACHE", str(matrix["hub"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = repro_track.replay(matrix["runs"][case], tracking_uri=matrix["uri"], project_dir=matrix["project"],
                                log=False)
    assert (report.expected, report.observed) == ("exact", "exact"), report.reasons
    assert report.outputs and all(c.max_abs_diff == 0 for c in report.outputs.values())


@pytest.mark.slow
def test_lora_adapter_is_recorded_with_its_source(matrix: dict, tmp_path: Path) -> None:
    """The LoRA case's pipeline names its adapter, where it came from, and the weight it was set to."""
    from repro_track import runs, store

    m = runs.load_run(store.client_for(matrix["uri"]), matrix["runs"]["text2image-lora"], tmp_path).manifest
    identity = m.arguments["pipe"]["pipeline"]
    [adapter] = identity["adapters"]
    assert (adapter["name"], adapter["source"], adapter["active"]) == ("style", str(matrix["project"] / "lora"), True)
    assert identity["adapter_weights"] == {"names": ["style"], "weights": [0.7]}
    assert (identity["repo_id"], identity["revision"]) == ("tiny/sd", COMMIT)
