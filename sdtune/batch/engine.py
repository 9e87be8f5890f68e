"""Running a planned random-model batch: the generation and the saving that the batch CLI and the app's batch tab
share, so that both give the same image for the same input, seed and settings."""

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sdtune.batch.plan import Job, output_name
from sdtune.data.images import BadImageError, open_image, to_rgb
from sdtune.generation.core import GenerationError, GenerationSettings, Interrupted, Preview
from sdtune.generation.pnginfo import format_parameters, save_png
from sdtune.generation.registry import ModelRegistry

STOPPED = "stopped"  # the error of an image whose call Stop interrupted


@dataclass
class Outcome:
    job: Job
    image: Image.Image | None  # None when it failed
    seconds: float
    error: str = ""
    lora_scale: float | None = None  # the adapter's scale the image was drawn at; None for a model without one


def working_resolutions(registry: ModelRegistry, models: list[str], resolution: int) -> dict[str, int]:
    """Each model's working resolution: `resolution`, or when 0 the model's native one (raises ModelUnavailable)."""
    return {name: resolution or registry.native_resolution(name) for name in models}


def decode(batch: list[Job]) -> tuple[list[Job], list[Image.Image], list[Outcome]]:
    """A batch's inputs as RGB images; one that fails to decode becomes a failed outcome."""
    usable, images, failed = [], [], []
    for job in batch:
        try:
            images.append(to_rgb(open_image(job.path)))
            usable.append(job)
        except BadImageError as error:
            failed.append(Outcome(job, None, 0.0, str(error)))
    return usable, images, failed


def generate_batch(backend, batch: list[Job], settings: GenerationSettings, resolution: int,
                   stop: threading.Event | None = None, preview: Preview | None = None) -> list[Outcome]:
    """Image to image for one planned batch (one model, one working size), in one call of `backend` (a
    sdtune.generation.backend one); if the call fails (or is stopped), every image of the batch fails with the reason
    and the caller goes on."""
    start = time.perf_counter()
    usable, images, failed = decode(batch)
    if not usable:
        return failed
    try:
        outputs = backend.images_to_images(usable[0].model, None, images, [job.prompt for job in usable],
                                           [job.seed for job in usable], settings, resolution, stop, preview)
    except Interrupted:  # Stop: the call in flight ends at its next step, and its images are not failures
        return failed + [Outcome(job, None, time.perf_counter() - start, STOPPED) for job in usable]
    except (GenerationError, RuntimeError, ValueError) as error:  # ModelUnavailable, out of memory
        seconds = time.perf_counter() - start
        return failed + [Outcome(job, None, seconds, str(error)) for job in usable]
    seconds = (time.perf_counter() - start) / len(usable)
    scale = backend.registry.configured_scale(usable[0].model)  # a batch draws each LoRA model at its listed scale
    return failed + [Outcome(job, image, seconds, lora_scale=scale) for job, image in zip(usable, outputs)]


def save_output(outcome: Outcome, folder: Path, settings: GenerationSettings) -> Path:
    """Write a finished image under `folder`, named after its input, model and seed, carrying its parameters."""
    job = outcome.job
    path = Path(folder) / output_name(job.key, job.model, job.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(outcome.image, path, format_parameters(job.prompt, settings.sized(*job.size), job.seed, job.model,
                                                           image_to_image=True, lora_scale=outcome.lora_scale))
