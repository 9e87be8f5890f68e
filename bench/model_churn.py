"""Benchmark: models added and removed while serving. Memory given back, and requests under load while models come
and go.

    flock /tmp/sdtune-cpu.lock env HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/model_churn.py

The registry serves the tiny world's stock model (tinyworld/stock) and a LoRA of it; the model manager
(sdtune/app/models.py, as the Models tab and /add_model call it) adds and removes a full fine-tune (the stock
pipeline saved again with a changed UNet: a second UNet, sharing the VAE and text encoder) and a second LoRA, --cycles
times. Memory: the registry's unique parameter bytes and this process's resident memory (after gc and glibc's
malloc_trim) before the first add, with the models added, and after each removal. Target: unique bytes back to the
value before exactly, resident memory within 5%. Load: two threads keep drawing with the stock model and the LoRA
throughout (the app's local backend, 64 px, 10 steps); every image must equal the one each draws alone, and none may
fail.
"""

import argparse
import ctypes
import gc
import os
import platform
import shutil
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: nothing may be downloaded

import psutil  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from serve_lora import TINY_STOCK, write_adapters  # noqa: E402

from sdtune.app.models import ModelManager  # noqa: E402
from sdtune.generation.backend import LocalBackend  # noqa: E402
from sdtune.generation.core import GenerationSettings  # noqa: E402
from sdtune.generation.registry import ModelRegistry, ModelSpec  # noqa: E402

TARGET_RSS = 0.05  # resident memory after a removal within this share of the value before the add
PROMPT = "a drawing of a red creature with big wings on a white background"


def parse_bench_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=4, help="Times the two models are added and removed.")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the machine has 2 cores).")
    return parser.parse_args(argv)


def trimmed_rss() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed blocks; this returns them to the system
    return psutil.Process().memory_info().rss


def write_finetune(root: Path) -> Path:
    """The stock pipeline with its UNet's weights changed: a full fine-tune's output folder, as far as serving sees."""
    pipeline = StableDiffusionPipeline.from_pretrained(TINY_STOCK)
    with torch.no_grad():
        for parameter in pipeline.unet.parameters():
            parameter.mul_(1.01)
    pipeline.save_pretrained(root / "finetune")
    return root / "finetune"


class Load:
    """Threads drawing with the given models until stopped, each image checked against the model's own."""

    def __init__(self, registry, models: list[str]):
        self.backend = LocalBackend(registry)
        self.settings = GenerationSettings(num_inference_steps=10, width=64, height=64)
        self.expected = {model: self.draw(model) for model in models}
        self.done, self.images, self.wrong, self.failed = threading.Event(), 0, 0, []
        self.threads = [threading.Thread(target=self.run, args=(model,)) for model in models]

    def draw(self, model: str) -> bytes:
        return self.backend.text_to_images(model, None, PROMPT, [0], self.settings)[0].tobytes()

    def run(self, model: str) -> None:
        while not self.done.is_set():
            try:
                image = self.draw(model)
            except Exception as error:  # noqa: BLE001 - counted and reported: the bench's verdict
                self.failed.append(f"{model}: {error}")
                continue
            self.images += 1
            self.wrong += image != self.expected[model]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        for thread in self.threads:
            thread.join()


def main(argv=None) -> dict:
    args = parse_bench_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp())
    try:
        lora, extra = write_adapters(TINY_STOCK, root, 2, 16)
        finetune = write_finetune(root)
        registry = ModelRegistry([ModelSpec("stock", str(TINY_STOCK.resolve())),
                                  ModelSpec("lora", str(TINY_STOCK.resolve()), lora=str(lora))], device="cpu")
        manager = ModelManager(registry, root, root / "app")
        rows, start = [], time.perf_counter()
        with Load(registry, ["stock", "lora"]) as load:
            for cycle in range(args.cycles):
                before = (registry.parameter_bytes(), trimmed_rss())
                manager.add("finetune", finetune.name)
                manager.add("extra", extra.name, base="stock")
                added = (registry.parameter_bytes(), trimmed_rss())
                manager.remove("finetune")
                manager.remove("extra")
                rows.append((cycle, before, added, (registry.parameter_bytes(), trimmed_rss())))
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"Models added and removed under load ({date.today()}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, tinyworld/stock + a LoRA served, a fine-tune and a LoRA added and removed)")
    print(f"{'cycle':>5} {'unique MiB before':>18} {'added':>8} {'removed':>8} {'RSS MiB before':>15} {'added':>8} "
          f"{'removed':>8} {'RSS removed/before':>19}")
    worst = 0.0
    for cycle, before, added, removed in rows:
        change = removed[1] / before[1] - 1
        worst = max(worst, abs(change))
        print(f"{cycle:>5} {before[0] / 2**20:>18.2f} {added[0] / 2**20:>8.2f} {removed[0] / 2**20:>8.2f} "
              f"{before[1] / 2**20:>15.1f} {added[1] / 2**20:>8.1f} {removed[1] / 2**20:>8.1f} {1 + change:>19.3f}")
    exact = all(removed[0] == before[0] for _, before, _, removed in rows)
    print(f"unique bytes back to the value before every time: {exact}; resident memory within {worst:.1%} "
          f"(target {TARGET_RSS:.0%}): {'met' if worst <= TARGET_RSS else 'NOT met'}")
    print(f"under load: {load.images} images in {seconds:.0f} s, {load.wrong} not their model's own, "
          f"{len(load.failed)} failed {load.failed[:3]}")
    return {"rows": rows, "exact": exact, "worst_rss": worst, "images": load.images, "wrong": load.wrong,
            "failed": load.failed}


if __name__ == "__main__":
    main()
