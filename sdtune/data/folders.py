"""The images of a folder, listed by one rule for the batch CLI, the app's folder batch and metrics.py --init_images:
image suffixes only; hidden files and folders left out; folder links not entered; a file link that leads outside the
root refused; and a folder to exclude (the batch's own output) never listed, so outputs never come back as inputs."""

import os
from dataclasses import dataclass
from pathlib import Path

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
    return InputImage(key, path)
