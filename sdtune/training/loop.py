"""Fine-tune a Stable Diffusion UNet with accelerate. `main(args)` reads top to bottom: set-up, data, loop, export."""

import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from sdtune.data.buckets import BucketBatchSampler
from sdtune.data.check import build_report, load_tokenizer
from sdtune.data.dataset import CaptionedImages, EpochShuffleSampler, load_rows, screen_rows
from sdtune.data.splits import split_validation_rows
from sdtune.logs import setup_logging
from sdtune.seeds import step_generator
from sdtune.training.checkpoints import (
    Progress,
    load_checkpoint,
    register_checkpoint_hooks,
    resolve_resume_path,
    save_checkpoint,
)
from sdtune.training.components import compile_unet_for_training, load_components, use_xformers
from sdtune.training.config import save_resolved_config
from sdtune.training.export import check_hub_reachable, push_to_hub, save_pipeline, write_model_card
from sdtune.training.latent_cache import build_latent_cache
from sdtune.training.lora import add_training_adapter, save_adapter
from sdtune.training.objective import diffusion_loss
from sdtune.training.optim import make_lr_scheduler, make_optimizer, update_offloaded_ema
from sdtune.training.validation_images import log_grid_to_trackers, render_validation, validation_pipeline
from sdtune.training.validation_loss import ValidationLoss

logger = logging.getLogger("sdtune.training.loop")

LOG_EVERY_STEPS = 50  # a line in train.log this often; the tracker gets every step


