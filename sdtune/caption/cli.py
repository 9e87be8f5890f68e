"""Caption the pictures of a folder, recursively, for training.

    python -m sdtune.caption my_images                                     # BLIP large -> my_images/metadata.jsonl
    python -m sdtune.caption my_images --format txt --prefix "sks dog, "   # kohya's cat.png + cat.txt
    python -m sdtune.caption my_images --captioner florence2 --task "<DETAILED_CAPTION>"
    python -m sdtune.caption data/tinyworld/pokemon/train --captioner clip \\
        --model_name_or_path tinyworld/clip --candidates my_candidates.txt  # CLIP picks among your captions

Existing captions are kept and only the images without one are captioned (--overwrite to redo them all), so a run
stopped half-way is finished by running it again. Captions are written as they come, each file replaced whole (never
left half-written). Images that cannot be read are skipped and counted; the summary names them.
"""

import argparse
from pathlib import Path

from sdtune.caption.spec import CAPTIONERS, DEFAULT_MODELS, FLORENCE_TASKS, FORMATS, CaptionerSpec
from sdtune.errors import SdtuneError, exit_on_error
from sdtune.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdtune.caption", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="Folder of images (searched recursively; hidden files left out).")
    parser.add_argument("--format", choices=FORMATS, default="jsonl",
                        help="jsonl: FOLDER/metadata.jsonl (file_name, text), what --train_data_dir reads; "
                             "txt: a same-named .txt beside each image (kohya's layout, also read by the trainer).")
    parser.add_argument("--captioner", choices=CAPTIONERS, default="blip",
                        help="blip: BLIP's captions; florence2: Florence-2's (--task); clip: the best of your "
                             "--candidates by CLIP similarity.")
    parser.add_argument("--model_name_or_path", default=None,
                        help=f"Hub id or local folder of the captioner's model; default: {DEFAULT_MODELS}.")
    parser.add_argument("--candidates", default=None,
                        help="clip: a text file of candidate captions, one a line; {red|blue} stands for each "
                             "alternative, so 'a {red|blue} {circle|square}' is four.")
    parser.add_argument("--prompt", default="", help="blip: text each caption starts with, e.g. 'a picture of'.")
    parser.add_argument("--task", choices=FLORENCE_TASKS, default=FLORENCE_TASKS[0],
                        help="florence2: how long a caption (default %(default)s).")
    parser.add_argument("--prefix", default="", help="Text put before every new caption: a trigger word, "
                        "e.g. 'sks dog, '.")
    parser.add_argument("--suffix", default="", help="Text put after every new caption.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Caption every image, replacing existing captions (default: keep them).")
    parser.add_argument("--batch_size", type=int, default=8, help="Images per model call.")
    parser.add_argument("--max_new_tokens", type=int, default=60, help="blip, florence2: longest caption in tokens.")
    parser.add_argument("--num_beams", type=int, default=3, help="blip, florence2: beam search width (1: greedy).")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps; default: cuda if there is one.")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if not Path(args.folder).is_dir():
        raise SdtuneError(f"{args.folder}: no such folder.")
    for flag in ("batch_size", "max_new_tokens", "num_beams"):
        if getattr(args, flag) < 1:
            raise SdtuneError(f"--{flag} must be at least 1.")
    if args.captioner == "clip" and args.candidates is None:
        raise SdtuneError("--captioner clip picks among your captions: give them with --candidates FILE.")
    if args.captioner != "clip" and args.candidates is not None:
        raise SdtuneError(f"--candidates is for --captioner clip; {args.captioner} writes its own captions.")
    return args


def captioner_spec(args, device: str) -> CaptionerSpec:
    """The captioner the flags ask for; the candidates are read (and their errors raised) before any model loads."""
    from sdtune.caption.candidates import read_candidates

    candidates = tuple(read_candidates(args.candidates)) if args.candidates else ()
    return CaptionerSpec(args.captioner, args.model_name_or_path or DEFAULT_MODELS[args.captioner], device,
                         candidates, args.prompt, args.task, args.max_new_tokens, args.num_beams)


@exit_on_error()
def main(argv=None):
    """Caption the folder and print the summary; a problem the user can fix exits with its message."""
    args = parse_args(argv)
    setup_logging()
    from sdtune.caption.run import caption_folder, default_device  # torch and transformers load only now

    spec = captioner_spec(args, args.device or default_device())
    summary = caption_folder(args.folder, spec, args.format, prefix=args.prefix, suffix=args.suffix,
                             overwrite=args.overwrite, batch_size=args.batch_size)
    print(summary.text())
    return summary
