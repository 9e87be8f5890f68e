"""Settings that travel: the PNG info tab, the "Send to" buttons under the results and each session's run history.

Every image's settings are read back from its PNG (the `parameters` text is the source of truth, wherever the
image came from) and fill a generating tab's form through sdtune.app.recall. The history lives in a gr.State, which
Gradio keeps per browser session, so no user sees another's images.
"""

from dataclasses import dataclass, field, fields
from pathlib import Path

import gradio as gr

from sdtune.app.recall import Recall, recall
from sdtune.data.images import without_folder
from sdtune.generation.pnginfo import MAX_PARAMETERS_CHARS, parse_parameters, read_parameters
from sdtune.generation.registry import ModelRegistry

HISTORY_SIZE = 12  # images the strip under a result keeps, newest first
TEXT_TAB, IMAGE_TAB, INFO_TAB = "text2img", "img2img", "png_info"  # the gr.Tab ids the Send buttons switch to
UNREADABLE = (OSError, SyntaxError, ValueError)  # BadImageError (a ValueError) and OSError: not a readable image


@dataclass
class ResultTools:
    """What sits under a tab's result: the Send buttons and the session's history strip."""
    send_text: gr.Button
    send_image: gr.Button
    history: gr.Gallery
    remembered: gr.State  # [(png path, caption)], newest first
    shown: gr.State  # the index of the result image the Send buttons send (a gallery's selected one)


@dataclass
class Form:
    """A generating tab's controls that recalled settings fill (named as the API's parameters), and its result."""
    tab: str
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    model: gr.Dropdown
    lora_scale: gr.Number
    scheduler: gr.Dropdown
    num_inference_steps: gr.Slider
    guidance_scale: gr.Slider
    seed: gr.Number
    result: gr.Gallery | gr.Image = field(metadata={"filled": False})
    tools: ResultTools = field(metadata={"filled": False})
    width: gr.Slider | None = None
    height: gr.Slider | None = None
    strength: gr.Slider | None = None
    image: gr.Image | None = None  # image to image's input: a PNG sent there becomes it

    def filled(self) -> dict[str, gr.components.Component]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata.get("filled", True) and f.name != "tab" and getattr(self, f.name) is not None}


def result_tools(tab: str) -> ResultTools:
    """The Send buttons and the history strip, placed under a tab's result."""
    with gr.Row():
        send_text = gr.Button("Send to text→image", size="sm")
        send_image = gr.Button("Send to image→image", size="sm")
    # thumbnails whole (object_fit contain, as the results: Gradio crops them to squares by default), one column
    # each (fit_columns=False: Gradio would widen a short row's thumbnails into bands across the strip)
    history = gr.Gallery(label=f"This session's last {HISTORY_SIZE} (click one to restore its settings)",
                         format="png", columns=6, height=160, allow_preview=False, elem_id=f"{tab}-history",
                         object_fit="contain", fit_columns=False, elem_classes=["sdtune-result"])
    return ResultTools(send_text, send_image, history, gr.State([]), gr.State(0))


@dataclass
class InfoTab:
    """The PNG info tab's upload and its Send buttons."""
    upload: gr.File
    preview: gr.Image
    send_text: gr.Button
    send_image: gr.Button


def png_info_tab(registry: ModelRegistry) -> InfoTab:
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=360):
            upload = gr.File(file_types=[".png"], label="A PNG made by this app or by AUTOMATIC1111")
            with gr.Row():
                send_text = gr.Button("Send to text→image", variant="primary")
                send_image = gr.Button("Send to image→image", variant="primary")
        with gr.Column(scale=3, min_width=360):
            # a File, not an Image, uploads the bytes untouched; the preview only shows them
            preview = gr.Image(label="Image", type="filepath", interactive=False, elem_classes=["sdtune-result"])
            raw = gr.Textbox(label="parameters", lines=4, interactive=False)
            settings = gr.JSON(label="Settings for the forms")
            notes = gr.Markdown()
    reader = InfoReader(registry)
    upload.change(reader.png_info, upload, [preview, raw, settings, notes], api_name="png_info", queue=False)
    return InfoTab(upload, preview, send_text, send_image)


