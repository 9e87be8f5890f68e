"""Random-model image to image over a folder, resumable, on one process or many (accelerate launch).

    python -m sdtune.batch --input data/input_images --output outputs/batch --seed 0
    accelerate launch --multi_gpu --num_processes 4 -m sdtune.batch --input ... --output ...

Each image gets a model drawn from (seed, its relative path), the prompt written in its file name (unless --prompt),
and an output named after the input, the model and the seed, carrying its parameters; manifest.jsonl gets one line
per image. A rerun skips what is done; an interrupted run loses at most the batch in flight.
"""

import argparse
import logging
import time
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from tqdm.auto import tqdm

from sdtune import manifest
from sdtune.batch_plan import Job, output_name, plan_batches, scan, shard
from sdtune.errors import SdtuneError
from sdtune.generate import SCHEDULERS, GenerationError, GenerationSettings, images_to_images
from sdtune.images import BadImageError, open_image, to_rgb
from sdtune.pnginfo import format_parameters, save_png
from sdtune.registry import ModelRegistry, parse_model_flags
from sdtune.runlog import PeakRss
from sdtune.seeds import check_seed

logger = logging.getLogger("sdtune.batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="Folder of input images (searched recursively).")
    parser.add_argument("--output", required=True, help="Folder for outputs and manifest.jsonl.")
    parser.add_argument("--models", nargs="+", default=["configs/models.yaml"],
                        help="A models YAML, or name=path_or_hub_id pairs.")
    parser.add_argument("--prompt", default=None, help="One prompt for every image instead of its file name.")
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--seed", type=int, default=0, help="Seeds the model draws and every image's noise.")
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--num_inference_steps", type=int, default=30)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--scheduler", default="dpmsolver++", choices=list(SCHEDULERS))
    parser.add_argument("--resolution", type=int, default=0, help="Working resolution; 0: each model's native.")
    parser.add_argument("--batch_size", type=int, default=4, help="Images per pipeline call.")
    parser.add_argument("--cache_dir", default=None, help="Where hub models are cached.")
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if not Path(args.input).is_dir():
        raise SystemExit(f"--input {args.input}: no such folder.")
    if args.batch_size < 1:
        raise SystemExit("--batch_size must be at least 1.")
    return args


def entry(job: Job, output: str | None, seconds: float, error: str = "") -> dict:
    return {"input": job.key, "output": output, "model": job.model, "prompt": job.prompt, "seed": job.seed,
            "seconds": round(seconds, 3), "error": error}


def load_images(batch: list[Job], todo: set[str], part: Path):
    """Decode a batch's inputs; one that fails is recorded (if still to do) and left out."""
    usable, images, failed = [], [], 0
    for job in batch:
        try:
            images.append(to_rgb(open_image(job.path)))
            usable.append(job)
        except BadImageError as error:
            if job.key in todo:
                manifest.append(part, entry(job, None, 0.0, str(error)))
                failed += 1
    return usable, images, failed


def run_batch(registry, batch: list[Job], todo: set[str], args, settings, part: Path) -> tuple[int, int]:
    """Generate one planned batch (all of it, so results do not depend on what was done before) and record
    the images not yet done. Returns (done, failed)."""
    start = time.perf_counter()
    usable, images, failed = load_images(batch, todo, part)
    pending = [job for job in usable if job.key in todo]
    if not pending:
        return 0, failed
    resolution = args.resolution or registry.native_resolution(usable[0].model)
    try:
        outputs = images_to_images(registry.get(usable[0].model), images, [j.prompt for j in usable],
                                   [j.seed for j in usable], settings, resolution)
    except (GenerationError, RuntimeError, ValueError) as error:  # the batch fails, the run goes on
        for job in pending:
            manifest.append(part, entry(job, None, time.perf_counter() - start, str(error)))
        return 0, failed + len(pending)
    seconds = (time.perf_counter() - start) / len(usable)
    for job, image in zip(usable, outputs):
        if job.key in todo:
            name = output_name(job.key, job.model, job.seed)
            path = Path(args.output) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(image, path, format_parameters(job.prompt, settings.sized(*job.size), job.seed, job.model,
                                                    image_to_image=True))
            manifest.append(part, entry(job, name, seconds))
    return len(pending), failed


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        settings = GenerationSettings.from_args(args)
        settings.validate(image_to_image=True)
        check_seed(args.seed)
    except SdtuneError as error:
        raise SystemExit(str(error)) from error
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    registry = ModelRegistry(parse_model_flags(args.models), device=state.device, cache_dir=args.cache_dir, lazy=True)
    resolutions = {name: args.resolution or registry.native_resolution(name) for name in registry.names}
    jobs = scan(args.input, registry.names, args.seed, args.prompt, resolutions)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()  # every process reads the manifest before any writes to it
    already = manifest.completed(args.output)
    todo = {job.key for job in jobs if job.key not in already}
    part = manifest.part_path(args.output, state.process_index)
    if state.is_main_process:  # files that cannot be used at all are recorded once, by the main process
        for job in jobs:
            if job.error and job.key in todo:
                manifest.append(part, entry(job, None, 0.0, job.error))

    mine = shard(plan_batches(jobs, args.batch_size), state.num_processes, state.process_index)
    done = failed = 0
    start = time.perf_counter()
    with PeakRss() as memory:
        bar = tqdm(total=sum(map(len, mine)), desc=f"process {state.process_index}", position=state.process_index)
        for batch in mine:
            if any(job.key in todo for job in batch):
                batch_done, batch_failed = run_batch(registry, batch, todo, args, settings, part)
                done, failed = done + batch_done, failed + batch_failed
            bar.update(len(batch))
            if state.is_main_process:
                bar.set_postfix(all_processes=len(manifest.read_all(args.output)))
        bar.close()
    seconds = time.perf_counter() - start
    gpu_peak = torch.cuda.max_memory_allocated(state.device) / 2**20 if state.device.type == "cuda" else 0.0
    totals = gather_object([{"done": done, "failed": failed, "peak_ram_mib": memory.peak / 2**20,
                             "peak_gpu_mib": gpu_peak}])
    state.wait_for_everyone()
    summary = None
    if state.is_main_process:
        manifest.merge(args.output)
        unusable = sum(1 for job in jobs if job.error and job.key in todo)
        summary = summarise(totals, len(jobs) - len(todo), seconds, unusable)
        logger.info("Done: %(done)d, skipped (already done): %(skipped)d, failed: %(failed)d, %(images_per_second).2f "
                    "images/s, peak RAM %(peak_ram_mib).0f MiB and GPU %(peak_gpu_mib).0f MiB per process", summary)
    return summary


def summarise(totals: list[dict], skipped: int, seconds: float, unusable: int) -> dict:
    done = sum(t["done"] for t in totals)
    return {"done": done, "skipped": skipped, "failed": sum(t["failed"] for t in totals) + unusable,
            "images_per_second": done / seconds if seconds > 0 else 0.0,
            "peak_ram_mib": max(t["peak_ram_mib"] for t in totals),
            "peak_gpu_mib": max(t["peak_gpu_mib"] for t in totals)}


if __name__ == "__main__":
    main()
