"""The end of a run: the fine-tuned pipeline in diffusers format, its model card, and the optional hub upload."""

import logging
from pathlib import Path

from diffusers import StableDiffusionPipeline

from sdtune.errors import SdtuneError
from sdtune.training import lora
from sdtune.training.loss_plot import loss_curve_section

logger = logging.getLogger(__name__)


def save_pipeline(args, unet, text_encoder=None) -> StableDiffusionPipeline:
    """The base pipeline with the trained UNet (and with --train_text_encoder the trained text encoder), saved as
    safetensors in --output_dir.

    The frozen parts are reloaded from the base rather than taken from training, where they may have been cast to
    fp16: the saved pipeline then differs from the stock one in its trained parts only.
    """
    trained = {"unet": unet} if text_encoder is None else {"unet": unet, "text_encoder": text_encoder}
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir,
        **trained,
    )
    if args.prediction_type is not None:
        pipeline.scheduler.register_to_config(prediction_type=args.prediction_type)
    pipeline.save_pretrained(args.output_dir, safe_serialization=True)
    logger.info("Saved the fine-tuned pipeline to %s", args.output_dir)
    return pipeline


def write_model_card(args, trainable_parameters: int, validation_grid: Path | None, loss_history=None) -> Path:
    """README.md of the output: base model, data, hyperparameters, the last validation grid, the loss curve (with a
    validation loss: `loss_history`, a validation_loss.LossHistory), how to use it."""
    dataset = (f"{args.instance_data_dir} ('{args.instance_prompt}')" if args.instance_data_dir
               else args.train_data_dir or args.dataset_name)  # the order the trainer reads them in
    sections = lora.card_sections if args.lora_rank else full_fine_tune_sections
    title, summary, usage = sections(args, trainable_parameters, dataset)
    grid = f"![validation]({validation_grid.relative_to(args.output_dir)})\n" if validation_grid else ""
    prompts = "".join(f"- {p}\n" for p in args.validation_prompts or [])
    curve = loss_curve_section(loss_history, args.output_dir) if loss_history else ""
    card = f"""---
license: creativeml-openrail-m
base_model: {args.pretrained_model_name_or_path}
tags: [stable-diffusion, text-to-image, diffusers, sdtune{", lora" if args.lora_rank else ""}]
library_name: diffusers
---
# {title}

{summary}

| setting | value |
|---|---|
| resolution | {args.resolution} (center crop: {args.center_crop}, random flip: {args.random_flip}) |
| batch size x accumulation | {args.train_batch_size} x {args.gradient_accumulation_steps} |
| learning rate | {args.learning_rate} ({args.lr_scheduler}, warmup {args.lr_warmup_steps}) |
| optimizer steps | {args.max_train_steps} |
| mixed precision | {args.mixed_precision} |
| EMA | {args.use_ema} |
| seed | {args.seed} |

The complete configuration is in `training_config.yaml`.

## Validation
{grid}{prompts}{curve}
## Use
{usage}"""
    path = Path(args.output_dir) / "README.md"
    path.write_text(card)
    return path


def full_fine_tune_sections(args, trainable_parameters: int, dataset: str) -> tuple[str, str, str]:
    """Title, summary and usage of a full fine-tune's model card."""
    title = f"Fine-tuned {args.pretrained_model_name_or_path}"
    summary = (f"The UNet ({trainable_parameters:,} parameters) of `{args.pretrained_model_name_or_path}` fine-tuned "
               f"on `{dataset}`\nwith sdtune; the VAE and text encoder are unchanged.")
    usage = f"""```python
import torch
from diffusers import StableDiffusionPipeline

pipeline = StableDiffusionPipeline.from_pretrained("{args.hub_model_id or args.output_dir}", torch_dtype=torch.float16)
image = pipeline("yoda", generator=torch.Generator().manual_seed(0)).images[0]
```
"""
    return title, summary, usage


def check_hub_reachable(args) -> None:
    """Fail before training, not after, when --push_to_hub cannot work."""
    from huggingface_hub import constants

    if args.push_to_hub and constants.HF_HUB_OFFLINE:
        raise SdtuneError("--push_to_hub is set but HF_HUB_OFFLINE=1: unset one of them.")


def push_to_hub(args) -> str:
    """Upload the saved pipeline (not the checkpoints) to the hub."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True,
                          token=args.hub_token).repo_id
    upload_folder(repo_id=repo_id, folder_path=args.output_dir, token=args.hub_token,
                  commit_message="Fine-tuned with sdtune", ignore_patterns=["checkpoint-*", "logs/*", "*.tmp"])
    logger.info("Uploaded to https://huggingface.co/%s", repo_id)
    return repo_id