def main(args) -> Path:
    accelerator = make_accelerator(args)
    # every process logs its warnings; only the main one its progress, and to train.log
    main_process = accelerator.is_main_process
    setup_logging(logging.INFO if main_process else logging.WARNING,
                  Path(args.output_dir) / "train.log" if main_process else None)
    check_hub_reachable(args)
    set_seed(args.seed)
    # the data check: a bad dataset stops before any model loads
    dataset, held_out_rows = make_dataset(args, load_tokenizer(args))

    # The frozen parts run in the mixed-precision dtype; the trained weights (the UNet, or with --lora_rank only its
    # adapter) are fp32 master weights.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    parts = load_components(args, weight_dtype)
    configure_unet(parts.unet, args)
    if args.lora_rank:
        add_training_adapter(parts.unet, args)
    trained = [p for p in parts.unet.parameters() if p.requires_grad]
    move_frozen_parts(parts, accelerator.device)
    held_out = (ValidationLoss.from_rows(held_out_rows, parts, args, accelerator.device, weight_dtype)
                if held_out_rows is not None and accelerator.is_main_process else None)

    if args.cache_latents:
        dataset.cache = build_latent_cache(dataset, parts.vae, parts.text_encoder, accelerator.device,
                                           args.train_batch_size, accelerator.is_local_main_process)
        logger.info("Cached latents and text embeddings: %.1f MiB", dataset.cache.nbytes() / 2**20)
        move_frozen_parts(parts, "cpu")  # they only come back for validation
    dataloader = make_dataloader(dataset, args)

    batches_per_epoch = math.ceil(len(dataloader) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)

    ema = make_ema(args, parts.unet, trained, accelerator.device)
    optimizer = make_optimizer(args, trained, accelerator.num_processes)
    lr_scheduler = make_lr_scheduler(args, optimizer, args.max_train_steps, accelerator.num_processes)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(parts.unet, optimizer, dataloader, lr_scheduler)
    register_checkpoint_hooks(accelerator, ema)  # must run before load_state

    if accelerator.is_main_process:
        save_resolved_config(args, args.output_dir)
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))
    progress = Progress()
    resume_path = resolve_resume_path(args.resume_from_checkpoint, args.output_dir)
    if resume_path is not None:
        progress = load_checkpoint(accelerator, resume_path)
        if ema is not None and not args.offload_ema:
            ema.to(accelerator.device)  # the checkpoint's EMA is loaded onto the CPU
    if held_out is not None:
        held_out.continue_from(progress.global_step)

    trainable = sum(p.numel() for p in trained)
    logger.info("Training %s UNet parameters on %d rows for %d optimizer steps (%d epochs), %d process(es).",
                f"{trainable:,}", len(dataset), args.max_train_steps, num_epochs, accelerator.num_processes)
    progress_bar = tqdm(total=args.max_train_steps, initial=progress.global_step, desc="steps",
                        disable=not accelerator.is_local_main_process)
    last_grid, validated_at, window_start, window_steps = None, -1, time.perf_counter(), 0
    accumulated_loss = 0.0

    for epoch in range(progress.epoch, num_epochs):
        dataloader.set_epoch(epoch)
        skip = progress.batches_in_epoch if epoch == progress.epoch else 0
        batches = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        for batch_index, batch in enumerate(batches, start=skip):
            with accelerator.accumulate(unet):
                generator = step_generator(args.seed, accelerator.process_index, epoch, batch_index)
                loss = diffusion_loss(batch, unet, parts, args, generator, weight_dtype)
                # CPU-GPU sync point: the logged loss, averaged over processes
                accumulated_loss += accelerator.gather(loss.detach()).mean().item() / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trained, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue

            update_ema(ema, trained, args)
            progress = next_position(progress, epoch, batch_index, len(dataloader))
            learning_rate = lr_scheduler.get_last_lr()[0]
            accelerator.log({"train_loss": accumulated_loss, "lr": learning_rate}, step=progress.global_step)
            if held_out is not None:
                held_out.record_train(progress.global_step, accumulated_loss)
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{accumulated_loss:.4f}", lr=f"{learning_rate:.2e}")
            window_steps += 1
            if progress.global_step % LOG_EVERY_STEPS == 0:
                elapsed = time.perf_counter() - window_start
                logger.info("(step=%07d) Train Loss: %.4f, LR: %.3g, Train Steps/Sec: %.2f", progress.global_step,
                            accumulated_loss, learning_rate, window_steps / elapsed)
                window_start, window_steps = time.perf_counter(), 0
            accumulated_loss = 0.0

            # validate before the checkpoint of the same step: a run killed between the two then validates that
            # step again when resumed, and the loss curve misses no point
            if validation_due(args, progress, epoch):
                last_grid, validated_at = validate(accelerator, parts, unet, ema, trained, args, progress.global_step,
                                                   held_out)
            if progress.global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, progress)
            if progress.global_step >= args.max_train_steps:
                break
        if progress.global_step >= args.max_train_steps:
            break
    progress_bar.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_unet = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(trained)
        if args.lora_rank:
            save_adapter(args, final_unet)
        else:
            save_pipeline(args, final_unet)
        if args.validation_prompts and validated_at != progress.global_step:
            last_grid = render_with(accelerator, parts, final_unet, args, progress.global_step)
        if held_out is not None and validated_at != progress.global_step:
            held_out.evaluate(accelerator, final_unet, progress.global_step)
        save_resolved_config(args, args.output_dir)
        write_model_card(args, trainable, last_grid, held_out.history if held_out is not None else None)
        if args.push_to_hub:
            push_to_hub(args)
    accelerator.end_training()
    return Path(args.output_dir)


def make_accelerator(args) -> Accelerator:
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / args.logging_dir))
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                       mixed_precision=args.mixed_precision,
                       log_with=None if args.report_to == "none" else args.report_to,
                       project_config=project)


def configure_unet(unet, args) -> None:
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        use_xformers(unet)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.compile:  # lazy: it traces at the first step, so a LoRA adapter added after this is compiled too
        compile_unet_for_training(unet)


def make_dataset(args, tokenizer):
    """Load the rows, drop the unusable ones, log the data check's report and wrap them for training; with a
    validation loss, also the held-out rows (split_validation_rows), else None."""
    rows = load_rows(args)
    screened = screen_rows(rows, args.image_column, args.caption_column)
    report = build_report(rows, screened, args, tokenizer)
    for line in report.lines(args.resolution):
        logger.info(line)
    usable = rows.select(screened.usable)
    training, held_out_rows = split_validation_rows(args, usable)
    buckets = None if report.buckets is None else [report.buckets[position] for position in training]
    return CaptionedImages(usable.select(training), args, tokenizer, buckets=buckets), held_out_rows


