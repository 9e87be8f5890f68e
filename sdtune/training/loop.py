"""Fine-tune a Stable Diffusion UNet with accelerate, in three parts that `main(args)` calls top to bottom:
`set_up` (data check, models, optimizer, accelerator.prepare, resume), `train_step` (one optimizer step) and
`export` (the final weights, model card and hub upload). The benchmarks in bench/ time these same parts."""

import argparse
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
from sdtune.data.splits import load_validation_folder, split_validation_rows
from sdtune.logs import setup_logging
from sdtune.seeds import step_generator
from sdtune.training.checkpoints import (
    Progress,
    load_checkpoint,
    register_checkpoint_hooks,
    resolve_resume_path,
    save_checkpoint,
)
from sdtune.training.components import Components, compile_unet_for_training, load_components, use_xformers
from sdtune.training.config import save_resolved_config, settings_from
from sdtune.training.export import check_hub_reachable, push_to_hub, save_pipeline, write_model_card
from sdtune.training.latent_cache import build_latent_cache
from sdtune.training.lora import add_training_adapter, save_adapter
from sdtune.training.objective import diffusion_loss
from sdtune.training.on_demand import OnDemand
from sdtune.training.optim import OptimizerSettings, make_lr_scheduler, make_optimizer, update_offloaded_ema
from sdtune.training.stopping import StopRequest, clear_stopped, mark_stopped
from sdtune.training.subject import draw_class_images, make_subject_dataset, make_text_encoder_trainable
from sdtune.training.validation_images import (
    GridSettings,
    log_grid_to_trackers,
    render_validation,
    validation_pipeline,
)
from sdtune.training.validation_loss import ValidationLoss

logger = logging.getLogger("sdtune.training.loop")

LOG_EVERY_STEPS = 50  # a line in train.log this often; the tracker gets every step


def main(args) -> Path:
    accelerator = make_accelerator(args)
    start_logging(accelerator, args.output_dir)
    check_hub_reachable(args)
    run = set_up(args, accelerator)
    log = StepLog(accelerator, run.held_out, args.max_train_steps, run.progress.global_step)
    batches = micro_batches(run)
    # SIGTERM (the app's Stop): a checkpoint at the end of the current step, then exit 0. Kept through the export:
    # a run that has finished training completes its weights rather than leave them half-written.
    stop = StopRequest()
    try:
        stopping = train_loop(run, batches, log, stop, OnDemand(args.output_dir))
        batches.close()
        log.close()
        if stopping:
            if accelerator.is_main_process:
                mark_stopped(args.output_dir, run.progress.global_step)
            logger.info("Stopped (SIGTERM) at step %d, checkpoint saved: --resume_from_checkpoint latest continues.",
                        run.progress.global_step)
        else:
            export(run)
    finally:
        stop.restore()
    accelerator.end_training()
    return Path(args.output_dir)


def train_loop(run: "Run", batches: Iterator, log: "StepLog", stop: StopRequest, on_demand: OnDemand) -> bool:
    """Optimizer steps to --max_train_steps, validating and saving checkpoints on schedule and when asked (Save now,
    Sample now); True if a stop was requested (SIGTERM), after saving a checkpoint at the step it ended."""
    args = run.args
    while run.progress.global_step < args.max_train_steps and train_step(run, batches, log):
        asked = on_demand.due(run.accelerator)
        if "sample" in asked and not args.validation_prompts and run.held_out is None:
            logger.warning("Sample now: this run has no --validation_prompts and no validation loss to render.")
        # validate before the checkpoint of the same step: a run killed between the two then validates that step
        # again when resumed, and the loss curve misses no point
        if validation_due(run.progress, args.validation_steps, args.validation_epochs) or "sample" in asked:
            validate(run)
        stopping = stop.due(run.accelerator)
        if run.progress.global_step % args.checkpointing_steps == 0 or stopping or "save" in asked:
            save_checkpoint(run.accelerator, args, run.progress)
        on_demand.done(run.accelerator, asked)
        if stopping:
            return True
    return False


