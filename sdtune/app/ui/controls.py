"""What the tabs share: the device queue, per-session Stop flags, error handling, settings from form values, and the
common controls (sampling settings, model and LoRA scale, run buttons, result gallery)."""

import threading
from collections import OrderedDict
from contextlib import contextmanager

import gradio as gr

from sdtune.app.service import Service
from sdtune.errors import SdtuneError
from sdtune.generation.core import GenerationSettings, Interrupted
from sdtune.generation.registry import ModelUnavailable
from sdtune.generation.schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from sdtune.limits import GUIDANCE_SCALE_RANGE, MAX_SIDE, SEED_LIMIT, STEPS_RANGE

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
