"""Save now / Sample now: a checkpoint or a validation grid at the next optimizer step boundary, asked for with a file
in the output folder (`save_now.request`, `sample_now.request`; the app's TrainingJobs.request leaves them, and so can
`touch OUTPUT_DIR/save_now.request` beside a run started from the command line). A file, not a signal: the request
survives until the trainer reaches a step boundary, costs one stat a kind a step, and needs no handler.

The trainer does what it does on schedule (the `checkpoint-N` of --checkpointing_steps, within
--checkpoints_total_limit; the grid and validation loss of --validation_steps), then removes the file. A request left
while that work runs is removed with it: the checkpoint or grid being made answers it.

Several processes: only the main process reads the folder, and its answer is broadcast to the others (one small
collective a step), because both answers are collective work: every process writes its part of a checkpoint (its RNG
state) and waits at validation's barrier. Had each process stat the file itself, one could see it a step before
another and the save would deadlock."""

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

REQUEST_FILES = {"save": "save_now.request", "sample": "sample_now.request"}


def request_file(output_dir, what: str) -> Path:
    return Path(output_dir) / REQUEST_FILES[what]


def leave_request(output_dir, what: str) -> Path:
    """Ask the trainer writing to `output_dir` for a checkpoint ("save") or a validation grid ("sample")."""
    path = request_file(output_dir, what)
    path.write_text(f"{what}\n")
    return path


class OnDemand:
    """The requests of one run's output folder, read once per optimizer step by `due`."""

    def __init__(self, output_dir):
        self.files = {what: request_file(output_dir, what) for what in REQUEST_FILES}

    def clear(self) -> None:
        """A run that starts (or resumes) begins with no request: one left by an earlier run was for that run."""
        for path in self.files.values():
            path.unlink(missing_ok=True)

    def due(self, accelerator) -> frozenset[str]:
        """What is asked for at this step ("save", "sample"), the same on every process."""
        asked = [accelerator.is_main_process and path.exists() for path in self.files.values()]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            flags = broadcast(torch.tensor(asked, dtype=torch.float32, device=accelerator.device), from_process=0)
            asked = [bool(flag) for flag in flags.tolist()]
        return frozenset(what for what, flag in zip(self.files, asked) if flag)

    def done(self, accelerator, answered: frozenset[str]) -> None:
        if accelerator.is_main_process:
            for what in answered:
                self.files[what].unlink(missing_ok=True)
