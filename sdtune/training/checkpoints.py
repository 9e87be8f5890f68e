"""Resumable checkpoints in diffusers' layout: accelerate's state plus the data position and the resolved config.

`checkpoint-500/unet/` (and with --use_ema `checkpoint-500/unet_ema/`) are diffusers models, as in diffusers' own
training examples: `UNet2DConditionModel.from_pretrained(output_dir, subfolder="checkpoint-500/unet")` tries an
intermediate checkpoint. With --train_text_encoder, `checkpoint-500/text_encoder/` beside it, as in diffusers'
train_dreambooth.py. A LoRA run keeps only its adapter, `checkpoint-500/unet_lora/` (diffusers' LoRA format, with the
text encoder's adapter as `text_encoder.` keys, and with its LoraConfig so that it draws as the final adapter does:
`pipeline.load_lora_weights(...)` tries it), and its EMA's shadows in `unet_lora_ema.safetensors`. Beside them
accelerate keeps the optimizer, LR schedule, grad scaler and RNG states.
A checkpoint is written to `checkpoint-500.tmp/` and renamed to `checkpoint-500/` only once complete, so a crash
during a save never leaves a folder that `--resume_from_checkpoint latest` would pick.
"""

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sdtune.errors import SdtuneError
from sdtune.training.config import save_resolved_config

logger = logging.getLogger(__name__)

# diffusers' checkpoint-500, numbered by optimizer step
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
PROGRESS_FILE = "training_state.json"
UNET_FOLDER = "unet"
TEXT_ENCODER_FOLDER = "text_encoder"
EMA_FOLDER = "unet_ema"
LORA_FOLDER = "unet_lora"
LORA_EMA_FILE = "unet_lora_ema.safetensors"


class CheckpointError(SdtuneError):
    """--resume_from_checkpoint names no checkpoint that can be resumed."""


@dataclass
class Progress:
    """Where training stands: optimizer steps done, and the next batch to draw."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed


def checkpoint_name(global_step: int) -> str:
    return f"checkpoint-{global_step}"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first by step number (half-written `.tmp` folders are not listed)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found)]


def resolve_resume_path(resume_from_checkpoint, output_dir):
    """The folder to resume from, or None to start fresh ('latest' with no checkpoint yet starts fresh).

    A name is looked up inside --output_dir first, as diffusers' examples do; otherwise it is a path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info("No checkpoint in %s yet: starting a new run.", output_dir)
            return None
        return checkpoints[-1]
    path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        path = Path(resume_from_checkpoint)
    if not path.is_dir():
        names = [p.name for p in list_checkpoints(output_dir)] or ["none"]
        raise CheckpointError(f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint folder or "
                              f"name in {output_dir} (checkpoints there: {', '.join(names)}; or give 'latest').")
    if not (path / PROGRESS_FILE).is_file():
        raise CheckpointError(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {PROGRESS_FILE}).")
    return path


def register_checkpoint_hooks(accelerator, ema: EMAModel | None) -> None:
    """Make accelerate's save_state/load_state keep the UNet (and the EMA) as diffusers models; before any of them."""
    accelerator.register_save_state_pre_hook(partial(_save_models, accelerator, ema))
    accelerator.register_load_state_pre_hook(partial(_load_models, accelerator, ema))


def trained_models(accelerator, models) -> tuple:
    """(unet, text_encoder or None), unwrapped, from accelerate's list of prepared models."""
    unwrapped = [accelerator.unwrap_model(model) for model in models]
    unet = next(model for model in unwrapped if isinstance(model, UNet2DConditionModel))
    return unet, next((model for model in unwrapped if model is not unet), None)


def _save_models(accelerator, ema, models, weights, output_dir) -> None:
    """accelerate's save hook. `models` is accelerate's own list, so it stays whole; emptying `weights` is what
    stops accelerate writing the same models again as model.safetensors."""
    (unet, text_encoder), folder = trained_models(accelerator, models), Path(output_dir)
    if accelerator.is_main_process and is_lora(unet):
        _save_lora(unet, text_encoder, ema, folder)
    elif accelerator.is_main_process:
        unet.save_pretrained(folder / UNET_FOLDER)
        if text_encoder is not None:
            text_encoder.save_pretrained(folder / TEXT_ENCODER_FOLDER)
        if ema is not None:
            ema.save_pretrained(folder / EMA_FOLDER)
    weights.clear()


