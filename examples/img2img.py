"""Recorded, reproducible image-to-image generation from a PIL image.

The diffusers img2img pipeline takes the starting picture as a ``PIL.Image`` (as its docs show);
repro-track snapshots it when the call starts (mode, size and pixels) and rebuilds the same image on
replay, so the run replays bit for bit like a text-to-image one.

    python examples/img2img.py                                   # tiny local model, a generated picture
    python examples/img2img.py --image sketch.png --strength 0.6 --seed 3
    python examples/img2img.py --model-id stable-diffusion-v1-5/stable-diffusion-v1-5 --image in.png --steps 25

The run id is printed alone on stdout and the summary goes to stderr, so
``RUN_ID=$(python examples/img2img.py)`` works.
"""

import argparse
import sys
from pathlib import Path

import repro_track
from _report import report  # beside this script, which Python puts on sys.path

TINY_MODEL_NAME = "tiny-text2image"
DEFAULT_PROMPT = "a watercolor painting of a red cat"


@repro_track.record(experiment="img2img-example")
def generate(pipe, prompt: str, image, strength: float = 0.75, num_inference_steps: int = 10,
             guidance_scale: float = 7.5, *, generator=None):
    """Redraw the PIL ``image`` toward ``prompt``; returns a (batch, height, width, 3) array in [0, 1]."""
    return pipe(prompt=prompt, image=image, strength=strength, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, generator=generator, output_type="np").images


def starting_image(path: Path | None, size: int):
    """The picture to start from: the file given, else a colour gradient drawn here (no download)."""
    import numpy as np
    from PIL import Image

    if path is not None:
        return Image.open(path).convert("RGB").resize((size, size))
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[::-1, None], (1, size))], -1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", help="hub id or local folder of a Stable Diffusion pipeline "
                        "(default: a tiny model built once into repro_track.testing.default_model_dir)")
    parser.add_argument("--image", type=Path, help="starting image file (default: a generated gradient)")
    parser.add_argument("--size", type=int, help="side of the square input in pixels "
                        "(default: 32 for the tiny model, 512 otherwise)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"what to draw (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--strength", type=float, default=0.75, help="how far to move from the image (0-1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the CPU generator (default: 0)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default: 10)")
    parser.add_argument("--device", default="cpu", help="device that runs the model (default: cpu)")
    parser.add_argument("--run-id-file", type=Path, help="also write the recorded run id to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Load the img2img pipeline, redraw the starting image under a seeded CPU generator, report the run."""
    args = parse_args(argv)
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from repro_track import testing

    model = args.model_id or str(testing.build_tiny_text2image(testing.default_model_dir(TINY_MODEL_NAME)))
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model).to(args.device)
    image = starting_image(args.image, args.size or (512 if args.model_id else 32))
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = generate(pipe, args.prompt, image, strength=args.strength, num_inference_steps=args.steps,
                      generator=generator)
    report(images, repro_track.last_recording(generate), args.run_id_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