@dataclass(frozen=True)
class StepSettings:
    """The flags an optimizer step reads (config.py has each one's help); config.settings_from(StepSettings, args)."""

    seed: int
    max_grad_norm: float
    noise_offset: float
    snr_gamma: float | None
    offload_ema: bool
    with_prior_preservation: bool  # the batch's second half is class examples
    prior_loss_weight: float


@dataclass
class Run:
    """What the training loop works with: built by set_up, advanced by train_step, saved by export."""

    args: argparse.Namespace
    accelerator: Accelerator
    step: StepSettings
    parts: Components  # the frozen parts run in weight_dtype; parts.unet is the UNet before accelerator.prepare
    weight_dtype: torch.dtype
    unet: torch.nn.Module  # after accelerator.prepare
    text_encoder: torch.nn.Module | None  # with --train_text_encoder, after accelerator.prepare; else None (frozen)
    trained: list  # the parameters the optimizer updates: the UNet's (or with --lora_rank its adapter's), then the
    # text encoder's with --train_text_encoder
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: torch.utils.data.DataLoader
    ema: EMAModel | None
    held_out: ValidationLoss | None  # the validation loss, on the main process only
    num_epochs: int
    progress: Progress  # optimizer steps done and the next batch to draw
    last_grid: Path | None = None  # the last validation grid, for the model card
    validated_at: int = -1  # the step of the last validation


def set_up(args, accelerator: Accelerator) -> Run:
    """Everything before the first step, in the order it must happen; resumes from a checkpoint if asked to."""
    set_seed(args.seed)
    tokenizer = load_tokenizer(args)
    # the data check: a bad dataset stops before any model loads (subject folders: already at the flag check)
    subject = args.instance_data_dir is not None
    dataset, held_out_rows = (make_dataset(args, tokenizer) if not subject else
                              (None, load_validation_folder(args) if args.validation_data_dir else None))
    # The frozen parts run in the mixed-precision dtype; the trained weights (the UNet, or with --lora_rank only its
    # adapter) are fp32 master weights.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    parts = load_components(args, weight_dtype)
    configure_unet(parts.unet, gradient_checkpointing=args.gradient_checkpointing, allow_tf32=args.allow_tf32,
                   xformers=args.enable_xformers_memory_efficient_attention, compile=args.compile)
    move_frozen_parts(parts, accelerator.device)
    if args.with_prior_preservation:  # drawn by the base model: before any adapter is added
        draw_class_images(args, parts, accelerator)
    if subject:
        dataset = make_subject_dataset(args, tokenizer)
    if args.lora_rank:
        add_training_adapter(parts.unet, args)
    trained = [p for p in parts.unet.parameters() if p.requires_grad]
    if args.train_text_encoder:
        trained += make_text_encoder_trainable(parts.text_encoder, args)
    held_out = (ValidationLoss.from_rows(held_out_rows, parts, args, accelerator.device, weight_dtype)
                if held_out_rows is not None and accelerator.is_main_process else None)
    if args.cache_latents:
        cache_latents(dataset, parts, accelerator, args.train_batch_size)
        move_frozen_parts(parts, "cpu")  # they only come back for validation
    dataloader = make_dataloader(dataset, seed=args.seed, batch_size=args.train_batch_size,
                                 num_workers=args.dataloader_num_workers)
    args.max_train_steps, num_epochs = plan_steps(len(dataloader), accelerator.num_processes,
                                                  gradient_accumulation_steps=args.gradient_accumulation_steps,
                                                  max_train_steps=args.max_train_steps,
                                                  num_train_epochs=args.num_train_epochs)

    ema = make_ema(parts.unet, trained, accelerator.device, use_ema=args.use_ema, decay=args.ema_decay,
                   adapter=bool(args.lora_rank), offload=args.offload_ema)
    optimizer = make_optimizer(trained, settings_from(OptimizerSettings, args), accelerator.num_processes)
    lr_scheduler = make_lr_scheduler(optimizer, args.lr_scheduler, warmup_steps=args.lr_warmup_steps,
                                     max_train_steps=args.max_train_steps, num_processes=accelerator.num_processes)
    text_encoder = None
    if args.train_text_encoder:
        unet, text_encoder, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            parts.unet, parts.text_encoder, optimizer, dataloader, lr_scheduler)
    else:
        unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(parts.unet, optimizer, dataloader,
                                                                        lr_scheduler)
    register_checkpoint_hooks(accelerator, ema)  # must run before load_state
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        save_resolved_config(args, args.output_dir)
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))
    run = Run(args, accelerator, settings_from(StepSettings, args), parts, weight_dtype, unet, text_encoder, trained,
              optimizer, lr_scheduler, dataloader, ema, held_out, num_epochs, Progress())
    resume(run, args.resume_from_checkpoint, args.output_dir)
    logger.info("Training %s UNet parameters on %d rows for %d optimizer steps (%d epochs), %d process(es).",
                f"{trainable_count(run):,}", len(dataset), args.max_train_steps, num_epochs,
                accelerator.num_processes)
    return run


