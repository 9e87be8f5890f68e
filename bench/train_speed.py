"""Benchmark: steps/s of sdtune's training loop on a small SD-shaped model on the CPU, and where the time goes.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/train_speed.py [--train_batch_size 1]

The model has Stable Diffusion v1's architecture scaled down (4 UNet blocks, 3 of them with cross-attention; a 4-block
VAE with 8x downsampling; a CLIP text encoder) and random weights. The loop is sdtune's: sdtune.training.loop's helpers build
the dataset (sdtune.data.dataset.CaptionedImages), the latent cache (sdtune.training.latent_cache.build_latent_cache), the EMA
(diffusers' EMAModel), the optimizer and schedule (sdtune.training.optim); each step makes the calls of sdtune.training.loop.main's
loop, in its order, through the same accelerate Accelerator. Only timers are added around them: the VAE encode, the
text encoder and the UNet forward are timed from inside sdtune.training.objective.diffusion_loss by hooks on those modules.

It runs three times: without and with --cache_latents, then a LoRA step with the cache (--lora_rank, the adapter added
by sdtune.training.lora.add_training_adapter; the optimizer, clipping and EMA take the adapter's weights only, as in
sdtune.training.loop.main). It checks the target for both cached modes: a whole step takes at most 15% longer than the UNet's
own forward + backward + optimizer step; and it compares the steps/s of the full fine-tune and the LoRA step.
With --buckets it compares instead square batches (r x r) against --enable_bucket batches of the same pixel
count (images of 4:1 and 1:4 in the 2r x r/2 and r/2 x 2r buckets), both encoding every step, taking turns; target:
a bucketed step at most 5% slower. Absolute times on a shared 2-core machine mean little; compare the ratios of one
run.
"""

import argparse
import itertools
import os
import platform
import random
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: nothing may be downloaded

import datasets  # noqa: E402
import torch  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from sdtune.seeds import step_generator  # noqa: E402
from sdtune.training.components import Components  # noqa: E402
from sdtune.training.config import parse_args  # noqa: E402
from sdtune.training.latent_cache import build_latent_cache  # noqa: E402
from sdtune.training.loop import configure_unet, make_accelerator, make_dataloader, make_dataset, make_ema, update_ema  # noqa: E402
from sdtune.training.lora import add_training_adapter  # noqa: E402
from sdtune.training.objective import diffusion_loss  # noqa: E402
from sdtune.training.optim import make_lr_scheduler, make_optimizer  # noqa: E402
from tinyworld.factories import sd_layout_unet, sd_layout_vae, text_config  # noqa: E402
from tinyworld.shapes import random_shape, shape_words, write_imagefolder, write_shapes_dataset  # noqa: E402
from tinyworld.tokenizer import save_word_tokenizer  # noqa: E402

PHASES = ["data loading", "VAE encode", "text encoder", "UNet forward", "UNet backward", "optimizer step",
          "EMA update", "other"]
UNET_OWN = ["UNet forward", "UNet backward", "optimizer step"]  # the work no data path can avoid
LORA_MODE = "LoRA, --cache_latents"
MODES = [("encode every step", False, False), ("--cache_latents", True, False), (LORA_MODE, True, True)]  # cache, LoRA
TARGET_OVERHEAD = 0.15  # with --cache_latents: step time <= (1 + this) x the UNet's own time
TARGET_BUCKET_SLOWDOWN = 0.05  # --buckets: a bucketed step <= (1 + this) x a square one of the same pixel count
BUCKET_ROUNDS = 5  # --buckets: the two modes take turns, this many rounds each
LATENT_FACTOR = 8  # a 4-block VAE halves the resolution three times, as SD's does


