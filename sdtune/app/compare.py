"""Compare: one prompt through several models side by side (AUTOMATIC1111's X/Y plot, with the models as its
columns). The rows are seeds, or one seed and a list of guidance scales, step counts or LoRA scales.

Each cell is generated alone, as Service.text2img generates one image (never batched: batched images differ from
single ones by float rounding), so a cell equals the text-to-image tab's image of its model, seed and settings.
"""

import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image

from sdtune.app.compare_grid import draw_grid
from sdtune.app.service import RequestError, Service, request_cost
from sdtune.errors import SdtuneError
from sdtune.generation.core import GenerationError, GenerationSettings, Interrupted
from sdtune.generation.pnginfo import format_parameters, save_png
from sdtune.generation.runlog import RunRecorder
from sdtune.limits import MAX_COMPARE_CELLS, SEED_LIMIT, check_lora_scale
from sdtune.seeds import resolve_seed

# axis -> its name in the labels and in the PNG parameters (the names text2img's PNGs use)
AXES = {"seed": "Seed", "guidance_scale": "CFG scale", "num_inference_steps": "Steps", "lora_scale": "LoRA scale"}
EXAMPLES = {"seed": '"4" (a count from the seed) or "1, 2, 7"', "guidance_scale": '"3, 7.5, 12"',
            "num_inference_steps": '"10, 25, 50"', "lora_scale": '"0, 0.5, 1"'}
STOPPED, FAILED = "stopped", "failed"
NO_ADAPTER = "no adapter"  # a model without one on the LoRA-scale axis: its plain image in every row


@dataclass(frozen=True)
class Row:
    """One row of the grid: the seed and settings of its cells and, on the LoRA-scale axis, the adapters' scale."""
    label: str  # "Seed 42", "CFG scale 7.5"
    value: float | int
    seed: int
    settings: GenerationSettings
    lora_scale: float | None = None


@dataclass
class Cell:
    model: str
    row: Row
    requested_scale: float | None  # the scale asked of an adapter; None: the model's listed one, or no adapter
    image: Image.Image | None = None
    path: Path | None = None  # its PNG, carrying its parameters
    error: str = ""
    lora_scale: float | None = None  # the scale it was drawn at, as its PNG records it
    seconds: float = 0.0

    @property
    def key(self) -> tuple:
        """Cells with the same key are the same image (a model without an adapter on the LoRA-scale axis)."""
        return self.model, self.row.seed, self.row.settings, self.requested_scale


@dataclass
class CompareUpdate:
    columns: list[str]  # column labels, one per model
    rows: list[str]  # row labels
    size: tuple[int, int]  # every cell's (width, height)
    cells: list[Cell]  # finished so far, row by row
    grid_path: Path | None = None  # the labelled grid PNG, when the comparison ends
    run: dict | None = None


def chosen_models(service: Service, models, checkpoints=None) -> list[str]:
    """The models to compare, each once: all listed when None (and no checkpoint is chosen); an empty choice is an
    error, not "all", unless a run's checkpoints are the columns."""
    if models is None:
        return [] if checkpoints else service.registry.names
    if not models and not checkpoints:
        raise RequestError("models: none chosen; choose at least one model (or a run's checkpoints) to compare.")
    unknown = [model for model in models if model not in service.registry.specs]
    if unknown:
        raise RequestError(f"models: unknown {unknown}; available: {', '.join(service.registry.names)}.")
    return list(dict.fromkeys(models))


def shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def value_items(axis: str, values) -> list[str]:
    """The comma-separated items of `values`; an empty list or item is refused with an example."""
    if axis not in AXES:
        raise RequestError(f"axis must be one of {', '.join(AXES)}, not {axis!r}.")
    items = [item.strip() for item in str(values or "").split(",")]
    if items == [""]:
        raise RequestError(f"values: empty; give the {AXES[axis]} values, e.g. {EXAMPLES[axis]}.")
    if "" in items:
        raise RequestError(f"values: {values!r} has an empty item; e.g. {EXAMPLES[axis]}.")
    return items


def number(item: str, axis: str) -> float:
    try:
        return float(item)
    except ValueError:
        raise RequestError(f"values: {item!r} is not a number; e.g. {EXAMPLES[axis]}.") from None


