"""metrics.py's command line: its flags and the checks that need no model. Light: torch, diffusers and
transformers load only once the flags are good."""

import argparse

from sdtune.errors import SdtuneError
from sdtune.generation.flags import DEVICES, add_compile_flag, add_sampling_flags
from sdtune.limits import check_seed


def metrics_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metrics.py", description="Score models by CLIP score on fixed prompts "
                                     "and seeds (and by CMMD to --reference_images).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["stock=CompVis/stable-diffusion-v1-4",
                                                        "pokemon=./sd-pokemon-model"],
                        help="name=path_or_hub_id pairs, or one models YAML (configs/models.yaml); the first is "
                             "the baseline the others are compared with.")
    parser.add_argument("--prompts", default="configs/validation_prompts.txt", help="One prompt a line.")
    parser.add_argument("--num_images_per_prompt", type=int, default=4, help="Seeds per prompt.")
    parser.add_argument("--seed", type=int, default=0, help="Base of every image's seed.")
    parser.add_argument("--resolution", type=int, default=None, help="Image size; default: each model's native.")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="auto: float16 on CUDA, float32 elsewhere.")
    parser.add_argument("--clip_model_name_or_path", default="openai/clip-vit-base-patch16")
    parser.add_argument("--output_dir", default="outputs/metrics")
    parser.add_argument("--init_images", default=None,
                        help="A folder of images: score image-to-image edits toward --edit_prompt instead.")
    parser.add_argument("--edit_prompt", default=None, help="The edit applied to every --init_images image.")
    parser.add_argument("--reference_images", default=None,
                        help="A folder of target-domain images (a datasets imagefolder folder as it is): also "
                             "report each model's CMMD to them, the distance between the CLIP embeddings of its "
                             "images and theirs (lower is closer), with bootstrap intervals.")
    parser.add_argument("--subject_images", default=None,
                        help="A folder of real pictures of a trained subject (DreamBooth): also report each model's "
                             "subject fidelity as the DreamBooth paper does, CLIP-I and DINO (the mean cosine "
                             "similarity of its images' embeddings to the pictures'; higher is closer), with "
                             "bootstrap intervals.")
    parser.add_argument("--dino_model_name_or_path", default="facebook/dino-vits16",
                        help="The self-supervised ViT for --subject_images' DINO score (the paper's DINO ViT-S/16); "
                             "none: CLIP-I only.")
    add_sampling_flags(parser)
    add_compile_flag(parser)
    return parser


def parse_metrics_args(argv=None) -> argparse.Namespace:
    args = metrics_parser().parse_args(argv)
    if (args.init_images is None) != (args.edit_prompt is None):
        raise SdtuneError("--init_images and --edit_prompt go together.")
    if args.num_images_per_prompt < 1:
        raise SdtuneError("--num_images_per_prompt must be at least 1.")
    check_seed(args.seed)
    return args
