"""Fine-tune Stable Diffusion's UNet on an image-caption dataset. Flags: python train_text_to_image.py --help"""

from sdtune.errors import exit_on_error
from sdtune.training.config import parse_args

if __name__ == "__main__":
    with exit_on_error():
        args = parse_args()
        # torch, diffusers and accelerate load only once the flags are good
        if args.check_data:
            from sdtune.data.check import main
        else:
            from sdtune.training.loop import main

        main(args)