def _load_models(accelerator, ema, models, input_dir) -> None:
    """accelerate's load hook. `models` is a list made for this load: taking the models out of it means accelerate
    looks for no model.safetensors."""
    folder = Path(input_dir)
    unet, text_encoder = trained_models(accelerator, models)
    if is_lora(unet):
        _load_lora(unet, text_encoder, ema, folder)
        models.clear()
        return
    if not (folder / UNET_FOLDER).is_dir():
        raise CheckpointError(f"{folder} has no {UNET_FOLDER}/, so it is not a checkpoint of this trainer: resume "
                              "from one it wrote, or start a new run.")
    if ema is not None:
        _load_ema(ema, folder)
    unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder / UNET_FOLDER).state_dict())
    if text_encoder is not None:
        text_encoder.load_state_dict(_saved_text_encoder(text_encoder, folder).state_dict())
    models.clear()


def _saved_text_encoder(text_encoder, folder: Path):
    if not (folder / TEXT_ENCODER_FOLDER).is_dir():
        raise CheckpointError(f"{folder} has no {TEXT_ENCODER_FOLDER}/: it was saved without --train_text_encoder: "
                              "resume without it, or start a new run.")
    return type(text_encoder).from_pretrained(folder / TEXT_ENCODER_FOLDER)


def is_lora(unet) -> bool:
    """Whether the UNet trains a peft adapter (--lora_rank) rather than all its weights."""
    return bool(getattr(unet, "peft_config", None))


def _save_lora(unet, text_encoder, ema: EMAModel | None, folder: Path) -> None:
    """The adapters only (the frozen base comes from the pretrained model on resume), and the EMA's shadows in the
    order of the trained parameters, with its step count."""
    # with their LoraConfig, as the final adapter: without it a loader takes alpha = rank and draws another image
    text_layers = {} if text_encoder is None else {
        "text_encoder_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)),
        "text_encoder_lora_adapter_metadata": text_encoder.peft_config["default"].to_dict()}
    StableDiffusionPipeline.save_lora_weights(
        folder / LORA_FOLDER, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(), safe_serialization=True, **text_layers)
    if ema is not None:
        shadows = {f"{index:05d}": shadow.contiguous() for index, shadow in enumerate(ema.shadow_params)}
        save_file(shadows, folder / LORA_EMA_FILE, metadata={"optimization_step": str(ema.optimization_step)})


def _load_lora(unet, text_encoder, ema: EMAModel | None, folder: Path) -> None:
    """Restore what _save_lora wrote: the adapters into the UNet's and text encoder's (already added) adapters, and
    the EMA."""
    state, _ = StableDiffusionPipeline.lora_state_dict(folder / LORA_FOLDER)
    unet_state = {key.removeprefix("unet."): value for key, value in state.items() if key.startswith("unet.")}
    set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    if text_encoder is not None:
        text_state = {key.removeprefix("text_encoder."): value for key, value in state.items()
                      if key.startswith("text_encoder.")}
        if not text_state:
            raise CheckpointError(f"{folder} has no text-encoder adapter: it was saved without --train_text_encoder: "
                                  "resume without it, or start a new run.")
        set_peft_model_state_dict(text_encoder, convert_state_dict_to_peft(text_state), adapter_name="default")
    if ema is None:
        return
    if not (folder / LORA_EMA_FILE).is_file():
        raise CheckpointError(f"{folder} has no {LORA_EMA_FILE}: it was saved without --use_ema: resume without "
                              "it, or start a new run.")
    with safe_open(folder / LORA_EMA_FILE, framework="pt") as saved:
        shadows = [saved.get_tensor(key).to(old.device) for key, old in zip(sorted(saved.keys()), ema.shadow_params)]
        step = int(saved.metadata()["optimization_step"])
    ema.load_state_dict({**ema.state_dict(), "shadow_params": shadows, "optimization_step": step})


