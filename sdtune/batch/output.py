"""The batch CLI's output folder, checked before any model is loaded: it can be written, and what it holds was made
with the settings of this run (a rerun skips the inputs already done, so other settings would silently keep the old
images). The settings are kept in batch_settings.json beside manifest.jsonl. One run at a time writes there: it holds
batch.lock."""

import fcntl
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path

from sdtune.batch.manifest import write_atomically
from sdtune.errors import SdtuneError

SETTINGS = "batch_settings.json"
LOCK = "batch.lock"  # held by the run writing to the folder


def check_writable(folder) -> None:
    """Create the folder and a file in it, or say why it cannot be written."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise SdtuneError(f"--output {folder} cannot be written ({error.strerror or error}): "
                          "choose a folder you can write to.") from error


def check_settings(folder, settings: dict) -> None:
    """Refuse a folder holding a batch made with other settings, naming each one that differs (old -> new)."""
    path = Path(folder) / SETTINGS
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as error:  # unreadable, not JSON or not UTF-8
        recorded = error
    if not isinstance(recorded, dict):
        raise SdtuneError(f"{path} is damaged ({recorded}): delete it to resume this batch with this run's settings "
                          "(only if they are the ones it was started with), or use another --output.")
    current = json.loads(json.dumps(settings))  # compare as stored: tuples as lists
    changes = [f"{flag} {recorded.get(flag)!r} -> {value!r}" for flag, value in current.items()
               if recorded.get(flag) != value]
    if changes:
        raise SdtuneError(f"--output {folder} holds a batch made with other settings ({'; '.join(changes)}); its "
                          "images would be kept and skipped, not redone. Use another --output, or the same settings "
                          "to resume it.")


def record_settings(folder, settings: dict) -> None:
    """Write batch_settings.json unless it is already there."""
    path = Path(folder) / SETTINGS
    if path.is_file():
        return
    write_atomically(path, json.dumps(settings, indent=2) + "\n")


@contextmanager
def locked(folder):
    """Hold the folder's batch.lock while the block runs, or refuse: two runs into one folder would each redo every
    image not yet in the manifest and append to it side by side. flock goes with its file, so a run that dies, however
    it dies, leaves the folder free."""
    handle = open(Path(folder) / LOCK, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        handle.close()
        raise SdtuneError(f"--output {folder} is in use by another batch run (it holds {LOCK} there): wait for it to "
                          "end, or give another --output.") from error
    with handle:
        yield
