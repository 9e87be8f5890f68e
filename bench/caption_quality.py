"""How well `python -m sdtune.caption --captioner clip` recaptions the tiny world's creatures.

    flock /tmp/sdtune-cpu.lock env HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/caption_quality.py

The creature training set (python -m tinyworld.datasets data/tinyworld writes it) is copied without its captions,
captioned by the shipped command with the tiny world's CLIP (tinyworld/clip) choosing among the 108 candidates of
configs/tiny_caption_candidates.txt (every colour, feature and background in the captions' template), and each new
caption is compared with the true one: the share of images whose colour, feature, background and whole caption are
right, with a 95% Wilson interval. The recaptioned folder (images + metadata.jsonl) is left in --output for a
fine-tune on it (--train_data_dir).
"""

import argparse
import json
import math
import re
import shutil
from pathlib import Path

from sdtune.caption.cli import main as caption_main

CAPTION = re.compile(r"^a drawing of an? (?P<colour>\w+) creature with (?P<feature>.+) on a (?P<background>\w+) "
                     r"background$")
ATTRIBUTES = ("colour", "feature", "background")


def strip_captions(source: Path, destination: Path) -> dict[str, str]:
    """Copy the images of `source` into an empty `destination`; return their true captions by file name."""
    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines()]
    shutil.rmtree(destination, ignore_errors=True)
    destination.mkdir(parents=True)
    for row in rows:
        shutil.copyfile(source / row["file_name"], destination / row["file_name"])
    return {row["file_name"]: row["text"] for row in rows}


def wilson(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion."""
    share = successes / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def accuracy(truth: dict[str, str], written: dict[str, str]) -> dict[str, int]:
    """How many images have each attribute (and the whole caption) right; a missing caption counts as wrong."""
    right = dict.fromkeys((*ATTRIBUTES, "caption"), 0)
    for name, true_caption in truth.items():
        expected, got = CAPTION.match(true_caption), CAPTION.match(written.get(name, ""))
        for attribute in ATTRIBUTES:
            right[attribute] += bool(got) and got[attribute] == expected[attribute]
        right["caption"] += written.get(name) == true_caption
    return right


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/tinyworld/pokemon/train", help="The captioned creatures.")
    parser.add_argument("--output", default="outputs/caption-quality/train", help="Where the recaptioned copy goes.")
    parser.add_argument("--candidates", default="configs/tiny_caption_candidates.txt")
    parser.add_argument("--clip", default="tinyworld/clip")
    args = parser.parse_args(argv)
    truth = strip_captions(Path(args.data), Path(args.output))
    caption_main([args.output, "--captioner", "clip", "--model_name_or_path", args.clip,
                  "--candidates", args.candidates, "--batch_size", "64", "--device", "cpu"])
    rows = [json.loads(line) for line in (Path(args.output) / "metadata.jsonl").read_text().splitlines()]
    right = accuracy(truth, {row["file_name"]: row["text"] for row in rows})
    print(f"{len(truth)} images of {args.data}, recaptioned by {args.clip} among the candidates of {args.candidates}")
    print("| right | share | 95% interval |\n|---|---|---|")
    for name, count in right.items():
        low, high = wilson(count, len(truth))
        print(f"| {name} | {count}/{len(truth)} = {count / len(truth):.1%} | {low:.1%} to {high:.1%} |")
    return right


if __name__ == "__main__":
    main()
