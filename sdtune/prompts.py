"""Prompts: from prompt files, and from image file names (`a_red_dragon.png` -> "a red dragon")."""

import re
from pathlib import Path

from sdtune.image_folder import printable


def read_prompts(path) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are ignored."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"Prompts file {path} not found (one prompt a line; see configs/validation_prompts.txt).")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise SystemExit(f"Prompts file {path} has no prompts.")
    return prompts


def prompt_from_filename(name: str) -> str:
    """The words of a file name: separators become spaces, the extension and a trailing counter are dropped (bytes
    that are not UTF-8 are written as \\xNN: a prompt must be valid text to be stored in a PNG)."""
    stem = Path(printable(name)).stem
    words = re.sub(r"[_\-.+]+", " ", stem)
    words = re.sub(r"\s+\(?\d+\)?$", "", words)  # "cat_02" or "cat (2)" -> "cat"
    return " ".join(words.split())
