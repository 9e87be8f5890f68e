"""Benchmark: --compile (torch.compile of the UNet) on the tiny world, CPU: images/s and training steps/s with and
without it, and what the compile itself costs.

    flock /tmp/sdtune-cpu.lock env HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/compile_speed.py --part generation
    flock /tmp/sdtune-cpu.lock env HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/compile_speed.py --part training

Generation: the tiny world's stock model (tinyworld/stock) through sdtune.generation.registry.ModelRegistry (compile=True is
what --compile sets) and sdtune.generation.core.text_to_image, at the tiny world's settings (64 px, 25 steps, the app's
default scheduler and guidance), the same prompts and seeds in every variant. Each variant draws one image first
(for a compiled one: the compile), then the variants take turns, --rounds rounds of --images images each, so that
a drift of the machine's load hits them alike. Variants besides eager and compile: channels_last, the UNet's and the
VAE's memory format (a compiled channels_last UNet is a graph of its own: its weights' strides differ).

Training: configs/tiny.yaml's shapes (tinyworld/stock, 64 px, batch 8, fp32, EMA on), one batch a step (the recipe
accumulates two), on a synthetic shapes dataset; each mode is set up by the shipped sdtune.training.loop.set_up
(--compile goes through its configure_unet, as in training) and each step is one sdtune.training.loop.train_step
call, as bench/train_speed.py runs them. --warmup_steps steps first (the compiled UNet's first step is its compile),
then the two modes take turns, --rounds rounds of --steps steps each.

Inductor's caches are off (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1) unless --warm_cache: the compile time is a cold
one, as on a fresh machine.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: nothing may be downloaded
if "--warm_cache" not in sys.argv:
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import datasets  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import run_steps, timed_run  # noqa: E402

from sdtune.generation.core import GenerationSettings, text_to_image  # noqa: E402
from sdtune.generation.registry import ModelRegistry, ModelSpec  # noqa: E402
from sdtune.training.config import parse_args  # noqa: E402
from tinyworld.shapes import write_shapes_dataset  # noqa: E402

STOCK = "tinyworld/stock"
PROMPTS = ["a drawing of a red circle on a white background", "a drawing of a blue square on a black background"]
TARGET_SPEED_UP = 1.3  # generation, compiled against eager


@dataclass
class Variant:
    compile: bool
    channels_last: bool = False


VARIANTS = {
    "eager": Variant(False),
    "compile": Variant(True),
    "channels_last": Variant(False, channels_last=True),
    "compile+channels_last": Variant(True, channels_last=True),
}


def parse_bench_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["generation", "training"], required=True)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["eager", "compile"],
                        help="Generation: the variants to compare (the first is the baseline).")
    parser.add_argument("--rounds", type=int, default=4, help="Turns each variant or mode takes.")
    parser.add_argument("--images", type=int, default=4, help="Generation: images per variant per round.")
    parser.add_argument("--steps", type=int, default=8, help="Training: steps per mode per round.")
    parser.add_argument("--warmup_steps", type=int, default=3, help="Training: steps before timing starts.")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the machine has 2 cores).")
    parser.add_argument("--warm_cache", action="store_true", help="Keep inductor's caches (default: off).")
    return parser.parse_args(argv)


def load_variant(variant: Variant):
    """The stock pipeline as --compile (or not) serves it, in the variant's memory format."""
    pipeline = ModelRegistry([ModelSpec("stock", STOCK)], device="cpu", compile=variant.compile).get("stock")
    if variant.channels_last:
        pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    return pipeline


def draw(pipeline, index: int) -> None:
    settings = GenerationSettings(num_inference_steps=25, width=64, height=64)
    text_to_image(pipeline, PROMPTS[index % len(PROMPTS)], index, settings)


def compare_generation(bench) -> None:
    pipelines, first = {}, {}
    for name in bench.variants:
        pipelines[name] = load_variant(VARIANTS[name])
        start = time.perf_counter()
        draw(pipelines[name], 0)
        first[name] = time.perf_counter() - start
    seconds = dict.fromkeys(bench.variants, 0.0)
    for _ in range(bench.rounds):
        for name, pipeline in pipelines.items():
            start = time.perf_counter()
            for index in range(bench.images):
                draw(pipeline, index)
            seconds[name] += time.perf_counter() - start
    images = bench.rounds * bench.images
    base = bench.variants[0]
    print(f"| variant | images/s | x {base} | first image, s | compile, s (first image - a later one) |")
    print("|---|---:|---:|---:|---:|")
    for name in bench.variants:
        per_image = seconds[name] / images
        compile_seconds = f"{first[name] - per_image:.1f}" if VARIANTS[name].compile else ""
        print(f"| {name} | {1 / per_image:.2f} | {seconds[base] / seconds[name]:.2f} | {first[name]:.1f} | "
              f"{compile_seconds} |")
    if "compile" in seconds and "eager" in seconds:
        speed_up = seconds["eager"] / seconds["compile"]
        verdict = "met" if speed_up >= TARGET_SPEED_UP else "MISSED"
        print(f"Target (--compile at least {TARGET_SPEED_UP}x eager images/s): {speed_up:.2f}x -> {verdict}")


def training_flags(data: Path, output: Path, compile: bool, total_steps: int) -> list[str]:
    """configs/tiny.yaml with one batch a step, `total_steps` steps, no logging, and --compile or not."""
    return ["--config", "configs/tiny.yaml", "--train_data_dir", str(data), "--output_dir", str(output),
            "--gradient_accumulation_steps", "1", "--max_train_steps", str(total_steps), "--report_to", "none",
            *(["--compile"] if compile else [])]


def compare_training(bench) -> None:
    total_steps = bench.warmup_steps + bench.rounds * bench.steps
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-") as root:
        data = write_shapes_dataset(Path(root) / "data", count=64, seed=0)
        runs = {mode: timed_run(parse_args(training_flags(data, Path(root) / mode, mode == "compile", total_steps)),
                                hook_phases=False)
                for mode in ("eager", "compile")}
        warm_up = {mode: run_steps(timed, 0, bench.warmup_steps) for mode, timed in runs.items()}
        seconds = dict.fromkeys(runs, 0.0)
        for _ in range(bench.rounds):
            for mode, timed in runs.items():
                seconds[mode] += run_steps(timed, 0, bench.steps)
    steps = bench.rounds * bench.steps
    print("| mode | steps/s | x eager | first steps, s | compile, s (warm-up - as many later steps) |")
    print("|---|---:|---:|---:|---:|")
    for mode in runs:
        per_step = seconds[mode] / steps
        print(f"| {mode} | {1 / per_step:.2f} | {seconds['eager'] / seconds[mode]:.2f} | {warm_up[mode]:.1f} | "
              f"{warm_up[mode] - bench.warmup_steps * per_step:.1f} |")


def main(argv=None) -> None:
    bench = parse_bench_args(argv)
    torch.set_num_threads(bench.threads)
    datasets.disable_progress_bars()
    print(f"compile_speed --part {bench.part}, {date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, inductor caches "
          f"{'on' if bench.warm_cache else 'off'}")
    if bench.part == "generation":
        print(f"{STOCK}, 64 px, 25 steps, one image a call; {bench.rounds} rounds x {bench.images} images a variant")
        compare_generation(bench)
    else:
        print(f"configs/tiny.yaml's shapes ({STOCK}, 64 px, batch 8, fp32, EMA); {bench.warmup_steps} warm-up "
              f"steps, then {bench.rounds} rounds x {bench.steps} steps a mode")
        compare_training(bench)


if __name__ == "__main__":
    main()
