"""The Gradio UI and API of gradio_app.py: text to image, image to image and the random-model batch.

Handlers keep the API's parameter names (prompt, model, num_inference_steps, ...): Gradio publishes them as the
named endpoints /text2img, /img2img and /random_batch. Generation runs one request at a time through the queue.
"""

import threading
from collections import OrderedDict
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import gradio as gr

from sdtune.errors import SdtuneError
from sdtune.generate import GenerationSettings, Interrupted
from sdtune.registry import ModelUnavailable
from sdtune.image_folder import InputImage
from sdtune.limits import LORA_SCALE_RANGE, MAX_IMAGES, MAX_SIDE, SEED_LIMIT
from sdtune.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from sdtune.serving import Service
from sdtune.webui_recall import IMAGE_TAB, INFO_TAB, TEXT_TAB, Form, png_info_tab, result_tools, wire
from sdtune.streaming import InFlight, stream

QUEUE = "device"  # every generating event shares one concurrency slot: one generation on the device at a time
TABLE_HEADERS = ["file", "model", "prompt", "seed", "seconds", "error"]
SEED_RANGE = f"0 to {SEED_LIMIT - 1}; -1 = random"
CSS_PATH = Path(__file__).with_name("webui.css")  # the layout's and the result images' styles
# Pixel heights that keep a tab's start button and its result in a 1366x768 window: an input image's drop area (a
# thumbnail is enough to see what was uploaded) and a result image's frame (small images are enlarged to fill it)
INPUT_HEIGHT, RESULT_HEIGHT = 200, 440


class StopSignals:
    """One stop flag per browser session, so Stop only stops its own user's generation.

    A click arms the session's flag before its request is queued, so a Stop pressed while the request waits is kept
    for it; the requests of one session share the flag until a Stop sets it, and it is dropped when its request
    ends. Flags of requests that never ran (cancelled in the queue) are
    dropped oldest first beyond `limit`, so the table stays bounded however many sessions come and go."""

    def __init__(self, limit: int = 1024):
        self._events: OrderedDict[str, threading.Event] = OrderedDict()
        self._lock, self.limit = threading.Lock(), limit

    def arm(self, request: gr.Request | None) -> None:
        session = _session(request)
        with self._lock:
            event = self._events.get(session)
            if event is None or event.is_set():  # a request of the session still running shares its flag with this
                self._events[session] = threading.Event()  # one, so Stop reaches both; after a Stop, a fresh flag
            self._events.move_to_end(session)
            while len(self._events) > self.limit:
                self._events.popitem(last=False)

    def stop(self, request: gr.Request | None) -> None:
        with self._lock:
            event = self._events.get(_session(request))
        if event is not None:
            event.set()

    @contextmanager
    def running(self, request: gr.Request | None):
        """The session's flag for the length of one request (armed at its click, or fresh for an API call)."""
        session = _session(request)
        with self._lock:
            event = self._events.setdefault(session, threading.Event())
        try:
            yield event
        finally:
            with self._lock:
                if self._events.get(session) is event:
                    del self._events[session]

    def __len__(self) -> int:
        return len(self._events)


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def served(function, *args):
    """Run a service call, turning the user's errors into a gr.Error (the server stays up)."""
    try:
        return function(*args)
    except (SdtuneError, Interrupted) as error:
        raise gr.Error(str(error)) from error


def settings_from(**values) -> GenerationSettings:
    """A request's settings from its form values, checked once here (GenerationSettings checks itself)."""
    return served(lambda: GenerationSettings.from_args(**values))


def model_status(service: Service) -> str:
    registry = service.registry
    lines = [f"Models: {', '.join(registry.names)} on {service.backend.device.type}."]
    for name, spec in registry.specs.items():
        if spec.lora:
            lines.append(f"**{name}** is a LoRA on `{spec.path}`, at scale {spec.lora_scale:g} unless a request "
                         "sets its own.")
    for name, reason in registry.errors.items():
        lines.append(f"**{name} failed to load** and is unavailable: {reason}")
    return "\n\n".join(lines)


