"""One device, two jobs: may the app generate while a training job trains on the device it serves from?

The trainer runs in its own process, so the two share the GPU's memory, never its tensors. The policy compares what
a running job needs at its peak with what the device has left beside the served pipelines:

    the job's training peak + the served pipelines' fp16 weights + a CUDA context per process  <=  device memory

- the training peaks are bench/train_memory.py's (README, "Measured"; SD v1-4 UNet, 512 px, batch 1, fake tensors):
  a full fine-tune with configs/pokemon.yaml 19.60 GiB, with configs/pokemon-lowmem.yaml's 8-bit AdamW and offloaded
  EMA 8.16 GiB, a rank-4 LoRA (configs/pokemon-lora.yaml) 2.31 GiB;
- a served SD v1 pipeline's fp16 weights: 2.0 GiB (bench/SERVING.md; its LoRAs share it), counted once a base folder;
- CUDA_CONTEXT_GIB for each of the two processes (the README's 0.5-1.5 GB of context and fragmentation, high end).

On a 24 GB GPU that admits a LoRA job beside several served models (2.31 + 2.0 n + 3 GiB) and refuses generation
during a full fine-tune (19.6 + 2.0 + 3 > 24): while it trains, a generation request is answered at once with a
message naming the job (wait for it, or Stop it), instead of both processes running out of memory mid-step. On an
80 GB GPU both fit and generation goes on. An app serving from the CPU never waits: the job can only slow it down.
Generation's own activations are not in the sum (not measured; a 512 px fp16 image's are far below the context
margin).
"""

from pathlib import Path

from sdtune.jobs.api import read_recipe

GIB = 2**30
FULL_FINETUNE_GIB = 19.60  # configs/pokemon.yaml
LOWMEM_FINETUNE_GIB = 8.16  # configs/pokemon-lowmem.yaml: 8-bit AdamW, EMA in CPU memory, cached latents
LORA_GIB = 2.31  # configs/pokemon-lora.yaml
SERVED_PIPELINE_GIB = 2.0  # SD v1 in fp16
CUDA_CONTEXT_GIB = 1.5  # each process: the app's and the trainer's


def training_peak_gib(recipe: dict) -> float:
    """A job's peak device memory, by its kind of recipe (the figures above, for SD v1 at 512 px)."""
    if recipe.get("lora_rank"):
        return LORA_GIB
    if recipe.get("use_8bit_adam") and (recipe.get("offload_ema") or not recipe.get("use_ema")):
        return LOWMEM_FINETUNE_GIB
    return FULL_FINETUNE_GIB


def served_pipelines(specs) -> int:
    """How many pipelines the served models hold: one a base (a LoRA model shares its base's)."""
    return len({(spec.path, spec.unet, spec.single_file) for spec in specs})


def generation_refusal(running: list[tuple[int, str, dict]], device_type: str, device_gib: float | None,
                       pipelines: int) -> str | None:
    """Why generation must wait while these jobs (id, name, recipe) train, or None when it may run now."""
    if device_type != "cuda" or device_gib is None:
        return None  # the app serves from the CPU (or a device the trainer does not use)
    for job_id, name, recipe in running:
        peak = training_peak_gib(recipe)
        needed = peak + pipelines * SERVED_PIPELINE_GIB + 2 * CUDA_CONTEXT_GIB
        if needed > device_gib:
            kind = "a LoRA" if recipe.get("lora_rank") else "a full fine-tune"
            return (f"Training job {job_id} ({name}), {kind}, is using the GPU: its steps peak near {peak:.1f} GiB, "
                    f"which with the {pipelines} served pipeline(s) is more than this {device_gib:.0f} GiB device "
                    "holds. Generation runs again when the job ends; Stop it in the Train tab to generate now.")
    return None


def device_memory_gib(device) -> float | None:
    """The total memory of a CUDA device in GiB; None for any other device."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / GIB


def running_recipes(jobs) -> list[tuple[int, str, dict]]:
    """(id, name, recipe) of the training jobs running in a TrainingJobs' queue (score jobs are short and small)."""
    return [(job.id, job.name, read_recipe(Path(jobs.runner.folder(job))))
            for job in jobs.store.list(["running"]) if job.kind == "train"]


def generation_gate(jobs, registry):
    """The app's check before each generation (Service.device_gate): the refusal, or None, for the jobs running now
    on the device the registry serves from."""
    device_gib = device_memory_gib(registry.device)

    def refusal() -> str | None:
        return generation_refusal(running_recipes(jobs), registry.device.type, device_gib,
                                  served_pipelines(registry.specs.values()))

    return refusal
