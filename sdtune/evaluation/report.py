"""metrics.py's outputs: report.json, scores.csv and one image grid per model, published only when complete; the
tables it prints."""

import csv
import json
import platform
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from diffusers.utils import make_image_grid

LIBRARIES = ("torch", "diffusers", "transformers", "torchmetrics", "accelerate", "sdtune")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_report(args, results: dict, grids: dict) -> Path:
    """Write everything to `<output_dir>.partial/`, then swap it in: a crash never leaves a report that looks done."""
    final = Path(args.output_dir)
    staging = final.with_name(final.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, images_by_prompt in grids.items():
        rows = list(images_by_prompt.values())
        grid = make_image_grid([image for row in rows for image in row], rows=len(rows), cols=len(rows[0]))
        grid.save(staging / f"grid-{name}.png")
    write_scores_csv(staging / "scores.csv", results)
    report = {"settings": vars(args), "versions": library_versions(), "models": results}
    (staging / "report.json").write_text(json.dumps(report, indent=2))
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


def write_scores_csv(path: Path, results: dict) -> None:
    """One row an image: model, prompt (or input), seed index, seed and every score."""
    rows = [dict(model=name, **row) for name, result in results.items() for row in result["per_image"]]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_table(results: dict, baseline: str, stream) -> None:
    """model | mean ± std over images | std of per-prompt means | difference to the baseline [95% interval]."""
    header = f"{'model':<16} {'CLIP score':>16} {'prompt-mean std':>16}   difference to {baseline} [95% CI]"
    print(header, file=stream)
    for name, result in results.items():
        score = f"{result['clip_score_mean']:.2f} ± {result['clip_score_std']:.2f}"
        line = f"{name:<16} {score:>16} {result['clip_score_prompt_means_std']:>16.2f}"
        if "difference_to_first" in result:
            diff = result["difference_to_first"]
            line += f"   {diff['mean']:+.2f} [{diff['ci95'][0]:+.2f}, {diff['ci95'][1]:+.2f}]"
        for key in ("directional_similarity_mean", "preservation_mean"):
            if key in result:
                line += f"   {key.removesuffix('_mean')}: {result[key]:.3f}"
        print(line, file=stream)
    if all("cmmd" in result for result in results.values()):
        print_cmmd_table(results, baseline, stream)
    if all("subject" in result for result in results.values()):
        print_subject_table(results, baseline, stream)


def print_cmmd_table(results: dict, baseline: str, stream) -> None:
    """model | CMMD to the reference images [95% interval] | difference to the baseline [95% interval]."""
    first = next(iter(results.values()))["cmmd"]
    skipped = f", {len(first['reference_skipped'])} unreadable skipped" if first["reference_skipped"] else ""
    print(f"\nCMMD to {first['reference_images']} reference images{skipped} (lower is closer)", file=stream)
    print(f"{'model':<16} {'CMMD [95% CI]':>24}   difference to {baseline} [95% CI]", file=stream)
    for name, result in results.items():
        cmmd = result["cmmd"]
        value = f"{cmmd['value']:.3f} [{cmmd['ci95'][0]:.3f}, {cmmd['ci95'][1]:.3f}]"
        line = f"{name:<16} {value:>24}"
        if "difference_to_first" in cmmd:
            diff = cmmd["difference_to_first"]
            line += f"   {diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]"
        print(line, file=stream)


SUBJECT_METRICS = {"clip_i": "CLIP-I", "dino": "DINO"}


def print_subject_table(results: dict, baseline: str, stream) -> None:
    """model | CLIP-I [95% interval] | difference to the baseline [95% interval] | the same for DINO."""
    first = next(iter(results.values()))["subject"]
    metrics = [metric for metric in SUBJECT_METRICS if metric in first]
    skipped = f", {len(first['subject_skipped'])} unreadable skipped" if first["subject_skipped"] else ""
    print(f"\nSubject fidelity to {first['subject_images']} subject images{skipped} (mean cosine similarity, "
          "higher is closer)", file=stream)
    print(f"{'model':<16}" + "".join(f" {SUBJECT_METRICS[m] + ' [95% CI]':>24}   {'difference to ' + baseline:>28}"
                                     for m in metrics), file=stream)
    for name, result in results.items():
        line = f"{name:<16}"
        for metric in metrics:
            summary = result["subject"][metric]
            line += f" {summary['mean']:.3f} [{summary['ci95'][0]:.3f}, {summary['ci95'][1]:.3f}]".rjust(25)
            diff = summary.get("difference_to_first")
            cell = f"{diff['mean']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]" if diff else ""
            line += f"   {cell:>28}"
        print(line, file=stream)
