"""Flags the commands that generate share (metrics.py, the batch CLI, the app): sampling settings, --compile and
--device. Light: imports nothing heavy, so `--help` answers at once."""

import argparse

from sdtune.generation.schedulers import DEFAULT_SCHEDULER, SCHEDULERS

DEVICES = ["auto", "cuda", "mps", "cpu"]


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The image-to-image sampling settings metrics.py and the batch CLI share (GenerationSettings.from_args)."""
    parser.add_argument("--num_inference_steps", type=int, default=30, help="Denoising steps.")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance; 1 turns it off.")
    parser.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=list(SCHEDULERS))
    parser.add_argument("--strength", type=float, default=0.6,
                        help="Image to image: how far from the input to go, in (0, 1].")
    parser.add_argument("--cache_dir", default=None, help="Where hub models are cached.")


def add_compile_flag(parser: argparse.ArgumentParser) -> None:
    """--compile, which the app, metrics.py and the batch CLI share (sdtune/generation/compiling.py)."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each model's UNet: the first image pays the compile (about a minute on a "
                             "CPU), later ones are faster; a change of scheduler, LoRA model or LoRA scale does not "
                             "recompile, a new image size or batch shape compiles once more.")