def seed_rows(items: list[str], seed, settings: GenerationSettings) -> list[Row]:
    """One item is a count of seeds from `seed` (seed, seed+1, ..., as text2img's images); several are the seeds."""
    numbers = [number(item, "seed") for item in items]
    if len(numbers) == 1:
        if not numbers[0].is_integer() or not 1 <= numbers[0] <= MAX_COMPARE_CELLS:
            raise RequestError(f"values: a seed count must be a whole number from 1 to {MAX_COMPARE_CELLS}, not "
                               f"{items[0]}; several seeds are listed with commas, e.g. \"1, 2, 7\".")
        base = resolve_seed(seed)
        seeds = [(base + index) % SEED_LIMIT for index in range(int(numbers[0]))]  # past 2**32 - 1 back to 0
    else:
        try:
            seeds = [resolve_seed(value) for value in numbers]
        except SdtuneError as error:
            raise RequestError(f"values: {error}") from error
    return [Row(f"Seed {s}", s, s, settings) for s in seeds]


def setting_row(axis: str, item: str, seed: int, settings: GenerationSettings) -> Row:
    """A row that changes one setting (converted and checked as the form's own value) or the adapters' scale."""
    if axis == "lora_scale":
        try:
            scale = check_lora_scale(item, "values (LoRA scale)")
        except SdtuneError as error:
            raise RequestError(str(error)) from error
        return Row(f"LoRA scale {scale:g}", scale, seed, settings, scale)
    number(item, axis)
    try:
        changed = GenerationSettings.from_args(**{**asdict(settings), axis: item})
    except GenerationError as error:
        raise RequestError(f"values: {error}") from error
    value = getattr(changed, axis)
    return Row(f"{AXES[axis]} {shown(value)}", value, seed, changed)


def axis_rows(axis: str, values, seed, settings: GenerationSettings) -> list[Row]:
    items = value_items(axis, values)
    if axis == "seed":
        return seed_rows(items, seed, settings)
    seed = resolve_seed(seed)
    return [setting_row(axis, item, seed, settings) for item in items]


def plan_cells(service: Service, models: list[str], axis: str, rows: list[Row]) -> list[Cell]:
    """Every cell, row by row (so the grid grows a row of models at a time); refused past MAX_COMPARE_CELLS."""
    check_cell_count(len(models), len(rows))
    adapters = [model for model in models if service.registry.configured_scale(model) is not None]
    if axis == "lora_scale" and not adapters:
        raise RequestError(f"axis lora_scale: none of {models} has a LoRA adapter; choose a LoRA model.")
    on_axis = lambda model, row: row.lora_scale if model in adapters else None  # noqa: E731
    return [Cell(model, row, on_axis(model, row)) for row in rows for model in models]


def check_total_cost(service: Service, cells: list[Cell]) -> None:
    """Refuse a comparison whose images together would hold the device longer than one request may."""
    distinct = {cell.key: cell.row.settings for cell in cells}.values()
    cost = sum(request_cost(settings, 1) for settings in distinct)
    if cost > service.max_request_cost:
        raise RequestError(
            f"This comparison costs {cost:.3g} megapixel-steps (width x height x steps / 10^6, summed over its "
            f"{len(distinct)} images); this server allows {service.max_request_cost:g} per request on its "
            f"{service.backend.device.type}. Choose fewer models or values, fewer steps or a smaller size, or ask "
            "the operator to raise --max_request_cost.")


def column_label(service: Service, model: str, axis: str) -> str:
    no_adapter = axis == "lora_scale" and service.registry.configured_scale(model) is None
    return f"{model} ({NO_ADAPTER})" if no_adapter else model


def generate_cell(service: Service, prompt: str, cell: Cell, path: Path, stop: threading.Event | None) -> None:
    """Draw and save one cell as Service.text2img draws a one-image request; a failure is the cell's error."""
    start = time.perf_counter()
    try:
        cell.lora_scale = service.prepare(cell.model, cell.requested_scale)
        cell.image, = service.backend.text_to_images(cell.model, cell.lora_scale, prompt, [cell.row.seed],
                                                     cell.row.settings, stop)
        cell.path = save_png(cell.image, path, format_parameters(prompt, cell.row.settings, cell.row.seed, cell.model,
                                                            lora_scale=cell.lora_scale))
    except Interrupted:
        cell.error = STOPPED
    except OSError as error:  # before RuntimeError's catch-all: the image was made, its file could not be written
        cell.error = f"cannot save the image: {error.strerror or error}"
    except (SdtuneError, RuntimeError) as error:  # a model that cannot load, out of memory: the grid goes on
        cell.error = str(error)
    cell.seconds = time.perf_counter() - start


