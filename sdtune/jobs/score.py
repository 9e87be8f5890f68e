"""A score job: metrics.py comparing a finished training job's model with its base, in its own process through the
queue (TrainingJobs.score), so that it takes its turn on the device like a training job.

What it scores, from the trained job's recipe: the CLIP score of the base and of the trained model on the job's
validation prompts (same seeds for both, metrics.py's paired comparison), at the job's resolution and validation
sampling settings; and with a --validation_data_dir, each model's CMMD to those held-out images. (A
--validation_split holds out rows of the training folder itself, which no folder lists: no CMMD then; the report
says so.) The job's folder holds metrics.py's flags (SCORE_FILE), its model list (SCORE_MODELS_FILE), the prompts,
and output/ with report.json, scores.csv and a grid a model.
"""

import json
from pathlib import Path

import yaml

from sdtune.jobs.runner import OUTPUT_FOLDER, SCORE_FILE, SCORE_MODELS_FILE
from sdtune.jobs.store import JobError

PROMPTS_FILE = "prompts.txt"
REPORT_FILE = "report.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # a LoRA job's final weights, in its output folder
PIPELINE_INDEX = "model_index.json"  # a full fine-tune's output is a pipeline folder
BASE, TRAINED = "base", "trained"  # the models' names in the report: the first is metrics.py's baseline


def score_plan(job_id: int, recipe: dict, trained_output: Path) -> dict:
    """What to score a done job with: its base, its model, prompts and held-out folder; refused with a JobError when
    there is nothing to score on."""
    prompts = [" ".join(str(prompt).split()) for prompt in recipe.get("validation_prompts") or []]
    if not any(prompts):
        raise JobError(f"Job {job_id} has no validation prompts to score on: start a job with validation_prompts.")
    base = recipe.get("pretrained_model_name_or_path")
    if not base:
        raise JobError(f"Job {job_id}'s recipe names no base model; it cannot be compared with one.")
    if (trained_output / LORA_WEIGHTS).is_file():
        trained = {"name": TRAINED, "path": str(base), "lora": str(trained_output)}
    elif (trained_output / PIPELINE_INDEX).is_file():
        trained = {"name": TRAINED, "path": str(trained_output)}
    else:
        raise JobError(f"Job {job_id}'s output holds no model ({LORA_WEIGHTS} or a pipeline folder) to score.")
    return {"base": {"name": BASE, "path": str(base)}, "trained": trained, "prompts": [p for p in prompts if p],
            "reference": recipe.get("validation_data_dir"), "recipe": recipe}


def write_score_job(folder: Path, plan: dict, clip_model: str, images_per_prompt: int) -> None:
    """The score job's files: its model list, its prompts and metrics.py's flags (read by the runner at launch)."""
    recipe = plan["recipe"]
    (folder / OUTPUT_FOLDER).mkdir(parents=True)
    (folder / SCORE_MODELS_FILE).write_text(yaml.safe_dump({"models": [plan["base"], plan["trained"]]},
                                                           sort_keys=False))
    (folder / PROMPTS_FILE).write_text("".join(f"{prompt}\n" for prompt in plan["prompts"]))
    argv = ["--models", str(folder / SCORE_MODELS_FILE), "--prompts", str(folder / PROMPTS_FILE),
            "--output_dir", str(folder / OUTPUT_FOLDER), "--clip_model_name_or_path", clip_model,
            "--num_images_per_prompt", str(images_per_prompt)]
    for flag, key in (("--resolution", "resolution"), ("--num_inference_steps", "validation_inference_steps"),
                      ("--guidance_scale", "validation_guidance_scale"), ("--reference_images", "validation_data_dir")):
        if recipe.get(key) is not None:
            argv += [flag, str(recipe[key])]
    temporary = folder / f"{SCORE_FILE}.tmp"  # whole or absent when the runner reads it
    temporary.write_text(yaml.safe_dump({"argv": argv}, sort_keys=False))
    temporary.replace(folder / SCORE_FILE)


def score_report(path: Path) -> dict | None:
    """report.json as the API shows it: each model's CLIP score (mean, spread, difference to the base with its 95%
    interval) and CMMD when scored; no settings, paths or per-image rows. None until the job has written it."""
    try:
        report = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    shown = {}
    for name, result in report.get("models", {}).items():
        shown[name] = {key: result[key] for key in ("clip_score_mean", "clip_score_std", "difference_to_first")
                       if key in result}
        if "cmmd" in result:
            cmmd = dict(result["cmmd"])
            cmmd["reference_skipped"] = len(cmmd.get("reference_skipped") or [])
            shown[name]["cmmd"] = cmmd
    settings = report.get("settings", {})
    return {"models": shown, "images_per_prompt": settings.get("num_images_per_prompt"),
            "cmmd": bool(settings.get("reference_images"))}