def train_step(run: Run, batches: Iterator, log: "StepLog") -> bool:
    """One optimizer step: --gradient_accumulation_steps micro-batches from `batches` (micro_batches(run)), fewer
    where an epoch ends (accelerate then steps early); False if `batches` ran out first."""
    accelerator, settings = run.accelerator, run.step
    step_loss, micro_steps = torch.zeros((), device=accelerator.device), 0
    models = [run.unet] + ([run.text_encoder] if run.text_encoder is not None else [])
    prior_loss_weight = settings.prior_loss_weight if settings.with_prior_preservation else None
    for epoch, batch_index, batch in batches:
        with accelerator.accumulate(*models):
            generator = step_generator(settings.seed, accelerator.process_index, epoch, batch_index)
            loss = diffusion_loss(batch, run.unet, run.parts, generator, run.weight_dtype,
                                  noise_offset=settings.noise_offset, snr_gamma=settings.snr_gamma,
                                  prior_loss_weight=prior_loss_weight, text_encoder=run.text_encoder)
            step_loss += loss.detach()
            micro_steps += 1
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(run.trained, settings.max_grad_norm)
            # accelerate's wrappers skip these until the step's last micro-batch
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            update_ema(run.ema, run.trained, offloaded=settings.offload_ema)
            run.progress = next_position(run.progress, epoch, batch_index, len(run.dataloader))
            # CPU-GPU sync point, once a step: the step's mean loss, averaged over processes
            mean_loss = accelerator.gather(step_loss).mean().item() / micro_steps
            log.record(run.progress.global_step, mean_loss, run.lr_scheduler.get_last_lr()[0])
            return True
    return False


def export(run: Run) -> None:
    """On the main process: the final weights (the EMA's, with --use_ema) as a pipeline or a LoRA file, a last
    validation if the final step had none, the resolved config, the model card, and the hub upload if asked."""
    accelerator, args, step = run.accelerator, run.args, run.progress.global_step
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    final_unet = accelerator.unwrap_model(run.unet)
    final_text_encoder = accelerator.unwrap_model(run.text_encoder) if run.text_encoder is not None else None
    if run.ema is not None:
        run.ema.copy_to(run.trained)
    if args.lora_rank:
        save_adapter(args, final_unet, final_text_encoder)
    else:
        save_pipeline(args, final_unet, final_text_encoder)
    if args.validation_prompts and run.validated_at != step:
        run.last_grid = render_with(run, final_unet, step)
    if run.held_out is not None and run.validated_at != step:
        run.held_out.evaluate(accelerator, final_unet, step)
    save_resolved_config(args, args.output_dir)
    write_model_card(args, trainable_count(run), run.last_grid,
                     run.held_out.history if run.held_out is not None else None)
    if args.push_to_hub:
        push_to_hub(args)


def make_accelerator(args) -> Accelerator:
    logging_dir = str(Path(args.output_dir) / args.logging_dir)
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir)
    return Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                       mixed_precision=args.mixed_precision,
                       log_with=None if args.report_to == "none" else args.report_to,
                       project_config=project)


def start_logging(accelerator: Accelerator, output_dir) -> None:
    """Every process logs its warnings; only the main one its progress, and to train.log."""
    main_process = accelerator.is_main_process
    if main_process:
        clear_stopped(output_dir)
        OnDemand(output_dir).clear()
    setup_logging(logging.INFO if main_process else logging.WARNING,
                  Path(output_dir) / "train.log" if main_process else None)


