"""The Compare tab and its API endpoint /compare: one prompt through several models side by side, the cells shown as
they come and the grid at the end (sdtune.app.compare does the work)."""

import gradio as gr

from sdtune.app.compare import CompareUpdate, compare
from sdtune.app.streaming import stream
from sdtune.app.ui.controls import (
    RESULT_HEIGHT,
    SEED_RANGE,
    queued,
    result_gallery,
    run_buttons,
    sampling_controls,
    served,
    settings_from,
)
from sdtune.app.ui.handlers import Handlers, whole
from sdtune.errors import SdtuneError
from sdtune.limits import MAX_COMPARE_CELLS, MAX_SIDE

COMPARE_TAB = "compare"  # the tab's id: the Train tab's Compare with base opens it
# (label, the API's value): the values are the names of what a row changes
AXIS_CHOICES = [("Seeds", "seed"), ("Guidance scale", "guidance_scale"), ("Steps", "num_inference_steps"),
                ("LoRA scale", "lora_scale")]


class CompareHandler:
    """The tab's event handler; its parameter names are the API's."""

    def __init__(self, handlers: Handlers):
        self.service, self.stops = handlers.service, handlers.stops

    def compare(self, prompt, negative_prompt, models, axis, values, seed, scheduler, num_inference_steps,
                guidance_scale, width, height, request: gr.Request, progress=gr.Progress(), run="",
                checkpoints=None):
        settings = settings_from(negative_prompt=negative_prompt, scheduler=scheduler, width=width, height=height,
                                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        seed = whole(seed, "seed")

        def shown(update: CompareUpdate):
            progress((len(update.cells), len(update.columns) * len(update.rows)), desc="cells", unit="cells")
            return compare_outputs(update)

        with self.stops.running(request) as stop:
            # run in stream's worker like the other tabs' generations, so that a cancel or a lost client stops the
            # cell in flight (and the rest) instead of waiting for it: a cell shows no previews
            def updates(show):  # a cell shows no previews: `show` goes unused
                return compare(self.service, prompt, models, axis, values, seed, settings, stop, run, checkpoints)

            try:  # the comparison checks its request when it starts, i.e. at the first iteration
                yield from stream(updates, None, stop, shown)
            except SdtuneError as error:
                raise gr.Error(str(error)) from error


    def run_checkpoints(self, run):
        """The chosen run's checkpoints (and its final model) to tick, all ticked."""
        if not str(run or "").strip():
            return gr.update(choices=[], value=[])
        choices = served(self.service.models.run_choices, run)
        return gr.update(choices=choices, value=choices)


def compare_outputs(update: CompareUpdate):
    """Grid, labelled cells, grid PNG and run record. The cells show as they come, each its own small PNG; the grid
    once, at the end: redrawn and re-encoded after every row, its work and the PNGs Gradio keeps of it for a day grew
    with the square of the rows (64 rows of 256 px: 41 s of 117, and 485 MiB in the temporary folder)."""
    grid = str(update.grid_path) if update.grid_path else gr.skip()
    gallery = [(str(cell.path), f"{cell.model}, {cell.row.label}") for cell in update.cells if cell.path]
    download = str(update.grid_path) if update.grid_path else None
    return grid, gallery, download, update.run


def compare_tab(handlers: Handlers, names, size: int):
    """The tab's controls and results; returns its Generate event, its Stop button, its model choice, and its prompt
    and seed (which the Train tab's Compare with base fills)."""
    handler = CompareHandler(handlers)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=360):
            prompt = gr.Textbox(label="Prompt", lines=2)
            negative = gr.Textbox("", label="Negative prompt")  # a value, not None: optional for API callers
            run, stop = run_buttons("Compare")
            models = gr.CheckboxGroup(names, value=names, label="Models (one column each)")
            with gr.Row():
                run_folder = gr.Textbox("", label=f"...and a training run's checkpoints: its folder under "
                                        f"{handlers.service.models.root_shown}", scale=3)
                listed = gr.Button("List checkpoints", size="sm", scale=1)
            checkpoints = gr.CheckboxGroup([], value=[], label="Checkpoints (one column each, after the models)")
            axis = gr.Radio(AXIS_CHOICES, value="seed", label="Rows")
            values = gr.Textbox("2", label="Values", info="Seeds: a count from the seed (\"4\") or a list "
                                f"(\"1, 2, 7\"); otherwise a list (\"3, 7.5, 12\"). At most {MAX_COMPARE_CELLS} "
                                "cells.")
            seed = gr.Number(-1, label=f"Seed ({SEED_RANGE})")
            _, scheduler, steps, guidance = sampling_controls()
            with gr.Row():
                width = gr.Slider(64, MAX_SIDE, value=size, step=8, label="Width")
                height = gr.Slider(64, MAX_SIDE, value=size, step=8, label="Height")
        with gr.Column(scale=3, min_width=360):
            grid = gr.Image(label="Grid", format="png", type="filepath", height=RESULT_HEIGHT,
                            elem_classes=["sdtune-result"])
            cells = result_gallery("Cells", columns=4)
            download, record = gr.File(label="Grid PNG"), gr.JSON(label="Run")
    event = queued(run, handlers, handler.compare, [prompt, negative, models, axis, values, seed, scheduler, steps,
                                                    guidance, width, height, run_folder, checkpoints],
                   [grid, cells, download, record], "compare")
    gr.on([listed.click, run_folder.submit], handler.run_checkpoints, run_folder, checkpoints,
          api_visibility="private", queue=False)
    return event, stop, models, (prompt, seed)