def _load_ema(ema: EMAModel, folder: Path) -> None:
    """The EMA weights and its step count from unet_ema/ (onto the CPU, like any loaded state)."""
    if not (folder / EMA_FOLDER).is_dir():
        raise CheckpointError(f"{folder} has no {EMA_FOLDER}/: it was saved without --use_ema: resume "
                              "without it, or start a new run.")
    ema.load_state_dict(EMAModel.from_pretrained(folder / EMA_FOLDER, UNet2DConditionModel).state_dict())


def save_checkpoint(accelerator, args, progress: Progress) -> Path:
    """Save on every process (accelerate writes each process's RNG state), then publish with one rename."""
    final = Path(args.output_dir) / checkpoint_name(progress.global_step)
    staging = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        (staging / PROGRESS_FILE).write_text(json.dumps(asdict(progress), indent=2))
        save_resolved_config(args, staging)
        _sync_to_disk(staging)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
        prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
        logger.info("Saved %s", final)
    accelerator.wait_for_everyone()
    return final


def _sync_to_disk(folder: Path) -> None:
    """fsync every file so the rename never publishes data still only in the page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def prune_checkpoints(output_dir, total_limit) -> None:
    """Delete the oldest checkpoints beyond --checkpoints_total_limit."""
    if total_limit is None:
        return
    checkpoints = list_checkpoints(output_dir)
    for old in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        logger.info("Removing old checkpoint %s", old)
        shutil.rmtree(old)


def load_checkpoint(accelerator, path: Path) -> Progress:
    """Restore model, optimizer, scheduler, scaler, EMA and RNG states; return the data position.

    Model and EMA weights are safetensors; accelerate 1.x reads its optimizer, scheduler, scaler and RNG files with
    torch.load(weights_only=True), which rebuilds tensors and plain data but runs no code from the file."""
    progress = read_progress(Path(path))
    check_state_files(Path(path))
    try:
        accelerator.load_state(str(path))
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        raise CheckpointError(f"{path} could not be restored ({type(error).__name__}: {str(error)[:200]}): resume it "
                              "with the settings it was saved with (its training_config.yaml), resume an earlier "
                              "checkpoint, or start a new run.") from error
    logger.info("Resumed from %s at step %d (epoch %d, batch %d).", path, progress.global_step, progress.epoch,
                progress.batches_in_epoch)
    return progress


def read_progress(path: Path) -> Progress:
    """The checkpoint's training_state.json, checked: whole numbers of steps, epochs and batches, and the step its
    folder is named after (a tampered step would train past --max_train_steps, or skip training and exit 0)."""
    file = path / PROGRESS_FILE
    fix = "resume an earlier checkpoint, or start a new run"
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError) as error:  # missing, unreadable, not JSON or not UTF-8
        raise CheckpointError(f"{file} cannot be read ({type(error).__name__}: {error}): {fix}.") from error
    fields = [field.name for field in dataclasses.fields(Progress)]
    if not isinstance(saved, dict) or sorted(saved) != sorted(fields) or not all(
            type(saved[field]) is int and saved[field] >= 0 for field in fields):
        raise CheckpointError(f"{file} is not a training state ({json.dumps(saved)[:100]}); expected whole numbers "
                              f"from 0 for {', '.join(fields)}: {fix}.")
    named = CHECKPOINT_PATTERN.match(path.name)
    if named and int(named.group(1)) != saved["global_step"]:
        raise CheckpointError(f"{file} says global_step {saved['global_step']}, but the folder is {path.name}: {fix}.")
    return Progress(**saved)


def check_state_files(path: Path) -> None:
    """Refuse a checkpoint whose state files are empty or cut short (a copy interrupted, a full disk), naming the
    file. Cheap: a safetensors file's header records its length; a torch.save file is a zip, its index at the end."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            if file.stat().st_size == 0:
                raise OSError("the file is empty")
            if file.suffix == ".safetensors":
                with safe_open(file, framework="pt"):
                    pass
            elif _is_zip(file):
                with zipfile.ZipFile(file):
                    pass
        except (OSError, SafetensorError, zipfile.BadZipFile) as error:
            raise CheckpointError(f"{file} is damaged ({type(error).__name__}: {error}): resume an earlier checkpoint, "
                                  "or start a new run.") from error


def _is_zip(file: Path) -> bool:
    with open(file, "rb") as f:
        return f.read(4) == b"PK\x03\x04"
