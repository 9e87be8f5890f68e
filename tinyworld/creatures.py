"""Tiny pokemon: cartoon creatures of a few invented species, captioned in the style of pokemon-blip-captions.

Each species has its own body colour, body shape and one large feature (ears, tail, spikes, wings, eyes, mouth).
Flat colours, no outlines, and big high-contrast features on purpose: a tiny VAE's 16x16 latents lose thin lines
and small details (outlined creatures with white-and-black eyes came back with muddy faces and shifted hues).
"""

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from tinyworld.shapes import BACKGROUNDS, COLOURS, article

INK = (25, 25, 25)  # eyes, pupils, mouths and tips: dark on every body colour
EYE_WHITE = (250, 250, 250)


@dataclass(frozen=True)
class Species:
    colour: str  # a key of tinyworld.shapes.COLOURS: the base world already knows the word
    body: str  # "round", "wide", "square", "tall" or "pear"
    feature: str  # the caption's "with ..." phrase; also selects the drawing of the feature


SPECIES = (
    Species("yellow", "round", "long ears"),
    Species("blue", "wide", "a long tail"),
    Species("green", "square", "spikes"),
    Species("red", "round", "big wings"),
    Species("purple", "tall", "big eyes"),
    Species("orange", "pear", "a big mouth"),
)
# The seventh species, for subject training (DreamBooth): a colour-and-feature pair no species above has, so no tiny
# model was trained on it; it is called by a rare word that is not in the tiny world's vocabulary, as "sks" is not a
# word of SD's.
SUBJECT = Species("green", "wide", "long ears")
SUBJECT_PROMPT = "a drawing of a zxq creature"


def creature_caption(species: Species, background: str) -> str:
    return f"a drawing of {article(species.colour)} {species.colour} creature with {species.feature} " \
           f"on a {background} background"


def creature_words() -> list[str]:
    """Every word a creature caption can use."""
    words = {"a", "an", "drawing", "of", "creature", "with", "on", "background", *BACKGROUNDS}
    for species in SPECIES:
        words |= {species.colour, *species.feature.split()}
    return sorted(words)


def ellipse(draw, x, y, rx, ry, fill) -> None:
    draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=fill)


def draw_body(draw, body: str, x, y, r, fill) -> None:
    """The body, centred at (x, y), about 2r across."""
    if body == "round":
        ellipse(draw, x, y, r, r, fill)
    elif body == "wide":
        ellipse(draw, x, y, 1.25 * r, 0.85 * r, fill)
    elif body == "square":
        draw.rounded_rectangle((x - r, y - r, x + r, y + r), radius=0.3 * r, fill=fill)
    elif body == "tall":
        ellipse(draw, x, y, 0.85 * r, 1.2 * r, fill)
    elif body == "pear":
        ellipse(draw, x, y + 0.3 * r, 1.1 * r, 0.8 * r, fill)
        ellipse(draw, x, y - 0.45 * r, 0.7 * r, 0.65 * r, fill)
    else:
        raise ValueError(f"unknown body {body!r}")


def draw_behind(draw, species: Species, x, y, r, fill, facing: int) -> None:
    """Features that the body overlaps: ears, tail, spikes, wings (dark tips where the colour alone would blend)."""
    if species.feature == "long ears":
        for side in (-1, 1):
            ellipse(draw, x + side * 0.5 * r, y - 1.2 * r, 0.3 * r, 0.85 * r, fill)
            ellipse(draw, x + side * 0.5 * r, y - 1.75 * r, 0.24 * r, 0.3 * r, INK)
    elif species.feature == "a long tail":
        points = [(x + facing * 0.9 * r, y + 0.2 * r), (x + facing * 1.7 * r, y), (x + facing * 2.0 * r, y - 0.8 * r)]
        draw.line(points, fill=fill, width=round(0.45 * r), joint="curve")
        ellipse(draw, x + facing * 2.0 * r, y - 1.0 * r, 0.4 * r, 0.4 * r, INK)
    elif species.feature == "spikes":
        for offset in (-0.65, 0.0, 0.65):
            base = x + offset * r
            draw.polygon([(base - 0.4 * r, y - 0.8 * r), (base, y - 1.9 * r), (base + 0.4 * r, y - 0.8 * r)], fill=fill)
    elif species.feature == "big wings":
        for side in (-1, 1):
            draw.polygon([(x + side * 0.6 * r, y - 0.2 * r), (x + side * 2.1 * r, y - 1.3 * r),
                          (x + side * 1.8 * r, y + 0.2 * r), (x + side * 0.6 * r, y + 0.5 * r)], fill=fill)


def draw_face(draw, species: Species, x, y, r, facing: int) -> None:
    """Eyes (big and white for one species, dark dots for the others) and, for one species, a big mouth."""
    eye_y = y - 0.15 * r if species.body != "pear" else y - 0.5 * r
    for side in (-1, 1):
        if species.feature == "big eyes":
            ex = x + facing * 0.1 * r + side * 0.45 * r
            ellipse(draw, ex, eye_y, 0.45 * r, 0.45 * r, EYE_WHITE)
            ellipse(draw, ex + facing * 0.12 * r, eye_y, 0.25 * r, 0.25 * r, INK)
        else:
            ellipse(draw, x + facing * 0.2 * r + side * 0.42 * r, eye_y, 0.24 * r, 0.24 * r, INK)
    if species.feature == "a big mouth":
        draw.chord((x - 0.6 * r, y - 0.2 * r, x + 0.6 * r, y + 0.8 * r), 0, 180, fill=INK)


def draw_creature(species: Species, background: str, centre, radius: float, facing: int = 1, size: int = 64,
                  body_colour=None) -> Image.Image:
    """One creature of `species`, its body about 2 x `radius` across, on a plain background."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    fill = body_colour or COLOURS[species.colour]
    x, y = centre
    draw_behind(draw, species, x, y, radius, fill, facing)
    draw_body(draw, species.body, x, y, radius, fill)
    draw_face(draw, species, x, y, radius, facing)
    return image


def jitter(colour, rng: random.Random, amount: int = 12):
    """A hand-drawn body colour: the species' colour shifted a little per channel."""
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in colour)


def random_creature(rng: random.Random, species: Species, background: str, size: int = 64):
    """A random (image, caption) of `species`: size, position, facing and colour shade drawn from `rng`."""
    radius = rng.uniform(0.16, 0.21) * size
    # the features reach about 2.1 radii sideways and upwards from the body's centre
    x = rng.uniform(2.1 * radius, size - 2.1 * radius)
    y = rng.uniform(2.1 * radius, size - 1.25 * radius)
    facing = rng.choice((-1, 1))
    image = draw_creature(species, background, (x, y), radius, facing, size, jitter(COLOURS[species.colour], rng))
    return image, creature_caption(species, background)
