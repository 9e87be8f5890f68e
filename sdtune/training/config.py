"""Command-line flags of the training script, YAML recipes, and the resolved configuration.

Flag names and meanings follow diffusers' examples/text_to_image/train_text_to_image.py so that
users coming from it find what they know. Precedence: built-in defaults < `--config FILE.yaml` < flags.
"""

import argparse
import importlib.util
import math
import os
import random
from dataclasses import fields
from pathlib import Path

import yaml

from sdtune.errors import SdtuneError
from sdtune.limits import MAX_SIDE, check_seed

RESOLVED_CONFIG_NAME = "training_config.yaml"
# --optimizer: the package each needs (None: torch's own) and the learning rate it defaults to
OPTIMIZERS = {"adamw": (None, 1e-4), "adamw8bit": ("bitsandbytes", 1e-4), "prodigy": ("prodigyopt", 1.0)}
PRODIGY_MIN_LEARNING_RATE = 0.1  # below it Prodigy barely moves: its learning rate multiplies an estimated step


def build_parser() -> argparse.ArgumentParser:
    """The training script's flags, grouped as in the README."""
    parser = argparse.ArgumentParser(
        description="Fine-tune a Stable Diffusion UNet on an image-caption dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=str, default=None,
                        help="YAML recipe (see configs/); its keys are flag names, flags given here override it.")
    _add_model_flags(parser.add_argument_group("model"))
    _add_data_flags(parser.add_argument_group("data"))
    _add_subject_flags(parser.add_argument_group("subject training (DreamBooth; diffusers' train_dreambooth.py flags)"))
    _add_optimisation_flags(parser.add_argument_group("optimisation"))
    _add_lora_flags(parser.add_argument_group("LoRA (instead of the full UNet fine-tune)"))
    _add_memory_flags(parser.add_argument_group("memory and speed"))
    _add_diffusion_flags(parser.add_argument_group("diffusion objective"))
    _add_validation_flags(parser.add_argument_group("validation"))
    _add_output_flags(parser.add_argument_group("outputs, checkpoints and logging"))
    _add_caption_and_check_flags(parser.add_argument_group("captions and the data check"))
    _add_bucket_flags(parser.add_argument_group("aspect-ratio buckets (kohya sd-scripts' flags)"))
    return parser


def _add_model_flags(group):
    group.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="Hub id or local folder of the Stable Diffusion pipeline to fine-tune (required).")
    group.add_argument("--revision", type=str, default=None, help="Hub revision (branch, tag or commit) of the model.")
    group.add_argument("--variant", type=str, default=None, help="Weights variant to load, e.g. fp16.")
    group.add_argument("--cache_dir", type=str, default=None, help="Where hub models and datasets are cached.")


def _add_data_flags(group):
    group.add_argument("--dataset_name", type=str, default=None,
                       help="Hub dataset name, or a local folder in datasets' imagefolder layout.")
    group.add_argument("--dataset_config_name", type=str, default=None, help="Configuration of the hub dataset.")
    group.add_argument("--train_data_dir", type=str, default=None,
                       help="Local imagefolder: images plus metadata.jsonl or metadata.csv with the caption column.")
    group.add_argument("--image_column", type=str, default="image", help="Dataset column holding the image.")
    group.add_argument("--caption_column", type=str, default="text",
                       help="Dataset column holding the caption (a string, or a list to pick from at random).")
    group.add_argument("--max_train_samples", type=int, default=None,
                       help="Keep only the first N rows (for debugging or quick runs).")
    group.add_argument("--resolution", type=int, default=512, help="Training images are resized and cropped to this.")
    group.add_argument("--center_crop", action="store_true", help="Crop the center; without it the crop is random.")
    group.add_argument("--random_flip", action="store_true", help="Flip images horizontally with probability 0.5.")
    group.add_argument("--dataloader_num_workers", type=int, default=0,
                       help="Data loading processes; 0 loads in the main process.")
    group.add_argument("--cache_latents", action="store_true",
                       help="Encode every image (and its mirror with --random_flip) and caption once before "
                            "training; the VAE and text encoder then leave the device. Needs --center_crop.")


