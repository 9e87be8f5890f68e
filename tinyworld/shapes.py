"""Procedural captioned images of simple shapes (the tiny world's base set), in datasets' imagefolder layout."""

import json
import math
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 135, 30),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "cross")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shape_caption(shape: str, colour: str, background: str) -> str:
    return f"{article(colour)} {colour} {shape} on a {background} background"


def shape_words() -> list[str]:
    """Every word a shape caption can use."""
    words = {"a", "an", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS}
    return sorted(words)


def fill_shape(draw: ImageDraw.ImageDraw, shape: str, centre, radius: float, fill) -> None:
    """Fill `shape` of `radius` (half its extent, in pixels) at `centre`; also draws the judge's masks."""
    x, y, r = centre[0], centre[1], radius
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "triangle":
        corners = [(x + r * math.cos(a), y + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(corners, fill=fill)
    elif shape == "cross":
        arm = r / 3
        draw.rectangle((x - r, y - arm, x + r, y + arm), fill=fill)
        draw.rectangle((x - arm, y - r, x + arm, y + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def draw_shape(shape: str, colour: str, background: str, centre, radius: float, size: int = 64) -> Image.Image:
    """One filled shape on a plain background."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    fill_shape(ImageDraw.Draw(image), shape, centre, radius, COLOURS[colour])
    return image


def random_shape(rng: random.Random, size: int = 64):
    """A random (image, caption): shape, colour, background, size and position all drawn from `rng`."""
    shape, colour, background = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
    radius = rng.uniform(0.18, 0.34) * size
    centre = (rng.uniform(radius, size - radius), rng.uniform(radius, size - radius))
    return draw_shape(shape, colour, background, centre, radius, size), shape_caption(shape, colour, background)


def write_imagefolder(folder, examples) -> Path:
    """Write (image, caption) pairs as numbered PNGs plus metadata.jsonl (file_name, text). The metadata file is
    renamed into place last, so its presence means the folder is complete (make demo relies on it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "metadata.jsonl.partial"
    with open(partial, "w") as metadata:
        for index, (image, caption) in enumerate(examples):
            name = f"{index:05d}.png"
            image.save(folder / name)
            metadata.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    os.replace(partial, folder / "metadata.jsonl")
    return folder


def write_shapes_dataset(folder, count: int, seed: int = 0, size: int = 64) -> Path:
    """Write `count` shape images; the same seed always writes the same files."""
    rng = random.Random(seed)
    return write_imagefolder(folder, (random_shape(rng, size) for _ in range(count)))
