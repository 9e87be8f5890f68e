"""LoRA stacks: several LoRA models of one base applied to one generation, each at its own weight (ComfyUI's chained
LoRA loaders, A1111's `<lora:NAME:WEIGHT>` written several times), through diffusers' set_adapters with several names.

A1111's prompt syntax is read as the same thing, since people paste A1111 prompts: each `<lora:NAME:WEIGHT>` token
(WEIGHT optional, 1 by default) joins the stack and is taken out of the text the encoder sees. An image's PNG
parameters keep the tokens in its prompt and list each LoRA's A1111 hash (`Lora hashes: "name: hash, ..."`), so PNG
info and Send to restore the stack.
"""

import hashlib
import re
from pathlib import Path

from sdtune.errors import SdtuneError
from sdtune.limits import check_lora_scale

TOKEN = re.compile(r"<lora:([^:<>]*)(?::([^:<>]*))?(?::[^<>]*)?>")  # A1111's, with its optional third field
MAX_STACK = 8  # LoRA models one request may stack: each adds its layers' work to every denoising step
LORA_FILE = "pytorch_lora_weights.safetensors"  # in a LoRA folder


class StackError(SdtuneError, ValueError):
    """A LoRA stack that cannot be applied as asked; the message names the field."""


def parse_prompt(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(the prompt without its `<lora:...>` tokens, [(name, weight)] in the order written)."""
    stack = []
    for match in TOKEN.finditer(prompt or ""):
        name, weight = match.group(1).strip(), match.group(2)
        if not name:
            raise StackError(f"prompt: {match.group(0)} names no LoRA; write <lora:NAME:WEIGHT>.")
        weight = 1.0 if weight is None or not weight.strip() else \
            checked_weight(weight, f"prompt: the weight of {match.group(0)}")
        stack.append((name, weight))
    text = TOKEN.sub("", prompt or "")
    text = re.sub(r"\s*,(\s*,)+", ",", text)  # "a, <lora:x>, b" -> "a, b" rather than "a, , b"
    return re.sub(r"\s{2,}", " ", text).strip(" ,"), stack


def checked_weight(weight, field: str) -> float:
    try:
        return check_lora_scale(weight, field)
    except SdtuneError as error:
        raise StackError(str(error)) from None


def stack_from_rows(rows) -> list[tuple[str, float]]:
    """[(name, weight)] from the UI's rows or the API's list ([[name, weight], ...] or [{"name", "weight"}, ...]);
    rows without a name are skipped (the table's empty rows)."""
    stack = []
    for index, row in enumerate(rows or []):
        name, weight = (row.get("name"), row.get("weight", 1.0)) if isinstance(row, dict) else (list(row) + [1.0])[:2]
        name = str(name or "").strip()
        if name:
            stack.append((name, checked_weight(1.0 if weight in (None, "") else weight,
                                               f"loras: the weight of '{name}' (row {index + 1})")))
    return stack


def tokens(stack: list[tuple[str, float]]) -> str:
    """The stack as A1111 writes it in a prompt."""
    return " ".join(f"<lora:{name}:{weight:g}>" for name, weight in stack)


def recorded_prompt(prompt: str, rows: list[tuple[str, float]]) -> str:
    """The prompt an image's parameters keep: as given (its tokens included), plus the UI rows' stack as tokens."""
    return " ".join(part for part in (prompt, tokens(rows)) if part)


_hashes: dict[tuple, str] = {}


def a1111_hash(adapter: str) -> str | None:
    """A1111's short hash of a LoRA file (kohya's "addnet" hash: sha256 of the tensor data after the safetensors
    header, first 12 hex digits), cached by file and mtime; None for what is not a local safetensors file."""
    path = Path(adapter)
    if path.is_dir():
        path = path / LORA_FILE
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
            f.seek(8 + header)
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _hashes[key] = digest.hexdigest()[:12]
    return _hashes[key]
