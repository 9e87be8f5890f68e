"""Does a tiny-world model draw what it is asked? Shape and colour accuracy over every (shape, colour) prompt.

Each (shape, colour) pair is drawn from several seeds, the background word cycling through the three backgrounds;
every image comes from sdtune.generate.text_to_image with the settings used everywhere else (DPM-Solver++, 25 steps,
guidance 7.5) and is read by judge.py. bench/tinyworld_quality.py runs the full measurement, the tests a subset.
"""

from collections import defaultdict

from diffusers import StableDiffusionPipeline

from sdtune.generate import GenerationSettings, text_to_image
from tinyworld.shapes import BACKGROUNDS, COLOURS, SHAPES, shape_caption
from tinyworld.judge import judge

SETTINGS = GenerationSettings(width=64, height=64)  # 25 steps, guidance 7.5: the defaults everywhere else


def quality_cases(seeds: list[int]) -> list[dict]:
    """Every (shape, colour) pair once per seed; the background rotates so each pair meets all three."""
    backgrounds = list(BACKGROUNDS)
    cases = []
    for seed in seeds:
        for index, (shape, colour) in enumerate((s, c) for s in SHAPES for c in COLOURS):
            background = backgrounds[(seed + index) % len(backgrounds)]
            cases.append({"shape": shape, "colour": colour, "background": background, "seed": seed,
                          "prompt": shape_caption(shape, colour, background)})
    return cases


def measure(pipeline, cases: list[dict], settings: GenerationSettings = SETTINGS) -> list[dict]:
    """Each case with the judged shape and colour of its image."""
    results = []
    for case in cases:
        verdict = judge(text_to_image(pipeline, case["prompt"], case["seed"], settings))
        results.append({**case, "judged_shape": verdict.shape, "judged_colour": verdict.colour})
    return results


def accuracy(results: list[dict], key: str) -> float:
    return sum(r[f"judged_{key}"] == r[key] for r in results) / len(results)


def summary(results: list[dict]) -> dict:
    """Shape and colour accuracy overall and per colour, shape and background."""
    report = {"images": len(results), "shape": accuracy(results, "shape"), "colour": accuracy(results, "colour")}
    for group in ("colour", "shape", "background"):
        buckets = defaultdict(list)
        for r in results:
            buckets[r[group]].append(r)
        report[f"by_{group}"] = {name: {"shape": accuracy(rows, "shape"), "colour": accuracy(rows, "colour")}
                                 for name, rows in buckets.items()}
    return report


def table(report: dict) -> str:
    lines = [f"{report['images']} images: shape {report['shape']:.1%}, colour {report['colour']:.1%}",
             f"{'group':<10} {'value':<10} {'shape':>7} {'colour':>7}"]
    for group in ("colour", "shape", "background"):
        for name, scores in report[f"by_{group}"].items():
            lines.append(f"{group:<10} {name:<10} {scores['shape']:>7.1%} {scores['colour']:>7.1%}")
    return "\n".join(lines)


def load_pipeline(folder) -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