def compare(service: Service, prompt: str, models, axis: str, values, seed, settings: GenerationSettings,
            stop: threading.Event | None = None, run: str = "", checkpoints=None):
    """Yields a CompareUpdate after every cell, and a last one with the grid PNG and the run record. `checkpoints`
    (names of `run`'s checkpoint-N folders, or "final") add a column each after the models, served for the length
    of the comparison (a full fine-tune's as its UNet on the base's other components, a LoRA run's as adapters on
    the base).

    Everything is checked before any model time is spent (at the first iteration; a run's checkpoints then load). A
    model that fails to generate gets failed cells and the others go on; Stop ends the comparison within one
    denoising step, keeping the cells finished before it."""
    checkpoints = list(dict.fromkeys(checkpoints or []))
    if checkpoints and not str(run or "").strip():
        raise RequestError("run: choose the training run whose checkpoints to compare.")
    models = chosen_models(service, models, checkpoints)
    rows = axis_rows(axis, values, seed, settings)
    check_cell_count(len(models) + len(checkpoints), len(rows))
    with service.models.borrowed(run, checkpoints) if checkpoints else nullcontext([]) as borrowed:
        columns = models + [name for name, _ in borrowed]
        labels = {name: label for name, label in borrowed}
        yield from compare_columns(service, prompt, columns, labels, axis, rows, settings, stop)


def check_cell_count(columns: int, rows: int) -> None:
    if columns * rows > MAX_COMPARE_CELLS:
        raise RequestError(f"{columns} models x {rows} values = {columns * rows} cells; a comparison holds at most "
                           f"{MAX_COMPARE_CELLS}: choose fewer models or values.")


def compare_columns(service: Service, prompt: str, models: list[str], labels: dict[str, str], axis: str,
                    rows: list[Row], settings: GenerationSettings, stop: threading.Event | None):
    """The comparison of `models` (a run's checkpoints among them, labelled by `labels`) over `rows`."""
    cells = plan_cells(service, models, axis, rows)
    check_total_cost(service, cells)
    update = CompareUpdate([labels.get(m) or column_label(service, m, axis) for m in models],
                           [row.label for row in rows], (settings.width, settings.height), [])
    with RunRecorder("compare", service.run_log, service.registry.device) as recorder:
        folder = service.output_dir / recorder.run_id
        folder.mkdir(parents=True, exist_ok=True)
        for cell in finished_cells(service, prompt, cells, folder, recorder, stop):
            update.cells.append(cell)
            # a copy: the app's handler shows the updates from another thread, after the next cells were added
            yield replace(update, cells=list(update.cells))
        update.grid_path = save_png(grid_image(update), folder / "grid.png",
                                    grid_parameters(prompt, cells[0], models, axis, rows))
        stopped = len(update.cells) < len(cells) or any(cell.error == STOPPED for cell in update.cells)
        update.run = recorder.finish(models=models, axis=axis, values=[row.value for row in rows],
                                     seeds=sorted({row.seed for row in rows}), stopped=stopped,
                                     failed_cells=failed_cells(update.cells))
        yield update


def finished_cells(service: Service, prompt: str, cells: list[Cell], folder: Path, recorder: RunRecorder,
                   stop: threading.Event | None):
    """Each cell in turn, drawn, or shared when it is an image already drawn; none after Stop."""
    made: dict[tuple, Cell] = {}
    for index, cell in enumerate(cells):
        if stop is not None and stop.is_set():
            return
        if cell.key in made:
            same = made[cell.key]
            cell.image, cell.path, cell.error, cell.lora_scale = same.image, same.path, same.error, same.lora_scale
        else:
            generate_cell(service, prompt, cell, folder / f"{index:02d}-{cell.model}-{cell.row.seed}.png", stop)
            made[cell.key] = cell
            recorder.image_done(cell.seconds, failed=cell.error not in ("", STOPPED))
        yield cell


def grid_image(update: CompareUpdate) -> Image.Image:
    """The grid of the cells finished so far; the others are blank (or say why they have no image)."""
    columns = len(update.columns)
    contents = [[""] * columns for _ in update.rows]
    for index, cell in enumerate(update.cells):
        contents[index // columns][index % columns] = cell.image if cell.image is not None else cell_word(cell)
    return draw_grid(contents, update.columns, update.rows, update.size)


def cell_word(cell: Cell) -> str:
    return STOPPED if cell.error == STOPPED else FAILED


def grid_parameters(prompt: str, first: Cell, models: list[str], axis: str, rows: list[Row]) -> str:
    """The grid's `parameters`: its first cell's, plus its axes as A1111's X/Y plot writes them."""
    axes = {"X Type": "Model", "X Values": ", ".join(models), "Y Type": AXES[axis],
            "Y Values": ", ".join(shown(row.value) for row in rows)}
    return format_parameters(prompt, first.row.settings, first.row.seed, first.model, lora_scale=first.lora_scale,
                             extra=axes)


def failed_cells(cells: list[Cell]) -> list[dict]:
    return [{"model": cell.model, "row": cell.row.label, "error": cell.error} for cell in cells
            if cell.error and cell.error != STOPPED]
