"""metrics.py: CLIP scores of several models on the same prompts and the same noise, with their spread.

Every model renders every prompt from the same seeds (one CPU generator per (prompt, image), re-created for every
model), so differences between models are not differences in noise. Differences to the first model get a paired
bootstrap interval over prompts.
"""

import argparse
import logging
import sys
from pathlib import Path

import torch

from sdtune.clip_scoring import ClipScorer
from sdtune.errors import SdtuneError, exit_on_error
from sdtune.generate import SCHEDULERS, GenerationError, GenerationSettings, image_to_image, text_to_images
from sdtune.image_folder import list_images, printable
from sdtune.images import BadImageError, open_image, to_rgb
from sdtune.logs import setup_logging
from sdtune.prompts import prompt_from_filename, read_prompts
from sdtune.seeds import prompt_seed
from sdtune.registry import ModelRegistry, parse_model_flags, pick_device
from sdtune.report import print_table, write_report
from sdtune.stats import paired_bootstrap, summarise

logger = logging.getLogger("sdtune.evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Score models by CLIP score on fixed prompts and seeds.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["stock=CompVis/stable-diffusion-v1-4",
                                                        "pokemon=./sd-pokemon-model"],
                        help="name=path_or_hub_id pairs, or one models YAML (configs/models.yaml); the first is "
                             "the baseline the others are compared with.")
    parser.add_argument("--prompts", default="configs/validation_prompts.txt", help="One prompt a line.")
    parser.add_argument("--num_images_per_prompt", type=int, default=4, help="Seeds per prompt.")
    parser.add_argument("--seed", type=int, default=0, help="Base of every image's seed.")
    parser.add_argument("--num_inference_steps", type=int, default=30)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--scheduler", default="dpmsolver++", choices=list(SCHEDULERS))
    parser.add_argument("--resolution", type=int, default=None, help="Image size; default: each model's native.")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="auto: float16 on CUDA, float32 elsewhere.")
    parser.add_argument("--clip_model_name_or_path", default="openai/clip-vit-base-patch16")
    parser.add_argument("--cache_dir", default=None, help="Where hub models are cached.")
    parser.add_argument("--output_dir", default="outputs/metrics")
    parser.add_argument("--init_images", default=None,
                        help="A folder of images: score image-to-image edits toward --edit_prompt instead.")
    parser.add_argument("--edit_prompt", default=None, help="The edit applied to every --init_images image.")
    parser.add_argument("--strength", type=float, default=0.6, help="Image to image strength.")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if (args.init_images is None) != (args.edit_prompt is None):
        raise SdtuneError("--init_images and --edit_prompt go together.")
    if args.num_images_per_prompt < 1:
        raise SdtuneError("--num_images_per_prompt must be at least 1.")
    return args


def score_prompts(pipeline, prompts, args, settings, scorer):
    """Render and score every (prompt, seed); returns per-image rows and the images by prompt."""
    rows, images = [], {}
    for prompt in prompts:
        seeds = [prompt_seed(args.seed, prompt, index) for index in range(args.num_images_per_prompt)]
        images[prompt] = text_to_images(pipeline, prompt, seeds, settings)
        for index, (seed, image) in enumerate(zip(seeds, images[prompt])):
            rows.append({"prompt": prompt, "index": index, "seed": seed, "clip_score": scorer.score(image, prompt)})
    return rows, images


def read_init_images(folder) -> dict[str, object]:
    """The folder's images by relative path, sorted; unreadable files stop the run with their name."""
    root = Path(folder)
    if not root.is_dir():
        raise SdtuneError(f"--init_images {folder}: not a folder.")
    images = {}
    for image in list_images(root):
        name = printable(image.key)  # reports and seeds see valid text, whatever the file system's bytes
        if image.error:
            raise SdtuneError(f"--init_images: {name}: {image.error}")
        try:
            images[name] = to_rgb(open_image(image.path))
        except BadImageError as error:
            raise SdtuneError(f"--init_images: {name}: {error}") from error
    if not images:
        raise SdtuneError(f"--init_images {folder}: no images found.")
    return images


def score_edits(pipeline, init_images, args, settings, scorer, resolution):
    """Edit every input toward --edit_prompt; score the edit's direction, what it preserved, and its CLIP score."""
    rows, images = [], {}
    for name, image in init_images.items():
        source = prompt_from_filename(name)
        images[name] = []
        for index in range(args.num_images_per_prompt):
            seed = prompt_seed(args.seed, name, index)
            edited = image_to_image(pipeline, image, args.edit_prompt, seed, settings, resolution)
            images[name].append(edited)
            rows.append({"prompt": name, "index": index, "seed": seed, "source_caption": source,
                         "clip_score": scorer.score(edited, args.edit_prompt),
                         **scorer.edit_similarities(image, edited, source, args.edit_prompt)})
    return rows, images


def model_summary(rows, baseline_rows, seed: int) -> dict:
    """Mean, spread and (against the baseline) the paired difference of one model's scores."""
    summary = summarise(scores_by_prompt(rows))
    result = {"clip_score_mean": summary["mean"], "clip_score_std": summary["std"],
              "clip_score_prompt_means_std": summary["prompt_means_std"], "per_prompt": summary["per_prompt"]}
    for key in ("directional_similarity", "preservation"):
        if rows and key in rows[0]:
            result[f"{key}_mean"] = sum(r[key] for r in rows) / len(rows)
    if baseline_rows is not None:
        baseline = summarise(scores_by_prompt(baseline_rows))["per_prompt"]
        differences = [summary["per_prompt"][p] - baseline[p] for p in summary["per_prompt"]]
        mean, interval = paired_bootstrap(differences, seed=seed)
        result["difference_to_first"] = {"mean": mean, "ci95": list(interval)}
    result["per_image"] = rows
    return result


def scores_by_prompt(rows) -> dict[str, list[float]]:
    grouped = {}
    for row in rows:
        grouped.setdefault(row["prompt"], []).append(row["clip_score"])
    return grouped


@exit_on_error()
def main(argv=None) -> dict:
    setup_logging()
    args = parse_args(argv)
    specs = parse_model_flags(args.models)
    inputs = read_init_images(args.init_images) if args.init_images else read_prompts(args.prompts)
    device = pick_device(args.device)
    scorer = ClipScorer(args.clip_model_name_or_path, device, cache_dir=args.cache_dir)  # small: fail early
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    registry = ModelRegistry(specs, device=device, dtype=dtype, cache_dir=args.cache_dir)
    if registry.errors:
        raise SdtuneError("Cannot score: " + "; ".join(f"{n}: {e}" for n, e in registry.errors.items()))

    results, grids, baseline = {}, {}, None
    for spec in specs:
        resolution = args.resolution or registry.native_resolution(spec.name)
        settings = GenerationSettings.from_args(args, width=resolution, height=resolution)
        pipeline = registry.get(spec.name)
        logger.info("Scoring '%s' on %d %s x %d seeds", spec.name, len(inputs),
                    "inputs" if args.init_images else "prompts", args.num_images_per_prompt)
        try:
            if args.init_images:
                rows, grids[spec.name] = score_edits(pipeline, inputs, args, settings, scorer, resolution)
            else:
                rows, grids[spec.name] = score_prompts(pipeline, inputs, args, settings, scorer)
        except GenerationError as error:
            raise SdtuneError(f"Cannot generate with '{spec.name}': {error}") from error
        results[spec.name] = dict(model_summary(rows, baseline, args.seed), path=spec.path)
        baseline = rows if baseline is None else baseline
    write_report(args, results, grids)
    print_table(results, specs[0].name, sys.stdout)
    return results
