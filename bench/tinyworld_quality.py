"""Benchmark: does the tiny world's stock model draw what it is asked, and does the configs/tiny.yaml fine-tune work?

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/tinyworld_quality.py \
        [--tuned outputs/tiny-finetuned] [--seeds 8] [--json report.json]

Measured: every (shape, colour) pair of the base world x --seeds seeds (background word rotating), drawn by
sdtune.generation.core.text_to_image at the default 25 steps and guidance 7.5 and read by the deterministic judge
(tinyworld/judge.py). Targets: the drawn shape matches the prompt >= 90%, the dominant colour >= 75%.
With --tuned, the same table for the fine-tuned model (how much of the base world it forgot), then metrics.py itself
scores stock against fine-tuned on the held-out creature prompts (configs/tiny_prompts.txt) with the tiny CLIP,
12 seeds each; its table's 95% interval (paired bootstrap over prompts) must be above zero.
About 2 minutes for the stock model on 2 cores, 4 in all with --tuned (measured: 4 min 11 s).
"""

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face import: nothing may be downloaded

from sdtune.evaluation.run import main as metrics  # noqa: E402
from tinyworld import CLIP, REPO, STOCK  # noqa: E402
from tinyworld.quality import load_pipeline, measure, quality_cases, summary, table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stock", default=str(STOCK))
    parser.add_argument("--tuned", help="A pipeline fine-tuned with configs/tiny.yaml (make demo).")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--json", help="Write every figure here as well.")
    parser.add_argument("--metrics_dir", default="outputs/tinyworld-bench-metrics", help="metrics.py's report.")
    args = parser.parse_args()
    cases = quality_cases(list(range(args.seeds)))
    report = {"stock": summary(measure(load_pipeline(args.stock), cases))}
    print(f"Stock model {args.stock}, {args.seeds} seeds x every (shape, colour) prompt:\n{table(report['stock'])}")
    if args.tuned:
        report["tuned"] = summary(measure(load_pipeline(args.tuned), cases))
        print(f"\nFine-tuned model {args.tuned} on the same base-world prompts:\n{table(report['tuned'])}")
        print()
        scored = metrics(["--models", f"stock={args.stock}", f"pokemon={args.tuned}",
                          "--prompts", str(REPO / "configs/tiny_prompts.txt"), "--num_images_per_prompt", "12",
                          "--clip_model_name_or_path", str(CLIP), "--output_dir", args.metrics_dir])
        report["improvement"] = scored["pokemon"]["difference_to_first"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
