"""metrics.py: CLIP scores of several models on the same prompts and the same noise, with their spread.

Every model renders every prompt from the same seeds (one CPU generator per (prompt, image), re-created for every
model), so differences between models are not differences in noise. Differences to the first model get a paired
bootstrap interval over prompts. With --reference_images, the same images are also scored by CMMD
(sdtune/evaluation/cmmd.py); with --subject_images, by subject fidelity (CLIP-I and DINO,
sdtune/evaluation/subject.py).
"""

import logging
import sys
from pathlib import Path

import torch

from sdtune.data.folders import list_images, printable
from sdtune.data.images import BadImageError, open_image, to_rgb
from sdtune.data.prompts import prompt_from_filename, read_prompts
from sdtune.errors import SdtuneError, exit_on_error
from sdtune.evaluation.clip_score import ClipScorer
from sdtune.evaluation.cmmd import compare_to_reference
from sdtune.evaluation.flags import parse_metrics_args
from sdtune.evaluation.reference import embed_images, embed_reference, list_reference
from sdtune.evaluation.report import print_table, write_report
from sdtune.evaluation.stats import paired_bootstrap, summarise
from sdtune.evaluation.subject import NO_DINO, DinoEmbedder, add_subject_fidelity, embed_subject, read_subject
from sdtune.generation.core import GenerationError, GenerationSettings, image_to_image, text_to_images
from sdtune.generation.registry import ModelRegistry, parse_model_flags, pick_device
from sdtune.logs import setup_logging
from sdtune.seeds import prompt_seed

logger = logging.getLogger("sdtune.evaluation.run")


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


def add_cmmd(results: dict, grids: dict, reference, scorer, seed: int) -> None:
    """Each model's CMMD to the reference images, from the images it rendered for the CLIP scores."""
    # grids hold every model's images in the same (prompt, seed) order, which the paired bootstrap relies on
    generated = {name: embed_images(scorer, [image for row in grids[name].values() for image in row])
                 for name in results}
    for name, summary in compare_to_reference(generated, reference.embeddings, seed=seed).items():
        results[name]["cmmd"] = dict(summary, reference_skipped=reference.skipped)


def subject_models(args, scorer: ClipScorer, device) -> dict:
    """--subject_images' metrics and the models that embed for them: CLIP-I with the CLIP that scores, and DINO
    unless --dino_model_name_or_path is none."""
    models = {"clip_i": scorer}
    if args.dino_model_name_or_path.lower() != NO_DINO:
        models["dino"] = DinoEmbedder(args.dino_model_name_or_path, device, cache_dir=args.cache_dir)
    return models


@exit_on_error()
def main(argv=None) -> dict:
    """metrics.py with these flags; a problem the user can fix exits with its message."""
    return run(parse_metrics_args(argv))


def run(args) -> dict:
    """Score every model the parsed flags name; prints the table and returns the results by model."""
    setup_logging()
    specs = parse_model_flags(args.models)
    inputs = read_init_images(args.init_images) if args.init_images else read_prompts(args.prompts)
    reference = list_reference(args.reference_images) if args.reference_images else None
    subject = read_subject(args.subject_images) if args.subject_images else None
    device = pick_device(args.device)
    scorer = ClipScorer(args.clip_model_name_or_path, device, cache_dir=args.cache_dir)  # small: fail early
    if reference:
        embed_reference(reference, scorer)
    subject_embedders = subject_models(args, scorer, device) if subject else {}
    if subject:
        embed_subject(subject, subject_embedders)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    registry = ModelRegistry(specs, device=device, dtype=dtype, cache_dir=args.cache_dir, compile=args.compile)
    if registry.errors:
        raise SdtuneError("Cannot score: " + "; ".join(f"{n}: {e}" for n, e in registry.errors.items()))

    results, grids, baseline = {}, {}, None
    for spec in specs:
        resolution = args.resolution or registry.native_resolution(spec.name)
        settings = GenerationSettings.from_args(args, width=resolution, height=resolution)
        logger.info("Scoring '%s' on %d %s x %d seeds", spec.name, len(inputs),
                    "inputs" if args.init_images else "prompts", args.num_images_per_prompt)
        try:
            with registry.use(spec.name) as pipeline:  # its adapter held while it is scored
                if args.init_images:
                    rows, grids[spec.name] = score_edits(pipeline, inputs, args, settings, scorer, resolution)
                else:
                    rows, grids[spec.name] = score_prompts(pipeline, inputs, args, settings, scorer)
        except GenerationError as error:
            raise SdtuneError(f"Cannot generate with '{spec.name}': {error}") from error
        results[spec.name] = dict(model_summary(rows, baseline, args.seed), path=spec.path)
        baseline = rows if baseline is None else baseline
    if reference:
        add_cmmd(results, grids, reference, scorer, args.seed)
    if subject:
        add_subject_fidelity(results, grids, subject, subject_embedders, args.seed)
    write_report(args, results, grids)
    print_table(results, specs[0].name, sys.stdout)
    return results
