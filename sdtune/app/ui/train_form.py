"""The Train tab's form for one job and its handlers: a recipe from configs/ fills the settings people change; the
method, the base and the data become trainer flags; Start queues the job through TrainingJobs.start, whose refusal
(a confinement rule, or the trainer's own parser on the advanced YAML) is shown in the page and nothing starts.

The form's values become the job's recipe as follows:
- settings the jobs API takes as form settings (sdtune.jobs.recipe.FORM_SETTINGS) go as settings; the method's
  flags (subject training's instance and class prompts) are trainer flags the form adds to the advanced YAML;
- a value set to None unsets the recipe's (a folder chosen here replaces the recipe's dataset, and the other way);
- uploaded images are saved first (sdtune/jobs/uploads.py) and the folder removed again if the job is refused.
"""

import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import gradio as gr
import yaml

from sdtune.errors import SdtuneError
from sdtune.jobs.recipe import list_recipes, load_base_recipe, parse_advanced, sanitise_name
from sdtune.jobs.uploads import caption_rows, save_upload, summary_line
from sdtune.limits import check_whole
from sdtune.training.config import build_parser

RECIPE_BASE = "the recipe's base"
METHODS = [("LoRA", "lora"), ("Full fine-tune", "full"), ("Subject (DreamBooth)", "subject")]
SOURCES = [("A folder under the data root", "folder"), ("A dataset on the hub", "hub"),
           ("Images uploaded here", "upload")]
CLASS_IMAGES_FOLDER = "class-images"  # DATA_ROOT/class-images/PROMPT/: prior preservation's drawn class images
MAX_FOLDER_DEPTH = 3  # data/tinyworld/pokemon/train
MAX_FOLDERS = 300  # the folder picker's length: the data root may hold large trees
# the subject method's flags, unset by the other methods when the recipe has them
SUBJECT_FLAGS = ("instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt")


@dataclass
class JobForm:
    """The form's values, in the order of its controls (train_tab.py builds them from these names)."""

    name: str
    recipe: str
    method: str
    instance_prompt: str
    class_prompt: str
    base: str
    source: str
    folder: str | None
    dataset: str
    files: list | None
    captions: object  # the caption table: a DataFrame, or rows [file name, caption]
    max_train_steps: float
    learning_rate: float
    lora_rank: float
    resolution: float
    train_batch_size: float
    checkpointing_steps: float
    validation_prompts: str
    validation_epochs: float
    validation_steps: float
    seed: float
    advanced: str


FORM_FIELDS = [field.name for field in fields(JobForm)]
# the settings a recipe fills, in this order (recipe_values)
FILLED = ("max_train_steps", "learning_rate", "lora_rank", "resolution", "train_batch_size", "checkpointing_steps",
          "validation_prompts", "validation_epochs", "validation_steps", "seed")


