"""The images of a folder, listed by one rule for the batch CLI, the app's folder batch and metrics.py --init_images:
image suffixes only; hidden files and folders left out; folder links not entered; a file link that leads outside the
root refused; anything but a regular file (a named pipe, whose reading waits for a writer for ever; a socket; a
device) refused; and a folder to exclude (the batch's own output) never listed, so outputs never come back as inputs.
A refused entry is listed with its reason, so every reader counts and reports it as it does an unreadable image."""

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from sdtune.errors import SdtuneError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class InputImage:
    key: str  # the name its prompt, model and seed come from: a path relative to its folder, or an upload's name
    path: Path
    error: str = ""  # why it is refused; empty when it may be read


def printable(name: str) -> str:
    """A file name as valid text: bytes that are not UTF-8 (which Python keeps as lone surrogates) become \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def list_images(folder, root=None, exclude=None) -> list[InputImage]:
    """The images under `folder`, sorted by relative path. A file may be a link only to a file under `root`
    (default: `folder`); nothing under `exclude` is listed."""
    folder = Path(folder)
    root = Path(root or folder).resolve()
    excluded = Path(exclude).resolve() if exclude else None
    images = []
    for directory, subfolders, files in os.walk(folder):  # os.walk lists folder links but does not enter them
        subfolders[:] = [name for name in subfolders
                         if not name.startswith(".") and Path(directory, name).resolve() != excluded]
        images += [_listed(folder, Path(directory, name), root) for name in files
                   if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(images, key=lambda image: image.key)


def _listed(folder: Path, path: Path, root: Path) -> InputImage:
    key = path.relative_to(folder).as_posix()
    if not path.resolve().is_relative_to(root):
        return InputImage(key, path, "a link to a file outside the folder: refused")
    if not _regular_or_missing(path):
        return InputImage(key, path, NOT_A_FILE)
    return InputImage(key, path)


NOT_A_FILE = "not a regular file (a named pipe, socket or device): refused"


def _regular_or_missing(path: Path) -> bool:
    """False for an entry that is there but is no regular file; stat (unlike open) never waits on a pipe. A broken
    link is left to the reader, which says it cannot be read."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def list_inputs(paths, exclude=None) -> list[InputImage]:
    """The images of each folder in `paths` (as list_images lists them, named by their path inside it) and each file
    in `paths` (named by its file name; any suffix, since it was named on purpose), in that order. A name two of them
    share is refused (SdtuneError): an input's name chooses its model, seed and output."""
    images = []
    for path in map(Path, paths):
        if path.is_dir():
            images += list_images(path, exclude=exclude)
        else:
            images.append(InputImage(path.name, path, "" if _regular_or_missing(path) else NOT_A_FILE))
    named: dict[str, InputImage] = {}
    for image in images:
        if image.key in named:
            raise SdtuneError(f"Two inputs are named {printable(image.key)} ({printable(str(named[image.key].path))} "
                              f"and {printable(str(image.path))}): their outputs would share one name. Give them "
                              "different names, or one --input at a time.")
        named[image.key] = image
    return images
