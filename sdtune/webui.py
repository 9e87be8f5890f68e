"""The Gradio UI and API of gradio_app.py: text to image, image to image and the random-model batch.

Handlers keep the API's parameter names (prompt, model, num_inference_steps, ...): Gradio publishes them as the
named endpoints /text2img, /img2img and /random_batch. Generation runs one request at a time through the queue.
"""

import threading
from pathlib import Path

import gradio as gr

from sdtune.generate import SCHEDULERS, GenerationSettings, Interrupted
from sdtune.serving import MAX_IMAGES, MAX_SIDE, BatchItem, RequestError, Service

QUEUE = "device"  # every generating event shares one concurrency slot: one generation on the device at a time
TABLE_HEADERS = ["file", "model", "prompt", "seed", "seconds", "error"]


class StopSignals:
    """One stop flag per browser session, so Stop only stops its own user's generation."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def fresh(self, request: gr.Request | None) -> threading.Event:
        with self._lock:
            event = self._events[_session(request)] = threading.Event()
        return event

    def stop(self, request: gr.Request | None) -> None:
        with self._lock:
            event = self._events.get(_session(request))
        if event is not None:
            event.set()


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def served(function, *args):
    """Run a service call, turning the user's errors into a gr.Error (the server stays up)."""
    try:
        return function(*args)
    except (RequestError, Interrupted) as error:
        raise gr.Error(str(error)) from error


def settings_from(negative_prompt, scheduler, num_inference_steps, guidance_scale, width=512, height=512,
                  strength=0.75) -> GenerationSettings:
    try:
        return GenerationSettings(num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale),
                                  width=int(width), height=int(height), negative_prompt=negative_prompt or None,
                                  scheduler=scheduler, strength=float(strength))
    except (TypeError, ValueError) as error:
        raise gr.Error(f"Invalid setting: {error}") from error


def model_status(service: Service) -> str:
    registry = service.registry
    lines = [f"Models: {', '.join(registry.names)} on {registry.device.type}."]
    for name, reason in registry.errors.items():
        lines.append(f"**{name} failed to load** and is unavailable: {reason}")
    return "\n\n".join(lines)


def sampling_controls(names):
    """Model, scheduler, steps and guidance: the controls every tab shares."""
    with gr.Row():
        model = gr.Dropdown(names, value=names[0], label="Model")
        scheduler = gr.Dropdown(list(SCHEDULERS), value="dpmsolver++", label="Scheduler")
    with gr.Row():
        steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
        guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance scale")
    return model, scheduler, steps, guidance


