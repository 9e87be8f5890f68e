"""What the app does, without its UI: check a request, generate, save PNGs that carry their parameters, and record
the run. Every error a user can cause is a `RequestError` with a message meant for them."""

import secrets
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.batch_plan import output_name
from sdtune.errors import SdtuneError
from sdtune.generate import (MAX_SIDE, GenerationError, GenerationSettings, Interrupted, image_to_image,
                             text_to_images, working_size)
from sdtune.images import BadImageError, open_image, to_rgb
from sdtune.pnginfo import format_parameters, save_png
from sdtune.prompts import prompt_from_filename
from sdtune.registry import ModelRegistry, ModelUnavailable
from sdtune.runlog import RunRecorder
from sdtune.seeds import SEED_LIMIT, check_seed, draw_model, image_seed

MAX_IMAGES = 8  # images per text-to-image request
MAX_UPLOAD_PIXELS = 4096 * 4096  # larger uploads are refused before decoding (decompression bombs)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# The most work one request may ask for, in megapixel-steps (width x height x denoising steps x images / 10^6; a
# 512x512 image at 30 steps is 7.9). The device runs one request at a time and Stop acts only between steps, so
# one request must not hold it for long: a CPU takes seconds per megapixel-step, a GPU a small fraction of one.
DEFAULT_MAX_REQUEST_COST = {"cpu": 8.0, "mps": 64.0, "cuda": 512.0}


class RequestError(SdtuneError, ValueError):
    """A request that cannot be served as asked; the message says why."""


@dataclass
class Outcome:
    paths: list[Path]
    seeds: list[int]
    run: dict


@dataclass
class BatchItem:
    key: str  # the name the prompt, model and seed are derived from (relative path or upload name)
    path: Path


@dataclass
class BatchRow:
    file: str
    model: str
    prompt: str
    seed: int
    seconds: float = 0.0
    output: Path | None = None
    error: str = ""


@dataclass
class BatchUpdate:
    done: int
    total: int
    rows: list[BatchRow]
    zip_path: Path | None = None
    run: dict | None = None
    outputs: list[Path] = field(default_factory=list)


def resolve_seed(seed) -> int:
    """-1 (or none) means a fresh random seed, any other seed must be in 0 <= seed < 2**32; the seed used is always
    returned to the user."""
    if seed is None or seed == -1:
        return secrets.randbelow(SEED_LIMIT)
    try:
        return check_seed(seed)
    except SdtuneError as error:
        raise RequestError(f"{error} (-1: a random one)") from error


def request_cost(settings: GenerationSettings, images: int, image_to_image: bool = False) -> float:
    """Megapixel-steps a request runs: width x height x denoising steps x images / 10^6; image to image runs
    steps x strength of its steps."""
    steps = settings.num_inference_steps * (settings.strength if image_to_image else 1)
    return settings.width * settings.height * steps * images / 1e6