class TrainForm:
    """The form's handlers, for one TrainingJobs and the app's served models."""

    def __init__(self, jobs, registry, models_root):
        self.jobs, self.registry, self.models_root = jobs, registry, Path(models_root)

    def recipes(self) -> list[str]:
        return list_recipes(self.jobs.recipes_dir)

    def recipe_values(self, recipe: str):
        """The settings people change, as the recipe has them (the trainer's defaults where it has none), and the
        method it trains with."""
        if not recipe:
            return [gr.skip()] * (len(FILLED) + 1)
        values, defaults = load_base_recipe(self.jobs.recipes_dir, recipe), build_parser()
        filled = {key: values.get(key, defaults.get_default(key)) for key in FILLED}
        if filled["learning_rate"] is not None:
            filled["learning_rate"] = float(filled["learning_rate"])  # YAML reads 1e-4 (no dot) as text
        filled["validation_prompts"] = "\n".join(values.get("validation_prompts") or [])
        filled["validation_steps"] = values.get("validation_steps") or 0
        filled["seed"] = values["seed"] if values.get("seed") is not None else -1
        method = "subject" if values.get("instance_data_dir") else "lora" if values.get("lora_rank") else "full"
        return [*(filled[key] if filled[key] is not None else gr.skip() for key in FILLED), method]

    def bases(self) -> list[str]:
        """The served full models (a LoRA is no base) by name; the field also takes a path under the models root
        or a hub id."""
        return [RECIPE_BASE, *(name for name, spec in self.registry.specs.items() if not spec.lora)]

    def data_folders(self) -> list[str]:
        """The folders under the data root, relative to it, a few levels deep: the data picker's choices."""
        root, found = self.jobs.data_root, []
        for directory, subfolders, _ in os.walk(root):
            depth = len(Path(directory).relative_to(root).parts)
            shown = sorted(name for name in subfolders if not name.startswith("."))
            subfolders[:] = shown if depth < MAX_FOLDER_DEPTH else []  # not entered: not listed
            found += [Path(directory, name).relative_to(root).as_posix() for name in subfolders]
            if len(found) >= MAX_FOLDERS:
                break
        return sorted(found)[:MAX_FOLDERS]

    def refresh_folders(self):
        return gr.update(choices=self.data_folders())

    def upload_table(self, files):
        """The caption table for the uploaded files: each image's name and the caption uploaded with it."""
        try:
            return caption_rows(files)
        except SdtuneError as error:
            raise gr.Error(str(error)) from None

    def start(self, request: gr.Request, *values):
        """Queue the form's job; returns the page's message and the new job's id (to choose it in the list)."""
        form = JobForm(*values)
        saved = None
        try:
            settings, flags, saved = self._recipe_request(form)
            job_id = self.jobs.start(_user(request), form.name, form.recipe, settings, advanced_yaml(form, flags))
        except SdtuneError as error:
            if saved is not None:
                shutil.rmtree(saved.folder, ignore_errors=True)  # nothing starts: the upload is not kept either
            return f"**Not started.** {self.shown(str(error))}", gr.skip()
        note = f" {summary_line(saved, 'data')}" if saved else ""
        return f"Job {job_id} queued.{note}", job_id

    def _recipe_request(self, form: JobForm):
        """The form as the jobs API's settings and the method's extra flags, the upload saved."""
        if not form.recipe:
            raise SdtuneError("Choose a recipe first: its settings are the job's starting point.")
        flags = method_flags(form, self.jobs.data_root)
        settings = {**numbers(form), "validation_prompts": prompt_lines(form.validation_prompts)}
        if form.base and form.base != RECIPE_BASE:
            settings["pretrained_model_name_or_path"] = self._base_path(form.base)
        folder, saved = self._data(form)
        data_flag = "instance_data_dir" if form.method == "subject" else "train_data_dir"
        settings.update(train_data_dir=None, dataset_name=None)  # the form's data replaces the recipe's
        if form.source == "hub":
            settings["dataset_name"] = folder
        elif data_flag == "instance_data_dir":
            flags["instance_data_dir"] = folder
        else:
            settings["train_data_dir"] = folder
        return settings, flags, saved

    def _base_path(self, base: str) -> str:
        """A served model's folder by its name; otherwise a path under the models root, or a hub id as given."""
        spec = self.registry.specs.get(base)
        if spec is not None and not spec.lora:
            return spec.path
        under_root = self.models_root / base
        return str(under_root) if under_root.exists() else base

    def _data(self, form: JobForm):
        """The training data's folder (or hub name), and the saved upload when the images were uploaded here."""
        if form.source == "hub":
            if not (form.dataset or "").strip():
                raise SdtuneError("Give the hub dataset's name (owner/name), or choose a folder or upload images.")
            if form.method == "subject":
                raise SdtuneError("Subject training reads a folder of your subject's pictures: choose a folder or "
                                  "upload them.")
            return form.dataset.strip(), None
        if form.source == "upload":
            saved = save_upload(form.files, self.jobs.data_root, form.name or "job", typed_captions(form.captions))
            return str(saved.folder), saved
        if not form.folder:
            raise SdtuneError("Choose the data folder (under the data root), or upload images.")
        folder = self.jobs.data_root / form.folder
        if not folder.resolve().is_relative_to(self.jobs.data_root.resolve()):
            raise SdtuneError(f"Folder {form.folder!r} is not under the data root: choose one of the list.")
        return str(folder), None

    def shown(self, message: str) -> str:
        """A message with the roots' server paths as their names (the page never shows where the server keeps
        things)."""
        for root, name in ((self.jobs.data_root, "data"), (self.models_root, "models")):
            for form in {str(root.resolve()), str(root)}:
                message = message.replace(form, name)
        return message


