"""Resumable checkpoints: accelerate's state plus the data position and the resolved config, saved atomically.

A checkpoint is written to `checkpoint-000500.tmp/` and renamed to `checkpoint-000500/` only once complete, so a
crash during a save never leaves a folder that `--resume_from_checkpoint latest` would pick.
"""

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from sdtune.config import save_resolved_config

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
PROGRESS_FILE = "training_state.json"


@dataclass
class Progress:
    """Where training stands: optimizer steps done, and the next batch to draw."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed


def checkpoint_name(global_step: int) -> str:
    return f"checkpoint-{global_step:06d}"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first (half-written `.tmp` folders are not listed)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found)]


def resolve_resume_path(resume_from_checkpoint, output_dir):
    """The folder to resume from, or None to start fresh ('latest' with no checkpoint yet starts fresh)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info("No checkpoint in %s yet: starting a new run.", output_dir)
            return None
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    if not (path / PROGRESS_FILE).is_file():
        raise SystemExit(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {PROGRESS_FILE}).")
    return path


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
    """Restore model, optimizer, scheduler, scaler, EMA and RNG states; return the data position."""
    accelerator.load_state(str(path))
    progress = Progress(**json.loads((Path(path) / PROGRESS_FILE).read_text()))
    logger.info("Resumed from %s at step %d (epoch %d, batch %d).", path, progress.global_step, progress.epoch,
                progress.batches_in_epoch)
    return progress
