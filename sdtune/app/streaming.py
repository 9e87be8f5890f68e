"""Live previews in Gradio's generator handlers: the generation, which blocks, runs in a worker thread, and the
handler yields the previews it shows as they come, then its result. A handler wires it in with a few lines:

    call = partial(served, service.text2img, prompt, ...)  # the service call; stream adds its `preview` argument
    outcome = yield from stream(call, lambda step, images: (images, gr.skip(), gr.skip()), stop)
    yield outputs_of(outcome)
"""

import queue
import threading
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import gradio as gr

_PREVIEW, _ITEM, _DONE, _FAILED = "preview", "item", "done", "failed"  # what the worker hands the handler
# threads kept between calls: torch ran a generation about 20% slower in a thread started for it than in one reused;
# as many as requests may run at once (one per Ray replica), so none waits here for a thread
_WORKERS = ThreadPoolExecutor(max_workers=64, thread_name_prefix="sdtune-generation")
# Gradio sees a client's cancel or disconnect only between a generator handler's yields: it runs the blocking next()
# in a thread nothing interrupts, and closes the handler (which sets the Stop flag) once next() returns. A handler
# with nothing to show for this long (a Ray replica sends no previews, Compare none within a cell) yields a no-change
# update, so a cancel lands within about this long instead of when the whole request ends.
IDLE_SECONDS = 1.0


def stream(call: Callable[[Callable], Any], on_preview: Callable[..., Any] | None, stop: threading.Event,
           on_item: Callable[[Any], Any] | None = None) -> Generator[Any, None, Any]:
    """Run `call(show)` in a worker thread, and yield here on_preview(*args) for each show(*args) it makes, as they
    come; return what `call` returned, or raise here what it raised (a gr.Error stays the same gr.Error).

    With `on_item`, `call` returns an iterable (the batch's updates) that the worker runs too; each item is yielded
    as on_item(item), in order with the previews. The mapping functions run in this, the handler's, thread.

    `stop` is the generation's Stop flag: closed early (a cancelled event, a browser that went away), the handler
    sets it, so the worker ends at its next denoising step instead of running on unwatched beside the next request
    that Gradio lets onto the device. With nothing to show for IDLE_SECONDS it yields gr.skip() (every output left
    as it is), so that a cancel or a lost client reaches it while the worker runs."""
    feed = queue.SimpleQueue()
    _WORKERS.submit(_work, call, on_item is not None, feed)
    try:
        while True:
            try:
                kind, payload = feed.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                yield gr.skip()
                continue
            if kind == _DONE:
                return payload
            if kind == _FAILED:
                raise payload
            yield on_preview(*payload) if kind == _PREVIEW else on_item(payload)
    except GeneratorExit:
        stop.set()
        raise


def _work(call: Callable[[Callable], Any], iterate: bool, feed: queue.SimpleQueue) -> None:
    """The worker: its previews, items and outcome all go to `feed`; nothing is raised in this thread."""
    try:
        result = call(lambda *args: feed.put((_PREVIEW, args)))
        if iterate:
            for item in result:
                feed.put((_ITEM, item))
            result = None
        feed.put((_DONE, result))
    except BaseException as error:  # handed to the handler's thread, which raises it
        feed.put((_FAILED, error))


class InFlight:
    """A gallery of finished images followed by previews of the images in flight (the batch tab's), the handler's
    `others` outputs after the gallery left as they are while a preview shows."""

    def __init__(self, others: int):
        self.done, self.others = [], others

    def finished(self, outputs: tuple) -> tuple:
        """The outputs of an update, whose gallery (the first) the next previews follow."""
        self.done = list(outputs[0])
        return outputs

    def preview(self, step: int, images: list) -> tuple:
        in_flight = [(image, f"in progress: step {step}") for image in images]
        return self.done + in_flight, *[gr.skip()] * self.others
