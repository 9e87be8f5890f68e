"""Generation parameters inside PNGs, in AUTOMATIC1111's `parameters` text chunk so other tools read them.

    a red dragon
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: stock, Denoising strength: 0.6

A LoRA model's images also carry the adapter's scale they were drawn at (`LoRA scale: 0.8`).
"""

import json
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from sdtune.data.images import MAX_IMAGE_PIXELS, image_header
from sdtune.generation.core import GenerationSettings
from sdtune.generation.schedulers import SCHEDULERS

# One "Key: value" pair of the settings line; keys such as "Schedule type", "Hires upscale" or "Size-1", values quoted
# (JSON) when they hold a comma, colon or newline, as `Lora hashes: "a: 1f2e, b: 9c0d"`. A1111 finds them with one
# pattern, r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', whose findall retries a long run of words without
# a colon from each of its letters: time grows with the square of the line (40 KB took 8 s). settings_fields reads the
# same pairs with a key pattern that is tried once per run of words (possessive, so it never backtracks).
KEY = re.compile(r"\w[\w \-/]*+")
VALUE = re.compile(r'\s*+("(?:\\.|[^\\"])*+"|[^,]*+)(?:,|$)')
# The longest `parameters` text read back. A1111's are a few kilobytes (a long prompt and negative prompt, some twenty
# settings, hashes); 64 KiB is ten times more than any of them, and a PNG may carry up to a megabyte (Pillow's
# MAX_TEXT_CHUNK), which no form could use.
MAX_PARAMETERS_CHARS = 64 * 1024
MIN_SETTINGS_FIELDS = 3  # fewer "Key: value" pairs on the last line: it is part of the prompt ("style: watercolor")
NEGATIVE = "Negative prompt:"


def format_parameters(prompt: str, settings: GenerationSettings, seed: int, model: str,
                      image_to_image: bool = False, lora_scale: float | None = None, extra: dict | None = None) -> str:
    """The `parameters` text of one image; `lora_scale` is None for a model without an adapter; `extra` fields go
    last (a comparison grid's axes)."""
    fields = {
        "Steps": settings.num_inference_steps,
        "Sampler": SCHEDULERS[settings.scheduler][1],
        "CFG scale": settings.guidance_scale,
        "Seed": seed,
        "Size": f"{settings.width}x{settings.height}",
        "Model": model,
    }
    if lora_scale is not None:
        fields["LoRA scale"] = lora_scale
    if image_to_image:
        fields["Denoising strength"] = settings.strength
    fields.update(extra or {})
    lines = [prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def _quote(value) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def parse_parameters(text: str) -> dict:
    """Read `parameters` text back: prompt and negative prompt (each may span lines) and every field of the settings
    line, as strings. A text without a settings line is all prompt (and negative prompt)."""
    lines = text.replace("\r\n", "\n").strip().split("\n")
    fields = settings_fields(lines[-1])
    if len(fields) >= MIN_SETTINGS_FIELDS:
        lines.pop()
    else:
        fields = {}
    prompt, negative = lines, []
    for index, line in enumerate(lines):
        if line.startswith(NEGATIVE):  # the negative prompt runs from here to the settings line
            prompt, negative = lines[:index], [line.removeprefix(NEGATIVE).lstrip(), *lines[index + 1:]]
            break
    return {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative), **fields}


def settings_fields(line: str) -> dict[str, str]:
    """Every "Key: value" pair of a settings line, in time linear in its length."""
    fields, position = {}, 0
    while key := KEY.search(line, position):
        position = key.end()
        if not line.startswith(":", position):  # no key ends inside this run of words: go on after it
            continue
        value = VALUE.match(line, position + 1)  # always matches: the unquoted form takes anything up to a comma
        fields[key.group().strip()] = _unquote(value.group(1).strip())
        position = value.end()
    return fields


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return str(json.loads(value))
        except json.JSONDecodeError:  # a quote that is not JSON's: keep the text as written
            return value
    return value


def save_png(image: Image.Image, path, parameters: str) -> Path:
    """Write a PNG carrying `parameters`, atomically (a reader never sees half a file)."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    partial = path.with_name(path.name + ".partial")
    try:
        image.save(partial, format="PNG", pnginfo=info)
        os.replace(partial, path)
    except OSError:  # a full or read-only disk must not leave half-written files behind
        partial.unlink(missing_ok=True)
        raise
    return path


def read_parameters(path) -> str | None:
    """The PNG's `parameters` text, read without decoding its pixels; BadImageError (naming the file, never its folder)
    for a file that is no image, or one larger than any this project makes or reads."""
    with image_header(path, MAX_IMAGE_PIXELS) as image:
        return image.info.get("parameters")
