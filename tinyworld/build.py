"""Build the tiny world from nothing on the CPU: data, VAE, CLIP, then the stock UNet with the project's trainer.

    python -m tinyworld.build               # every phase in order
    python -m tinyworld.build --only vae    # one phase; a phase reads what the earlier ones wrote

Writes the data under --data, intermediate models under --work, and the shipped folders tinyworld/clip (CLIPModel,
tokenizer, image processor) and tinyworld/stock (StableDiffusionPipeline). Run it on idle cores and one phase at a
time: two multi-threaded trainings on 2 cores run many times slower together than one after the other.
"""

import argparse
import logging
import time
from pathlib import Path

import torch

from sdtune.errors import SdtuneError, exit_on_error
from sdtune.logs import setup_logging
from sdtune.training.config import parse_args as parse_training_args
from sdtune.training.loop import main as train
from tinyworld import CLIP, STOCK
from tinyworld.clip_model import MAX_TOKENS, ranking_accuracy, save_clip, train_clip
from tinyworld.datasets import every_caption, read_split, world_words, write_world
from tinyworld.stock_model import assemble_pipeline, ship
from tinyworld.tokenizer import save_word_tokenizer
from tinyworld.vae import set_scaling_factor, train_vae

logger = logging.getLogger("tinyworld")

PHASES = ("data", "vae", "clip", "unet")
VAE_STEPS = 3000  # batches of 16, half shapes, half creatures
CLIP_STEPS = 1500  # batches of 128, half shapes, half creatures
UNET_STEPS = 3000  # optimizer steps of 16 base-world images
VALIDATION_PROMPTS = ["a red circle on a white background", "a green triangle on a black background",
                      "a purple cross on a gray background", "an orange square on a white background"]


def unet_flags(pipeline: Path, data: Path, output_dir: Path, seed: int) -> list[str]:
    """train_text_to_image.py's flags for the stock UNet: from scratch, hence a high learning rate."""
    return [
        "--pretrained_model_name_or_path", str(pipeline), "--train_data_dir", str(data / "base/train"),
        "--output_dir", str(output_dir), "--resolution", "64", "--center_crop", "--random_flip", "--cache_latents",
        "--train_batch_size", "16", "--max_train_steps", str(UNET_STEPS), "--learning_rate", "6e-4",
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "200", "--adam_weight_decay", "0",
        "--use_ema", "--ema_decay", "0.999",
        "--snr_gamma", "5",  # Min-SNR weighting: converges several times faster (Hang et al. 2023)
        "--proportion_empty_prompts", "0.1",  # classifier-free guidance needs the unconditional model too
        "--mixed_precision", "no",  # bf16 autocast is slower than fp32 for a UNet this small on a CPU
        "--checkpointing_steps", "1000", "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest",
        "--validation_prompts", *VALIDATION_PROMPTS, "--validation_epochs", "1000000",  # at the end only
        "--report_to", "none", "--seed", str(seed),
    ]


def require(path: Path, phase: str) -> Path:
    """What an earlier phase wrote; a clear stop when `--only` skipped it."""
    if not path.exists():
        raise SdtuneError(f"{path} is missing: run the {phase} phase first (python -m tinyworld.build "
                          f"--only {phase}, with the same --data and --work).")
    return path


def training_sets(data: Path) -> list:
    return [read_split(require(data / split, "data")) for split in ("base/train", "pokemon/train")]


def vae_phase(args) -> None:
    sets = training_sets(args.data)
    vae = train_vae(sets, VAE_STEPS, seed=args.seed)
    factor = set_scaling_factor(vae, torch.cat([pixels for pixels, _ in sets]), args.seed)
    vae.save_pretrained(args.work / "vae", safe_serialization=True)
    logger.info("VAE saved to %s, scaling factor %.4f", args.work / "vae", factor)


def clip_phase(args) -> None:
    tokenizer = save_word_tokenizer(world_words(), args.work / "tokenizer", model_max_length=MAX_TOKENS)
    clip = train_clip(tokenizer, training_sets(args.data), CLIP_STEPS, seed=args.seed)
    save_clip(clip, tokenizer, args.clip)
    for name in ("base", "pokemon"):
        pixels, captions = read_split(args.data / name / "heldout")
        accuracy = ranking_accuracy(clip, tokenizer, pixels, captions, every_caption(name))
        logger.info("CLIP ranks the right caption first for %.1f%% of held-out %s images", 100 * accuracy, name)
    logger.info("CLIP saved to %s", args.clip)


def unet_phase(args) -> None:
    vae, clip = require(args.work / "vae", "vae"), require(args.clip / "config.json", "clip").parent
    initial = assemble_pipeline(args.work / "stock-initial", vae, clip, args.seed)
    # the trainer runs once in this process, so its accelerate state is fresh as in a process of its own
    run = train(parse_training_args(unet_flags(initial, args.data, args.work / "stock-run", args.seed)))
    ship(run, args.stock)
    logger.info("Stock pipeline saved to %s", args.stock)


@exit_on_error()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=PHASES, help="Run this phase only (default: all, in order).")
    parser.add_argument("--data", type=Path, default=Path("data/tinyworld"), help="Where the datasets go.")
    parser.add_argument("--work", type=Path, default=Path("data/tinyworld-build"), help="Intermediate models.")
    parser.add_argument("--clip", type=Path, default=CLIP, help="Where the CLIP folder is shipped.")
    parser.add_argument("--stock", type=Path, default=STOCK, help="Where the stock pipeline is shipped.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup_logging()
    phases = {"data": lambda a: write_world(a.data, a.seed), "vae": vae_phase, "clip": clip_phase, "unet": unet_phase}
    for phase in [args.only] if args.only else PHASES:
        start = time.perf_counter()
        phases[phase](args)
        logger.info("Phase %s done in %.1f min", phase, (time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
