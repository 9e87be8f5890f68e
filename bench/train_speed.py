"""Benchmark: steps/s of sdtune's training loop on a small SD-shaped model on the CPU, and where the time goes.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/train_speed.py [--train_batch_size 1]

The model has Stable Diffusion v1's architecture scaled down (4 UNet blocks, 3 of them with cross-attention; a 4-block
VAE with 8x downsampling; a CLIP text encoder) and random weights, saved in diffusers' layout and loaded as any base
model is. The loop is the shipped one: sdtune.training.loop.set_up builds everything (dataset, latent cache, EMA,
optimizer, schedule, accelerator.prepare) and each timed step is one sdtune.training.loop.train_step call. Only
timers are added, by hooks on the objects the step calls: the VAE's encode, the text encoder's and the UNet's forward,
accelerate's backward, the clipping, optimizer, schedule and EMA steps, and the micro-batch iterator.

It runs three times: without and with --cache_latents, then a LoRA step with the cache (--lora_rank, the adapter added
by sdtune.training.lora.add_training_adapter; the optimizer, clipping and EMA take the adapter's weights only). It
checks the target for both cached modes: a whole step takes at most 15% longer than the UNet's own forward + backward
+ optimizer step; and it compares the steps/s of the full fine-tune and the LoRA step.
With --buckets it compares instead square batches (r x r) against --enable_bucket batches of the same pixel
count (images of 4:1 and 1:4 in the 2r x r/2 and r/2 x 2r buckets), both encoding every step, taking turns; target:
a bucketed step at most 5% slower. Absolute times on a shared 2-core machine mean little; compare the ratios of one
run.
"""

import argparse
import os
import platform
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: nothing may be downloaded

import datasets  # noqa: E402
import torch  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

from sdtune.training import loop  # noqa: E402
from sdtune.training.config import parse_args  # noqa: E402
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


def write_small_model(folder: Path, resolution: int) -> Path:
    """Random small SD parts in diffusers' layout (tokenizer/, text_encoder/, vae/, unet/, scheduler/), for set_up to
    load as it loads any base model; every mode starts from these same weights."""
    save_word_tokenizer(shape_words(), folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    # SD v1's layouts, 1 layer a block: the UNet at 1/10 of SD's widths, the VAE at 1/8; a 4-layer text encoder
    parts = {
        "vae": sd_layout_vae((16, 32, 64, 64), layers_per_block=1, sample_size=resolution, norm_num_groups=8),
        "text_encoder": CLIPTextModel(text_config(tokenizer, 64, num_hidden_layers=4, intermediate_size=256)),
        "unet": sd_layout_unet((32, 64, 128, 128), layers_per_block=1, cross_attention_dim=64, sample_size=16),
        # SD v1's training noise schedule (its scheduler_config.json)
        "scheduler": DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000),
    }
    for name, part in parts.items():
        part.save_pretrained(folder / name)
    return folder


