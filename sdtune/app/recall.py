"""A PNG's `parameters` text -> the values of the generating forms, with a note for everything that could not be
applied. The values are keyed by the API's parameter names (prompt, model, num_inference_steps, ...); a setting
that is missing, malformed or not offered by this server is left out, so the form keeps what it had."""

from dataclasses import dataclass, field

from sdtune.errors import SdtuneError
from sdtune.generation.core import GenerationSettings
from sdtune.generation.pnginfo import MAX_PARAMETERS_CHARS, parse_parameters
from sdtune.generation.schedulers import SCHEDULERS
from sdtune.limits import check_lora_scale, check_seed

# A1111 settings line field -> the form setting it fills, for the fields GenerationSettings checks
SETTINGS_FIELDS = {"Steps": "num_inference_steps", "CFG scale": "guidance_scale", "Denoising strength": "strength"}
# Older A1111 versions wrote the schedule into the sampler's name ("DPM++ 2M Karras"), newer ones as "Schedule type"
SCHEDULE_SUFFIXES = (" Karras", " Exponential")
DEFAULT_SCHEDULES = {"", "Automatic"}  # the sampler's own schedule, which is what our schedulers use


@dataclass
class Recall:
    values: dict = field(default_factory=dict)  # form setting -> value, only those that can be applied
    notes: list[str] = field(default_factory=list)  # what was not applied, and why
    fields: dict = field(default_factory=dict)  # everything the text holds, as parse_parameters reads it


def recall(text: str | None, models: list[str]) -> Recall:
    """The form values of `text` for a server offering `models`."""
    if not text or not text.strip():
        return Recall(notes=["This image carries no generation parameters (no `parameters` text): nothing to "
                             "apply."])
    if len(text) > MAX_PARAMETERS_CHARS:
        return Recall(notes=[f"This image's generation parameters are {len(text):,} characters long, more than the "
                             f"{MAX_PARAMETERS_CHARS:,} this reads (AUTOMATIC1111's are a few thousand): nothing "
                             "applied."])
    fields = parse_parameters(text)
    result = Recall({"prompt": fields["prompt"], "negative_prompt": fields["negative_prompt"]}, fields=fields)
    if len(fields) == 2:
        result.notes.append("No settings line (Steps, Sampler, CFG scale, ...) was found: only the prompt and "
                            "negative prompt were read.")
        return result
    read_model(fields, result, models)
    for read in (read_scheduler, read_settings, read_seed, read_size, read_lora_scale):
        read(fields, result)
    return result


def read_model(fields: dict, result: Recall, models: list[str]) -> None:
    model = fields.get("Model")
    if model is None:
        return
    if model in models:
        result.values["model"] = model
    else:
        result.notes.append(f"Model '{model}' is not served here (models: {', '.join(models)}); the model is left "
                            "as it was.")


def read_scheduler(fields: dict, result: Recall) -> None:
    sampler, schedule = fields.get("Sampler"), fields.get("Schedule type", "")
    if sampler is None:
        return
    for suffix in SCHEDULE_SUFFIXES:
        if sampler.endswith(suffix):
            sampler, schedule = sampler.removesuffix(suffix), suffix.strip()
    ours = {a1111_name: name for name, (_, a1111_name) in SCHEDULERS.items()}
    if sampler not in ours:
        offered = ", ".join(ours)
        result.notes.append(f"Sampler '{sampler}' is not offered here ({offered}); the scheduler is left as it was.")
        return
    result.values["scheduler"] = ours[sampler]
    if schedule not in DEFAULT_SCHEDULES:
        result.notes.append(f"Schedule type '{schedule}' is not offered here: {ours[sampler]} runs with the "
                            "model's own noise schedule, so the image will differ.")


def read_settings(fields: dict, result: Recall) -> None:
    """Steps, CFG scale and denoising strength, each converted and checked as a request's would be."""
    for key, name in SETTINGS_FIELDS.items():
        if key in fields:
            try:
                result.values[name] = getattr(GenerationSettings.from_args(**{name: fields[key]}), name)
            except SdtuneError as error:
                result.notes.append(f"{key}: {fields[key]!r} not applied: {error}")


def read_seed(fields: dict, result: Recall) -> None:
    if "Seed" in fields:
        try:
            result.values["seed"] = check_seed(_whole(fields["Seed"]))
        except SdtuneError as error:
            result.notes.append(f"Seed: {fields['Seed']!r} not applied: {error}")


def read_size(fields: dict, result: Recall) -> None:
    size = fields.get("Size")
    if size is None:
        return
    width, separator, height = size.partition("x")
    try:
        if not separator:
            raise SdtuneError("expected WIDTHxHEIGHT, as 512x768.")
        settings = GenerationSettings.from_args(width=width, height=height)
        result.values.update(width=settings.width, height=settings.height)
    except SdtuneError as error:
        result.notes.append(f"Size: {size!r} not applied: {error}")


def read_lora_scale(fields: dict, result: Recall) -> None:
    if "LoRA scale" in fields:
        try:
            result.values["lora_scale"] = check_lora_scale(fields["LoRA scale"])
        except SdtuneError as error:
            result.notes.append(f"LoRA scale: {fields['LoRA scale']!r} not applied: {error}")


def _whole(text: str):
    """An int for "42"; any other text as it is, for check_seed to refuse by name."""
    try:
        return int(text)
    except ValueError:
        return text
