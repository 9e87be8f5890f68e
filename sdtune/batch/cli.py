"""Random-model image to image over a folder, resumable, on one process or many (accelerate launch).

    python -m sdtune.batch --input data/input_images --output outputs/batch --seed 0
    python -m sdtune.batch --input photo.png --models alpha=path/to/model --prompt "in the style of picasso" \
        --output outputs/one
    accelerate launch --multi_gpu --num_processes 4 -m sdtune.batch --input ... --output ...

Each image gets a model drawn from (seed, its relative path), the prompt written in its file name (unless --prompt),
and an output named after the input, the model and the seed, carrying its parameters; manifest.jsonl gets one line
per image. A rerun skips what is done; an interrupted run loses at most the batch in flight. An --output folder made
with other settings is refused (batch_settings.json records them), and is never read as input, even inside --input.
One run at a time writes to an --output folder: a second is refused while the first runs (it holds batch.lock there).
"""

import argparse
from pathlib import Path

from sdtune.errors import SdtuneError, exit_on_error
from sdtune.generation.flags import add_compile_flag, add_sampling_flags
from sdtune.limits import BATCH_SIZE, MAX_SIDE, check_seed
from sdtune.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdtune.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+",
                        help="Folders of input images (searched recursively; an image is named by its path inside "
                             "its folder) and/or image files (named by their file name): one or more.")
    parser.add_argument("--output", required=True, help="Folder for outputs and manifest.jsonl.")
    parser.add_argument("--models", nargs="+", default=["configs/models.yaml"],
                        help="A models YAML, or name=path_or_hub_id pairs.")
    parser.add_argument("--prompt", default=None, help="One prompt for every image instead of its file name.")
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--seed", type=int, default=0,
                        help="Seeds the model draws and every image's noise (0 to 2**32 - 1).")
    parser.add_argument("--resolution", type=int, default=0, help="Working resolution; 0: each model's native.")
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="Images per pipeline call.")
    add_sampling_flags(parser)
    add_compile_flag(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for path in map(Path, args.input):
        if not path.exists():
            raise SdtuneError(f"--input {path}: no such folder or file.")
        if Path(args.output).resolve() == path.resolve():
            raise SdtuneError("--output must not be an --input folder: give it a folder of its own.")
    if args.batch_size < 1:
        raise SdtuneError("--batch_size must be at least 1.")
    if args.resolution and not 8 <= args.resolution <= MAX_SIDE:
        raise SdtuneError(f"--resolution must be 0 (each model's own) or from 8 to {MAX_SIDE}, not {args.resolution}.")
    check_seed(args.seed)
    return args


@exit_on_error()
def main(argv=None) -> dict:
    """Run the batch; a problem the user can fix exits with its message."""
    args = parse_args(argv)
    setup_logging()
    from sdtune.batch.run import run  # torch, diffusers and accelerate load only once the flags are good

    return run(args)

