"""Issue 23's proof on the tiny world: does DreamBooth teach the tiny fine-tuned model the seventh species, and does
prior preservation keep the six species it knew? (Ruiz et al. 2023: prior preservation keeps the class while the
subject is learned.)

    python -m tinyworld.datasets data/tinyworld
    flock /tmp/sdtune-cpu.lock env HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/dreambooth_tiny.py \
        --base outputs/tiny-finetuned

Steps: unless --base names a finished configs/tiny.yaml run (make demo's outputs/tiny-finetuned), `bash train.sh
--config configs/tiny.yaml` trains one. From it, `bash train.sh` trains configs/tiny-dreambooth-lora.yaml (a LoRA of
the UNet and the text encoder on the 6 pictures of subject/zxq, "a drawing of a zxq creature") twice: as shipped, with
prior preservation (class "a drawing of a creature", 48 class images the base model draws first), and the same recipe
without the prior (its class settings left out). metrics.py then scores base, prior and no-prior twice, with the tiny
CLIP:
  (a) subject fidelity: CLIP-I of each model's images of "a drawing of a zxq creature" (--subject_seeds seeds) to the
      24 held-out pictures of the species (subject/heldout, never trained on); each image's mean similarity, a
      model's mean with its bootstrap interval and the paired difference to base image by image;
  (b) the six known species: the CLIP score of configs/tiny_prompts.txt (held-out species-background pairs, 12 seeds
      each), the paired difference to base with its bootstrap interval over prompts, as metrics.py pairs them.
A rerun resumes each training from its last checkpoint and reuses the class images.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

from sdtune.evaluation.run import main as metrics
from tinyworld.creatures import SUBJECT_PROMPT

FINETUNE_RECIPE = "configs/tiny.yaml"
DREAMBOOTH_RECIPE = "configs/tiny-dreambooth-lora.yaml"
PRIOR_SETTINGS = ("with_prior_preservation", "class_data_dir", "class_prompt", "num_class_images", "prior_loss_weight",
                  "sample_batch_size")


def train(recipe: str, *flags: str) -> None:
    """One run through train.sh, the command line's own command, with every core."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # this environment's accelerate
    subprocess.run(["bash", "train.sh", "--config", recipe, *flags], check=True, env=env)


def recipe_without_prior(output: Path) -> str:
    """The DreamBooth recipe with its class settings left out: a flag cannot unset the recipe's store_true, and the
    trainer refuses class settings without --with_prior_preservation."""
    recipe = yaml.safe_load(Path(DREAMBOOTH_RECIPE).read_text())
    path = output / "tiny-dreambooth-lora-no-prior.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in recipe.items() if k not in PRIOR_SETTINGS}, sort_keys=False))
    return str(path)


def train_dreambooth(base: Path, output: Path, steps: int | None) -> dict[str, Path]:
    """The shipped DreamBooth LoRA recipe from `base`, with and without prior preservation."""
    output.mkdir(parents=True, exist_ok=True)
    common = ["--pretrained_model_name_or_path", str(base)]
    common += ["--max_train_steps", str(steps)] if steps else []
    runs = {"prior": output / "prior", "no-prior": output / "no-prior"}
    train(DREAMBOOTH_RECIPE, *common, "--output_dir", str(runs["prior"]), "--class_data_dir", str(output / "class"))
    train(recipe_without_prior(output), *common, "--output_dir", str(runs["no-prior"]))
    return runs


def score(models: list[str], prompts: Path, seeds: int, output: Path, subject: str | None = None) -> dict:
    flags = ["--models", *models, "--prompts", str(prompts), "--clip_model_name_or_path", "tinyworld/clip",
             "--num_images_per_prompt", str(seeds), "--output_dir", str(output)]
    flags += ["--subject_images", subject, "--dino_model_name_or_path", "none"] if subject else []
    return metrics(flags)


def interval(summary: dict, digits: int) -> str:
    low, high = summary["ci95"]
    return f"{summary['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def print_tables(subject: dict, species: dict) -> None:
    print("\n| model | CLIP-I to subject/heldout [95% CI] | vs base [95% CI] | known species' CLIP score | "
          "vs base [95% CI] |\n|---|---:|---:|---:|---:|")
    for name in subject:
        clip_i = subject[name]["subject"]["clip_i"]
        low, high = clip_i["ci95"]
        row = [f"{clip_i['mean']:.3f} [{low:.3f}, {high:.3f}]"]
        row.append(interval(clip_i["difference_to_first"], 3) if "difference_to_first" in clip_i else "")
        row.append(f"{species[name]['clip_score_mean']:.2f}")
        row.append(interval(species[name]["difference_to_first"], 2) if "difference_to_first" in species[name] else "")
        print(f"| {name} | " + " | ".join(row) + " |")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None,
                        help="A finished configs/tiny.yaml run (default: train one into OUTPUT/tiny-finetuned).")
    parser.add_argument("--output", default="outputs/dreambooth-tiny")
    parser.add_argument("--max_train_steps", type=int, default=None, help="DreamBooth steps (default: the recipe's).")
    parser.add_argument("--subject_seeds", type=int, default=24, help="Images of the subject prompt per model.")
    parser.add_argument("--species_seeds", type=int, default=12, help="Images per known-species prompt per model.")
    args = parser.parse_args(argv)
    output = Path(args.output)
    base = Path(args.base) if args.base else output / "tiny-finetuned"
    if not args.base:
        train(FINETUNE_RECIPE, "--output_dir", str(base))
    runs = train_dreambooth(base, output, args.max_train_steps)
    models = [f"base={base}", *(f"{name}={base},lora={run}" for name, run in runs.items())]
    subject_prompts = output / "subject_prompts.txt"
    subject_prompts.write_text(SUBJECT_PROMPT + "\n")
    subject = score(models, subject_prompts, args.subject_seeds, output / "metrics-subject",
                    subject="data/tinyworld/subject/heldout")
    species = score(models, Path("configs/tiny_prompts.txt"), args.species_seeds, output / "metrics-species")
    print_tables(subject, species)
    return {"subject": subject, "species": species}


if __name__ == "__main__":
    main()
