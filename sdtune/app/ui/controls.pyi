"""What the tabs share: the device queue, per-session Stop flags, error handling, settings from form values, and the
common controls (sampling settings, model and LoRA scale, run buttons, result gallery)."""

import base64
import binascii
import io
import threading
from collections import OrderedDict
from contextlib import contextmanager

import gradio as gr
from gradio import processing_utils

from sdtune.app.service import Service
from sdtune.data.images import BadImageError, header_size
from sdtune.errors import SdtuneError
from sdtune.generation.core import GenerationSettings, Interrupted
from sdtune.generation.registry import ModelUnavailable
from sdtune.generation.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from sdtune.limits import GUIDANCE_SCALE_RANGE, MAX_SIDE, SEED_LIMIT, STEPS_RANGE, check_whole

QUEUE = "device"  # every generating event shares one concurrency slot: one generation on the device at a time
SEED_RANGE = f"0 to {SEED_LIMIT - 1}; -1 = random"
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


def sampling_controls(names=None):
    """Scheduler, steps and guidance (and the model, when `names` is given): controls the tabs share."""
    with gr.Row():
        model = gr.Dropdown(names, value=names[0], label="Model") if names else None
        scheduler = gr.Dropdown(list(SCHEDULERS), value=DEFAULT_SCHEDULER, label="Scheduler")
    with gr.Row():
        steps = gr.Slider(*STEPS_RANGE, value=25, step=1, label="Steps")
        guidance = gr.Slider(*GUIDANCE_SCALE_RANGE, value=7.5, step=0.5, label="Guidance scale")
    return model, scheduler, steps, guidance


def strength_and_resolution():
    strength = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Strength")
    resolution = gr.Slider(0, MAX_SIDE, value=0, step=8, label="Working resolution (0 = model's own)")
    return strength, resolution


def queued(button, handlers, handler, inputs, outputs, api_name: str):
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


def model_and_scale(handlers, names):
    """The sampling controls and the request's LoRA scale, shown for a LoRA model only (Handlers.lora_scale_field)."""
    model, scheduler, steps, guidance = sampling_controls(names)
    # a Number, not a Slider: it can be empty (None), which is what an API call that leaves lora_scale out sends, so
    # such a call gets the model's listed scale; no bounds here, the service refuses a bad scale naming lora_scale
    scale = gr.Number(None, step=0.05, label="LoRA scale", visible=False)
    # triggers None: when the page loads and whenever the model changes
    gr.on(None, handlers.lora_scale_field, model, scale, api_visibility="private", queue=False)
    return model, scale, scheduler, steps, guidance

from gradio.events import Dependency

class UploadedImage(gr.Image):
    """An image input that hands its handler the uploaded file itself, undecoded, for the service to decode with its
    own limits. Gradio's gr.Image opens every upload with Pillow first (whose errors name the file in the server's
    upload folder), and decodes a `data:` URL whole and re-saves it, before any check of its size: a 13000x13000 PNG
    of 490 KB took 1.3 GB. Here a data: URL's size is read from its header and an image over `max_pixels` refused
    before anything is decoded; the bytes of one within it are kept as a file, as an upload would be."""

    is_template = True  # the browser shows it as the gr.Image it is (Block.get_block_name)

    def __init__(self, *args, max_pixels: int, **kwargs):
        super().__init__(*args, type="filepath", image_mode=None, **kwargs)
        self.max_pixels = max_pixels

    def preprocess(self, payload) -> str | None:
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):
            return self.kept_data_url(payload.url)
        return payload.path  # Gradio checked it is an upload of this server's (only those reach preprocess)

    def kept_data_url(self, url: str) -> str:
        try:
            data = base64.b64decode(url.partition(",")[2])
            header_size(io.BytesIO(data), self.max_pixels)
        except binascii.Error as error:
            raise gr.Error(f"Input image: the data: URL is not base64 ({error}).") from error
        except BadImageError as error:
            raise gr.Error(f"Input image: {error}") from error
        return processing_utils.save_bytes_to_cache(data, "image.png", self.GRADIO_CACHE)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class WholeNumber(gr.Number):
    """A number the handler takes as an int. gr.Number(precision=0) rounds what it is sent (a seed of 1.5 becomes 2)
    before the handler can see it; this refuses a fraction, naming the parameter."""

    is_template = True  # the browser shows it as the gr.Number it is (Block.get_block_name)

    def __init__(self, *args, name: str, **kwargs):
        super().__init__(*args, precision=0, **kwargs)
        self.name = name

    def preprocess(self, payload) -> int | None:
        if payload is not None:
            served(check_whole, payload, self.name)
        return super().preprocess(payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


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