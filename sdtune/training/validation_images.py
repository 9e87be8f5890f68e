"""Validation images during training: --num_validation_images per prompt, each from its own seed, saved as a grid."""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from diffusers import StableDiffusionPipeline
from diffusers.utils import make_image_grid
from PIL import Image

from sdtune.generation.core import GenerationSettings, text_to_images
from sdtune.seeds import validation_seed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridSettings:
    """The validation grid's flags (config.py has each one's help); config.settings_from(GridSettings, args)."""

    validation_prompts: list[str]
    num_validation_images: int
    validation_inference_steps: int
    validation_guidance_scale: float
    resolution: int
    seed: int
    output_dir: str


def validation_pipeline(components, unet, device) -> StableDiffusionPipeline:
    """A pipeline around the UNet being trained; the frozen parts are shared, not copied. The generation core
    swaps in the sampling scheduler."""
    pipeline = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=unet,
        scheduler=components.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def render_validation(pipeline, grid: GridSettings, global_step: int) -> Path:
    """Render every validation prompt and save the grid as validation/step-000500.png."""
    settings = GenerationSettings(num_inference_steps=grid.validation_inference_steps,
                                  guidance_scale=grid.validation_guidance_scale,
                                  width=grid.resolution, height=grid.resolution)
    prompts, count = grid.validation_prompts, grid.num_validation_images
    rows = [text_to_images(pipeline, prompt, [validation_seed(grid.seed, index, image, len(prompts))
                                              for image in range(count)], settings)
            for index, prompt in enumerate(prompts)]
    folder = Path(grid.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{global_step:06d}.png"
    # one image a prompt: rows of 4; several: a row per prompt
    grid = validation_grid([row[0] for row in rows]) if count == 1 else validation_grid(sum(rows, []), count)
    grid.save(path)
    logger.info("Validation grid: %s", path)
    return path


def validation_grid(images: list[Image.Image], columns: int = 4) -> Image.Image:
    """Rows of up to `columns` images; white cells fill the last row (diffusers' grid wants a full rectangle)."""
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    blanks = [Image.new("RGB", images[0].size, "white")] * (rows * columns - len(images))
    return make_image_grid(images + blanks, rows=rows, cols=columns)


def log_grid_to_trackers(accelerator, grid_path: Path, global_step: int) -> None:
    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": grid[None]}, global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"validation": [grid]}, global_step)
