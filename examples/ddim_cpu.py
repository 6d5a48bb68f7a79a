"""Recorded, reproducible unconditional generation with a DDIM pipeline.

This follows the diffusers reproducibility guide: the noise comes from a seeded
``torch.Generator`` on the CPU, so the same seed gives the same images on any
machine, whichever device runs the model. The call to ``generate`` is recorded
into MLflow by ``repro_track.record``; replay it with ``repro-track replay <run_id>``.

    python examples/ddim_cpu.py                  # builds and uses a tiny local DDIM model
    python examples/ddim_cpu.py --model-id google/ddpm-cifar10-32 --steps 50

The run id is printed alone on stdout, and the summary goes to stderr, so
``RUN_ID=$(python examples/ddim_cpu.py)`` works.
"""

import argparse
import sys
from pathlib import Path

import repro_track
from _report import report  # beside this script, which Python puts on sys.path

TINY_MODEL_NAME = "tiny-ddim"


@repro_track.record(experiment="ddim-example")
def generate(pipe, num_inference_steps: int = 10, *, generator=None):
    """Denoise seeded noise with ``pipe``; returns images as a (batch, height, width, 3) array in [0, 1]."""
    return pipe(num_inference_steps=num_inference_steps, generator=generator, output_type="np").images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-id",
        help="hub id or local folder of a DDIM-compatible pipeline "
        "(default: a tiny model built once into repro_track.testing.default_model_dir)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the CPU generator (default: 0)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (default: 10)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="device that runs the model (default: cpu); the noise is drawn on the CPU regardless",
    )
    parser.add_argument("--run-id-file", type=Path, help="also write the recorded run id to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build or load the pipeline, generate once under a seeded CPU generator, report the run."""
    args = parse_args(argv)
    # Imported here, not at module level, so that importing this script stays cheap.
    import torch

    from repro_track import testing

    model = args.model_id or str(testing.build_tiny_ddim(testing.default_model_dir(TINY_MODEL_NAME)))
    pipe = testing.load_pipeline(model, device=args.device)
    # A CPU generator gives the same noise on every machine and device, as the diffusers guide advises.
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = generate(pipe, num_inference_steps=args.steps, generator=generator)
    report(images, repro_track.last_recording(generate), args.run_id_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
