"""The denoising objective of Stable Diffusion training, with every random draw taken from one explicit generator.

latents x scaling factor -> noise (+ offset) -> timesteps -> noisy latents -> UNet prediction -> (SNR-weighted) MSE
"""

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from sdtune.errors import SdtuneError


def randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Gaussian noise drawn on the CPU (the same on every device) and moved next to `like`."""
    return torch.randn(shape, generator=generator).to(like.device, like.dtype)


@torch.no_grad()
def latent_distribution(batch, vae, weight_dtype):
    """Mean and std of the VAE posterior: from the cache when present, else by encoding the pixels."""
    if "latent_mean" in batch:
        return batch["latent_mean"].float(), batch["latent_std"].float()
    posterior = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist
    return posterior.mean.float(), posterior.std.float()


@torch.no_grad()
def text_conditioning(batch, text_encoder):
    if "encoder_hidden_states" in batch:
        return batch["encoder_hidden_states"]
    return text_encoder(batch["input_ids"], return_dict=False)[0]


def diffusion_loss(batch, unet, parts, generator: torch.Generator, weight_dtype, *, noise_offset: float = 0.0,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """One micro-batch's training loss; --noise_offset and --snr_gamma as in config.py."""
    mean, std = latent_distribution(batch, parts.vae, weight_dtype)
    latents = (mean + std * randn(mean.shape, generator, mean)) * parts.vae.config.scaling_factor
    noise = randn(latents.shape, generator, latents)
    if noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise: lets the model learn overall brightness
        noise = noise + noise_offset * randn((*latents.shape[:2], 1, 1), generator, latents)
    scheduler = parts.noise_scheduler
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    target = prediction_target(scheduler, latents, noise, timesteps)
    encoder_hidden_states = text_conditioning(batch, parts.text_encoder)
    prediction = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    return weighted_mse(prediction.float(), target.float(), scheduler, timesteps, snr_gamma)


def prediction_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise SdtuneError(f"Unsupported prediction type '{prediction_type}': use epsilon or v_prediction.")


def weighted_mse(prediction, target, scheduler, timesteps, snr_gamma) -> torch.Tensor:
    """Plain MSE, or Min-SNR-gamma weighted MSE (Hang et al. 2023, section 3.4) when snr_gamma is set."""
    if snr_gamma is None:
        return F.mse_loss(prediction, target, reduction="mean")
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    # epsilon-prediction weights min(snr, gamma) / snr; v-prediction's loss already carries a factor snr + 1
    weights = clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr
    per_example = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    return (per_example * weights).mean()
