"""A job's recipe, job.yaml: a recipe from configs/ as the starting point, the form's settings and the "advanced" YAML
over it, checked by the trainer's own parser (sdtune/training/config.py) before the job is queued.

Whatever comes from a request is confined: it may not name where the trainer writes (the job's folder decides that)
nor read files outside the roots it was given (the data root for data, the models roots for a base model), nor send
anything off the machine (push_to_hub, hub tokens, online trackers).
"""

import argparse
import contextlib
import io
import re
from pathlib import Path

import yaml

from sdtune.errors import SdtuneError
from sdtune.jobs.store import JobError
from sdtune.training.config import build_parser, parse_args

MAX_ADVANCED_CHARS = 20_000
MAX_NAME_CHARS = 40
# the settings a form offers; anything else goes in the advanced YAML
FORM_SETTINGS = ("pretrained_model_name_or_path", "train_data_dir", "dataset_name", "max_train_steps", "learning_rate",
                 "lora_rank", "resolution", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                 "validation_prompts", "validation_steps", "validation_epochs", "seed")
# flags a request may not set, and why
REFUSED_FLAGS = {
    "output_dir": "the job's folder holds its outputs",
    "logging_dir": "the tracker's logs go in the job's folder",
    "cache_dir": "the hub cache is the server's choice",
    "push_to_hub": "a job never uploads",
    "hub_token": "a job never uploads",
    "hub_model_id": "a job never uploads",
    "config": "the recipe is chosen by name",
    "check_data": "a job trains; run the data check with train_text_to_image.py --check_data",
}
LOCAL_TRACKERS = ("none", "tensorboard")  # wandb and comet_ml send the run off the machine
DATA_FLAGS = ("train_data_dir", "validation_data_dir", "instance_data_dir", "class_data_dir")  # class: written too
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def sanitise_name(name: str) -> str:
    """A job name safe in a folder name: letters, digits, '.', '_' and '-'; anything else becomes '-'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name or "")).strip(".-_")[:MAX_NAME_CHARS].strip(".-_")
    return cleaned or "job"


def load_base_recipe(recipes_dir: Path, recipe: str) -> dict:
    """configs/NAME.yaml as a dict of trainer flags, its relative paths made absolute (they are relative to the
    repository, where train.sh runs). Only recipes directly in `recipes_dir`, by name."""
    name = recipe.removesuffix(".yaml")
    path = Path(recipes_dir) / f"{name}.yaml"
    if not re.fullmatch(r"[\w.-]+", name) or not path.is_file():
        raise JobError(f"Recipe {recipe!r}: no such recipe. Choose one of {', '.join(list_recipes(recipes_dir))}.")
    values = yaml.safe_load(path.read_text()) or {}
    flags = {action.dest for action in build_parser()._actions}
    if not isinstance(values, dict) or set(values) - flags:
        raise JobError(f"Recipe {recipe!r} is not a training recipe. Choose one of "
                       f"{', '.join(list_recipes(recipes_dir))}.")
    repository = Path(recipes_dir).resolve().parent
    for key in ("pretrained_model_name_or_path", "dataset_name", *DATA_FLAGS):
        if isinstance(values.get(key), str) and (repository / values[key]).exists():
            values[key] = str((repository / values[key]).resolve())
    return values


def list_recipes(recipes_dir: Path) -> list[str]:
    """The training recipes in configs/ (model lists and prompt files are not)."""
    flags = {action.dest for action in build_parser()._actions}
    names = []
    for path in sorted(Path(recipes_dir).glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        if isinstance(values, dict) and "pretrained_model_name_or_path" in values and not set(values) - flags:
            names.append(path.stem)
    return names


def parse_advanced(text: str | None) -> dict:
    """The advanced box: YAML mapping trainer flag names (without dashes) to values."""
    if not text or not text.strip():
        return {}
    if len(text) > MAX_ADVANCED_CHARS:
        raise JobError(f"Advanced settings: at most {MAX_ADVANCED_CHARS} characters of YAML.")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise JobError(f"Advanced settings are not valid YAML: {error}") from None
    if not isinstance(values, dict) or not all(isinstance(key, str) for key in values):
        raise JobError("Advanced settings must be YAML of flag: value lines, e.g. 'snr_gamma: 5.0'.")
    return values


def job_recipe(base: dict, settings: dict, advanced: dict, data_root: Path, model_roots: list[Path]) -> dict:
    """The base recipe with the form's settings and the advanced flags over it, each request value confined."""
    unknown = sorted(set(settings) - set(FORM_SETTINGS))
    if unknown:
        raise JobError(f"Settings {unknown} are not form settings ({', '.join(FORM_SETTINGS)}): give them in the "
                       "advanced YAML.")
    twice = sorted(set(settings) & set(advanced))
    if twice:
        raise JobError(f"{', '.join(twice)}: given in the form and in the advanced YAML; keep one.")
    requested = {**settings, **advanced}
    check_requested(requested, data_root, model_roots)
    return {**base, **{key: _absolute_if_path(key, value) for key, value in requested.items()}}