def build_ui(service: Service) -> gr.Blocks:
    names = service.registry.names
    stops = StopSignals()

    def text2img(prompt, negative_prompt, model, scheduler, num_inference_steps, guidance_scale, width, height,
                 seed, num_images, request: gr.Request):
        settings = settings_from(negative_prompt, scheduler, num_inference_steps, guidance_scale, width, height)
        outcome = served(service.text2img, prompt, model, seed, int(num_images), settings, stops.fresh(request))
        return [str(p) for p in outcome.paths], outcome.seeds[0], outcome.run

    def img2img(image, prompt, negative_prompt, model, scheduler, num_inference_steps, guidance_scale, strength,
                seed, resolution, request: gr.Request):
        if not image:
            raise gr.Error("Upload an image first.")
        settings = settings_from(negative_prompt, scheduler, num_inference_steps, guidance_scale, strength=strength)
        outcome = served(service.img2img, image, prompt, model, seed, settings, int(resolution or 0),
                         stops.fresh(request))
        return str(outcome.paths[0]), outcome.seeds[0], outcome.run

    def random_batch(images, folder, models, prompt, seed, strength, num_inference_steps, guidance_scale, scheduler,
                     resolution, request: gr.Request, progress=gr.Progress()):
        items = [BatchItem(Path(p).name, Path(p)) for p in images or []]
        if folder:
            items += served(service.folder_items, folder)
        settings = settings_from(None, scheduler, num_inference_steps, guidance_scale, strength=strength)
        updates = service.random_batch(items, models or [], prompt, seed, settings, int(resolution or 0),
                                       stops.fresh(request))
        try:  # the batch checks its request when it starts, i.e. at the first iteration
            for update in updates:
                progress((update.done, update.total), desc="images", unit="images")
                yield batch_outputs(update)
        except RequestError as error:
            raise gr.Error(str(error)) from error

    with gr.Blocks(title="sdtune") as demo:
        gr.Markdown("# sdtune: stock and fine-tuned Stable Diffusion")
        gr.Markdown(model_status(service))
        with gr.Tab("Text to image"):
            prompt = gr.Textbox(label="Prompt", lines=2)
            negative = gr.Textbox(label="Negative prompt")
            model, scheduler, steps, guidance = sampling_controls(names)
            with gr.Row():
                width = gr.Slider(64, MAX_SIDE, value=512, step=8, label="Width")
                height = gr.Slider(64, MAX_SIDE, value=512, step=8, label="Height")
                seed = gr.Number(-1, precision=0, label="Seed (-1 = random)")
                count = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images")
            with gr.Row():
                run_t2i, stop_t2i = gr.Button("Generate", variant="primary"), gr.Button("Stop")
            gallery = gr.Gallery(label="Images", format="png", columns=4)
            seed_used, metrics_t2i = gr.Number(label="Seed used", precision=0), gr.JSON(label="Run")
            t2i_event = run_t2i.click(text2img, [prompt, negative, model, scheduler, steps, guidance, width, height,
                                                 seed, count], [gallery, seed_used, metrics_t2i],
                                      api_name="text2img", concurrency_id=QUEUE, concurrency_limit=1)
        with gr.Tab("Image to image"):
            source = gr.Image(type="filepath", image_mode=None, label="Input image", format="png")
            prompt_i = gr.Textbox(label="Prompt", lines=2)
            negative_i = gr.Textbox(label="Negative prompt")
            model_i, scheduler_i, steps_i, guidance_i = sampling_controls(names)
            with gr.Row():
                strength = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Strength")
                seed_i = gr.Number(-1, precision=0, label="Seed (-1 = random)")
                resolution = gr.Slider(0, MAX_SIDE, value=0, step=8, label="Working resolution (0 = model's own)")
            with gr.Row():
                run_i2i, stop_i2i = gr.Button("Generate", variant="primary"), gr.Button("Stop")
            result = gr.Image(label="Result", format="png", type="filepath")
            seed_used_i, metrics_i2i = gr.Number(label="Seed used", precision=0), gr.JSON(label="Run")
            i2i_event = run_i2i.click(img2img, [source, prompt_i, negative_i, model_i, scheduler_i, steps_i,
                                                guidance_i, strength, seed_i, resolution],
                                      [result, seed_used_i, metrics_i2i], api_name="img2img",
                                      concurrency_id=QUEUE, concurrency_limit=1)
        with gr.Tab("Random-model batch"):
            gr.Markdown("Each image gets a model drawn at random (reproducibly from the batch seed and its file "
                        "name) and, unless a prompt is given, the prompt written in its file name: "
                        "`a_red_dragon.png` becomes \"a red dragon\".")
            uploads = gr.File(file_count="multiple", file_types=["image"], label="Images")
            folder = gr.Textbox(label=f"...or a folder under {service.allowed_root}")
            chosen = gr.CheckboxGroup(names, value=names, label="Models to draw from")
            prompt_b = gr.Textbox(label="Prompt (empty: from each file name)")
            with gr.Row():
                seed_b = gr.Number(0, precision=0, label="Batch seed (-1 = random)")
                strength_b = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="Strength")
                resolution_b = gr.Slider(0, MAX_SIDE, value=0, step=8, label="Working resolution (0 = model's own)")
            _, scheduler_b, steps_b, guidance_b = sampling_controls(names)
            with gr.Row():
                run_b, stop_b = gr.Button("Run batch", variant="primary"), gr.Button("Stop")
            gallery_b = gr.Gallery(label="Outputs", format="png", columns=4)
            table = gr.Dataframe(headers=TABLE_HEADERS, label="Results", interactive=False)
            archive, metrics_b = gr.File(label="All outputs (zip)"), gr.JSON(label="Run")
            run_b.click(random_batch, [uploads, folder, chosen, prompt_b, seed_b, strength_b, steps_b, guidance_b,
                                       scheduler_b, resolution_b], [gallery_b, table, archive, metrics_b],
                        api_name="random_batch", concurrency_id=QUEUE, concurrency_limit=1)
        for button in (stop_t2i, stop_i2i, stop_b):
            # a running generation stops at its next denoising step; a queued one is cancelled
            button.click(stops.stop, None, None, cancels=[t2i_event, i2i_event], api_visibility="private",
                         queue=False)
    return demo


def batch_outputs(update):
    """Gallery, result table, zip and run record for one batch update."""
    gallery = [(str(row.output), f"{row.model}: {row.prompt}") for row in update.rows if row.output]
    table = [[row.file, row.model, row.prompt, row.seed, row.seconds, row.error] for row in update.rows]
    return gallery, table, str(update.zip_path) if update.zip_path else None, update.run
