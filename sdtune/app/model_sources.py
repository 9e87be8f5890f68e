"""What a path holds, as a model to serve: a diffusers pipeline folder, a LoRA (a diffusers or kohya file, an sdtune
LoRA output folder), a training run's checkpoint (`checkpoint-N/` with `unet/` or `unet_lora/`,
sdtune/training/checkpoints.py) or a single-file SD v1 checkpoint. A LoRA, a checkpoint and a single file need a base
that is already served: the one named, or the one their training settings (training_config.yaml, kohya's
`ss_sd_model_name`) name."""

import re
from pathlib import Path

import yaml
from safetensors import safe_open

from sdtune.errors import SdtuneError
from sdtune.generation.registry import ModelRegistry, ModelSpec
from sdtune.limits import check_lora_scale
from sdtune.training.checkpoints import CHECKPOINT_PATTERN, LORA_FOLDER, PROGRESS_FILE, UNET_FOLDER, list_checkpoints
from sdtune.training.config import RESOLVED_CONFIG_NAME

# names become parts of output file names, and a LoRA model's adapter name, in which peft allows no "."
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA weights, in a folder
LORA_KEYS = ("lora_unet_", "lora_te_", ".lora_down.", ".lora.down.", ".lora_A.")  # kohya's, diffusers', peft's
SD_UNET_KEY = "model.diffusion_model."  # an original (CompVis) checkpoint's UNet
SD_V1_TEXT_KEY = "cond_stage_model.transformer."  # SD v1's CLIP text encoder (SD 2: cond_stage_model.model.)


class SourceError(SdtuneError, ValueError):
    """A path, name or setting that is not a model this app can add; the message names the field."""


def check_name(name) -> str:
    name = str(name or "").strip()
    if not NAME_PATTERN.match(name):
        raise SourceError(f"name: {name!r} is not a model name: 1 to 64 letters, digits, '_' or '-', starting with "
                          "a letter or digit.")
    return name


def spec_for(name: str, path: Path, registry: ModelRegistry, base: str = "", lora_scale=None,
             allow_pickle: bool = False) -> ModelSpec:
    """The spec serving `path` (already confined and existing) as `name`."""
    scale = 1.0 if lora_scale in (None, "") else check_scale(lora_scale)
    if path.is_dir():
        return folder_spec(name, path, registry, base, scale)
    return file_spec(name, path, registry, base, scale, allow_pickle)


def check_scale(value) -> float:
    try:
        return check_lora_scale(value)
    except SdtuneError as error:
        raise SourceError(str(error)) from None


def folder_spec(name: str, path: Path, registry: ModelRegistry, base: str, scale: float) -> ModelSpec:
    if path.name.endswith(".tmp"):
        raise SourceError(f"path: {path.name} is a checkpoint still being written; add it once training renames it.")
    if CHECKPOINT_PATTERN.match(path.name):
        return checkpoint_spec(name, path, registry, base, scale)
    if (path / "model_index.json").is_file():
        if not (path / UNET_FOLDER / "config.json").is_file():
            raise SourceError(f"path: {path.name} has a model_index.json but no unet/config.json: a half-written "
                              "or partial pipeline folder.")
        return ModelSpec(name, str(path))
    if (path / LORA_FILE).is_file():
        trained_on = training_settings(path).get("pretrained_model_name_or_path")
        return lora_on(served_base(registry, base, trained_on), name, str(path), scale)
    checkpoints = [p.name for p in list_checkpoints(path)]
    if checkpoints:
        raise SourceError(f"path: {path.name} is a training run without its final model yet; add one of its "
                          f"checkpoints: {', '.join(checkpoints)}.")
    raise SourceError(f"path: {path.name} holds no diffusers pipeline (model_index.json), LoRA ({LORA_FILE}) or "
                      "training checkpoint.")


def is_model_folder(path: Path) -> bool:
    """A finished run's output folder (or any folder) holding a pipeline or a LoRA."""
    return (path / "model_index.json").is_file() or (path / LORA_FILE).is_file()


def checkpoint_spec(name: str, path: Path, registry: ModelRegistry, base: str, scale: float) -> ModelSpec:
    """A training run's checkpoint: its UNet in place of the base's (a full fine-tune) or an adapter on the base."""
    if not (path / PROGRESS_FILE).is_file():
        raise SourceError(f"path: {path.name} is not a complete checkpoint (no {PROGRESS_FILE}).")
    served = served_base(registry, base, training_settings(path).get("pretrained_model_name_or_path"))
    if (path / LORA_FOLDER).is_dir():
        return lora_on(served, name, str(path / LORA_FOLDER), scale)
    if (path / UNET_FOLDER / "config.json").is_file():
        return ModelSpec(name, served.path, served.revision, served.variant, unet=str(path / UNET_FOLDER))
    raise SourceError(f"path: {path.name} has neither {UNET_FOLDER}/ nor {LORA_FOLDER}/: a half-written checkpoint.")


