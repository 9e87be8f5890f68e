"""What the app does, without its UI: check a request, generate, save PNGs that carry their parameters, and record
the run. Every error a user can cause is a `RequestError` with a message meant for them."""

import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from sdtune.batch_plan import output_name
from sdtune.generate import (GenerationError, GenerationSettings, Interrupted, check_sampling, check_settings,
                             image_to_image, text_to_images, working_size)
from sdtune.images import BadImageError, open_image, to_rgb
from sdtune.pnginfo import format_parameters, save_png
from sdtune.prompts import prompt_from_filename
from sdtune.registry import ModelRegistry, ModelUnavailable
from sdtune.runlog import RunRecorder
from sdtune.seeds import draw_model, image_seed, resolve_seed

MAX_SIDE = 1024  # width/height cap: beyond it SD v1 repeats itself and memory grows with the square
MAX_IMAGES = 8  # images per text-to-image request
MAX_UPLOAD_PIXELS = 4096 * 4096  # larger uploads are refused before decoding (decompression bombs)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class RequestError(ValueError):
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


class Service:
    def __init__(self, registry: ModelRegistry, output_dir, allowed_root, max_upload_pixels=MAX_UPLOAD_PIXELS):
        self.registry, self.output_dir = registry, Path(output_dir)
        self.allowed_root = Path(allowed_root).resolve()
        self.max_upload_pixels = max_upload_pixels
        self.run_log = self.output_dir / "runs.jsonl"

    def pipeline(self, model: str):
        try:
            return self.registry.get(model)
        except ModelUnavailable as error:
            raise RequestError(str(error)) from error

    def check(self, settings: GenerationSettings, image_to_image: bool = False, size: bool = True) -> None:
        """Refuse what cannot work, before any model time is spent."""
        if max(settings.width, settings.height) > MAX_SIDE:
            raise RequestError(f"width and height (or the working resolution) are capped at {MAX_SIDE}.")
        try:
            (check_settings if size else check_sampling)(settings, image_to_image)
        except GenerationError as error:
            raise RequestError(str(error)) from error

    def load_upload(self, path) -> object:
        try:
            return to_rgb(open_image(path, max_pixels=self.max_upload_pixels))
        except (BadImageError, OSError) as error:
            raise RequestError(f"{Path(path).name}: {error}") from error

    def text2img(self, prompt: str, model: str, seed: int, num_images: int, settings: GenerationSettings,
                 stop: threading.Event | None = None) -> Outcome:
        """`num_images` images from seeds seed, seed+1, ... in one batch."""
        if not 1 <= num_images <= MAX_IMAGES:
            raise RequestError(f"num_images must be between 1 and {MAX_IMAGES}.")
        self.check(settings)
        pipeline, seed = self.pipeline(model), resolve_seed(seed)
        seeds = [(seed + i) % 2**32 for i in range(num_images)]
        recorder = RunRecorder("text2img", self.run_log, self.registry.device)
        start = time.perf_counter()
        images = text_to_images(pipeline, prompt, seeds, settings, stop)
        for _ in images:
            recorder.image_done((time.perf_counter() - start) / len(images))
        folder = self.output_dir / recorder.run_id
        folder.mkdir(parents=True, exist_ok=True)
        paths = [save_png(image, folder / f"{index:02d}-{model}-{s}.png", format_parameters(prompt, settings, s, model))
                 for index, (s, image) in enumerate(zip(seeds, images))]
        return Outcome(paths, seeds, recorder.finish(model=model))

    def img2img(self, image_path, prompt: str, model: str, seed: int, settings: GenerationSettings,
                resolution: int = 0, stop: threading.Event | None = None) -> Outcome:
        """One edit of an uploaded image, returned at the upload's size."""
        image = self.load_upload(image_path)
        pipeline, seed = self.pipeline(model), resolve_seed(seed)
        resolution = resolution or self.registry.native_resolution(model)
        self.check(settings.sized(resolution, resolution), image_to_image=True, size=False)
        recorder = RunRecorder("img2img", self.run_log, self.registry.device)
        start = time.perf_counter()
        edited = image_to_image(pipeline, image, prompt, seed, settings, resolution, stop)
        recorder.image_done(time.perf_counter() - start)
        folder = self.output_dir / recorder.run_id
        folder.mkdir(parents=True, exist_ok=True)
        used = settings.sized(*working_size(image.size, resolution))  # the size the model worked at
        path = save_png(edited, folder / f"{model}-{seed}.png",
                        format_parameters(prompt, used, seed, model, image_to_image=True))
        return Outcome([path], [seed], recorder.finish(model=model))

    def folder_items(self, folder: str) -> list[BatchItem]:
        """The images under a folder inside --allowed-root; anything outside it is refused."""
        root = (self.allowed_root / folder).resolve() if not Path(folder).is_absolute() else Path(folder).resolve()
        if not root.is_relative_to(self.allowed_root):
            raise RequestError(f"Folder {folder} is outside the allowed root {self.allowed_root}.")
        if not root.is_dir():
            raise RequestError(f"Folder {folder} does not exist under {self.allowed_root}.")
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
        self.check(settings.sized(resolution, resolution), image_to_image=True, size=False)
        seed = resolve_seed(seed)
        recorder = RunRecorder("random_batch", self.run_log, self.registry.device)
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
