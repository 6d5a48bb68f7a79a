"""Testing helpers: tiny, seeded diffusers pipelines that need no network.

The builders here make pipelines small enough to run in well under a second on a
laptop CPU, from configs and seeded random weights, and save them with
``save_pretrained`` so they load back with ``DiffusionPipeline.from_pretrained``
exactly like a hub model. The examples use them when no model id is given, and
the test suite uses them everywhere.

Building is deterministic (one seed, one set of bytes) and leaves every global
random number generator as it found it, so a build between two seeded
generations cannot change what the second one produces.

This module imports only the standard library at import time; torch, diffusers
and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from transformers import CLIPTokenizer

__all__ = [
    "build_tiny_controlnet",
    "build_tiny_ddim",
    "build_tiny_pixart",
    "build_tiny_sdxl",
    "build_tiny_text2image",
    "build_wheel",
    "default_model_dir",
    "load_pipeline",
]

_MODEL_INDEX = "model_index.json"

# Longest prompt in tokens; 77 is what real CLIP tokenizers use, and the text
# encoder is so small that the full length costs nothing.
_MAX_PROMPT_TOKENS = 77

# Words whose left-to-right BPE merges go into the tiny vocabulary, so prompts are
# split into real multi-character pieces rather than only into single bytes.
_MERGE_WORDS = (
    "the", "and", "of", "in", "on", "with", "photo", "painting", "cat", "dog",
    "astronaut", "riding", "horse", "mars", "red", "blue",
)


def default_model_dir(name: str) -> Path:
    """Folder where examples keep a built tiny model called ``name``.

    ``$REPRO_TRACK_MODEL_DIR/<name>`` when that variable is set, otherwise
    ``$XDG_CACHE_HOME/repro-track/models/<name>`` (``~/.cache`` when
    ``XDG_CACHE_HOME`` is unset). Empty variables count as unset, as in the XDG spec.
    """
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"model name must be a single folder name, got {name!r}")
    root = os.environ.get("REPRO_TRACK_MODEL_DIR")
    if root:
        return Path(root).expanduser() / name
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "repro-track" / "models" / name


def load_pipeline(
    model_id_or_path: str | os.PathLike[str], *, device: str = "cpu", progress: bool = True
) -> DiffusionPipeline:
    """Load a pipeline with ``DiffusionPipeline.from_pretrained`` and move it to ``device``.

    Progress bars stay on unless ``progress`` is false.
    """
    import importlib.util

    from diffusers import DiffusionPipeline

    kwargs: dict[str, object] = {}
    # Without accelerate diffusers falls back to low_cpu_mem_usage=False anyway, but
    # warns on every load; asking for the fallback up front loads the same way, quietly.
    if importlib.util.find_spec("accelerate") is None:
        kwargs["low_cpu_mem_usage"] = False
    pipe = DiffusionPipeline.from_pretrained(model_id_or_path, **kwargs)
    pipe = pipe.to(device)
    if not progress:
        pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_ddim(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build and save a tiny unconditional ``DDIMPipeline`` (16x16 RGB images).

    Weights come from ``seed``, so one seed always gives byte-identical files.
    When ``path`` already holds a saved ``DDIMPipeline`` it is returned as it is
    (its seed is not checked). Returns ``path`` as a ``Path``.
    """

    def build(folder: Path) -> None:
        from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

        with _seeded(seed):
            unet = UNet2DModel(
                sample_size=16,
                in_channels=3,
                out_channels=3,
                block_out_channels=(8, 16),
                layers_per_block=1,
                norm_num_groups=4,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=8,
            )
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
        pipe.save_pretrained(folder, safe_serialization=True)

    return _build_once(Path(path), "DDIMPipeline", build)


