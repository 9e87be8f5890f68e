"""A job's live view, read from the files its trainer writes, so that watching costs the trainer nothing:

- JOB/job.log, the trainer's console: tqdm's progress bar (`steps:  60%|...| 3/5 [00:04<00:02, 1.05s/it,
  loss=0.1234, lr=1.00e-03]`, redrawn with carriage returns) gives the step, the total, the speed and each shown
  step's training loss; its last lines are the log shown;
- JOB/output/loss_history.jsonl (with a validation loss configured): every step's training loss and each validation
  loss (sdtune/training/validation_loss.py);
- JOB/output/validation/step-000500.png: the validation grids (sdtune/training/validation_images.py).

Growing files are read from their tail only (TAIL_BYTES), so a view costs the same at step 10 and at step 100,000.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

LOG_LINES = 20
TAIL_BYTES = 1 << 20  # ~10,000 tqdm redraws or ~25,000 loss records
HISTORY_FILE = "loss_history.jsonl"  # sdtune/training/validation_loss.py's name; that module imports torch
VALIDATION_FOLDER = "validation"
MAX_GRIDS = 12  # the newest grids shown: enough to see samples change over a run, few enough to send every tick
PROGRESS = re.compile(r"steps:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)\s*\[[^<\]]*<[^,\]]*,\s*([\d.]+|\?)(s/it|it/s)"
                      r"(?:,\s*loss=([-+\d.eE]+|nan|inf))?")


@dataclass
class LiveStatus:
    step: int = 0
    total_steps: int | None = None
    steps_per_second: float | None = None
    seconds_left: float | None = None
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, loss), oldest first
    validation_loss: list[tuple[int, float]] = field(default_factory=list)
    latest_grid: Path | None = None
    grids: list[Path] = field(default_factory=list)  # the newest MAX_GRIDS validation grids, oldest first
    log_tail: list[str] = field(default_factory=list)


def live_status(log_file: Path, output_dir: Path, total_hint: int | None = None) -> LiveStatus:
    """Where a job stands, from its console log and its output folder; `total_hint` (the recipe's max_train_steps)
    stands in for the total until the progress bar shows it."""
    lines = read_tail(log_file).split("\n")
    # a line redrawn with carriage returns (tqdm's bar) holds each of its states in order; a terminal shows the last
    progress = [match for line in lines for match in PROGRESS.finditer(line)]
    shown = [line.rstrip("\r").rpartition("\r")[2] for line in lines]
    status = LiveStatus(total_steps=total_hint, log_tail=[line for line in shown if line.strip()][-LOG_LINES:])
    if progress:
        last = progress[-1]
        status.step, status.total_steps = int(last.group(1)), int(last.group(2))
        status.steps_per_second = _steps_per_second(last.group(3), last.group(4))
        if status.steps_per_second:
            status.seconds_left = (status.total_steps - status.step) / status.steps_per_second
    history = read_history(Path(output_dir) / HISTORY_FILE)
    status.train_loss = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r] or _shown_losses(progress)
    status.validation_loss = [(r["step"], r["validation_loss"]) for r in history if "validation_loss" in r]
    status.grids = validation_grids(Path(output_dir) / VALIDATION_FOLDER)[-MAX_GRIDS:]
    status.latest_grid = status.grids[-1] if status.grids else None
    return status


def read_tail(path: Path, limit: int = TAIL_BYTES) -> str:
    """The last `limit` bytes of a file as text, starting at a whole line; '' when there is no file yet."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, 2)
            file.seek(max(0, size - limit))
            data = file.read(limit)
    except FileNotFoundError:
        return ""
    if size > limit:
        data = data.partition(b"\n")[2]
    return data.decode("utf-8", errors="replace")


def read_history(path: Path) -> list[dict]:
    """loss_history.jsonl's records, from its tail; a line being written is skipped."""
    records = []
    for line in read_tail(path).splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def validation_grids(folder: Path) -> list[Path]:
    """The trainer's validation grids, oldest first (their names hold the step, zero-padded)."""
    return sorted(folder.glob("step-*.png")) if folder.is_dir() else []



def _steps_per_second(value: str, unit: str) -> float | None:
    if value == "?" or float(value) == 0:
        return None
    return float(value) if unit == "it/s" else 1 / float(value)


def _shown_losses(progress: list[re.Match]) -> list[tuple[int, float]]:
    """Each step's loss as the progress bar showed it (the last redraw of a step wins)."""
    losses = {int(match.group(1)): float(match.group(5)) for match in progress if match.group(5) is not None}
    return sorted(losses.items())
