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

from sdtune.generate import GenerationSettings
from sdtune.schedulers import SCHEDULERS

FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


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
    """Read `parameters` text back: prompt, negative prompt and every field of the last line."""
    *prompt_lines, last = text.split("\n")
    negative = ""
    if prompt_lines and prompt_lines[-1].startswith("Negative prompt: "):
        negative = prompt_lines.pop().removeprefix("Negative prompt: ")
    fields = {key.strip(): json.loads(value) if value.startswith('"') else value.strip()
              for key, value in FIELD.findall(last)}
    return {"prompt": "\n".join(prompt_lines), "negative_prompt": negative, **fields}


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
    with Image.open(path) as image:
        return image.info.get("parameters")