def backend_status(service: Service) -> None:
    """The generation backend's own status (Ray Serve: which replicas are up), read on page load and on Refresh;
    nothing for the local backend."""
    if service.backend.status() is None:
        return
    with gr.Row():
        status = gr.Markdown(service.backend.status)
        refresh = gr.Button("Refresh", size="sm", scale=0)
    refresh.click(service.backend.status, None, status, queue=False, api_visibility="private")


def sampling_controls(names=None):
    """Scheduler, steps and guidance (and the model, when `names` is given): controls the tabs share."""
    with gr.Row():
        model = gr.Dropdown(names, value=names[0], label="Model") if names else None
        scheduler = gr.Dropdown(list(SCHEDULERS), value=DEFAULT_SCHEDULER, label="Scheduler")
    with gr.Row():
        steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
        guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance scale")
    return model, scheduler, steps, guidance


def strength_and_resolution():
    strength = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Strength")
    resolution = gr.Slider(0, MAX_SIDE, value=0, step=8, label="Working resolution (0 = model's own)")
    return strength, resolution


class Handlers:
    """The event handlers; their parameter names are the API's."""

    def __init__(self, service: Service):
        self.service, self.stops = service, StopSignals()

    def lora_scale_field(self, model):
        """The scale control for a newly chosen model: shown at its listed scale for a LoRA model, hidden and empty
        for any other."""
        scale = self.service.registry.configured_scale(model)
        if scale is None:
            return gr.update(visible=False, value=None)
        base = self.service.registry.specs[model].path
        return gr.update(visible=True, value=scale, info=f"{model} is a LoRA on {base}, listed at {scale:g}; 0 gives "
                         f"the base model's image, from {LORA_SCALE_RANGE[0]:g} to {LORA_SCALE_RANGE[1]:g}.")

    def text2img(self, prompt, negative_prompt, model, scheduler, num_inference_steps, guidance_scale, width,
                 height, seed, num_images, request: gr.Request, lora_scale=None):
        settings = settings_from(negative_prompt=negative_prompt, scheduler=scheduler, width=width, height=height,
                                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        with self.stops.running(request) as stop:
            call = partial(served, self.service.text2img, prompt, model, seed, int(num_images), settings, stop,
                           lora_scale)
            outcome = yield from stream(call, lambda step, images: (images, gr.skip(), gr.skip()), stop)
        yield [str(p) for p in outcome.paths], outcome.seeds[0], outcome.run

    def img2img(self, image, prompt, negative_prompt, model, scheduler, num_inference_steps, guidance_scale,
                strength, seed, resolution, request: gr.Request, lora_scale=None):
        if not image:
            raise gr.Error("Upload an image first.")
        settings = settings_from(negative_prompt=negative_prompt, scheduler=scheduler, strength=strength,
                                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        with self.stops.running(request) as stop:
            call = partial(served, self.service.img2img, image, prompt, model, seed, settings, int(resolution or 0),
                           stop, lora_scale)
            outcome = yield from stream(call, lambda step, images: (images[0], gr.skip(), gr.skip()), stop)
        yield str(outcome.paths[0]), outcome.seeds[0], outcome.run

    def random_batch(self, images, folder, models, prompt, seed, strength, num_inference_steps, guidance_scale,
                     scheduler, resolution, request: gr.Request, progress=gr.Progress()):
        items = [InputImage(Path(p).name, Path(p)) for p in images or []]
        if folder:
            items += served(self.service.folder_items, folder)
        settings = settings_from(scheduler=scheduler, strength=strength, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale)
        gallery = InFlight(others=3)  # previews after the finished images, the table, zip and record left as they are

        def shown(update):
            progress((update.done, update.total), desc="images", unit="images")
            return gallery.finished(batch_outputs(update))

        with self.stops.running(request) as stop:
            updates = partial(self.service.random_batch, items, models or [], prompt, seed, settings,
                              int(resolution or 0), stop)
            try:  # the batch checks its request when it starts, i.e. at the first iteration
                yield from stream(updates, gallery.preview, stop, shown)
            except SdtuneError as error:
                raise gr.Error(str(error)) from error


def queued(button, handlers: Handlers, handler, inputs, outputs, api_name: str):
    """`handler` as `button`'s event in the device queue, its Stop flag armed at the click, before it queues."""
    armed = button.click(handlers.stops.arm, None, None, api_visibility="private", queue=False)
    return armed.then(handler, inputs, outputs, api_name=api_name, concurrency_id=QUEUE,
                      concurrency_limit=handlers.service.backend.concurrency)  # Ray: one per replica


def default_size(service: Service) -> int:
    """The first model's native resolution (64 for the tiny world, 512 for SD v1-4), 512 when it is unreadable."""
    try:
        return service.registry.native_resolution(service.registry.names[0])
    except (IndexError, ModelUnavailable):
        return 512


def model_and_scale(handlers: Handlers, names):
    """The sampling controls and the request's LoRA scale, shown for a LoRA model only (Handlers.lora_scale_field)."""
    model, scheduler, steps, guidance = sampling_controls(names)
    # a Number, not a Slider: it can be empty (None), which is what an API call that leaves lora_scale out sends, so
    # such a call gets the model's listed scale; no bounds here, the service refuses a bad scale naming lora_scale
    scale = gr.Number(None, step=0.05, label="LoRA scale", visible=False)
    # triggers None: when the page loads and whenever the model changes
    gr.on(None, handlers.lora_scale_field, model, scale, api_visibility="private", queue=False)
    return model, scale, scheduler, steps, guidance


def run_buttons(label: str):
    """A tab's start and Stop buttons, right under its prompt: in view, with the result, above the settings."""
    with gr.Row():
        return gr.Button(label, variant="primary"), gr.Button("Stop")


def result_gallery(label: str, columns: int) -> gr.Gallery:
    """Generated images, each thumbnail whole (object_fit contain: Gradio crops them to squares by default).

    fit_columns=False: one image stays one column wide, where Gradio would widen it to the gallery's full width and
    so make it taller than the gallery's scroll box."""
    return gr.Gallery(label=label, format="png", columns=columns, fit_columns=False, object_fit="contain",
                      elem_classes=["sdtune-result"])


def text_tab(handlers: Handlers, names, size: int):
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=360):
            prompt = gr.Textbox(label="Prompt", lines=2)
            negative = gr.Textbox("", label="Negative prompt")  # a value, not None: optional for API callers
            run, stop = run_buttons("Generate")
            model, scale, scheduler, steps, guidance = model_and_scale(handlers, names)
            with gr.Row():
                width = gr.Slider(64, MAX_SIDE, value=size, step=8, label="Width")
                height = gr.Slider(64, MAX_SIDE, value=size, step=8, label="Height")
            with gr.Row():
                seed = gr.Number(-1, precision=0, label=f"Seed ({SEED_RANGE})")
                count = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images")
        with gr.Column(scale=3, min_width=360):
            gallery = result_gallery("Images", columns=2)  # a few images, large
            tools = result_tools(TEXT_TAB)
            seed_used, record = gr.Number(label="Seed used", precision=0), gr.JSON(label="Run")
    event = queued(run, handlers, handlers.text2img, [prompt, negative, model, scheduler, steps, guidance, width,
                                                      height, seed, count, scale], [gallery, seed_used, record],
                   "text2img")
    return event, stop, Form(TEXT_TAB, prompt, negative, model, scale, scheduler, steps, guidance, seed, gallery,
                             tools, width=width, height=height)


def image_tab(handlers: Handlers, names):
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=360):
            # image_mode=None: Gradio passes the file through undecoded; the service decodes it with its own limits
            source = gr.Image(type="filepath", image_mode=None, label="Input image", format="png", height=INPUT_HEIGHT)
            prompt = gr.Textbox(label="Prompt", lines=2)
            negative = gr.Textbox("", label="Negative prompt")  # a value, not None: optional for API callers
            run, stop = run_buttons("Generate")
            model, scale, scheduler, steps, guidance = model_and_scale(handlers, names)
            with gr.Row():
                strength, resolution = strength_and_resolution()
                seed = gr.Number(-1, precision=0, label=f"Seed ({SEED_RANGE})")
        with gr.Column(scale=3, min_width=360):
            result = gr.Image(label="Result", format="png", type="filepath", height=RESULT_HEIGHT,
                              elem_classes=["sdtune-result"])
            tools = result_tools(IMAGE_TAB)
            seed_used, record = gr.Number(label="Seed used", precision=0), gr.JSON(label="Run")
    event = queued(run, handlers, handlers.img2img, [source, prompt, negative, model, scheduler, steps, guidance,
                                                     strength, seed, resolution, scale], [result, seed_used, record],
                   "img2img")
    return event, stop, Form(IMAGE_TAB, prompt, negative, model, scale, scheduler, steps, guidance, seed, result,
                             tools, strength=strength, image=source)