class Service:
    def __init__(self, registry: ModelRegistry, output_dir, allowed_root, max_upload_pixels=MAX_UPLOAD_PIXELS,
                 max_request_cost: float | None = None):
        self.registry, self.output_dir = registry, Path(output_dir)
        self.allowed_root_shown = str(allowed_root)  # as the operator gave it: error messages show no server paths
        self.allowed_root = Path(allowed_root).resolve()
        self.max_upload_pixels = max_upload_pixels
        self.max_request_cost = max_request_cost or DEFAULT_MAX_REQUEST_COST.get(registry.device.type, 8.0)
        self.run_log = self.output_dir / "runs.jsonl"

    def pipeline(self, model: str):
        try:
            return self.registry.get(model)
        except ModelUnavailable as error:
            raise RequestError(str(error)) from error

    def check_cost(self, settings: GenerationSettings, images: int = 1, image_to_image: bool = False) -> None:
        """Refuse a request that would hold the device longer than the operator allows."""
        cost = request_cost(settings, images, image_to_image)
        if cost > self.max_request_cost:
            steps = "steps x strength" if image_to_image else "steps"
            raise RequestError(
                f"This request costs {cost:.3g} megapixel-steps (width x height x {steps} x images / 10^6); this "
                f"server allows {self.max_request_cost:g} per request on its {self.registry.device.type}. Lower "
                "the size, steps or images, or ask the operator to raise --max_request_cost.")

    def working_resolution(self, resolution: int, model: str) -> int:
        """The longer side image to image works at: `resolution`, or the model's own when it is 0."""
        if not resolution:
            try:
                return self.registry.native_resolution(model)
            except ModelUnavailable as error:
                raise RequestError(str(error)) from error
        if not 8 <= resolution <= MAX_SIDE:
            raise RequestError(f"resolution must be 0 (the model's own) or from 8 to {MAX_SIDE}, not {resolution}.")
        return resolution

    def check_batch(self, settings: GenerationSettings, resolution: int, models: list[str]) -> None:
        """Refuse a random batch that cannot work or whose images would each cost more than allowed (the cost is
        bounded per image, at the largest working size the batch can use: Stop ends a batch between images)."""
        settings.validate(image_to_image=True)
        sides = [self.working_resolution(resolution, model) for model in models if model not in self.registry.errors]
        side = max(sides, default=resolution or 8)
        self.check_cost(settings.sized(side, side), image_to_image=True)

    def load_upload(self, path) -> object:
        name = Path(path).name  # the user's own file name; Gradio's upload folder is the server's business
        try:
            return to_rgb(open_image(path, max_pixels=self.max_upload_pixels))
        except (BadImageError, OSError) as error:
            raise RequestError(f"{name}: {str(error).replace(str(path), name)}") from error

    def text2img(self, prompt: str, model: str, seed: int, num_images: int, settings: GenerationSettings,
                 stop: threading.Event | None = None) -> Outcome:
        """`num_images` images from seeds seed, seed+1, ... in one batch."""
        if not 1 <= num_images <= MAX_IMAGES:
            raise RequestError(f"num_images must be between 1 and {MAX_IMAGES}.")
        self.check_cost(settings, num_images)
        seed = resolve_seed(seed)
        pipeline = self.pipeline(model)
        seeds = [(seed + i) % SEED_LIMIT for i in range(num_images)]  # past 2**32 - 1 they wrap round to 0
        with RunRecorder("text2img", self.run_log, self.registry.device) as recorder:
            start = time.perf_counter()
            images = text_to_images(pipeline, prompt, seeds, settings, stop)
            for _ in images:
                recorder.image_done((time.perf_counter() - start) / len(images))
            folder = self.output_dir / recorder.run_id
            folder.mkdir(parents=True, exist_ok=True)
            paths = [save_png(image, folder / f"{index:02d}-{model}-{s}.png",
                              format_parameters(prompt, settings, s, model))
                     for index, (s, image) in enumerate(zip(seeds, images))]
            return Outcome(paths, seeds, recorder.finish(model=model))

    def img2img(self, image_path, prompt: str, model: str, seed: int, settings: GenerationSettings,
                resolution: int = 0, stop: threading.Event | None = None) -> Outcome:
        """One edit of an uploaded image, returned at the upload's size."""
        image, seed = self.load_upload(image_path), resolve_seed(seed)
        pipeline = self.pipeline(model)
        resolution = self.working_resolution(resolution, model)
        used = settings.sized(*working_size(image.size, resolution))  # the size the model works at
        used.validate(image_to_image=True)
        self.check_cost(used, image_to_image=True)
        with RunRecorder("img2img", self.run_log, self.registry.device) as recorder:
            start = time.perf_counter()
            edited = image_to_image(pipeline, image, prompt, seed, settings, resolution, stop)
            recorder.image_done(time.perf_counter() - start)
            folder = self.output_dir / recorder.run_id
            folder.mkdir(parents=True, exist_ok=True)
            path = save_png(edited, folder / f"{model}-{seed}.png",
                            format_parameters(prompt, used, seed, model, image_to_image=True))
            return Outcome([path], [seed], recorder.finish(model=model))

    def folder_items(self, folder: str) -> list[BatchItem]:
        """The images under a folder inside --allowed-root; anything outside it is refused."""
        root = (self.allowed_root / folder).resolve() if not Path(folder).is_absolute() else Path(folder).resolve()
        if not root.is_relative_to(self.allowed_root):
            raise RequestError(f"Folder {folder} is outside the allowed root {self.allowed_root_shown}.")
        if not root.is_dir():
            raise RequestError(f"Folder {folder} does not exist under {self.allowed_root_shown}.")
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return [BatchItem(str(p.relative_to(root)), p) for p in paths]

    def random_batch(self, items: list[BatchItem], models: list[str], prompt: str, seed: int,
                     settings: GenerationSettings, resolution: int = 0, stop: threading.Event | None = None):
        """Image to image over `items`, each with a model drawn from (seed, its name); yields after every image.

        A failing image is recorded in its row and the batch goes on; Stop ends it after the current image."""
        if not items:
            raise RequestError("No images given: upload some or name a folder.")
        models = list(models) or self.registry.names
        unknown = [m for m in models if m not in self.registry.names]
        if unknown:
            raise RequestError(f"Unknown models {unknown}; available: {', '.join(self.registry.names)}.")
        self.check_batch(settings, resolution, models)
        seed = resolve_seed(seed)
        with RunRecorder("random_batch", self.run_log, self.registry.device) as recorder:
            folder = self.output_dir / recorder.run_id
            folder.mkdir(parents=True, exist_ok=True)
            rows = []
            for item in items:
                if stop is not None and stop.is_set():
                    break
                row = self._batch_image(item, models, prompt, seed, settings, resolution, folder, stop)
                recorder.image_done(row.seconds, failed=bool(row.error))
                rows.append(row)
                yield BatchUpdate(len(rows), len(items), rows, outputs=[r.output for r in rows if r.output])
            zip_path = zip_outputs(folder, [r.output for r in rows if r.output])
            run = recorder.finish(batch_seed=seed, models=models, stopped=len(rows) < len(items))
            yield BatchUpdate(len(rows), len(items), rows, zip_path, run, [r.output for r in rows if r.output])

    def _batch_image(self, item, models, prompt, seed, settings, resolution, folder, stop) -> BatchRow:
        model = draw_model(seed, item.key, models)
        row = BatchRow(item.key, model, prompt or prompt_from_filename(item.key), image_seed(seed, item.key))
        start = time.perf_counter()
        try:
            image = self.load_upload(item.path)
            working = resolution or self.registry.native_resolution(model)
            edited = image_to_image(self.pipeline(model), image, row.prompt, row.seed, settings, working, stop)
            path = folder / output_name(item.key, model, row.seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            row.output = save_png(edited, path, format_parameters(
                row.prompt, settings.sized(*working_size(image.size, working)), row.seed, model, image_to_image=True))
        except Interrupted:
            row.error = "stopped"
        except (RequestError, GenerationError, ValueError, RuntimeError) as error:  # one bad image must not end the batch
            row.error = str(error)
        row.seconds = round(time.perf_counter() - start, 3)
        return row


def zip_outputs(folder: Path, paths: list[Path]) -> Path:
    """All outputs of a batch in one download."""
    zip_path = folder / "outputs.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in paths:
            archive.write(path, path.name)
    return zip_path
