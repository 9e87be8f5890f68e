"""Benchmark: what a two-LoRA stack costs against one LoRA, per image, at the tiny world's settings.

    flock /tmp/sdtune-cpu.lock env HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/lora_stack.py

The tiny world's stock model (tinyworld/stock) serves two LoRA models of rank --rank (configs/tiny-lora.yaml's 16),
made as bench/serve_lora.py makes them (sdtune's add_training_adapter and save_adapter, random B matrices). A request
is the app's local backend drawing one 64 px image at 25 steps with the app's default scheduler and guidance: the
single LoRA is the model `lora0`, the stack `lora0` with `lora1` beside it at weight 0.5 (diffusers' set_adapters with
two names), and for scale the stock model with no adapter active. The kinds alternate, so that the machine's drift
hits them alike; the ratios are of the medians.
Target: the stack at most 1.05x one LoRA. The bench also checks that the stack takes effect (its image differs from
the single LoRA's).
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: nothing may be downloaded

import torch  # noqa: E402
from serve_lora import TINY_STOCK, write_adapters  # noqa: E402

from sdtune.generation.backend import LocalBackend  # noqa: E402
from sdtune.generation.core import GenerationSettings  # noqa: E402
from sdtune.generation.registry import ModelRegistry, ModelSpec  # noqa: E402

TARGET = 1.05  # a two-LoRA stack <= this x one LoRA, per image
PROMPT = "a drawing of a red creature with big wings on a white background"


def parse_bench_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16, help="Rank of both adapters.")
    parser.add_argument("--images", type=int, default=12, help="Timed images of each kind.")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the machine has 2 cores).")
    return parser.parse_args(argv)


def timed(call) -> tuple[float, bytes]:
    start = time.perf_counter()
    image = call()
    return time.perf_counter() - start, image


def main(argv=None) -> dict:
    args = parse_bench_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        adapters = write_adapters(TINY_STOCK, Path(root), 2, args.rank)
        loras = [ModelSpec(f"lora{i}", str(TINY_STOCK), lora=str(adapter)) for i, adapter in enumerate(adapters)]
        registry = ModelRegistry([ModelSpec("stock", str(TINY_STOCK)), *loras], device="cpu")
        backend, settings = LocalBackend(registry), GenerationSettings(num_inference_steps=25, width=64, height=64)
        # the stock model for scale: what one LoRA's layers cost, which a second one adds again
        kinds = {"no LoRA": {"model": "stock"}, "one LoRA": {}, "two-LoRA stack": {"stack": [("lora1", 0.5)]}}

        def draw(options):
            options = dict(options)
            model = options.pop("model", "lora0")
            return backend.text_to_images(model, None, PROMPT, [0], settings, **options)[0].tobytes()

        images = {kind: draw(options) for kind, options in kinds.items()}  # warm-up, and the check
        assert images["one LoRA"] != images["two-LoRA stack"], "the stack changed nothing"
        seconds = {kind: [] for kind in kinds}
        for _ in range(args.images):
            for kind, options in kinds.items():
                elapsed, image = timed(lambda: draw(options))
                assert image == images[kind], f"{kind}: not the same image twice"
                seconds[kind].append(elapsed)
    medians = {kind: statistics.median(values) for kind, values in seconds.items()}
    ratio = medians["two-LoRA stack"] / medians["one LoRA"]
    print(f"LoRA stack cost ({date.today()}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"tinyworld/stock, rank {args.rank}, 64 px, 25 steps, {args.images} images each)")
    print(f"{'kind':<16} {'median s/image':>15}")
    for kind, median in medians.items():
        print(f"{kind:<16} {median:>15.3f}")
    print(f"one LoRA / no LoRA: {medians['one LoRA'] / medians['no LoRA']:.3f}x")
    print(f"stack / one: {ratio:.3f}x (target <= {TARGET}x): {'met' if ratio <= TARGET else 'NOT met'}")
    return {"medians": medians, "ratio": ratio}


if __name__ == "__main__":
    main()
