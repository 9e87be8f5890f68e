"""What the app does, without its UI: check a request, generate, save PNGs that carry their parameters, and record
the run. Every error a user can cause is an `SdtuneError` with a message meant for them: a `RequestError` when the
service refuses a request, a `GenerationError` for settings, and the seeds' and LoRA scales' own for a value out of
range."""

import threading
import time
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from sdtune.app.models import ModelManager
from sdtune.batch.engine import STOPPED, generate_batch, save_output
from sdtune.batch.engine import Outcome as BatchOutcome
from sdtune.batch.plan import Job, plan_batches, plan_jobs
from sdtune.data.folders import InputImage, list_images, printable
from sdtune.data.images import BadImageError, open_image, to_rgb, without_folder
from sdtune.errors import SdtuneError
from sdtune.generation.backend import LocalBackend
from sdtune.generation.core import GenerationSettings, Preview, working_size
from sdtune.generation.lora_stack import MAX_STACK, a1111_hash, parse_prompt, recorded_prompt, stack_from_rows
from sdtune.generation.pnginfo import format_parameters, save_png
from sdtune.generation.registry import ModelRegistry, ModelUnavailable
from sdtune.generation.runlog import RunRecorder
from sdtune.limits import (
    BATCH_SIZE,
    DEFAULT_MAX_REQUEST_COST,
    MAX_IMAGES,
    MAX_SIDE,
    MAX_UPLOAD_PIXELS,
    SEED_LIMIT,
    check_lora_scale,
)
from sdtune.seeds import resolve_seed


class RequestError(SdtuneError, ValueError):
    """A request that cannot be served as asked; the message says why."""


@dataclass
class Outcome:
    paths: list[Path]
    seeds: list[int]
    run: dict


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


def request_cost(settings: GenerationSettings, images: int, image_to_image: bool = False) -> float:
    """Megapixel-steps a request runs: width x height x denoising steps x images / 10^6; image to image runs
    steps x strength of its steps."""
    steps = settings.num_inference_steps * (settings.strength if image_to_image else 1)
    return settings.width * settings.height * steps * images / 1e6


