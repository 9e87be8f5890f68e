"""Prompts: from prompt files, and from image file names (`a_red_dragon.png` -> "a red dragon")."""

import logging
import re
from pathlib import Path

from sdtune.data.folders import printable
from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)


def read_prompts(path) -> list[str]:
    """One prompt a line, UTF-8; blank lines and lines starting with # are ignored. A repeated prompt is kept once,
    with a warning: its seeds come from its text, so a second copy would repeat the same images and weigh twice."""
    path = Path(path)
    if not path.is_file():
        raise SdtuneError(f"Prompts file {path} not found (one prompt a line; see configs/validation_prompts.txt).")
    lines = [line.strip() for line in read_utf8(path).splitlines()]
    prompts = [p for p in lines if p and not p.startswith("#")]
    if not prompts:
        raise SdtuneError(f"Prompts file {path} has no prompts.")
    unique = list(dict.fromkeys(prompts))
    if len(unique) < len(prompts):
        repeated = sorted({p for p in prompts if prompts.count(p) > 1})
        logger.warning("Prompts file %s repeats %s; each prompt is used once.", path,
                       ", ".join(repr(p) for p in repeated))
    return unique


def read_utf8(path: Path) -> str:
    """The file's text; a file in another encoding (Latin-1, Windows-1252...) is refused with the line to fix rather
    than read with a guessed encoding, which could silently change a prompt."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Notepad) is not part of the first prompt
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise SdtuneError(f"Prompts file {path} is not UTF-8 text (line {line}, byte {data[error.start]:#04x}): "
                          "save it as UTF-8, e.g. iconv -f latin1 -t utf-8 old.txt > new.txt.") from error


def prompt_from_filename(name: str) -> str:
    """The words of a file name: separators become spaces, the extension and a trailing counter are dropped (bytes
    that are not UTF-8 are written as \\xNN: a prompt must be valid text to be stored in a PNG)."""
    stem = Path(printable(name)).stem
    words = re.sub(r"[_\-.+]+", " ", stem)
    words = re.sub(r"\s+\(?\d+\)?$", "", words)  # "cat_02" or "cat (2)" -> "cat"
    return " ".join(words.split())