def build_tiny_text2image(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build and save a tiny Stable-Diffusion-style ``StableDiffusionPipeline`` (32x32 images).

    It has a CLIP text encoder and a byte-level BPE tokenizer that accepts any
    prompt, a VAE that halves the resolution, and no safety checker. Weights come
    from ``seed``, so one seed always gives byte-identical files. When ``path``
    already holds a saved ``StableDiffusionPipeline`` it is returned as it is
    (its seed is not checked). Returns ``path`` as a ``Path``.
    """

    def build(folder: Path) -> None:
        from diffusers import (
            AutoencoderKL,
            DDIMScheduler,
            StableDiffusionPipeline,
            UNet2DConditionModel,
        )
        from transformers import CLIPTextConfig, CLIPTextModel

        tokenizer = _tiny_clip_tokenizer()
        with _seeded(seed):
            unet = UNet2DConditionModel(
                sample_size=16,
                in_channels=4,
                out_channels=4,
                block_out_channels=(8, 16),
                layers_per_block=1,
                norm_num_groups=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=32,
                # Despite its name this is the number of heads here (a diffusers
                # legacy): 2 heads of 8 channels in the 16-channel attention block.
                attention_head_dim=2,
            )
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                block_out_channels=(8, 16),
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=4,
                sample_size=32,
            )
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    max_position_embeddings=_MAX_PROMPT_TOKENS,
                    projection_dim=32,
                    # The pooled output is read at the end-of-text position, so these
                    # must be the tokenizer's ids rather than the config defaults.
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            )
        # Stable Diffusion v1's schedule, so the example behaves like the real thing.
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(folder, safe_serialization=True)

    return _build_once(Path(path), "StableDiffusionPipeline", build)


def build_wheel(wheelhouse: str | os.PathLike[str], name: str, version: str, source: str) -> Path:
    """Write a pure-Python wheel of one module ``name`` (its ``__init__.py`` is ``source``) into
    ``wheelhouse``, with a valid RECORD, so pip and uv install it with no index and no build step."""
    import base64
    import hashlib
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": source,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: repro-track\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    folder = Path(wheelhouse)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(target, "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)
    return target


def _tiny_sd_parts(seed: int, *, cross_attention_dim: int = 32, **unet_extra: object) -> dict:
    """The UNet, VAE and CLIP text encoder + tokenizer of the tiny Stable Diffusion pipelines."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _tiny_clip_tokenizer()
    with _seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            norm_num_groups=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
            attention_head_dim=2, **unet_extra,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
            layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
        )
        text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