class InfoReader:
    """The PNG info tab's handler (and /png_info): an uploaded PNG's parameters, as read and as the forms take them."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    def png_info(self, image):
        """The image, its raw `parameters` text, the form values read from it and the notes on what is not
        applied (also shown as a warning)."""
        if not image:
            return None, "", {}, ""
        try:
            text = read_parameters(image)
        except UNREADABLE as error:
            text, recalled, image = "", unreadable(error, image), None
        else:
            recalled = recall(text, self.registry.names)
        warn(recalled)
        shown = (text or "")[:MAX_PARAMETERS_CHARS]  # a longer text is refused by recall: show its start only
        return image, shown, recalled.values, "\n".join(f"- {note}" for note in recalled.notes)


def unreadable(error: Exception, path) -> Recall:
    """The note for a file that is no readable image, naming the file alone (an upload's folder is Gradio's)."""
    return Recall(notes=[f"{Path(path).name} cannot be read as an image: {without_folder(error, path)}"])


def read_recall(path, models: list[str]) -> Recall:
    """What the forms can take from the image at `path`; an unreadable file is a note, not an error."""
    try:
        return recall(read_parameters(path), models)
    except UNREADABLE as error:
        return unreadable(error, path)


def warn(recalled: Recall) -> None:
    if recalled.notes:
        gr.Warning(" ".join(recalled.notes))


class FormFiller:
    """Fills one form from a PNG: the PNG info tab's upload, a result or a history entry."""

    def __init__(self, form: Form, registry: ModelRegistry):
        self.form, self.registry = form, registry

    def outputs(self, tabs: gr.Tabs) -> list:
        return [*self.form.filled().values(), tabs]

    def from_png(self, path, current_model):
        if not path:
            gr.Warning("No image to send yet.")
            return [gr.skip()] * (len(self.form.filled()) + 1)
        recalled = read_recall(path, self.registry.names)
        if self.form.image is not None:
            recalled.values["image"] = path
        return self.updates(recalled, current_model)

    def from_result(self, result, shown, current_model):
        """The result image on show: a gallery's selected one (the first unless one was clicked)."""
        if isinstance(result, list):
            result = result[shown if 0 <= shown < len(result) else 0][0] if result else None
        return self.from_png(result, current_model)

    def from_history(self, remembered, current_model, selected: gr.SelectData):
        recalled = read_recall(remembered[selected.index][0], self.registry.names)
        return self.updates(recalled, current_model)

    def updates(self, recalled: Recall, current_model) -> list:
        """Each filled control's new value, or gr.skip() for a setting not recalled or outside the control's range;
        then the tab to show."""
        self.drop_unusable_scale(recalled, current_model)
        updates = [self.update(component, name, recalled) for name, component in self.form.filled().items()]
        warn(recalled)
        return [*updates, gr.Tabs(selected=self.form.tab)]

    @staticmethod
    def update(component, name: str, recalled: Recall):
        value = recalled.values.get(name)
        if value is None:
            return gr.skip()
        if isinstance(component, gr.Slider) and not component.minimum <= value <= component.maximum:
            recalled.notes.append(f"{component.label} {value:g} is outside this form's range "
                                  f"({component.minimum:g} to {component.maximum:g}); left as it was.")
            return gr.skip()
        return value

    def drop_unusable_scale(self, recalled: Recall, current_model) -> None:
        """Keep a recalled LoRA scale only for the LoRA model already chosen: choosing a model sets its listed scale
        (controls.model_and_scale), after and over any value filled with it, and a model without an adapter refuses
        one."""
        scale = recalled.values.pop("lora_scale", None)
        model = recalled.values.get("model", current_model)
        if scale is None or self.registry.configured_scale(model) is None:
            return
        if model == current_model:
            recalled.values["lora_scale"] = scale
        else:
            recalled.notes.append(f"LoRA scale {scale:g} is not filled in: {model} starts at its listed scale; "
                                  "set it by hand.")


def remember(result, remembered):
    """The session's history with a finished generation's images in front (and the first of them on show)."""
    paths = [item[0] for item in result] if isinstance(result, list) else [result] if result else []
    remembered = ([(path, caption(path)) for path in paths] + (remembered or []))[:HISTORY_SIZE]
    return remembered, remembered, 0


def caption(path) -> str:
    fields = parse_parameters(read_parameters(path) or "")  # the app's own PNG, just written
    return f"{fields.get('Model', '?')}, seed {fields.get('Seed', '?')}: {fields['prompt']}"


def wire(text: Form, image: Form, info: InfoTab, tabs: gr.Tabs, registry: ModelRegistry, events: dict) -> None:
    """Connect the Send buttons, the history strips and their generating `events` ({tab id: event})."""
    fillers = {form.tab: FormFiller(form, registry) for form in (text, image)}
    private = dict(api_visibility="private", queue=False)
    for form in (text, image):
        tools, filler = form.tools, fillers[form.tab]
        events[form.tab].success(remember, [form.result, tools.remembered],
                                 [tools.remembered, tools.history, tools.shown], **private)
        if isinstance(form.result, gr.Gallery):
            form.result.select(selected_index, None, tools.shown, **private)
        tools.history.select(filler.from_history, [tools.remembered, form.model], filler.outputs(tabs), **private)
        for button, target in ((tools.send_text, text), (tools.send_image, image)):
            button.click(fillers[target.tab].from_result, [form.result, tools.shown, target.model],
                         fillers[target.tab].outputs(tabs), **private)
    for button, target in ((info.send_text, text), (info.send_image, image)):
        button.click(fillers[target.tab].from_png, [info.upload, target.model], fillers[target.tab].outputs(tabs),
                     **private)


def selected_index(selected: gr.SelectData) -> int:
    return selected.index
