"""The text to image, image to image and random-batch handlers. Their parameter names are the API's: Gradio publishes
them as the named endpoints /text2img, /img2img and /random_batch."""

from functools import partial
from pathlib import Path

import gradio as gr

from sdtune.app.model_info import served_base_name
from sdtune.app.service import Service
from sdtune.app.streaming import InFlight, stream
from sdtune.app.ui.controls import StopSignals, served, settings_from
from sdtune.data.folders import InputImage
from sdtune.errors import SdtuneError
from sdtune.generation.lora_stack import stack_from_rows
from sdtune.limits import LORA_SCALE_RANGE, check_whole


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
        base = served_base_name(self.service.registry.specs, self.service.registry.specs[model])
        return gr.update(visible=True, value=scale, info=f"{model} is a LoRA on {base}, listed at {scale:g}; 0 gives "
                         f"the base model's image, from {LORA_SCALE_RANGE[0]:g} to {LORA_SCALE_RANGE[1]:g}.")

    def add_trigger_words(self, model, prompt):
        """The prompt with the model's trigger words put in front (those it does not hold yet)."""
        words = self.service.models.trigger_words(model)
        if not words:
            gr.Warning(f"{model}: its files name no trigger words.")
            return gr.skip()
        missing = [word for word in words if word not in (prompt or "")]
        return ", ".join([*missing, prompt] if prompt else missing)

    def text2img(self, prompt, negative_prompt, model, scheduler, num_inference_steps, guidance_scale, width,
                 height, seed, num_images, request: gr.Request, lora_scale=None, loras=None):
        settings = settings_from(negative_prompt=negative_prompt, scheduler=scheduler, width=width, height=height,
                                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        with self.stops.running(request) as stop:
            call = partial(served, with_stack(self.service.text2img, loras), prompt, model, whole(seed, "seed"),
                           whole(num_images, "num_images"),
                           settings, stop, lora_scale)
            outcome = yield from stream(call, lambda step, images: (images, gr.skip(), gr.skip()), stop)
        yield [str(p) for p in outcome.paths], outcome.seeds[0], outcome.run

    def img2img(self, image, prompt, negative_prompt, model, scheduler, num_inference_steps, guidance_scale,
                strength, seed, resolution, request: gr.Request, lora_scale=None, loras=None):
        if not image:
            raise gr.Error("Upload an image first.")
        settings = settings_from(negative_prompt=negative_prompt, scheduler=scheduler, strength=strength,
                                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        with self.stops.running(request) as stop:
            call = partial(served, with_stack(self.service.img2img, loras), image, prompt, model,
                           whole(seed, "seed"), settings,
                           whole(resolution or 0, "resolution"), stop, lora_scale)
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
            updates = partial(self.service.random_batch, items, models or [], prompt, whole(seed, "seed"), settings,
                              whole(resolution or 0, "resolution"), stop)
            try:  # the batch checks its request when it starts, i.e. at the first iteration
                yield from stream(updates, gallery.preview, stop, shown)
            except SdtuneError as error:
                raise gr.Error(str(error)) from error


def whole(value, name: str) -> int:
    """A number box's or slider's value as an int; a fraction sent through the API (a seed of 1.5, 2.7 images) is
    refused, not rounded (gr.Number(precision=0) would round it before the handler sees it)."""
    return served(check_whole, value, name)


def with_stack(call, loras):
    """The service call with the LoRA stack rows that name a LoRA (the table's empty rows are no stack)."""
    rows = served(stack_from_rows, loras)
    return partial(call, loras=rows) if rows else call


def batch_outputs(update):
    """Gallery, result table, zip and run record for one batch update."""
    gallery = [(str(row.output), f"{row.model}: {row.prompt}") for row in update.rows if row.output]
    table = [[row.file, row.model, row.prompt, row.seed, row.seconds, row.error] for row in update.rows]
    return gallery, table, str(update.zip_path) if update.zip_path else None, update.run
