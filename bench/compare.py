"""Benchmark: a comparison grid against the same images generated one by one with the generation core.

    flock /tmp/sdtune-cpu.lock env HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/compare.py

The tiny world's models (configs/models-tiny.yaml: its stock model and the fine-tune `make demo` writes to
outputs/tiny-finetuned), M models x S seeds at its settings (64 px, 25 steps, the app's default scheduler and
guidance). The comparison is sdtune.app.compare.compare through sdtune.app.service.Service, as the Compare tab runs it:
checks, each cell through the service's backend (sdtune/generation/backend.py: the generation core in this process),
every cell's PNG with its parameters, the labelled grid PNG and the run log. The baseline is the leanest way to the same
images: the pipelines in hand, then text_to_image for each (seed, model) in the grid's order, nothing saved. The two
take turns, --rounds times, the first of each round alternating, so that a drift in the machine's load hits both
alike; both are warmed up first. The bench also checks that the two give the same images, pixel for pixel.

Target: the comparison takes at most 1.10x the baseline (total over the rounds).
"""

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: nothing may be downloaded

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sdtune.app.compare import compare  # noqa: E402
from sdtune.app.service import Service  # noqa: E402
from sdtune.generation.core import GenerationSettings, text_to_image  # noqa: E402
from sdtune.generation.registry import ModelRegistry, read_model_list  # noqa: E402

TARGET = 1.10  # comparison / one by one
PROMPT = "a drawing of a red creature with big wings on a white background"
SEED = 1000


def parse_bench_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="configs/models-tiny.yaml", help="The model list compared (columns).")
    parser.add_argument("--seeds", type=int, default=4, help="Rows: seeds SEED, SEED+1, ...")
    parser.add_argument("--steps", type=int, default=25, help="Denoising steps (the tiny world's 25).")
    parser.add_argument("--size", type=int, default=64, help="Width and height in pixels (the tiny world's 64).")
    parser.add_argument("--rounds", type=int, default=5, help="Timed turns of each way.")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the machine has 2 cores).")
    return parser.parse_args(argv)


def timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def by_comparison(service: Service, bench, settings) -> list[np.ndarray]:
    *_, final = compare(service, PROMPT, service.registry.names, "seed", str(bench.seeds), SEED, settings)
    return [np.asarray(cell.image) for cell in final.cells]


def one_by_one(pipelines: dict, bench, settings) -> list[np.ndarray]:
    return [np.asarray(text_to_image(pipeline, PROMPT, SEED + row, settings))
            for row in range(bench.seeds) for pipeline in pipelines.values()]


def run(bench) -> dict[str, list[float]]:
    registry = ModelRegistry(read_model_list(bench.models), device="cpu")
    if registry.errors:
        raise SystemExit(f"models that failed to load: {registry.errors} (run `make demo` for the tiny fine-tune)")
    output = Path(tempfile.mkdtemp(prefix="sdtune-compare-bench-"))
    try:
        service = Service(registry, output, output)
        pipelines = {name: registry.get(name) for name in registry.names}
        settings = GenerationSettings(num_inference_steps=bench.steps, width=bench.size, height=bench.size)
        ways = {"comparison": lambda: by_comparison(service, bench, settings),
                "one by one": lambda: one_by_one(pipelines, bench, settings)}
        images = {name: way() for name, way in ways.items()}  # warm-up, and the images to check
        same = all(np.array_equal(a, b) for a, b in zip(*images.values()))
        print(f"same images both ways: {same}")
        seconds = {name: [] for name in ways}
        for round_ in range(bench.rounds):
            for name in list(ways)[:: 1 if round_ % 2 == 0 else -1]:
                seconds[name].append(timed(ways[name])[0])
        return seconds
    finally:
        shutil.rmtree(output, ignore_errors=True)


def report(seconds: dict[str, list[float]], bench) -> None:
    images = len(read_model_list(bench.models)) * bench.seeds
    print(f"{'way':<14}" + "".join(f"{'round ' + str(r + 1):>10}" for r in range(bench.rounds))
          + f"{'total s':>10}{'s/image':>10}")
    for name, values in seconds.items():
        print(f"{name:<14}" + "".join(f"{value:>10.3f}" for value in values)
              + f"{sum(values):>10.3f}{sum(values) / (images * len(values)):>10.4f}")
    ratio = sum(seconds["comparison"]) / sum(seconds["one by one"])
    per_round = [c / o for c, o in zip(seconds["comparison"], seconds["one by one"])]
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"comparison / one by one: {ratio:.3f} -> {verdict} (target <= {TARGET:.2f}); per round: "
          f"{', '.join(f'{r:.3f}' for r in per_round)} (median {statistics.median(per_round):.3f})")


def main(argv=None) -> None:
    bench = parse_bench_args(argv)
    torch.set_num_threads(bench.threads)
    print(f"compare, {date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{bench.models}, {bench.seeds} seeds, {bench.size} px, {bench.steps} steps, fp32, {bench.rounds} rounds")
    report(run(bench), bench)


if __name__ == "__main__":
    main()