def file_spec(name: str, path: Path, registry: ModelRegistry, base: str, scale: float,
              allow_pickle: bool) -> ModelSpec:
    if path.suffix == ".ckpt":
        if not allow_pickle:
            raise SourceError(f"allow_pickle: {path.name} is a pickle, which can run code when loaded; tick "
                              "'allow pickle' only for a file you trust, or use its .safetensors version.")
        return single_file_spec(name, path, registry, base, allow_pickle=True)
    if path.suffix != ".safetensors":
        raise SourceError(f"path: {path.name} is neither a .safetensors file nor a .ckpt.")
    keys, metadata = safetensors_keys(path)
    if any(marker in key for key in keys for marker in LORA_KEYS):
        return lora_on(served_base(registry, base, metadata.get("ss_sd_model_name")), name, str(path), scale)
    if any(key.startswith(SD_UNET_KEY) for key in keys):
        if not any(key.startswith(SD_V1_TEXT_KEY) for key in keys):
            raise SourceError(f"path: {path.name} is a Stable Diffusion checkpoint but not an SD v1 one (its text "
                              "encoder is not SD v1's CLIP); this app serves SD v1 models.")
        return single_file_spec(name, path, registry, base, allow_pickle=False)
    raise SourceError(f"path: {path.name} is neither an SD v1 checkpoint nor a LoRA (no UNet or LoRA weights).")


def single_file_spec(name: str, path: Path, registry: ModelRegistry, base: str, allow_pickle: bool) -> ModelSpec:
    """A single file read against the configs of a served pipeline folder, so that nothing is downloaded."""
    served = served_base(registry, base, None, any_local=True)
    return ModelSpec(name, served.path, single_file=str(path), allow_pickle=allow_pickle)


def safetensors_keys(path: Path) -> tuple[list[str], dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except Exception as error:  # safetensors raises its own SafetensorError, or OSError
        raise SourceError(f"path: {path.name} is not a readable safetensors file ({type(error).__name__}).") from None


def training_settings(folder: Path) -> dict:
    """The run's resolved settings (training_config.yaml), or none when it has no readable one."""
    try:
        return yaml.safe_load((folder / RESOLVED_CONFIG_NAME).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def plain_models(registry: ModelRegistry) -> dict[str, ModelSpec]:
    """Served models that are a base in themselves: no adapter, no UNet or single file of their own."""
    return {name: spec for name, spec in registry.specs.items()
            if not (spec.lora or spec.unet or spec.single_file)}


def served_base(registry: ModelRegistry, base: str, trained_on: str | None, any_local: bool = False) -> ModelSpec:
    """The base a model goes on: the served model `base` names, else the one served from `trained_on`, else (for a
    single file's configs) the first served pipeline folder."""
    plain = plain_models(registry)
    if base:
        if base not in plain:
            raise SourceError(f"base: '{base}' is not a served base model; choose one of {', '.join(plain) or 'none'}.")
        return plain[base]
    for spec in plain.values():
        if trained_on and same_source(spec.path, trained_on):
            return spec
    if any_local:
        for spec in plain.values():
            if Path(spec.path).is_dir():
                return spec
        raise SourceError("base: no served pipeline folder to read a single file's configs from; add one first.")
    trained = f"it was trained on {Path(trained_on).name}, which is not served" if trained_on else \
        "its files do not say which model it was trained on"
    raise SourceError(f"base: choose the served model it goes on ({trained}); served: {', '.join(plain) or 'none'}.")


def same_source(served: str, trained_on: str) -> bool:
    if served == trained_on:
        return True
    return Path(served).exists() and Path(trained_on).exists() and Path(served).resolve() == Path(trained_on).resolve()


def lora_on(base: ModelSpec, name: str, adapter: str, scale: float) -> ModelSpec:
    """A LoRA model on `base`'s pipeline (the same source: one pipeline, one more adapter)."""
    return ModelSpec(name, base.path, base.revision, base.variant, lora=adapter, lora_scale=scale)


def describe(spec: ModelSpec) -> str:
    """What a served model is, in a few words and without server paths."""
    if spec.lora:
        adapter = Path(spec.lora)
        shown = f"{adapter.parent.name}/{adapter.name}" if adapter.name == LORA_FOLDER else adapter.name
        return f"LoRA {shown} at scale {spec.lora_scale:g}"
    if spec.unet:
        return f"UNet of {Path(spec.unet).parent.name} on the base's other components"
    if spec.single_file:
        return f"single-file checkpoint {Path(spec.single_file).name}"
    return f"pipeline {Path(spec.path).name}" if Path(spec.path).exists() else f"pipeline {spec.path}"
