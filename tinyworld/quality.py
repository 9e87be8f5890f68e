"""Does a tiny-world model draw what it is asked? Shape and colour accuracy over every (shape, colour) prompt.

Each (shape, colour) pair is drawn from several seeds, the background word cycling through the three backgrounds;
every image is drawn with the settings used everywhere else (DPM-Solver++, 25 steps, guidance 7.5) from its own seeded
generator, as sdtune.generation.core.text_to_image draws it, and is read by judge.py. bench/tinyworld_quality.py runs
the full measurement, the tests a subset.
"""

from collections import defaultdict

from diffusers import StableDiffusionPipeline

from sdtune.generation.core import GenerationSettings, for_call
from sdtune.seeds import cpu_generator
from tinyworld.judge import judge
from tinyworld.shapes import BACKGROUNDS, COLOURS, SHAPES, shape_caption

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


def measure(pipeline, cases: list[dict], settings: GenerationSettings = SETTINGS, batch_size: int = 16) -> list[dict]:
    """Each case with the judged shape and colour of its image. A batch of cases is drawn in one call: on a CPU in
    half the time of a call a case, with the same 48 verdicts on the test's cases (each image has its own generator)."""
    results = []
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        for case, image in zip(batch, draw(pipeline, batch, settings)):
            verdict = judge(image)
            results.append({**case, "judged_shape": verdict.shape, "judged_colour": verdict.colour})
    return results


def draw(pipeline, cases: list[dict], settings: GenerationSettings):
    """The cases' images from one pipeline call, each from its own case's seed."""
    view = for_call(StableDiffusionPipeline, pipeline, settings.scheduler)
    return view(prompt=[case["prompt"] for case in cases], negative_prompt=settings.negative_prompt,
                num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                width=settings.width, height=settings.height,
                generator=[cpu_generator(case["seed"]) for case in cases]).images


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
