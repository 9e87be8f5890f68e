"""A deterministic judge of a drawn shape: which shape and which colour a generated base-world image shows.

The object is the largest connected region that differs from the background (the median border colour); its colour
is the nearest palette colour to its median pixel, its shape the template (drawn by tinyworld.shapes, fitted to the
region's bounding box) that overlaps it best. It is right on every held-out
base-world image (a test checks all 360).
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from tinyworld.shapes import COLOURS, SHAPES, fill_shape

OBJECT_DISTANCE = 48.0  # RGB distance from the background above which a pixel is object (palette: >= 94)
MIN_OVERLAP = 0.6  # intersection over union below which the region is no shape at all
# extents of each template of radius 1 centred at 0: (left, top, right, bottom)
UNIT_EXTENTS = {"circle": (-1, -1, 1, 1), "square": (-1, -1, 1, 1), "cross": (-1, -1, 1, 1),
                "triangle": (-np.sqrt(3) / 2, -1, np.sqrt(3) / 2, 0.5)}


@dataclass(frozen=True)
class Verdict:
    shape: str  # one of SHAPES, or "none" when no template fits
    colour: str  # the nearest palette colour, or "none" when there is no object
    overlap: float  # intersection over union of the region and the best template


def object_mask(pixels: np.ndarray) -> np.ndarray:
    """Pixels far from the background colour, where the background is the median of the border."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]]).astype(np.float32)
    background = np.median(border, axis=0)
    return np.linalg.norm(pixels.astype(np.float32) - background, axis=-1) > OBJECT_DISTANCE


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of `mask` (stray blobs and noise dropped)."""
    labels, best, best_size = np.zeros(mask.shape, dtype=np.int32), 0, 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        label, stack, size = labels.max() + 1, [start], 0
        labels[start] = label
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best_size else mask


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    distances = [np.linalg.norm(rgb - np.array(COLOURS[name], dtype=np.float32)) for name in names]
    return names[int(np.argmin(distances))]


def template(shape: str, box, size: int) -> np.ndarray:
    """`shape` drawn so that its extents fill the region's bounding box `box` (left, top, right, bottom)."""
    left, top, right, bottom = UNIT_EXTENTS[shape]
    radius = ((box[2] - box[0]) / (right - left) + (box[3] - box[1]) / (bottom - top)) / 2
    centre = (box[0] - left * radius, box[1] - top * radius)
    canvas = Image.new("L", (size, size), 0)
    fill_shape(ImageDraw.Draw(canvas), shape, centre, radius, 255)
    return np.asarray(canvas) > 0


def best_shape(region: np.ndarray) -> tuple[str, float]:
    ys, xs = np.nonzero(region)
    box = (xs.min(), ys.min(), xs.max(), ys.max())
    overlaps = {}
    for shape in SHAPES:
        drawn = template(shape, box, region.shape[0])
        overlaps[shape] = (drawn & region).sum() / (drawn | region).sum()
    shape = max(overlaps, key=overlaps.get)
    return (shape if overlaps[shape] >= MIN_OVERLAP else "none"), float(overlaps[shape])


def judge(image: Image.Image) -> Verdict:
    """The shape and colour that `image` shows."""
    pixels = np.asarray(image.convert("RGB"))
    region = largest_region(object_mask(pixels))
    if region.sum() < 4:
        return Verdict("none", "none", 0.0)
    colour = nearest_colour(np.median(pixels[region].astype(np.float32), axis=0))
    shape, overlap = best_shape(region)
    return Verdict(shape, colour, overlap)
