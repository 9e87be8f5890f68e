"""The generation core: one place that turns (pipeline, prompt, seed, settings) into an image.

Validation during training uses it, and so do the app, the batch CLI and metrics.py, so the same model, prompt, seed
and settings give the same image everywhere.
"""

from dataclasses import dataclass

import torch
from PIL import Image


@dataclass(frozen=True)
class GenerationSettings:
    num_inference_steps: int = 25
    guidance_scale: float = 7.5  # classifier-free guidance; 1 turns it off
    width: int = 512
    height: int = 512
    negative_prompt: str | None = None


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator for one (prompt, seed): CPU noise is identical on every device, so images are too."""
    return torch.Generator(device="cpu").manual_seed(seed)


@torch.no_grad()
def text_to_image(pipeline, prompt: str, seed: int, settings: GenerationSettings) -> Image.Image:
    """One image for one prompt from its own seed."""
    result = pipeline(
        prompt=prompt,
        negative_prompt=settings.negative_prompt,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        width=settings.width,
        height=settings.height,
        generator=seeded_generator(seed),
    )
    return result.images[0]


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Tile equally sized images row by row."""
    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid
