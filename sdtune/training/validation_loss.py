"""The validation loss: the diffusion loss on held-out rows, at fixed timesteps and with fixed noise.

The held-out rows (--validation_split of the training rows, or the rows of --validation_data_dir) are encoded once,
before training: the VAE posterior's mean of the centre crop and the first caption's text embedding. Each row is
then scored at TIMESTEPS timesteps, the centres of equal slices of the schedule, with noise drawn from the row's own
generator (seeds.validation_loss_generator), the same at every evaluation and in every run. So the figure moves
only when the weights do: it compares across steps and across runs on the same held-out rows.

It is computed on the main process only (the other processes wait at the validation barrier), so a run on two
processes records the same figures as on one.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtune.data.dataset import CaptionedImages, usable_captions
from sdtune.seeds import validation_loss_generator
from sdtune.training.objective import latent_distribution, prediction_target, text_conditioning, weighted_mse

logger = logging.getLogger(__name__)

TIMESTEPS = 5  # per row: 100, 300, 500, 700 and 900 of a 1000-step schedule
HISTORY_FILE = "loss_history.jsonl"


@dataclass
class HeldOutExamples:
    """The encoded held-out rows, in CPU memory."""

    latents: torch.Tensor  # [N, C, H, W]: posterior means times the VAE's scaling factor
    text: torch.Tensor  # [N, tokens, width]: text encoder outputs

    def __len__(self) -> int:
        return len(self.latents)


@torch.no_grad()
def encode_held_out(rows, parts, args, device, weight_dtype) -> HeldOutExamples:
    """Centre crops, unflipped, with each row's first caption: no augmentation, so nothing varies between
    evaluations."""
    examples = CaptionedImages(rows, args, parts.tokenizer)
    latents, text = [], []
    for start in range(0, len(examples), args.train_batch_size):
        positions = range(start, min(start + args.train_batch_size, len(examples)))
        captions = [usable_captions(rows[p][args.caption_column])[0] for p in positions]
        batch = {"pixel_values": torch.stack([examples.image_at(p, False) for p in positions]).to(device),
                 "input_ids": torch.stack([examples.tokenize(c) for c in captions]).to(device)}
        mean, _ = latent_distribution(batch, parts.vae, weight_dtype)
        latents.append((mean * parts.vae.config.scaling_factor).cpu())
        text.append(text_conditioning(batch, parts.text_encoder).float().cpu())
    return HeldOutExamples(torch.cat(latents), torch.cat(text))


def fixed_timesteps(num_train_timesteps: int, count: int = TIMESTEPS) -> torch.Tensor:
    """The centres of `count` equal slices of the schedule."""
    return ((torch.arange(count) + 0.5) * num_train_timesteps / count).long()


@torch.no_grad()
def held_out_loss(model, examples: HeldOutExamples, scheduler, snr_gamma, batch_size: int, device) -> float:
    """The training objective, averaged over every held-out row at every fixed timestep; `model` is left in the
    mode it came in (evaluation mode here turns LoRA dropout off)."""
    was_training = model.training
    model.eval()
    timesteps = fixed_timesteps(scheduler.config.num_train_timesteps)
    rows_per_batch = -(-batch_size // TIMESTEPS)  # about a training batch of (row, timestep) pairs, without grads
    try:
        total = sum(summed_loss(model, examples, range(start, min(start + rows_per_batch, len(examples))),
                                timesteps, scheduler, snr_gamma, device)
                    for start in range(0, len(examples), rows_per_batch))
    finally:
        model.train(was_training)
    return total / (len(examples) * TIMESTEPS)


def summed_loss(model, examples: HeldOutExamples, rows: range, timesteps, scheduler, snr_gamma, device) -> float:
    """The objective summed over `rows`, each at every one of `timesteps` with its row's own fixed noise."""
    latents = examples.latents[rows.start:rows.stop].repeat_interleave(len(timesteps), dim=0).to(device)
    text = examples.text[rows.start:rows.stop].repeat_interleave(len(timesteps), dim=0).to(device, model.dtype)
    noise = torch.cat([torch.randn((len(timesteps), *latents.shape[1:]), generator=validation_loss_generator(row))
                       for row in rows]).to(device)
    steps = timesteps.repeat(len(rows)).to(device)
    target = prediction_target(scheduler, latents, noise, steps)
    prediction = model(scheduler.add_noise(latents, noise, steps), steps, text, return_dict=False)[0]
    return weighted_mse(prediction.float(), target.float(), scheduler, steps, snr_gamma).item() * len(steps)


