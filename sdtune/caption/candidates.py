"""The candidate captions CLIP ranks: one a line, where `{a|b}` stands for each alternative in turn (A1111's
dynamic-prompts syntax without nesting), so `a {red|blue} {circle|square}` is four candidates."""

import itertools
import re
from pathlib import Path

from sdtune.errors import SdtuneError

ALTERNATIVES = re.compile(r"\{([^{}]*)\}")
MAX_CANDIDATES = 100_000  # each is one text embedding, computed once; beyond this a typo multiplied the list


def expand(line: str) -> list[str]:
    """Every caption a line stands for, in order, spaces tidied; ValueError for braces that do not pair."""
    pieces = ALTERNATIVES.split(line)  # literal, alternatives, literal, ...
    literals, choices = pieces[0::2], [group.split("|") for group in pieces[1::2]]
    if any("{" in text or "}" in text for text in literals):
        raise ValueError("a brace without its pair, or braces inside braces")
    captions = []
    for picked in itertools.product(*choices):
        text = literals[0] + "".join(choice + literal for choice, literal in zip(picked, literals[1:]))
        captions.append(" ".join(text.split()))
    return captions


def read_candidates(path) -> list[str]:
    """The distinct candidates of a file, in file order (candidates_from_lines)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError as error:
        raise SdtuneError(f"--candidates {path}: no such file.") from error
    except UnicodeDecodeError as error:
        raise SdtuneError(f"--candidates {path.name} is not UTF-8 text (byte {error.start}): save it as UTF-8.") \
            from error
    return candidates_from_lines(lines, f"--candidates {path.name}")


def candidates_from_lines(lines, source: str) -> list[str]:
    """The distinct candidates of `lines` (a file's, or the app's text box), in order; blank lines and lines
    starting with # are left out. `source` names them in errors."""
    candidates = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            candidates.update(dict.fromkeys(caption for caption in expand(line) if caption))
        except ValueError as error:
            raise SdtuneError(f"{source} line {number}: {error}. Write alternatives as {{red|blue}}.") from error
        if len(candidates) > MAX_CANDIDATES:
            raise SdtuneError(f"{source} stands for more than {MAX_CANDIDATES} captions by line {number}: split "
                              "the alternatives into fewer combinations.")
    if not candidates:
        raise SdtuneError(f"{source} holds no caption: write one a line.")
    return list(candidates)
