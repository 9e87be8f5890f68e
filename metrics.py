"""CLIP score of the stock and fine-tuned models on fixed prompts and seeds, and with --reference_images their CMMD
to a target domain. Flags: python metrics.py --help"""

from sdtune.errors import exit_on_error
from sdtune.evaluation.flags import parse_metrics_args

if __name__ == "__main__":
    with exit_on_error():
        args = parse_metrics_args()
        from sdtune.evaluation.run import run  # torch, diffusers and transformers load only once the flags are good

        run(args)
