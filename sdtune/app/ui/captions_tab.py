"""The Captions tab (gradio_app.py --train): a folder under the data root as a table of file and caption beside its
thumbnails; Caption writes the missing captions with a captioner, find-and-replace and a trigger word edit them all,
Save writes them in the folder's own format. sdtune/app/captions.py does the work; the handlers keep the API's
parameter names (/caption_folders, /load_captions, /caption_missing, /save_captions).

`caption_editor` builds the editor for any folder control, so another tab (the Train tab's uploads, saved under the
data root) can embed it on its own folder."""

from dataclasses import dataclass

import gradio as gr

from sdtune.app.captions import CaptionFolders, add_trigger, find_replace
from sdtune.app.ui.controls import QUEUE, served
from sdtune.caption.spec import CAPTIONERS

HEADERS = ["file", "caption"]


def table_rows(table) -> list[list[str]]:
    """The Dataframe's rows as [file, caption]; the empty row Gradio sends for an empty table is dropped."""
    if isinstance(table, dict):  # an API call may send the Dataframe's {"headers": ..., "data": ...}
        table = table.get("data")
    if hasattr(table, "values"):  # a pandas DataFrame
        table = table.values.tolist()
    return [list(row) for row in table or [] if row and str(row[0] or "").strip()]


def as_table(rows) -> dict:
    return {"headers": HEADERS, "data": rows}


class CaptionsHandler:
    """The tab's handlers, functions of the form's values."""

    def __init__(self, folders: CaptionFolders):
        self.folders = folders

    def caption_folders(self) -> list[str]:
        return served(self.folders.folders)

    def load_captions(self, folder):
        listing = served(self.folders.load, folder)
        return as_table(listing.rows), listing.thumbnails, listing.note

    def caption_missing(self, folder, table, captioner="clip", model="", candidates=""):
        rows, note = served(self.folders.caption_missing, folder, table_rows(table), captioner, model, candidates)
        return as_table(rows), note

    def save_captions(self, folder, table):
        return served(self.folders.save, folder, table_rows(table))

    def find_replace(self, table, find, replace):
        rows, changed = served(find_replace, table_rows(table), find or "", replace or "")
        return as_table(rows), f"Replaced in {changed} captions; Save writes them."

    def add_trigger(self, table, trigger):
        rows, changed = served(add_trigger, table_rows(table), trigger or "")
        return as_table(rows), f"Trigger word put before {changed} captions; Save writes them."

    def refresh_folders(self, folder):
        choices = self.caption_folders()
        return gr.update(choices=choices, value=folder)


@dataclass
class CaptionEditor:
    """The editor's controls an embedding tab may read or update."""

    table: gr.Dataframe
    gallery: gr.Gallery
    note: gr.Markdown
    load: gr.Button


def caption_editor(handler: CaptionsHandler, folder: gr.components.Component) -> CaptionEditor:
    """The table and thumbnails of the folder `folder` names (relative to the data root), with Load, Caption, find
    and replace, trigger word and Save."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=360):
            table = gr.Dataframe(headers=HEADERS, datatype=["str", "str"], type="array", interactive=True,
                                 static_columns=[0], wrap=True, max_height=600, label="Captions",
                                 column_widths=["25%", "75%"])
            with gr.Row():
                load = gr.Button("Load", size="sm")
                save = gr.Button("Save", variant="primary", size="sm")
            note = gr.Markdown()
        with gr.Column(scale=2, min_width=280):
            # Gradio 6's Dataframe documents no image cells, so the thumbnails sit beside it, in the table's order
            gallery = gr.Gallery(label="Images", columns=4, height=600, object_fit="contain", interactive=False)
    with gr.Accordion("Caption the images without one", open=True):
        with gr.Row():
            captioner = gr.Dropdown(list(CAPTIONERS), value="clip", label="Captioner")
            model = gr.Textbox(label="Model", placeholder="empty: the captioner's default",
                               info="A hub name, or a folder under the models root (e.g. tinyworld/clip).")
        candidates = gr.Textbox(label="Candidates (clip)", lines=3, info="One caption a line; {red|blue} stands for "
                                "each alternative in turn.")
        caption = gr.Button("Caption")
    with gr.Row():
        find = gr.Textbox(label="Find")
        replace = gr.Textbox(label="Replace with")
        replace_button = gr.Button("Replace all", size="sm", scale=0)
    with gr.Row():
        trigger = gr.Textbox(label="Trigger word", placeholder="sks dog", info="Put before every caption, once.")
        trigger_button = gr.Button("Add to all", size="sm", scale=0)
    load.click(handler.load_captions, folder, [table, gallery, note], api_name="load_captions")
    save.click(handler.save_captions, [folder, table], note, api_name="save_captions")
    caption.click(handler.caption_missing, [folder, table, captioner, model, candidates], [table, note],
                  api_name="caption_missing", concurrency_id=QUEUE)  # the captioner shares the device
    replace_button.click(handler.find_replace, [table, find, replace], [table, note], api_visibility="private")
    trigger_button.click(handler.add_trigger, [table, trigger], [table, note], api_visibility="private")
    return CaptionEditor(table, gallery, note, load)


def captions_tab(folders: CaptionFolders) -> CaptionEditor:
    """The tab: a folder picker over the data root and the editor on the folder picked."""
    handler = CaptionsHandler(folders)
    gr.Markdown(f"Captions for a folder of images under the data root `{folders.root_shown}`, kept in its "
                "`metadata.jsonl` or as kohya's `.txt` files beside the images (a folder with none gets `.txt` "
                "files). Caption fills the empty ones; edits are written when you Save.")
    with gr.Row():
        folder = gr.Dropdown([], value=None, allow_custom_value=True, label=f"Folder under {folders.root_shown}")
        refresh = gr.Button("Refresh folders", size="sm", scale=0)
    editor = caption_editor(handler, folder)
    refresh.click(handler.refresh_folders, folder, folder, api_visibility="private", queue=False)
    gr.api(handler.caption_folders, api_name="caption_folders")
    gr.on(None, handler.refresh_folders, folder, folder, api_visibility="private", queue=False)  # at page load
    folder.select(handler.load_captions, folder, [editor.table, editor.gallery, editor.note],
                  api_visibility="private")
    return editor
