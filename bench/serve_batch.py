"""Benchmark: the random-model image-to-image batch, sdtune against the naive loop it replaces, and the RAM of serving
two models.

    cd /work/main && flock /tmp/sdtune-cpu.lock env HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/serve_batch.py

The naive loop is what the img2img pipelines this project grew from did for every image: build
StableDiffusionImg2ImgPipeline.from_pretrained(model), then generate. sdtune runs the same images, models, prompts,
seeds and settings twice: through Service.random_batch (the app's batch tab, 4 images a call) and through the batch
CLI (sdtune.batch.cli.main, --batch_size images a call). Both sdtune totals include loading the models once, and hashing
their weight files as a freshly started process does; the naive loop's outputs are compared with sdtune's pixel by
pixel. One image goes through each path first, untimed, so that no run pays for first calls or a cold page cache.

Denoising time is the time spent inside StableDiffusionImg2ImgPipeline.__call__ (text encoding, VAE encode, the
denoising loop, VAE decode); the UNet's forward time is reported next to it. Overhead = total - denoising: model
loading, image decoding and resizing, PNG writing, bookkeeping. Target: sdtune's overhead is under 10% of its total.

Memory is measured in fresh subprocesses: ModelRegistry with one model, with two that differ only in the UNet, and
(for contrast) two naive from_pretrained pipelines, each after one image through every model (diffusers
memory-maps safetensors, so weights become resident when first used). Target: two models cost at most
(one pipeline + one UNet) x 1.1, in unique parameter bytes and in resident memory added.

The models are random, SD v1-shaped pipelines at a fraction (--scale) of SD v1's widths. From a warm page cache
from_pretrained costs about 0.2 s whatever the size, so the settings set the ratio of loading to denoising: the
defaults give about 1:4, --num_inference_steps 6 about 1:1 (bench/SERVING.md has both). Compare ratios of one run:
absolute times on a shared 2-core machine mean little.
"""

import argparse
import gc
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: nothing may be downloaded

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

from sdtune.app.service import Service  # noqa: E402
from sdtune.batch import cli as batch_cli  # noqa: E402
from sdtune.data.folders import InputImage  # noqa: E402
from sdtune.data.prompts import prompt_from_filename  # noqa: E402
from sdtune.generation import registry as registry_module  # noqa: E402
from sdtune.generation.core import GenerationSettings, image_to_image, scheduler_class, working_size  # noqa: E402
from sdtune.generation.registry import ModelRegistry, ModelSpec  # noqa: E402
from sdtune.generation.schedulers import SCHEDULERS  # noqa: E402
from sdtune.seeds import draw_model, image_seed  # noqa: E402
from tinyworld.factories import sd_layout_unet, sd_layout_vae, sd_scheduler, text_config  # noqa: E402
from tinyworld.shapes import random_shape, shape_words  # noqa: E402
from tinyworld.tokenizer import save_word_tokenizer  # noqa: E402

SD_UNET = (320, 640, 1280, 1280)  # SD v1's UNet block widths; its CLIP is 768 wide
SD_VAE = (128, 256, 512, 512)  # its VAE's
TARGET_OVERHEAD = 0.10  # sdtune's batch: (total - time in pipeline calls) < this share of the total
TARGET_MEMORY = 1.10  # two models <= this x (one pipeline + one UNet)
WEIGHTED = ("vae", "text_encoder", "unet")


def parse_bench_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.2,
                        help="Width of every component as a fraction of SD v1's (rounded to multiples of 32).")
    parser.add_argument("--resolution", type=int, default=128, help="The models' native size in pixels (latents: /8).")
    parser.add_argument("--num_images", type=int, default=16, help="Input images in the batch.")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--scheduler", default="dpmsolver++", choices=list(SCHEDULERS))
    parser.add_argument("--batch_size", type=int, default=4, help="The batch CLI's images per pipeline call.")
    parser.add_argument("--repeats", type=int, default=2, help="Rounds of the three approaches; each keeps its best.")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the machine has 2 cores).")
    parser.add_argument("--skip_speed", action="store_true", help="Only measure memory.")
    parser.add_argument("--skip_memory", action="store_true", help="Only measure speed.")
    parser.add_argument("--keep", default=None, help="Write models, inputs and outputs here and keep them.")
    parser.add_argument("--memory_child", choices=["one", "two", "naive-two"], help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="*", default=[], help=argparse.SUPPRESS)  # memory child's model folders
    return parser.parse_args(argv)


