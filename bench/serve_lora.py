"""Benchmark: serving LoRA models on one shared base. The memory of the stock model + 4 LoRA models against one
pipeline, and the time to switch adapter between two requests against one image's generation.

    flock /tmp/sdtune-cpu.lock env HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/serve_lora.py

The adapters are made here, with sdtune's own code: the base's UNet gets an adapter from
sdtune.training.lora.add_training_adapter, its lora_B weights (zero at initialisation) are drawn at random, as training
leaves them, and sdtune.training.lora.save_adapter writes it in diffusers' format, as a --lora_rank run does. Every
model is served through sdtune.generation.registry.ModelRegistry: the LoRA models are named adapters on the stock
model's one pipeline.

Memory (fresh subprocesses, as bench/serve_batch.py's memory part): the registry with the stock model alone, and with
the stock model + 4 LoRA models, each after one image through every model (diffusers memory-maps safetensors, so
weights become resident when first used). The base is bench/serve_batch.py's random SD v1-shaped pipeline at
--scale of SD v1's widths, the adapters rank --memory_rank (configs/pokemon-lora.yaml's 4). Target: at most 1.02x
one pipeline, in unique parameter bytes and in resident memory added. The RSS after each model's loading and after
glibc's malloc_trim (freed blocks given back to the system) say where resident memory beyond the tensors goes.

Switch time (in this process): the tiny world's stock model (tinyworld/stock) with 4 adapters of rank --switch_rank
(configs/tiny-lora.yaml's 16), at the tiny world's settings (64 px, 25 steps, the app's default scheduler and
guidance). A request is registry.get(model) then sdtune.generation.core.text_to_image; the switch is the get that
changes the active adapter (LoRA to LoRA, LoRA to stock, stock to LoRA). Target: the median switch under 5% of the
median generation of one image. The bench also checks that a switch takes effect: two adapters give different images
from one seed, and stock after the adapters gives stock's first image exactly.
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: nothing may be downloaded

import diffusers.loaders.lora_pipeline  # noqa: E402,F401  imported before 'RSS before' in every memory child
import diffusers.loaders.peft  # noqa: E402,F401
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from serve_batch import peak_rss, run_memory_child, unique_parameter_bytes, write_small_pipeline  # noqa: E402

from sdtune.generation.core import GenerationSettings, text_to_image  # noqa: E402
from sdtune.generation.registry import ModelRegistry, ModelSpec  # noqa: E402
from sdtune.training.config import parse_args  # noqa: E402
from sdtune.training.lora import add_training_adapter, save_adapter  # noqa: E402

TARGET_MEMORY = 1.02  # stock + 4 LoRA models <= this x one pipeline
TARGET_SWITCH = 0.05  # median switch < this share of one image's generation
TINY_STOCK = Path("tinyworld/stock")
PROMPT = "a drawing of a red creature with big wings on a white background"


def parse_bench_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=4, help="LoRA models served next to the stock model.")
    parser.add_argument("--scale", type=float, default=0.2, help="The memory base's widths as a fraction of SD v1's.")
    parser.add_argument("--resolution", type=int, default=128, help="The memory base's native size in pixels.")
    parser.add_argument("--memory_rank", type=int, default=4, help="Rank of the memory part's adapters.")
    parser.add_argument("--switch_rank", type=int, default=16, help="Rank of the switch part's adapters.")
    parser.add_argument("--generations", type=int, default=5, help="Timed images per model for the generation time.")
    parser.add_argument("--switches", type=int, default=60, help="Timed adapter switches.")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the machine has 2 cores).")
    parser.add_argument("--skip_switch", action="store_true", help="Only measure memory.")
    parser.add_argument("--memory_child", choices=["one", "lora"], help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="*", default=[], help=argparse.SUPPRESS)  # memory child: base, adapters
    return parser.parse_args(argv)


def write_adapters(base: Path, root: Path, count: int, rank: int) -> list[Path]:
    """`count` random rank-`rank` adapters of `base`'s UNet, each saved by sdtune.training.lora.save_adapter in its
    folder."""
    folders = []
    for index in range(count):
        folder = root / f"lora{index}"
        args = parse_args(["--pretrained_model_name_or_path", str(base), "--train_data_dir", "unused",
                           "--output_dir", str(folder), "--lora_rank", str(rank), "--seed", str(index)])
        unet = UNet2DConditionModel.from_pretrained(base / "unet")
        add_training_adapter(unet, args)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, parameter in unet.named_parameters():
                if "lora_B" in name:  # zero at initialisation: the adapter would change nothing
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        folder.mkdir(parents=True)
        save_adapter(args, unet)
        folders.append(folder)
    return folders


def specs(base: Path, adapters: list[Path]) -> list[ModelSpec]:
    return [ModelSpec("stock", str(base))] + [ModelSpec(f"lora{i}", str(base), lora=str(folder))
                                              for i, folder in enumerate(adapters)]


def memory_child(kind: str, folders: list[str], resolution: int) -> None:
    """In a fresh process: serve the stock model alone ('one') or with the adapters ('lora'), one image through
    every model, and print RSS (before, loaded, served, peak) and unique parameter bytes as JSON."""
    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    before = rss()
    base, *adapters = (Path(folder) for folder in folders)
    registry = ModelRegistry(specs(base, adapters if kind == "lora" else []), device="cpu", lazy=True)
    each = []  # RSS after loading each model in turn: what the base costs, then each adapter
    for name in registry.names:
        registry.get(name)
        each.append(rss())
    loaded = rss()
    settings = GenerationSettings(num_inference_steps=2, width=resolution, height=resolution)
    pipeline = None
    for name in registry.names:
        pipeline = registry.get(name)
        text_to_image(pipeline, PROMPT, 0, settings)
    unique, _ = unique_parameter_bytes([pipeline])  # one pipeline holds every model: its adapters are in its UNet
    served, peak = rss(), peak_rss()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed blocks (the images' activations); this returns them
    print(json.dumps({"rss_before": before, "rss_loaded": loaded, "rss_served": served, "peak_rss": peak,
                      "rss_trimmed": rss(), "unique_bytes": unique, "rss_each": each}))


def memory(base: Path, adapters: list[Path], bench) -> dict:
    folders = [str(base), *map(str, adapters)]
    return {kind: run_memory_child(__file__, kind, folders, bench) for kind in ("one", "lora")}


def print_memory(results: dict, bench) -> None:
    mib = 2**20
    labels = {"one": "stock alone", "lora": f"stock + {bench.adapters} LoRA"}
    print(f"{'MiB':<20}{'RSS before':>12}{'loaded':>8}{'served':>8}{'added':>8}{'peak':>8}{'peak added':>12}"
          f"{'trimmed':>9}{'unique params':>15}")
    for kind, r in results.items():
        print(f"{labels[kind]:<20}{r['rss_before'] / mib:>12.0f}{r['rss_loaded'] / mib:>8.0f}"
              f"{r['rss_served'] / mib:>8.0f}{(r['rss_served'] - r['rss_before']) / mib:>8.0f}"
              f"{r['peak_rss'] / mib:>8.0f}{(r['peak_rss'] - r['rss_before']) / mib:>12.0f}"
              f"{r['rss_trimmed'] / mib:>9.0f}{r['unique_bytes'] / mib:>15.2f}")
    one, lora = results["one"], results["lora"]
    ratios = {
        "unique parameter bytes": lora["unique_bytes"] / one["unique_bytes"],
        "RSS added, serving": (lora["rss_served"] - lora["rss_before"]) / (one["rss_served"] - one["rss_before"]),
        "RSS added, peak": (lora["peak_rss"] - lora["rss_before"]) / (one["peak_rss"] - one["rss_before"]),
        "RSS added, after malloc_trim": ((lora["rss_trimmed"] - lora["rss_before"])
                                         / (one["rss_trimmed"] - one["rss_before"])),
    }
    for name, ratio in ratios.items():
        verdict = "met" if ratio <= TARGET_MEMORY else "MISSED"
        print(f"stock + {bench.adapters} LoRA / one pipeline, {name}: {ratio:.4f} -> {verdict} "
              f"(target <= {TARGET_MEMORY})")
    steps = np.diff([lora["rss_before"], *lora["rss_each"]]) / mib
    print(f"RSS added by loading the base, then each adapter in turn, MiB: {', '.join(f'{s:.1f}' for s in steps)}; "
          f"each adapter's parameters: {(lora['unique_bytes'] - one['unique_bytes']) / bench.adapters / mib:.2f} MiB")


def timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def generation_seconds(registry: ModelRegistry, names: list[str], settings, count: int) -> dict[str, list[float]]:
    """Seconds of `count` generations per model, the model made active (untimed) before each."""
    seconds = {name: [] for name in names}
    for _ in range(count):
        for name in names:
            pipeline = registry.get(name)
            seconds[name].append(timed(lambda: text_to_image(pipeline, PROMPT, 0, settings))[0])
    return seconds


def switch_seconds(registry: ModelRegistry, count: int) -> dict[str, list[float]]:
    """Seconds of `registry.get` each time the requested model differs from the last one, by kind of switch."""
    order = registry.names[1:] + registry.names[:1]  # lora0 .. loraN, then stock: every kind of switch in turn
    seconds = {"LoRA -> LoRA": [], "LoRA -> stock": [], "stock -> LoRA": []}
    previous = registry.names[0]
    registry.get(previous)
    for index in range(count):
        name = order[index % len(order)]
        elapsed, _ = timed(lambda: registry.get(name))
        kind = ("stock" if previous == "stock" else "LoRA") + " -> " + ("stock" if name == "stock" else "LoRA")
        seconds[kind].append(elapsed)
        previous = name
    return seconds


def switch_takes_effect(registry: ModelRegistry, settings) -> dict[str, int]:
    """Largest pixel differences (0-255): two adapters' images from one seed (must differ), and stock before and
    after serving the adapters (must be 0)."""
    def image(name):
        return np.asarray(text_to_image(registry.get(name), PROMPT, 0, settings), dtype=np.int16)

    stock_first = image("stock")
    first, second = image(registry.names[1]), image(registry.names[2])
    return {"lora0 vs lora1": int(np.abs(first - second).max()),
            "stock before vs after": int(np.abs(stock_first - image("stock")).max())}


def switching(adapters: list[Path], bench) -> dict:
    registry = ModelRegistry(specs(TINY_STOCK, adapters), device="cpu")
    settings = GenerationSettings(num_inference_steps=25, width=64, height=64)
    checks = switch_takes_effect(registry, settings)  # also the warm-up: every model has generated once
    gc.collect()
    generation = generation_seconds(registry, ["stock", "lora0"], settings, bench.generations)
    switches = switch_seconds(registry, bench.switches)
    return {"generation": generation, "switches": switches, "checks": checks}


def print_switching(results: dict, bench) -> None:
    ms = lambda values: f"{1000 * statistics.median(values):>10.1f}{1000 * max(values):>10.1f}"  # noqa: E731
    print(f"{'ms':<32}{'median':>10}{'max':>10}{'count':>7}")
    for name, values in results["generation"].items():
        print(f"{'one image, ' + name:<32}{ms(values)}{len(values):>7}")
    every = [s for values in results["switches"].values() for s in values]
    for name, values in [*results["switches"].items(), ("every switch", every)]:
        print(f"{'switch, ' + name:<32}{ms(values)}{len(values):>7}")
    share = statistics.median(every) / statistics.median(results["generation"]["stock"])
    verdict = "met" if share < TARGET_SWITCH else "MISSED"
    print(f"median switch / median stock generation: {share:.2%} -> {verdict} (target < {TARGET_SWITCH:.0%})")
    worst = max(every) / statistics.median(results["generation"]["stock"])
    print(f"slowest switch / median stock generation: {worst:.2%}")
    print(f"largest pixel differences (of 255): {results['checks']}")


def main(argv=None) -> None:
    bench = parse_bench_args(argv)
    torch.set_num_threads(bench.threads)
    if bench.memory_child:
        return memory_child(bench.memory_child, bench.models, bench.resolution)
    print(f"serve_lora, {date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    root = Path(tempfile.mkdtemp(prefix="sdtune-lora-bench-"))
    try:
        base = write_small_pipeline(root / "base", bench.scale, bench.resolution)
        print(f"memory: SD v1 layout at {bench.scale} of its widths, {bench.resolution} px, fp32; stock + "
              f"{bench.adapters} random rank-{bench.memory_rank} adapters; each row a fresh process")
        print_memory(memory(base, write_adapters(base, root / "memory", bench.adapters, bench.memory_rank), bench),
                     bench)
        if bench.skip_switch:
            return
        print()
        print(f"switch: {TINY_STOCK} + {bench.adapters} random rank-{bench.switch_rank} adapters, 64 px, 25 steps, "
              f"fp32")
        print_switching(switching(write_adapters(TINY_STOCK, root / "switch", bench.adapters, bench.switch_rank),
                                  bench), bench)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
