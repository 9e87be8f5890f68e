"""Benchmark: what --use_dora and --optimizer prodigy cost against a plain LoRA with AdamW at the same rank: the
training step's time (taking turns, in one run) and the trained parameters and optimizer state they keep.

    HF_HUB_OFFLINE=1 PYTHONPATH=. flock /tmp/sdtune-cpu.lock .venv/bin/python bench/dora_step.py [--lora_rank 4]

The model and data are bench/train_speed.py's: Stable Diffusion v1's architecture at 1/10 of its UNet's widths, random
weights, saved in diffusers' layout, and a synthetic captioned dataset; each mode is set up by the shipped
sdtune.training.loop.set_up (the adapters by sdtune.training.lora.add_training_adapter, the optimizer by
sdtune.training.optim.make_optimizer) and each step is one sdtune.training.loop.train_step call, fp32, with
--cache_latents, so that the step is the UNet's forward and backward and the optimizer's update. Three modes: LoRA
with AdamW, DoRA with AdamW, LoRA with Prodigy. After --warmup_steps steps each, the modes take turns, --rounds rounds
of --steps steps, so that a change in the machine's load hits them alike; the ratios are of one run.

State per trained parameter: the elements of the optimizer's state tensors over the trained parameters, read from the
optimizer after the run (AdamW: exp_avg, exp_avg_sq; Prodigy also keeps s, its running sum for the step-size
estimate, and p0, a copy of the starting weights, which it skips for a tensor that starts at zero, as LoRA's B
matrices do: so 4 per parameter for a full fine-tune, about 3.5 for a LoRA).

"""

import argparse
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: nothing may be downloaded

import datasets  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from train_speed import prepare_inputs, run_steps, timed_run, training_flags  # noqa: E402

from sdtune.training.config import parse_args  # noqa: E402

MODES = {"LoRA, AdamW": [], "DoRA, AdamW": ["--use_dora"], "LoRA, Prodigy": ["--optimizer", "prodigy"]}
BASELINE = "LoRA, AdamW"


def parse_bench_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora_rank", type=int, default=4, help="Every mode's rank (configs/dreambooth-lora.yaml's).")
    parser.add_argument("--resolution", type=int, default=128, help="Training resolution in pixels (latents: /8).")
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4, help="Turns each mode takes.")
    parser.add_argument("--steps", type=int, default=8, help="Steps per mode per round.")
    parser.add_argument("--warmup_steps", type=int, default=3, help="Steps per mode before timing starts.")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the machine has 2 cores).")
    bench = parser.parse_args(argv)
    # what bench/train_speed.py's data and flags read: its dataset sizes, no EMA (DreamBooth has none), no
    # checkpointing, square images
    bench.image_size, bench.num_images, bench.buckets = 2 * bench.resolution, 64, False
    bench.no_ema, bench.gradient_checkpointing = True, False
    return bench


def mode_flags(bench, folders: dict, name: str) -> list[str]:
    """bench/train_speed.py's LoRA flags with --cache_latents, the mode's own flags, and an output folder each."""
    total_steps = bench.warmup_steps + bench.rounds * bench.steps
    output = {**folders, "output": folders["output"] / str(list(MODES).index(name))}
    return training_flags(bench, output, cache_latents=True, lora=True, total_steps=total_steps) + MODES[name]


def state_per_parameter(run) -> float:
    """Optimizer state elements per trained parameter."""
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper holds the optimizer
    elements = sum(value.numel() for state in optimizer.state.values() for value in state.values()
                   if isinstance(value, torch.Tensor) and value.dim() > 0)
    return elements / sum(p.numel() for p in run.trained)


def compare(bench, folders: dict) -> dict:
    runs = {name: timed_run(parse_args(mode_flags(bench, folders, name)), hook_phases=False) for name in MODES}
    for timed in runs.values():
        run_steps(timed, 0, bench.warmup_steps)
    seconds = dict.fromkeys(runs, 0.0)
    for _ in range(bench.rounds):
        for name, timed in runs.items():
            seconds[name] += run_steps(timed, 0, bench.steps)
    return {name: {"seconds": seconds[name], "trained": timed.facts["trained_parameters"],
                   "state": state_per_parameter(timed.run), "unet": timed.facts["unet_parameters"]}
            for name, timed in runs.items()}


def print_results(results: dict, steps: int) -> None:
    base = results[BASELINE]
    print(f"| mode | ms/step | x {BASELINE} | trained parameters | optimizer state per trained parameter |")
    print("|---|---:|---:|---:|---:|")
    for name, result in results.items():
        print(f"| {name} | {1000 * result['seconds'] / steps:.1f} | {result['seconds'] / base['seconds']:.3f} | "
              f"{result['trained']:,} | {result['state']:.2f} |")


def main(argv=None) -> None:
    bench = parse_bench_args(argv)
    torch.set_num_threads(bench.threads)
    datasets.disable_progress_bars()
    latent = bench.resolution // 8
    print(f"dora_step, {date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-") as root:
        folders = prepare_inputs(Path(root), bench)
        results = compare(bench, folders)
    steps = bench.rounds * bench.steps
    print(f"small SD-shaped UNet ({results[BASELINE]['unet']:,} parameters), adapters of rank {bench.lora_rank} on "
          f"its attention, {bench.resolution} px -> {latent}x{latent}x4 cached latents, batch "
          f"{bench.train_batch_size}, fp32; {bench.warmup_steps} warm-up steps, then {bench.rounds} rounds x "
          f"{bench.steps} steps a mode")
    print_results(results, steps)


if __name__ == "__main__":
    main()
