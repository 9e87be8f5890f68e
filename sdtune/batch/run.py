"""The random-model batch behind `python -m sdtune.batch` (sdtune/batch/cli.py parses its flags): plan, check the output
folder, generate batch by batch on this process's share, record, summarise."""

import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from tqdm.auto import tqdm

from sdtune.batch import manifest
from sdtune.batch import output as batch_output
from sdtune.batch.engine import generate_batch, save_output, working_resolutions
from sdtune.batch.plan import Job, output_name, plan_batches, plan_jobs, shard
from sdtune.data.folders import list_inputs
from sdtune.errors import SdtuneError
from sdtune.generation.backend import LocalBackend
from sdtune.generation.core import GenerationSettings
from sdtune.generation.registry import ModelRegistry, ModelUnavailable, parse_model_flags
from sdtune.generation.runlog import PeakRss

logger = logging.getLogger("sdtune.batch")


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
    for outcome in generate_batch(LocalBackend(registry), batch, settings, resolution):
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
    """Everything checked before any model is loaded: the output folder's settings, each model's resolution.
    Returns the (lazy) registry and each model's working resolution."""
    specs = parse_model_flags(args.models)
    batch_output.check_settings(args.output, output_settings(args, specs))
    registry = ModelRegistry(specs, device=state.device, cache_dir=args.cache_dir, lazy=True, compile=args.compile)
    resolutions = resolutions_of(registry, args.resolution)
    state.wait_for_everyone()  # every process has compared the settings before they are recorded
    if state.is_main_process:
        batch_output.record_settings(args.output, output_settings(args, specs))
    return registry, resolutions


@contextmanager
def output_lock(folder, state: PartialState):
    """The main process holds --output's lock for the run, its other processes work under it; when another run holds
    it, every process stops with the reason."""
    with ExitStack() as held:
        problem = ""
        if state.is_main_process:
            try:
                held.enter_context(batch_output.locked(folder))
            except SdtuneError as error:
                problem = str(error)
        refused = [problem for problem in gather_object([problem]) if problem]
        if refused:
            raise SdtuneError(refused[0])
        yield


def run(args) -> dict:
    """Run the batch the parsed flags describe; returns the summary (on the main process)."""
    settings = GenerationSettings.from_args(args)
    settings.validate(image_to_image=True)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    batch_output.check_writable(args.output)
    with output_lock(args.output, state):
        return run_locked(args, settings, state)


def run_locked(args, settings: GenerationSettings, state: PartialState) -> dict:
    """The run, once this process's share of it may write to --output."""
    registry, resolutions = prepare(args, state)
    jobs = plan_jobs(list_inputs(args.input, exclude=args.output), registry.names, args.seed, args.prompt,
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