def batch_tab(handlers: Handlers, names, allowed_root):
    gr.Markdown("Each image gets a model drawn at random (reproducibly from the batch seed and its file name) "
                "and, unless a prompt is given, the prompt written in its file name: `a_red_dragon.png` becomes "
                "\"a red dragon\".")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=360):
            uploads = gr.File(file_count="multiple", file_types=["image"], label="Images", height=INPUT_HEIGHT)
            folder = gr.Textbox(label=f"...or a folder under {allowed_root}")
            chosen = gr.CheckboxGroup(names, value=names, label="Models to draw from")
            prompt = gr.Textbox(label="Prompt (empty: from each file name)")
            run, stop = run_buttons("Run batch")
            with gr.Row():
                seed = gr.Number(0, precision=0, label=f"Batch seed ({SEED_RANGE})")
                strength, resolution = strength_and_resolution()
            _, scheduler, steps, guidance = sampling_controls()
        with gr.Column(scale=3, min_width=360):
            gallery = result_gallery("Outputs", columns=4)  # a batch: many, smaller
            table = gr.Dataframe(headers=TABLE_HEADERS, label="Results", interactive=False)
            archive, record = gr.File(label="All outputs (zip)"), gr.JSON(label="Run")
    event = queued(run, handlers, handlers.random_batch, [uploads, folder, chosen, prompt, seed, strength, steps,
                                                          guidance, scheduler, resolution],
                   [gallery, table, archive, record], "random_batch")
    return event, stop