def make_dataloader(dataset: CaptionedImages, args) -> torch.utils.data.DataLoader:
    """Batches in an order fixed by (seed, epoch): of any rows, or with --enable_bucket of one bucket's rows each."""
    rows = EpochShuffleSampler(len(dataset), args.seed)
    if dataset.buckets is None:
        order = {"batch_size": args.train_batch_size, "sampler": rows}
    else:
        order = {"batch_sampler": BucketBatchSampler(rows, dataset.buckets, args.train_batch_size, args.seed)}
    return torch.utils.data.DataLoader(dataset, num_workers=args.dataloader_num_workers, **order)


def move_frozen_parts(parts, device) -> None:
    parts.vae.to(device)
    parts.text_encoder.to(device)


def make_ema(args, unet, parameters, device) -> EMAModel | None:
    """The moving average of the trained weights, on the device or (--offload_ema) in CPU memory. The full UNet's
    saves as a diffusers model (checkpoint-N/unet_ema); an adapter's as its tensors (checkpoints.py)."""
    if not args.use_ema:
        return None
    model = {} if args.lora_rank else {"model_cls": UNet2DConditionModel, "model_config": unet.config}
    ema = EMAModel(parameters, decay=args.ema_decay, **model)
    if not args.offload_ema:
        ema.to(device)
    return ema


def update_ema(ema, parameters, args) -> None:
    if ema is None:
        return
    if args.offload_ema:
        update_offloaded_ema(ema, parameters)
    else:
        ema.step(parameters)


def next_position(progress: Progress, epoch: int, batch_index: int, batches_in_epoch: int) -> Progress:
    """The data position after an optimizer step that ended on `batch_index`."""
    if batch_index + 1 >= batches_in_epoch:
        return Progress(progress.global_step + 1, epoch + 1, 0)
    return Progress(progress.global_step + 1, epoch, batch_index + 1)


def validation_due(args, progress: Progress, epoch: int) -> bool:
    """After the optimizer step that brought training to `progress`: every --validation_steps steps, and at the end
    of every --validation_epochs-th epoch (`progress` then starts the next one)."""
    if args.validation_steps and progress.global_step % args.validation_steps == 0:
        return True
    ended_epoch = progress.epoch == epoch + 1 and progress.batches_in_epoch == 0
    return ended_epoch and (epoch + 1) % args.validation_epochs == 0


def validate(accelerator, parts, unet, ema, trained, args, global_step, held_out=None):
    """Render the validation prompts and compute the validation loss (`held_out`, a ValidationLoss) on the main
    process, with the EMA of the `trained` weights when there is one."""
    grid = None
    if (args.validation_prompts or held_out is not None) and accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.store(trained)
            ema.copy_to(trained)
        if args.validation_prompts:
            grid = render_with(accelerator, parts, model, args, global_step)
        if held_out is not None:
            held_out.evaluate(accelerator, model, global_step)
        if ema is not None:
            ema.restore(trained)
    accelerator.wait_for_everyone()
    return grid, global_step


def render_with(accelerator, parts, model, args, global_step) -> Path:
    """One validation grid from `model`, saved and sent to the trackers (main process only)."""
    move_frozen_parts(parts, accelerator.device)
    with accelerator.autocast():
        grid = render_validation(validation_pipeline(parts, model, accelerator.device), args, global_step)
    if args.cache_latents:
        move_frozen_parts(parts, "cpu")
    log_grid_to_trackers(accelerator, grid, global_step)
    return grid


def tracker_config(args) -> dict:
    """Hyperparameters for the tracker; TensorBoard accepts scalars and strings only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()
            if k != "hub_token"}