def _add_subject_flags(group):
    group.add_argument("--instance_data_dir", type=str, default=None,
                       help="A folder of pictures of your subject (3 to 30); each is trained with --instance_prompt. "
                            "Instead of --train_data_dir or --dataset_name.")
    group.add_argument("--instance_prompt", type=str, default=None,
                       help="The prompt of every instance image, with a rare token for the subject, e.g. "
                            "'a photo of sks dog'.")
    group.add_argument("--class_data_dir", type=str, default=None,
                       help="Class images for --with_prior_preservation: pictures of the subject's kind. Missing "
                            "ones (up to --num_class_images) are drawn by the base model from --class_prompt and "
                            "saved here as class-00000.png...")
    group.add_argument("--class_prompt", type=str, default=None,
                       help="The prompt of the class images, e.g. 'a photo of a dog'.")
    group.add_argument("--with_prior_preservation", action="store_true",
                       help="Add the prior-preservation loss: every batch also holds as many class images, so the "
                            "class does not drift to the subject.")
    group.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    group.add_argument("--num_class_images", type=int, default=100,
                       help="Class images used; those --class_data_dir lacks are generated first.")
    group.add_argument("--sample_batch_size", type=int, default=4,
                       help="Images per batch when generating class images.")
    group.add_argument("--train_text_encoder", action="store_true",
                       help="Train the text encoder too (with --lora_rank: a LoRA adapter on its attention).")


def _add_optimisation_flags(group):
    group.add_argument("--train_batch_size", type=int, default=16, help="Batch size per device.")
    group.add_argument("--num_train_epochs", type=int, default=100)
    group.add_argument("--max_train_steps", type=int, default=None,
                       help="Total optimizer steps; overrides --num_train_epochs when set.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="Micro-batches accumulated before each optimizer step.")
    group.add_argument("--learning_rate", type=float, default=None,
                       help="Learning rate after warmup; default 1e-4, and 1.0 with --optimizer prodigy (its "
                            "convention: Prodigy estimates the step size, this scales it).")
    group.add_argument("--scale_lr", action="store_true",
                       help="Multiply the learning rate by batch size x accumulation x number of processes.")
    group.add_argument("--lr_scheduler", type=str, default="constant",
                       choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                "constant_with_warmup"])
    group.add_argument("--lr_warmup_steps", type=int, default=500, help="Optimizer steps of warmup.")
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=1e-2)
    group.add_argument("--adam_epsilon", type=float, default=1e-08)
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    group.add_argument("--optimizer", type=str.lower, default=None, choices=list(OPTIMIZERS),
                       help="adamw (torch), adamw8bit (bitsandbytes: optimizer states in 8 bits) or prodigy "
                            "(prodigyopt: learning-rate free, use --learning_rate 1.0). Default: adamw, or adamw8bit "
                            "with --use_8bit_adam.")
    group.add_argument("--use_8bit_adam", action="store_true",
                       help="bitsandbytes' AdamW8bit (needs bitsandbytes): the same as --optimizer adamw8bit.")
    group.add_argument("--use_ema", action="store_true", help="Keep an exponential moving average of the UNet.")
    group.add_argument("--ema_decay", type=float, default=0.9999, help="Upper bound of the EMA decay.")
    group.add_argument("--offload_ema", action="store_true", help="Keep the EMA weights in CPU memory.")
    group.add_argument("--seed", type=int, default=None,
                       help="Seed of every random draw; drawn at random and recorded when not given.")


def _add_lora_flags(group):
    group.add_argument("--lora_rank", "--rank", dest="lora_rank", type=int, default=0,
                       help="Train a LoRA adapter of this rank on the frozen UNet; 0: fine-tune every UNet weight. "
                            "--rank is the name in diffusers' LoRA example.")
    group.add_argument("--lora_alpha", type=float, default=None,
                       help="LoRA scaling numerator (the update is scaled by alpha / rank); default: the rank.")
    group.add_argument("--lora_dropout", type=float, default=None, help="Dropout on the LoRA input; default: 0.")
    group.add_argument("--use_dora", action="store_true",
                       help="DoRA (weight-decomposed LoRA, Liu et al. 2024, through peft) instead of plain LoRA: a "
                            "trained magnitude per output channel beside the low-rank direction update.")
    group.add_argument("--lora_target_modules", type=str, nargs="+", default=None,
                       help="UNet module names that get an adapter; default: the attention projections "
                            "to_k to_q to_v to_out.0, as in diffusers' LoRA example.")


