"""The Train tab (gradio_app.py --train): on the left the form for one job (sdtune/app/ui/train_form.py), on the right
the caller's jobs, the chosen job's live view and its controls (sdtune/app/ui/train_live.py), refreshed by a timer.

Its events skip the generation queue (queue=False): they are quick (the trainer runs in its own process) and must
not wait behind a generation. They are private: the API's way in is /train_start and the others (train_api.py).
"""

from dataclasses import dataclass

import gradio as gr

from sdtune.app.ui.models_tab import BaseList
from sdtune.app.ui.train_form import FILLED, FORM_FIELDS, METHODS, RECIPE_BASE, SOURCES, TrainForm
from sdtune.app.ui.train_live import LOSS_COLUMNS, TrainLive, loss_frame
from sdtune.jobs.uploads import MAX_UPLOAD_IMAGES

DEFAULT_RECIPE = "pokemon-lora"  # the project's LoRA recipe: a page opens filled in, LoRA being the default method
REFRESH_SECONDS = 3  # the live view's period: the status reads a few file tails, so this costs the trainer nothing
QUICK = dict(queue=False, api_visibility="private")


@dataclass
class CompareTargets:
    """The Compare tab's controls that Compare with base fills, and the tabs to switch."""

    tabs: gr.Tabs
    prompt: gr.Textbox
    models: gr.CheckboxGroup
    seed: gr.Number


def train_tab(jobs, service, compare: CompareTargets) -> BaseList:
    """The tab's controls and their events; returns its base model picker, which follows the served models."""
    form, live = TrainForm(jobs, service.registry, service.models.root), TrainLive(jobs, service.registry)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=360):
            controls, start, message = job_form(form)
        with gr.Column(scale=3, min_width=360):
            view = live_view()
    wire_form(form, controls)
    shown = wire_live(live, view, compare)
    started = gr.State(None)  # the new job's id, chosen in the list once the list holds it
    start.click(form.start, [controls[key] for key in FORM_FIELDS], [message, started], **QUICK).then(
        live.job_list, started, [view["list"], view["job"]], **QUICK).then(
        live.view, [view["job"], view["shown"]], shown, **QUICK)
    return BaseList(controls["base"], form.bases)


def job_form(form: TrainForm):
    """The form's controls by JobForm field name, its Start button and its message."""
    c = {}
    recipe = DEFAULT_RECIPE if DEFAULT_RECIPE in form.recipes() else None
    *filled, method = form.recipe_values(recipe) if recipe else [None] * len(FILLED) + ["lora"]
    c["name"] = gr.Textbox("", label="Job name", info="Also the served model's name when the job is done.")
    c["recipe"] = gr.Dropdown(form.recipes(), value=recipe, label="Recipe (configs/)",
                              info="Its settings fill the form; anything not in the form keeps the recipe's value.")
    c["method"] = gr.Radio(METHODS, value=method, label="Method")
    with gr.Row(visible=False) as subject:
        c["instance_prompt"] = gr.Textbox("", label="Instance prompt", placeholder="a photo of sks dog")
        c["class_prompt"] = gr.Textbox("", label="Class prompt (prior preservation; empty: none)",
                                       placeholder="a photo of dog")
    c["base"] = gr.Dropdown(form.bases(), value=RECIPE_BASE, allow_custom_value=True, label="Base model",
                            info="A served model, or a folder under the models root, or a hub id.")
    c["source"] = gr.Radio(SOURCES, value="folder", label="Training images")
    with gr.Row() as folder_row:
        c["folder"] = gr.Dropdown(form.data_folders(), value=None, label="Folder under the data root", scale=4)
        refresh = gr.Button("Refresh", size="sm", scale=1)
    c["dataset"] = gr.Textbox("", label="Hub dataset (owner/name)", visible=False)
    with gr.Group(visible=False) as upload:
        c["files"] = gr.File(file_count="multiple", label=f"Images (at most {MAX_UPLOAD_IMAGES}) with .txt captions "
                             "or a metadata.jsonl")
        c["captions"] = gr.Dataframe(headers=["file", "caption"], column_count=2, interactive=True,
                                     label="Captions (editable; written as .txt files beside the images)")
    c.update(settings(dict(zip(FILLED, filled))))
    c["advanced"] = gr.Textbox("", lines=3, label="Advanced: other trainer flags as YAML",
                               placeholder="snr_gamma: 5.0\nlr_scheduler: cosine",
                               info="Names as train_text_to_image.py --help shows them, without the dashes.")
    start = gr.Button("Start", variant="primary")
    message = gr.Markdown()
    c["_rows"] = (subject, folder_row, upload, refresh)
    return c, start, message