def check_requested(values: dict, data_root: Path, model_roots: list[Path]) -> None:
    """Refuse request values that would write or read outside the job's folder and the roots."""
    flags = {action.dest for action in build_parser()._actions}
    unknown = sorted(set(values) - flags)
    if unknown:
        raise JobError(f"Unknown trainer flags {unknown}: the names are train_text_to_image.py's flags without the "
                       "dashes (python train_text_to_image.py --help).")
    for key, why in REFUSED_FLAGS.items():
        if key in values:
            raise JobError(f"{key} cannot be set for a job: {why}.")
    if values.get("resume_from_checkpoint") not in (None, "latest"):
        raise JobError("resume_from_checkpoint: a job resumes from its own checkpoints only ('latest'); use Resume.")
    if values.get("report_to", "none") not in LOCAL_TRACKERS:
        raise JobError(f"report_to: {' or '.join(LOCAL_TRACKERS)} for a job (other trackers upload the run).")
    # None unsets a recipe's value (the form's folder replaces the recipe's dataset_name): nothing to confine
    for key in DATA_FLAGS:
        if values.get(key) is not None:
            _check_inside(key, values[key], [data_root])
    for key, roots in (("dataset_name", [data_root]), ("pretrained_model_name_or_path", model_roots)):
        if values.get(key) is not None:
            _check_local_or_hub(key, values[key], roots)


def _check_local_or_hub(key: str, value, roots: list[Path]) -> None:
    """A local folder must be under the roots; anything that is not one must read as a hub name (owner/name)."""
    if not isinstance(value, str):
        raise JobError(f"{key} must be a text value.")
    if Path(value).expanduser().exists():
        _check_inside(key, value, roots)
    elif not HUB_NAME.fullmatch(value):
        raise JobError(f"{key} {value!r}: neither a folder under the allowed roots nor a hub name (owner/name).")


def _check_inside(key: str, value, roots: list[Path]) -> None:
    if not isinstance(value, str) or not value:
        raise JobError(f"{key} must be a folder under the allowed roots.")
    resolved = Path(value).expanduser().resolve()
    if not any(resolved.is_relative_to(Path(root).resolve()) for root in roots):
        raise JobError(f"{key} {value!r}: outside the folders jobs may read; give a folder under the data root "
                       "(data) or a served base model (models).")


def _absolute_if_path(key: str, value):
    if key in (*DATA_FLAGS, "dataset_name", "pretrained_model_name_or_path") and value and Path(value).exists():
        return str(Path(value).resolve())
    return value


def check_with_trainer(recipe: dict) -> argparse.Namespace:
    """The trainer's own parser on the recipe, as flags (so argparse checks each value's type and choices):
    its message, without argparse's usage lines, on a refusal."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse_args(recipe_flags(recipe))
    except SystemExit:
        lines = [line for line in stderr.getvalue().splitlines() if "error:" in line]
        message = lines[-1].split("error:", 1)[1].strip() if lines else "the trainer refused these settings"
        raise JobError(f"The trainer refuses these settings: {message}") from None
    except SdtuneError as error:  # the trainer's own checks (config.check_args)
        raise JobError(f"The trainer refuses these settings: {error}") from None


def recipe_flags(recipe: dict) -> list[str]:
    """A recipe as the command-line flags that mean the same: true switches as --flag, lists as several values."""
    flags = []
    switches = {action.dest for action in build_parser()._actions if isinstance(action, argparse._StoreTrueAction)}
    for key, value in recipe.items():
        if key in switches:
            if not isinstance(value, bool):
                raise JobError(f"{key} is a switch: true or false, not {value!r}.")
            flags += [f"--{key}"] if value else []
        elif isinstance(value, list):
            flags += [f"--{key}", *map(str, value)]
        elif value is not None:
            flags += [f"--{key}", str(value)]
    return flags
