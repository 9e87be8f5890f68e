"""The text to image, image to image and random-model batch tabs: controls left, results right."""

import gradio as gr

from sdtune.app.ui.components import UploadedImage
from sdtune.app.ui.controls import (
    INPUT_HEIGHT,
    RESULT_HEIGHT,
    SEED_RANGE,
    model_and_scale,
    queued,
    result_gallery,
    run_buttons,
    sampling_controls,
    strength_and_resolution,
)
from sdtune.app.ui.handlers import Handlers
from sdtune.app.ui.recall_tab import IMAGE_TAB, TEXT_TAB, Form, result_tools
from sdtune.generation.lora_stack import MAX_STACK
from sdtune.limits import MAX_IMAGES, MAX_SIDE

TABLE_HEADERS = ["file", "model", "prompt", "seed", "seconds", "error"]


def lora_rows() -> gr.Dataframe:
    """The request's LoRA stack: rows of (LoRA model, weight) applied beside the chosen model, as the prompt's
    <lora:NAME:WEIGHT> tokens are (sdtune/generation/lora_stack.py)."""
    with gr.Accordion("LoRA stack", open=False):
        return gr.Dataframe([["", 1.0]], headers=["LoRA", "weight"], datatype=["str", "number"], type="array",
                            row_count=1, column_count=2, label=f"LoRA models and weights (at most {MAX_STACK})",
                            show_label=False)


def trigger_button(handlers: Handlers, model, prompt) -> None:
    """One click puts the chosen model's trigger words (its training settings' or its LoRA file's tags) in the
    prompt."""
    button = gr.Button("Add the model's trigger words to the prompt", size="sm")
    button.click(handlers.add_trigger_words, [model, prompt], prompt, api_visibility="private", queue=False)


def prompt_and_model(handlers: Handlers, names):
    """The text and image tabs' shared column head: prompt, negative prompt, Generate and Stop under them, the model
    with its LoRA scale and sampling settings, the trigger-words button and the LoRA stack."""
    prompt = gr.Textbox(label="Prompt", lines=2)
    negative = gr.Textbox("", label="Negative prompt")  # a value, not None: optional for API callers
    run, stop = run_buttons("Generate")
    model, scale, scheduler, steps, guidance = model_and_scale(handlers, names)
    trigger_button(handlers, model, prompt)
    return prompt, negative, run, stop, model, scale, scheduler, steps, guidance, lora_rows()


def text_tab(handlers: Handlers, names, size: int):
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=360):
            prompt, negative, run, stop, model, scale, scheduler, steps, guidance, loras = prompt_and_model(
                handlers, names)
            with gr.Row():
                width = gr.Slider(64, MAX_SIDE, value=size, step=8, label="Width")
                height = gr.Slider(64, MAX_SIDE, value=size, step=8, label="Height")
            with gr.Row():
                seed = gr.Number(-1, label=f"Seed ({SEED_RANGE})")
                count = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images")
        with gr.Column(scale=3, min_width=360):
            gallery = result_gallery("Images", columns=2)  # a few images, large
            tools = result_tools(TEXT_TAB)
            seed_used, record = gr.Number(label="Seed used", precision=0), gr.JSON(label="Run")
    event = queued(run, handlers, handlers.text2img, [prompt, negative, model, scheduler, steps, guidance, width,
                                                      height, seed, count, scale, loras],
                   [gallery, seed_used, record], "text2img")
    return event, stop, Form(TEXT_TAB, prompt, negative, model, scale, scheduler, steps, guidance, seed, gallery,
                             tools, width=width, height=height)


def image_tab(handlers: Handlers, names):
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=360):
            source = UploadedImage(max_pixels=handlers.service.max_upload_pixels, label="Input image", format="png",
                                   height=INPUT_HEIGHT)
            prompt, negative, run, stop, model, scale, scheduler, steps, guidance, loras = prompt_and_model(
                handlers, names)
            with gr.Row():
                strength, resolution = strength_and_resolution()
                seed = gr.Number(-1, label=f"Seed ({SEED_RANGE})")
        with gr.Column(scale=3, min_width=360):
            result = gr.Image(label="Result", format="png", type="filepath", height=RESULT_HEIGHT,
                              elem_classes=["sdtune-result"])
            tools = result_tools(IMAGE_TAB)
            seed_used, record = gr.Number(label="Seed used", precision=0), gr.JSON(label="Run")
    event = queued(run, handlers, handlers.img2img, [source, prompt, negative, model, scheduler, steps, guidance,
                                                     strength, seed, resolution, scale, loras],
                   [result, seed_used, record], "img2img")
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
                seed = gr.Number(0, label=f"Batch seed ({SEED_RANGE})")
                strength, resolution = strength_and_resolution()
            _, scheduler, steps, guidance = sampling_controls()
        with gr.Column(scale=3, min_width=360):
            gallery = result_gallery("Outputs", columns=4)  # a batch: many, smaller
            table = gr.Dataframe(headers=TABLE_HEADERS, label="Results", interactive=False)
            archive, record = gr.File(label="All outputs (zip)"), gr.JSON(label="Run")
    event = queued(run, handlers, handlers.random_batch, [uploads, folder, chosen, prompt, seed, strength, steps,
                                                          guidance, scheduler, resolution],
                   [gallery, table, archive, record], "random_batch")
    return event, stop, chosen
