"""What the from-scratch trainings of the tiny VAE and CLIP share: seeded initialisation, batches, log.

The stock UNet is not trained here but with the project's own trainer (see stock.py).
"""

import logging
import time

import torch

from tinyworld.shapes import BACKGROUNDS

WARMUP_STEPS = 100  # linear warmup of the VAE's and CLIP's learning rate, then cosine decay to zero

logger = logging.getLogger("tinyworld")


def seeded(factory, seed: int):
    """Build a model with weights drawn from `seed`, leaving the global random state as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory()


def batch_indices(count: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` distinct row indices drawn from `generator`."""
    return torch.randperm(count, generator=generator)[:batch_size]


def balanced_batch(sets: list, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """Images and captions drawn equally from each (pixels, captions) set, so the small set is not drowned."""
    pixels, captions = [], []
    for set_pixels, set_captions in sets:
        rows = batch_indices(len(set_pixels), batch_size // len(sets), generator)
        pixels.append(set_pixels[rows])
        captions += [set_captions[i] for i in rows]
    return torch.cat(pixels), captions


def random_flip(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image with probability 0.5: the world has no left or right."""
    flip = torch.rand(len(pixels), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)


def border_colour(pixels: torch.Tensor) -> torch.Tensor:
    """Each image's background: the median colour of its border, [N, C, 1, 1]."""
    border = torch.cat([pixels[..., 0, :], pixels[..., -1, :], pixels[..., :, 0], pixels[..., :, -1]], dim=-1)
    return border.median(dim=-1).values[..., None, None]


def swap_background(pixels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """uint8 images repainted on a random background, and its name. Background pixels are exactly the border
    colour: the drawings have no anti-aliasing."""
    names = list(BACKGROUNDS)
    picks = torch.randint(len(names), (len(pixels),), generator=generator)
    colours = torch.tensor(list(BACKGROUNDS.values()), dtype=pixels.dtype)[picks][..., None, None]
    is_background = (pixels == border_colour(pixels)).all(dim=1, keepdim=True)
    return torch.where(is_background, colours, pixels), [names[i] for i in picks]


def with_background(caption: str, background: str) -> str:
    """A caption of either set ("... on a white background") with its background word replaced."""
    return f"{caption.rsplit(' on a ', 1)[0]} on a {background} background"


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] to float [-1, 1], the range Stable Diffusion's VAE works in."""
    return pixels.float() / 127.5 - 1.0


class StepLog:
    """A DiT-style log line every `every` steps: mean loss and steps per second since the last line."""

    def __init__(self, name: str, every: int = 100):
        self.name, self.every, self.losses, self.start = name, every, [], time.perf_counter()

    def __call__(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if (step + 1) % self.every == 0:
            speed = len(self.losses) / (time.perf_counter() - self.start)
            logger.info("%s (step=%06d) Train Loss: %.4f, Train Steps/Sec: %.2f", self.name, step + 1,
                        sum(self.losses) / len(self.losses), speed)
            self.losses, self.start = [], time.perf_counter()
