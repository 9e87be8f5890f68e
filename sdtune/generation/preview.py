"""Live previews: a cheap picture of the latents while an image denoises, in place of the VAE's decode.

Each latent pixel maps to an RGB colour by one linear map plus a bias (as the cheap previews of AUTOMATIC1111 and
ComfyUI do), fitted by least squares on synthetic images of flat coloured shapes that the model's own VAE encodes and
decodes. Fitting needs no data and no download, so it works offline for any VAE, and costs one small encode and
decode once per VAE; rendering a preview is a matrix product on the latents.
"""

import math
import random
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

PREVIEWS_PER_IMAGE = 5  # about as many previews while one image denoises, the last step's left to the final image
FIT_IMAGES = 16  # synthetic images the map is fitted on
FIT_LATENT_SIDE = 16  # their side in latent pixels: 64 px for the tiny world, 128 px for Stable Diffusion
SHAPES_PER_IMAGE = 4


@dataclass(frozen=True)
class LatentPreview:
    """RGB in [-1, 1] = latents x weight + bias, per latent pixel."""
    weight: torch.Tensor  # [latent channels, 3], float32 on the CPU
    bias: torch.Tensor  # [3]

    def images(self, latents: torch.Tensor, sizes: list[tuple[int, int]]) -> list[Image.Image]:
        """One preview per image of the batch, enlarged to its (width, height) with NEAREST so that it stays crisp."""
        weight, bias = self.weight.to(latents.device), self.bias.to(latents.device)
        rgb = torch.einsum("bchw,cr->bhwr", latents.float(), weight) + bias
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()  # CPU-GPU sync point
        return [Image.fromarray(image).resize(size, Image.Resampling.NEAREST) for image, size in zip(pixels, sizes)]


def fit_images(side: int, seed: int = 0) -> torch.Tensor:
    """[FIT_IMAGES, 3, side, side] in [-1, 1]: ellipses and rectangles of random colours on random backgrounds."""
    rng = random.Random(seed)
    images = np.stack([_shapes_image(rng, side) for _ in range(FIT_IMAGES)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _shapes_image(rng: random.Random, side: int) -> np.ndarray:
    image = Image.new("RGB", (side, side), _colour(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(SHAPES_PER_IMAGE):
        x, y, radius = rng.randrange(side), rng.randrange(side), rng.randrange(side // 8, side // 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x - radius, y - radius, x + radius, y + radius), fill=_colour(rng))
    return np.asarray(image)


def _colour(rng: random.Random) -> tuple[int, int, int]:
    """Half the channels at 0 or 255: saturated colours, black and white, which uniform draws seldom give, fitted
    as well as the mixtures (uniform-only draws fitted the tiny world's images worse)."""
    return tuple(rng.choice((0, 255)) if rng.random() < 0.5 else rng.randrange(256) for _ in range(3))


@torch.no_grad()
def fit(vae) -> LatentPreview:
    """The least-squares map from the pipeline's latents (the VAE's x its scaling factor, as StableDiffusionPipeline
    scales them) to the VAE's decode of them, averaged over each latent pixel's patch of the image."""
    side = FIT_LATENT_SIDE * 2 ** (len(vae.config.block_out_channels) - 1)
    pixels = fit_images(side).to(vae.device, vae.dtype)
    latents = vae.encode(pixels).latent_dist.mode()
    # the decode, not the input: the preview stands in for what the pipeline will show, however good the VAE is
    decoded = vae.decode(latents).sample.float()
    target = F.avg_pool2d(decoded, side // latents.shape[-1])
    inputs = (latents.float() * vae.config.scaling_factor).permute(0, 2, 3, 1).flatten(0, 2).cpu()
    outputs = target.permute(0, 2, 3, 1).flatten(0, 2).cpu()
    solution = torch.linalg.lstsq(torch.cat([inputs, torch.ones(len(inputs), 1)], 1), outputs).solution
    return LatentPreview(weight=solution[:-1].contiguous(), bias=solution[-1].contiguous())


_fitted: "weakref.WeakKeyDictionary[torch.nn.Module, LatentPreview]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def latent_preview(vae) -> LatentPreview:
    """`vae`'s map, fitted on first use; models sharing a VAE share its map, and it goes when the VAE does."""
    with _lock:
        if vae not in _fitted:
            _fitted[vae] = fit(vae)
        return _fitted[vae]


def is_preview_step(done: int, steps: int) -> bool:
    """Whether a preview follows the `done`-th of `steps` denoising steps: every ceil(steps / PREVIEWS_PER_IMAGE)-th,
    never the last (the final image follows it)."""
    return done % math.ceil(steps / PREVIEWS_PER_IMAGE) == 0 and done < steps
