"""Planning a random-model batch: what each input gets, and batches that do not depend on the process count.

Every input's model, seed and prompt come from (seed, its relative path); inputs are grouped by (model, working
size) into fixed batches, and whole batches are dealt to processes. So one process or many, first run or resumed,
every image is computed in the same batch and comes out the same.
"""

from dataclasses import dataclass
from pathlib import Path

from sdtune.data.folders import InputImage, printable
from sdtune.data.images import MAX_IMAGE_PIXELS, BadImageError, header_size
from sdtune.data.prompts import prompt_from_filename
from sdtune.generation.core import working_size
from sdtune.seeds import draw_model, image_seed


@dataclass(frozen=True)
class Job:
    key: str  # path relative to --input, or an upload's name
    path: Path
    model: str
    prompt: str
    seed: int
    size: tuple[int, int] | None = None  # working size; None when the file cannot be used
    error: str = ""


def output_name(key: str, model: str, seed: int) -> str:
    """`sub/a_cat.jpg` -> `sub/a_cat-stock-1234.png`: the input's name (as valid text), the model and the seed."""
    return f"{Path(printable(key)).with_suffix('').as_posix()}-{model}-{seed}.png"


def read_size(path: Path, max_pixels: int) -> tuple[tuple[int, int] | None, str]:
    """The image's size from its header (cheap), or why it cannot be used."""
    try:
        return header_size(path, max_pixels), ""
    except BadImageError as error:
        return None, str(error)


def plan_jobs(images: list[InputImage], models: list[str], seed: int, prompt: str | None,
              resolutions: dict[str, int], max_pixels: int = MAX_IMAGE_PIXELS) -> list[Job]:
    """A job for every input, in the given order: its model, prompt, seed and working size, or why it is unusable."""
    jobs = []
    for image in images:
        model = draw_model(seed, image.key, models)
        size, error = (None, image.error) if image.error else read_size(image.path, max_pixels)
        working = working_size(size, resolutions[model]) if size else None
        jobs.append(Job(image.key, image.path, model, prompt or prompt_from_filename(image.key),
                        image_seed(seed, image.key), working, error))
    return jobs


def plan_batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Usable jobs grouped by (model, working size) and cut into batches, in a fixed order."""
    groups: dict[tuple, list[Job]] = {}
    for job in jobs:
        if not job.error:
            groups.setdefault((job.model, job.size), []).append(job)
    return [group[i:i + batch_size] for _, group in sorted(groups.items()) for i in range(0, len(group), batch_size)]


def shard(batches: list, num_processes: int, process_index: int) -> list:
    """This process's share: every num_processes-th batch."""
    return batches[process_index::num_processes]