def widths(scale: float, full) -> tuple[int, ...]:
    """SD's widths scaled, each a multiple of 32 (GroupNorm's 32 groups)."""
    return tuple(max(32, int(round(width * scale / 32)) * 32) for width in full)


def small_text_encoder(tokenizer, scale: float) -> CLIPTextModel:
    """SD v1's CLIP text transformer (12 layers over a 77-token window) scaled in width."""
    width = widths(scale, (768,))[0]
    return CLIPTextModel(text_config(tokenizer, width, num_hidden_layers=12, intermediate_size=4 * width,
                                     num_attention_heads=8))


def write_small_pipeline(folder: Path, scale: float, resolution: int) -> Path:
    """A random SD-shaped StableDiffusionPipeline in diffusers format (safetensors): SD v1's layouts, 2 layers a
    block as in SD, every width scaled."""
    torch.manual_seed(0)
    tokenizer = save_word_tokenizer(shape_words(), folder / "tokenizer")
    text_encoder = small_text_encoder(tokenizer, scale)
    vae = sd_layout_vae(widths(scale, SD_VAE), layers_per_block=2, sample_size=resolution)
    unet = sd_layout_unet(widths(scale, SD_UNET), layers_per_block=2,
                          cross_attention_dim=text_encoder.config.hidden_size, sample_size=resolution // 8)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def write_unet_variant(stock: Path, folder: Path, seed: int = 1) -> Path:
    """A copy of `stock` whose UNet weights are perturbed, as a fine-tune leaves them; every other file is a copy."""
    shutil.copytree(stock, folder)
    unet = UNet2DConditionModel.from_pretrained(stock / "unet")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-3)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    return folder


