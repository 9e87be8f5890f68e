"""The Models tab and its API endpoints /add_model, /remove_model and /list_models: models added and removed while
the app serves (sdtune.app.models does the work), and every model picker of the page following the change."""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import gradio as gr

from sdtune.app.model_sources import plain_models
from sdtune.app.models import ModelManager
from sdtune.app.ui.controls import served

REFRESH_SECONDS = 5  # how often a page looks whether another session changed the served models


class ModelsHandler:
    """The tab's handlers; their parameter names are the API's."""

    def __init__(self, manager: ModelManager):
        self.manager = manager

    def add_model(self, name, path, base="", lora_scale=None, allow_pickle=False):
        message = served(self.manager.add, name, path, base or "", lora_scale, bool(allow_pickle))
        return message, self.list_models()

    def remove_model(self, name):
        return served(self.manager.remove, name), self.list_models()

    def list_models(self):
        return self.manager.listing()


@dataclass
class Pickers:
    """Every control on the page that lists the served models: one a form's choice, or several to compare or draw
    from."""
    single: list[gr.Dropdown]
    several: list[gr.CheckboxGroup]


@dataclass
class BaseList:
    """A dropdown of the served models that can be a base (a LoRA is none), whose choices `choices()` gives with its
    own first ones: the Models tab's "" (the base a model's settings name), the Train tab's recipe's base. Its value
    is left alone: both take a typed path too."""
    dropdown: gr.Dropdown
    choices: Callable[[], list[str]]


def models_tab(manager: ModelManager, root_shown: str):
    """The tab's controls; returns its add and remove events, its own model pickers (the base and the one to
    remove) and its listing."""
    handler = ModelsHandler(manager)
    gr.Markdown(f"Serve another model without a restart: a diffusers pipeline folder, a LoRA (a diffusers or kohya "
                f"file, or an sdtune LoRA output folder), a training run's `checkpoint-N` folder or a single-file SD "
                f"v1 checkpoint, under `{root_shown}`. Added models are served again after a restart.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=360):
            name = gr.Textbox(label="Name", info="1 to 64 letters, digits, '_' or '-'.")
            path = gr.Textbox(label=f"Path under {root_shown}")
            base = gr.Dropdown(base_choices(manager), value="", label="Base (LoRA, checkpoint, "
                               "single file)", info="Empty: the one its training settings name.")
            with gr.Row():
                scale = gr.Number(None, step=0.05, label="LoRA scale", info="Empty: 1.")
                pickle = gr.Checkbox(False, label="Allow pickle (.ckpt)", info="Only for a file you trust.")
            add = gr.Button("Add model", variant="primary")
            with gr.Row():
                chosen = gr.Dropdown(manager.names, value=None, label="Model to remove")
                remove = gr.Button("Remove")
        with gr.Column(scale=3, min_width=360):
            status = gr.Markdown()
            listing = gr.JSON(label="Served models")
            refresh = gr.Button("Refresh list", size="sm")
    added = add.click(handler.add_model, [name, path, base, scale, pickle], [status, listing], api_name="add_model",
                      concurrency_id="models")
    removed = remove.click(handler.remove_model, chosen, [status, listing], api_name="remove_model",
                           concurrency_id="models")
    refresh.click(handler.list_models, None, listing, api_name="list_models", queue=False)
    gr.on(None, handler.list_models, None, listing, api_visibility="private", queue=False)  # at page load
    return added, removed, Pickers([chosen], []), BaseList(base, partial(base_choices, manager))


class PickerRefresh:
    """The updates that bring a page up to date with the served models: nothing when the page has seen the registry's
    last change; otherwise the served names, a form keeping its choice while it is still served, a group its
    still-served ticks, each base list's choices (`bases`, their functions) and the header's model status
    (`status()`, its text)."""

    def __init__(self, manager: ModelManager, singles: int, status: Callable[[], str],
                 bases: list[Callable[[], list[str]]]):
        self.manager, self.singles, self.status, self.bases = manager, singles, status, bases

    def __call__(self, seen, *values):
        version = self.manager.registry.version
        if seen == version:
            return (seen, *([gr.skip()] * (len(values) + len(self.bases) + 1)))
        names = self.manager.names
        singles = [gr.update(choices=names, value=value if value in names else names[0] if value else None)
                   for value in values[:self.singles]]
        groups = [gr.update(choices=names, value=[v for v in (chosen or []) if v in names])
                  for chosen in values[self.singles:]]
        return (version, *singles, *groups, *(gr.update(choices=choices()) for choices in self.bases), self.status())


def base_choices(manager: ModelManager) -> list[str]:
    return [""] + [name for name in plain_models(manager.registry) if name in manager.names]


def keep_defaults_current(manager: ModelManager, pickers: Pickers, bases: list[BaseList]) -> None:
    """The pickers' choices as a new page (or an API call, which Gradio checks against them) sees them. Gradio copies a
    component for a session only once an event updates it there, so the page's own components are what every other
    session reads."""
    names = manager.names
    for picker in pickers.single:
        picker.choices = [(name, name) for name in names]
        if picker.value is not None and picker.value not in names:
            picker.value = names[0]
    for picker in pickers.several:
        picker.choices = [(name, name) for name in names]
        picker.value = [name for name in picker.value or [] if name in names]
    for base in bases:
        base.dropdown.choices = [(name, name) for name in base.choices()]


def follow_changes(manager: ModelManager, events, pickers: Pickers, bases: list[BaseList], header: gr.Markdown,
                   status: Callable[[], str]) -> None:
    """Every model picker of the page lists the served models, and the header's status (`status()`) says what is
    served: at once after this page's add or remove, and within REFRESH_SECONDS of another page's. A new page reads
    the header from `status` (its value) and the pickers from their defaults, kept current here."""
    controls = [*pickers.single, *pickers.several]
    refresh = PickerRefresh(manager, len(pickers.single), status, [base.choices for base in bases])
    manager.on_change(lambda: keep_defaults_current(manager, pickers, bases))
    seen = gr.State(manager.registry.version)
    outputs = [seen, *controls, *(base.dropdown for base in bases), header]
    for event in events:
        event.then(refresh, [seen, *controls], outputs, api_visibility="private", queue=False)
    gr.Timer(REFRESH_SECONDS).tick(refresh, [seen, *controls], outputs, api_visibility="private", queue=False,
                                   show_progress="hidden")
