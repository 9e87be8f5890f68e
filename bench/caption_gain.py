"""How much of the fine-tune's gain CLIP's captions keep: the tiny recipe trained on the creatures recaptioned by
`python -m sdtune.caption --captioner clip` against the same recipe on their true captions, both scored over the
stock model as `make demo` scores (issue 22's goal: the recaptioned run's gain >= 90% of the true-caption run's).

    python -m tinyworld.datasets data/tinyworld
    flock /tmp/sdtune-cpu.lock env HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/caption_gain.py

Steps: bench/caption_quality.py strips the training split's captions and recaptions it (tiny CLIP, the 108
candidates of configs/tiny_caption_candidates.txt) into OUTPUT/clip-captions-data; `bash train.sh --config
configs/tiny.yaml` trains on it and, unless --true_model names a finished run on the true captions (make demo's
outputs/tiny-finetuned), on the true captions; metrics.py scores stock, true and clip on the held-out prompts of
configs/tiny_prompts.txt (12 seeds each, the tiny CLIP). The share is the clip run's mean gain over stock divided by
the true run's; its 95% interval is a percentile bootstrap over prompts, each resample's share the ratio of its mean
gains (the prompts paired across the three models, as metrics.py pairs them). Each training takes about 5 minutes on
2 CPU cores; a rerun resumes a run from its last checkpoint.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from sdtune.evaluation.run import main as metrics
from sdtune.evaluation.stats import percentile_interval

sys.path.insert(0, str(Path(__file__).parent))
from caption_quality import main as recaption  # noqa: E402  (bench/ is not a package)

RECIPE = "configs/tiny.yaml"


def train(data: Path, output: Path) -> Path:
    """The tiny recipe on `data` through train.sh, the command line's own command, with every core."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # this environment's accelerate
    subprocess.run(["bash", "train.sh", "--config", RECIPE, "--train_data_dir", str(data), "--output_dir",
                    str(output)], check=True, env=env)
    return output


def share_of_gain(stock: dict, true: dict, clip: dict, seed: int = 0, resamples: int = 10_000):
    """The clip run's mean gain over stock as a share of the true run's, and its bootstrap interval over prompts."""
    prompts = sorted(stock)
    true_gain = np.array([true[p] - stock[p] for p in prompts])
    clip_gain = np.array([clip[p] - stock[p] for p in prompts])
    picks = np.random.default_rng(seed).integers(0, len(prompts), size=(resamples, len(prompts)))
    replicates = clip_gain[picks].mean(axis=1) / true_gain[picks].mean(axis=1)
    return float(clip_gain.mean() / true_gain.mean()), percentile_interval(replicates)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/tinyworld/pokemon/train", help="The creatures, true captions.")
    parser.add_argument("--output", default="outputs/caption-gain")
    parser.add_argument("--true_model", default=None,
                        help="A finished configs/tiny.yaml run on the true captions (default: train one here).")
    args = parser.parse_args(argv)
    output = Path(args.output)
    recaptioned = output / "clip-captions-data"
    accuracy = recaption(["--data", args.data, "--output", str(recaptioned)])
    clip_model = train(recaptioned, output / "clip-captions")
    true_model = Path(args.true_model) if args.true_model else train(Path(args.data), output / "true-captions")
    scored = metrics(["--models", "stock=tinyworld/stock", f"true={true_model}", f"clip={clip_model}",
                      "--prompts", "configs/tiny_prompts.txt", "--clip_model_name_or_path", "tinyworld/clip",
                      "--num_images_per_prompt", "12", "--output_dir", str(output / "metrics")])
    share, (low, high) = share_of_gain(*(scored[name]["per_prompt"] for name in ("stock", "true", "clip")))
    gains = {name: scored[name]["difference_to_first"] for name in ("true", "clip")}
    print(f"\nCaptions right: {accuracy['caption']} of {sum(1 for _ in open(Path(args.data) / 'metadata.jsonl'))}")
    print("| training captions | gain over stock [95% CI] |\n|---|---:|")
    for name, gain in gains.items():
        print(f"| {name} | {gain['mean']:+.2f} [{gain['ci95'][0]:+.2f}, {gain['ci95'][1]:+.2f}] |")
    print(f"Share of the true captions' gain kept by CLIP's: {share:.1%} (95% interval {low:.1%} to {high:.1%}).")
    return {"share": share, "ci95": [low, high], "gains": gains, "captions_right": accuracy}


if __name__ == "__main__":
    main()