def settings(values: dict) -> dict:
    """The settings people change, with `values` (a recipe's, by FILLED name; None: empty); a recipe fills them."""
    c = {}
    with gr.Row():
        c["max_train_steps"] = gr.Number(values["max_train_steps"], label="Steps", precision=0, minimum=1)
        c["learning_rate"] = gr.Number(values["learning_rate"], label="Learning rate")
        c["lora_rank"] = gr.Number(values["lora_rank"], label="LoRA rank", precision=0, minimum=0)
    with gr.Row():
        c["resolution"] = gr.Number(values["resolution"], label="Resolution", precision=0, minimum=8)
        c["train_batch_size"] = gr.Number(values["train_batch_size"], label="Batch", precision=0, minimum=1)
        c["checkpointing_steps"] = gr.Number(values["checkpointing_steps"], label="Checkpoint every (steps)",
                                             precision=0, minimum=1)
    c["validation_prompts"] = gr.Textbox(values["validation_prompts"] or "", lines=2,
                                         label="Validation prompts (one a line)")
    with gr.Row():
        c["validation_epochs"] = gr.Number(values["validation_epochs"], label="Validate every (epochs)", precision=0,
                                           minimum=1)
        c["validation_steps"] = gr.Number(values["validation_steps"] or 0, label="...or every (steps; 0: by epochs)",
                                          precision=0, minimum=0)
        seed = values["seed"]
        c["seed"] = gr.Number(-1 if seed is None else seed, label="Seed (-1: drawn)", precision=0, minimum=-1)
    return c


def live_view() -> dict:
    """The job picker and list, the live view, and the controls."""
    v = {"timer": gr.Timer(REFRESH_SECONDS)}
    v["job"] = gr.Dropdown([], value=None, label="Job")
    v["list"] = gr.Dataframe(headers=["Job", "Name", "State", "Error"], interactive=False, label="Your jobs",
                             max_height=200)
    v["state"] = gr.Markdown()
    with gr.Row():
        v["train_loss"] = gr.LinePlot(loss_frame([]), x=LOSS_COLUMNS[0], y=LOSS_COLUMNS[1], label="Training loss")
        v["validation_loss"] = gr.LinePlot(loss_frame([]), x=LOSS_COLUMNS[0], y=LOSS_COLUMNS[1],
                                           label="Validation loss")
    v["grid"] = gr.Gallery(label="Validation grids (newest first)", columns=6, height="auto", preview=True,
                           selected_index=0, interactive=False)
    v["log"] = gr.Textbox(label="Log (last lines)", lines=8, max_lines=20, interactive=False)
    v["shown"] = gr.State(None)  # what this page shows now, so that a tick leaves unchanged plots undrawn
    with gr.Row():
        for name in ("Stop", "Cancel", "Resume", "Delete"):
            v[name] = gr.Button(name, size="sm", variant="stop" if name == "Delete" else "secondary")
    with gr.Row(visible=False) as confirm:
        v["Yes, delete"], v["Keep"] = gr.Button("Yes, delete", variant="stop", size="sm"), gr.Button("Keep", size="sm")
    v["confirm"], v["pending"] = confirm, gr.State(None)
    with gr.Row():
        for name in ("Save now", "Sample now", "Score", "Compare with base"):
            v[name] = gr.Button(name, size="sm")
    v["message"] = gr.Markdown()
    return v


def wire_form(form: TrainForm, c: dict) -> None:
    subject, folder_row, upload, refresh = c["_rows"]
    c["recipe"].change(form.recipe_values, c["recipe"], [*(c[key] for key in FILLED), c["method"]], **QUICK)
    c["method"].change(lambda method: gr.update(visible=method == "subject"), c["method"], subject, **QUICK)
    c["source"].change(lambda source: (gr.update(visible=source == "folder"), gr.update(visible=source == "hub"),
                                       gr.update(visible=source == "upload")),
                       c["source"], [folder_row, c["dataset"], upload], **QUICK)
    refresh.click(form.refresh_folders, None, c["folder"], **QUICK)
    c["files"].change(form.upload_table, c["files"], c["captions"], **QUICK)


def wire_live(live: TrainLive, v: dict, compare: CompareTargets) -> list:
    """The timer's refresh and the controls' events; returns the live view's outputs."""
    shown = [v["state"], v["train_loss"], v["validation_loss"], v["grid"], v["log"], v["shown"]]
    v["timer"].tick(live.job_list, v["job"], [v["list"], v["job"]], show_progress="hidden", **QUICK).then(
        live.view, [v["job"], v["shown"]], shown, show_progress="hidden", **QUICK)
    v["job"].input(live.view, [v["job"], v["shown"]], shown, **QUICK)
    for name in ("Stop", "Cancel", "Resume"):
        v[name].click(live.control(name.lower()), v["job"], v["message"], **QUICK)
    confirm = [v["confirm"], v["pending"], v["message"]]
    v["Delete"].click(live.ask_delete, v["job"], confirm, **QUICK)
    v["Yes, delete"].click(live.confirm_delete, v["pending"], confirm, **QUICK)
    v["Keep"].click(live.keep, None, confirm, **QUICK)
    v["Save now"].click(live.request_now("save"), v["job"], v["message"], **QUICK)
    v["Sample now"].click(live.request_now("sample"), v["job"], v["message"], **QUICK)
    v["Score"].click(live.score, v["job"], v["message"], **QUICK)
    v["Compare with base"].click(live.compare_with_base, v["job"],
                                 [compare.tabs, compare.prompt, compare.models, compare.seed, v["message"]], **QUICK)
    return shown