def write_inputs(folder: Path, count: int, resolution: int) -> list[Path]:
    """Shape images named after their captions, in two aspect ratios and larger than the working size (as uploads
    are), so each is resized on the way in and out."""
    rng = random.Random(0)
    folder.mkdir(parents=True)
    paths = []
    for index in range(count):
        image, caption = random_shape(rng, size=2 * resolution)
        if index % 2:  # a landscape crop: another working size, so the CLI plans more batches
            image = image.crop((0, resolution // 2, 2 * resolution, 3 * resolution // 2))
        path = folder / f"{caption.replace(' ', '_')}_{index:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


class CallTimer:
    """Seconds inside every img2img pipeline call and every UNet forward, in this process, wherever they come from
    (class-level wrappers, so neither sdtune's nor the naive loop's code changes)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)

    def _wrap(self, owner, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        setattr(owner, attribute, timed)

    def install(self) -> "CallTimer":
        self._wrap(StableDiffusionImg2ImgPipeline, "__call__", "pipeline call")
        self._wrap(UNet2DConditionModel, "forward", "UNet forward")
        for pipeline_class in (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline):  # registry's, naive loop's
            self._wrap(pipeline_class, "from_pretrained", "loading")
        self._wrap(registry_module, "component_fingerprint", "fingerprinting")  # looked up by name at each call
        return self

    @contextmanager
    def measure(self, result: dict):
        """Fill `result` with the total seconds of the block and the seconds/calls inside it."""
        gc.collect()  # the previous run's pipelines must not be collected on this run's time
        registry_module._digests.clear()  # each run hashes the weight files as a freshly started process does
        self.seconds.clear()
        self.calls.clear()
        start = time.perf_counter()
        yield
        result.update(total=time.perf_counter() - start, **self.seconds, calls=self.calls["pipeline call"],
                      loads=self.calls["loading"])


def settings_from(bench) -> GenerationSettings:
    return GenerationSettings(num_inference_steps=bench.num_inference_steps, guidance_scale=bench.guidance_scale,
                              scheduler=bench.scheduler, strength=bench.strength)


def naive_image(model: Path, source: Path, prompt: str, seed: int, bench, output: Path) -> None:
    """One image the old way: a fresh pipeline from disk, then image to image, as sdtune would set it up."""
    # the scheduler goes in through the constructor, as in sdtune, where the pipeline corrects legacy settings
    # (DDIM's clip_sample); assigning pipeline.scheduler afterwards skips that and gives other images
    scheduler = scheduler_class(bench.scheduler).from_pretrained(model, subfolder="scheduler")
    pipeline = StableDiffusionImg2ImgPipeline.from_pretrained(model, scheduler=scheduler, use_safetensors=True)
    pipeline.set_progress_bar_config(disable=True)
    image = Image.open(source).convert("RGB")
    size = working_size(image.size, bench.resolution)
    edited = pipeline(prompt=prompt, negative_prompt="", image=image.resize(size, Image.Resampling.LANCZOS),
                      strength=bench.strength, num_inference_steps=bench.num_inference_steps,
                      guidance_scale=bench.guidance_scale, generator=torch.Generator().manual_seed(seed)).images[0]
    edited.resize(image.size, Image.Resampling.LANCZOS).save(output)


def run_naive(models: dict[str, Path], inputs: list[Path], bench, output: Path, batch_seed: int) -> dict[str, Path]:
    """The naive loop over every input, with the model, prompt and seed sdtune's batch gives it."""
    output.mkdir(parents=True)
    outputs = {}
    for path in inputs:
        model = draw_model(batch_seed, path.name, list(models))
        outputs[path.name] = output / path.name
        naive_image(models[model], path, prompt_from_filename(path.name), image_seed(batch_seed, path.name), bench,
                    outputs[path.name])
    return outputs


def run_service(models: dict[str, Path], inputs: list[Path], bench, output: Path, batch_seed: int) -> dict[str, Path]:
    """Service.random_batch, as the app's batch tab calls it, including loading the models."""
    registry = ModelRegistry([ModelSpec(name, str(path)) for name, path in models.items()], device="cpu")
    service = Service(registry, output, allowed_root=inputs[0].parent)
    items = [InputImage(path.name, path) for path in inputs]
    for update in service.random_batch(items, list(models), "", batch_seed, settings_from(bench)):
        pass
    failed = [row for row in update.rows if row.error]
    if failed:
        raise RuntimeError(f"Service.random_batch failed on {failed}")
    return {row.file: row.output for row in update.rows}


def run_cli(models: dict[str, Path], inputs: list[Path], bench, output: Path, batch_seed: int) -> dict[str, Path]:
    """python -m sdtune.batch, in this process (so its pipeline calls are timed), including loading the models."""
    summary = batch_cli.main([
        "--input", str(inputs[0].parent), "--output", str(output),
        "--models", *[f"{name}={path}" for name, path in models.items()], "--seed", str(batch_seed),
        "--strength", str(bench.strength), "--num_inference_steps", str(bench.num_inference_steps),
        "--guidance_scale", str(bench.guidance_scale), "--scheduler", bench.scheduler,
        "--batch_size", str(bench.batch_size),
    ])
    if summary["done"] != len(inputs) or summary["failed"]:
        raise RuntimeError(f"sdtune.batch did not finish every image: {summary}")
    entries = [json.loads(line) for line in (output / "manifest.jsonl").read_text().splitlines()]
    return {entry["input"]: output / entry["output"] for entry in entries}


def max_difference(first: dict[str, Path], second: dict[str, Path]) -> int:
    """The largest pixel difference (0-255) between two runs' outputs of the same inputs."""
    assert first.keys() == second.keys(), (sorted(first), sorted(second))
    return max(int(np.abs(np.asarray(Image.open(first[k]), dtype=np.int16) -
                          np.asarray(Image.open(second[k]), dtype=np.int16)).max()) for k in first)


def warm_up(models: dict[str, Path], inputs: list[Path], bench, root: Path) -> None:
    """One image through each code path first, so neither timed run pays for first-call costs (lazy imports,
    kernel selection) nor for a cold page cache."""
    sample = inputs[:1]
    run_naive(models, sample, bench, root / "warm-naive", batch_seed=0)
    run_service(models, sample, bench, root / "warm-service", batch_seed=0)


def speed(models: dict[str, Path], inputs: list[Path], bench, root: Path) -> dict:
    """Time the three approaches on the same batch and check they made the same images."""
    timer = CallTimer().install()
    warm_up(models, inputs, bench, root)
    results, outputs, batch_seed = {}, {}, 7
    runs = [("naive loop", run_naive), ("sdtune Service.random_batch", run_service), ("sdtune batch CLI", run_cli)]
    for repeat in range(bench.repeats):  # rounds in turn, so a burst of load elsewhere hits one round, not one approach
        for name, run in runs:
            result = {}
            with timer.measure(result):
                outputs[name] = run(models, inputs, bench, root / f"{name.replace(' ', '-')}-{repeat}", batch_seed)
            if name not in results or result["total"] < results[name]["total"]:
                results[name] = result
    results["naive loop"]["same images as Service"] = max_difference(outputs["naive loop"],
                                                                     outputs["sdtune Service.random_batch"])
    results["naive loop"]["same images as CLI"] = max_difference(outputs["naive loop"], outputs["sdtune batch CLI"])
    drawn = [draw_model(batch_seed, p.name, list(models)) for p in inputs]
    results["draws"] = {name: drawn.count(name) for name in models}
    return results


def print_speed(results: dict, count: int) -> None:
    names = [n for n in results if n != "draws"]
    print(f"{'approach':<30}{'total s':>8}{'pipeline call s':>16}{'UNet fwd s':>11}{'overhead s':>11}"
          f"{'overhead %':>11}{'loading s':>10}{'hashing s':>10}{'s/image':>8}{'calls':>6}{'loads':>6}")
    for name in names:
        r = results[name]
        overhead = r["total"] - r["pipeline call"]
        print(f"{name:<30}{r['total']:>8.2f}{r['pipeline call']:>16.2f}{r['UNet forward']:>11.2f}{overhead:>11.2f}"
              f"{100 * overhead / r['total']:>10.1f}%{r.get('loading', 0.0):>10.2f}"
              f"{r.get('fingerprinting', 0.0):>10.2f}{r['total'] / count:>8.2f}{r['calls']:>6}{r['loads']:>6}")
    naive = results["naive loop"]
    print(f"models drawn: {results['draws']}; largest pixel difference from the naive loop's images: "
          f"Service {naive['same images as Service']}, CLI {naive['same images as CLI']} (of 255)")
    for name in names[1:]:
        print(f"{name}: {naive['total'] / results[name]['total']:.2f}x faster than the naive loop")


def unique_parameter_bytes(pipelines) -> tuple[int, int]:
    """Bytes of distinct parameters and buffers across pipelines (a shared tensor counts once), and the UNet's."""
    tensors = {}
    for pipeline in pipelines:
        for component in WEIGHTED:
            module = getattr(pipeline, component)
            for tensor in (*module.parameters(), *module.buffers()):
                tensors[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    unet = pipelines[0].unet
    unet_bytes = sum(t.numel() * t.element_size() for t in (*unet.parameters(), *unet.buffers()))
    return sum(tensors.values()), unet_bytes


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: that keeps the parent's peak across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: the memory benchmark needs Linux")


def memory_child(kind: str, folders: list[str], resolution: int) -> None:
    """In a fresh process: load as `kind` says, run one image through each model, and print RSS (before, after
    loading, after serving, peak) and parameter bytes as JSON."""
    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    before = rss()
    if kind == "naive-two":
        pipelines = [StableDiffusionImg2ImgPipeline.from_pretrained(f, use_safetensors=True) for f in folders]
    else:
        names = [f"model{i}" for i in range(len(folders))]
        registry = ModelRegistry([ModelSpec(n, f) for n, f in zip(names, folders)], device="cpu")
        pipelines = [registry.get(n) for n in names]
    loaded = rss()
    # safetensors are memory-mapped: weights become resident when first used, so serve one image with each model
    settings = GenerationSettings(num_inference_steps=2, strength=0.5)
    for pipeline in pipelines:
        image_to_image(pipeline, Image.new("RGB", (resolution, resolution), "red"), "a red circle", 0, settings,
                       resolution)
    unique, unet = unique_parameter_bytes(pipelines)
    print(json.dumps({"rss_before": before, "rss_loaded": loaded, "rss_served": rss(), "peak_rss": peak_rss(),
                      "unique_bytes": unique, "unet_bytes": unet}))


def run_memory_child(script: str, kind: str, folders: list[str], bench) -> dict:
    """Run `script --memory_child kind` in its own interpreter, so one's allocations cannot hide in another's, and
    return the JSON it prints last."""
    command = [sys.executable, script, "--memory_child", kind, "--threads", str(bench.threads),
               "--resolution", str(bench.resolution), "--models", *folders]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode:
        raise SystemExit(f"memory child '{kind}' failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(models: dict[str, Path], bench) -> dict:
    stock, tuned = (str(p) for p in models.values())
    return {kind: run_memory_child(__file__, kind, folders, bench)
            for kind, folders in [("one", [stock]), ("two", [stock, tuned]), ("naive-two", [stock, tuned])]}


def print_memory(results: dict) -> dict:
    """The memory table (MiB) and the target verdicts."""
    mib = 2**20
    labels = {"one": "registry, one model", "two": "registry, two models", "naive-two": "two naive pipelines"}
    print(f"{'MiB':<24}{'RSS before':>12}{'loaded':>8}{'served':>8}{'added':>8}{'peak':>8}{'peak added':>12}"
          f"{'unique params':>15}")
    for kind, r in results.items():
        print(f"{labels[kind]:<24}{r['rss_before'] / mib:>12.0f}{r['rss_loaded'] / mib:>8.0f}"
              f"{r['rss_served'] / mib:>8.0f}{(r['rss_served'] - r['rss_before']) / mib:>8.0f}"
              f"{r['peak_rss'] / mib:>8.0f}{(r['peak_rss'] - r['rss_before']) / mib:>12.0f}"
              f"{r['unique_bytes'] / mib:>15.1f}")
    one, two = results["one"], results["two"]
    unet = one["unet_bytes"]
    verdicts = {
        "unique parameter bytes": two["unique_bytes"] / (one["unique_bytes"] + unet),
        "RSS added, serving": (two["rss_served"] - two["rss_before"]) / (one["rss_served"] - one["rss_before"] + unet),
        "RSS added, peak": (two["peak_rss"] - two["rss_before"]) / (one["peak_rss"] - one["rss_before"] + unet),
    }
    print(f"UNet: {unet / mib:.1f} MiB = {100 * unet / one['unique_bytes']:.0f}% of one pipeline's parameters")
    for name, ratio in verdicts.items():
        verdict = "met" if ratio <= TARGET_MEMORY else "MISSED"
        print(f"two models / (one pipeline + one UNet), {name}: {ratio:.3f} -> {verdict} (target <= {TARGET_MEMORY})")
    return verdicts


def main(argv=None) -> None:
    bench = parse_bench_args(argv)
    torch.set_num_threads(bench.threads)
    if bench.memory_child:
        return memory_child(bench.memory_child, bench.models, bench.resolution)
    print(f"serve_batch, {date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    root = Path(bench.keep or tempfile.mkdtemp(prefix="sdtune-serve-bench-"))
    try:
        models = {"stock": write_small_pipeline(root / "models" / "stock", bench.scale, bench.resolution)}
        models["tuned"] = write_unet_variant(models["stock"], root / "models" / "tuned")
        inputs = write_inputs(root / "inputs", bench.num_images, bench.resolution)
        unet_parameters = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(models["stock"] / "unet")
                              .parameters())
        print(f"models: SD v1 layout at {bench.scale} of its widths (UNet {widths(bench.scale, SD_UNET)}, "
              f"{unet_parameters / 1e6:.1f} M parameters), {bench.resolution} px native; 'tuned' differs from "
              f"'stock' in its UNet only")
        print(f"batch: {bench.num_images} images ({2 * bench.resolution}x{2 * bench.resolution} and "
              f"{2 * bench.resolution}x{bench.resolution}), {bench.num_inference_steps} steps x strength "
              f"{bench.strength}, CFG {bench.guidance_scale}, {bench.scheduler}, fp32; CLI --batch_size "
              f"{bench.batch_size}")
        if not bench.skip_speed:
            print()
            results = speed(models, inputs, bench, root / "runs")
            print_speed(results, bench.num_images)
            for name in ("sdtune Service.random_batch", "sdtune batch CLI"):
                r = results[name]
                share = (r["total"] - r["pipeline call"]) / r["total"]
                verdict = "met" if share < TARGET_OVERHEAD else "MISSED"
                print(f"Target ({name} overhead < {TARGET_OVERHEAD:.0%} of total): {share:.1%} -> {verdict}")
        if not bench.skip_memory:
            print()
            print_memory(memory(models, bench))
    finally:
        if not bench.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