def configure_unet(unet, *, gradient_checkpointing=False, allow_tf32=False, xformers=False, compile=False) -> None:
    """--gradient_checkpointing, --allow_tf32, --enable_xformers_memory_efficient_attention and --compile."""
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if xformers:
        use_xformers(unet)
    if allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if compile:  # lazy: it traces at the first step, so a LoRA adapter added after this is compiled too
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


def cache_latents(dataset, parts, accelerator, batch_size: int) -> None:
    """--cache_latents: the dataset's images and captions encoded once; a subject dataset's instance and class images
    each in their own cache."""
    image_sets = dataset.image_sets() if hasattr(dataset, "image_sets") else [dataset]
    for image_set in image_sets:
        image_set.cache = build_latent_cache(image_set, parts.vae, parts.text_encoder, accelerator.device, batch_size,
                                             accelerator.is_local_main_process)
    logger.info("Cached latents and text embeddings: %.1f MiB",
                sum(image_set.cache.nbytes() for image_set in image_sets) / 2**20)


def make_dataloader(dataset: CaptionedImages, *, seed: int, batch_size: int,
                    num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches in an order fixed by (seed, epoch): of any rows, or with --enable_bucket of one bucket's rows each. A
    subject dataset's batches are put together by its own `collate` (instance half, then class half)."""
    rows = EpochShuffleSampler(len(dataset), seed)
    if dataset.buckets is None:
        order = {"batch_size": batch_size, "sampler": rows}
    else:
        order = {"batch_sampler": BucketBatchSampler(rows, dataset.buckets, batch_size, seed)}
    return torch.utils.data.DataLoader(dataset, num_workers=num_workers, collate_fn=getattr(dataset, "collate", None),
                                       **order)


def plan_steps(batches: int, num_processes: int, *, gradient_accumulation_steps: int, max_train_steps: int | None,
               num_train_epochs: int) -> tuple[int, int]:
    """(optimizer steps, epochs) for `batches` micro-batches an epoch, split between the processes: --max_train_steps
    where given, else --num_train_epochs' worth of steps."""
    steps_per_epoch = math.ceil(math.ceil(batches / num_processes) / gradient_accumulation_steps)
    if max_train_steps is None:
        max_train_steps = num_train_epochs * steps_per_epoch
    return max_train_steps, math.ceil(max_train_steps / steps_per_epoch)


def move_frozen_parts(parts, device) -> None:
    parts.vae.to(device)
    parts.text_encoder.to(device)


def make_ema(unet, parameters, device, *, use_ema: bool, decay: float, adapter: bool,
             offload: bool) -> EMAModel | None:
    """The moving average of the trained weights, on the device or (--offload_ema) in CPU memory. The full UNet's
    saves as a diffusers model (checkpoint-N/unet_ema); an adapter's as its tensors (checkpoints.py)."""
    if not use_ema:
        return None
    model = {} if adapter else {"model_cls": UNet2DConditionModel, "model_config": unet.config}
    ema = EMAModel(parameters, decay=decay, **model)
    if not offload:
        ema.to(device)
    return ema


def update_ema(ema: EMAModel | None, parameters, *, offloaded: bool) -> None:
    if ema is None:
        return
    if offloaded:
        update_offloaded_ema(ema, parameters)
    else:
        ema.step(parameters)


def resume(run: Run, resume_from_checkpoint, output_dir) -> None:
    """Restore the states and data position of --resume_from_checkpoint, if it names one."""
    path = resolve_resume_path(resume_from_checkpoint, output_dir)
    if path is not None:
        run.progress = load_checkpoint(run.accelerator, path)
        if run.ema is not None and not run.step.offload_ema:
            run.ema.to(run.accelerator.device)  # the checkpoint's EMA is loaded onto the CPU
    if run.held_out is not None:
        run.held_out.continue_from(run.progress.global_step)


def micro_batches(run: Run) -> Iterator[tuple[int, int, dict]]:
    """(epoch, batch index, batch) from the run's data position on, to the end of its last epoch."""
    start = run.progress
    for epoch in range(start.epoch, run.num_epochs):
        run.dataloader.set_epoch(epoch)
        skip = start.batches_in_epoch if epoch == start.epoch else 0
        batches = run.accelerator.skip_first_batches(run.dataloader, skip) if skip else run.dataloader
        for batch_index, batch in enumerate(batches, start=skip):
            yield epoch, batch_index, batch


def next_position(progress: Progress, epoch: int, batch_index: int, batches_in_epoch: int) -> Progress:
    """The data position after an optimizer step that ended on `batch_index`."""
    if batch_index + 1 >= batches_in_epoch:
        return Progress(progress.global_step + 1, epoch + 1, 0)
    return Progress(progress.global_step + 1, epoch, batch_index + 1)


class StepLog:
    """Each optimizer step's loss and learning rate: to the trackers and the loss history every step, on the
    progress bar, and in train.log every LOG_EVERY_STEPS steps with the steps/s since the last such line."""

    def __init__(self, accelerator: Accelerator, held_out: ValidationLoss | None, total_steps: int, first_step: int,
                 show_bar: bool = True):
        self.accelerator, self.held_out = accelerator, held_out
        self.bar = tqdm(total=total_steps, initial=first_step, desc="steps",
                        disable=not (show_bar and accelerator.is_local_main_process))
        self.window_start, self.window_steps = time.perf_counter(), 0

    def record(self, global_step: int, loss: float, learning_rate: float) -> None:
        self.accelerator.log({"train_loss": loss, "lr": learning_rate}, step=global_step)
        if self.held_out is not None:
            self.held_out.record_train(global_step, loss)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}")
        self.window_steps += 1
        if global_step % LOG_EVERY_STEPS == 0:
            elapsed = time.perf_counter() - self.window_start
            logger.info("(step=%07d) Train Loss: %.4f, LR: %.3g, Train Steps/Sec: %.2f", global_step, loss,
                        learning_rate, self.window_steps / elapsed)
            self.window_start, self.window_steps = time.perf_counter(), 0

    def close(self) -> None:
        self.bar.close()


