"""Random-model image to image over a folder, resumable, on one process or many (accelerate launch).

    python -m sdtune.batch --input data/input_images --output outputs/batch --seed 0
    accelerate launch --multi_gpu --num_processes 4 -m sdtune.batch --input ... --output ...

Each image gets a model drawn from (seed, its relative path), the prompt written in its file name (unless --prompt),
and an output named after the input, the model and the seed, carrying its parameters; manifest.jsonl gets one line
per image. A rerun skips what is done; an interrupted run loses at most the batch in flight. An --output folder made
with other settings is refused (batch_settings.json records them), and is never read as input, even inside --input.
"""

import argparse
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from tqdm.auto import tqdm

from sdtune import batch_output, manifest
from sdtune.batch_engine import generate_batch, save_output, working_resolutions
from sdtune.batch_plan import BATCH_SIZE, Job, output_name, plan_batches, plan_jobs, shard
from sdtune.errors import SdtuneError, exit_on_error
from sdtune.generate import SCHEDULERS, GenerationSettings
from sdtune.image_folder import list_images
from sdtune.logs import setup_logging
from sdtune.registry import ModelRegistry, ModelUnavailable, parse_model_flags
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
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="Images per pipeline call.")
    parser.add_argument("--cache_dir", default=None, help="Where hub models are cached.")
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if not Path(args.input).is_dir():
        raise SdtuneError(f"--input {args.input}: no such folder.")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise SdtuneError("--output must not be the --input folder: give it a folder of its own.")
    if args.batch_size < 1:
        raise SdtuneError("--batch_size must be at least 1.")
    return args


def output_settings(args, specs) -> dict:
    """The flags that change a batch's images, as batch_output records them (not --batch_size: batching changes
    floating-point rounding only)."""
    return {"--seed": args.seed, "--prompt": args.prompt, "--negative_prompt": args.negative_prompt,
            "--strength": args.strength, "--num_inference_steps": args.num_inference_steps,
            "--guidance_scale": args.guidance_scale, "--scheduler": args.scheduler, "--resolution": args.resolution,
            "--models": [" ".join(f"{k}={v}" for k, v in asdict(spec).items() if v) for spec in specs]}


def resolutions_of(registry: ModelRegistry, resolution: int) -> dict[str, int]:
    try:
        return working_resolutions(registry, registry.names, resolution)
    except ModelUnavailable as error:
        raise SdtuneError(f"{error} Fix its entry in --models or leave it out.") from error


def entry(job: Job, output: str | None, seconds: float, error: str = "") -> dict:
    return {"input": job.key, "output": output, "model": job.model, "prompt": job.prompt, "seed": job.seed,
            "seconds": round(seconds, 3), "error": error}


def run_batch(registry, batch: list[Job], todo: set[str], resolution: int, settings, output: Path,
              part: Path) -> tuple[int, int]:
    """Generate one planned batch (all of it, so results do not depend on what was done before) and record
    the images not yet done. Returns (done, failed)."""
    done = failed = 0
    for outcome in generate_batch(registry, batch, settings, resolution):
        job = outcome.job
        if job.key not in todo:
            continue
        if outcome.image is None:
            manifest.append(part, entry(job, None, outcome.seconds, outcome.error))
            failed += 1
            continue
        try:
            save_output(outcome, output, settings)
        except OSError as error:  # a full disk fails every later image too: stop with the reason
            raise SdtuneError(f"Cannot write to --output {output}: {error.strerror or error}.") from error
        manifest.append(part, entry(job, output_name(job.key, job.model, job.seed), outcome.seconds))
        done += 1
    return done, failed


def prepare(args, state: PartialState) -> tuple[ModelRegistry, dict[str, int]]:
    """Everything checked before any model is loaded: the output folder, its settings, each model's resolution.
    Returns the (lazy) registry and each model's working resolution."""
    specs = parse_model_flags(args.models)
    batch_output.check_writable(args.output)
    batch_output.check_settings(args.output, output_settings(args, specs))
    registry = ModelRegistry(specs, device=state.device, cache_dir=args.cache_dir, lazy=True)
    resolutions = resolutions_of(registry, args.resolution)
    state.wait_for_everyone()  # every process has compared the settings before they are recorded
    if state.is_main_process:
        batch_output.record_settings(args.output, output_settings(args, specs))
    return registry, resolutions


@exit_on_error()
def main(argv=None) -> dict:
    """Run the batch; a problem the user can fix exits with its message."""
    setup_logging()
    args = parse_args(argv)
    settings = GenerationSettings.from_args(args)
    settings.validate(image_to_image=True)
    check_seed(args.seed)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    registry, resolutions = prepare(args, state)
    jobs = plan_jobs(list_images(args.input, exclude=args.output), registry.names, args.seed, args.prompt,
                     resolutions)
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
                batch_done, batch_failed = run_batch(registry, batch, todo, resolutions[batch[0].model], settings,
                                                     Path(args.output), part)
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