def _add_memory_flags(group):
    group.add_argument("--gradient_checkpointing", action="store_true",
                       help="Recompute UNet activations in the backward pass: less memory, ~30%% slower.")
    group.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                       help="Autocast precision; the trained UNet keeps fp32 master weights. "
                            "Default: accelerate's config.")
    group.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the UNet: the first steps pay the compile (and the first validation a "
                            "second one), later steps run faster. Needs a C compiler on the CPU.")
    group.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                       help="xformers attention instead of PyTorch's scaled-dot-product attention.")


def _add_diffusion_flags(group):
    group.add_argument("--snr_gamma", type=float, default=None,
                       help="Min-SNR loss weighting gamma (5.0 is the paper's choice); off when unset.")
    group.add_argument("--noise_offset", type=float, default=0.0, help="Scale of the per-channel noise offset.")
    group.add_argument("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction"],
                       help="Training target; default: the model scheduler's.")
    group.add_argument("--proportion_empty_prompts", type=float, default=0.0,
                       help="Share of captions replaced by '' so classifier-free guidance keeps working.")


def _add_validation_flags(group):
    group.add_argument("--validation_prompts", type=str, nargs="+", default=None,
                       help="Prompts rendered during training.")
    group.add_argument("--validation_prompt", dest="validation_prompts", type=str, nargs=1,
                       help="One validation prompt (the name diffusers' LoRA example uses).")
    group.add_argument("--num_validation_images", type=int, default=1,
                       help="Images per validation prompt, each from its own seed.")
    group.add_argument("--validation_epochs", type=int, default=5, help="Validate every N epochs.")
    group.add_argument("--validation_steps", type=int, default=None,
                       help="Validate every N optimizer steps (in addition to --validation_epochs).")
    group.add_argument("--validation_inference_steps", type=int, default=25, help="Denoising steps per image.")
    group.add_argument("--validation_guidance_scale", type=float, default=7.5, help="Classifier-free guidance.")
    group.add_argument("--validation_split", type=float, default=None,
                       help="Hold out this fraction of the training rows (drawn from --seed) for the validation "
                            "loss, computed at every validation.")
    group.add_argument("--validation_data_dir", type=str, default=None,
                       help="An imagefolder laid out like --train_data_dir whose rows give the validation loss "
                            "(instead of --validation_split).")


def _add_output_flags(group):
    group.add_argument("--output_dir", type=str, default="sd-model-finetuned",
                       help="Where the final pipeline, checkpoints, validation grids and logs go.")
    group.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, relative to --output_dir.")
    group.add_argument("--report_to", type=str, default="tensorboard",
                       choices=["tensorboard", "wandb", "comet_ml", "all", "none"])
    group.add_argument("--tracker_project_name", type=str, default="text2image-fine-tune")
    group.add_argument("--checkpointing_steps", type=int, default=500,
                       help="Save a resumable checkpoint every N optimizer steps.")
    group.add_argument("--checkpoints_total_limit", type=int, default=None,
                       help="Keep at most N checkpoints; the oldest are deleted.")
    group.add_argument("--resume_from_checkpoint", type=str, default=None,
                       help="A checkpoint folder, a checkpoint's name inside --output_dir (e.g. checkpoint-500), "
                            "or 'latest' for the newest there.")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the final pipeline to the hub.")
    group.add_argument("--hub_model_id", type=str, default=None, help="Hub repository; default: output_dir's name.")
    group.add_argument("--hub_token", type=str, default=None, help="Hub token; default: the logged-in user's.")


def _add_caption_and_check_flags(group):
    group.add_argument("--caption_dropout_rate", dest="proportion_empty_prompts", type=float,
                       default=argparse.SUPPRESS, metavar="RATE",
                       help="kohya sd-scripts' name for --proportion_empty_prompts: the same setting.")
    group.add_argument("--shuffle_caption", action="store_true",
                       help="For tag-style captions ('tag, tag, ...'): shuffle each example's comma-separated tags, "
                            "anew every epoch.")
    group.add_argument("--keep_tokens", type=int, default=0,
                       help="With --shuffle_caption: the first N tags stay in place (a trigger word, say).")
    group.add_argument("--check_data", action="store_true",
                       help="Read and screen the dataset, print the data report (usable and skipped rows, caption "
                            "lengths, image sizes, duplicates) and exit, loading the tokenizer only: status 0 when "
                            "some rows are usable.")