@dataclass
class LossPoint:
    step: int
    train_loss: float | None  # the mean training loss of the steps since the previous point (None: none recorded)
    validation_loss: float


class LossHistory:
    """Every step's training loss and every validation loss, appended as JSON lines to output_dir/
    loss_history.jsonl as they come, so that a run resumed from any checkpoint records the same curve as an
    uninterrupted one."""

    def __init__(self, path: Path, records: list[dict]):
        self.path, self.records = path, records

    @classmethod
    def continued(cls, output_dir, global_step: int) -> "LossHistory":
        """The saved records up to `global_step` (the checkpoint resumed from; 0 for a new run): what the
        interrupted run recorded after its checkpoint is dropped, to be recorded again."""
        path = Path(output_dir) / HISTORY_FILE
        saved = path.read_text().splitlines() if path.is_file() and global_step > 0 else []
        records = [record for record in map(json.loads, saved) if record["step"] <= global_step]
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
        return cls(path, records)

    def record_train(self, step: int, loss: float) -> None:
        self._append({"step": step, "train_loss": loss})

    def add(self, step: int, validation_loss: float) -> LossPoint:
        self._append({"step": step, "validation_loss": validation_loss})
        return self.points[-1]

    def _append(self, record: dict) -> None:
        self.records.append(record)
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")

    @property
    def points(self) -> list[LossPoint]:
        """A point per validation, with the mean training loss of the steps since the previous one."""
        points, train_losses = [], []
        for record in self.records:
            if "train_loss" in record:
                train_losses.append(record["train_loss"])
                continue
            train = sum(train_losses) / len(train_losses) if train_losses else None
            points.append(LossPoint(record["step"], train, record["validation_loss"]))
            train_losses = []
        return points

    def lowest(self) -> LossPoint:
        return min(self.points, key=lambda point: point.validation_loss)


class ValidationLoss:
    """The held-out rows, scored at every validation and recorded in the trackers, train.log and the history."""

    def __init__(self, examples: HeldOutExamples, scheduler, *, output_dir, snr_gamma: float | None, batch_size: int):
        self.examples, self.scheduler, self.output_dir = examples, scheduler, output_dir
        self.snr_gamma, self.batch_size = snr_gamma, batch_size  # --snr_gamma, and --train_batch_size rows a pass
        self.history = LossHistory(Path(output_dir) / HISTORY_FILE, [])

    @classmethod
    def from_rows(cls, rows, parts, args, device, weight_dtype) -> "ValidationLoss":
        return cls(encode_held_out(rows, parts, args, device, weight_dtype), parts.noise_scheduler,
                   output_dir=args.output_dir, snr_gamma=args.snr_gamma, batch_size=args.train_batch_size)

    def continue_from(self, global_step: int) -> None:
        self.history = LossHistory.continued(self.output_dir, global_step)

    def record_train(self, step: int, loss: float) -> None:
        self.history.record_train(step, loss)

    def evaluate(self, accelerator, model, global_step: int) -> float:
        with accelerator.autocast():
            loss = held_out_loss(model, self.examples, self.scheduler, self.snr_gamma, self.batch_size,
                                 accelerator.device)
        point = self.history.add(global_step, loss)
        accelerator.log({"validation_loss": loss}, step=global_step)
        train = "n/a" if point.train_loss is None else f"{point.train_loss:.4f}"
        logger.info("(step=%07d) Validation Loss: %.4f on %d held-out rows x %d timesteps (mean Train Loss since "
                    "the last validation: %s)", global_step, loss, len(self.examples), TIMESTEPS, train)
        return loss
