"""Each training flag checked where it acts (the objective, the optimizer and its schedule, the data), against a hand
computation and without a training run; tests/test_training.py checks the same flags inside real runs."""

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

from sdtune.data.dataset import CaptionedImages
from sdtune.training.config import parse_args, settings_from
from sdtune.training.latent_cache import LatentCache
from sdtune.training.loop import plan_steps
from sdtune.training.objective import diffusion_loss
from sdtune.training.optim import OptimizerSettings, make_lr_scheduler, make_optimizer

BATCH, CHANNELS, SIZE = 16, 4, 8


def training_args(*flags: str):
    """The training script's settings for these flags (the model and data paths are never opened here)."""
    return parse_args(["--pretrained_model_name_or_path", "unused", "--train_data_dir", "unused", "--seed", "0",
                       *flags])


class RecordingUNet:
    """Stands in for the UNet: remembers what it was given and predicts zeros, so the loss is the weighted mean
    square of the target."""

    def __call__(self, noisy_latents, timesteps, encoder_hidden_states, return_dict=False):
        self.noisy_latents, self.timesteps = noisy_latents, timesteps
        return (torch.zeros_like(noisy_latents),)


def objective_run(args, latents: torch.Tensor, prediction_type: str = "epsilon"):
    """diffusion_loss on cached latents with no spread, so the latents are exactly `latents`; returns the loss, the
    noise the objective drew (recovered from the noisy latents) and the timesteps and scheduler it used."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=1.0))
    parts = SimpleNamespace(vae=vae, noise_scheduler=scheduler, text_encoder=None)
    batch = {"latent_mean": latents, "latent_std": torch.zeros_like(latents),
             "encoder_hidden_states": torch.zeros(BATCH, 77, 32)}
    unet = RecordingUNet()
    loss = diffusion_loss(batch, unet, parts, torch.Generator().manual_seed(0), torch.float32,
                          noise_offset=args.noise_offset, snr_gamma=args.snr_gamma)
    signal = scheduler.alphas_cumprod[unet.timesteps].view(-1, 1, 1, 1)
    # DDPM's forward process: noisy = sqrt(alpha_bar) * latents + sqrt(1 - alpha_bar) * noise
    noise = (unet.noisy_latents - signal.sqrt() * latents) / (1 - signal).sqrt()
    return loss, noise, unet.timesteps, scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_loss_is_the_min_snr_weighted_mean_square_computed_by_hand(prediction_type, snr_gamma):
    latents = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    flags = () if snr_gamma is None else ("--snr_gamma", str(snr_gamma))
    loss, noise, timesteps, scheduler = objective_run(training_args(*flags), latents, prediction_type)

    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    if prediction_type == "epsilon":
        target = noise
    else:  # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0 (Salimans & Ho 2022)
        target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    per_example = target.pow(2).mean(dim=(1, 2, 3))  # the prediction is zero
    snr = (alpha_bar / (1 - alpha_bar)).flatten()
    # Min-SNR-gamma: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v-prediction
    denominator = snr if prediction_type == "epsilon" else snr + 1
    weights = torch.ones_like(snr) if snr_gamma is None else snr.clamp(max=snr_gamma) / denominator
    assert loss.item() == pytest.approx((weights * per_example).mean().item(), rel=1e-4)
    if snr_gamma is not None:  # the weighting changes this batch's loss, so a loss that ignored it would fail
        assert (snr > snr_gamma).any() and not torch.allclose(weights, torch.ones_like(weights))


def test_noise_offset_adds_one_draw_per_example_and_channel():
    latents = torch.zeros(BATCH, CHANNELS, SIZE, SIZE)
    _, plain, _, _ = objective_run(training_args(), latents)
    _, offset, _, _ = objective_run(training_args("--noise_offset", "0.1"), latents)
    # same generator: the same Gaussian noise, plus 0.1 x a standard normal shared by every pixel of a channel
    shift = offset - plain
    per_channel = shift.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(shift, per_channel.expand_as(shift), atol=1e-4)
    assert 0.7 < (per_channel / 0.1).std().item() < 1.3


@pytest.mark.parametrize("proportion, low, high", [(0.0, 0.0, 0.0), (0.5, 0.43, 0.57), (1.0, 1.0, 1.0)])
def test_proportion_empty_prompts_empties_that_share_of_captions(proportion, low, high):
    rows = [{"image": None, "text": "a red circle"}] * 400
    # a cache whose text embedding tells which caption an example got: 0 for '', 1 for the real one
    cache = LatentCache(torch.zeros(len(rows), 1, 1), torch.zeros(len(rows), 1, 1),
                        {"": torch.tensor(0.0), "a red circle": torch.tensor(1.0)})
    args = training_args("--proportion_empty_prompts", str(proportion))
    dataset = CaptionedImages(rows, args, tokenizer=None, cache=cache)
    emptied = [dataset[(0, row)]["encoder_hidden_states"].item() == 0.0 for row in range(len(rows))]
    assert low <= sum(emptied) / len(rows) <= high


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor after `step` optimizer steps: linear warmup, then half a cosine down to 0."""
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("num_processes", [1, 3])
def test_scaled_learning_rate_follows_the_cosine_with_warmup(num_processes):
    args = training_args("--learning_rate", "1e-3", "--train_batch_size", "4", "--gradient_accumulation_steps", "2",
                         "--scale_lr", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2")
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(3))], settings_from(OptimizerSettings, args),
                               num_processes)
    schedule = make_lr_scheduler(optimizer, args.lr_scheduler, warmup_steps=args.lr_warmup_steps, max_train_steps=6,
                                 num_processes=num_processes)
    peak = 1e-3 * 4 * 2 * num_processes  # learning rate x batch size x accumulation x processes
    rates = []
    for _ in range(7):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        for _ in range(num_processes):  # accelerate steps the schedule once per process for each optimizer step
            schedule.step()
    assert rates == pytest.approx([peak * cosine_with_warmup(step, 2, 6) for step in range(7)])


def test_learning_rate_is_left_alone_without_scale_lr():
    settings = settings_from(OptimizerSettings, training_args("--learning_rate", "1e-3", "--train_batch_size", "4"))
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(3))], settings, num_processes=3)
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_8bit_adam_keeps_its_moments_in_8_bits():
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.nn.Parameter(torch.randn(64, 128))  # bitsandbytes keeps tensors under 4096 values in 32 bits
    optimizer = make_optimizer([weight], settings_from(OptimizerSettings, training_args("--use_8bit_adam")),
                               num_processes=1)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    weight.grad = torch.randn_like(weight)
    try:
        optimizer.step()
    except RuntimeError as error:  # a build without a kernel for this device
        pytest.skip(f"bitsandbytes cannot run here: {error}")
    state = optimizer.state[weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


def test_steps_and_epochs_follow_max_train_steps_or_num_train_epochs():
    # 7 batches on 2 processes: 4 each, so 2 optimizer steps an epoch with 2 accumulated
    plan = {"gradient_accumulation_steps": 2, "num_train_epochs": 3}
    assert plan_steps(7, 2, max_train_steps=None, **plan) == (6, 3)
    assert plan_steps(7, 2, max_train_steps=5, **plan) == (5, 3)
    assert plan_steps(7, 1, max_train_steps=None, **plan) == (12, 3)  # 7 batches: 4 steps, the last one short
