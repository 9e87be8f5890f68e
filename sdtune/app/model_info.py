"""What a served model is for: its base, how it was trained and its trigger words, read from what its files say (an
sdtune run's training_config.yaml and training_state.json, a LoRA file's kohya `ss_*` metadata, as A1111's LoRA
metadata viewer reads them; the kohya file sdtune writes also carries every setting in `sdtune_training_config`, so it
says what its run's folder says when it is served on its own). Nothing is guessed: a field its files do not hold is
left out."""

import json
import re
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import yaml
from safetensors import safe_open

from sdtune.generation.registry import ModelSpec
from sdtune.training.checkpoints import LORA_FOLDER, PROGRESS_FILE, UNET_FOLDER
from sdtune.training.config import RESOLVED_CONFIG_NAME

SDTUNE_SETTINGS_KEY = "sdtune_training_config"  # in the kohya file of an sdtune LoRA run (training/lora.py)
TOP_TAGS = 5  # the tags of a kohya file's ss_tag_frequency offered as its trigger words


def model_info(spec: ModelSpec) -> dict:
    """{"base", "training": {...}, "trigger_words": [...]} for a served model."""
    files = trained_files(spec)
    metadata = file_metadata(spec.lora or spec.single_file)
    settings = (read_settings(files[0]) if files else {}) or embedded_settings(metadata)
    info = {"base": base_of(spec, settings, metadata), "training": training_of(settings, metadata, files),
            "trigger_words": triggers_of(settings, metadata)}
    return {key: value for key, value in info.items() if value}


def trained_files(spec: ModelSpec) -> list[Path]:
    """The folder that holds the run's settings: the model's own (a file's: the one it is in; a checkpoint's adapter
    or UNet: the checkpoint)."""
    path = Path(spec.lora or spec.unet or spec.single_file or spec.path)
    if not path.exists():
        return []
    if path.name in (LORA_FOLDER, UNET_FOLDER):
        return [path.parent]
    return [path if path.is_dir() else path.parent]


def read_settings(folder: Path) -> dict:
    try:
        return yaml.safe_load((folder / RESOLVED_CONFIG_NAME).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def embedded_settings(metadata: dict) -> dict:
    try:
        settings = json.loads(metadata.get(SDTUNE_SETTINGS_KEY) or "{}")
    except ValueError:
        return {}
    return settings if isinstance(settings, dict) else {}


def file_metadata(path: str | None) -> dict:
    """A .safetensors file's metadata (kohya's ss_* keys); none for a folder or another file."""
    if not path or not path.endswith(".safetensors") or not Path(path).is_file():
        return {}
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # an unreadable file has no metadata to show; loading it reports why
        return {}


def served_base_name(specs: dict[str, ModelSpec], lora: ModelSpec) -> str:
    """A LoRA model's base as the page shows it: the served model of that folder by its name, else the folder's own
    name (a hub id as it is), never the server path."""
    for name, spec in specs.items():
        if not spec.lora and not spec.single_file and spec.path == lora.path:
            return name
    return Path(lora.path).name if Path(lora.path).exists() else lora.path


def base_of(spec: ModelSpec, settings: dict, metadata: dict) -> str:
    """The model it was trained from, by its folder's name (no server path) or hub id."""
    trained_on = settings.get("pretrained_model_name_or_path") or metadata.get("ss_sd_model_name") or ""
    return Path(trained_on).name if trained_on and Path(trained_on).exists() else trained_on


def training_of(settings: dict, metadata: dict, folders: list[Path]) -> dict:
    if settings:
        rank = settings.get("lora_rank")
        training = {"method": f"LoRA rank {rank}" if rank else "full fine-tune", "steps": steps_of(settings, folders),
                    "resolution": settings.get("resolution"), "learning_rate": settings.get("learning_rate"),
                    "instance_prompt": settings.get("instance_prompt"), "date": date_of(folders)}
    elif metadata:
        training = {"method": f"LoRA rank {metadata['ss_network_dim']}" if "ss_network_dim" in metadata else None,
                    "steps": metadata.get("ss_max_train_steps") or metadata.get("ss_steps"),
                    "images": metadata.get("ss_num_train_images"), "resolution": metadata.get("ss_resolution"),
                    "learning_rate": metadata.get("ss_learning_rate"),
                    "date": kohya_date(metadata.get("ss_training_started_at"))}
    else:
        return {}
    return {key: value for key, value in training.items() if value not in (None, "")}


def steps_of(settings: dict, folders: list[Path]):
    """A checkpoint's own step (its training_state.json), else the run's --max_train_steps."""
    try:
        return json.loads((folders[0] / PROGRESS_FILE).read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return settings.get("max_train_steps")


def date_of(folders: list[Path]) -> str | None:
    """When the run wrote its settings (UTC day)."""
    path = folders[0] / RESOLVED_CONFIG_NAME
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d") if path.is_file() else None


def kohya_date(value) -> str | None:
    try:
        return datetime.fromtimestamp(float(value), timezone.utc).strftime("%Y-%m-%d")
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def triggers_of(settings: dict, metadata: dict) -> list[str]:
    """A declared --trigger_word; else a subject run's (DreamBooth's) rare token; else a kohya file's top tags."""
    if settings.get("trigger_word"):
        return [str(settings["trigger_word"])]
    if settings.get("instance_prompt"):
        return [subject_token(str(settings["instance_prompt"]), str(settings.get("class_prompt") or ""))]
    return top_tags(metadata.get("ss_tag_frequency"))


def subject_token(instance_prompt: str, class_prompt: str) -> str:
    """What names the subject in DreamBooth's prompts: the words of --instance_prompt that --class_prompt lacks ("sks"
    of "a photo of sks dog" against "a photo of dog"), the rare token the run bound to the subject. Without a class
    prompt nothing tells the token from the rest, so the instance prompt whole."""
    words = re.findall(r"[^\s,.;:!?()]+", instance_prompt)
    common = {word.lower() for word in re.findall(r"[^\s,.;:!?()]+", class_prompt)}
    rare = [word for word in words if word.lower() not in common]
    return " ".join(rare) if class_prompt and rare else instance_prompt.strip()


def top_tags(frequency) -> list[str]:
    """The most frequent tags over every dataset of kohya's ss_tag_frequency ({dataset: {tag: count}})."""
    try:
        datasets = json.loads(frequency) if frequency else {}
        counts = Counter()
        for tags in datasets.values():
            counts.update({str(tag).strip(): int(count) for tag, count in tags.items()})
    except (ValueError, TypeError, AttributeError):
        return []
    return [tag for tag, _ in counts.most_common(TOP_TAGS) if tag]