def validation_due(progress: Progress, every_steps: int | None, every_epochs: int) -> bool:
    """After the optimizer step that brought training to `progress`: every --validation_steps steps, and at the end
    of every --validation_epochs-th epoch (`progress` then stands at the start of the next one)."""
    if every_steps and progress.global_step % every_steps == 0:
        return True
    ended_epoch = progress.batches_in_epoch == 0
    return ended_epoch and progress.epoch % every_epochs == 0


def validate(run: Run) -> None:
    """Render the validation prompts and compute the validation loss on the main process, with the EMA of the
    trained weights when there is one; records the grid and the step in `run`."""
    accelerator, ema, step = run.accelerator, run.ema, run.progress.global_step
    if (run.args.validation_prompts or run.held_out is not None) and accelerator.is_main_process:
        model = accelerator.unwrap_model(run.unet)
        if ema is not None:
            ema.store(run.trained)
            ema.copy_to(run.trained)
        if run.args.validation_prompts:
            run.last_grid = render_with(run, model, step)
        if run.held_out is not None:
            run.held_out.evaluate(accelerator, model, step)
        if ema is not None:
            ema.restore(run.trained)
    accelerator.wait_for_everyone()
    run.validated_at = step


def render_with(run: Run, model, global_step: int) -> Path:
    """One validation grid from `model`, saved and sent to the trackers (main process only)."""
    accelerator = run.accelerator
    move_frozen_parts(run.parts, accelerator.device)
    with accelerator.autocast():
        pipeline = validation_pipeline(run.parts, model, accelerator.device)
        grid = render_validation(pipeline, settings_from(GridSettings, run.args), global_step)
    if run.args.cache_latents:
        move_frozen_parts(run.parts, "cpu")
    log_grid_to_trackers(accelerator, grid, global_step)
    return grid


def trainable_count(run: Run) -> int:
    return sum(p.numel() for p in run.trained)


def tracker_config(args) -> dict:
    """Hyperparameters for the tracker; TensorBoard accepts scalars and strings only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()
            if k != "hub_token"}