def _tiny_clip_config(tokenizer: CLIPTokenizer) -> object:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=_MAX_PROMPT_TOKENS, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _sd_scheduler() -> object:
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_tiny_sdxl(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build and save a tiny ``StableDiffusionXLPipeline`` (two CLIP text encoders, 32x32 images)."""

    def build(folder: Path) -> None:
        from diffusers import StableDiffusionXLPipeline
        from transformers import CLIPTextModelWithProjection

        # Time ids: 6 values embedded in 8 channels each, plus the 32-channel pooled text embedding.
        parts = _tiny_sd_parts(seed, cross_attention_dim=64, use_linear_projection=True,
                               addition_embed_type="text_time", addition_time_embed_dim=8,
                               projection_class_embeddings_input_dim=6 * 8 + 32)
        with _seeded(seed + 1):
            text_encoder_2 = CLIPTextModelWithProjection(_tiny_clip_config(parts["tokenizer"]))
        pipe = StableDiffusionXLPipeline(
            **parts, text_encoder_2=text_encoder_2, tokenizer_2=_tiny_clip_tokenizer(),
            scheduler=_sd_scheduler(), force_zeros_for_empty_prompt=True)
        pipe.save_pretrained(folder, safe_serialization=True)

    return _build_once(Path(path), "StableDiffusionXLPipeline", build)


def build_tiny_controlnet(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build and save a tiny ``StableDiffusionControlNetPipeline`` (a 32x32 RGB control image)."""

    def build(folder: Path) -> None:
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

        parts = _tiny_sd_parts(seed)
        with _seeded(seed + 1):
            controlnet = ControlNetModel(
                in_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32,
                attention_head_dim=2, conditioning_embedding_out_channels=(8, 16),
            )
        pipe = StableDiffusionControlNetPipeline(
            **parts, controlnet=controlnet, scheduler=_sd_scheduler(), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(folder, safe_serialization=True)

    return _build_once(Path(path), "StableDiffusionControlNetPipeline", build)


def build_tiny_pixart(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build and save a tiny ``PixArtAlphaPipeline``: a transformer denoiser and a T5 text encoder
    whose Unigram tokenizer is built from a small vocabulary here (no download)."""

    def build(folder: Path) -> None:
        from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
        from transformers import T5Config, T5EncoderModel

        tokenizer = _tiny_t5_tokenizer()
        with _seeded(seed):
            transformer = PixArtTransformer2DModel(
                sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
                caption_channels=32, in_channels=4, cross_attention_dim=16, out_channels=8,
                norm_num_groups=4,
            )
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
            )
            text_encoder = T5EncoderModel(T5Config(
                vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))
        pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                   transformer=transformer, scheduler=DDIMScheduler())
        pipe.save_pretrained(folder, safe_serialization=True)

    return _build_once(Path(path), "PixArtAlphaPipeline", build)


def _tiny_t5_tokenizer() -> object:
    """A T5 tokenizer over a small Unigram vocabulary: specials, bytes-as-letters and a few words."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -2.0) for w in _MERGE_WORDS]
    pieces += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)] + [("\u2581", -3.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=_MAX_PROMPT_TOKENS)


def _tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over a small byte-level BPE vocabulary written to a temp folder."""
    from transformers import CLIPTokenizer

    vocab, merges = _tiny_bpe_vocab()
    with tempfile.TemporaryDirectory(prefix="repro-track-tokenizer-") as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(tmp, "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8"
        )
        # from_pretrained reads vocab.json + merges.txt in both transformers 4 and 5,
        # whose CLIPTokenizer constructors take different arguments.
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=_MAX_PROMPT_TOKENS)


def _tiny_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merges laid out like CLIP's: bytes, bytes + ``</w>``, merges, specials.

    Every byte has a token both inside and at the end of a word, so any text
    (any language, emoji, punctuation) tokenizes without falling back to unknown.
    """
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in _MERGE_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge, merged = f"{pieces[0]} {pieces[1]}", pieces[0] + pieces[1]
            if merge not in merges:
                merges.append(merge)
                tokens.append(merged)
            pieces[:2] = [merged]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(mapping.items()))


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch for weight initialisation, restoring every global RNG afterwards."""
    import numpy as np
    import torch

    python_state = random.getstate()
    numpy_state = np.random.get_state()
    try:
        # devices=[]: models are built on the CPU, and forking CUDA generators would
        # initialise CUDA for nothing.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _build_once(target: Path, class_name: str, build: Callable[[Path], None]) -> Path:
    """Run ``build`` into a staging folder next to ``target`` and move it into place.

    The move is a single rename, so a folder at ``target`` is either absent or
    complete; an interrupted build leaves only a hidden ``*.partial`` sibling.
    """
    if _saved_pipeline_class(target, class_name):
        return target
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise FileExistsError(f"{target} exists and does not hold a saved pipeline; not overwriting it")
    target.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (unlike mkdtemp's 0o700) honours the umask, so a shared cache stays shared.
    staging = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    os.mkdir(staging)
    try:
        build(staging)
        with contextlib.suppress(OSError):
            target.rmdir()  # an empty placeholder folder would block the rename on Windows
        try:
            os.replace(staging, target)
        except OSError:
            # Another process may have finished the same build first.
            if _saved_pipeline_class(target, class_name):
                return target
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _saved_pipeline_class(folder: Path, expected: str) -> bool:
    """Whether ``folder`` holds a saved pipeline; raises if it is a different pipeline class."""
    index = folder / _MODEL_INDEX
    if not index.is_file():
        return False
    found = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    if found != expected:
        raise FileExistsError(f"{folder} holds a saved {found}, not a {expected}")
    return True