def method_flags(form: JobForm, data_root: Path) -> dict:
    """The method's trainer flags beyond the form settings; the other methods unset the subject flags."""
    if form.method != "subject":
        return dict.fromkeys(SUBJECT_FLAGS) | {"with_prior_preservation": False}
    if not (form.instance_prompt or "").strip():
        raise SdtuneError("Subject training needs the instance prompt: the prompt of every picture of your subject, "
                          "with a rare token for it, e.g. 'a photo of sks dog'.")
    flags = {"instance_prompt": form.instance_prompt.strip(), "class_data_dir": None, "class_prompt": None,
             "with_prior_preservation": False}
    if (form.class_prompt or "").strip():  # prior preservation: the base draws the class images once, kept for reuse
        class_folder = Path(data_root) / CLASS_IMAGES_FOLDER / sanitise_name(form.class_prompt)
        flags.update(class_prompt=form.class_prompt.strip(), class_data_dir=str(class_folder),
                     with_prior_preservation=True)
    return flags


def advanced_yaml(form: JobForm, flags: dict) -> str:
    """The advanced YAML with the method's flags added; a flag given in both is refused (which one was meant?)."""
    advanced = parse_advanced(form.advanced)
    twice = sorted(key for key in set(advanced) & set(flags) if flags[key] not in (None, False))
    if twice:
        raise SdtuneError(f"{', '.join(twice)}: set by the form's method and in the advanced YAML; keep one.")
    return yaml.safe_dump({**{key: value for key, value in flags.items() if key not in advanced}, **advanced})


def numbers(form: JobForm) -> dict:
    """The numeric settings as the trainer's types: whole numbers where it takes ints (gr.Number gives floats);
    a seed of -1 draws one, validation every 0 steps validates by epochs."""
    values = {key: check_whole(getattr(form, key), key) for key in
              ("max_train_steps", "resolution", "train_batch_size", "checkpointing_steps", "validation_epochs")
              if getattr(form, key) is not None}  # an empty box keeps the recipe's value
    rank = check_whole(form.lora_rank if form.lora_rank is not None else 0, "lora_rank")
    if form.method == "lora" and rank < 1:
        raise SdtuneError("LoRA needs a rank of 1 or more (4 to 16 is usual); a full fine-tune trains all weights.")
    values["lora_rank"] = 0 if form.method == "full" else rank
    if form.learning_rate is not None:
        values["learning_rate"] = float(form.learning_rate)
    steps = check_whole(form.validation_steps or 0, "validation_steps")
    values["validation_steps"] = steps if steps > 0 else None
    seed = check_whole(form.seed if form.seed is not None else -1, "seed")
    if seed >= 0:
        values["seed"] = seed
    return values


def prompt_lines(text: str) -> list[str] | None:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines or None


def typed_captions(table) -> dict[str, str]:
    """The caption table as {file name: caption}; rows without a caption are left to the uploaded ones."""
    rows = table.values.tolist() if hasattr(table, "values") else table or []
    return {str(row[0]): str(row[1]) for row in rows if len(row) >= 2 and row[0] and str(row[1] or "").strip()}


def _user(request) -> str | None:
    return getattr(request, "username", None)
