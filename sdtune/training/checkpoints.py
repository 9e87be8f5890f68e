"""Resumable checkpoints in diffusers' layout: accelerate's state plus the data position and the resolved config.

`checkpoint-500/unet/` (and with --use_ema `checkpoint-500/unet_ema/`) are diffusers models, as in diffusers' own
training examples: `UNet2DConditionModel.from_pretrained(output_dir, subfolder="checkpoint-500/unet")` tries an
intermediate checkpoint. A LoRA run keeps only its adapter, `checkpoint-500/unet_lora/` (diffusers' LoRA format:
`pipeline.load_lora_weights(...)` tries it), and its EMA's shadows in `unet_lora_ema.safetensors`. Beside them accelerate keeps the optimizer, LR schedule, grad scaler and RNG states.
A checkpoint is written to `checkpoint-500.tmp/` and renamed to `checkpoint-500/` only once complete, so a crash
during a save never leaves a folder that `--resume_from_checkpoint latest` would pick.
"""

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from sdtune.errors import SdtuneError
from sdtune.training.config import save_resolved_config

logger = logging.getLogger(__name__)

# diffusers' checkpoint-500, numbered by optimizer step
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
PROGRESS_FILE = "training_state.json"
UNET_FOLDER = "unet"
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


def _save_models(accelerator, ema, models, weights, output_dir) -> None:
    """accelerate's save hook. `models` is accelerate's own list, so it stays whole; emptying `weights` is what
    stops accelerate writing the same UNet again as model.safetensors."""
    (unet,) = models
    unet, folder = accelerator.unwrap_model(unet), Path(output_dir)
    if accelerator.is_main_process and is_lora(unet):
        _save_lora(unet, ema, folder)
    elif accelerator.is_main_process:
        unet.save_pretrained(folder / UNET_FOLDER)
        if ema is not None:
            ema.save_pretrained(folder / EMA_FOLDER)
    weights.clear()


def _load_models(accelerator, ema, models, input_dir) -> None:
    """accelerate's load hook. `models` is a list made for this load: taking the UNet out of it means accelerate
    looks for no model.safetensors."""
    folder = Path(input_dir)
    (unet,) = models
    if is_lora(accelerator.unwrap_model(unet)):
        _load_lora(accelerator.unwrap_model(unet), ema, folder)
        models.clear()
        return
    if not (folder / UNET_FOLDER).is_dir():
        raise CheckpointError(f"{folder} has no {UNET_FOLDER}/, so it is not a checkpoint of this trainer: resume "
                              "from one it wrote, or start a new run.")
    if ema is not None:
        _load_ema(ema, folder)
    saved = UNet2DConditionModel.from_pretrained(folder / UNET_FOLDER)
    accelerator.unwrap_model(unet).load_state_dict(saved.state_dict())
    models.clear()


def is_lora(unet) -> bool:
    """Whether the UNet trains a peft adapter (--lora_rank) rather than all its weights."""
    return bool(getattr(unet, "peft_config", None))


def _save_lora(unet, ema: EMAModel | None, folder: Path) -> None:
    """The adapter only (the frozen base comes from the pretrained model on resume), and the EMA's shadows in the
    order of the trained parameters, with its step count."""
    StableDiffusionPipeline.save_lora_weights(
        folder / LORA_FOLDER, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        safe_serialization=True)
    if ema is not None:
        shadows = {f"{index:05d}": shadow.contiguous() for index, shadow in enumerate(ema.shadow_params)}
        save_file(shadows, folder / LORA_EMA_FILE, metadata={"optimization_step": str(ema.optimization_step)})


def _load_lora(unet, ema: EMAModel | None, folder: Path) -> None:
    """Restore what _save_lora wrote: the adapter into the UNet's (already added) adapter, and the EMA."""
    state, _ = StableDiffusionPipeline.lora_state_dict(folder / LORA_FOLDER)
    unet_state = {key.removeprefix("unet."): value for key, value in state.items() if key.startswith("unet.")}
    set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
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
    accelerator.load_state(str(path))
    progress = Progress(**json.loads((Path(path) / PROGRESS_FILE).read_text()))
    logger.info("Resumed from %s at step %d (epoch %d, batch %d).", path, progress.global_step, progress.epoch,
                progress.batches_in_epoch)
    return progress