class Service:
    def __init__(self, registry: ModelRegistry, output_dir, allowed_root, max_upload_pixels=MAX_UPLOAD_PIXELS,
                 max_request_cost: float | None = None, backend=None, models_root="."):
        self.registry, self.output_dir = registry, Path(output_dir)
        self.backend = backend or LocalBackend(registry)  # where generation runs: sdtune/generation/backend.py
        # models added and removed while serving (the Models tab), from under --models_root only
        self.models = ModelManager(registry, models_root, self.output_dir, local=isinstance(self.backend, LocalBackend))
        self.allowed_root_shown = str(allowed_root)  # as the operator gave it: error messages show no server paths
        self.allowed_root = Path(allowed_root).resolve()
        self.max_upload_pixels = max_upload_pixels
        self.max_request_cost = max_request_cost or DEFAULT_MAX_REQUEST_COST[self.backend.device.type]
        self.run_log = self.output_dir / "runs.jsonl"
        # with --train: why generation must wait while a training job holds the device, or None (sdtune/jobs/sharing.py)
        self.device_gate: Callable[[], str | None] | None = None

    def check_device(self) -> None:
        """Refuse a generation request while a training job leaves the device no room for it."""
        refusal = self.device_gate() if self.device_gate is not None else None
        if refusal:
            raise RequestError(refusal)

    def prepare(self, model: str, lora_scale: float | None = None) -> float | None:
        """Have the backend ready `model` and return the request's adapter scale (None: the model's listed one; None
        for a model without an adapter). Every request sets the scale, so one request's scale never carries over to
        the next."""
        self.check_device()
        scale = self.adapter_scale(model, lora_scale)
        with unavailable_as_request_error():
            self.backend.load(model, scale)
        return scale

    def adapter_scale(self, model: str, lora_scale: float | None) -> float | None:
        """The LoRA scale a request uses: its own (checked) or the model's listed one."""
        listed = self.registry.configured_scale(model)
        if lora_scale is None or model not in self.registry.specs:  # an unknown model is refused by the registry
            return listed
        if listed is None:
            raise RequestError(f"lora_scale applies to LoRA models only and '{model}' has no adapter: leave it out.")
        return check_lora_scale(lora_scale)

    def check_cost(self, settings: GenerationSettings, images: int = 1, image_to_image: bool = False) -> None:
        """Refuse a request that would hold the device longer than the operator allows."""
        cost = request_cost(settings, images, image_to_image)
        if cost > self.max_request_cost:
            steps = "steps x strength" if image_to_image else "steps"
            raise RequestError(
                f"This request costs {cost:.3g} megapixel-steps (width x height x {steps} x images / 10^6); this "
                f"server allows {self.max_request_cost:g} per request on its {self.backend.device.type}. Lower "
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

    def load_upload(self, path) -> object:
        name = Path(path).name  # the user's own file name; Gradio's upload folder is the server's business
        try:
            return to_rgb(open_image(path, max_pixels=self.max_upload_pixels))
        except (BadImageError, OSError) as error:
            raise RequestError(f"{name}: {without_folder(error, path)}") from error

    def text2img(self, prompt: str, model: str, seed: int, num_images: int, settings: GenerationSettings,
                 stop: threading.Event | None = None, lora_scale: float | None = None,
                 preview: Preview | None = None, loras=None) -> Outcome:
        """`num_images` images from seeds seed, seed+1, ... in one batch; a LoRA model's adapter at `lora_scale`
        (None: its listed scale), and a LoRA stack from `loras` rows and the prompt's `<lora:...>` tokens;
        `preview` sees them forming."""
        if not 1 <= num_images <= MAX_IMAGES:
            raise RequestError(f"num_images must be between 1 and {MAX_IMAGES}.")
        self.check_cost(settings, num_images)
        seed = resolve_seed(seed)
        lora_scale = self.prepare(model, lora_scale)
        stack = self.lora_stack(model, prompt, loras)
        seeds = [(seed + i) % SEED_LIMIT for i in range(num_images)]  # past 2**32 - 1 they wrap round to 0
        with RunRecorder("text2img", self.run_log, self.registry.device) as recorder, unavailable_as_request_error():
            start = time.perf_counter()
            images = self.backend.text_to_images(model, lora_scale, stack.text, seeds, settings, stop, preview,
                                                 **stack.call)
            for _ in images:
                recorder.image_done((time.perf_counter() - start) / len(images))
            folder = self.output_dir / recorder.run_id
            folder.mkdir(parents=True, exist_ok=True)
            paths = [save_png(image, folder / f"{index:02d}-{model}-{s}.png",
                              format_parameters(stack.recorded, settings, s, model, lora_scale=lora_scale,
                                                extra=stack.hashes))
                     for index, (s, image) in enumerate(zip(seeds, images))]
            return Outcome(paths, seeds, recorder.finish(model=model, lora_scale=lora_scale, **stack.run))

    def lora_stack(self, model: str, prompt: str, loras) -> "Stack":
        """The request's LoRA stack: the prompt's `<lora:NAME:WEIGHT>` tokens, then the `loras` rows, each a served
        LoRA model on `model`'s base, once (sdtune/generation/lora_stack.py)."""
        text, from_prompt = parse_prompt(prompt)
        rows = stack_from_rows(loras)
        for source, items in (("loras", rows), ("prompt", from_prompt)):
            for name, _ in items:
                if self.registry.configured_scale(name) is None:
                    served = [n for n in self.registry.names if self.registry.configured_scale(n) is not None]
                    raise RequestError(f"{source}: '{name}' is not a served LoRA model; served LoRA models: "
                                       f"{', '.join(served) or 'none'}.")
        stack = [*from_prompt, *rows]  # the order a recorded prompt (its tokens, then the rows' as tokens) gives back
        names = [model, *(name for name, _ in stack)]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise RequestError(f"loras: {repeated} given twice (with the model, in the rows or in the prompt's "
                               "<lora:...> tokens); give each LoRA once.")
        if len(stack) > MAX_STACK:
            raise RequestError(f"loras: {len(stack)} LoRA models; a request stacks at most {MAX_STACK}.")
        self.registry.check_stack(self.registry.specs[model], [self.registry.specs[name] for name, _ in stack])
        hashes = [(name, a1111_hash(self.registry.specs[name].lora)) for name, _ in stack]
        return Stack(text, stack, recorded_prompt(prompt, rows),
                     {"Lora hashes": ", ".join(f"{name}: {h}" for name, h in hashes if h)} if stack else {})

    def img2img(self, image_path, prompt: str, model: str, seed: int, settings: GenerationSettings,
                resolution: int = 0, stop: threading.Event | None = None, lora_scale: float | None = None,
                preview: Preview | None = None, loras=None) -> Outcome:
        """One edit of an uploaded image, returned at the upload's size; a LoRA model's adapter at `lora_scale`
        (None: its listed scale); `preview` sees it forming."""
        image, seed = self.load_upload(image_path), resolve_seed(seed)
        lora_scale = self.prepare(model, lora_scale)
        stack = self.lora_stack(model, prompt, loras)
        resolution = self.working_resolution(resolution, model)
        used = settings.sized(*working_size(image.size, resolution))  # the size the model works at
        used.validate(image_to_image=True)
        self.check_cost(used, image_to_image=True)
        with RunRecorder("img2img", self.run_log, self.registry.device) as recorder, unavailable_as_request_error():
            start = time.perf_counter()
            edited, = self.backend.images_to_images(model, lora_scale, [image], [stack.text], [seed], settings,
                                                    resolution, stop, preview, **stack.call)
            recorder.image_done(time.perf_counter() - start)
            folder = self.output_dir / recorder.run_id
            folder.mkdir(parents=True, exist_ok=True)
            path = save_png(edited, folder / f"{model}-{seed}.png",
                            format_parameters(stack.recorded, used, seed, model, image_to_image=True,
                                              lora_scale=lora_scale, extra=stack.hashes))
            return Outcome([path], [seed], recorder.finish(model=model, lora_scale=lora_scale, **stack.run))

    def folder_items(self, folder: str) -> list[InputImage]:
        """The images under a folder inside --allowed-root; a folder, or a file link, leading outside it is refused."""
        try:
            root = (self.allowed_root / folder).resolve()  # an absolute `folder` replaces the root here
            if not root.is_relative_to(self.allowed_root):
                raise RequestError(f"Folder {folder} is outside the allowed root {self.allowed_root_shown}.")
            if not root.is_dir():
                raise RequestError(f"Folder {folder} does not exist under {self.allowed_root_shown}.")
            return list_images(root, root=self.allowed_root, exclude=self.output_dir)
        except OSError as error:  # a name too long, a folder not readable: said without the server's path
            raise RequestError(f"Folder {folder} cannot be read under {self.allowed_root_shown}: "
                               f"{error.strerror or type(error).__name__}.") from error

    def random_batch(self, items: list[InputImage], models: list[str], prompt: str, seed: int,
                     settings: GenerationSettings, resolution: int = 0, stop: threading.Event | None = None,
                     preview: Preview | None = None):
        """Image to image over `items` as the batch CLI plans and runs it: each item gets a model drawn from (seed,
        its name), items are grouped by (model, working size) and run BATCH_SIZE to a call; yields after every call.

        A failing image is recorded in its row and the batch goes on. Stop interrupts the call in flight at its next
        denoising step (its images are listed as stopped) and ends the batch, keeping everything finished before.
        `preview` sees each call's images forming."""
        if not items:
            raise RequestError("No images given: upload some or name a folder.")
        self.check_device()
        models = list(models) or self.registry.names
        resolutions = self.batch_resolutions(models, settings, resolution)
        seed = resolve_seed(seed)
        jobs = plan_jobs(distinct_keys(items), models, seed, prompt, resolutions, self.max_upload_pixels)
        with RunRecorder("random_batch", self.run_log, self.registry.device) as recorder:
            folder = self.output_dir / recorder.run_id
            folder.mkdir(parents=True, exist_ok=True)
            rows = {job.key: batch_row(job) for job in jobs if job.error}
            for _ in rows:
                recorder.image_done(0.0, failed=True)
            for batch in plan_batches(jobs, BATCH_SIZE):
                if stop is not None and stop.is_set():
                    break
                for outcome in generate_batch(self.backend, batch, settings, resolutions[batch[0].model], stop,
                                              preview):
                    rows[outcome.job.key] = saved_row(outcome, folder, settings)
                    recorder.image_done(outcome.seconds, failed=rows[outcome.job.key].error not in ("", STOPPED))
                yield batch_update(jobs, rows)
            update = batch_update(jobs, rows)
            update.zip_path = zip_outputs(folder, update.outputs)
            update.run = recorder.finish(batch_seed=seed, models=models, lora_scales=self.listed_scales(models),
                                         stopped=stop is not None and stop.is_set())
            yield update

    def listed_scales(self, models: list[str]) -> dict[str, float]:
        """Each LoRA model's scale, as a batch uses it: the one it is listed with (one scale for every adapter would
        suit none of them)."""
        scales = {model: self.registry.configured_scale(model) for model in models}
        return {model: scale for model, scale in scales.items() if scale is not None}

    def batch_resolutions(self, models: list[str], settings: GenerationSettings, resolution: int) -> dict[str, int]:
        """Refuse a batch that cannot run before any model time is spent; each model's working resolution. The cost
        is bounded per image, at the largest working size the batch uses, not per batch: a batch of a whole folder
        is what the tab is for, and Stop ends it within one denoising step."""
        unknown = [m for m in models if m not in self.registry.names]
        if unknown:
            raise RequestError(f"Unknown models {unknown}; available: {', '.join(self.registry.names)}.")
        settings.validate(image_to_image=True)
        resolutions = {model: self.working_resolution(resolution, model) for model in models}
        side = max(resolutions.values())
        self.check_cost(settings.sized(side, side), image_to_image=True)
        return resolutions


@dataclass
class Stack:
    """A request's LoRA stack, as the generation and the saved PNGs use it."""
    text: str  # the prompt the text encoder sees: without its <lora:...> tokens
    items: list[tuple[str, float]]  # (LoRA model, weight)
    recorded: str  # the prompt the PNGs keep: as given, plus the rows' stack as tokens
    hashes: dict  # the PNGs' `Lora hashes` field (A1111's), when there is a stack

    @property
    def call(self) -> dict:
        return {"stack": self.items} if self.items else {}

    @property
    def run(self) -> dict:
        return {"loras": [list(item) for item in self.items]} if self.items else {}


@contextmanager
def unavailable_as_request_error():
    """A model that is not listed or cannot load, told to the user as a refused request."""
    try:
        yield
    except ModelUnavailable as error:
        raise RequestError(str(error)) from error


def distinct_keys(items: list[InputImage]) -> list[InputImage]:
    """Same-named inputs (two uploads called image.png) each get a name of their own, `image (2).png`, so each keeps
    its own model, seed and output; the prompt read from the name stays the same."""
    originals, used, distinct = {item.key for item in items}, set(), []
    for item in items:
        key, count = item.key, 1
        while key in used or (count > 1 and key in originals):
            count += 1
            name = PurePosixPath(item.key)
            key = str(name.with_name(f"{name.stem} ({count}){name.suffix}"))
        used.add(key)
        distinct.append(replace(item, key=key))
    return distinct


def batch_row(job: Job, seconds: float = 0.0, output: Path | None = None, error: str = "") -> BatchRow:
    return BatchRow(printable(job.key), job.model, job.prompt, job.seed, round(seconds, 3), output,
                    error or job.error)


def saved_row(outcome: BatchOutcome, folder: Path, settings: GenerationSettings) -> BatchRow:
    """The table row of a finished image, saved under the run's folder if it succeeded."""
    if outcome.image is None:
        return batch_row(outcome.job, outcome.seconds, error=outcome.error)
    try:
        return batch_row(outcome.job, outcome.seconds, save_output(outcome, folder, settings))
    except OSError as error:
        return batch_row(outcome.job, outcome.seconds, error=f"cannot save the output: {error.strerror or error}")


def batch_update(jobs: list[Job], rows: dict[str, BatchRow]) -> BatchUpdate:
    """The rows finished so far, in the order the inputs were given."""
    ordered = [rows[job.key] for job in jobs if job.key in rows]
    return BatchUpdate(len(ordered), len(jobs), ordered, outputs=[row.output for row in ordered if row.output])


def zip_outputs(folder: Path, paths: list[Path]) -> Path:
    """All outputs of a batch in one download, under their paths in the run's folder (two inputs of the same name
    in different subfolders keep both)."""
    zip_path = folder / "outputs.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in paths:
            archive.write(path, path.relative_to(folder).as_posix())
    return zip_path