def _add_bucket_flags(group):
    group.add_argument("--enable_bucket", action="store_true",
                       help="Train each image at the bucket size nearest its aspect ratio (area at most "
                            "--resolution squared) instead of a centre or random square; a batch holds one bucket.")
    group.add_argument("--min_bucket_reso", type=int, default=None,
                       help="Shortest bucket side in pixels; default: --resolution / 2 (256 at 512).")
    group.add_argument("--max_bucket_reso", type=int, default=None,
                       help="Longest bucket side in pixels; default: --resolution x 2 (1024 at 512).")
    group.add_argument("--bucket_reso_steps", type=int, default=None,
                       help="Bucket sides are multiples of this (of 8, the VAE's factor); default: --resolution / 8 "
                            "(64 at 512, 8 at 64).")
    group.add_argument("--bucket_no_upscale", action="store_true",
                       help="An image smaller than its bucket gets a bucket of its own size (rounded down to the "
                            "step) instead of being enlarged.")


def _check_bucket_args(args: argparse.Namespace) -> None:
    """Fill the bucket sizes left unset from --resolution, then refuse sizes no bucket can have."""
    names = ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")
    given = [f"--{name}" for name in names if getattr(args, name) is not None]
    if not args.enable_bucket:
        given += ["--bucket_no_upscale"] if args.bucket_no_upscale else []
        if given:
            raise SdtuneError(f"{', '.join(given)}: bucket settings, but buckets are off: add --enable_bucket, or "
                              "drop them.")
        return
    from sdtune.data.buckets import (  # imports torch: only once buckets are asked for
        VAE_FACTOR,
        default_bucket_settings,
    )

    for name, default in zip(names, default_bucket_settings(args.resolution)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    low, high, step = args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps
    if step <= 0 or step % VAE_FACTOR:
        raise SdtuneError(f"--bucket_reso_steps {step} must be a positive multiple of {VAE_FACTOR} (the VAE's factor).")
    if low < step or low % step or high % step:
        raise SdtuneError(f"--min_bucket_reso {low} and --max_bucket_reso {high} must be multiples of "
                          f"--bucket_reso_steps {step}, at least one step.")
    if not low <= args.resolution <= high:
        raise SdtuneError(f"--resolution {args.resolution} must lie within --min_bucket_reso {low} and "
                          f"--max_bucket_reso {high}.")


def _check_caption_args(args: argparse.Namespace) -> None:
    if args.keep_tokens < 0:
        raise SdtuneError(f"--keep_tokens {args.keep_tokens} must be 0 or more.")
    if args.keep_tokens and not args.shuffle_caption:
        raise SdtuneError("--keep_tokens only applies with --shuffle_caption: add it, or drop --keep_tokens.")
    if args.shuffle_caption and args.cache_latents:
        raise SdtuneError("--shuffle_caption cannot be used with --cache_latents: the text embeddings are cached "
                          "once per caption, not per shuffle. Drop one of them.")


def parse_args(argv=None) -> argparse.Namespace:
    """Parse flags over the recipe given by --config, check them and fill the seed."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_recipe(known.config, parser))
    args = parser.parse_args(argv)
    check_args(args)
    if args.seed is None:
        # Recorded in the resolved config, so a resumed run draws the same numbers.
        args.seed = random.SystemRandom().randrange(2**31)
    check_seed(args.seed)
    return args


def load_recipe(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read a YAML recipe and refuse keys that are not flags (a typo must not be silently ignored)."""
    if not os.path.isfile(path):
        raise SdtuneError(f"--config {path}: no such file. Recipes live in configs/, e.g. configs/pokemon.yaml.")
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    flags = {action.dest for action in parser._actions}
    unknown = sorted(set(recipe) - flags)
    if unknown:
        raise SdtuneError(f"--config {path}: unknown keys {unknown}. Keys are flag names without the dashes.")
    return recipe


def check_args(args: argparse.Namespace) -> None:
    """Refuse combinations that cannot work, naming the fix."""
    if not args.pretrained_model_name_or_path:
        raise SdtuneError("--pretrained_model_name_or_path is required (a hub id or a local pipeline folder).")
    sources = [flag for flag in ("dataset_name", "train_data_dir", "instance_data_dir") if getattr(args, flag)]
    if not sources:
        raise SdtuneError("Give --dataset_name (hub or local imagefolder), --train_data_dir, or --instance_data_dir "
                          "with --instance_prompt for subject training.")
    # a recipe's --dataset_name yields to a folder given on the command line (train.sh starts from pokemon.yaml);
    # two folders given are a mistake
    if args.train_data_dir and args.instance_data_dir:
        raise SdtuneError("--train_data_dir and --instance_data_dir both give the training images: give one.")
    if args.cache_latents and not args.center_crop:
        raise SdtuneError("--cache_latents needs --center_crop: a random crop would be frozen at caching time, "
                          "which changes what the model is trained on.")
    if args.offload_ema and not args.use_ema:
        raise SdtuneError("--offload_ema only makes sense with --use_ema.")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise SdtuneError("--proportion_empty_prompts must be between 0 and 1.")
    if args.resolution % 8:
        raise SdtuneError(f"--resolution {args.resolution} must be a multiple of 8.")
    if args.validation_prompts:
        check_validation_args(args)
    _check_validation_loss_args(args)
    _check_lora_args(args)
    _check_optimizer_args(args)
    _check_subject_args(args)
    _check_caption_args(args)
    _check_bucket_args(args)


def check_validation_args(args: argparse.Namespace) -> None:
    """Validation's sampling settings, checked at start rather than at the first validation, steps into the run."""
    if args.validation_inference_steps < 1:
        raise SdtuneError("--validation_inference_steps must be at least 1.")
    if args.num_validation_images < 1:
        raise SdtuneError("--num_validation_images must be at least 1.")
    if not (math.isfinite(args.validation_guidance_scale) and args.validation_guidance_scale >= 0):
        raise SdtuneError(f"--validation_guidance_scale must be a finite number >= 0, not "
                          f"{args.validation_guidance_scale}.")
    if args.resolution > MAX_SIDE:
        raise SdtuneError(f"Validation renders at --resolution, at most {MAX_SIDE}: lower --resolution or leave out "
                          "--validation_prompts.")


def _check_validation_loss_args(args: argparse.Namespace) -> None:
    """The held-out rows' flags; the folder and that both sets keep a row are checked when the data is read
    (validation_loss.py), before any model loads."""
    if args.validation_split is not None and args.validation_data_dir is not None:
        raise SdtuneError("--validation_split and --validation_data_dir both choose the validation rows: give one.")
    if args.validation_split is not None and not 0.0 < args.validation_split < 1.0:
        raise SdtuneError(f"--validation_split {args.validation_split} must be a fraction between 0 and 1 "
                          "(0.1 holds out a tenth of the rows).")


def _check_lora_args(args: argparse.Namespace) -> None:
    if args.lora_rank < 0:
        raise SdtuneError(f"--lora_rank {args.lora_rank}: a LoRA rank is a positive number of dimensions "
                          "(4 to 128 is usual); 0 or no flag trains the full UNet.")
    lora_only = [flag for flag in ("lora_alpha", "lora_dropout", "lora_target_modules")
                 if getattr(args, flag) is not None] + (["use_dora"] if args.use_dora else [])
    if lora_only and not args.lora_rank:
        raise SdtuneError(f"--{', --'.join(lora_only)}: LoRA settings, but this is a full fine-tune: add "
                          "--lora_rank N (e.g. 4) for a LoRA run, or drop them.")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        # NaN passes a `<= 0` test and trains an adapter of NaN tensors; inf scales every update to NaN too
        raise SdtuneError(f"--lora_alpha {args.lora_alpha} must be a positive finite number (the rank is the usual "
                          "choice).")
    if args.lora_dropout is not None and not 0.0 <= args.lora_dropout < 1.0:
        raise SdtuneError(f"--lora_dropout {args.lora_dropout} must be in [0, 1).")


def _check_optimizer_args(args: argparse.Namespace) -> None:
    """Resolve --optimizer (and --use_8bit_adam, its older spelling) and its learning rate; refuse an optimizer whose
    package is missing here, before any model loads."""
    if args.use_8bit_adam and args.optimizer not in (None, "adamw8bit"):
        raise SdtuneError(f"--use_8bit_adam asks for adamw8bit but --optimizer is {args.optimizer}: drop one.")
    args.optimizer = args.optimizer or ("adamw8bit" if args.use_8bit_adam else "adamw")
    args.use_8bit_adam = args.optimizer == "adamw8bit"
    package, default_learning_rate = OPTIMIZERS[args.optimizer]
    if package is not None and importlib.util.find_spec(package) is None:
        raise SdtuneError(f"--optimizer {args.optimizer} needs the {package} package: pip install {package} "
                          "(or choose --optimizer adamw).")
    if args.learning_rate is None:
        args.learning_rate = default_learning_rate
    if args.optimizer == "prodigy" and args.learning_rate < PRODIGY_MIN_LEARNING_RATE:
        raise SdtuneError(f"--learning_rate {args.learning_rate} with --optimizer prodigy: Prodigy estimates the step "
                          "size itself and the learning rate scales it; use 1.0 (its convention) or leave it out.")


def _check_subject_args(args: argparse.Namespace) -> None:
    """DreamBooth's flags: the combinations first, then the folders (every image decoded once, no model loaded)."""
    if args.instance_data_dir is None:
        subject_only = [flag for flag in ("instance_prompt", "class_data_dir", "class_prompt") if getattr(args, flag)]
        subject_only += ["with_prior_preservation"] if args.with_prior_preservation else []
        if subject_only:
            raise SdtuneError(f"--{', --'.join(subject_only)}: subject-training settings without "
                              "--instance_data_dir: add it (the folder of your subject's pictures), or drop them.")
    elif args.check_data:
        raise SdtuneError("--check_data reports on --train_data_dir or --dataset_name; the subject folders are checked "
                          "(every image decoded) whenever the flags are parsed: run without --check_data.")
    elif not args.instance_prompt:
        raise SdtuneError("--instance_data_dir needs --instance_prompt, the prompt of every instance image with a "
                          "rare token for the subject, e.g. --instance_prompt 'a photo of sks dog'.")
    if args.train_text_encoder and args.use_ema:
        raise SdtuneError("--use_ema averages the UNet only, not a trained text encoder: drop --use_ema or "
                          "--train_text_encoder (diffusers' DreamBooth scripts have no EMA either).")
    if args.train_text_encoder and args.cache_latents:
        raise SdtuneError("--train_text_encoder cannot be used with --cache_latents: the text embeddings change as "
                          "the encoder trains, so they cannot be cached. Drop one of them.")
    if args.sample_batch_size < 1:
        raise SdtuneError(f"--sample_batch_size {args.sample_batch_size} must be at least 1.")
    if args.instance_data_dir is not None:
        _check_subject_data(args)


def _check_subject_data(args: argparse.Namespace) -> None:
    from sdtune.data.subject import class_images, instance_images

    for flag in ("shuffle_caption", "validation_split"):
        if getattr(args, flag):
            other = " (--validation_data_dir gives a validation loss)" if flag == "validation_split" else ""
            raise SdtuneError(f"--{flag} does not apply to subject training, where every image has "
                              f"--instance_prompt: drop it{other}.")
    if args.with_prior_preservation:
        missing = [flag for flag in ("class_data_dir", "class_prompt") if not getattr(args, flag)]
        if missing:
            raise SdtuneError(f"--with_prior_preservation needs --{' and --'.join(missing)}: the folder of class "
                              "images (missing ones are generated there) and their prompt, e.g. --class_prompt "
                              "'a photo of a dog'.")
        if args.num_class_images < 1:
            raise SdtuneError(f"--num_class_images {args.num_class_images} with --with_prior_preservation: the prior "
                              "loss needs class images; 100 to 200 is usual (the default is 100).")
        if not (math.isfinite(args.prior_loss_weight) and args.prior_loss_weight >= 0):
            raise SdtuneError(f"--prior_loss_weight {args.prior_loss_weight} must be a finite number >= 0 (1.0 is "
                              "diffusers' default).")
    elif args.class_data_dir or args.class_prompt:
        raise SdtuneError("--class_data_dir and --class_prompt are only used with --with_prior_preservation: add it, "
                          "or drop them.")
    instance_images(args.instance_data_dir)
    if args.with_prior_preservation:
        class_images(args.class_data_dir, args.num_class_images)


def save_resolved_config(args: argparse.Namespace, folder: str) -> Path:
    """Write every setting actually used, so a run can be repeated or resumed from it."""
    path = Path(folder) / RESOLVED_CONFIG_NAME
    settings = {k: v for k, v in vars(args).items() if k not in ("config", "hub_token")}
    path.write_text(yaml.safe_dump(settings, sort_keys=True))
    return path


def settings_from(settings_class, args: argparse.Namespace):
    """A settings dataclass whose fields are named after flags, filled from the parsed flags: the narrow interface
    a function takes instead of the whole namespace."""
    return settings_class(**{field.name: getattr(args, field.name) for field in fields(settings_class)})
