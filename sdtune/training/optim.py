"""Optimizer, learning-rate schedule and the offloaded EMA update."""

from dataclasses import dataclass

import torch
from diffusers.optimization import get_scheduler

from sdtune.errors import SdtuneError


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer's flags (config.py has each one's help); config.settings_from(OptimizerSettings, args)."""

    learning_rate: float
    scale_lr: bool  # multiply learning_rate by the samples an optimizer step sees
    train_batch_size: int
    gradient_accumulation_steps: int
    use_8bit_adam: bool
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_epsilon: float


def make_optimizer(parameters, settings: OptimizerSettings, num_processes: int) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' AdamW8bit with --use_8bit_adam; the learning rate scaled with --scale_lr."""
    learning_rate = settings.learning_rate
    if settings.scale_lr:
        learning_rate *= settings.gradient_accumulation_steps * settings.train_batch_size * num_processes
    if settings.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise SdtuneError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(parameters, lr=learning_rate, betas=(settings.adam_beta1, settings.adam_beta2),
                           weight_decay=settings.adam_weight_decay, eps=settings.adam_epsilon)


def make_lr_scheduler(optimizer, schedule: str, *, warmup_steps: int, max_train_steps: int, num_processes: int):
    """diffusers' schedule named `schedule` (--lr_scheduler) with --lr_warmup_steps; counts are multiplied by the
    process count because accelerate steps the scheduler once per process for every optimizer step."""
    return get_scheduler(schedule, optimizer=optimizer,
                         num_warmup_steps=warmup_steps * num_processes,
                         num_training_steps=max_train_steps * num_processes)


@torch.no_grad()
def update_offloaded_ema(ema, parameters) -> None:
    """EMAModel.step for shadow weights kept in CPU memory.

    diffusers' own step needs the shadow weights on the parameters' device, which costs a full UNet copy of GPU
    memory at every step; here each parameter visits the CPU instead, one at a time.
    """
    ema.optimization_step += 1
    decay = ema.get_decay(ema.optimization_step)
    ema.cur_decay_value = decay
    for shadow, param in zip(ema.shadow_params, parameters):
        value = param.detach().to(shadow.device, dtype=shadow.dtype)
        if param.requires_grad:
            shadow.sub_((1 - decay) * (shadow - value))
        else:
            shadow.copy_(value)