def training_flags(bench, folders: dict, cache_latents: bool, lora: bool = False, buckets: bool = False,
                   total_steps: int | None = None) -> list[str]:
    """train_text_to_image.py flags for this benchmark: fp32 on the CPU, no accumulation, no logging; the run lasts
    `total_steps` (default: the warm-up and timed steps)."""
    total_steps = total_steps or bench.warmup_steps + bench.steps
    flags = [
        "--pretrained_model_name_or_path", str(folders["model"]),
        "--train_data_dir", str(folders["mixed" if buckets else "data"]), "--output_dir", str(folders["output"]),
        "--resolution", str(bench.resolution), "--center_crop", "--random_flip",
        "--train_batch_size", str(bench.train_batch_size), "--max_train_steps", str(total_steps),
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
        """Time every call of owner.attribute (a method such as VAE.encode or Accelerator.backward, on this one
        object)."""
        method = getattr(owner, attribute)

        def timed(*args, **kwargs):
            with self.phase(name):
                return method(*args, **kwargs)

        setattr(owner, attribute, timed)

    @contextmanager
    def around_function(self, module, attribute: str, name: str):
        """Time module.attribute, a function, while the block runs; then put the original back."""
        original = getattr(module, attribute)
        self.around_method(module, attribute, name)
        try:
            yield
        finally:
            setattr(module, attribute, original)

    def around_iterator(self, items: Iterator, name: str) -> Iterator:
        """The items of `items`, each next() timed."""
        while True:
            with self.phase(name):
                item = next(items, None)
            if item is None:
                return
            yield item

    def _add_since(self, name: str) -> None:
        self.seconds[name] += time.perf_counter() - self._starts.pop(name)


def prepare_inputs(root: Path, bench) -> dict:
    """Write the small model and the synthetic captioned images once; every mode reads them."""
    folders = {"model": root / "small-sd", "data": root / "shapes", "mixed": root / "mixed",
               "output": root / "output"}
    write_small_model(folders["model"], bench.resolution)
    write_shapes_dataset(folders["data"], bench.num_images, seed=0, size=bench.image_size)
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


@dataclass
class TimedRun:
    """A run built by the shipped set_up, with timers hooked to what its train_step calls."""

    run: loop.Run
    batches: Iterator  # the run's micro_batches, each next() timed as data loading
    log: loop.StepLog  # train_step's own logging, without a progress bar
    timer: PhaseTimer
    facts: dict


def run_mode(bench, folders: dict, cache_latents: bool, lora: bool) -> dict:
    """Set up, time the steps, and return seconds per phase and in total."""
    timed = timed_run(parse_args(training_flags(bench, folders, cache_latents, lora)))
    total = run_steps(timed, bench.warmup_steps, bench.steps)
    return phase_result(timed.timer, total, bench.steps, timed.facts)


def timed_run(args, hook_phases: bool = True) -> TimedRun:
    """sdtune.training.loop.set_up for these flags, then a timer hooked to everything its steps call (without
    `hook_phases`, to the micro-batches only: a hook inside a compiled UNet would break its graph)."""
    set_up_timer = PhaseTimer()
    with set_up_timer.around_function(loop, "build_latent_cache", "caching"):
        run = loop.set_up(args, loop.make_accelerator(args))
    timer = PhaseTimer()
    if hook_phases:
        hook_step_phases(timer, run)
    batches = timer.around_iterator(loop.micro_batches(run), "data loading")
    log = loop.StepLog(run.accelerator, None, args.max_train_steps, 0, show_bar=False)
    facts = {"rows": len(run.dataloader.dataset), "caching": set_up_timer.seconds["caching"],
             "unet_parameters": sum(p.numel() for p in run.unet.parameters()),
             "trained_parameters": loop.trainable_count(run)}
    return TimedRun(run, batches, log, timer, facts)


def hook_step_phases(timer: PhaseTimer, run: loop.Run) -> None:
    """Time what train_step calls, phase by phase, through hooks on the run's own objects."""
    timer.around_method(run.parts.vae, "encode", "VAE encode")
    timer.around_module(run.parts.text_encoder, "text encoder")
    timer.around_module(run.unet, "UNet forward")
    timer.around_method(run.accelerator, "backward", "UNet backward")
    for owner, method in [(run.accelerator, "clip_grad_norm_"), (run.optimizer, "step"), (run.lr_scheduler, "step"),
                          (run.optimizer, "zero_grad")]:
        timer.around_method(owner, method, "optimizer step")
    if run.ema is not None:
        timer.around_method(run.ema, "step", "EMA update")


def phase_result(timer: PhaseTimer, total: float, steps: int, facts: dict) -> dict:
    seconds = dict(timer.seconds)
    seconds["other"] = total - sum(seconds.values())
    return {"seconds": seconds, "total": total, "steps": steps, **facts}


def run_steps(timed: TimedRun, warmup_steps: int, steps: int) -> float:
    """warmup_steps, then `steps` timed calls of sdtune.training.loop.train_step; returns the timed steps' seconds.
    The phase timer restarts after a warm-up, and adds up over calls without one."""
    for _ in range(warmup_steps):
        take_step(timed)
    if warmup_steps:
        timed.timer.reset()
    start = time.perf_counter()
    for _ in range(steps):
        take_step(timed)
    return time.perf_counter() - start


def take_step(timed: TimedRun) -> None:
    if not loop.train_step(timed.run, timed.batches, timed.log):
        raise RuntimeError("The run's epochs ran out before the benchmark's steps: its --max_train_steps is short.")


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
        if bench.buckets:
            return compare_buckets(bench, folders)
        results = {}
        for name, cache_latents, lora in MODES:
            results[name] = run_mode(bench, folders, cache_latents, lora)
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
    print("Phases: 'data loading' is the next micro-batch (dataset, collate, device move); VAE encode, text encoder "
          "and UNet forward are timed inside sdtune.training.objective.diffusion_loss; 'optimizer step' is gradient "
          "clipping + step + LR schedule + zero_grad; 'other' is the rest of train_step (noise and timestep draws, "
          "loss, the logged loss's gather and .item(), the log).")


def compare_buckets(bench, folders: dict) -> None:
    """--buckets: square batches against bucketed ones of the same pixel count, both encoding every step. The two
    modes take turns, BUCKET_ROUNDS rounds of steps each, so that a change in the machine's load hits both alike."""
    side, steps = bench.resolution, bench.steps // BUCKET_ROUNDS * BUCKET_ROUNDS
    total_steps = bench.warmup_steps + steps
    modes = {f"square {side}x{side}": False, f"buckets {2 * side}x{side // 2}, {side // 2}x{2 * side}": True}
    modes = {name: timed_run(parse_args(training_flags(bench, folders, False, buckets=buckets,
                                                       total_steps=total_steps)))
             for name, buckets in modes.items()}
    totals = dict.fromkeys(modes, 0.0)
    for round_index in range(BUCKET_ROUNDS):
        for name, timed in modes.items():
            warmup = bench.warmup_steps if round_index == 0 else 0
            totals[name] += run_steps(timed, warmup, steps // BUCKET_ROUNDS)
    results = {name: phase_result(timed.timer, totals[name], steps, timed.facts) for name, timed in modes.items()}
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
