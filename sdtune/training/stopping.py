"""Stop on SIGTERM at a step boundary: the trainer finishes the optimizer step under way, saves a checkpoint there
and exits 0, leaving STOPPED_FILE in the output folder (`{"step": N}`) so that whoever sent the signal (the app's
Stop) can tell a clean stop from a crash; --resume_from_checkpoint latest then continues exactly. The handler only
sets a flag: saving inside a signal handler could interrupt the step it would save."""

import json
import signal
import threading
from pathlib import Path

import torch

STOPPED_FILE = "training_stopped.json"


class StopRequest:
    """SIGTERM's flag, checked once per optimizer step by `due`. Outside the main thread (no signal handlers
    there) it never fires."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._flag.set()

    def due(self, accelerator) -> bool:
        """Whether to stop after this step. With several processes they agree (one gather of a flag, the signal may
        reach them at different steps), so that all of them save the same checkpoint and stop together."""
        if accelerator.num_processes == 1:
            return self._flag.is_set()
        flag = torch.tensor([float(self._flag.is_set())], device=accelerator.device)
        return bool(accelerator.gather(flag).max().item())

    def restore(self) -> None:
        """Give SIGTERM back its previous handler (an in-process run must not change the caller's)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def mark_stopped(output_dir, step: int) -> Path:
    path = Path(output_dir) / STOPPED_FILE
    path.write_text(json.dumps({"step": step}) + "\n")
    return path


def clear_stopped(output_dir) -> None:
    """A run that starts (or resumes) is no longer stopped."""
    (Path(output_dir) / STOPPED_FILE).unlink(missing_ok=True)
