"""Class images for prior preservation: those --class_data_dir lacks are drawn by the base model, through the
generation core, before training starts.

Generated image `index` is `class-00012.png`, drawn from a seed of (--class_prompt, index) alone: the same prompt,
model and settings give the same images, whatever --seed or the number of processes. Each file appears whole (written
aside, then renamed), so an interrupted generation leaves only complete images and the next run draws the rest, the
same ones an uninterrupted run would have drawn. The settings are recorded in the folder (class_images.json) and a
folder drawn with other settings is refused rather than mixed.
"""

import json
import logging
import os
from pathlib import Path

from sdtune.data.folders import list_images
from sdtune.data.subject import generated_name
from sdtune.errors import SdtuneError
from sdtune.generation.core import GenerationSettings, text_to_images
from sdtune.seeds import derive_seed

logger = logging.getLogger(__name__)

RECORD_NAME = "class_images.json"


def class_image_settings(resolution: int) -> GenerationSettings:
    """The generation core's defaults (25 steps, guidance 7.5, its default scheduler) at the training resolution."""
    return GenerationSettings(width=resolution, height=resolution)


def class_seed(class_prompt: str, index: int) -> int:
    return derive_seed("class image", class_prompt, index)


def missing_indices(folder, num_class_images: int) -> list[int]:
    """The generated images still to draw: as many as the folder lacks of `num_class_images`, the lowest indices
    whose file is not there yet."""
    present = {image.key for image in list_images(folder)} if Path(folder).is_dir() else set()
    needed, indices, index = num_class_images - len(present), [], 0
    while len(indices) < needed:
        if generated_name(index) not in present:
            indices.append(index)
        index += 1
    return indices


def check_record(folder: Path, record: dict, write: bool) -> None:
    """Refuse to add images to a folder whose generated images came from other settings; write the record the
    first time (`write`: on one process only)."""
    path = folder / RECORD_NAME
    if path.is_file():
        earlier = json.loads(path.read_text())
        changed = sorted(key for key in record if earlier.get(key) != record[key])
        if changed:
            raise SdtuneError(f"--class_data_dir {folder} holds class images drawn with another {', '.join(changed)} "
                              f"({', '.join(f'{key}={earlier.get(key)!r}' for key in changed)}; see {RECORD_NAME}). "
                              "Use a new --class_data_dir, or delete the generated class-*.png and the record.")
    elif write:
        partial = path.with_name(f".{RECORD_NAME}.partial")
        partial.write_text(json.dumps(record, indent=1, sort_keys=True))
        os.replace(partial, path)  # whole or absent, for a run reading it at the same time


def generate_class_images(pipeline, folder, class_prompt: str, indices: list[int], settings: GenerationSettings,
                          batch_size: int) -> list[Path]:
    """Draw class images `indices` into `folder`, `batch_size` at a time; returns the files written."""
    folder = Path(folder)
    written = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        images = text_to_images(pipeline, class_prompt, [class_seed(class_prompt, index) for index in chunk], settings)
        for index, image in zip(chunk, images):
            path = folder / generated_name(index)
            partial = path.with_name(f".{path.name}.partial")  # hidden: never listed as an image
            image.save(partial, format="PNG")
            os.replace(partial, path)  # atomic: a file of this name is always a whole image
            written.append(path)
        logger.info("Class images: %d of %d drawn", start + len(chunk), len(indices))
    return written


def fill_class_folder(pipeline, folder, class_prompt: str, indices: list[int], settings: GenerationSettings,
                      batch_size: int, model: str, process_index: int = 0, num_processes: int = 1) -> list[Path]:
    """Draw the missing class images `indices` (missing_indices, listed by every process before any draws); with
    several processes each draws every n-th one (the caller waits for all before reading the folder)."""
    if not indices:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"model": model, "prompt": class_prompt, "width": settings.width, "height": settings.height,
              "steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale,
              "scheduler": settings.scheduler}
    check_record(folder, record, write=process_index == 0)
    logger.info("Drawing %d class images of '%s' into %s", len(indices), class_prompt, folder)
    return generate_class_images(pipeline, folder, class_prompt, indices[process_index::num_processes], settings,
                                 batch_size)
