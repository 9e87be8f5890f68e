"""The tiny world's datasets, written deterministically as imagefolders (PNGs plus metadata.jsonl).

    python -m tinyworld.datasets data/tinyworld

    base/train, base/heldout         shapes only (the stock model's world); held-out images are new draws
    pokemon/train, pokemon/heldout   creatures only; held-out captions are unseen (species, background) pairs
    subject/zxq, subject/heldout     the seventh species (creatures.SUBJECT), never in the sets above: 6 instance
                                     images for subject training (configs/tiny-dreambooth-lora.yaml) and 24 other draws
                                     to measure subject fidelity against (metrics.py --subject_images)

A few seconds on one core; the same seed always writes the same files.
"""

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tinyworld.creatures import SPECIES, SUBJECT, SUBJECT_PROMPT, creature_caption, creature_words, random_creature
from tinyworld.shapes import BACKGROUNDS, COLOURS, SHAPES, random_shape, shape_caption, shape_words, write_imagefolder

BASE_TRAIN, BASE_HELDOUT = 3600, 360  # 50 and 5 images per caption on average (72 captions)
CREATURES_PER_PAIR_TRAIN, CREATURES_PER_PAIR_HELDOUT = 60, 20
SUBJECT_INSTANCES, SUBJECT_HELDOUT = 6, 24  # DreamBooth's 3-30 pictures of the subject; and images to score against
SPLITS = ("base/train", "base/heldout", "pokemon/train", "subject/zxq", "subject/heldout", "pokemon/heldout")


def world_words() -> list[str]:
    """Every word of every caption in the tiny world: the tokenizer makes each one token."""
    return sorted(set(shape_words()) | set(creature_words()))


def heldout_background(species_index: int) -> str:
    """The background a species is never seen on in training: each background is held out for two species."""
    return list(BACKGROUNDS)[species_index % len(BACKGROUNDS)]


def creature_pairs(heldout: bool) -> list[tuple]:
    """(species, background) pairs of the training or the held-out split."""
    return [(species, background) for index, species in enumerate(SPECIES) for background in BACKGROUNDS
            if (background == heldout_background(index)) == heldout]


def every_caption(name: str) -> list[str]:
    """Every caption the "base" or "pokemon" set can have: the candidates a CLIP ranks."""
    if name == "base":
        return [shape_caption(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS]
    if name == "pokemon":
        return [creature_caption(species, background) for species in SPECIES for background in BACKGROUNDS]
    raise ValueError(f"unknown set {name!r}: 'base' or 'pokemon'")


def heldout_creature_prompts() -> list[str]:
    return [creature_caption(species, background) for species, background in creature_pairs(heldout=True)]


def creatures(heldout: bool, per_pair: int, seed: int):
    rng = random.Random(seed)
    for species, background in creature_pairs(heldout):
        for _ in range(per_pair):
            yield random_creature(rng, species, background)


def subject_creatures(count: int, seed: int):
    """`count` draws of the seventh species, captioned with the subject prompt, on each background in turn."""
    rng = random.Random(seed)
    for index in range(count):
        image, _ = random_creature(rng, SUBJECT, list(BACKGROUNDS)[index % len(BACKGROUNDS)])
        yield image, SUBJECT_PROMPT


def shapes(count: int, seed: int):
    rng = random.Random(seed)
    return (random_shape(rng) for _ in range(count))


def write_world(folder, seed: int = 0) -> Path:
    """Write the splits under `folder`; each split has its own seed so that none depends on another. pokemon/heldout
    comes last: the Makefile takes its metadata as the sign that the world is complete."""
    folder = Path(folder)
    write_imagefolder(folder / "base/train", shapes(BASE_TRAIN, seed))
    write_imagefolder(folder / "base/heldout", shapes(BASE_HELDOUT, seed + 1))
    write_imagefolder(folder / "pokemon/train", creatures(False, CREATURES_PER_PAIR_TRAIN, seed + 2))
    write_subject(folder, seed)
    write_imagefolder(folder / "pokemon/heldout", creatures(True, CREATURES_PER_PAIR_HELDOUT, seed + 3))
    return folder


def write_subject(folder, seed: int = 0) -> Path:
    """The seventh species' two splits, subject/zxq and subject/heldout, under `folder`."""
    folder = Path(folder)
    write_imagefolder(folder / "subject/zxq", subject_creatures(SUBJECT_INSTANCES, seed + 4))
    write_imagefolder(folder / "subject/heldout", subject_creatures(SUBJECT_HELDOUT, seed + 5))
    return folder / "subject"


def read_split(folder) -> tuple[torch.Tensor, list[str]]:
    """All images of an imagefolder as one uint8 tensor [N, 3, H, W], and their captions."""
    rows = [json.loads(line) for line in (Path(folder) / "metadata.jsonl").read_text().splitlines()]
    pixels = np.stack([np.asarray(Image.open(Path(folder) / row["file_name"]).convert("RGB")) for row in rows])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [row["text"] for row in rows]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="data/tinyworld")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_world(args.folder, args.seed))


if __name__ == "__main__":
    main()