def parse_bench_args(argv=None) -> argparse.Namespace:
    """The benchmark's own flags; the training flags it passes to sdtune are in training_flags()."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=128, help="Training resolution in pixels (latents: /8).")
    parser.add_argument("--image_size", type=int, default=256,
                        help="Side of the stored images; larger than --resolution so every example is resized.")
    parser.add_argument("--num_images", type=int, default=64, help="Rows of the synthetic dataset.")
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--warmup_steps", type=int, default=5, help="Steps run before timing starts.")
    parser.add_argument("--steps", type=int, default=30, help="Timed steps per mode.")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="As the GPU recipes; off by default, which makes the UNet's own time smaller and so "
                             "the overhead target harder to meet.")
    parser.add_argument("--no_ema", action="store_true", help="Train without --use_ema.")
    parser.add_argument("--lora_rank", type=int, default=4, help="The LoRA mode's rank (configs/pokemon-lora.yaml's).")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the machine has 2 cores).")
    parser.add_argument("--buckets", action="store_true",
                        help="Compare square batches with --enable_bucket batches of the same pixel count instead.")
    return parser.parse_args(argv)


def small_components(tokenizer, resolution: int) -> Components:
    """Random small SD parts, frozen and trainable as sdtune.training.components.load_components leaves them."""
    torch.manual_seed(0)  # both modes start from the same weights
    # SD v1's layouts, 1 layer a block: the UNet at 1/10 of SD's widths, the VAE at 1/8; a 4-layer text encoder
    vae = sd_layout_vae((16, 32, 64, 64), layers_per_block=1, sample_size=resolution, norm_num_groups=8)
    text_encoder = CLIPTextModel(text_config(tokenizer, 64, num_hidden_layers=4, intermediate_size=256))
    unet = sd_layout_unet((32, 64, 128, 128), layers_per_block=1, cross_attention_dim=64, sample_size=16)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    # SD v1's training noise schedule (its scheduler_config.json)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
    return Components(tokenizer, text_encoder, vae, unet, scheduler)


def training_flags(bench, folders: dict, cache_latents: bool, lora: bool = False,
                   buckets: bool = False) -> list[str]:
    """train_text_to_image.py flags for this benchmark: fp32 on the CPU, no accumulation, no logging."""
    flags = [
        "--pretrained_model_name_or_path", "bench-small-sd",  # never loaded: the parts are built in memory
        "--train_data_dir", str(folders["mixed" if buckets else "data"]), "--output_dir", str(folders["output"]),
        "--resolution", str(bench.resolution), "--center_crop", "--random_flip",
        "--train_batch_size", str(bench.train_batch_size), "--max_train_steps", str(bench.warmup_steps + bench.steps),
        "--lr_warmup_steps", "0", "--mixed_precision", "no", "--report_to", "none", "--seed", "0",
    ]
    flags += [] if bench.no_ema else ["--use_ema"]
    flags += ["--gradient_checkpointing"] if bench.gradient_checkpointing else []
    flags += ["--cache_latents"] if cache_latents else []
    flags += ["--lora_rank", str(bench.lora_rank)] if lora else []
    flags += ["--enable_bucket"] if buckets else []
    return flags


class PhaseTimer:
    """Wall-clock seconds per phase of the training step, summed over the timed steps."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self._starts = {}

    def reset(self) -> None:
        self.seconds.clear()

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - start

    def around_module(self, module: torch.nn.Module, name: str) -> None:
        """Time every forward call of `module` (hooks, so the caller's code runs unchanged)."""
        module.register_forward_pre_hook(lambda *_: self._starts.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(lambda *_: self._add_since(name))

    def around_method(self, owner, attribute: str, name: str) -> None:
        """Time every call of owner.attribute (for VAE.encode, which is a method, not a module forward)."""
        method = getattr(owner, attribute)

        def timed(*args, **kwargs):
            with self.phase(name):
                return method(*args, **kwargs)

        setattr(owner, attribute, timed)

    def _add_since(self, name: str) -> None:
        self.seconds[name] += time.perf_counter() - self._starts.pop(name)


def prepare_inputs(root: Path, bench) -> dict:
    """Write the synthetic captioned images and the tokenizer once; both modes read them."""
    folders = {"data": root / "shapes", "mixed": root / "mixed", "tokenizer": root / "tokenizer",
               "output": root / "output"}
    write_shapes_dataset(folders["data"], bench.num_images, seed=0, size=bench.image_size)
    save_word_tokenizer(shape_words(), folders["tokenizer"])
    if bench.buckets:
        write_imagefolder(folders["mixed"], mixed_aspect_shapes(bench))
    return folders


def mixed_aspect_shapes(bench) -> list:
    """Shapes of 4:1 and 1:4, alternately: each fills a bucket of exactly resolution² pixels (2r x r/2)."""
    rng, long, short = random.Random(0), 2 * bench.image_size, bench.image_size // 2
    examples = []
    for index in range(bench.num_images):
        image, caption = random_shape(rng, bench.image_size)
        examples.append((image.resize((long, short) if index % 2 else (short, long)), caption))
    return examples


def run_mode(bench, folders: dict, accelerator, cache_latents: bool, lora: bool) -> dict:
    """Set up, time the steps, and return seconds per phase and in total."""
    loop, timer, facts = timed_loop(bench, folders, accelerator, cache_latents, lora)
    total = run_steps(loop, bench.warmup_steps, bench.steps, timer)
    return phase_result(timer, total, bench.steps, facts)


def timed_loop(bench, folders: dict, accelerator, cache_latents: bool, lora: bool = False, buckets: bool = False):
    """The loop of one mode, with a timer hooked to its VAE, text encoder and UNet."""
    loop, facts = set_up(bench, folders, accelerator, cache_latents, lora, buckets)
    timer = PhaseTimer()
    timer.around_method(loop.parts.vae, "encode", "VAE encode")
    timer.around_module(loop.parts.text_encoder, "text encoder")
    timer.around_module(loop.unet, "UNet forward")
    return loop, timer, facts


def phase_result(timer: PhaseTimer, total: float, steps: int, facts: dict) -> dict:
    seconds = dict(timer.seconds)
    seconds["other"] = total - sum(seconds.values())
    return {"seconds": seconds, "total": total, "steps": steps, **facts}


def set_up(bench, folders: dict, accelerator, cache_latents: bool, lora: bool, buckets: bool):
    """Everything sdtune.training.loop.main builds before its loop, in its order, with the small model's parts."""
    args = parse_args(training_flags(bench, folders, cache_latents, lora, buckets))
    parts = small_components(CLIPTokenizer.from_pretrained(folders["tokenizer"]), bench.resolution)
    configure_unet(parts.unet, args)
    if args.lora_rank:
        add_training_adapter(parts.unet, args)
    trained = [p for p in parts.unet.parameters() if p.requires_grad]
    dataset, _ = make_dataset(args, parts.tokenizer)
    start = time.perf_counter()
    if args.cache_latents:
        dataset.cache = build_latent_cache(dataset, parts.vae, parts.text_encoder, accelerator.device,
                                           args.train_batch_size, show_progress=False)
    caching_seconds = time.perf_counter() - start
    dataloader = make_dataloader(dataset, args)
    ema = make_ema(args, parts.unet, trained, accelerator.device)
    optimizer = make_optimizer(args, trained, accelerator.num_processes)
    lr_scheduler = make_lr_scheduler(args, optimizer, args.max_train_steps, accelerator.num_processes)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(parts.unet, optimizer, dataloader, lr_scheduler)
    facts = {"rows": len(dataset), "caching": caching_seconds,
             "unet_parameters": sum(p.numel() for p in unet.parameters()),
             "trained_parameters": sum(p.numel() for p in trained)}
    return Loop(args, accelerator, parts, unet, trained, optimizer, lr_scheduler, dataloader, ema), facts


@dataclass
class Loop:
    """What sdtune.training.loop.main's loop works with, after accelerator.prepare."""
    args: argparse.Namespace
    accelerator: object
    parts: Components
    unet: torch.nn.Module
    trained: list  # the parameters the optimizer updates: the UNet's, or its adapter's
    optimizer: object
    lr_scheduler: object
    dataloader: object
    ema: object


def run_steps(loop: Loop, warmup_steps: int, steps: int, timer: PhaseTimer) -> float:
    """sdtune.training.loop.main's loop body (no logging, checkpoints or validation); returns the timed steps' seconds."""
    args, accelerator, unet, optimizer = loop.args, loop.accelerator, loop.unet, loop.optimizer
    done, start = 0, time.perf_counter()
    for epoch in itertools.count():
        loop.dataloader.set_epoch(epoch)
        with timer.phase("data loading"):
            batches = iter(loop.dataloader)  # an epoch's first batch pays for starting the iterator
        for batch_index in range(len(loop.dataloader)):
            with timer.phase("data loading"):
                batch = next(batches)
            with accelerator.accumulate(unet):
                generator = step_generator(args.seed, accelerator.process_index, epoch, batch_index)
                # fp32 for the frozen parts too: --mixed_precision no
                loss = diffusion_loss(batch, unet, loop.parts, args, generator, torch.float32)
                accelerator.gather(loss.detach()).mean().item()  # as the loop's loss logging
                with timer.phase("UNet backward"):
                    accelerator.backward(loss)
                with timer.phase("optimizer step"):
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(loop.trained, args.max_grad_norm)
                    optimizer.step()
                    loop.lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            with timer.phase("EMA update"):
                update_ema(loop.ema, loop.trained, args)
            done += 1
            if done == warmup_steps:
                timer.reset()
                start = time.perf_counter()
            if done == warmup_steps + steps:
                return time.perf_counter() - start


def overhead_ratio(result: dict) -> float:
    """Whole step time over the UNet's own forward + backward + optimizer step."""
    own = sum(result["seconds"].get(phase, 0.0) for phase in UNET_OWN)
    return result["total"] / own


def print_table(results: dict) -> None:
    """Milliseconds per step and share of the step, one column pair per mode."""
    modes = list(results)
    print(f"{'phase':<16}" + "".join(f"{mode:>26}" for mode in modes))
    print(f"{'':<16}" + "".join(f"{'ms/step':>16}{'% of step':>10}" for _ in modes))
    for phase in PHASES + ["whole step"]:
        row = f"{phase:<16}"
        for mode in modes:
            result = results[mode]
            seconds = result["total"] if phase == "whole step" else result["seconds"].get(phase, 0.0)
            row += f"{1000 * seconds / result['steps']:>16.1f}{100 * seconds / result['total']:>9.1f}%"
        print(row)
    print(f"{'steps/s':<16}" + "".join(f"{results[m]['steps'] / results[m]['total']:>26.2f}" for m in modes))
    print(f"{'step / UNet own':<16}" + "".join(f"{overhead_ratio(results[m]):>26.3f}" for m in modes))


def main(argv=None) -> None:
    bench = parse_bench_args(argv)
    torch.set_num_threads(bench.threads)
    datasets.disable_progress_bars()
    latent = bench.resolution // LATENT_FACTOR
    print(f"train_speed, {date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"small SD-shaped model: {bench.resolution} px images -> {latent}x{latent}x4 latents, batch "
          f"{bench.train_batch_size}, fp32, EMA {'off' if bench.no_ema else 'on'}, gradient checkpointing "
          f"{'on' if bench.gradient_checkpointing else 'off'}; {bench.warmup_steps} warm-up + {bench.steps} timed "
          "steps per mode")
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-") as root:
        folders = prepare_inputs(Path(root), bench)
        accelerator = make_accelerator(parse_args(training_flags(bench, folders, cache_latents=False)))
        if bench.buckets:
            return compare_buckets(bench, folders, accelerator)
        results = {}
        for name, cache_latents, lora in MODES:
            results[name] = run_mode(bench, folders, accelerator, cache_latents, lora)
    cached, lora = results["--cache_latents"], results[LORA_MODE]
    print(f"UNet parameters: {cached['unet_parameters']:,} (LoRA rank {bench.lora_rank}: "
          f"{lora['trained_parameters']:,} trained); dataset rows: {cached['rows']}; building the cache took "
          f"{cached['caching']:.1f} s once")
    print()
    print_table(results)
    print()
    for name in ("--cache_latents", LORA_MODE):
        ratio = overhead_ratio(results[name])
        verdict = "met" if ratio <= 1 + TARGET_OVERHEAD else "MISSED"
        print(f"Target ({name}: whole step <= {1 + TARGET_OVERHEAD:.2f} x UNet forward + backward + optimizer "
              f"step): {ratio:.3f} -> {verdict}")
    speed_up = (lora["steps"] / lora["total"]) / (cached["steps"] / cached["total"])
    print(f"steps/s, full fine-tune {cached['steps'] / cached['total']:.2f} against LoRA "
          f"{lora['steps'] / lora['total']:.2f} (both with the cache): LoRA {speed_up:.2f}x")
    print("Phases: 'data loading' is the DataLoader's next batch (dataset, collate, device move); VAE encode, text "
          "encoder and UNet forward are timed inside sdtune.training.objective.diffusion_loss; 'optimizer step' is gradient "
          "clipping + step + LR schedule + zero_grad; 'other' is the rest of the step (noise and timestep draws, "
          "loss, the logged loss's .item()).")


def compare_buckets(bench, folders: dict, accelerator) -> None:
    """--buckets: square batches against bucketed ones of the same pixel count, both encoding every step. The two
    modes take turns, BUCKET_ROUNDS rounds of steps each, so that a change in the machine's load hits both alike."""
    side, steps = bench.resolution, bench.steps // BUCKET_ROUNDS * BUCKET_ROUNDS
    modes = {f"square {side}x{side}": timed_loop(bench, folders, accelerator, cache_latents=False),
             f"buckets {2 * side}x{side // 2}, {side // 2}x{2 * side}": timed_loop(bench, folders, accelerator,
                                                                              cache_latents=False, buckets=True)}
    totals = dict.fromkeys(modes, 0.0)
    for round_index in range(BUCKET_ROUNDS):
        for name, (loop, timer, _) in modes.items():
            warmup = bench.warmup_steps if round_index == 0 else 0
            totals[name] += run_steps(loop, warmup, steps // BUCKET_ROUNDS, timer)
    results = {name: phase_result(timer, totals[name], steps, facts) for name, (_, timer, facts) in modes.items()}
    print()
    print_table(results)
    print()
    square, bucketed = results.values()
    ratio = bucketed["total"] / square["total"]
    verdict = "met" if ratio <= 1 + TARGET_BUCKET_SLOWDOWN else "MISSED"
    print(f"Target (a bucketed step <= {1 + TARGET_BUCKET_SLOWDOWN:.2f} x a square one of the same pixel count): "
          f"{ratio:.3f} -> {verdict}")


if __name__ == "__main__":
    main()