def build_ui(service: Service) -> gr.Blocks:
    from sdtune.webui_compare import compare_tab  # imported here: it builds on this module's controls

    names, handlers = service.registry.names, Handlers(service)
    # delete_cache: Gradio copies every upload and output into its temp folder; drop copies older than a day
    with gr.Blocks(title="sdtune", delete_cache=(3600, 86400)) as demo:
        gr.Markdown("# sdtune: stock and fine-tuned Stable Diffusion", elem_classes=["sdtune-header"])
        gr.Markdown(model_status(service), elem_classes=["sdtune-header"])
        backend_status(service)
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id=TEXT_TAB):
                text_event, text_stop, text_form = text_tab(handlers, names, default_size(service))
            with gr.Tab("Image to image", id=IMAGE_TAB):
                image_event, image_stop, image_form = image_tab(handlers, names)
            with gr.Tab("Compare"):
                _, compare_stop = compare_tab(handlers, names, default_size(service))
            with gr.Tab("Random-model batch"):
                _, batch_stop = batch_tab(handlers, names, service.allowed_root_shown)
            with gr.Tab("PNG info", id=INFO_TAB):
                info = png_info_tab(service.registry)
        wire(text_form, image_form, info, tabs, service.registry, {TEXT_TAB: text_event, IMAGE_TAB: image_event})
        for button in (text_stop, image_stop, batch_stop, compare_stop):
            # a running generation stops at its next denoising step (a batch or comparison keeps what it finished
            # before: so it is stopped by its flag, not cancelled); a queued text or image request is cancelled, a
            # queued batch or comparison finds its flag set when it starts and ends at once
            button.click(handlers.stops.stop, None, None, cancels=[text_event, image_event],
                         api_visibility="private", queue=False)
    return demo


def batch_outputs(update):
    """Gallery, result table, zip and run record for one batch update."""
    gallery = [(str(row.output), f"{row.model}: {row.prompt}") for row in update.rows if row.output]
    table = [[row.file, row.model, row.prompt, row.seed, row.seconds, row.error] for row in update.rows]
    return gallery, table, str(update.zip_path) if update.zip_path else None, update.run
