"""The tiny world's AutoencoderKL: 64 px images to 16x16 latents with 4 channels, trained on shapes and creatures.

No perceptual or adversarial loss as in Stable Diffusion's VAE: the world is flat colours, and an L1 loss that weights
the object's pixels above the background keeps hues right (trained plainly, purple came back blue). Backgrounds are
swapped at random so that every creature is seen on every background: the held-out (species, background) pairs must
decode as well as the others, as a real VAE has seen everything.
"""

import torch
from diffusers import AutoencoderKL
from diffusers.optimization import get_cosine_schedule_with_warmup

from tinyworld.factories import vae
from tinyworld.training import (
    WARMUP_STEPS,
    StepLog,
    balanced_batch,
    batch_indices,
    border_colour,
    random_flip,
    seeded,
    swap_background,
    to_unit_range,
)

OBJECT_WEIGHT = 5.0  # loss weight of a pixel that differs from the background, relative to a background pixel
KL_WEIGHT = 1e-6  # just enough to keep the posterior a distribution; the scaling factor fixes the latent scale


def build_vae() -> AutoencoderKL:
    """Three blocks: a downsampling factor of 4 (Stable Diffusion's has four blocks and a factor of 8)."""
    return vae((16, 32, 64), layers_per_block=1, sample_size=64, norm_num_groups=8)


def differs_from_background(pixels: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """1 where a pixel (in [-1, 1]) differs from its image's background, the median colour of its border."""
    return ((pixels - border_colour(pixels)).abs().amax(dim=1, keepdim=True) > threshold).float()


def vae_loss(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Object-weighted L1 reconstruction of a posterior sample, plus a small KL term."""
    posterior = vae.encode(pixels).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample.float()
    weights = 1.0 + (OBJECT_WEIGHT - 1.0) * differs_from_background(pixels)
    l1 = ((reconstruction - pixels).abs() * weights).sum() / (weights.sum() * pixels.shape[1])
    return l1 + KL_WEIGHT * posterior.kl().mean() / posterior.mean[0].numel()


def train_vae(sets: list, steps: int, batch_size: int = 16, learning_rate: float = 2e-3,
              seed: int = 0) -> AutoencoderKL:
    """Train from scratch on (uint8 pixels [N, 3, 64, 64], captions) sets; bf16 autocast halves the CPU time."""
    vae = seeded(build_vae, seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, WARMUP_STEPS, steps)
    generator, log = torch.Generator().manual_seed(seed), StepLog("vae")
    for step in range(steps):
        pixels, _ = balanced_batch(sets, batch_size, generator)
        pixels, _ = swap_background(pixels, generator)
        batch = to_unit_range(random_flip(pixels, generator))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = vae_loss(vae, batch, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        log(step, loss.item())
    return vae.eval()


@torch.no_grad()
def set_scaling_factor(vae: AutoencoderKL, pixels: torch.Tensor, seed: int = 0) -> float:
    """Store 1 / std of the latents in the config, as Stable Diffusion's 0.18215: the UNet then sees unit variance."""
    generator = torch.Generator().manual_seed(seed)
    sample = pixels[batch_indices(len(pixels), 512, generator)]
    latents = torch.cat([vae.encode(to_unit_range(chunk)).latent_dist.sample(generator) for chunk in sample.split(64)])
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=factor)
    return factor
